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

Made for shared clusters (the README's "On a cluster"): a run locks --out for its life (OUT/.lock);
SIGINT / SIGTERM, to this process or to its whole process group (SLURM, Kubernetes, torchrun), finish
the iteration, save last.pt and exit 130 / 143 (StopRequest); nothing non-finite is ever saved; last.pt
holds every rank's random streams, so a torchrun run resumes exactly; `--resume auto` lets the same
command start, resume, or exit 0 on a finished run; `--save-every` bounds what a preemption loses.
"""
import dataclasses
import errno
import json
import math
import os
import shlex
import signal
import sys
import time


def stop_before_training(signum, frame):
    """SIGINT / SIGTERM before the loop starts (importing torch, scanning datasets, class statistics):
    one line, exit 128 + signum, no traceback; last.pt is not written yet. StopRequest takes over.

    A forked loader worker (class statistics) inherits this handler: it dies of SIGTERM as it would
    without a handler, and leaves Ctrl-C to its parent, which stops it; it goes quiet meanwhile, or a
    transfer its parent abandons would print a BrokenPipeError traceback from the worker."""
    if os.getpid() != LAUNCH_PID:
        if signum == signal.SIGTERM:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # workers that stop now are no error of their own
    if os.environ.get("RANK", "0") == "0":
        print(f"error: interrupted ({signal.Signals(signum).name}) before training started; nothing was saved",
              file=sys.stderr, flush=True)
    exit_on_signal(signum)


def exit_on_signal(signum):
    """Exit with 128 + signum. Further stop signals are ignored from here: Python restores the default
    handlers while it shuts down, and a scheduler's second SIGTERM would turn the exit into a death."""
    for other in (signal.SIGINT, signal.SIGTERM):
        signal.signal(other, signal.SIG_IGN)
    sys.exit(128 + signum)


if __name__ == "__main__":  # before `import torch`, which alone takes seconds
    LAUNCH_PID = os.getpid()  # forked loader workers exit quietly
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, stop_before_training)
import torch  # noqa: E402

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
    deadly (not train.py's early handler, inherited at the fork): it is how the loader and Python's exit
    stop workers (a scheduler that sends it to every process is handled by StopRequest)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
RUN_KEYS = {"resume", "out", "stop_iter", "eval_every", "save_every", "no_eval", "log_every", "workers", "device",
            "data_root", "source_root", "target_root", "stats_cache", "recipe", "overridden", "folder_classes"}


def save_checkpoint(path, model, method, scaler, iteration, args, run, space):
    """Every rank calls this (it holds collectives); rank 0 writes last.pt atomically.

    Nothing non-finite is ever saved (check_finite_state), so last.pt stays the last good state. `rng`
    holds every rank's random streams, in rank order: the global RNGs and the method's generator (the
    method state's 'generator', seeded per rank by common.method_generator), so that a torchrun run
    resumes exactly; `world_size` and `classes` let a resume refuse what would silently change the run;
    `folder_classes` (a folder source's classes.json) makes the checkpoint readable without its dataset.
    """
    sync_buffers(model)
    state = {"model": model.state_dict(), "method": method.state_dict(), "scaler": scaler.state_dict()}
    check_finite_state(state, iteration, path)
    streams = common.all_gather_object({"global": common.rng_state(), "generator": state["method"].get("generator")})
    if common.is_main_process():
        common.atomic_save({**state, "iter": iteration, "args": vars(args), "rng": streams,
                            "world_size": common.world_size(), "classes": space.names,
                            "folder_classes": run.folder_classes}, path)


def float_tensors(obj, prefix):
    """(name, tensor) of every floating-point tensor in nested dicts / lists (state dicts, optimizer states)."""
    if torch.is_tensor(obj):
        return [(prefix, obj)] if obj.is_floating_point() else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    return [pair for key, value in items for pair in float_tensors(value, f"{prefix}/{key}")]


def check_finite_state(state, iteration, path):
    """Stop, naming the tensor, when a weight, optimizer or method state is inf / NaN: a diverged step may
    leave finite losses and non-finite weights (the loss is measured before the step). All ranks agree."""
    tensors = float_tensors(state, "")
    bad = [name.lstrip("/") for name, tensor in tensors if not bool(torch.isfinite(tensor).all())]
    bad = next((names for names in common.all_gather_object(bad) if names), [])
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise UserError(f"{bad[0]}{more} is not finite after iteration {iteration}: training stopped; "
                        f"{saved_message(path)} (try a lower --lr, --pretrained weights or --amp off)")


def saved_iteration(path):
    """The iteration a checkpoint holds (None: no readable checkpoint), read without loading its weights."""
    try:
        return torch.load(path, mmap=True, weights_only=False)["iter"]
    except Exception:  # absent, or not a train.py checkpoint
        return None


def saved_message(path):
    """Where training stands on disk, for a message that stops the run."""
    saved = saved_iteration(path)
    return "no checkpoint was saved yet" if saved is None else f"the last good checkpoint is {path} (iteration {saved})"


def resolve_resume(args):
    """--resume auto -> OUT/last.pt when it exists, else None (a fresh start)."""
    if args.resume != "auto":
        return args.resume
    path = os.path.join(args.out, "last.pt")
    return path if os.path.isfile(path) else None


def load_resume(path, args):
    """The checkpoint to resume, refused when its architecture flags differ. `--resume auto` may find a
    finished run (main then exits 0); an explicit --resume FILE of a finished run is an error."""
    ckpt = common.load_checkpoint(path)
    if not isinstance(ckpt, dict) or not {"model", "method", "iter", "args", "rng"} <= set(ckpt):
        raise UserError(f"--resume {path}: not a train.py checkpoint (expected model, method, iter, args, rng)")
    for key in ARCHITECTURE_KEYS:
        if ckpt["args"].get(key) != getattr(args, key):
            raise UserError(f"--resume {path}: made with --{key.replace('_', '-')} {ckpt['args'].get(key)}, "
                            f"but this run has --{key.replace('_', '-')} {getattr(args, key)}")
    if ckpt["iter"] >= args.stop_iter and args.resume != "auto":
        raise UserError(f"--resume {path}: already at iteration {ckpt['iter']}, nothing left before "
                        f"--stop-iter {args.stop_iter}")
    return ckpt


def check_resume_fits(ckpt, path, args, space):
    """Refuse a resume on other classes, or with another global batch (processes x --batch-size); with
    the same global batch on another number of processes, say that the resume is no longer exact."""
    saved_classes = ckpt.get("classes")
    if saved_classes is not None and list(saved_classes) != space.names:
        index = next((i for i, (a, b) in enumerate(zip(saved_classes, space.names)) if a != b), None)
        if index is None:
            raise UserError(f"--resume {path}: trained on {len(saved_classes)} classes, this dataset has "
                            f"{len(space.names)}")
        raise UserError(f"--resume {path}: trained on other classes: class {index} is {saved_classes[index]!r} "
                        f"there and {space.names[index]!r} in this dataset")
    saved_world, world = ckpt.get("world_size", 1), common.world_size()
    if saved_world == world:
        return
    saved_global, new_global = saved_world * ckpt["args"]["batch_size"], world * args.batch_size
    if saved_global != new_global:
        keep = (f"--batch-size {saved_global // world} keeps it" if saved_global % world == 0 else
                f"no --batch-size keeps it on {world} processes")
        raise UserError(f"--resume {path}: made by {saved_world} process(es) x --batch-size "
                        f"{ckpt['args']['batch_size']} = a global batch of {saved_global}, but this run has {world} x "
                        f"{args.batch_size} = {new_global}; {keep}")
    if common.is_main_process():
        print(f"resuming a {saved_world}-process run on {world} processes with the same global batch "
              f"{new_global}: the random streams are re-split over the processes, so the run is not bit-exact "
              f"with an uninterrupted one", flush=True)


def restore(ckpt, path, args, model, method, scaler):
    """Load a resume checkpoint into the run; a mismatch names the flags that differ, not tensor sizes.

    Each rank takes back its own random streams (global RNGs, method generator); a rank the saving run
    did not have (more processes now) keeps its freshly seeded ones."""
    streams = ckpt["rng"] if isinstance(ckpt["rng"], list) else [{"global": ckpt["rng"]}]  # before per-rank states
    own = streams[common.rank()] if common.rank() < len(streams) else None
    method_state = ckpt["method"]
    if own is not None and own.get("generator") is not None:
        method_state = dict(method_state, generator=own["generator"])
    try:
        model.load_state_dict(ckpt["model"])
        method.load_state_dict(method_state)
        scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        changed = [f"--{k.replace('_', '-')} {ckpt['args'].get(k)} -> {v}" for k, v in sorted(vars(args).items())
                   if k not in RUN_KEYS and ckpt["args"].get(k) != v]
        hint = "; flags that differ: " + ", ".join(changed) if changed else ""
        raise UserError(f"--resume {path}: its model or method state does not fit this run "
                        f"({type(err).__name__}){hint}") from None
    if own is not None:
        common.set_rng_state(own["global"])  # after the loaders are built: their creation draws no more


def prepare_out_dir(args, resume_path):
    """Lock --out for this run (common.lock_folder; rank 0 holds it, every rank learns the outcome and
    fails alike); refuse an --out that is not a folder we may write, or that holds another run."""
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out}: exists and is not a folder")
    problem = None
    if common.is_main_process():
        try:
            os.makedirs(out, exist_ok=True)
            # also the write test (it creates OUT/.lock); occupancy is checked under the lock, so no other
            # run can start writing here between the check and this run's first write
            common.lock_folder(out, check=lambda: check_not_occupied(args, resume_path))
        except OSError as err:
            problem = f"--out {out}: cannot write there ({err.strerror})"
        except UserError as err:
            problem = str(err)
    problem = common.all_gather_object(problem)[0]
    if problem:
        raise UserError(problem)


