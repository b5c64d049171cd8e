"""Cost measurements: time and memory of the backbones, of the methods' iterations, of their hot parts.

    python -m uda.bench.cost --what backbones --crop 256x256 --threads 1 --steps 2 --warmup 1
    python -m uda.bench.cost --what backbones --device cuda --amp bf16 --crop 1280x720 --backbones deeplabv2-r101,mit-b5
    OMP_NUM_THREADS=1 python -m uda.bench.cost --what fada
    OMP_NUM_THREADS=1 python -m uda.bench.cost --what cdga
    python -m uda.bench.cost --what dida --backbone mit-b5 --crop 512x512 --device cuda --amp bf16
    python -m uda.bench.cost --what plca-association --pixels 8464 --dim 2048 [--chunk 1024] [--device cuda]
    OMP_NUM_THREADS=1 python -m uda.bench.cost --what plca-toy
    python -m uda.bench.cost --what sdca-memory [--n 14400 --official-n 1440]
    OMP_NUM_THREADS=1 python -m uda.bench.cost --what sdca-speed
    OMP_NUM_THREADS=1 python -m uda.bench.cost --what png

Flags are parsed in two stages, as train.py's --method: --what first, then that measurement's options,
so `--what X --help` lists X's options with their defaults.

What each measures:
- backbones: one training step per backbone (forward, CE on the upsampled logits, backward), random
  init with --bn, train mode, 19 classes; each backbone in its own subprocess so its peak is its own.
- fada: source_only and fada, and fada's two parts: the generator step (source CE, target forward,
  adversarial backward, SGD step) and the discriminator step.
- cdga: source_only; cdga with its defaults (AdaptSegNet discriminator width 64, grouping net 256
  hidden); with the README's toy widths (--cdga-d-width 16 --cdga-group-hidden 64); the same with
  --cdga-d-mode separate (K discriminators).
- dida: source_only, daformer, dida released (clean teacher view: the bank terms alone), dida simmatch
  (photometric weak view) and dida simmatch with a clean weak view; daformer / source_only is the
  self-training cost (student on source and mixed images, EMA teacher on the target, FD network),
  dida / daformer the bank's.
- plca-association: forward + backward of the feature-level (cosine, with target aggregation) and the
  classifier-level (-KL) association of ONE source/target pair of N pixels each. N = 8,464 is a
  730x730 crop at stride 8 (92 x 92), D = 2048 DeepLab-v2's layer4.
- plca-toy: source_only with PLCA's source term (CE + Lovasz, head LR as PLCA's), source_only CE only,
  plca, and plca with both association weights 0: the association's share of a PLCA iteration.
- sdca-memory: one update of the class statistics with N pixels of D dims, K classes, each variant in
  a fresh subprocess: `ours` (uda.sdca.ClassStatistics: one-hot matrix products, O(N D + K D)) and
  `official` (the broadcast update of BIT-DA/SDCA core/utils/semantic_dist_estimator.py, several
  N x K x D tensors, at a smaller N by default: at N = 14,400 it needs several 2.24 GB buffers); and
  the two compared numerically (fp64, small input).
- sdca-speed: sec/iter of `train.py --method sdca` against source_only with SDCA's source term
  (--lovasz-weight 0.75) on the toy data, and of sdca --sdca-augment off (the jitter/blur's share):
  median over the logging windows of metrics.jsonl after the first; data loading included.
- png: the SYNTHIA label decoder (uda/png16.py) on a SYNTHIA-like 16-bit RGB label (class ids in
  polygons in channel 0, instance ids in channel 1) encoded with every PNG row filter forced (None,
  Sub, Up, Average, Paeth), a random mix and libpng's default heuristic; best CPU time of --repeat
  decodes against a budget of 0.2 s per 1280x760 label on one core.

Time. The method timings (fada, cdga, dida, plca-toy) and backbones share one loop, `time_in_turns`:
the configurations take turns step by step (A B A B ...) on the same batch, so a change in a shared
machine's load slows all alike; --warmup untimed turns, then the median over --steps turns of the
wall time (synchronised on CUDA) and of this process's CPU time. Ratios use the CPU time on CPU (other
jobs do not count; with one thread it is what the step costs alone) and the wall time on CUDA.
Batches are synthetic, a fresh one per turn: random images and blocky random labels (a random class
per cell of an 8x8 grid, nearest-upsampled, 10% of the cells 255), so ClassMix, banks and per-class
terms see realistic class layouts without any dataset.

Memory (backbones, plca-association, sdca-memory): the peak above the level right before the measured
work: CUDA torch.cuda.max_memory_allocated; CPU the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs). For a backbone that is activations and gradients, its weights excluded.

Methods are built through the contract of uda/source_only.py: `method_args` gives the flags
`train.py --method X` parses for a toy run, from uda/flags.py's defaults (tests/test_cost.py checks it
against flags.parse_args), `common.make_env` the env, `models.build_model` the network (random init).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from uda import common, datasets, models, plca, png16, sdca
from uda.bench import METHODS, toy
from uda.common import IGNORE_INDEX
from uda.flags import defaults as run_defaults

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPACE = datasets.TOY_SPACE  # 19 classes: the toy's, and Cityscapes'
LABEL_GRID = 8      # synthetic labels: a random class per cell of an 8x8 grid, upsampled
IGNORE_SHARE = 0.1  # share of grid cells labelled 255
AGG_ALPHA = 0.5     # PLCA's target aggregation weight alpha (its --plca-agg-alpha default, official 0.5)
PNG_BUDGET_S = 0.2  # the budget: at most 0.2 s per 1280x760 SYNTHIA label on one core


# --------------------------------------------------------------------------------------------------
# Building a method as train.py does, without train.py
# --------------------------------------------------------------------------------------------------
def method_args(method, flags=(), **common_values):
    """The args of `train.py --method METHOD --source toy-synth`, plus `flags` (the method's own, as
    typed on a command line) and `common_values` (common flags by dest, as Python values).

    Layered as train.py layers them (uda/flags.py): the defaults of a toy run of the method (its RECIPE
    less the real-data entries; an `iters` value ends the recipe's --stop-iter), then the values given.
    """
    module = METHODS[method]
    parser = common.ArgumentParser(prog=f"--method {method}")
    module.add_arguments(parser)
    try:
        own = vars(parser.parse_args(list(flags)))
    except common.UserError as err:
        raise common.UserError(f"--method {method}: {err}") from None
    defaults = run_defaults(method, "toy-synth", common_values.get("iters"))
    return argparse.Namespace(**{**defaults, **common_values, **own})


def build_method(method, opts, device, flags=(), **common_values):
    """(Method, env) on a fresh random-init network with the measurement's backbone, BN, batch, amp."""
    args = method_args(method, flags, backbone=opts.backbone, bn=opts.bn, batch_size=opts.batch_size,
                       amp=opts.amp, **common_values)
    torch.manual_seed(0)  # every configuration starts from the same network
    model = models.build_model(args.backbone, SPACE.num_classes, bn=args.bn).to(device).train()
    env = common.make_env(device, args.amp, SPACE)
    return METHODS[method].Method(model, args, env), env


def method_step(method, env):
    """One train.py iteration of `method` as a timing run: train_step, then the scaler update."""
    def run(step, batch):
        source, target = batch
        method.train_step(source, target if method.needs_target else None, step)
        env.scaler.update()
    return run


def synthetic_batches(opts, device):
    """step -> (source {'image', 'label'}, target {'image'}): random images, blocky random labels."""
    width, height = common.parse_size(opts.crop, "--crop")
    generator = torch.Generator().manual_seed(0)

    def batch(step):
        b = opts.batch_size
        images = torch.rand(b, 3, height, width, generator=generator)                   # (B, 3, H, W)
        grid = torch.randint(0, SPACE.num_classes, (b, 1, LABEL_GRID, LABEL_GRID), generator=generator)
        grid[torch.rand(grid.shape, generator=generator) < IGNORE_SHARE] = IGNORE_INDEX
        labels = F.interpolate(grid.float(), size=(height, width), mode="nearest").long()[:, 0]  # (B, H, W)
        target = torch.rand(b, 3, height, width, generator=generator)
        return {"image": images.to(device), "label": labels.to(device)}, {"image": target.to(device)}
    return batch


# --------------------------------------------------------------------------------------------------
# Time and memory
# --------------------------------------------------------------------------------------------------
def clock(device):
    """(wall, process CPU) seconds, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def time_in_turns(runs, steps, warmup, device, batches=lambda step: None):
    """{name: (median wall s, median CPU s) per step}; runs = {name: fn(step, batch)}, called in turns
    (every run once per turn, on the turn's batch), `warmup` untimed turns first."""
    samples = {name: [] for name in runs}
    for step in range(warmup + steps):
        batch = batches(step)
        for name, run in runs.items():
            wall, cpu = clock(device)
            run(step, batch)
            end_wall, end_cpu = clock(device)
            if step >= warmup:
                samples[name].append((end_wall - wall, end_cpu - cpu))
    return {name: tuple(statistics.median(column) for column in zip(*rows)) for name, rows in samples.items()}


def reference_time(times, device):
    """The figure ratios are taken on: CPU time on CPU (the machine may be shared), wall time on CUDA."""
    wall, cpu = times
    return cpu if device.type == "cpu" else wall


def print_times(times, device, header):
    """Markdown table of ms per step, with the ratio of each row to the first."""
    base = reference_time(next(iter(times.values())), device)
    print(header)
    print(f"| configuration | wall ms/step | CPU ms/step | x {next(iter(times))} |")
    print("|---|---|---|---|")
    for name, (wall, cpu) in times.items():
        print(f"| {name} | {1000 * wall:.1f} | {1000 * cpu:.1f} | {reference_time((wall, cpu), device) / base:.2f} |",
              flush=True)


def timing_header(opts, device):
    return (f"{opts.backbone}, batch {opts.batch_size} per domain, crop {opts.crop}, {device}, amp {opts.amp}, "
            f"{torch.get_num_threads()} thread(s), median of {opts.steps} turns after {opts.warmup}")


def vm_hwm_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def start_peak(device):
    """Start a peak-memory measurement; returns a function giving the peak MiB above the level now."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        return lambda: (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak resident set (VmHWM) to the current one
    base = vm_hwm_kib()
    return lambda: (vm_hwm_kib() - base) / 1024


def run_json(cmd):
    """Run a child python (this repository, current environment); its last stdout line, parsed as JSON."""
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise common.UserError(f"{' '.join(cmd[1:4])}: failed: "
                               f"{(proc.stderr.strip().splitlines() or [proc.returncode])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# backbones
# --------------------------------------------------------------------------------------------------
def backbone_step(opts, device):
    """In the child process: one backbone's step time and peak memory, as a dict."""
    model = models.build_model(opts.single, SPACE.num_classes, bn=opts.bn).to(device).train()
    (source, _) = synthetic_batches(opts, device)(0)
    images, labels = source["image"], source["label"]

    def step(i, batch):
        with common.autocast(device, opts.amp):
            _, logits = model(images)
        logits = common.upsample(logits.float(), labels.shape[-2:], False)
        F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX).backward()
        model.zero_grad(set_to_none=False)  # keep the gradient buffers: they are part of a real step's memory

    peak = start_peak(device)
    wall, cpu = time_in_turns({opts.single: step}, opts.steps, opts.warmup, device)[opts.single]
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"backbone": opts.single, "bn": model.bn_mode, "params_m": params / 1e6, "sec_per_step": wall,
            "cpu_sec_per_step": cpu, "peak_mb": peak()}


