"""Every figure of the project: uda/analyze.py's and the toy benchmark's (uda/bench/toy.py).

matplotlib is imported inside each function (and only here), so everything else runs without it:
`available()` says whether it is installed, `MISSING` is the one line printed when it is not. Figures
are drawn on matplotlib's object-oriented API (Figure + the Agg canvas, no pyplot state, no display
needed) at a fixed size and DPI: the returned (width, height) in pixels is the PNG's size.
"""
import math

import numpy as np

DPI = 100
MISSING = "figures skipped: matplotlib is not installed (pip install matplotlib)"
SOURCE_MARKER, TARGET_MARKER = "o", "x"  # feature picture: the domain of a pixel


def available():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def new_figure(width, height, rows=1, cols=1):
    """(figure, axes array of rows x cols) of width x height inches at DPI."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return figure, np.asarray(figure.subplots(rows, cols, squeeze=False))


def save(figure, path):
    """Write a PNG of exactly the figure's size (no tight bounding box); returns (width, height) pixels."""
    figure.savefig(path, dpi=DPI, format="png")
    width, height = figure.get_size_inches()
    return round(width * DPI), round(height * DPI)


def series_colours(count):
    """A distinct colour per checkpoint / run (matplotlib's tab10 cycle, then tab20)."""
    from matplotlib import colormaps
    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def plain(values):
    """None (undefined) -> NaN, which matplotlib leaves out."""
    return [math.nan if v is None else v for v in values]


# --------------------------------------------------------------------------------------------------
# uda/analyze.py
# --------------------------------------------------------------------------------------------------
def draw_grouped_bars(axes, classes, labels, columns, ylabel, title):
    """One group of bars per class, one bar per checkpoint (columns[k][i]: checkpoint k, class i)."""
    width = 0.8 / len(labels)
    x = np.arange(len(classes))
    for k, (label, values, colour) in enumerate(zip(labels, columns, series_colours(len(labels)))):
        axes.bar(x + (k - (len(labels) - 1) / 2) * width, plain(values), width, label=label, color=colour)
    axes.set_xticks(x, classes, rotation=45, ha="right")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize="small")
    axes.grid(axis="y", alpha=0.3)


def bars_width(classes, labels):
    return max(6.0, 0.25 * len(classes) * (len(labels) + 1))


def grouped_bars(path, classes, labels, columns, ylabel, title):
    """Per-class values of several checkpoints side by side (the per-class IoU)."""
    figure, axes = new_figure(bars_width(classes, labels), 4.0)
    draw_grouped_bars(axes[0, 0], classes, labels, columns, ylabel, title)
    return save(figure, path)


def ccd_bars(path, classes, labels, rows):
    """Class Center Distance per class and checkpoint; rows: [(domain, columns)], one panel each."""
    figure, axes = new_figure(bars_width(classes, labels), 4.0 * len(rows), rows=len(rows))
    for (domain, columns), ax in zip(rows, axes[:, 0]):
        draw_grouped_bars(ax, classes, labels, columns, "CCD (lower: tighter)", f"Class Center Distance, {domain}")
    return save(figure, path)