def check_not_occupied(args, resume_path):
    """Refuse an --out that holds another run (unless this run resumes it)."""
    out, last = args.out, os.path.join(args.out, "last.pt")
    occupied = os.path.isdir(out) and any(os.path.exists(os.path.join(out, n)) for n in ("last.pt", "metrics.jsonl"))
    same_run = resume_path is not None and os.path.exists(last) and os.path.samefile(resume_path, last)
    if occupied and resume_path is None and args.resume != "auto":
        raise UserError(f"--out {out}: holds another run (last.pt / metrics.jsonl); choose a new folder or "
                        f"pass --resume {last}")
    if occupied and resume_path is not None and not same_run:
        raise UserError(f"--out {out}: holds another run; resuming {resume_path} needs an empty --out or "
                        f"--out {os.path.dirname(os.path.abspath(resume_path))}")


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
    A write that fails (full disk) stops the run with one line; last.pt is never touched by it.
    """

    def __init__(self, path, resume_iter=None):
        self.path = path if common.is_main_process() else None
        if self.path and os.path.exists(path):
            kept = [json.dumps(r) + "\n" for r in read_records(path) if r.get("iter", 0) <= (resume_iter or 0)]
            tmp = f"{path}.tmp{os.getpid()}"  # rewritten whole or not at all
            try:
                with open(tmp, "w") as f:
                    f.writelines(kept)
                os.replace(tmp, path)
            except OSError as err:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise self.failed(err, resume_iter) from None

    def write(self, record):
        if self.path:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:
                raise self.failed(err, record["iter"]) from None

    def failed(self, err, iteration):
        full = "; is the disk full?" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        saved = saved_message(os.path.join(os.path.dirname(self.path), "last.pt"))
        return UserError(f"{self.path}: could not be written ({err.strerror}){full}; training stopped at iteration "
                         f"{iteration}; {saved}")


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
    """A non-finite loss (the same on every rank: reduce_losses) stops the run before anything is saved."""
    for name, value in losses.items():
        if not math.isfinite(value):
            raise UserError(f"loss/{name} is {value} at iteration {iteration}: training stopped; "
                            f"{saved_message(os.path.join(out, 'last.pt'))} (try a lower --lr, --pretrained weights "
                            f"or --amp off)")


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


class Interrupted(BaseException):
    """Raised by StopRequest to stop at once (not an Exception: no `except Exception` may swallow it)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """SIGINT / SIGTERM (Ctrl-C, a scheduler's preemption notice, to the main process alone or to the
    whole process group) ask the loop to stop after the current iteration; the loop then saves last.pt
    and exits with 128 + the signal number. A loader worker killed by SIGTERM counts as the same
    request: a scheduler signals every process of the job, and the worker may die first.

    A second signal stops at once (raises Interrupted): last.pt stays the last complete save. During
    the save on the way out it is ignored (that save ends the run anyway), and during evaluation, which
    comes right after a save, the first signal already stops at once.

    SIGCHLD: the data loader installs a handler that raises as soon as a worker dies, wherever the main
    process is at that moment (inside torch.save, halfway through an iteration). It is wrapped here: a
    worker's death is noted in `worker_failure` and reported between two iterations (next_batches).
    """

    def __init__(self):
        self.signum, self.worker_failure = None, None
        self.received = self.exiting = self.evaluating = False  # received: a signal reached this process
        self.loader_handler = signal.getsignal(signal.SIGCHLD)  # the loader's, once its workers started
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.handle)
        signal.signal(signal.SIGCHLD, self.child_exited)

    def handle(self, signum, frame):
        if self.exiting:
            return
        if self.received or self.evaluating:
            raise Interrupted(signum)
        self.received = True
        self.signum = self.signum or signum

    def child_exited(self, signum, frame):
        if not callable(self.loader_handler):
            return
        try:
            self.loader_handler(signum, frame)
        except RuntimeError as err:  # "DataLoader worker (pid N) is killed by signal: Killed."
            failure = common.one_line(err)
            if "killed by signal: Terminated" in failure:
                self.signum = self.signum or signal.SIGTERM  # the job is being stopped
            else:
                self.worker_failure = self.worker_failure or failure

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


