"""The toy benchmark: every method against source-only and the oracle, with its cost, in one command.

    OMP_NUM_THREADS=1 python -m uda.bench.toy --out runs/bench                # all methods, 3 seeds
    OMP_NUM_THREADS=1 python -m uda.bench.toy --out runs/bench --controls on  # + recipe-only controls
    python -m uda.bench.toy --out runs/quick --methods fada,cdga --seeds 1 --iters 50 --warmup-iters 100
    python -m uda.bench.toy --out runs/bench-b0 --seeds 1 --backbone mit-b0 --warmup-iters 300 --iters 100 \
        --sdca-init-images 500 --controls on

Protocol (the README's "Toy benchmark" section says why), per seed s:
1. warm-up: `train.py --method source_only --source toy-synth --lr 0.01 --iters W` from random init;
   every row below starts from this one checkpoint (`--pretrained`), as the papers start adaptation
   from a source-only model;
2. rows, each `--iters N` from the warm-up with the same backbone (--backbone, default tiny, also the
   warm-up's), batch, seed and crop:
   - source_only: the warm-up continued on toy-synth for N more iterations (the baseline);
   - oracle: source_only on toy-real's labelled train split for N iterations (`--source toy-real`):
     what the same budget from the same start reaches with target labels (the upper reference);
   - every method of `uda.bench.METHODS` (train.py's) but source_only and those with
     `BENCHMARK_ROW = False` (selftrain), with its own RECIPE and flag defaults except the toy flags below;
   - fada+selftrain: FADA's stage 4: argmax pseudo-labels of the seed's FADA model over toy-real train
     (`evaluate.py --save-pseudo`), then `--method selftrain` on them for N iterations;
   - with --controls on, every adaptation method's recipe-only control (not a row of its
     own): the method's command with its own adaptation terms off (its module's CONTROL_FLAGS; a
     method without them has no control) and everything else
     (augmentation, optimiser, schedule, target batches) kept, from the same warm-up checkpoint.
     Per seed s: recipe = control - source_only, idea = method - control (so recipe + idea = the
     method's gain in that seed); the table gives mean ± sample std over seeds of both;
3. each row is evaluated on toy-real val with `evaluate.py --json` (PLCA with its test-time aggregation,
   as evaluate.py does by default for PLCA checkpoints; EXTRA_EVALS adds a row for the same PLCA
   checkpoint evaluated without it). A backbone without a `.classifier` head (MiT's DAFormer head) cannot
   aggregate at test time: there PLCA is evaluated without it and the extra row is left out.

Toy flags, where a row departs from its method's RECIPE (train.py prints each run's recipe and what
the command line overrode at the top of its train.log):
- every run: --iters N --stop-iter N --batch-size B: the toy's budget and batch, not the papers' (a
  RECIPE's stop_iter, a share of a 40,000-iteration schedule, would exceed N); --no-eval: evaluate.py
  evaluates every row afterwards, so train.py's own end-of-run evaluation would only repeat it;
- a method whose recipe trains at train.py's default LR (2.5e-4, the DeepLab-v2 source-only LR: fada,
  cdga, sdca, plca, a method without a recipe LR; source_only and the oracle too): --lr (default 0.01):
  the papers adapt at the LR of their source-only stage; the tiny backbone's source-only LR is --lr. A
  recipe with an LR of its own (DAFormer's and DIDA's AdamW 6e-5) keeps it;
- a recipe LR warm-up (DAFormer, DIDA: 1500 of 40,000): --warmup-iters = the same share of N (1500
  iterations would never end within N);
- a recipe with RCS (DAFormer, DIDA): --rcs-min-pixels 107 (train.py's default, DAFormer's 3000 pixels at
  1280x720, scaled to the toy's 256x128);
- fada+selftrain: --source toy-real --pseudo-dir, --crop 256x128 (whole toy images in), --selftrain-crop
  128x64 (FADA's half-size crop of 2048x1024) and --lr 2 x --lr (FADA's self-distillation LR over its
  adaptation LR, 5e-4 / 2.5e-4);
- sdca: --sdca-init-stats from `python -m uda.sdca init` on the warm-up checkpoint (its recipe; over
  --sdca-init-images of toy-synth train, default all);
- a method's TOY_FLAGS (fada, sdca: --source-sampler uniform, as in the README's toy table).
Everything else of a RECIPE applies (optimiser, schedule shape, samplers, align_corners, lovasz_weight,
...); its backbone, BN mode, crop and sizes describe real data and do not apply to the toy (uda/flags.py
drops them).
The flags of each row are recorded in results.json (config.flags), those of each control in its
entry and in the table's notes.

Each training is a subprocess of train.py (OMP_NUM_THREADS=1, --workers 0, CPU), --jobs of them at a
time (one per core). sec/iter is the median over the logging windows of metrics.jsonl after the first
(the first holds one-off start-up costs; evaluation is not in any window); peak memory is the peak
resident set size of the training process (os.wait4's ru_maxrss: interpreter, torch, model, data
and the method's extra state). Both are averaged over seeds and reported as ratios to source_only of
the same invocation.

Output: OUT/results.json = {"methods": {name: {"miou": [per seed], "sec_per_iter", "peak_mem_mb",
..., and for an adaptation method with --controls on: "control": {"miou": [per seed], "seeds", "flags",
"evaluate_flags", ...}, "idea_gain", "recipe_gain": [per paired seed], "paired_seeds"}}, "config": {...}},
OUT/results.md (the table and its notes), OUT/results.png (each method's mIoU split into recipe and idea,
with the spread over seeds; uda/plots.py, needs matplotlib), and OUT/runs/s<seed>/<name>/ (train.log, metrics.jsonl,
last.pt, eval.json) for every run, controls under OUT/runs/s<seed>/<method>-control/.
"""
import argparse
import concurrent.futures
import datetime
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