def measure_backbones(opts):
    device = common.resolve_device(opts.device)
    if opts.single:
        print(json.dumps(backbone_step(opts, device)))
        return
    names = [b for b in opts.backbones.split(",") if b]
    unknown = [b for b in names if b not in models.BACKBONES]
    if unknown:
        raise common.UserError(f"--backbones: unknown {unknown} (expected names from {', '.join(models.BACKBONES)})")
    print(f"crop {opts.crop}, batch {opts.batch_size}, {device}, amp {opts.amp}, threads "
          f"{opts.threads or torch.get_num_threads()}, median of {opts.steps} steps after {opts.warmup}")
    print("| backbone | BN | trainable params (M) | fwd+bwd wall s/step | process CPU s/step | peak MB above weights |")
    print("|---|---|---|---|---|---|")
    for name in names:
        cmd = [sys.executable, "-m", "uda.bench.cost", "--what", "backbones", "--single", name, "--crop", opts.crop,
               "--batch-size", str(opts.batch_size), "--device", opts.device, "--amp", opts.amp, "--bn", opts.bn,
               "--steps", str(opts.steps), "--warmup", str(opts.warmup)]
        cmd += ["--threads", str(opts.threads)] if opts.threads else []
        try:
            r = run_json(cmd)
        except common.UserError as err:
            print(f"| {name} | {err} |")
            continue
        print(f"| {r['backbone']} | {r['bn']} | {r['params_m']:.1f} | {r['sec_per_step']:.3f} | "
              f"{r['cpu_sec_per_step']:.3f} | {r['peak_mb']:.0f} |", flush=True)