def save_and_exit(signum, done, stop, model, method, env, args, run, space, last_path):
    """After SIGINT / SIGTERM: save iteration `done` atomically, say how to resume, exit 128 + signum."""
    stop.exiting = True  # a further signal lets this save finish: the run ends right after it
    save_checkpoint(last_path, model, method, env.scaler, done, args, run, space)
    if common.is_main_process():
        print(f"interrupted at iteration {done}; resume with: {resume_command(args)}", flush=True)
    common.cleanup_distributed()
    exit_on_signal(signum)


def exit_at_once(signum, args):
    """After a second signal (or one during evaluation): no save; last.pt is the last complete one."""
    saved = saved_iteration(os.path.join(args.out, "last.pt"))
    if common.is_main_process():
        if saved is None:
            print(f"interrupted ({signal.Signals(signum).name}) before the first checkpoint; nothing was saved",
                  flush=True)
        else:
            print(f"interrupted at iteration {saved} (the last save; {signal.Signals(signum).name} stopped the run at "
                  f"once); resume with: {resume_command(args)}", flush=True)
    exit_on_signal(signum)


def log_due(done, args):
    """Log the first few iterations (a newcomer sees the run is alive), then every --log-every."""
    return done in (1, 5, 10) or done % args.log_every == 0 or done == args.stop_iter


