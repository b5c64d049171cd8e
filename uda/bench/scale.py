"""Real-size harness: every method's recipe at its paper's sizes, through train.py's real path.

    python -m uda.bench.scale --out runs/scale --device cuda --amp bf16
    OMP_NUM_THREADS=2 python -m uda.bench.scale --out runs/scale-cpu --device cpu --size-factor 0.25 --iters 4
    python -m uda.bench.scale --out runs/quick --methods source_only,fada,data_loading --size-factor 0.06 \\
        --iters 3 --grad-checkpoint off

What it measures, per method (every method of uda/methods.py but those with BENCHMARK_ROW = False):
- seconds per iteration: `train.py --method M` with M's RECIPE (backbone with random weights, resize,
  crop, per-GPU batch, both domains, its sampler), on files in the real folder layouts; the median of
  metrics.jsonl's sec_per_iter (--log-every 1) over the iterations after the first WARMUP_ITERS;
- peak memory: the last `peak N MB` train.py prints (torch.cuda.max_memory_allocated on CUDA, the
  training process's peak resident set on CPU);
- both as ratios to source_only at the same settings: source_only runs once per distinct settings group
  (source, backbone, BN, batch, crop, source resize, random scale), e.g. one DeepLab-v2 R101 1280x720
  batch-4 run for source_only, fada and sdca, one MiT-B5 512x512 batch-2 run for daformer and dida;
- the same with --grad-checkpoint (peak with and without);
- the official figure where one is published (OFFICIAL), else null.
Stages: selftrain (FADA's stage 4, a training like the methods', on argmax pseudo-labels of Cityscapes
train), the SDCA `init` pass and pseudo-label generation (argmax and classwise) per image, evaluation
per image, data loading per item in one process with one thread (decode, resize, crop, flip, as
train.py's loaders do for each method's source and target), and the per-image class statistics of the
class-balanced and RCS samplers per label; each extrapolated to the full dataset.

How: synthetic images and labels at the real resolutions (GTA5 1914x1052 images/*.png + labels/*.png
labelIds; SYNTHIA 1280x760 RGB/*.png + GT/LABELS/*.png 16-bit ids in channel 0; Cityscapes 2048x1024
leftImg8bit/ + gtFine/ labelIds), a few dozen files in a temporary folder, listed for train.py with
--source-list / --target-list (the shipped data lists name the full datasets). A label is a grid of
blocks, each one of 10-19 of the 19 classes (plus a void block), so samplers, ClassMix and the
thing-class terms see many classes; an image is its label's Cityscapes colours with a shading gradient
and noise (PNGs of 3-4 MB at full size). train.py runs as a subprocess with only these flags beyond
the recipe: --stop-iter (--iters N; the recipe's schedule length is kept), --eval-every 0, --log-every
1, --workers, --device, --amp, --grad-checkpoint, the data folders and lists, and the sizes when
--size-factor is not 1 (then every size is scaled: the images, --source-size, --target-size, --crop,
every method's SIZE_FLAGS, e.g. --selftrain-crop and DAFormer's ignored pseudo-label rows, and RCS's pixel
threshold). Weights are random
(no pretrained file), with one exception: the frozen-BN recipes (DeepLab-v2 with --bn frozen: source-
only, FADA, SDCA, CDGA) get `--pretrained` of a random network whose frozen BN statistics are
calibrated (see `calibrate`): with identity statistics a random DeepLab-v2 diverges to NaN at its
second iteration, which ends the run. Once the last iteration is logged (and the checkpoint the stages
read is saved) the run is ended: its end-of-run evaluation is no part of the measurement.
Per-image stage times are differences of two subprocess runs (a few images, then all) divided by the
difference in images, so start-up costs cancel. Loading and statistics times are CPU times of a
one-thread process over every file (in the page cache: decode and transforms, not disk reads).

Output: OUT/scale.json = {"methods": {name: {"sec_per_iter", "peak_mem_mb", "sec_per_iter_ratio",
"peak_mem_ratio", "settings", "grad_checkpoint": {"sec_per_iter", "peak_mem_mb"} or null, "official":
{"figure", "source"} or null, ...}}, "stages": {name: {...}}, "baselines": {group: {...}}, "goals": [...],
"config": {...}}, OUT/scale.md (the table, with the goals), OUT/logs/ (every subprocess's output). Both
files are rewritten after every measurement, so a run killed midway keeps what it measured; a failing
method or stage records "error": "<one line>" and the harness goes on.
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from uda import common, datasets, flags, models, png16, samplers
from uda.bench import METHODS
from uda.common import IGNORE_INDEX, UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHOD_NAMES = [name for name, module in METHODS.items() if getattr(module, "BENCHMARK_ROW", True)]
STAGE_NAMES = ["selftrain", "sdca_init", "pseudo_labels", "evaluation", "data_loading", "sampler_stats"]
WARMUP_ITERS = 2          # iterations whose sec_per_iter is skipped (cudnn autotune, allocator, first batches)
MIB_PER_GB = 1024         # GB figures below are GiB, as torch / mmcv logs report them
# native sizes (width, height) of the datasets' files
NATIVE = {"gta5": (1914, 1052), "synthia": (1280, 760), "cityscapes": (2048, 1024)}
FILES = {"gta5": 24, "synthia": 24, "cityscapes train": 24, "cityscapes val": 8}
CITIES = {"train": ["aachen", "bochum"], "val": ["frankfurt", "lindau"]}
SMALL_RUN = 2             # images of the short run whose time is subtracted (per-image stages)
GRID = (6, 8)             # label blocks per image: rows, columns
MIN_CLASSES = 10          # classes per image: 10..19, so per-image class sets differ (class-balanced sampler)
NOISE_STD = 6.0           # image noise: full-size PNGs of 3-4 MB, a little above real photos (a safe side)
FULL = {name: datasets.EXPECTED[key] for name, key in
        (("GTA5 train", ("gta5", "train")), ("SYNTHIA train", ("synthia", "train")),
         ("Cityscapes train", ("cityscapes", "train")), ("Cityscapes val", ("cityscapes", "val")))}

OFFICIAL = {
    "daformer": {"figure": "9.7 GB peak GPU memory (MiT-B5, 512x512 crops, batch 2, RTX 2080 Ti 11 GB)",
                 "source": "github.com/lhoyer/DAFormer issues #42 (author: 9.7 GB in the training logs) and #4 "
                           "(just fits the 11 GB of a 2080 Ti)", "peak_mem_mb": 9.7 * MIB_PER_GB},
    "plca": {"figure": "trained on 2 x V100 32 GB (no peak published)",
             "source": "github.com/kgl-prml/Pixel-Level-Cycle-Association README.md:8 @ e01d77a (\"two NVIDIA "
                       "Tesla V100 (32G) GPU cards\")"},
}
STEP_GOALS = {"fada": 2.2, "sdca": 2.2, "cdga": 2.2, "plca": 2.5, "daformer": 3.3}  # x source_only
DIDA_OVER_DAFORMER = 1.1
LOADING_GOAL_MS = 150.0   # per GTA5 item per worker
DAFORMER_GOAL_MB = 9.7 * MIB_PER_GB
GC_GOAL_MB = 12 * MIB_PER_GB


# --------------------------------------------------------------------------------------------------
# Sizes and settings
# --------------------------------------------------------------------------------------------------
def size_text(size):
    return None if size is None else f"{size[0]}x{size[1]}"


def scale_size(size, factor):
    """(w, h) or 'WxH' -> 'WxH' times factor; None and 'native' unchanged."""
    if size is None or size == "native":
        return size
    width, height = common.parse_size(size, "size") if isinstance(size, str) else size
    return f"{max(1, round(width * factor))}x{max(1, round(height * factor))}"


def recipe_settings(method, source="gta5"):
    """What train.py --method METHOD uses on real data: its defaults there (uda/flags.py), the sizes a
    flag left unset means made explicit."""
    values = flags.defaults(method, source)
    default_size = "native" if source == "cityscapes" else size_text(datasets.default_train_size(source))
    return {"source": source, "backbone": values["backbone"], "bn": models.resolve_bn(values["backbone"], values["bn"]),
            "batch_size": values["batch_size"], "crop": values["crop"],
            "source_size": values["source_size"] or default_size,
            "target_size": values["target_size"] or size_text(datasets.default_train_size("cityscapes")),
            "random_scale": values["random_scale"], "cat_max_ratio": values["cat_max_ratio"],
            "source_sampler": values["source_sampler"]}


def scaled_settings(settings, factor):
    return {**settings, **{k: scale_size(settings[k], factor) for k in ("crop", "source_size", "target_size")}}


def group_label(settings):
    """The source_only settings group: what a source-only step's cost depends on."""
    scale = settings["random_scale"]
    return (f"{settings['source']} {settings['backbone']} bn-{settings['bn']} batch {settings['batch_size']} "
            f"{settings['source_size']}" + (f" x{scale[0]}-{scale[1]}" if scale else "")
            + (f" crop {settings['crop']}" if settings["crop"] else ""))