# --------------------------------------------------------------------------------------------------
# Method iterations against source_only: fada, cdga, dida, plca-toy
# --------------------------------------------------------------------------------------------------
def time_configurations(configs, opts, device):
    """configs = {name: (method, its flags, common values)} -> {name: (wall, CPU)}, timed in turns."""
    runs = {name: method_step(*build_method(method, opts, device, flags, **values))
            for name, (method, flags, values) in configs.items()}
    return time_in_turns(runs, opts.steps, opts.warmup, device, synthetic_batches(opts, device))


def measure_fada(opts):
    device = common.resolve_device(opts.device)
    source_only, source_env = build_method("source_only", opts, device)
    fada, fada_env = build_method("fada", opts, device)
    held = {}

    def generator(step, batch):
        held["for_d"] = fada.generator_step(*batch)[:4]  # detached features and encodings for D

    def discriminator(step, batch):
        fada.discriminator_step(*held.pop("for_d"))
        fada_env.scaler.update()

    times = time_in_turns({"source_only": method_step(source_only, source_env), "fada generator step": generator,
                           "fada discriminator step": discriminator},
                          opts.steps, opts.warmup, device, synthetic_batches(opts, device))
    parts = [times["fada generator step"], times["fada discriminator step"]]
    times = {"source_only": times["source_only"], "fada": tuple(map(sum, zip(*parts))),
             "fada generator step": parts[0], "fada discriminator step": parts[1]}
    print_times(times, device, timing_header(opts, device) + " (fada = the sum of its two parts' medians)")