def next_batches(streams, device, stop, it, last_path):
    """The next source and target batches; a broken file met by this rank's loader, or a dead loader
    worker (the out-of-memory killer), is this rank's error. With a stop requested, a worker that died
    of the same signal is no error: the caller saves iteration `it` and stops."""
    if stop.worker_failure:
        raise worker_died(stop.worker_failure, it, last_path)
    try:
        source = to_device(next(streams["source"]), device)
        target = to_device(next(streams["target"]), device) if "target" in streams else None
    except UserError as err:
        err.rank_local = True  # common.run_cli prints it even on a rank other than 0
        raise
    except (RuntimeError, ConnectionError) as err:
        # a worker that dies while sending a batch breaks the transfer (ConnectionResetError) before its
        # SIGCHLD is handled: give that a moment, it names the worker and the signal
        if not stop.signum and (isinstance(err, ConnectionError) or str(err).startswith("DataLoader worker")):
            time.sleep(1.0)
            if not stop.signum:
                raise worker_died(stop.worker_failure or common.one_line(err), it, last_path) from None
        raise
    return source, target


def worker_died(failure, it, last_path):
    err = UserError(f"{common.LOADER_WORKER_DIED.format(failure=failure)}; training stopped at iteration {it}; "
                    f"{saved_message(last_path)}")
    err.rank_local = True
    return err


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
    prepare_out_dir(args, resume_path)  # from here on, --out is locked for this run
    try:
        start(args, run, device, resume_path)
    finally:
        common.unlock_folder(args.out)  # the OS would release it at exit; train.main may run in-process


