"""Train a segmentation model with one of the domain-adaptation methods in uda/.

    python train.py --method source_only --source toy-synth --out runs/toy-src
    torchrun --nproc_per_node=8 train.py --method fada --source gta5 --data-root /data --out runs/fada

One plain loop. This file owns seeding, the process group (from the torchrun environment),
data loaders, the LR schedule, mixed precision, logging, periodic evaluation and checkpoints. A method
file (uda/<method>.py) owns its extra modules, optimizers, losses and the order of backward/step inside
one iteration (`train_step`); the contract between the two is written once, in uda/source_only.py.

The flags live in uda/flags.py (the tools parse them there too): the common flags, the chosen method's
own, and the method's RECIPE (its paper's values of common flags: LR, schedule, batch, crop, ...) as the
parser's defaults where they apply, so `--method X --help` shows them, a flag given on the command line
wins, and every run prints the effective recipe and what was overridden.
"""
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import time
import torch

from uda import common, datasets, evaluation, flags, models, samplers
from uda.common import UserError
from uda.methods import METHODS


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
            "source_root", "target_root", "stats_cache"}


def save_checkpoint(path, model, method, scaler, iteration, args, run):
    """folder_classes: a folder source's classes.json, so the checkpoint is readable without its dataset."""
    common.atomic_save({"model": model.state_dict(), "method": method.state_dict(), "scaler": scaler.state_dict(),
                        "iter": iteration, "args": vars(args), "folder_classes": run.folder_classes,
                        "rng": common.rng_state()}, path)


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
                                        # as the method's official code evaluates (uda/evaluation.py)
                                        resize_via_input=getattr(METHODS[args.method], "RESIZE_VIA_INPUT", False),
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


def save_and_exit(signum, done, model, method, env, args, run, last_path):
    """After SIGINT / SIGTERM: save iteration `done` atomically, say how to resume, exit 128 + signum."""
    sync_buffers(model)
    if common.is_main_process():
        save_checkpoint(last_path, model, method, env.scaler, done, args, run)
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
    args, run = flags.parse(argv, description=__doc__)
    device = common.setup_distributed(args.device)
    resume_path = resolve_resume(args)
    prepare_out_dir(args, resume_path)
    ckpt = load_resume(resume_path, args) if resume_path else None
    start_iter = ckpt["iter"] if ckpt else 0
    # every rank seeds alike (identical init); data order differs per rank through the sampler
    common.seed_everything(args.seed)

    if args.source == "folder":  # saved with the run: a checkpoint is then readable without its dataset
        run = dataclasses.replace(run, folder_classes=datasets.read_folder_classes(
            datasets.dataset_root("folder", args.data_root, args.source_root)))
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
        print(flags.describe_recipe(args, run), flush=True)
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
            save_and_exit(stop.signum, it, model, method, env, args, run, last_path)
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
                save_and_exit(signum, done, model, method, env, args, run, last_path)
            sync_buffers(model)
            if common.is_main_process():
                save_checkpoint(last_path, model, method, env.scaler, done, args, run)
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