from uda import common, datasets, models
from uda.bench import METHODS
from uda.common import UserError, run_cli
from uda.flags import applicable_recipe, common_defaults

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASELINE, ORACLE, SELFTRAIN_ROW = "source_only", "oracle", "fada+selftrain"
# Extra evaluations of a method's own checkpoint, reported as rows of their own:
# row name -> (method, evaluate.py flags). PLCA's test-time aggregation is part of PLCA as published (the
# official test configs), so the `plca` row uses it; this row shows what the aggregation itself does.
NO_AGGREGATION_ROW, NO_AGGREGATION = "plca, no test-time aggregation", ["--tta-aggregate", "off"]
EXTRA_EVALS = {NO_AGGREGATION_ROW: ("plca", NO_AGGREGATION)}
# RCS: images with more than --rcs-min-pixels of a class (3000: DAFormer's, at GTA5's 1280x720 training
# size); the same share of a 256x128 toy image: 3000 * (256 * 128) / (1280 * 720) = 107 pixels
TOY_RCS_SHARE = (256 * 128) / (1280 * 720)


def method_names():
    """The methods with a row of their own: all but the baseline and those with BENCHMARK_ROW = False."""
    return [name for name, module in METHODS.items()
            if name != BASELINE and getattr(module, "BENCHMARK_ROW", True)]


def control_flags(method):
    """The flags that switch a method's own idea off (its CONTROL_FLAGS), or None: no control."""
    return getattr(METHODS[method], "CONTROL_FLAGS", None)


def controlled(methods):
    """The methods of `methods` that have a recipe-only control."""
    return [m for m in methods if control_flags(m) is not None]


def control_row(method):
    """The name (task key, run folder, row of the summary) of a method's recipe-only control."""
    return f"{method}-control"


def controlled_method(row):
    """The method whose control a row is compared with (an extra evaluation: its method's), or None."""
    if row in METHODS:
        return row
    return EXTRA_EVALS[row][0] if row in EXTRA_EVALS else None


def aggregates_at_test(backbone):
    """Whether PLCA's test-time aggregation can run on `backbone`: it re-applies `model.classifier` to
    aggregated features, and the DAFormer head of MiT has no such separate classifier."""
    return hasattr(models.build_model(backbone, datasets.TOY_SPACE.num_classes), "classifier")


