"""Train a segmentation model with one of the domain-adaptation methods in uda/.

    python train.py --method source_only --source toy-synth --out runs/toy-src
    torchrun --nproc_per_node=8 train.py --method fada --source gta5 --data-root /data --out runs/fada

One plain loop. This file owns argparse, seeding, the process group (from the torchrun environment),
data loaders, the LR schedule, mixed precision, logging, periodic evaluation and checkpoints. A method
file (uda/<method>.py) owns its extra modules, optimizers, losses and the order of backward/step inside
one iteration (`train_step`); the contract between the two is written once, in uda/source_only.py.

Flags are parsed in two stages: --method first, then the common flags together with the chosen
method's own. The method's RECIPE (its paper's values of common flags: LR, schedule, batch, crop, ...)
becomes the parser's defaults in one place (`build_parser`), so `--method X --help` shows them, a flag
given on the command line wins, and every run prints the effective recipe and what was overridden.
"""
import argparse
import json
import math
import os
import shlex
import signal
import sys
import time
import torch

from uda import common, datasets, evaluation, models, samplers, toy
from uda.common import UserError
from uda.methods import METHODS


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------
def add_common_arguments(p):
    p.add_argument("--method", default="source_only", choices=list(METHODS), help="training method")
    p.add_argument("--source", default="toy-synth", choices=datasets.DATASET_NAMES, help="labelled source dataset")
    p.add_argument("--target", default=None, choices=datasets.DATASET_NAMES,
                   help="unlabelled target dataset (default: cityscapes for gta5/synthia, toy-real for toy-synth)")
    p.add_argument("--data-root", default=None, help="folder holding one sub-folder per dataset (DIR/gta5, ...)")
    p.add_argument("--backbone", default=None, choices=list(models.BACKBONES),
                   help="network (default: tiny for the toy datasets, deeplabv2-r101 otherwise)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute backbone activations in the backward pass (less memory, ~1 extra forward)")
    p.add_argument("--pretrained", default=None, metavar="FILE", help="initial weights, loaded by key name")
    p.add_argument("--bn", choices=list(models.BN_MODES), default="auto",
               help="BatchNorm: frozen (fixed statistics and affine), train (SyncBN under DDP on GPU), "
                    "auto = frozen for deeplabv2-*, train for tiny and mit-*")
    p.add_argument("--iters", type=common.positive_int, default=2000, help="length of the poly LR schedule (MAX_ITER)")
    p.add_argument("--stop-iter", type=common.positive_int, default=None,
                   help="stop training at this iteration although the schedule runs to --iters "
                        "(the FADA/ADVENT convention; default: --iters)")
    p.add_argument("--batch-size", type=common.positive_int, default=4, help="images per domain per process")
    p.add_argument("--lr", type=common.positive_float, default=2.5e-4, help="backbone learning rate (the head's is x --head-lr-mult)")
    p.add_argument("--crop", default=None,
                   help="training crop WxH (default: the toy's 128x64; the papers' sizes for real data)")
    p.add_argument("--head-lr-mult", type=common.positive_float, default=10.0, help="LR multiplier of the classifier head")
    p.add_argument("--momentum", type=common.nonnegative_float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=common.nonnegative_float, default=5e-4, help="weight decay")
    p.add_argument("--poly-power", type=common.nonnegative_float, default=0.9, help="power of the poly LR decay")
    p.add_argument("--warmup-iters", type=common.nonnegative_int, default=0, help="linear LR warmup length (DAFormer: 1500)")
    p.add_argument("--lovasz-weight", type=common.nonnegative_float, default=0.0,
                   help="weight of the Lovasz-softmax term added to the source CE (0 = CE only)")
    p.add_argument("--align-corners", action=argparse.BooleanOptionalAction, default=False,
                   help="align_corners of the bilinear logit upsampling in losses, pseudo-labels and evaluation "
                        "(the method's official code decides; saved in the checkpoint, used by evaluate.py)")
    p.add_argument("--amp", choices=list(common.AMP_DTYPES), default="off",
                   help="autocast dtype: off (fp32), bf16, or fp16 (with a GradScaler)")
    p.add_argument("--seed", type=int, default=0, help="random seed (data order, augmentation, init)")
    p.add_argument("--out", required=True, help="output folder for last.pt and metrics.jsonl")
    p.add_argument("--resume", default=None, metavar="FILE",
                   help="continue exactly from this checkpoint; 'auto': from OUT/last.pt when it exists, else "
                        "start fresh (a preemptible job can be resubmitted unchanged)")
    p.add_argument("--eval-every", type=common.nonnegative_int, default=1000,
                   help="evaluate on the target val split and save OUT/last.pt every N iterations (0: at the end only)")
    p.add_argument("--no-eval", action="store_true",
                   help="save checkpoints on the --eval-every schedule but never evaluate (evaluate.py runs later)")
    p.add_argument("--log-every", type=common.positive_int, default=50, help="print and log losses every N iterations")
    p.add_argument("--workers", type=common.nonnegative_int, default=2, help="data loader worker processes per domain")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun: one GPU per process)")
    # data (uda/datasets.py, uda/samplers.py)
    p.add_argument("--source-root", default=None, metavar="DIR", help="the source dataset's folder (default: DATA_ROOT/<source>)")
    p.add_argument("--target-root", default=None, metavar="DIR", help="the target dataset's folder (default: DATA_ROOT/<target>)")
    p.add_argument("--synthia-classes", type=int, choices=[16, 19], default=16,
                   help="SYNTHIA label space: 16 classes (FADA/SDCA) or 19 trainIds (DAFormer/DIDA); mIoU16 and mIoU13 either way")
    p.add_argument("--source-size", default=None,
                   help="training resize WxH of source images before the crop, or 'native' (default: GTA5 1280x720, "
                        "SYNTHIA 1280x760, Cityscapes 1024x512; native with --pseudo-dir)")
    p.add_argument("--target-size", default=None, help="training resize WxH of target images (default: Cityscapes 1024x512)")
    p.add_argument("--random-scale", type=common.positive_float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="real datasets: multiply the --source-size/--target-size resize by s ~ U(MIN, MAX) before the "
                        "crop, both domains (PLCA: short side 760-988 = --random-scale 1.0 1.3 on a 760 short side)")
    p.add_argument("--cat-max-ratio", type=common.positive_float, default=1.0,
                   help="re-draw a source crop (up to 10 times) while one class covers this share of it (DAFormer: 0.75; 1: off)")
    p.add_argument("--source-sampler", choices=["uniform", "class-balanced", "rcs"], default="uniform",
                   help="source images: uniform, class-balanced (FADA/SDCA) or rcs (DAFormer rare class sampling)")
    p.add_argument("--rcs-temperature", type=common.positive_float, default=0.01, help="RCS: P(c) = softmax((1 - f_c) / T) (DAFormer 0.01)")
    p.add_argument("--rcs-min-pixels", type=common.nonnegative_int, default=3000, help="RCS: images with more pixels of c than this (DAFormer 3000)")
    p.add_argument("--rcs-min-crop-ratio", type=common.nonnegative_float, default=0.5,
                   help="RCS: re-crop until the crop holds more than ratio x min-pixels of c (DAFormer 0.5)")
    p.add_argument("--stats-cache", default=None, metavar="FILE",
                   help="per-image class statistics for the samplers (default: OUT/../class_stats_<source>_<key>.json)")
    p.add_argument("--source-list", default=None, metavar="FILE",
                   help="train on the listed source items only (one relative path per line, as data_lists/)")
    p.add_argument("--target-list", default=None, metavar="FILE",
                   help="train on the listed target items only (one relative path per line, as data_lists/)")
    p.add_argument("--pseudo-dir", default=None, metavar="DIR",
                   help="train on pseudo-labels: DIR/<item>.png replace the source train labels (evaluate.py --save-pseudo)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's (effective) default after its help."""


# Recipe values that describe the papers' real datasets and networks (sizes, backbone, its BN mode):
# the built-in toy has its own sizes and tiny network, so there they apply only when given explicitly.
REAL_DATA_KEYS = ("backbone", "bn", "crop", "source_size", "target_size", "random_scale")
_UNSET = object()


def build_parser(method):
    """The full parser of a run with --method `method`: common flags, the method's flags, its RECIPE."""
    p = common.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_arguments(p)
    module = METHODS[method]
    module.add_arguments(p)
    unknown = set(module.RECIPE) - set(vars(p.parse_args(["--out", "-"])))
    assert not unknown, f"uda/{method}.py RECIPE names no flag: {sorted(unknown)}"
    p.set_defaults(**module.RECIPE)  # the one place a method's recipe enters the run
    return p


def parse_args(argv=None):
    """Two stages: --method decides which method flags exist, then everything is parsed together.

    Returns the args with two extra attributes: `recipe` (the method's RECIPE as it applies to this
    run) and `overridden` (the names of recipe flags given on the command line).
    """
    first = common.ArgumentParser(add_help=False)
    first.add_argument("--method", default="source_only")
    known, _ = first.parse_known_args(argv)
    if known.method not in METHODS:
        raise UserError(f"--method {known.method!r}: unknown (expected one of {', '.join(METHODS)})")
    args = build_parser(known.method).parse_args(argv)
    explicit = explicit_flags(known.method, argv)
    recipe = dict(METHODS[known.method].RECIPE)
    if args.source in toy.DOMAINS:
        for key in REAL_DATA_KEYS:
            if key in recipe and key not in explicit:
                setattr(args, key, common_defaults()[key])
                recipe.pop(key)
    if "iters" in explicit and "stop_iter" not in explicit and "stop_iter" in recipe:
        # a shorter --iters is a shorter schedule: stop at its end unless --stop-iter says otherwise
        args.stop_iter = None
        recipe.pop("stop_iter")
    args.recipe = recipe
    args.overridden = sorted(k for k in recipe if k in explicit)
    args.target = args.target or datasets.default_target(args.source)
    args.backbone = args.backbone or ("tiny" if args.source in toy.DOMAINS else "deeplabv2-r101")
    args.stop_iter = args.stop_iter or args.iters
    if args.stop_iter > args.iters:
        raise UserError(f"--stop-iter {args.stop_iter}: must not exceed --iters {args.iters}")
    return args


def common_defaults():
    """The common flags' own defaults, before any recipe."""
    p = common.ArgumentParser()
    add_common_arguments(p)
    return vars(p.parse_args(["--out", "-"]))


def explicit_flags(method, argv):
    """Names of the flags given on the command line: parse again with every default set to a marker."""
    p = build_parser(method)
    p.set_defaults(**{name: _UNSET for name in vars(p.parse_args(["--out", "-"]))})
    return {name for name, value in vars(p.parse_args(argv)).items() if value is not _UNSET}


def describe_recipe(args):
    """One line: the method's recipe as this run uses it, and what the command line changed."""
    values = ", ".join(f"{k} {getattr(args, k)}" for k in args.recipe) or "the common defaults"
    line = f"recipe of {args.method}: {values}"
    if args.overridden:
        line += "; overridden on the command line: " + ", ".join(
            f"{k} {getattr(args, k)} (recipe {args.recipe[k]})" for k in args.overridden)
    return line


# --------------------------------------------------------------------------------------------------
# Data: an endless, resumable, rank-sharded stream of batches
# --------------------------------------------------------------------------------------------------
class InfiniteSampler(torch.utils.data.Sampler):
    """Yields (index, draw) forever: a fresh seeded permutation per epoch, sharded over ranks.

    Everything is a function of (seed, draw number), so starting at `start_draw` reproduces exactly
    the stream an uninterrupted run would see from there (resume), and every rank draws distinct items.
    """

    def __init__(self, length, seed, start_draw=0):
        self.length, self.seed, self.start_draw = length, seed, start_draw
        self.rank, self.world = common.rank(), common.world_size()

    def __iter__(self):
        draw = self.start_draw  # this rank's draw counter
        while True:
            epoch, offset = divmod(draw * self.world + self.rank, self.length)
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            yield int(order[offset]), draw * self.world + self.rank
            draw += 1


def make_stream(dataset, batch_size, workers, seed, start_iter, sampler=None):
    sampler = sampler or InfiniteSampler(len(dataset), seed, start_draw=start_iter * batch_size)
    # a private generator: building the loader leaves the global RNG (model init, methods) untouched
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(seed),
                                         worker_init_fn=ignore_stop_signals if workers else None)
    return iter(loader)