def measure_cdga(opts):
    device = common.resolve_device(opts.device)
    toy_widths = ["--cdga-d-width", "16", "--cdga-group-hidden", "64"]
    configs = {"source_only": ("source_only", [], {}), "cdga (defaults)": ("cdga", [], {}),
               "cdga (toy widths)": ("cdga", toy_widths, {}),
               "cdga (toy widths, separate D)": ("cdga", toy_widths + ["--cdga-d-mode", "separate"], {})}
    print_times(time_configurations(configs, opts, device), device, timing_header(opts, device))


def measure_dida(opts):
    device = common.resolve_device(opts.device)
    configs = {"source_only": ("source_only", [], {}), "daformer": ("daformer", [], {}),
               "dida released": ("dida", ["--dida-mode", "released"], {}),
               "dida simmatch": ("dida", ["--dida-mode", "simmatch"], {}),
               "dida simmatch, clean weak view": ("dida", ["--dida-mode", "simmatch", "--dida-weak-view", "clean"], {})}
    times = time_configurations(configs, opts, device)
    print_times(times, device, timing_header(opts, device))
    base, da = (reference_time(times[name], device) for name in ("source_only", "daformer"))
    print(f"daformer / source_only: {da / base:.2f}x")
    for name in configs:
        if name.startswith("dida"):
            ratio = reference_time(times[name], device) / da
            print(f"{name} / daformer: {ratio:.3f}x ({100 * (ratio - 1):+.1f}%)")