def start(args, run, device, resume_path):
    """The run after --out is locked: resume or start, build everything, train."""
    ckpt = load_resume(resume_path, args) if resume_path else None
    if ckpt and ckpt["iter"] >= args.stop_iter:  # --resume auto of a finished run: a requeued job succeeds
        if common.is_main_process():
            print(f"{args.out} already finished at iteration {ckpt['iter']}", flush=True)
        common.cleanup_distributed()
        return
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
        check_resume_fits(ckpt, resume_path, args, space)
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
    try:
        train_loop(args, run, start_iter, stop, model, method, env, space, streams, val, log, last_path)
    except Interrupted as err:
        exit_at_once(err.signum, args)
    if common.is_distributed():
        report_checksum(model)
    common.cleanup_distributed()


def train_loop(args, run, start_iter, stop, model, method, env, space, streams, val, log, last_path):
    """Iterations start_iter..stop_iter: schedule, step, log, save (last.pt) and evaluate."""
    tic, tic_iter = time.time(), start_iter
    device = env.device
    for it in range(start_iter, args.stop_iter):
        factor = common.lr_factor(it, args.iters, args.poly_power, args.warmup_iters)
        for optimizer in method.optimizers:
            common.set_lr(optimizer, factor)
        try:
            source, target = next_batches(streams, device, stop, it, last_path)
        except (RuntimeError, ConnectionError):
            if not stop.signum:
                raise
            # the signal reached the loader workers too while this process waited for a batch: iteration
            # `it` is complete, so save it and stop as if the signal had come a moment later
            save_and_exit(stop.signum, it, stop, model, method, env, args, run, space, last_path)
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
        if signum:
            save_and_exit(signum, done, stop, model, method, env, args, run, space, last_path)
        evaluate_now = bool(args.eval_every and done % args.eval_every == 0) or done == args.stop_iter
        if evaluate_now or (args.save_every and done % args.save_every == 0):
            # the checkpoint comes first: nothing after it (evaluation, a signal) can lose training
            save_checkpoint(last_path, model, method, env.scaler, done, args, run, space)
            if val is not None and evaluate_now:
                if stop.signum:  # arrived during the save: last.pt is current, skip the evaluation
                    exit_at_once(stop.signum, args)
                stop.evaluating = True  # last.pt is current: a signal during evaluation stops at once
                run_evaluation(model, val, space, env, args, done, log, last_path)
                stop.evaluating = False
            tic, tic_iter = time.time(), done  # evaluation time is not training speed


def report_checksum(model):
    """Under torchrun each rank prints a checksum of its parameters: they must all agree."""
    total = sum(p.detach().double().sum().item() for p in model.parameters())
    print(f"rank {common.rank()} parameter checksum {total:.12e}", flush=True)


if __name__ == "__main__":
    common.run_cli(main)