def ignore_stop_signals(worker_id):
    """Loader workers leave Ctrl-C (sent to the whole terminal process group) to the main process, which
    finishes the iteration and saves; a worker killed by it would break the next batch. SIGTERM stays
    deadly: it is how the loader and Python's exit stop workers (a scheduler that sends it to every
    process is handled in the loop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def build_data(args, space, start_iter):
    """The training streams and the labelled target val split (None with --no-eval or when the target
    has no labels)."""
    crop = common.parse_size(args.crop, "--crop") if args.crop else datasets.default_crop(args.source)
    source_root = datasets.dataset_root(args.source, args.data_root, args.source_root)
    target_root = datasets.dataset_root(args.target, args.data_root, args.target_root)
    source = datasets.build_dataset(args.source, "train", space, root=source_root, labeled=True, crop=crop,
                                    augment=True, seed=args.seed, **datasets.train_options(args, "source"))
    sampler = samplers.build_source_sampler(args, source, space, start_draw=start_iter * args.batch_size)
    streams = {"source": make_stream(source, args.batch_size, args.workers, args.seed, start_iter, sampler)}
    if METHODS[args.method].Method.needs_target:
        target = datasets.build_dataset(args.target, "train", space, root=target_root, labeled=False, crop=crop,
                                        augment=True, seed=args.seed + 1, **datasets.train_options(args, "target"))
        streams["target"] = make_stream(target, args.batch_size, args.workers, args.seed + 1, start_iter)
    if args.no_eval or not datasets.has_labels(args.target, "val", target_root):
        return streams, None
    val = datasets.build_dataset(args.target, "val", space, root=target_root, labeled=True)
    # build_dataset has checked that every val file exists: a missing one fails now, not after training
    return streams, val


# --------------------------------------------------------------------------------------------------
# Model, checkpoints
# --------------------------------------------------------------------------------------------------
def build_model(args, space, device):
    model = models.build_model(args.backbone, space.num_classes, bn=args.bn, grad_checkpoint=args.grad_checkpoint)
    if args.pretrained:
        models.load_pretrained(model, args.pretrained, args.backbone)
    model.to(device).train()
    if common.is_distributed() and device.type == "cuda" and models.has_trainable_bn(model):
        # BN statistics over the global batch; SyncBatchNorm only runs on CUDA, so CPU (gloo) runs keep
        # per-rank statistics and share rank 0's running buffers instead (see sync_buffers).
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    common.broadcast_parameters(model)
    return model


def sync_buffers(model):
    """Without SyncBN (CPU runs), copy rank 0's BN running statistics to every rank, as DDP does by default."""
    if common.is_distributed():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


