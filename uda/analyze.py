"""See what adaptation did: per-class IoU side by side, FADA's Class Center Distance, confusion matrices,
learning curves and a 2-D picture of the features, for one or more checkpoints.

    python -m uda.analyze --ckpt runs/src/last.pt runs/fada/last.pt runs/fada-ctrl/last.pt --out runs/analysis
    python -m uda.analyze --ckpt runs/src/last.pt runs/fada/last.pt --source toy-synth \
        --runs runs/fada runs/fada-ctrl --out runs/analysis
    torchrun --nproc_per_node=4 -m uda.analyze --ckpt A.pt B.pt --data-root /data --source gta5 --out DIR

Every checkpoint is run once over the target split (--target, --split, --data-root / --target-root,
--input-size: evaluate.py's flags and defaults, taken from the first checkpoint). That one forward pass per
image gives, with evaluate.py's single-scale protocol (uda/evaluation.predict_probs, the checkpoint's
align_corners; PLCA checkpoints with their test-time aggregation unless --tta-aggregate off):
- the confusion matrix, hence the per-class IoU and mIoU evaluate.py reports;
- the per-class sums of the features the classifier reads (the model's `features` output: DeepLab's
  layer4 / fc7, the tiny network's last block, DAFormer's fused decoder features; for PLCA the features
  before its test-time aggregation), which give FADA's Class Center Distance;
- a fixed-size seeded sample of those features per class, for the 2-D picture.
With --source NAME (off by default: the source split costs a second pass per checkpoint), the first
--source-images images of the source's --source-split are run the same way (no IoU: CCD and the picture),
at that dataset's own evaluation size (evaluate.py's convention; --input-size is the target's).

Class Center Distance (Wang et al., "Classes Matter: A Fine-grained Adversarial Approach to Cross-domain
Semantic Segmentation", ECCV 2020, arXiv 2007.09222, the CCD analysis of its experiments; no official
code computes it). With S_i the features of class i, mu_i their mean (the class centre) and K classes,

    CCD(i) = 1 / (K - 1) * sum_{j != i} [ (1 / |S_i|) sum_{x in S_i} ||x - mu_i||^2 ] / ||mu_i - mu_j||^2

the spread of class i around its own centre relative to its distance to every other centre: smaller is a
tighter, better separated class. Here:
- features: the model's classifier input at its output stride; ground-truth labels are brought to that
  grid by nearest-neighbour resizing (common.downsample_labels, as the official codes resize labels);
  255 pixels are left out;
- the sums over a split are accumulated in float64 (per class: sum of features (C, D), sum of squared
  norms (C,), count (C,)), never the features themselves, and summed over ranks under torchrun; then
  (1 / |S_i|) sum ||x - mu_i||^2 = E||x||^2 - ||mu_i||^2;
- K - 1 counts the other classes present in the split (a class absent from the labels has no centre);
  a class absent itself, or alone, has no CCD: null in the JSON, "–" in the tables; the mean is over
  the classes with a CCD. Two classes with the same centre would make it infinite: null as well.

The picture of the features: per checkpoint and domain, --pca-pixels pixels of each class are drawn
uniformly without replacement (each pixel gets a random key from (--seed, domain, image index), the
smallest keys are kept: the same pixels whatever the sharding or batch size); source pixels are classed
by their labels, target pixels by their labels, or by the model's prediction on a split without labels.
One panel per checkpoint, each with its own PCA (SVD of the centred sample of both domains): the
features of two networks are different spaces, so one projection for all panels would mean nothing;
within a panel, source and target share the axes, which is what shows whether they overlap. Each class
counts the same number of pixels (up to --pca-pixels), so frequent classes do not decide the axes alone.

Memory: beyond evaluation's own (the image, its probabilities at the label size), one image's features
in float32 and float64 at a time, the (C, D) sums and the sample (C x --pca-pixels x D per domain): all
500 Cityscapes val images stream through; nothing grows with the number of images.

Learning curves (--runs RUN ...): every loss term (`loss/...`), the learning rate and every evaluation
score (`eval/...`) of RUN/metrics.jsonl against the iteration, the runs overlaid in one figure; a torn or
foreign line is skipped and counted.

Outputs (DIR is refused when it is not empty, unless --overwrite, and always when it lies inside a
dataset folder being read; evaluate.check_output):
- DIR/analysis.json: "classes", and per checkpoint its path, label, mIoU, per-class IoU, confusion matrix,
  "ccd": {"target": {"per_class": [...], "mean": x}, "source": {...} or null} (lists in the order of
  "classes"), PCA's explained variance; per run its records and torn lines;
- DIR/analysis.md: the same as tables (IoU and CCD side by side, differences against the first checkpoint);
- figures, with matplotlib (uda/plots.py; without it one line says how to get them): iou_per_class.png,
  ccd_per_class.png, confusion_<k>.png (row-normalised, k = the checkpoint's position), features_pca.png,
  learning_curves.png.
A split without labels gets no IoU and no CCD (said in one line); the picture and the curves still come.
"""
import argparse
import json
import os