def confusion_image(path, classes, confusion, label, columns=None):
    """Row-normalised confusion matrix (rows: ground truth, sums to 1 where the class occurs); columns:
    the predicted classes' names when they are not `classes` (e.g. an extra "other classes" column)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    totals = confusion.sum(1, keepdims=True)
    normalised = np.divide(confusion, totals, out=np.zeros_like(confusion), where=totals > 0)
    figure, axes = new_figure(7.0, 6.0)
    ax = axes[0, 0]
    image = ax.imshow(normalised, cmap="viridis", vmin=0.0, vmax=1.0)
    columns = classes if columns is None else columns
    ax.set_xticks(np.arange(len(columns)), columns, rotation=90, fontsize="small")
    ax.set_yticks(np.arange(len(classes)), classes, fontsize="small")
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(f"{label}: confusion, row-normalised")
    figure.colorbar(image, ax=ax, shrink=0.8)
    return save(figure, path)


def feature_pca(path, panels, names, palette, note):
    """One panel per checkpoint: its own 2-D PCA of source (o) and target (x) pixels, coloured by class.

    panels: [(label, {"source"/"target": (points (N, 2), classes (N,))}, explained variance [2])];
    names / palette: class name and (r, g, b) 0-255 by class index.
    """
    cols = len(panels) if len(panels) <= 3 else math.ceil(math.sqrt(len(panels)))  # 4 panels: 2 x 2
    rows = math.ceil(len(panels) / cols)
    figure, axes = new_figure(4.5 * cols + 1.5, 4.2 * rows, rows=rows, cols=cols)
    seen = set()
    for (label, domains, explained), ax in zip(panels, axes.flat):
        for domain, marker in (("source", SOURCE_MARKER), ("target", TARGET_MARKER)):
            if domain not in domains:
                continue
            points, classes = domains[domain]
            for c in np.unique(classes):
                mine = classes == c
                colour = np.asarray(palette[c]) / 255.0
                ax.scatter(points[mine, 0], points[mine, 1], s=8, marker=marker, color=colour, alpha=0.6,
                           linewidths=0.8 if marker == TARGET_MARKER else 0.0)
                seen.add(int(c))
        ax.set_title(f"{label}", fontsize="medium")
        ax.set_xlabel(f"PC1 ({100 * explained[0]:.0f}% var.)")
        ax.set_ylabel(f"PC2 ({100 * explained[1]:.0f}% var.)")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker="s", linestyle="", color=np.asarray(palette[c]) / 255.0, label=names[c])
               for c in sorted(seen)]
    handles += [Line2D([], [], marker=SOURCE_MARKER, linestyle="", color="grey", label="source"),
                Line2D([], [], marker=TARGET_MARKER, linestyle="", color="grey", label="target")]
    figure.legend(handles=handles, loc="outside right center", fontsize="small")
    figure.suptitle(f"features the classifier reads, PCA per checkpoint ({note})", fontsize="medium")
    return save(figure, path)


def learning_curves(path, runs):
    """One panel per logged key (loss terms, lr, evaluation scores) against the iteration, runs overlaid.

    runs: [(label, {key: ([iter], [value])})].
    """
    keys = sorted({k for _, series in runs for k in series},
                  key=lambda k: (0 if k.startswith("loss/") else 1 if k == "lr" else 2, k)) or ["nothing logged"]
    cols = min(len(keys), 3)
    rows = math.ceil(len(keys) / cols)
    figure, axes = new_figure(4.0 * cols, 3.0 * rows, rows=rows, cols=cols)
    colours = series_colours(len(runs))
    for key, ax in zip(keys, axes.flat):
        for (label, series), colour in zip(runs, colours):
            if key in series:
                xs, ys = series[key]
                ax.plot(xs, ys, marker="o" if key.startswith("eval/") else None, markersize=3, label=label,
                        color=colour)
        ax.set_title(key, fontsize="medium")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in list(axes.flat)[len(keys):]:
        ax.set_axis_off()
    from matplotlib.lines import Line2D  # one legend for the figure: a run may miss a panel's key
    figure.legend(handles=[Line2D([], [], color=c, label=label) for (label, _), c in zip(runs, colours)],
                  loc="outside upper center", ncols=min(len(runs), 6), fontsize="small")
    return save(figure, path)


# --------------------------------------------------------------------------------------------------
# uda/bench/toy.py
# --------------------------------------------------------------------------------------------------
def benchmark_bars(path, methods):
    """The toy benchmark's table as a figure: per method, the recipe (control - source_only) and idea
    (method - control) gains, mean ± sample std over seeds with each seed as a dot; without controls
    (--controls off) the gain over source_only of every row, per seed the same way.

    methods: results.json's "methods" (uda/bench/toy.py summarize).
    """
    split = {name: e for name, e in methods.items() if e.get("idea_gain")}
    if split:
        names = list(split)
        groups = [("recipe: control − source_only", "recipe_gain"), ("idea: method − control", "idea_gain")]
        values = {key: [split[n][key] for n in names] for _, key in groups}
        title = "toy benchmark: recipe and idea (bars: mean ± std over seeds; dots: seeds)"
    else:
        baseline = methods.get("source_only", {})
        base = dict(zip(baseline.get("seeds", []), baseline.get("miou", [])))
        names = [n for n, e in methods.items() if n != "source_only" and e.get("miou")]
        groups = [("gain over source_only", "gain")]
        values = {"gain": [[m - base[s] for s, m in zip(methods[n]["seeds"], methods[n]["miou"]) if s in base]
                           for n in names]}
        title = "toy benchmark: gain over source_only (bars: mean ± std; dots: seeds)"
    figure, axes = new_figure(max(7.0, 1.1 * len(names) + 2.0), 4.5)
    ax = axes[0, 0]
    width = 0.8 / len(groups)
    x = np.arange(len(names))
    for k, ((label, key), colour) in enumerate(zip(groups, series_colours(len(groups)))):
        offset = x + (k - (len(groups) - 1) / 2) * width
        means = [float(np.mean(v)) if v else math.nan for v in values[key]]
        stds = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in values[key]]
        ax.bar(offset, means, width, yerr=stds, capsize=3, label=label, color=colour, alpha=0.8)
        for xo, seeds in zip(offset, values[key]):
            ax.scatter([xo] * len(seeds), seeds, s=10, color="black", zorder=3)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("mIoU points")
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return save(figure, path)


def benchmark_figure(methods, path):
    """benchmark_bars beside results.md, or one line saying why not; returns the path or None."""
    if not available():
        print(MISSING, flush=True)
        return None
    benchmark_bars(path, methods)
    print(f"wrote {path}", flush=True)
    return path