ARCHITECTURE_KEYS = ("method", "backbone", "bn", "source", "synthia_classes")
# flags that may differ between a run and its resumption (where to write, how long, how often to log)
RUN_KEYS = {"resume", "out", "stop_iter", "eval_every", "no_eval", "log_every", "workers", "device", "data_root",
            "source_root", "target_root", "stats_cache", "recipe", "overridden", "folder_classes"}


def save_checkpoint(path, model, method, scaler, iteration, args):
    common.atomic_save({"model": model.state_dict(), "method": method.state_dict(), "scaler": scaler.state_dict(),
                        "iter": iteration, "args": vars(args), "rng": common.rng_state()}, path)


def resolve_resume(args):
    """--resume auto -> OUT/last.pt when it exists, else None (a fresh start)."""
    if args.resume != "auto":
        return args.resume
    path = os.path.join(args.out, "last.pt")
    return path if os.path.isfile(path) else None


def load_resume(path, args):
    ckpt = common.load_checkpoint(path)
    if not isinstance(ckpt, dict) or not {"model", "method", "iter", "args", "rng"} <= set(ckpt):
        raise UserError(f"--resume {path}: not a train.py checkpoint (expected model, method, iter, args, rng)")
    for key in ARCHITECTURE_KEYS:
        if ckpt["args"].get(key) != getattr(args, key):
            raise UserError(f"--resume {path}: made with --{key.replace('_', '-')} {ckpt['args'].get(key)}, "
                            f"but this run has --{key.replace('_', '-')} {getattr(args, key)}")
    if ckpt["iter"] >= args.stop_iter:
        raise UserError(f"--resume {path}: already at iteration {ckpt['iter']}, nothing left before "
                        f"--stop-iter {args.stop_iter}")
    return ckpt