import numpy as np
import torch

import evaluate
from uda import common, datasets, plots
from uda.common import IGNORE_INDEX, UserError
from uda.evaluation import model_from_checkpoint, predict_probs, progress, summarize

DOMAIN_CODE = {"source": 1, "target": 2}  # one random stream of pixel keys per domain


# --------------------------------------------------------------------------------------------------
# Class Center Distance: streaming float64 sums, then the ratio
# --------------------------------------------------------------------------------------------------
class ClassFeatureSums:
    """Per-class sum of features (C, D), sum of squared norms (C,) and pixel count (C,), float64.

    Enough for every class centre and spread of a whole split without holding any feature: `add` one
    batch at a time, `all_reduce` once at the end (sums over ranks), then `class_center_distance`.
    """

    def __init__(self, num_classes, dim, device):
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        self.sq_norms = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.float64, device=device)

    def add(self, features, labels):
        """features (B, D, h, w) any float dtype; labels (B, h, w) int64 on the same grid, 255 ignored."""
        num_classes, dim = self.sums.shape
        assert features.shape[1] == dim and features.shape[-2:] == labels.shape[-2:]
        flat = features.permute(0, 2, 3, 1).reshape(-1, dim)          # (N, D)
        labels = labels.reshape(-1)                                    # (N,)
        keep = (labels != IGNORE_INDEX) & (labels < num_classes)
        chosen, classes = flat[keep].double(), labels[keep]            # (n, D) float64, (n,)
        self.sums.index_add_(0, classes, chosen)
        self.sq_norms.index_add_(0, classes, (chosen * chosen).sum(1))
        self.counts.index_add_(0, classes, torch.ones_like(classes, dtype=torch.float64))

    def all_reduce(self):
        for name in ("sums", "sq_norms", "counts"):
            total = common.all_reduce_sum(getattr(self, name).to(common.comm_device()))
            setattr(self, name, total.to(self.sums.device))
        return self


def class_center_distance(sums, sq_norms, counts):
    """FADA's CCD per class (C,) float64 from ClassFeatureSums' totals; NaN where it is undefined.

    sums (C, D), sq_norms (C,), counts (C,) float64. CCD(i) = mean over the other present classes j of
    spread_i / ||mu_i - mu_j||^2, spread_i = E||x||^2 - ||mu_i||^2 over class i (module docstring).
    NaN: class i absent, or no other class present; inf (two equal centres) is turned into NaN too.
    """
    present = counts > 0                                                   # (C,)
    safe = counts.clamp(min=1)
    centres = sums / safe[:, None]                                         # (C, D)
    # mean squared distance to the centre; the clamp removes float64 rounding below zero
    spread = (sq_norms / safe - (centres * centres).sum(1)).clamp(min=0)  # (C,)
    gaps = ((centres[:, None, :] - centres[None, :, :]) ** 2).sum(-1)     # (C, C) ||mu_i - mu_j||^2
    pairs = present[:, None] & present[None, :] & ~torch.eye(len(counts), dtype=torch.bool, device=counts.device)
    ratios = torch.where(pairs, spread[:, None] / torch.where(pairs, gaps, torch.ones_like(gaps)),
                         torch.zeros_like(gaps))                          # (C, C), 0 off the pairs
    others = pairs.sum(1)                                                  # (C,) K - 1
    ccd = ratios.sum(1) / others.clamp(min=1)
    ccd[~present | (others == 0) | ~torch.isfinite(ccd)] = float("nan")
    return ccd