def measure_plca_toy(opts):
    device = common.resolve_device(opts.device)
    plca_args = method_args("plca")
    source_term = {"lovasz_weight": plca_args.lovasz_weight, "head_lr_mult": plca_args.head_lr_mult}
    configs = {"source_only": ("source_only", [], source_term),
               "source_only, CE only": ("source_only", [], dict(source_term, lovasz_weight=0.0)),
               "plca": ("plca", [], {}),
               "plca without association": ("plca", ["--plca-lambda-fass", "0", "--plca-lambda-cass", "0"], {})}
    times = time_configurations(configs, opts, device)
    print_times(times, device, timing_header(opts, device) + f"; source_only: PLCA's source term "
                f"(CE + {plca_args.lovasz_weight} Lovasz) unless CE only")
    plca_time, without = (reference_time(times[name], device) for name in ("plca", "plca without association"))
    print(f"association share of a PLCA iteration: {100 * (plca_time - without) / plca_time:.0f}%")


# --------------------------------------------------------------------------------------------------
# plca-association
# --------------------------------------------------------------------------------------------------
def associate(feat_s, feat_t, logits_s, logits_t, labels, chunk):
    """Forward and backward of both association losses of a batch of pairs; returns (fass, cass)."""
    fass = plca.association_loss(lambda u, v, y: plca.feature_association(u, v, y, AGG_ALPHA, chunk),
                                 feat_s, feat_t, labels)
    cass = plca.association_loss(lambda p, q, y: plca.classifier_association(p, q, y, AGG_ALPHA, chunk),
                                 torch.softmax(logits_s, 1), torch.softmax(logits_t, 1), labels)
    (fass + cass).backward()
    return fass, cass


def measure_plca_association(opts):
    device = common.resolve_device(opts.device)
    g = torch.Generator().manual_seed(0)
    h = int(round(opts.pixels ** 0.5))
    w = opts.pixels // h
    feat_s = torch.rand(1, opts.dim, h, w, generator=g).to(device).requires_grad_(True)       # (1, D, h, w)
    feat_t = torch.rand(1, opts.dim, h, w, generator=g).to(device).requires_grad_(True)
    logits_s = torch.randn(1, opts.classes, h, w, generator=g).to(device).requires_grad_(True)  # (1, C, h, w)
    logits_t = torch.randn(1, opts.classes, h, w, generator=g).to(device).requires_grad_(True)
    labels = torch.randint(0, opts.classes, (1, h, w), generator=g).to(device)                  # (1, h, w)
    corner = (..., slice(0, 4), slice(0, 4))  # warm-up on 4x4 pixels: first-call costs (imports, kernels)
    associate(feat_s[corner], feat_t[corner], logits_s[corner], logits_t[corner], labels[corner], min(opts.chunk, 5))
    peak = start_peak(device)
    wall, _ = clock(device)
    fass, cass = associate(feat_s, feat_t, logits_s, logits_t, labels, opts.chunk)
    seconds = clock(device)[0] - wall
    n = h * w
    print(f"association of one pair: N = {n} ({h}x{w}) pixels per image, D = {opts.dim}, C = {opts.classes}, "
          f"chunk {opts.chunk or 'off'}, {device}, {torch.get_num_threads()} thread(s)")
    print(f"  fass {fass.item():.4f}  cass {cass.item():.4f}")
    print(f"  forward + backward {seconds:.1f} s; peak memory above the inputs {peak():.0f} MiB "
          f"(one N x N fp32 matrix = {n * n * 4 / 2 ** 20:.0f} MiB)")


# --------------------------------------------------------------------------------------------------
# sdca-memory, sdca-speed
# --------------------------------------------------------------------------------------------------
def official_update(mean, var, count, features, labels):
    """The official estimator's update (N x K x D broadcasts), kept here only to measure it."""
    valid = labels != IGNORE_INDEX
    labels, features = labels[valid], features[valid]
    n, d = features.shape
    k = mean.shape[0]
    feats = features.view(n, 1, d).expand(n, k, d)
    onehot = torch.zeros(n, k, device=features.device, dtype=features.dtype).scatter_(1, labels.view(-1, 1), 1)
    onehot_nkd = onehot.view(n, k, 1).expand(n, k, d)
    by_class = feats.mul(onehot_nkd)                                            # (N, K, D)
    amount = onehot_nkd.sum(0)
    amount[amount == 0] = 1
    batch_mean = by_class.sum(0) / amount                                       # (K, D)
    batch_var = (by_class - batch_mean.expand(n, k, d).mul(onehot_nkd)).pow(2).sum(0).div(amount)
    pixels = onehot.sum(0).view(k, 1).expand(k, d)
    w = pixels.div(pixels + count.view(k, 1).expand(k, d))
    w[w != w] = 0
    var = var.mul(1 - w) + batch_var.mul(w) + w.mul(1 - w).mul((mean - batch_mean).pow(2))
    return mean.mul(1 - w) + batch_mean.mul(w), var, count + onehot.sum(0)