# --------------------------------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------------------------------
def toy_flags(method, args):
    """The flags a method gets beyond the common ones: its recipe's constants that do not transfer to the
    toy, scaled to it (the docstring's list), and its module's TOY_FLAGS."""
    recipe, default = applicable_recipe(method, "toy-synth"), common_defaults()
    flags = []
    if recipe.get("lr", default["lr"]) == default["lr"]:
        # SGD at the DeepLab-v2 source-only LR: the papers adapt at the LR of their source-only stage;
        # the tiny backbone's source-only LR is --lr
        flags += ["--lr", str(args.lr)]
    if recipe.get("warmup_iters"):
        # the warm-up is a fixed share of the schedule; the recipe's length would never end within N
        share = recipe["warmup_iters"] / recipe.get("iters", default["iters"])
        flags += ["--warmup-iters", str(round(share * args.iters))]
    if recipe.get("source_sampler") == "rcs":
        flags += ["--rcs-min-pixels", str(round(default["rcs_min_pixels"] * TOY_RCS_SHARE))]
    return flags + list(getattr(METHODS[method], "TOY_FLAGS", []))


def train_command(method, out, seed, iters, args, pretrained=None, extra=()):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--method", method, "--backbone", args.backbone,
           "--iters", str(iters), "--stop-iter", str(iters), "--batch-size", str(args.batch_size),
           "--seed", str(seed), "--out", out, "--workers", "0", "--device", "cpu", "--eval-every", "0",
           "--no-eval", "--log-every", str(max(1, iters // args.windows))]
    if pretrained:
        cmd += ["--pretrained", pretrained]
    return cmd + list(extra)


# --------------------------------------------------------------------------------------------------
# Running one subprocess, with its peak memory
# --------------------------------------------------------------------------------------------------
def run_logged(cmd, log_path):
    """Run cmd with stdout/stderr to log_path; returns (exit code, wall s, CPU s, peak RSS in MB)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        tic = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        # wait4 (not proc.wait) to get this child's own resource usage; ru_maxrss is in KiB on Linux
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.time() - tic, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def sec_per_iter(metrics_path):
    """Median of the logging windows' sec_per_iter after the first (start-up costs are in the first)."""
    with open(metrics_path) as f:
        values = [r["sec_per_iter"] for r in map(json.loads, f) if "sec_per_iter" in r]
    return statistics.median(values[1:] if len(values) > 1 else values)


class Task:
    """One step of the pipeline: a training (then its evaluation) or a helper command."""

    def __init__(self, key, run_dir, commands, train_index, deps=(), row=None, seed=None, evals=()):
        self.key, self.run_dir, self.commands, self.deps = key, run_dir, commands, list(deps)
        self.train_index, self.row, self.seed = train_index, row, seed  # which command is the training
        self.evals = list(evals) or ([(row, "eval.json")] if row else [])  # (row name, evaluate.py --json file)
        self.result = None

    def execute(self):
        shutil.rmtree(self.run_dir, ignore_errors=True)  # a fresh folder: train.py refuses an occupied one
        os.makedirs(self.run_dir)
        log = os.path.join(self.run_dir, "train.log")
        record = {"wall_s": 0.0, "command_wall_s": [], "command_cpu_s": []}
        for i, cmd in enumerate(self.commands):
            code, wall, cpu, peak = run_logged(cmd, log)
            record["wall_s"] += wall
            record["command_wall_s"].append(wall)
            record["command_cpu_s"].append(cpu)
            if code != 0:
                record["error"] = f"exit {code} of command {i + 1}; see {log}"
                break
            if i == self.train_index:
                record["peak_mem_mb"] = peak
                record["sec_per_iter"] = sec_per_iter(os.path.join(self.run_dir, "metrics.jsonl"))
        if "error" not in record and self.evals:
            record["miou_by_row"] = {}
            for row, name in self.evals:
                with open(os.path.join(self.run_dir, name)) as f:
                    record["miou_by_row"][row] = json.load(f)["miou"]
            record["miou"] = record["miou_by_row"][self.row]
        self.result = record
        with open(os.path.join(self.run_dir, "record.json"), "w") as f:
            json.dump(record, f, indent=2)
        return record


def build_tasks(args, methods):
    """Every step of every seed, with its dependencies; rows listed costliest first (better packing)."""
    tasks = []
    evaluate_py = os.path.join(REPO, "evaluate.py")
    for seed in range(args.seeds):
        root = os.path.join(args.out, "runs", f"s{seed}")
        warm_dir = os.path.join(root, "warmup")
        warm = os.path.join(warm_dir, "last.pt")
        tasks.append(Task(f"s{seed}/warmup", warm_dir,
                          [train_command(BASELINE, warm_dir, seed, args.warmup_iters, args,
                                         extra=["--lr", str(args.lr)])], 0, seed=seed))

        def row(name, method, extra, deps=(f"s{seed}/warmup",), prefix=(), eval_flags=()):
            run_dir = os.path.join(root, name)
            evals = [(name, "eval.json", list(eval_flags))] + [
                (extra_row, f"eval_{i}.json", flags) for i, (extra_row, (m, flags)) in enumerate(EXTRA_EVALS.items())
                if m == name and extra_row in args.rows]
            commands = [*prefix, train_command(method, run_dir, seed, args.iters, args, warm, extra)]
            commands += [[sys.executable, evaluate_py, "--ckpt", os.path.join(run_dir, "last.pt"), "--workers", "0",
                          "--device", "cpu", "--json", os.path.join(run_dir, json_name), *flags]
                         for _, json_name, flags in evals]
            tasks.append(Task(f"s{seed}/{name}", run_dir, commands, len(prefix), deps, row=name, seed=seed,
                              evals=[e[:2] for e in evals]))

        for method in methods:
            extra = toy_flags(method, args)
            if method == "sdca":  # SDCA's recipe: class statistics of the source-only model first
                stats = os.path.join(root, "sdca", "init_stats.pt")
                init = [sys.executable, "-m", "uda.sdca", "init", "--ckpt", warm, "--out", stats,
                        "--workers", "0", "--device", "cpu"]
                if args.sdca_init_images:
                    init += ["--max-images", str(args.sdca_init_images)]
                row(method, method, extra + ["--sdca-init-stats", stats], prefix=[init])
            elif method == "plca" and not args.test_time_aggregation:
                row(method, method, extra, eval_flags=NO_AGGREGATION)
            else:
                row(method, method, extra)
        for method in controlled(methods) if args.controls == "on" else ():  # after the methods: costliest first
            row(control_row(method), method, toy_flags(method, args) + control_flags(method),
                eval_flags=getattr(METHODS[method], "CONTROL_EVALUATE_FLAGS", ()))
        if SELFTRAIN_ROW in args.rows:
            pseudo = os.path.join(root, SELFTRAIN_ROW, "pseudo_labels")
            label = [sys.executable, evaluate_py, "--ckpt", os.path.join(root, "fada", "last.pt"), "--workers", "0",
                     "--device", "cpu", "--save-pseudo", pseudo, "--pseudo-rule", "argmax"]
            # whole toy images in, FADA's half-size crop after random scaling (1024x512 of 2048x1024),
            # the FADA ratio of self-distillation LR to adaptation LR (5e-4 / 2.5e-4)
            row(SELFTRAIN_ROW, "selftrain",
                ["--source", "toy-real", "--pseudo-dir", pseudo, "--crop", "256x128", "--selftrain-crop", "128x64",
                 "--lr", str(2 * args.lr)], deps=(f"s{seed}/fada",), prefix=[label])
        row(ORACLE, BASELINE, ["--source", "toy-real", "--lr", str(args.lr)])
        row(BASELINE, BASELINE, ["--lr", str(args.lr)])
    return tasks


def run_tasks(tasks, jobs, reuse):
    """Run the task graph, at most `jobs` at a time, each as soon as its dependencies are done.

    Ready tasks start in the order of launch_order: every warm-up first (they unlock everything), then
    the costliest rows of all seeds before the cheaper ones, so the last minutes are not one long run
    on one core while the other waits."""
    by_key = {t.key: t for t in tasks}
    pending, running, failed = launch_order(tasks), {}, set()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for task in list(pending):
                if len(running) >= jobs:
                    break
                if any(d in failed for d in task.deps):
                    pending.remove(task)
                    failed.add(task.key)
                    task.result = {"error": "skipped: a step it needs failed"}
                    continue
                if all(by_key[d].result is not None for d in task.deps):
                    pending.remove(task)
                    record_path = os.path.join(task.run_dir, "record.json")
                    if reuse and os.path.isfile(record_path):
                        with open(record_path) as f:
                            task.result = json.load(f)
                        if "error" not in task.result:
                            print(f"reused {task.key}", flush=True)
                            continue
                    running[pool.submit(task.execute)] = task
            if not running:
                continue
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                record = future.result()
                if "error" in record:
                    failed.add(task.key)
                status = record.get("error") or (
                    f"mIoU {record['miou']:.2f}" if "miou" in record else "done")
                print(f"{task.key}: {status} ({record['wall_s']:.0f} s)", flush=True)


def launch_order(tasks):
    """Warm-ups, then by position within their seed (build_tasks lists rows costliest first), then seed."""
    position, place = {}, {}
    for task in tasks:
        place[task.key] = position.get(task.seed, 0)
        position[task.seed] = place[task.key] + 1
    return sorted(tasks, key=lambda t: (place[t.key] > 0, place[t.key], t.seed))


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------
def collect(tasks, name):
    """One row (or control) over seeds: mIoU and seed of every finished run, mean cost, errors."""
    runs = sorted((t for t in tasks if name in dict(t.evals)), key=lambda t: t.seed)
    ok = [t for t in runs if t.result and "error" not in t.result]
    entry = {"miou": [t.result["miou_by_row"][name] for t in ok], "seeds": [t.seed for t in ok]}
    if ok:
        entry["sec_per_iter"] = statistics.mean(t.result["sec_per_iter"] for t in ok)
        entry["peak_mem_mb"] = max(t.result["peak_mem_mb"] for t in ok)
    errors = [t.result["error"] for t in runs if t.result and "error" in t.result]
    if errors:
        entry["errors"] = errors
    return entry


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def add_control(entry, name, tasks, base):
    """The control of the row's method, and the per-seed differences over the seeds where the row, its
    control and source_only all finished: recipe = control - source_only, idea = row - control."""
    method = controlled_method(name)
    if method is None or not any(t.row == control_row(method) for t in tasks):
        return
    control = collect(tasks, control_row(method))
    control.update(flags=control_flags(method),
                   evaluate_flags=list(getattr(METHODS[method], "CONTROL_EVALUATE_FLAGS", [])))
    entry["control"] = control
    own, ctrl = dict(zip(entry["seeds"], entry["miou"])), dict(zip(control["seeds"], control["miou"]))
    source = dict(zip(base.get("seeds", []), base.get("miou", [])))
    paired = [s for s in control["seeds"] if s in own and s in source]
    entry["paired_seeds"] = paired
    entry["idea_gain"] = [own[s] - ctrl[s] for s in paired]
    entry["recipe_gain"] = [ctrl[s] - source[s] for s in paired]
    for key in ("idea_gain", "recipe_gain"):
        if paired:
            entry[key + "_mean"], entry[key + "_std"] = mean_std(entry[key])


def summarize(tasks, rows):
    methods = {name: collect(tasks, name) for name in rows}
    base, oracle = methods.get(BASELINE, {}), methods.get(ORACLE, {})
    for name, entry in methods.items():
        if not entry["miou"]:
            continue
        entry["miou_mean"], entry["miou_std"] = mean_std(entry["miou"])
        if base.get("miou"):
            entry["gain"] = entry["miou_mean"] - statistics.mean(base["miou"])
            entry["sec_per_iter_ratio"] = entry["sec_per_iter"] / base["sec_per_iter"]
            entry["peak_mem_ratio"] = entry["peak_mem_mb"] / base["peak_mem_mb"]
            paired = dict(zip(base["seeds"], base["miou"]))
            entry["seeds_above_source_only"] = sum(m > paired[s] for s, m in zip(entry["seeds"], entry["miou"])
                                                   if s in paired)
            if oracle.get("miou"):
                gap = statistics.mean(oracle["miou"]) - statistics.mean(base["miou"])
                entry["gap_closed"] = entry["gain"] / gap if gap > 0 else float("nan")
    for name, entry in methods.items():
        add_control(entry, name, tasks, base)
    return methods


def paired_cells(e):
    """The recipe and idea cells of a row: mean ± std of the per-seed differences, or why there are none."""
    if "control" not in e:
        return "–", "–"
    if "idea_gain_mean" not in e:
        why = "control failed" if e["control"].get("errors") else "no paired seed"
        return why, why
    return tuple(f"{e[key + '_mean']:+.2f} ± {e[key + '_std']:.2f}" for key in ("recipe_gain", "idea_gain"))


def markdown_table(methods):
    lines = ["| method | toy-real val mIoU9 (mean ± std) | per seed | gain over source_only | seeds above "
             "source_only | share of gap closed | sec/iter | × source_only | peak MB | × source_only | "
             "recipe: control − source_only | idea: method − control |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in methods.items():
        if not e["miou"]:
            lines.append(f"| {name} | failed: {'; '.join(e.get('errors', []))} |" + " |" * 10)
            continue
        seeds = ", ".join(f"{m:.1f}" for m in e["miou"])
        fmt = lambda key, spec: format(e[key], spec) if key in e and not math.isnan(e[key]) else "–"
        above = f"{e['seeds_above_source_only']}/{len(e['miou'])}" if name != BASELINE and "gain" in e else "–"
        lines.append(f"| {name} | {e['miou_mean']:.2f} ± {e['miou_std']:.2f} | {seeds} | {fmt('gain', '+.2f')} | "
                     f"{above} | {fmt('gap_closed', '.0%')} | {e['sec_per_iter']:.4f} | "
                     f"{fmt('sec_per_iter_ratio', '.2f')} | {e['peak_mem_mb']:.0f} | {fmt('peak_mem_ratio', '.2f')} | "
                     + " | ".join(paired_cells(e)) + " |")
    return "\n".join(lines) + "\n"


def markdown_notes(args):
    """The notes under the table: how recipe and idea are computed, each control's flags, backbone caveats."""
    lines = []
    if args.controls == "on" and controlled(args.methods):
        lines += ["recipe = control − source_only, idea = method − control: mean ± sample std over seeds of the "
                  "per-seed differences (the three runs of a seed start from its warm-up checkpoint; recipe + "
                  "idea = the method's gain over source_only in that seed). A control is its method's command with these flags "
                  "(everything else, augmentation, optimiser, schedule and target batches, kept):", ""]
        for method in controlled(args.methods):
            note = getattr(METHODS[method], "CONTROL_NOTE", None)
            lines.append(f"- {method}: `{' '.join(control_flags(method))}`" + (f" ({note})" if note else ""))
    if "plca" in args.methods and not args.test_time_aggregation:
        lines += ["", f"PLCA's test-time aggregation is off in its row: `--backbone {args.backbone}` has no "
                      "`.classifier` head to re-apply to aggregated features (so no no-aggregation row either)."]
    return "\n".join(lines).strip() + "\n" if lines else ""


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = common.ArgumentParser(prog="python -m uda.bench.toy", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, runs/)")
    p.add_argument("--methods", default="all",
                   help=f"comma-separated adaptation methods, or 'all'; source_only and the oracle always run; "
                        f"{SELFTRAIN_ROW} runs with fada unless --no-selftrain")
    p.add_argument("--no-selftrain", action="store_true", help=f"leave out the {SELFTRAIN_ROW} row")
    p.add_argument("--controls", choices=["on", "off"], default="off",
                   help="also run every method's recipe-only control (its CONTROL_FLAGS) for the recipe and idea columns "
                        "(on: about 1.5x the runs; off keeps the default benchmark within 30 minutes on 2 cores)")
    p.add_argument("--backbone", default="tiny", choices=models.BACKBONES,
                   help="network of every run, the warm-up included (from random init: the toy has no "
                        "ImageNet weights)")
    p.add_argument("--sdca-init-images", type=common.positive_int, default=None, metavar="N",
                   help="images of SDCA's initialisation pass (default: all 4000 of toy-synth train, as its "
                        "recipe; a larger backbone may need fewer)")
    p.add_argument("--seeds", type=common.positive_int, default=3, help="seeds 0..N-1 (each: its own warm-up and rows)")
    p.add_argument("--iters", type=common.positive_int, default=400, help="iterations of every row after the warm-up")
    p.add_argument("--warmup-iters", type=common.positive_int, default=1000,
                   help="source-only warm-up iterations per seed")
    p.add_argument("--lr", type=common.positive_float, default=0.01,
                   help="SGD backbone LR (warm-up, source_only, oracle, SGD methods; 0.01: the tiny backbone's "
                        "source-only LR)")
    p.add_argument("--batch-size", type=common.positive_int, default=4,
                   help="images per domain per iteration, every row")
    p.add_argument("--windows", type=common.positive_int, default=10,
                   help="logging windows per run (sec/iter: median after the first)")
    p.add_argument("--jobs", type=common.positive_int, default=2, help="runs at a time (one per idle core)")
    p.add_argument("--reuse", action="store_true",
                   help="keep finished runs found under OUT/runs (their timings come from the earlier invocation)")
    args = p.parse_args(argv)
    available = method_names()
    if args.methods == "all":
        methods = available
    else:
        methods = [m for m in args.methods.split(",") if m]
        unknown = [m for m in methods if m not in available]
        if unknown:
            raise UserError(f"--methods: unknown {', '.join(unknown)} (expected 'all' or a comma-separated subset "
                            f"of {', '.join(available)})")
    args.methods = methods
    args.test_time_aggregation = aggregates_at_test(args.backbone)
    args.rows = [BASELINE, ORACLE, *methods]
    if args.test_time_aggregation:  # else PLCA's own row is already without it
        args.rows += [row for row, (method, _) in EXTRA_EVALS.items() if method in methods]
    if "fada" in methods and not args.no_selftrain:
        args.rows.append(SELFTRAIN_ROW)
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    tasks = build_tasks(args, args.methods)
    tic = time.time()
    controls = f" + {len(controlled(args.methods))} controls" if args.controls == "on" else ""
    print(f"benchmark: {len(args.rows)} rows{controls} x {args.seeds} seeds, --backbone {args.backbone}, warm-up "
          f"{args.warmup_iters} + {args.iters} iterations, {args.jobs} job(s) at a time -> {args.out}", flush=True)
    run_tasks(tasks, args.jobs, args.reuse)
    methods = summarize(tasks, args.rows)
    config = {"command": " ".join(shlex.quote(a) for a in ["python", "-m", "uda.bench.toy", *(argv or sys.argv[1:])]),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "wall_s": time.time() - tic, "seeds": args.seeds, "iters": args.iters,
              "warmup_iters": args.warmup_iters, "lr": args.lr, "batch_size": args.batch_size, "jobs": args.jobs,
              "sdca_init_images": args.sdca_init_images,
              "load_average": os.getloadavg(), "cpus": os.cpu_count(),
              "flags": {m: toy_flags(m, args) for m in args.methods}, "backbone": args.backbone,
              "controls": args.controls,
              "control_flags": {m: control_flags(m) for m in controlled(args.methods) if args.controls == "on"},
              "plca_test_time_aggregation": args.test_time_aggregation}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"methods": methods, "config": config}, f, indent=2)
    table, notes = markdown_table(methods), markdown_notes(args)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"`{config['command']}` ({config['date']}, {config['wall_s'] / 60:.1f} min)\n\n{table}"
                + (f"\n{notes}" if notes else ""))
    from uda import plots  # matplotlib only when drawing: the benchmark itself runs without it
    plots.benchmark_figure(methods, os.path.join(args.out, "results.png"))  # the table above, as a figure
    print(table + (f"\n{notes}" if notes else ""), flush=True)
    if any("errors" in e or "errors" in e.get("control", {}) for e in methods.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    run_cli(main)