def restore(ckpt, path, args, model, method, scaler):
    """Load a resume checkpoint into the run; a mismatch names the flags that differ, not tensor sizes."""
    try:
        model.load_state_dict(ckpt["model"])
        method.load_state_dict(ckpt["method"])
        scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        changed = [f"--{k.replace('_', '-')} {ckpt['args'].get(k)} -> {v}" for k, v in sorted(vars(args).items())
                   if k not in RUN_KEYS and ckpt["args"].get(k) != v]
        hint = "; flags that differ: " + ", ".join(changed) if changed else ""
        raise UserError(f"--resume {path}: its model or method state does not fit this run "
                        f"({type(err).__name__}){hint}") from None
    common.set_rng_state(ckpt["rng"])  # after the loaders are built: their creation draws no more


def prepare_out_dir(args, resume_path):
    """Refuse an --out that is not a folder we may write, or that holds another run."""
    out, last = args.out, os.path.join(args.out, "last.pt")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out}: exists and is not a folder")
    occupied = os.path.isdir(out) and any(os.path.exists(os.path.join(out, n)) for n in ("last.pt", "metrics.jsonl"))
    same_run = resume_path is not None and os.path.exists(last) and os.path.samefile(resume_path, last)
    if occupied and resume_path is None and args.resume != "auto":
        raise UserError(f"--out {out}: holds another run (last.pt / metrics.jsonl); choose a new folder or "
                        f"pass --resume {last}")
    if occupied and resume_path is not None and not same_run:
        raise UserError(f"--out {out}: holds another run; resuming {resume_path} needs an empty --out or "
                        f"--out {os.path.dirname(os.path.abspath(resume_path))}")
    if common.is_main_process():
        try:
            os.makedirs(out, exist_ok=True)
            probe = os.path.join(out, f".write-test{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as err:
            raise UserError(f"--out {out}: cannot write there ({err.strerror})") from None


# --------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------
def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource  # CPU: the process's peak resident set size (Linux reports KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLog:
    """Appends one JSON object per line to OUT/metrics.jsonl (rank 0 only).

    On resume, records past the checkpoint's iteration (logged by the interrupted run after its last
    save) are dropped, so every iteration appears once; a line torn by a kill mid-write is dropped too.
    """

    def __init__(self, path, resume_iter=None):
        self.path = path if common.is_main_process() else None
        if self.path and os.path.exists(path):
            kept = [json.dumps(r) + "\n" for r in read_records(path) if r.get("iter", 0) <= (resume_iter or 0)]
            with open(path, "w") as f:
                f.writelines(kept)

    def write(self, record):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_records(path):
    """The complete JSON lines of a metrics file (a torn or foreign line is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def reduce_losses(losses):
    """Average the logged values over ranks (one small all-reduce) so every rank sees the same values."""
    names = list(losses)
    values = torch.stack([torch.as_tensor(losses[n]).detach().float().reshape(()).cpu() for n in names])
    values = common.all_reduce_sum(values.to(common.comm_device())) / common.world_size()
    return dict(zip(names, values.tolist()))


def check_finite(losses, iteration, out):
    for name, value in losses.items():
        if not math.isfinite(value):
            last = os.path.join(out, "last.pt")
            saved = f"the last good checkpoint is {last}" if os.path.isfile(last) else "no checkpoint was saved yet"
            raise UserError(f"loss/{name} is {value} at iteration {iteration}: training stopped; {saved} "
                            f"(try a lower --lr, --pretrained weights or --amp off)")


def run_evaluation(model, val, space, env, args, iteration, log, last_path):
    """Evaluate on the target val split. Evaluation draws nothing from the training random streams: the
    global RNG is restored afterwards, so results never depend on --eval-every."""
    rng = common.rng_state()
    try:
        confusion = evaluation.evaluate(model, val, space, env.device, env.autocast,
                                        input_size=datasets.default_eval_size(args.target),
                                        align_corners=args.align_corners,
                                        log=lambda text: print(f"eval iter {iteration}: {text}", flush=True))
    except UserError as err:
        raise UserError(f"{common.one_line(err)} (evaluation at iteration {iteration}; training so far is "
                        f"saved in {last_path})") from None
    common.set_rng_state(rng)
    scores, _ = evaluation.summarize(confusion, space)
    if common.is_main_process():
        print(f"eval iter {iteration}: " + " ".join(f"{k} {v:.2f}" for k, v in scores.items()), flush=True)
    log.write({"iter": iteration, **{f"eval/{k}": v for k, v in scores.items()}})
    return scores


class StopRequest:
    """SIGINT / SIGTERM (Ctrl-C, a scheduler's preemption notice) ask the loop to stop after the current
    iteration; the loop then saves last.pt and exits with 128 + the signal number. A second signal
    stops at once (the last save stays valid: saves are atomic)."""

    def __init__(self):
        self.signum = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self):
        """The signal number when any rank was signalled (all ranks stop at the same iteration), else 0."""
        flag = torch.tensor([float(self.signum or 0)], device=common.comm_device())
        if common.is_distributed():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


def resume_command(args):
    """The command that continues this run: the same flags with --resume OUT/last.pt."""
    argv, skip = [], False
    for i, token in enumerate(sys.argv[1:]):
        if skip:
            skip = False
            continue
        if token == "--resume":
            skip = True
            continue
        if token.startswith("--resume="):
            continue
        argv.append(token)
    launcher = ["python"] if not common.is_distributed() else ["torchrun", f"--nproc_per_node={common.world_size()}"]
    return shlex.join(launcher + [sys.argv[0], *argv, "--resume", os.path.join(args.out, "last.pt")])


def save_and_exit(signum, done, model, method, env, args, last_path):
    """After SIGINT / SIGTERM: save iteration `done` atomically, say how to resume, exit 128 + signum."""
    sync_buffers(model)
    if common.is_main_process():
        save_checkpoint(last_path, model, method, env.scaler, done, args)
        print(f"interrupted at iteration {done}; resume with: {resume_command(args)}", flush=True)
    common.cleanup_distributed()
    sys.exit(128 + signum)


def log_due(done, args):
    """Log the first few iterations (a newcomer sees the run is alive), then every --log-every."""
    return done in (1, 5, 10) or done % args.log_every == 0 or done == args.stop_iter


def next_batches(streams, device):
    """The next source and target batches; a broken file met by this rank's loader is this rank's error."""
    try:
        source = to_device(next(streams["source"]), device)
        target = to_device(next(streams["target"]), device) if "target" in streams else None
    except UserError as err:
        err.rank_local = True  # common.run_cli prints it even on a rank other than 0
        raise
    return source, target


def train_step(method, source, target, it, args):
    """method.train_step, with a BatchNorm failure a user can fix turned into a one-line error."""
    try:
        return method.train_step(source, target, it)
    except ValueError as err:
        if "Expected more than 1 value per channel" in str(err):
            raise UserError(f"--batch-size {args.batch_size}: trainable BatchNorm sees a single value per channel "
                            f"(a 1x1 feature map); use --batch-size 2 or more, a larger --crop, or --bn frozen") from None
        raise


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    device = common.setup_distributed(args.device)
    resume_path = resolve_resume(args)
    prepare_out_dir(args, resume_path)
    ckpt = load_resume(resume_path, args) if resume_path else None
    start_iter = ckpt["iter"] if ckpt else 0
    # every rank seeds alike (identical init); data order differs per rank through the sampler
    common.seed_everything(args.seed)

    if args.source == "folder":  # saved with the run: a checkpoint is then readable without its dataset
        args.folder_classes = datasets.read_folder_classes(datasets.dataset_root("folder", args.data_root,
                                                                                 args.source_root))
    space = datasets.label_space(args.source, args)
    datasets.check_same_classes(space, args.target, datasets.dataset_root(args.target, args.data_root,
                                                                         args.target_root))
    model = build_model(args, space, device)
    env = common.make_env(device, args.amp, space)
    method = METHODS[args.method].Method(model, args, env)
    streams, val = build_data(args, space, start_iter)
    last_path = os.path.join(args.out, "last.pt")
    if ckpt:
        restore(ckpt, resume_path, args, model, method, env.scaler)
    log = MetricsLog(os.path.join(args.out, "metrics.jsonl"), resume_iter=start_iter)
    if common.is_main_process():
        print(describe_recipe(args), flush=True)
        print(f"{args.method}: {args.source} -> {args.target}, {args.backbone}, iterations {start_iter}.."
              f"{args.stop_iter} of a {args.iters}-iteration schedule, {common.world_size()} process(es) on "
              f"{device}, amp {args.amp}" + (f", resumed from {resume_path}" if ckpt else ""), flush=True)
        if args.no_eval:
            print("--no-eval: no evaluation during training (checkpoints as usual)", flush=True)
        elif val is None:
            print(f"{args.target} has no labelled val split: no evaluation during training", flush=True)

    stop = StopRequest()
    tic, tic_iter = time.time(), start_iter
    for it in range(start_iter, args.stop_iter):
        factor = common.lr_factor(it, args.iters, args.poly_power, args.warmup_iters)
        for optimizer in method.optimizers:
            common.set_lr(optimizer, factor)
        try:
            source, target = next_batches(streams, device)
        except RuntimeError:
            if not stop.signum:
                raise
            # the signal reached the loader workers too (a scheduler signalling every process of the job):
            # iteration `it` is complete, so save it and stop as if the signal had come a moment later
            save_and_exit(stop.signum, it, model, method, env, args, last_path)
        losses = reduce_losses(train_step(method, source, target, it, args))
        env.scaler.update()
        check_finite(losses, it + 1, args.out)
        done = it + 1
        if log_due(done, args):
            rate = (done - tic_iter) / max(time.time() - tic, 1e-9)
            lr = method.optimizers[0].param_groups[0]["lr"]
            log.write({"iter": done, "lr": lr, "sec_per_iter": 1.0 / rate,
                       **{f"loss/{k}": v for k, v in losses.items()}})
            if common.is_main_process():
                terms = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
                eta = common.format_duration((args.stop_iter - done) / rate)
                print(f"iter {done}/{args.stop_iter} lr {lr:.2e} {terms} | {rate:.2f} it/s eta {eta} "
                      f"peak {peak_memory_mb(device):.0f} MB", flush=True)
            tic, tic_iter = time.time(), done
        signum = stop.agreed()
        if signum or (args.eval_every and done % args.eval_every == 0) or done == args.stop_iter:
            # the checkpoint comes first: nothing after it (evaluation, a signal) can lose training
            if signum:
                save_and_exit(signum, done, model, method, env, args, last_path)
            sync_buffers(model)
            if common.is_main_process():
                save_checkpoint(last_path, model, method, env.scaler, done, args)
            if val is not None:
                run_evaluation(model, val, space, env, args, done, log, last_path)
            tic, tic_iter = time.time(), done  # evaluation time is not training speed
    if common.is_distributed():
        report_checksum(model)
    common.cleanup_distributed()


def report_checksum(model):
    """Under torchrun each rank prints a checksum of its parameters: they must all agree."""
    total = sum(p.detach().double().sum().item() for p in model.parameters())
    print(f"rank {common.rank()} parameter checksum {total:.12e}", flush=True)


if __name__ == "__main__":
    common.run_cli(main)