def statistics_update(variant, n, k, d, device):
    """In a child process: one update of N pixels into non-empty statistics; peak extra MiB and seconds."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(n, d, generator=g).to(device)
    labels = torch.randint(0, k, (n,), generator=g).to(device)
    stats = sdca.ClassStatistics(k, d).to(device)
    stats.update(features[: n // 2], labels[: n // 2])  # a non-empty state to merge into
    peak = start_peak(device)
    wall, _ = clock(device)
    if variant == "ours":
        stats.update(features, labels)
    else:
        official_update(stats.mean, stats.var, stats.count.float(), features, labels)
    seconds = clock(device)[0] - wall
    return {"variant": variant, "N": n, "K": k, "D": d, "peak_extra_MiB": round(peak(), 1),
            "seconds": round(seconds, 3), "device": str(device)}


def max_difference(n, k, d):
    """Max abs difference between our update and the official one over 3 updates (fp64)."""
    g = torch.Generator().manual_seed(1)
    ours = sdca.ClassStatistics(k, d).double()
    mean, var, count = torch.zeros(k, d).double(), torch.zeros(k, d).double(), torch.zeros(k).double()
    for _ in range(3):
        x = torch.randn(n, d, generator=g).double() + 1
        y = torch.randint(0, k - 1, (n,), generator=g)  # the last class stays empty
        ours.update(x, y)
        mean, var, count = official_update(mean, var, count, x, y)
    return max((ours.mean - mean).abs().max().item(), (ours.var - var).abs().max().item())


def measure_sdca_memory(opts):
    rows = []
    for variant, n in (("ours", opts.n), ("official", opts.official_n), ("ours", opts.official_n)):
        code = (f"import json; from uda.bench.cost import statistics_update; "
                f"print(json.dumps(statistics_update({variant!r}, {n}, {opts.k}, {opts.d}, {opts.device!r})))")
        rows.append(run_json([sys.executable, "-c", code]))
    print("| variant | N | K | D | peak extra MiB | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['N']} | {r['K']} | {r['D']} | {r['peak_extra_MiB']:.1f} | {r['seconds']:.3f} |")
    print(f"one N x D fp32 tensor at N={opts.n}: {opts.n * opts.d * 4 / 2 ** 20:.1f} MiB; one N x K x D tensor at "
          f"N={opts.official_n}: {opts.official_n * opts.k * opts.d * 4 / 2 ** 20:.1f} MiB "
          f"(at N={opts.n}: {opts.n * opts.k * opts.d * 4 / 2 ** 20:.0f} MiB)")
    print(f"max |ours - official| over 3 updates (fp64, N=500, K=5, D=16): {max_difference(500, 5, 16):.2e}")


def measure_sdca_speed(opts):
    runs = {"source_only": ["--method", "source_only", "--lovasz-weight", "0.75"],  # SDCA's source term
            "sdca": ["--method", "sdca"], "sdca (augment off)": ["--method", "sdca", "--sdca-augment", "off"]}
    flags = ["--source", "toy-synth", "--iters", str(opts.iters), "--stop-iter", str(opts.iters),
             "--batch-size", str(opts.batch_size), "--lr", "0.01", "--eval-every", "0",
             "--log-every", str(opts.log_every), "--workers", "0", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, run_flags) in enumerate(runs.items()):
            out = os.path.join(tmp, str(i))
            # the toy benchmark's protocol: the method's TOY_FLAGS (SDCA: uniform source sampling)
            cmd = [sys.executable, os.path.join(REPO, "train.py"), *run_flags, *flags, "--out", out]
            cmd += getattr(METHODS[run_flags[1]], "TOY_FLAGS", [])
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise common.UserError(f"train.py {' '.join(run_flags)}: failed: "
                                       f"{(proc.stderr.strip().splitlines() or [proc.returncode])[-1]}")
            times[name] = toy.sec_per_iter(os.path.join(out, "metrics.jsonl"))
    print(f"toy, tiny backbone, batch {opts.batch_size} (+{opts.batch_size} target for sdca), {opts.iters} "
          f"iterations, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, median of the logging windows after the first")
    print("| run | ms/iter | x source_only |")
    print("|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {1000 * seconds:.1f} | {seconds / times['source_only']:.2f} |")


# --------------------------------------------------------------------------------------------------
# png
# --------------------------------------------------------------------------------------------------
def synthia_like(width, height, seed=0):
    """(H, W, 3) uint16: channel 0 class ids 0..22 in polygons, channel 1 instance ids, channel 2 zero."""
    rng = np.random.default_rng(seed)
    ids = Image.new("L", (width, height), 1)  # sky
    draw = ImageDraw.Draw(ids)
    draw.rectangle((0, height // 2, width, height), fill=3)  # road
    for _ in range(120):
        x, y = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(5, width // 6), rng.integers(5, height // 4)
        draw.polygon([(x, y), (x + w, y + rng.integers(-20, 20)), (x + w, y + h), (x, y + h)],
                     fill=int(rng.integers(0, 23)))
    classes = np.asarray(ids, dtype=np.uint16)
    instances = np.where(np.isin(classes, [8, 10, 19]), rng.integers(1, 400, size=classes.shape), 0)
    return np.stack([classes, instances.astype(np.uint16), np.zeros_like(classes)], axis=-1)


def heuristic_filters(array):
    """libpng's default choice: per row the filter with the smallest sum of |signed filtered byte|."""
    sums = []
    for kind in range(5):
        rows = png16.filter_rows(array, kind)[:, 1:].astype(np.int16)  # (H, W * bpp)
        sums.append(np.abs(np.where(rows > 127, rows - 256, rows)).sum(axis=1))  # (H,)
    return list(np.argmin(np.stack(sums), axis=0))  # (H,)