def ccd_record(ccd, class_indices):
    """{"per_class": [value or None, ...] in the order of class_indices, "mean": over the defined ones}."""
    values = [finite_or_none(ccd[c].item()) for c in class_indices]
    defined = [v for v in values if v is not None]
    return {"per_class": values, "mean": sum(defined) / len(defined) if defined else None}


def finite_or_none(value):
    """JSON has no NaN: an undefined number is null."""
    return value if value is not None and np.isfinite(value) else None


# --------------------------------------------------------------------------------------------------
# A fixed-size seeded sample of pixels per class, streamed
# --------------------------------------------------------------------------------------------------
def pixel_keys(seed, domain, index, count):
    """(count,) float64 uniform keys of image `index`'s pixels: fixed by (seed, domain, image), so the
    sample does not depend on the sharding, the batch size or the order the images come in."""
    rng = np.random.default_rng([seed, DOMAIN_CODE[domain], index])
    return torch.from_numpy(rng.random(count))


class PixelSample:
    """Up to `size` pixels per class: those with the smallest keys seen so far (a uniform sample without
    replacement of every pixel of the class in the split, whatever order they stream in)."""

    def __init__(self, size):
        self.size = size
        self.kept = {}  # class -> (keys (n,) float64, features (n, D) float32), on the CPU

    def add(self, features, classes, keys):
        """features (N, D); classes (N,) int64 (255 skipped); keys (N,) float64."""
        features, classes, keys = features.float().cpu(), classes.cpu(), keys.cpu()
        for c in classes.unique().tolist():  # a loop over classes, not pixels
            if c == IGNORE_INDEX:
                continue
            mine = classes == c
            self.merge(c, keys[mine], features[mine])

    def merge(self, c, keys, features):
        if c in self.kept:
            keys, features = torch.cat([self.kept[c][0], keys]), torch.cat([self.kept[c][1], features])
        order = torch.argsort(keys)[:self.size]
        self.kept[c] = (keys[order], features[order])

    def gather(self):
        """Merge the samples of every rank (each rank keeps its own smallest keys: the union's smallest
        are among them), so every rank ends with the single-process sample."""
        if not common.is_distributed():
            return self
        parts = [None] * common.world_size()
        torch.distributed.all_gather_object(parts, self.kept)
        self.kept = {}
        for part in parts:
            for c, (keys, features) in part.items():
                self.merge(c, keys, features)
        return self

    def arrays(self):
        """(features (N, D) float32, classes (N,) int64) of the whole sample, classes in order."""
        if not self.kept:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
        classes = sorted(self.kept)
        features = torch.cat([self.kept[c][1] for c in classes])
        labels = torch.cat([torch.full((len(self.kept[c][0]),), c, dtype=torch.int64) for c in classes])
        return features, labels


def pca_2d(features):
    """(N, 2) projection of features (N, D) onto their first two principal axes, and the share of the
    variance each axis explains. SVD of the centred sample (exact; N is a few thousand); each axis's sign
    is fixed (largest loading positive) so the same data always gives the same picture."""
    centred = features.double() - features.double().mean(0, keepdim=True)   # (N, D)
    _, singular, axes = torch.linalg.svd(centred, full_matrices=False)     # axes: (min(N, D), D)
    axes = axes[:2]                                                           # (2, D)
    signs = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))  # (2, 1)
    axes = axes * torch.where(signs == 0, torch.ones_like(signs), signs)
    variance = singular ** 2
    explained = (variance[:2] / variance.sum().clamp(min=1e-300)).tolist()
    return (centred @ axes.t()).float(), explained