def describe(settings):
    parts = [group_label(settings)]
    if settings.get("target_size") and settings["source"] != "cityscapes":
        parts.append(f"target {settings['target_size']}")
    if settings.get("cat_max_ratio", 1.0) < 1.0:
        parts.append(f"cat-max {settings['cat_max_ratio']}")
    if settings.get("source_sampler", "uniform") != "uniform":
        parts.append(settings["source_sampler"])
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# Synthetic datasets in the real layouts
# --------------------------------------------------------------------------------------------------
def inverse_tables():
    """trainId -> Cityscapes labelId (uint8) and -> SYNTHIA id (uint16); 255 -> 0 (void in both)."""
    to_labelid = np.zeros(256, dtype=np.uint8)
    to_synthia = np.zeros(256, dtype=np.uint16)
    for labelid, trainid in datasets.LABELID_TO_TRAINID.items():
        to_labelid[trainid] = labelid
    for synthia_id, trainid in datasets.SYNTHIA_ID_TO_TRAINID.items():
        to_synthia[trainid] = synthia_id
    return to_labelid, to_synthia


def block_scene(width, height, rng):
    """(trainIds, block index), both (H, W): GRID blocks, each one of MIN_CLASSES..19 classes, one void."""
    rows, cols = GRID
    classes = rng.choice(19, size=int(rng.integers(MIN_CLASSES, 20)), replace=False)
    cells = np.resize(classes, rows * cols)          # every chosen class at least twice
    rng.shuffle(cells)
    cells[rng.integers(cells.size)] = IGNORE_INDEX
    row_of = np.minimum(np.arange(height) * rows // height, rows - 1)  # (H,)
    col_of = np.minimum(np.arange(width) * cols // width, cols - 1)    # (W,)
    block = row_of[:, None] * cols + col_of[None, :]                   # (H, W)
    return cells[block].astype(np.uint8), block


def scene_image(trainids, rng):
    """uint8 (H, W, 3): the label's Cityscapes colours, shaded top to bottom, with noise."""
    palette = np.zeros((256, 3), dtype=np.float32)
    palette[:19] = datasets.CITYSCAPES_PALETTE
    height = trainids.shape[0]
    shade = np.linspace(0.7, 1.1, height, dtype=np.float32)[:, None, None]
    noise = rng.standard_normal((*trainids.shape, 3), dtype=np.float32) * NOISE_STD
    return np.clip(palette[trainids] * shade + noise, 0, 255).astype(np.uint8)


def save_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def write_list(path, names):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(n + "\n" for n in names))


def make_data(work, factor):
    """Write the three datasets under WORK/data; returns their lists, roots and a summary."""
    root = os.path.join(work, "data")
    to_labelid, to_synthia = inverse_tables()
    rng = np.random.default_rng(0)
    scaled = {name: tuple(int(v) for v in scale_size(size, factor).split("x")) for name, size in NATIVE.items()}
    lists = {}

    names = [f"{i:05d}.png" for i in range(1, FILES["gta5"] + 1)]
    for name in names:
        ids, _ = block_scene(*scaled["gta5"], rng)
        save_png(f"{root}/gta5/images/{name}", scene_image(ids, rng))
        save_png(f"{root}/gta5/labels/{name}", to_labelid[ids])
    lists["gta5"] = names

    names = [f"{i:07d}.png" for i in range(FILES["synthia"])]
    for name in names:
        ids, block = block_scene(*scaled["synthia"], rng)
        save_png(f"{root}/synthia/RGB/{name}", scene_image(ids, rng))
        instance = (block.astype(np.uint16) * 997 + 1)  # channel 1: an instance id per block
        label = np.stack([to_synthia[ids], instance, np.zeros_like(instance)], -1).astype(np.uint16)
        # a random mix of the five row filters, as encoders choose adaptively: the decoder's slow path
        os.makedirs(f"{root}/synthia/GT/LABELS", exist_ok=True)
        png16.write_png(f"{root}/synthia/GT/LABELS/{name}", label, filters=rng.integers(0, 5, size=label.shape[0]))
    lists["synthia"] = names

    for split in ("train", "val"):
        names = []
        count = FILES[f"cityscapes {split}"]
        for i in range(count):
            city = CITIES[split][i * len(CITIES[split]) // count]
            stem = f"{city}_{i:06d}_000019"
            ids, _ = block_scene(*scaled["cityscapes"], rng)
            save_png(f"{root}/cityscapes/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", scene_image(ids, rng))
            save_png(f"{root}/cityscapes/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png", to_labelid[ids])
            names.append(f"{city}/{stem}_leftImg8bit.png")
        lists[f"cityscapes {split}"] = names

    list_files = {}
    for key, names in lists.items():
        list_files[key] = os.path.join(work, "lists", key.replace(" ", "_") + ".txt")
        write_list(list_files[key], names)
    # evaluate.py's short run reads SMALL_RUN val images; train.py's end-of-run evaluation one (it runs
    # at 1024x512 whatever the size factor, and is no part of the measurement)
    small = linked_cityscapes(os.path.join(work, "data-small", "cityscapes"), root, lists["cityscapes val"][:SMALL_RUN])
    target = linked_cityscapes(os.path.join(work, "data-train", "cityscapes"), root, lists["cityscapes val"][:1],
                               with_train=True)
    summary = {key: {"files": len(names), "size": size_text(scaled[key.split()[0]]),
                     "mean_image_mb": round(mean_file_mb(root, key, names), 2)} for key, names in lists.items()}
    return argparse.Namespace(root=root, small_root=os.path.dirname(small), train_target_root=target,
                              lists=list_files,
                              count={k: len(v) for k, v in lists.items()}, summary=summary)


def linked_cityscapes(folder, root, val_names, with_train=False):
    """A Cityscapes folder of links into ROOT/cityscapes: val_names only in val, and all of train."""
    for name in val_names:
        label = name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        for sub, rel in (("leftImg8bit", name), ("gtFine", label)):
            link = os.path.join(folder, sub, "val", rel)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.join(root, "cityscapes", sub, "val", rel), link)
    for sub in ("leftImg8bit", "gtFine") if with_train else ():
        os.symlink(os.path.join(root, "cityscapes", sub, "train"), os.path.join(folder, sub, "train"))
    return folder


def mean_file_mb(root, key, names):
    folder = {"gta5": "gta5/images", "synthia": "synthia/RGB", "cityscapes train": "cityscapes/leftImg8bit/train",
              "cityscapes val": "cityscapes/leftImg8bit/val"}[key]
    return statistics.mean(os.path.getsize(os.path.join(root, folder, n)) for n in names) / 2 ** 20


# --------------------------------------------------------------------------------------------------
# Subprocesses
# --------------------------------------------------------------------------------------------------
def slug(name):
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_")


CRASH = re.compile(r"(error: |[A-Za-z_][\w.]*(Error|Exception)(: |$))")  # a one-line error, a traceback's end
CRASH_GRACE_S = 20  # a crashed train.py / evaluate.py with loader workers may never exit (see run_logged)


def run_logged(cmd, log_path, env=None, final=None, checkpoint=None):
    """Run cmd (cwd: the repository) in its own process group, output appended to log_path; returns
    (exit code, wall seconds).

    final: a line prefix (train.py's log line of its last iteration) after which the run is complete;
    then, once `checkpoint` (when given) exists, the group is ended: train.py's end-of-run evaluation (at
    1024x512 whatever the size factor) is no part of the measurement; the exit code is then 0. A crash
    (an `error:` line, a traceback's last line) gets CRASH_GRACE_S to exit, then the group is ended:
    after an uncaught exception, multiprocessing's exit handler waits for loader workers that ignore
    SIGTERM (train.ignore_stop_signals), forever.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with open(log_path, "a") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        tic = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        complete = False
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                complete = final is not None and line.startswith(final)
                if complete or CRASH.match(line):
                    break
            while complete and checkpoint and not os.path.exists(checkpoint) and proc.poll() is None:
                time.sleep(0.2)  # the save is atomic: the file exists once it is complete
            if not complete:
                proc.wait(timeout=CRASH_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        finally:  # always, also when the harness is interrupted: its children's session gets no Ctrl-C
            end_group(proc.pid)
        log.write(proc.stdout.read())
        code = proc.wait()
    return (0 if complete else code), time.perf_counter() - tic


def end_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # every process of the group has exited
        pass


def error_line(log_path, code):
    """One line saying why a subprocess failed: its `error: ...` line, else its last line (a traceback's)."""
    with open(log_path) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("$ ")]
    errors = [line for line in lines if line.startswith("error:")]
    return f"exit {code}: {(errors or lines or ['no output'])[-1]}"


def median_sec_per_iter(metrics_path):
    """Median sec_per_iter of the iterations after the first WARMUP_ITERS (train.py --log-every 1)."""
    values = [r["sec_per_iter"] for r in read_jsonl(metrics_path) if "sec_per_iter" in r and r["iter"] > WARMUP_ITERS]
    if not values:
        raise UserError(f"{metrics_path}: no sec_per_iter after iteration {WARMUP_ITERS}")
    return statistics.median(values)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


PEAK = re.compile(r"peak (\d+(?:\.\d+)?) MB")


def last_peak_mb(log_path):
    """The `peak N MB` of train.py's last log line in this log."""
    with open(log_path) as f:
        peaks = [float(m.group(1)) for line in f for m in [PEAK.search(line)] if m]
    if not peaks:
        raise UserError(f"{log_path}: no 'peak N MB' log line")
    return peaks[-1]


class Harness:
    """The run's state: options, data, folders, finished trainings (by name), and the results file."""

    def __init__(self, opts, data, work):
        self.opts, self.data, self.work = opts, data, work
        self.factor = opts.size_factor
        self.logs = os.path.join(opts.out, "logs")
        self.runs = {}
        self.calibrated = {}   # backbone -> weights file of the frozen-BN runs
        self.pseudo_dirs = {}  # rule -> folder of the full pseudo-label run (selftrain reads argmax's)
        self.results = {"methods": {}, "stages": {}, "baselines": {}, "goals": [], "config": run_config(opts, data)}
        # loader workers per domain: two on CPU (the cores also compute), four feed a GPU
        self.workers = 4 if opts.device == "cuda" else 2
        self.results["config"]["workers"] = self.workers

    # ---- results ------------------------------------------------------------------------------
    def save(self):
        self.results["goals"] = goals(self.results)
        self.results["config"]["wall_s"] = round(time.time() - self.results["config"]["started_unix"], 1)
        self.results["config"]["load_average_now"] = [round(v, 2) for v in os.getloadavg()]
        path = os.path.join(self.opts.out, "scale.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.results, f, indent=2)
        os.replace(path + ".tmp", path)  # a kill mid-write leaves the previous complete file
        with open(os.path.join(self.opts.out, "scale.md"), "w") as f:
            f.write(markdown(self.results))

    # ---- trainings ----------------------------------------------------------------------------
    def train_command(self, method, settings, out, grad_checkpoint, explicit, extra=()):
        """train.py with the recipe; `explicit`: pass every setting (source_only at a method's settings)."""
        cmd = [sys.executable, os.path.join(REPO, "train.py"), "--method", method, "--source", settings["source"],
               "--source-root", os.path.join(self.data.root, settings["source"]),
               "--target-root", self.data.train_target_root,
               "--source-list", self.data.lists[list_key(settings["source"])],
               "--target-list", self.data.lists["cityscapes train"], "--out", out,
               "--stop-iter", str(self.opts.iters), "--eval-every", "0", "--log-every", "1",
               "--workers", str(self.workers), "--device", self.opts.device, "--amp", self.opts.amp]
        if grad_checkpoint:
            cmd.append("--grad-checkpoint")
        if settings["bn"] == "frozen":
            cmd += ["--pretrained", self.weights(settings["backbone"])]
        if explicit:
            cmd += ["--backbone", settings["backbone"], "--bn", settings["bn"], "--batch-size",
                    str(settings["batch_size"]), "--source-size", settings["source_size"]]
            cmd += ["--crop", settings["crop"]] if settings["crop"] else []
            cmd += ["--random-scale", *map(str, settings["random_scale"])] if settings["random_scale"] else []
        elif self.factor != 1:
            cmd += ["--source-size", settings["source_size"], "--target-size", settings["target_size"]]
            cmd += ["--crop", settings["crop"]] if settings["crop"] else []
            cmd += method_size_flags(method, settings, self.factor)
        return cmd + list(extra)

    def train(self, name, method, settings, grad_checkpoint=False, explicit=False, extra=(), keep=False):
        """One training run (cached by name): {"sec_per_iter", "peak_mem_mb"} or {"error"}."""
        if name in self.runs:
            return self.runs[name]
        out = os.path.join(self.work, "runs", slug(name))
        log = os.path.join(self.logs, slug(name) + ".log")
        print(f"train {name} ...", flush=True)
        record = {}
        try:
            cmd = self.train_command(method, settings, out, grad_checkpoint, explicit, extra)
            code, wall = run_logged(cmd, log, final=f"iter {self.opts.iters}/{self.opts.iters} ",
                                    checkpoint=os.path.join(out, "last.pt") if keep else None)
            record["wall_s"] = round(wall, 1)
            if code != 0:
                raise UserError(error_line(log, code))
            record.update(sec_per_iter=median_sec_per_iter(os.path.join(out, "metrics.jsonl")),
                          peak_mem_mb=last_peak_mb(log))
            shutil.copy(os.path.join(out, "metrics.jsonl"), os.path.join(self.logs, slug(name) + ".metrics.jsonl"))
        except (UserError, OSError, ValueError, KeyError) as err:
            record["error"] = common.one_line(err)
        if keep and "error" not in record:
            record["ckpt"] = os.path.join(out, "last.pt")
        else:  # checkpoints are large (R101 + momentum: ~0.5 GB): keep only those the stages read
            shutil.rmtree(out, ignore_errors=True)
        print(f"  {name}: {record.get('error') or format_record(record)}", flush=True)
        self.runs[name] = record
        return record

    def baseline(self, settings, extra=()):
        """source_only at `settings` (its group), recorded under "baselines". The default group's
        checkpoint (DeepLab-v2 R101 on GTA5) is kept: the stages read it."""
        label = group_label(settings)
        record = self.train(f"source_only@{label}", "source_only", settings, explicit=True, extra=extra,
                            keep=label == group_label(self.default_settings()))
        self.results["baselines"][label] = {k: v for k, v in record.items() if k != "ckpt"}
        self.results["baselines"][label]["settings"] = settings
        return label, record

    def default_settings(self):
        return scaled_settings(recipe_settings("source_only"), self.factor)

    def measure_training(self, method, settings, publish, extra=(), baseline=None, baseline_extra=()):
        """A method's (or selftrain's) entry: the plain run with its ratios to source_only at `baseline`
        settings (default: the method's), published (saved) before the checkpointed run starts, then that run."""
        entry = {"sec_per_iter": None, "peak_mem_mb": None, "sec_per_iter_ratio": None, "peak_mem_ratio": None,
                 "settings": settings, "official": OFFICIAL.get(method), "grad_checkpoint": None}
        if self.opts.grad_checkpoint != "on":
            label, base = self.baseline(baseline or settings, baseline_extra)
            run = base if method == "source_only" else \
                self.train(f"{method}@{describe(settings)}", method, settings, extra=extra)
            entry.update(plain_entry(run, base, label, METHODS[method].RECIPE))
        publish(entry)
        if self.opts.grad_checkpoint != "off":
            run = self.train(f"{method}+grad-checkpoint@{describe(settings)}", method, settings, True, extra=extra)
            entry["grad_checkpoint"] = {k: run[k] for k in ("sec_per_iter", "peak_mem_mb", "error") if k in run}
            publish(entry)

    def method(self, method):
        def publish(entry):
            self.results["methods"][method] = entry
            self.save()
        self.measure_training(method, scaled_settings(recipe_settings(method), self.factor), publish)

    def checkpoint(self):
        """last.pt of source_only at its default settings (DeepLab-v2 R101, GTA5): the stages read it."""
        _, run = self.baseline(self.default_settings())
        if "error" in run:
            raise UserError(f"needs the source_only checkpoint, whose training failed: {run['error']}")
        return run["ckpt"]

    # ---- stages -------------------------------------------------------------------------------
    def stage(self, name, measure):
        """Run measure() -> record; an error becomes {"error": one line}; saved either way."""
        print(f"stage {name} ...", flush=True)
        try:
            record = measure()
        except (UserError, OSError, ValueError, KeyError, subprocess.SubprocessError) as err:
            record = {"error": common.one_line(err)}
        self.results["stages"][name] = record
        print(f"  {name}: {record.get('error') or record.get('extrapolated', 'done')}", flush=True)
        self.save()
        return record

    def per_image(self, name, command, full):
        """Seconds per image: (time of the full run - time of a SMALL_RUN-image run) / the extra images.

        command(n, tag) -> argv of a run over n images (None = all `full`)."""
        log = os.path.join(self.logs, slug(name) + ".log")
        times = {}
        for n, tag in ((SMALL_RUN, "small"), (None, "full")):
            code, times[tag] = run_logged(command(n, tag), log)
            if code != 0:
                raise UserError(error_line(log, code))
        return (times["full"] - times["small"]) / (full - SMALL_RUN), times

    def eval_input(self):
        """evaluate.py's Cityscapes input size (1024x512), scaled."""
        return scale_size(datasets.default_eval_size("cityscapes"), self.factor)

    def eval_size(self):
        """--input-size of evaluate.py; no flag at factor 1 (its own default)."""
        return ["--input-size", self.eval_input()] if self.factor != 1 else []

    def sdca_init(self):
        ckpt = self.checkpoint()
        size = scale_size(datasets.default_train_size("gta5"), self.factor)

        def command(n, tag):
            cmd = [sys.executable, "-m", "uda.sdca", "init", "--ckpt", ckpt, "--data-root", self.data.root,
                   "--source-list", self.data.lists["gta5"], "--out", os.path.join(self.work, f"sdca-init-{tag}.pt"),
                   "--overwrite", "--input-size", size, "--workers", str(self.workers), "--device", self.opts.device,
                   "--amp", self.opts.amp]
            return cmd + (["--max-images", str(n)] if n else [])
        seconds, times = self.per_image("sdca_init", command, self.data.count["gta5"])
        return stage_record(seconds, times, "GTA5 train",
                            {"input_size": size, "checkpoint": "source_only " + flags.REAL_BACKBONE, "batch_size": 1})

    def pseudo_labels(self, rule):
        ckpt = self.checkpoint()
        def out(tag):
            return os.path.join(self.work, f"pseudo-{rule}-{tag}")

        def command(n, tag):
            cmd = [sys.executable, os.path.join(REPO, "evaluate.py"), "--ckpt", ckpt, "--target", "cityscapes",
                   "--data-root", self.data.root, "--save-pseudo", out(tag), "--pseudo-rule", rule, "--overwrite",
                   "--workers", str(self.workers), "--device", self.opts.device, "--amp", self.opts.amp]
            return cmd + self.eval_size() + (["--pseudo-limit", str(n)] if n else [])
        seconds, times = self.per_image(f"pseudo_labels {rule}", command, self.data.count["cityscapes train"])
        self.pseudo_dirs[rule] = out("full")
        return stage_record(seconds, times, "Cityscapes train",
                            {"rule": rule, "input_size": self.eval_input(),
                             "softmax_size": scale_size(NATIVE["cityscapes"], self.factor),
                             "checkpoint": "source_only " + flags.REAL_BACKBONE})

    def evaluation(self):
        ckpt = self.checkpoint()

        def command(n, tag):
            root = self.data.small_root if n else self.data.root
            return [sys.executable, os.path.join(REPO, "evaluate.py"), "--ckpt", ckpt, "--target", "cityscapes",
                    "--data-root", root, "--json", os.path.join(self.work, f"eval-{tag}.json"), "--overwrite",
                    "--workers", str(self.workers), "--device", self.opts.device,
                    "--amp", self.opts.amp] + self.eval_size()
        seconds, times = self.per_image("evaluation", command, self.data.count["cityscapes val"])
        return stage_record(seconds, times, "Cityscapes val",
                            {"input_size": self.eval_input(),
                             "label_size": scale_size(NATIVE["cityscapes"], self.factor),
                             "checkpoint": "source_only " + flags.REAL_BACKBONE})

    def selftrain(self):
        """FADA's stage 4 on argmax pseudo-labels, measured like a method (its own source_only group)."""
        if "argmax" not in self.pseudo_dirs:
            self.stage("pseudo_labels argmax", lambda: self.pseudo_labels("argmax"))
        if "argmax" not in self.pseudo_dirs:
            self.results["stages"]["selftrain"] = {"error": "needs the argmax pseudo-labels, whose stage failed"}
            return self.save()
        settings = scaled_settings(recipe_settings("selftrain", source="cityscapes"), self.factor)
        pseudo = ["--pseudo-dir", self.pseudo_dirs["argmax"]]
        # the loader delivers whole images, the method forwards --selftrain-crop crops of them: source_only
        # at that crop is the step of the same size
        crop = scale_size(flag_default("selftrain", "selftrain_crop"), self.factor)

        def publish(entry):
            self.results["stages"]["selftrain"] = entry
            self.save()
        self.measure_training("selftrain", settings, publish, extra=pseudo, baseline={**settings, "crop": crop},
                              baseline_extra=pseudo)

    def loading_and_statistics(self, want_loading, want_stats):
        """Both in one child process with one thread (as one loader worker); a failing item is its own error."""
        specs = loading_specs(self.data, self.factor) if want_loading else []
        specs += statistics_specs(self.data) if want_stats else []
        try:
            results = run_child("probe_all", specs, os.path.join(self.logs, "data_loading.log"), ONE_THREAD)
        except UserError as err:
            results = [{"error": common.one_line(err)}] * len(specs)
        for spec, result in zip(specs, results):
            self.results["stages"][spec["name"]] = finish_probe(spec, result, self.workers)
        self.save()

    def weights(self, backbone):
        """--pretrained file of a frozen-BN run: `backbone` with random weights and calibrated BN statistics."""
        if backbone not in self.calibrated:
            path = os.path.join(self.work, "weights", f"{backbone}.pt")
            images = [os.path.join(self.data.root, "gta5", "images", n) for n in CALIBRATION_IMAGES]
            size = scale_size(datasets.default_train_size("gta5"), min(self.factor, CALIBRATION_FACTOR))
            run_child("calibrate", {"backbone": backbone, "images": images, "size": size, "out": path},
                      os.path.join(self.logs, f"calibrate-{backbone}.log"))
            self.calibrated[backbone] = path
        return self.calibrated[backbone]


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_child(function, payload, log, env=None):
    """function(payload) of this module in a fresh Python process; its JSON result (a failure: UserError)."""
    code = ("import json, sys; from uda.bench import scale; "
            "print('RESULT ' + json.dumps(getattr(scale, sys.argv[1])(json.loads(sys.argv[2]))), flush=True)")
    status, _ = run_logged([sys.executable, "-c", code, function, json.dumps(payload)], log, env)
    with open(log) as f:
        found = [line[len("RESULT "):] for line in f if line.startswith("RESULT ")]
    if status != 0 or not found:
        raise UserError(error_line(log, status))
    return json.loads(found[-1])


CALIBRATION_IMAGES = ["00001.png", "00002.png"]
RESIDUAL_SCALE = 0.2     # frozen bn3 scale of every bottleneck (see calibrate)
CALIBRATION_FACTOR = 0.5  # calibrate at up to 640x360: the statistics of a random network barely depend on size


def calibrate(spec):
    """Write a random `backbone` whose frozen BatchNorms hold the statistics of its own activations.

    A frozen BN with identity statistics (mean 0, variance 1) leaves a random DeepLab-v2's activations
    unnormalised: they grow through the 33 residual blocks, the first loss is ~1e4 and the second
    iteration NaN. Pretrained ImageNet weights come with BN statistics that normalise; so do these:
    one forward in train mode with cumulative statistics (momentum None), then frozen. Calibrated
    alone, SGD at the recipes' LRs still diverges within 6 iterations (the random blocks' gradients are
    large); each residual branch's last BN scale x RESIDUAL_SCALE keeps 12 iterations near log(19)
    (the zero-gamma / SkipInit idea). Every operation, hence the cost, is unchanged.
    """
    torch.manual_seed(0)
    model = models.build_model(spec["backbone"], datasets.CITYSCAPES_19.num_classes, bn="train").train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
            module.reset_running_stats()
    size = common.parse_size(spec["size"], "size")
    images = torch.stack([datasets.to_tensors(datasets.resize_pair(datasets.read_image(p), None, size)[0], None)[0]
                          for p in spec["images"]])  # (B, 3, H, W) in [0, 1]
    with torch.no_grad():
        model(images)
    models.freeze_batchnorm(model)
    for module in model.modules():
        if isinstance(module, models.Bottleneck):  # damped residual branches (zero-gamma / SkipInit idea)
            module.bn3.weight.mul_(RESIDUAL_SCALE)
    os.makedirs(os.path.dirname(spec["out"]), exist_ok=True)
    torch.save(model.state_dict(), spec["out"])
    return spec["out"]


def plain_entry(run, base, label, recipe):
    """sec_per_iter, peak_mem_mb, their ratios to the baseline run, errors, the full-length estimate."""
    entry = {"baseline": label, **{k: run.get(k) for k in ("sec_per_iter", "peak_mem_mb")}}
    for key, ratio in (("sec_per_iter", "sec_per_iter_ratio"), ("peak_mem_mb", "peak_mem_ratio")):
        entry[ratio] = run[key] / base[key] if run.get(key) and base.get(key) else None
    if "error" in run:
        entry["error"] = run["error"]
    if "error" in base:
        entry["baseline_error"] = base["error"]
    stop = recipe.get("stop_iter") or recipe.get("iters")
    if stop and run.get("sec_per_iter"):
        entry["extrapolated"] = f"{stop:,} iterations: {stop * run['sec_per_iter'] / 3600:.1f} h"
    return entry


def list_key(source):
    return {"gta5": "gta5", "synthia": "synthia", "cityscapes": "cityscapes train"}[source]


def method_size_flags(method, settings, factor):
    """Method flags that are sizes in pixels, scaled with the data (passed only when factor != 1): the
    module's SIZE_FLAGS ({flag: its real-data value, a length, 'WxH', or None for the flag's default})
    and, with RCS, its pixel threshold."""
    scaled = []
    for flag, value in getattr(METHODS[method], "SIZE_FLAGS", {}).items():
        value = flag_default(method, flag.lstrip("-").replace("-", "_")) if value is None else value
        scaled += [flag, scale_size(value, factor) if isinstance(value, str) else str(round(value * factor))]
    if settings["source_sampler"] == "rcs":  # a pixel count of the label files
        rcs_min_pixels = flags.defaults(method, settings["source"])["rcs_min_pixels"]
        scaled += ["--rcs-min-pixels", str(max(1, round(rcs_min_pixels * factor ** 2)))]
    return scaled


def flag_default(method, dest):
    """The default of one of a method's own flags, from its add_arguments."""
    parser = argparse.ArgumentParser()
    METHODS[method].add_arguments(parser)
    return parser.get_default(dest)


def stage_record(seconds, times, dataset, settings):
    full = FULL[dataset]
    return {"per_item_s": seconds, "settings": settings, "wall_s": {k: round(v, 2) for k, v in times.items()},
            "extrapolated": f"{dataset}, {full:,} images: {full * seconds / 60:.1f} min in one process"}


# --------------------------------------------------------------------------------------------------
# Data loading and sampler statistics (run in a one-thread child: probe_all)
# --------------------------------------------------------------------------------------------------
def loading_specs(data, factor):
    """One spec per distinct training pipeline of the methods' source and target, plus SYNTHIA and the
    evaluation items; names carry the papers' sizes, the specs the scaled ones."""
    specs = {}
    for method in METHOD_NAMES:
        real = recipe_settings(method)
        sides = [("source", "gta5")] + ([("target", "cityscapes")] if METHODS[method].Method.needs_target else [])
        for side, dataset in sides:
            size = real["source_size"] if side == "source" else real["target_size"]
            scale = real["random_scale"]
            words = ["data_loading", dataset, "train" if dataset == "cityscapes" else None, size,
                     f"x{scale[0]}-{scale[1]}" if scale else None, f"crop {real['crop']}" if real["crop"] else None,
                     f"cat-max {real['cat_max_ratio']}" if side == "source" and real["cat_max_ratio"] < 1 else None]
            name = " ".join(w for w in words if w)
            spec = specs.setdefault(name, {
                "name": name, "dataset": dataset, "split": "train", "labeled": side == "source", "augment": True,
                "root": os.path.join(data.root, dataset), "list_file": data.lists[list_key(dataset)],
                "size": scale_size(size, factor), "crop": scale_size(real["crop"], factor), "scale_range": scale,
                "cat_max_ratio": real["cat_max_ratio"] if side == "source" else 1.0, "space": "cityscapes",
                "full": "GTA5 train" if dataset == "gta5" else "Cityscapes train", "used_by": []})
            spec["used_by"].append(method)
    synthia = {"name": "data_loading synthia 1280x760", "dataset": "synthia", "split": "train", "labeled": True,
               "augment": True, "root": os.path.join(data.root, "synthia"), "list_file": data.lists["synthia"],
               "size": scale_size(datasets.default_train_size("synthia"), factor), "crop": None, "scale_range": None,
               "cat_max_ratio": 1.0, "space": "synthia", "full": "SYNTHIA train",
               "used_by": ["SYNTHIA -> Cityscapes runs"]}
    val = {"name": "data_loading cityscapes val native", "dataset": "cityscapes", "split": "val", "labeled": True,
           "augment": False, "root": os.path.join(data.root, "cityscapes"), "list_file": None, "size": None,
           "crop": None, "scale_range": None, "cat_max_ratio": 1.0, "space": "cityscapes", "full": "Cityscapes val",
           "used_by": ["evaluation"]}
    return [*specs.values(), synthia, val]


def statistics_specs(data):
    return [{"name": f"sampler_stats {dataset}", "kind": "statistics", "dataset": dataset, "split": "train",
             "labeled": True, "augment": False, "root": os.path.join(data.root, dataset),
             "list_file": data.lists[dataset],
             "size": None, "crop": None, "scale_range": None, "cat_max_ratio": 1.0, "space": space,
             "full": full, "used_by": ["class-balanced (fada, sdca)", "rcs (daformer, dida)"]}
            for dataset, space, full in (("gta5", "cityscapes", "GTA5 train"), ("synthia", "synthia", "SYNTHIA train"))]


SPACES = {"cityscapes": datasets.CITYSCAPES_19, "synthia": datasets.SYNTHIA_16}


def probe_all(specs):
    """[per spec: {"ms_per_item", "wall_ms_per_item", "items"} or {"error"}]: run in the one-thread child."""
    torch.set_num_threads(1)  # a loader worker's share (the child's OMP_NUM_THREADS is 1 too)
    results = []
    for spec in specs:
        try:
            results.append(probe(spec))
        except (UserError, OSError, ValueError) as err:
            results.append({"error": common.one_line(err)})
    return results


def probe(spec):
    """CPU and wall ms per item of dataset[(i, draw)] (loading) or of the class statistics (per label)."""
    size = common.parse_size(spec["size"], "size") if spec["size"] else None
    crop = common.parse_size(spec["crop"], "crop") if spec["crop"] else None
    dataset = datasets.build_dataset(spec["dataset"], spec["split"], SPACES[spec["space"]], root=spec["root"],
                                     labeled=spec["labeled"], crop=crop, augment=spec["augment"], size=size,
                                     scale_range=tuple(spec["scale_range"]) if spec["scale_range"] else None,
                                     cat_max_ratio=spec["cat_max_ratio"], list_file=spec["list_file"])
    cpu, wall = time.process_time(), time.perf_counter()
    if spec.get("kind") == "statistics":
        samplers.compute_class_counts(dataset, SPACES[spec["space"]].num_classes, workers=0)
    else:
        for i in range(len(dataset)):
            dataset[(i, i + 1)]  # (index, draw): the training loaders' key, a fresh augmentation each
    return {"ms_per_item": (time.process_time() - cpu) * 1000 / len(dataset),
            "wall_ms_per_item": (time.perf_counter() - wall) * 1000 / len(dataset), "items": len(dataset)}


def finish_probe(spec, result, workers):
    record = {"settings": {k: spec[k] for k in ("dataset", "split", "size", "crop", "scale_range", "cat_max_ratio",
                                                "labeled", "augment")}, "used_by": spec["used_by"], **result}
    if "ms_per_item" in result:
        full = FULL[spec["full"]]
        what = "labels" if spec.get("kind") == "statistics" else "items"
        minutes = full * result["ms_per_item"] / 1000 / workers / 60
        record["extrapolated"] = f"{spec['full']}, {full:,} {what}: {minutes:.1f} min on {workers} workers"
    return record


# --------------------------------------------------------------------------------------------------
# Goals and the Markdown table
# --------------------------------------------------------------------------------------------------
def goals(results):
    """[{"name", "row", "goal", "status": met | not met | not measured, "value"}] for the current results."""
    config = results["config"]
    real = config["size_factor"] == 1
    where = "" if real and config["device"] == "cuda" else f" ({config['device']}, size factor {config['size_factor']})"
    methods, stages = results["methods"], results["stages"]
    out = []

    def add(row, goal, value, limit, measured=True, unit="x"):
        status = "not measured" if value is None or not measured else ("met" if value <= limit else "not met")
        digits = {"x": 2, " ms": 1, " MB": 0}[unit]
        out.append({"row": row, "goal": goal, "status": status,
                    "value": None if value is None else f"{value:.{digits}f}{unit}{where if measured else ''}"})

    for method, limit in STEP_GOALS.items():
        if method in methods:
            add(method, f"step <= {limit}x source-only", methods[method].get("sec_per_iter_ratio"), limit)
    if "dida" in methods:
        dida, base = methods["dida"].get("sec_per_iter"), methods.get("daformer", {}).get("sec_per_iter")
        add("dida", f"step <= {DIDA_OVER_DAFORMER}x daformer", dida / base if dida and base else None,
            DIDA_OVER_DAFORMER)
    for name, record in stages.items():
        if name.startswith("data_loading gta5"):
            add(name, f"<= {LOADING_GOAL_MS:.0f} ms per GTA5 item per worker", record.get("ms_per_item"),
                LOADING_GOAL_MS, measured=real, unit=" ms")
    if "daformer" in methods:
        add("daformer", "peak < 9.7 GB at 512x512 batch 2 under bf16", methods["daformer"].get("peak_mem_mb"),
            DAFORMER_GOAL_MB, measured=real and config["device"] == "cuda" and config["amp"] == "bf16", unit=" MB")
    trainings = dict(methods, **{"selftrain": stages["selftrain"]} if "selftrain" in stages else {})
    for row, record in trainings.items():
        gc = record.get("grad_checkpoint") or {}
        add(row, "peak <= 12 GB with --grad-checkpoint", gc.get("peak_mem_mb"), GC_GOAL_MB,
            measured=real and config["device"] == "cuda", unit=" MB")
    return out


def describe_stage(settings):
    """'dataset gta5, split train, size 320x180, labeled, augment': the values that are set."""
    return ", ".join(k if v is True else f"{k} {v}" for k, v in settings.items()
                     if v not in (None, False) and not (k == "cat_max_ratio" and v == 1.0))


def fmt(value, spec):
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def format_record(record):
    return f"{fmt(record.get('sec_per_iter'), '.3f')} s/iter, peak {fmt(record.get('peak_mem_mb'), '.0f')} MB"


def markdown(results):
    config = results["config"]
    lines = [f"# Real-size harness: `{config['command']}`", "",
             f"{config['date']}; device {config['device']} ({config.get('gpu') or config['cpu']}), "
             f"amp {config['amp']}, "
             f"size factor {config['size_factor']}, {config['iters']} iterations per run (median s/iter after "
             f"{WARMUP_ITERS}), torch {config['torch']}, {config['threads']} threads, {config['workers']} loader "
             f"workers per domain; load average {config['load_average_start']} at start, "
             f"{config.get('load_average_now')} now ({config['cpus']} CPUs).", "",
             "| row | settings | s/iter or s/item | x source-only | peak MB | x source-only | with --grad-checkpoint "
             "| official | full scale | goals |", "|---|---|---|---|---|---|---|---|---|---|"]
    by_row = {}
    for goal in results["goals"]:
        by_row.setdefault(goal["row"], []).append(f"{goal['goal']}: **{goal['status']}**"
                                                  + (f" ({goal['value']})" if goal["value"] else ""))
    for name, e in [*results["methods"].items(), *results["stages"].items()]:
        settings = describe(e["settings"]) if "backbone" in e.get("settings", {}) else \
            describe_stage(e.get("settings", {}))
        if "error" in e:
            settings += f" — **error**: {e['error']}"
        if "backbone" in e.get("settings", {}):  # a training
            timing = fmt(e.get("sec_per_iter"), ".3f")
        elif "per_item_s" in e:
            timing = fmt(e["per_item_s"], ".3f") + " s/image"
        else:
            timing = fmt(e.get("ms_per_item"), ".1f") + " ms"
        gc = e.get("grad_checkpoint")
        gc_text = "–" if not gc else (f"error: {gc['error']}" if "error" in gc else
                                      f"{fmt(gc.get('sec_per_iter'), '.3f')} s/iter, "
                                      f"{fmt(gc.get('peak_mem_mb'), '.0f')} MB")
        official = e.get("official")
        lines.append(f"| {name} | {settings} | {timing} | {fmt(e.get('sec_per_iter_ratio'), '.2f')} | "
                     f"{fmt(e.get('peak_mem_mb'), '.0f')} | {fmt(e.get('peak_mem_ratio'), '.2f')} | {gc_text} | "
                     f"{official['figure'] + ' (' + official['source'] + ')' if official else '–'} | "
                     f"{e.get('extrapolated', '–')} | {'; '.join(by_row.get(name, [])) or '–'} |")
    lines += ["", "## Goals", "", "| row | goal | status | value |", "|---|---|---|---|"]
    lines += [f"| {g['row']} | {g['goal']} | {g['status']} | {g['value'] or '–'} |" for g in results["goals"]]
    lines += ["", "Goals in GB and ms are measured only at size factor 1 (memory only on CUDA, DAFormer's under "
              "bf16); step ratios at any size, with the device and factor noted. s/image: per-image time of a "
              "stage (its run over all images minus a 2-image run); ms: CPU time per item in one one-thread "
              "process (data loading, sampler statistics per label). Logs: logs/."]
    return "\n".join(lines) + "\n"


def run_config(opts, data):
    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"command": shlex.join(["python", "-m", "uda.bench.scale", *opts.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "started_unix": time.time(), "device": opts.device, "amp": opts.amp, "size_factor": opts.size_factor,
            "iters": opts.iters, "warmup_iters_skipped": WARMUP_ITERS, "grad_checkpoint": opts.grad_checkpoint,
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu": cpu, "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if opts.device == "cuda" else None,
            "load_average_start": [round(v, 2) for v in os.getloadavg()], "data": data.summary}


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = common.ArgumentParser(prog="python -m uda.bench.scale", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder: scale.json, scale.md, logs/")
    p.add_argument("--methods", default="all",
                   help=f"'all', or a comma-separated subset of the methods ({', '.join(METHOD_NAMES)}) and "
                        f"stages ({', '.join(STAGE_NAMES)})")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available, else cpu")
    p.add_argument("--amp", choices=list(common.AMP_DTYPES), default="off", help="train.py / evaluate.py --amp")
    p.add_argument("--iters", type=common.positive_int, default=10,
                   help=f"iterations per training (train.py --stop-iter; the recipe's schedule is kept); the "
                        f"first {WARMUP_ITERS} are not timed")
    p.add_argument("--size-factor", type=common.positive_float, default=1.0,
                   help="scale every size (images, resizes, crops) for quick checks; 1 = the papers'")
    p.add_argument("--grad-checkpoint", choices=["on", "off", "both"], default="both",
                   help="runs with train.py --grad-checkpoint: both (plain and checkpointed), off (plain only), "
                        "on (checkpointed only: no ratios)")
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = p.parse_args(argv)
    opts.argv = argv
    names = METHOD_NAMES + STAGE_NAMES
    opts.wanted = names if opts.methods == "all" else [n for n in opts.methods.split(",") if n]
    unknown = [n for n in opts.wanted if n not in names]
    if unknown or not opts.wanted:
        raise UserError(f"--methods {opts.methods!r}: expected 'all' or a comma-separated subset of {', '.join(names)}")
    if opts.iters <= WARMUP_ITERS:
        raise UserError(f"--iters {opts.iters}: expected more than {WARMUP_ITERS} (the first {WARMUP_ITERS} are "
                        f"not timed)")
    opts.device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    if os.path.exists(os.path.join(opts.out, "scale.json")):
        raise UserError(f"--out {opts.out}: holds scale.json of an earlier run; choose a new folder")
    return opts


def main(argv=None):
    opts = parse_args(argv)
    os.makedirs(os.path.join(opts.out, "logs"), exist_ok=True)
    work = tempfile.mkdtemp(prefix="uda-scale-")
    try:
        print(f"writing synthetic datasets (size factor {opts.size_factor}) under {work} ...", flush=True)
        harness = Harness(opts, make_data(work, opts.size_factor), work)
        harness.save()
        wanted = opts.wanted
        if "data_loading" in wanted or "sampler_stats" in wanted:
            harness.loading_and_statistics("data_loading" in wanted, "sampler_stats" in wanted)
        for method in METHOD_NAMES:
            if method in wanted:
                harness.method(method)
        if "sdca_init" in wanted:
            harness.stage("sdca_init", harness.sdca_init)
        if "evaluation" in wanted:
            harness.stage("evaluation", harness.evaluation)
        if "pseudo_labels" in wanted:
            for rule in ("argmax", "classwise"):
                harness.stage(f"pseudo_labels {rule}", lambda rule=rule: harness.pseudo_labels(rule))
        if "selftrain" in wanted:
            harness.selftrain()
        harness.save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(opts.out, "scale.md")) as f:
        print(f.read(), flush=True)


if __name__ == "__main__":
    common.run_cli(main)