def measure_png(opts):
    width, height = common.parse_size(opts.size, "--size")
    label = synthia_like(width, height)
    rng = np.random.default_rng(1)
    cases = {"none": 0, "sub": 1, "up": 2, "average": 3, "paeth": 4,
             "random mix": list(rng.integers(0, 5, size=height)), "libpng heuristic": heuristic_filters(label)}
    print(f"SYNTHIA-like label {width}x{height}, 16-bit RGB; best of {opts.repeat} decodes, CPU seconds")
    print("| filters | CPU s | file MiB |")
    print("|---|---|---|")
    worst = 0.0
    for name, filters in cases.items():
        data = png16.encode_png(label, filters)
        best = float("inf")
        for _ in range(opts.repeat):
            start = time.process_time()
            decoded = png16.decode_png(data)
            best = min(best, time.process_time() - start)
        assert np.array_equal(decoded, label), f"{name}: decoded image differs"
        worst = max(worst, best)
        print(f"| {name} | {best:.3f} | {len(data) / 2 ** 20:.2f} |")
    verdict = "within" if worst <= PNG_BUDGET_S else "OVER"
    print(f"slowest {worst:.3f} s: {verdict} the {PNG_BUDGET_S} s budget")


# --------------------------------------------------------------------------------------------------
# Command line: --what, then the options of that measurement
# --------------------------------------------------------------------------------------------------
def timing_options(g, batch_size, steps, warmup, device="cpu", threads=None, crop="128x64", backbone=True):
    if backbone:
        g.add_argument("--backbone", default="tiny", help="network of every configuration (tiny: the toy's)")
    g.add_argument("--crop", default=crop, help="WxH of the source and target images")
    g.add_argument("--batch-size", type=common.positive_int, default=batch_size, help="images per domain per step")
    g.add_argument("--bn", choices=models.BN_MODES, default="auto", help="BatchNorm mode of every network")
    g.add_argument("--steps", type=common.positive_int, default=steps, help="timed turns (the median is reported)")
    g.add_argument("--warmup", type=common.nonnegative_int, default=warmup, help="untimed turns first")
    g.add_argument("--amp", choices=list(common.AMP_DTYPES), default="off", help="autocast dtype")
    g.add_argument("--device", default=device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--threads", type=common.positive_int, default=threads,
                   help="torch CPU threads (None: torch's choice, which follows OMP_NUM_THREADS)")