# --------------------------------------------------------------------------------------------------
# One pass of one checkpoint over one split
# --------------------------------------------------------------------------------------------------
class FeatureTap(torch.nn.Module):
    """The model, remembering the (features, logits) of its last forward: predict_probs runs the
    protocol and the analysis reads the features of that very forward (no second pass)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.last = model, None

    def forward(self, images):
        self.last = self.model(images)
        return self.last

    def __getattr__(self, name):  # .classifier for PLCA's aggregation, .feature_dim, ...
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


@torch.no_grad()
def analyse_split(model, dataset, space, device, protocol, domain, pixels, seed, labelled, with_iou, log, label):
    """Confusion matrix (C, C) int64 (None unless with_iou), ClassFeatureSums (None unless labelled) and a
    PixelSample of one split, summed / merged over ranks.

    protocol: dict(input_size, autocast, test_time_predict, align_corners, resize_via_input, workers) for
    predict_probs and the loader.
    labelled: the dataset's items carry "label"; otherwise pixels are classed by the model's prediction.
    """
    model.eval()
    tap = FeatureTap(model)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=protocol["workers"])
    num_classes = space.num_classes
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device) if with_iou else None
    sums = ClassFeatureSums(num_classes, model.feature_dim, device)
    sample = PixelSample(pixels)
    meter = progress(label, len(dataset), 0.1, log)
    for batch in loader:
        images = batch["image"].to(device)
        labels = batch["label"].to(device) if labelled else None
        label_size = labels.shape[-2:] if labelled else images.shape[-2:]
        probs = predict_probs(tap, images, label_size, protocol["input_size"], protocol["autocast"],
                              protocol["test_time_predict"], protocol["align_corners"],
                              resize_via_input=protocol["resize_via_input"])      # (1, C, H, W)
        features, logits = tap.last                                              # (1, D, h, w), (1, C, h, w)
        features = features.float()
        if confusion is not None:
            confusion += common.confusion_matrix(probs.argmax(1), labels, num_classes)
        if labelled:
            grid = common.downsample_labels(labels, features.shape[-2:])         # (1, h, w)
            sums.add(features, grid)
        else:
            grid = logits.float().argmax(1)                                      # (1, h, w) predicted class
        flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])       # (h w, D)
        keys = pixel_keys(seed, domain, int(batch["index"][0]), flat.shape[0])
        sample.add(flat, grid.reshape(-1), keys)
        meter.update(len(images))
    if confusion is not None:
        confusion = common.all_reduce_sum(confusion.to(common.comm_device())).cpu()
    return confusion, sums.all_reduce() if labelled else None, sample.gather()


# --------------------------------------------------------------------------------------------------
# Learning curves: metrics.jsonl of train.py runs
# --------------------------------------------------------------------------------------------------
def read_metrics(path):
    """(records [dict], torn lines skipped) of a metrics.jsonl: a line that is not one JSON object with an
    "iter" (torn by a kill mid-write, or foreign) is skipped and counted."""
    records, torn = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                torn += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("iter"), (int, float)):
                records.append(record)
            else:
                torn += 1
    return records, torn


def curve_series(records):
    """{key: ([iter], [value])} of every loss term, the learning rate and every evaluation score."""
    series = {}
    for record in records:
        for key, value in record.items():
            if (key == "lr" or key.startswith(("loss/", "eval/"))) and isinstance(value, (int, float)):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(record["iter"])
                ys.append(value)
    return series


def run_metrics_path(run):
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise UserError(f"--runs {run}: no metrics.jsonl there (expected a train.py --out folder, or the file)")
    return path


def read_runs(runs):
    """[{"path", "label", "records", "torn_lines", "series"}] of every --runs entry."""
    out = []
    for run, label in zip(runs, short_labels(runs)):
        path = run_metrics_path(run)
        records, torn = read_metrics(path)
        if not records:
            raise UserError(f"--runs {run}: {path} holds no complete record ({torn} torn or foreign lines)")
        if torn and common.is_main_process():
            print(f"--runs {run}: skipped {torn} torn or foreign line(s) of {path}", flush=True)
        out.append({"path": path, "label": label, "records": len(records), "torn_lines": torn,
                    "series": curve_series(records)})
    return out


# --------------------------------------------------------------------------------------------------
# Checkpoints, datasets, outputs
# --------------------------------------------------------------------------------------------------
def short_labels(paths):
    """A short name per checkpoint or run: its folder's name (runs/fada/last.pt -> fada), made unique."""
    names = []
    for path in paths:
        path = os.path.normpath(path)
        name = os.path.basename(os.path.dirname(path)) if os.path.isfile(path) else os.path.basename(path)
        names.append(name or path)
    return [f"{i + 1}:{n}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def read_headers(paths):
    """[(saved args, label space)] of every checkpoint, checked to share one label space, before any
    model is built."""
    headers = []
    for path in paths:
        ckpt = common.load_checkpoint(path)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
            raise UserError(f"--ckpt {path}: not a checkpoint written by train.py (expected keys 'model' and 'args')")
        saved = argparse.Namespace(**ckpt["args"])
        headers.append((saved, datasets.label_space(saved.source, saved)))
        del ckpt
    first_saved, first = headers[0]
    for path, (saved, space) in zip(paths[1:], headers[1:]):
        if (space.names, dict(space.eval_sets)) != (first.names, dict(first.eval_sets)) or \
                evaluate.label_kind(saved.source) != evaluate.label_kind(first_saved.source):
            raise UserError(f"--ckpt {path}: predicts another label space ({space.num_classes} classes, "
                            f"{', '.join(space.eval_sets)}, trained on {saved.source}) than --ckpt {paths[0]} "
                            f"({first.num_classes} classes, {', '.join(first.eval_sets)}, trained on "
                            f"{first_saved.source}); compare checkpoints of one label space")
    return headers


def split_dataset(name, split, root, space, limit, flag):
    """This rank's shard of the first `limit` images of one split (labelled when it has labels; .total:
    the images of all ranks), and whether it has labels."""
    labelled = datasets.has_labels(name, split, root)
    if name in datasets.toy.DOMAINS and split not in datasets.toy.SPLIT_LENGTHS:
        raise UserError(f"{flag} {split!r}: the toy datasets have splits {', '.join(datasets.toy.SPLIT_LENGTHS)}")
    dataset = datasets.build_dataset(name, split, space, root=root, labeled=labelled)
    shard = common.shard(dataset, limit)
    shard.total = min(len(dataset), limit or len(dataset))  # over all ranks, for the progress lines
    return shard, labelled


def check_out(args, reading):
    evaluate.check_output("--out", args.out, False, args.overwrite, reading)


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------
def build_parser():
    p = common.ArgumentParser(prog="python -m uda.analyze", description=__doc__,
                              formatter_class=evaluate.HelpFormatter)
    p.add_argument("--ckpt", nargs="+", required=True, metavar="CKPT",
                   help="checkpoints written by train.py, compared in this order (differences: against the first)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for analysis.json, analysis.md and the figures")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (same names replaced)")
    p.add_argument("--target", default=None, choices=datasets.DATASET_NAMES, metavar="NAME",
                   help="dataset analysed, one of: %(choices)s (default: the first checkpoint's target)")
    p.add_argument("--split", default="val", help="split of --target (IoU and CCD need its labels)")
    p.add_argument("--data-root", default=None, help="folder holding one sub-folder per dataset")
    p.add_argument("--target-root", default=None, metavar="DIR",
                   help="the analysed dataset's own folder (e.g. a folder dataset); wins over --data-root")
    p.add_argument("--input-size", type=evaluate.input_size_arg, default=None, metavar="WxH|native",
                   help="size the target images are resized to (default: the dataset's convention, as evaluate.py)")
    p.add_argument("--max-images", type=common.positive_int, default=None, metavar="N",
                   help="analyse only the first N images of the target split (default: all)")
    p.add_argument("--source", default=None, choices=datasets.DATASET_NAMES, metavar="NAME",
                   help="also run the source dataset NAME (CCD of the source split, source pixels in the picture); "
                        "off by default")
    p.add_argument("--source-root", default=None, metavar="DIR",
                   help="the source dataset's own folder; wins over --data-root")
    p.add_argument("--source-split", default="train", help="split of --source (needs labels)")
    p.add_argument("--source-images", type=common.positive_int, default=500, metavar="N",
                   help="the first N images of the source split (Cityscapes val's size)")
    p.add_argument("--runs", nargs="+", default=None, metavar="RUN",
                   help="train.py --out folders (or metrics.jsonl files) whose learning curves are drawn, overlaid")
    p.add_argument("--pca-pixels", type=common.positive_int, default=100, metavar="N",
                   help="pixels per class and domain in the feature picture")
    p.add_argument("--seed", type=int, default=0, help="seed of the pixel sample")
    p.add_argument("--tta-aggregate", choices=["auto", "on", "off"], default="auto",
                   help="PLCA's test-time aggregation for the IoU, as evaluate.py (auto: on for PLCA checkpoints)")
    p.add_argument("--workers", type=common.nonnegative_int, default=2, help="data loader worker processes")
    p.add_argument("--amp", choices=list(common.AMP_DTYPES), default="off", help="autocast dtype for the forward")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return p


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------
def main(argv=None):
    args = build_parser().parse_args(argv)
    device = common.setup_distributed(args.device)
    main_rank = common.is_main_process()
    headers = read_headers(args.ckpt)
    space = headers[0][1]
    runs = read_runs(args.runs or [])
    target, target_set, labelled, source_set = prepare_data(args, headers[0][0], space, runs)
    evaluated = sorted({c for classes in space.eval_sets.values() for c in classes})
    results = []
    for path, label in zip(args.ckpt, short_labels(args.ckpt)):
        model, saved, _ = model_from_checkpoint(path, device)
        protocol = {"input_size": evaluate.resolve_input_size(args, target), "workers": args.workers,
                    "autocast": lambda: common.autocast(device, args.amp),
                    "test_time_predict": evaluate.test_time_predict_of(
                        argparse.Namespace(tta_aggregate=args.tta_aggregate, slide=None), saved),
                    "resize_via_input": evaluate.resize_via_input_of(saved),
                    "align_corners": bool(getattr(saved, "align_corners", False))}
        say(f"{label}: {path} on {target} {args.split} ({target_set.total} images)")
        confusion, target_sums, target_sample = analyse_split(
            model, target_set, space, device, protocol, "target", args.pca_pixels, args.seed, labelled, labelled,
            print, f"{label} {target} {args.split}")
        source_sums = source_sample = None
        if source_set is not None:
            # the source at its own dataset's evaluation size (--input-size is the target's)
            source_protocol = dict(protocol, input_size=datasets.default_eval_size(args.source))
            say(f"{label}: {path} on {args.source} {args.source_split} ({source_set.total} images)")
            _, source_sums, source_sample = analyse_split(
                model, source_set, space, device, source_protocol, "source", args.pca_pixels, args.seed, True,
                False, print, f"{label} {args.source} {args.source_split}")
        if main_rank:  # every rank took part in the sums above; one writes
            results.append(checkpoint_record(path, label, saved, space, evaluated, confusion, target_sums,
                                             source_sums, target_sample, source_sample))
        del model
    if main_rank:
        write_outputs(args, space, evaluated, target, results, runs, labelled)
    common.cleanup_distributed()


def say(text):
    if common.is_main_process():
        print(text, flush=True)


def prepare_data(args, saved, space, runs):
    """evaluate.py's checks of the target (label space, folder) and the same for --source; the output
    folder's; then (target name, target shard, whether it is labelled, source shard or None). A target
    split without labels is analysed anyway (said in one line); the source's must have them."""
    target = args.target or saved.target
    root = evaluate.target_root(args, saved, space, target, None)
    source_root = None
    if args.source:
        source_args = argparse.Namespace(target_root=args.source_root, data_root=args.data_root)
        try:  # evaluate.py's checks name its own flag: here the dataset is --source's
            source_root = evaluate.target_root(source_args, saved, space, args.source, None)
        except UserError as err:
            raise UserError(str(err).replace(f"--target {args.source}", f"--source {args.source}", 1)) from None
        if not datasets.has_labels(args.source, args.source_split, source_root):
            raise UserError(f"--source-split {args.source_split}: {args.source} has no labels for it (the source's "
                            f"CCD needs them)")
    check_out(args, [("the target dataset folder", root), ("the source dataset folder", source_root),
                     *[("--ckpt", c) for c in args.ckpt], *[("--runs", r["path"]) for r in runs]])
    target_set, labelled = split_dataset(target, args.split, root, space, args.max_images, "--split")
    source_set = None
    if args.source:
        source_set, _ = split_dataset(args.source, args.source_split, source_root, space, args.source_images,
                                      "--source-split")
    evaluate.barrier()
    if not labelled:
        say(f"note: {target} {args.split} has no labels: per-class IoU and CCD need them and are left out; the "
            f"feature picture classes its pixels by the model's prediction")
    return target, target_set, labelled, source_set


def checkpoint_record(path, label, saved, space, evaluated, confusion, target_sums, source_sums, target_sample,
                      source_sample):
    """Everything about one checkpoint; "_pca" (the projected sample) is for the figure, not the JSON."""
    record = {"path": path, "label": label, "method": getattr(saved, "method", None), "miou": None, "scores": None,
              "per_class_iou": None, "confusion": None}
    if confusion is not None:
        scores, per_class = summarize(confusion, space)
        record.update(miou=finite_or_none(scores[next(iter(space.eval_sets))]),
                      scores={k: finite_or_none(v) for k, v in scores.items()},
                      per_class_iou=[finite_or_none(per_class[space.names[c]]) for c in evaluated],
                      confusion=confusion.tolist())
    record["ccd"] = {domain: ccd_record(class_center_distance(s.sums, s.sq_norms, s.counts).cpu(), evaluated)
                     if s is not None else None for domain, s in (("target", target_sums), ("source", source_sums))}
    parts = [(d, s.arrays()) for d, s in (("source", source_sample), ("target", target_sample)) if s is not None]
    parts = [(d, f, c) for d, (f, c) in parts if len(c)]
    if sum(len(c) for _, _, c in parts) < 3:  # two axes need at least three pixels
        parts = []
    record["pca"], record["_pca"] = None, None
    if parts:
        points, explained = pca_2d(torch.cat([f for _, f, _ in parts]))
        record["pca"] = {"explained_variance": explained,
                         "pixels": {d: {space.names[k]: int((c == k).sum()) for k in c.unique().tolist()}
                                    for d, _, c in parts}}
        offsets = np.cumsum([0] + [len(c) for _, _, c in parts])
        record["_pca"] = {d: (points[a:b].numpy(), c.numpy()) for (d, _, c), a, b in zip(parts, offsets, offsets[1:])}
    return record


# --------------------------------------------------------------------------------------------------
# Writing: JSON, markdown, figures (rank 0)
# --------------------------------------------------------------------------------------------------
def write_outputs(args, space, evaluated, target, results, runs, labelled):
    os.makedirs(args.out, exist_ok=True)
    classes = [space.names[c] for c in evaluated]
    figures = draw_figures(args.out, space, evaluated, results, runs, labelled)
    record = {"classes": classes, "target": target, "split": args.split, "source": args.source,
              "source_split": args.source_split if args.source else None, "labelled": labelled,
              "checkpoints": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
              "runs": [{k: v for k, v in r.items() if k != "series"} for r in runs],
              "figures": figures}
    evaluate.write_json(os.path.join(args.out, "analysis.json"), record)
    with open(os.path.join(args.out, "analysis.md"), "w") as f:
        f.write(markdown(record))
    print(f"wrote {os.path.join(args.out, 'analysis.json')}, analysis.md"
          + (f" and {len(figures)} figure(s)" if figures else ""), flush=True)


def draw_figures(out, space, evaluated, results, runs, labelled):
    """The PNG files written (names), or [] with one line saying how to get them."""
    if not plots.available():
        print(plots.MISSING, flush=True)
        return []
    names, classes, labels = [], [space.names[c] for c in evaluated], [r["label"] for r in results]
    palette = space.palette
    if labelled:
        plots.grouped_bars(os.path.join(out, "iou_per_class.png"), classes, labels,
                           [r["per_class_iou"] for r in results], "IoU (%)", "per-class IoU")
        names.append("iou_per_class.png")
        ccd_rows = [("target", [r["ccd"]["target"]["per_class"] for r in results])]
        if results[0]["ccd"]["source"] is not None:
            ccd_rows.append(("source", [r["ccd"]["source"]["per_class"] for r in results]))
        plots.ccd_bars(os.path.join(out, "ccd_per_class.png"), classes, labels, ccd_rows)
        names.append("ccd_per_class.png")
        for k, r in enumerate(results, 1):
            matrix, columns = evaluated_confusion(np.asarray(r["confusion"], dtype=np.float64), evaluated, classes)
            plots.confusion_image(os.path.join(out, f"confusion_{k}.png"), classes, matrix, r["label"], columns)
            names.append(f"confusion_{k}.png")
    panels = [(r["label"], r["_pca"], r["pca"]["explained_variance"]) for r in results if r["_pca"]]
    if panels:
        plots.feature_pca(os.path.join(out, "features_pca.png"), panels, space.names, palette,
                          "target classes: labels" if labelled else "target classes: predicted")
        names.append("features_pca.png")
    if runs:
        plots.learning_curves(os.path.join(out, "learning_curves.png"), [(r["label"], r["series"]) for r in runs])
        names.append("learning_curves.png")
    return names


def evaluated_confusion(confusion, evaluated, classes):
    """The rows and columns of the evaluated classes, plus a column "other classes" for the pixels
    predicted as a class outside them (the toy's 19-way model can predict a class the toy never draws):
    dropping them would hide those errors from the row-normalised picture."""
    rows = confusion[evaluated]                                        # (E, C)
    matrix = rows[:, evaluated]                                        # (E, E)
    other = rows.sum(1) - matrix.sum(1)                                # (E,)
    if other.any():
        return np.concatenate([matrix, other[:, None]], 1), [*classes, "other classes"]
    return matrix, classes


def cell(value, spec=".2f"):
    return "–" if value is None else format(value, spec)


def side_by_side(classes, labels, columns, spec):
    """A markdown table: one row per class, one column per checkpoint, then its difference to the first."""
    head = ["class", *labels, *[f"{l} − {labels[0]}" for l in labels[1:]]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, name in enumerate(classes):
        values = [col[i] for col in columns]
        diffs = [None if v is None or values[0] is None else v - values[0] for v in values[1:]]
        lines.append("| " + " | ".join([name, *[cell(v, spec) for v in values],
                                         *[cell(d, "+" + spec) for d in diffs]]) + " |")
    return "\n".join(lines)


def markdown(record):
    results, classes = record["checkpoints"], record["classes"]
    labels = [r["label"] for r in results]
    source = f", source {record['source']} {record['source_split']}" if record["source"] else ""
    lines = [f"# Analysis: {record['target']} {record['split']}{source}", "",
             "| checkpoint | path | method | mIoU | CCD target (mean) | CCD source (mean) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        ccd_t, ccd_s = r["ccd"]["target"], r["ccd"]["source"]
        lines.append(f"| {r['label']} | `{r['path']}` | {r['method']} | {cell(r['miou'])} | "
                     f"{cell(ccd_t and ccd_t['mean'], '.3f')} | {cell(ccd_s and ccd_s['mean'], '.3f')} |")
    if not record["labelled"]:
        lines += ["", f"{record['target']} {record['split']} has no labels: no IoU and no CCD."]
    else:
        lines += ["", "## Per-class IoU (%)", "",
                  side_by_side(classes, labels, [r["per_class_iou"] for r in results], ".1f")]
        lines += ["", "## Class Center Distance, target (FADA; smaller: tighter, better separated classes)", "",
                  side_by_side(classes, labels, [r["ccd"]["target"]["per_class"] for r in results], ".3f")]
    if results[0]["ccd"]["source"] is not None:
        lines += ["", "## Class Center Distance, source", "",
                  side_by_side(classes, labels, [r["ccd"]["source"]["per_class"] for r in results], ".3f")]
    if record["runs"]:
        lines += ["", "## Runs (learning curves)", "", "| run | metrics.jsonl | records | torn lines skipped |",
                  "|---|---|---|---|"]
        lines += [f"| {r['label']} | `{r['path']}` | {r['records']} | {r['torn_lines']} |" for r in record["runs"]]
    if record["figures"]:
        lines += ["", "Figures: " + ", ".join(f"`{f}`" for f in record["figures"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    common.run_cli(main)