def backbone_options(g):
    timing_options(g, batch_size=1, steps=3, warmup=1, crop="256x256", backbone=False)
    g.add_argument("--backbones", default=",".join(models.BACKBONES), help="comma-separated --backbone names")
    g.add_argument("--single", default=None, help=argparse.SUPPRESS)  # internal: one backbone, JSON out


def plca_association_options(g):
    g.add_argument("--pixels", type=common.positive_int, default=8464,
                   help="pixels per image N (92 x 92 for a 730 crop at stride 8)")
    g.add_argument("--dim", type=common.positive_int, default=2048, help="feature dimension D (ResNet-101 layer4)")
    g.add_argument("--classes", type=common.positive_int, default=19, help="number of classes C")
    g.add_argument("--chunk", type=common.nonnegative_int, default=0,
                   help="--plca-chunk (rows per block; 0 = all at once)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--threads", type=common.positive_int, default=None, help="torch CPU threads")


def sdca_memory_options(g):
    g.add_argument("--n", type=common.positive_int, default=14400, help="pixels per update (1280x720 at stride 8)")
    g.add_argument("--k", type=common.positive_int, default=19, help="classes")
    g.add_argument("--d", type=common.positive_int, default=2048, help="feature dims (ResNet-101 layer4)")
    g.add_argument("--official-n", type=common.positive_int, default=1440,
                   help="pixels for the official N x K x D update")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def sdca_speed_options(g):
    g.add_argument("--iters", type=common.positive_int, default=100, help="train.py iterations per run")
    g.add_argument("--batch-size", type=common.positive_int, default=4, help="images per domain")
    g.add_argument("--log-every", type=common.positive_int, default=20, help="logging window (the first is dropped)")


def png_options(g):
    g.add_argument("--size", default="1280x760", help="label size WxH (SYNTHIA: 1280x760)")
    g.add_argument("--repeat", type=common.positive_int, default=5, help="decodes per case; the best CPU time counts")


# --what -> (its options, its measurement)
MEASUREMENTS = {
    "backbones": (backbone_options, measure_backbones),
    "fada": (lambda g: timing_options(g, batch_size=4, steps=20, warmup=1, device="auto", threads=1), measure_fada),
    "cdga": (lambda g: timing_options(g, batch_size=4, steps=20, warmup=3), measure_cdga),
    "dida": (lambda g: timing_options(g, batch_size=2, steps=20, warmup=3, device="auto"), measure_dida),
    "plca-association": (plca_association_options, measure_plca_association),
    "plca-toy": (lambda g: timing_options(g, batch_size=4, steps=30, warmup=2), measure_plca_toy),
    "sdca-memory": (sdca_memory_options, measure_sdca_memory),
    "sdca-speed": (sdca_speed_options, measure_sdca_speed),
    "png": (png_options, measure_png),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default after its help."""


def parse_args(argv=None):
    first = common.ArgumentParser(add_help=False)
    first.add_argument("--what", choices=list(MEASUREMENTS))
    known, _ = first.parse_known_args(argv)
    p = common.ArgumentParser(prog="python -m uda.bench.cost", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--what", required=True, choices=list(MEASUREMENTS),
                   help="what to measure; `--what X --help` lists X's options")
    if known.what:
        MEASUREMENTS[known.what][0](p.add_argument_group(f"--what {known.what}"))
    return p.parse_args(argv)


def main(argv=None):
    opts = parse_args(argv)
    if getattr(opts, "threads", None):
        torch.set_num_threads(opts.threads)
    MEASUREMENTS[opts.what][1](opts)


if __name__ == "__main__":
    common.run_cli(main)
