"""Plumbing shared by train.py, evaluate.py and the method files.

Everything here is small and method-agnostic: user-facing errors, the process group helpers (which do
nothing without torchrun), the learning-rate schedule, atomic checkpoints, the run-folder lock, RNG
state capture and the confusion-matrix metrics. Methods import from here; nothing here imports a method.
"""
import argparse
import errno
import fcntl
import math
import os
import random
import signal
import socket
import sys
import threading
import time
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

IGNORE_INDEX = 255  # every dataset maps void / unlabeled pixels to 255
RANK_EXIT_DELAY = 3.0  # seconds a silent rank waits before exiting, so rank 0's error line gets printed


# --------------------------------------------------------------------------------------------------
# Errors a user can cause: one line, exit code 2, no traceback
# --------------------------------------------------------------------------------------------------
class UserError(Exception):
    """Bad input (a missing folder, an unknown name, a wrong checkpoint). Printed as one line, exit 2."""


def run_cli(main, oom_hint=None):
    """Run `main()`; turn a UserError into a one-line message on stderr and exit code 2.

    Under torchrun every rank runs this: a setup error (the same on every rank) is printed by rank 0
    only; an error a rank meets alone in the loop (an unreadable file of its shard: `rank_local`) by
    that rank; a rank that loses contact because another one failed exits quietly (rank 0 says so in
    one line) instead of adding a gloo traceback. Running out of memory (its line ends in `oom_hint`, the
    script's own remedies; default: train.py's), a data loader worker that died (the out-of-memory
    killer's SIGKILL) and Ctrl-C outside the training loop are one line too.
    """
    try:
        main()
    except KeyboardInterrupt:
        if launch_rank() == 0:
            print("error: interrupted (SIGINT); nothing more was written", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    except UserError as err:
        if launch_rank() == 0 or getattr(err, "rank_local", False):
            prefix = f"rank {launch_rank()}: " if launch_rank() else ""
            print(f"error: {prefix}{one_line(err)}", file=sys.stderr, flush=True)
        else:
            # torchrun stops the other ranks as soon as one exits: give rank 0 time to say why
            time.sleep(RANK_EXIT_DELAY)
        sys.exit(2)
    except (MemoryError, torch.OutOfMemoryError) as err:
        print(f"error: out of memory ({one_line(err) or type(err).__name__}): " + (oom_hint or "try a smaller "
              "--crop or --batch-size, --amp bf16, or --grad-checkpoint"), file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:
        if is_peer_failure(err):
            if launch_rank() != 0:
                time.sleep(RANK_EXIT_DELAY)
            else:
                print("error: lost contact with another process of this torchrun job (it failed or was killed; "
                      "see its output)", file=sys.stderr)
            sys.exit(2)
        if "can't allocate memory" in str(err):
            print(f"error: out of memory ({one_line(err)}): " + (oom_hint or "try a smaller --crop or "
                  "--batch-size, or --grad-checkpoint"), file=sys.stderr)
            sys.exit(2)
        if str(err).startswith("DataLoader worker"):
            print(f"error: {LOADER_WORKER_DIED.format(failure=one_line(err))}", file=sys.stderr)
            sys.exit(2)
        raise


# what a dead loader worker means in practice: the out-of-memory killer sends SIGKILL ("Killed")
LOADER_WORKER_DIED = ("a data loader worker died: {failure} (SIGKILL is usually the out-of-memory killer: use "
                      "fewer --workers or a smaller --batch-size)")


def launch_rank():
    """This process's rank as torchrun announced it (valid before and after the process group exists)."""
    return int(os.environ.get("RANK", "0"))


def is_peer_failure(err):
    """A collective failed because another rank went away (gloo / NCCL wording)."""
    text = str(err)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "NCCL communicator",
                                   "Socket Timeout", "Broken pipe"))


def one_line(err):
    """The user-facing line of a UserError, also when a DataLoader worker wrapped it in a traceback."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
    return lines[-1].split("UserError: ", 1)[-1]


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad value, missing --out) are one `error: ...` line, exit 2,
    instead of the usage block: the same promise every other bad input gets."""

    def error(self, message):
        raise UserError(message)


def positive_int(text):
    """argparse type: an integer >= 1 (counts, sizes, batch sizes, iterations)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def nonnegative_int(text):
    """argparse type: an integer >= 0 (worker counts, intervals where 0 means off)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 0")
    return value


def positive_float(text):
    """argparse type: a finite number > 0 (learning rates, temperatures)."""
    value = _number(text, float)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number > 0")
    return value


def nonnegative_float(text):
    """argparse type: a finite number >= 0 (loss weights, where 0 turns a term off)."""
    value = _number(text, float)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number >= 0")
    return value


def _number(text, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {'an integer' if kind is int else 'a number'}") from None


def parse_size(text, flag):
    """'1280x720' -> (1280, 720) as (width, height); sizes are always width x height, as papers write."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"{flag} {text!r}: expected WIDTHxHEIGHT, e.g. 1280x720")
    return int(parts[0]), int(parts[1])


def fraction(text):
    """argparse type: a number in [0, 1] (probabilities, confidence thresholds, mixing weights, EMA caps)."""
    value = _number(text, float)
    if not 0 <= value <= 1:  # also False for nan
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number in [0, 1]")
    return value


def fraction_below_one(text):
    """argparse type: a number in [0, 1) (momentums and Adam betas, where 1 would freeze or divide by 0)."""
    value = _number(text, float)
    if not 0 <= value < 1:  # also False for nan
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number in [0, 1)")
    return value


def seed(text):
    """argparse type: a random seed, an integer in [0, 2**32) (numpy's seeds end there)."""
    value = _number(text, int)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer from 0 to 4294967295")
    return value


def int_at_least(minimum):
    """argparse type factory: an integer >= `minimum` (e.g. 2 groups, where one group has nothing to
    compare with)."""
    def integer(text):
        value = _number(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {minimum}")
        return value
    integer.__name__ = f"int_at_least_{minimum}"
    return integer


# --------------------------------------------------------------------------------------------------
# Distributed helpers: every one is a no-op without a process group, so `python train.py` just works
# --------------------------------------------------------------------------------------------------
def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main_process():
    return rank() == 0


def comm_device():
    """Collectives on NCCL need CUDA tensors; gloo and single-process runs use the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (statistics, confusion matrices, class counts) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_parameters(module):
    """Make every rank start from rank 0's parameters and buffers."""
    if is_distributed():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def all_reduce_gradients(params):
    """Average gradients over ranks, in one flat buffer.

    Why not wrap the model in DistributedDataParallel: several methods forward the same network more
    than once (source and target separately, for separate BN statistics) before one backward, which
    DDP's reducer forbids, and adversarial methods interleave generator and discriminator steps.
    Averaging the gradients explicitly right before each optimizer step is equivalent to DDP's
    gradient averaging, works for every iteration order, and keeps the replicas bit-identical.
    """
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def optimizer_step(optimizer, scaler):
    """All-reduce this optimizer's gradients across ranks, then step it through the shared scaler.

    GradScaler skips the step when a gradient is inf/NaN (fp16 only); since gradients are averaged
    first, every rank takes the same decision.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    all_reduce_gradients(params)
    scaler.step(optimizer)


def setup_distributed(device_flag):
    """Start the process group when launched by torchrun (RANK in the environment).

    Returns the torch.device of this process: cuda:LOCAL_RANK with nccl on GPU, cpu with gloo.
    """
    device = resolve_device(device_flag)
    if "RANK" not in os.environ:
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    store, rank, world = attempt_store()
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=device)
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    return device


def attempt_store():
    """torchrun's key-value store (env://), its keys prefixed by this restart's number: (store, rank, world).

    After `torchrun --max-restarts` restarts a group, the new workers talk through the same store as the
    old ones (the agent's), where the old workers' addresses are still written under the same keys; a
    new rank that reads one before its peer overwrites it connects to a dead process ("Gloo
    connectFullMesh failed ... Connection refused") and the restart fails. One prefix per restart keeps
    every attempt's keys apart.
    """
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"uda-attempt-{attempt}/", store), rank, world


def resolve_device(flag):
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if flag.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {flag}: no CUDA device is available (use --device cpu)")
    try:
        return torch.device(flag)
    except RuntimeError:
        raise UserError(f"--device {flag!r}: expected auto, cpu, cuda or cuda:N") from None


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects: RNG states, names); [obj]
    without a process group."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def cleanup_distributed():
    """Tear the process group down together: a rank that destroys it while another is still saving
    can abort inside gloo ("terminate called without an active exception")."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# What the loop hands a method besides the model and the flags
# --------------------------------------------------------------------------------------------------
@dataclass
class Env:
    """The run's device, precision and label space; built by `make_env` for train.py, tools and tests.

    A method reads everything else from `args` (never assigning to it) and owns its own random
    generator (`method_generator`), so nothing here changes during a run.
    """
    device: torch.device
    amp: str                       # off | bf16 | fp16 (AMP_DTYPES)
    space: object                  # datasets.LabelSpace: num_classes, names, eval_sets
    scaler: torch.amp.GradScaler   # one for all optimizers; scales only under fp16

    def autocast(self):
        """The autocast context every forward runs under (a no-op with amp 'off')."""
        return autocast(self.device, self.amp)


def make_env(device, amp, space):
    """The one way to build an Env (train.py, uda/bench, tests)."""
    device = torch.device(device)
    if amp not in AMP_DTYPES:
        raise UserError(f"--amp {amp!r}: expected one of {', '.join(AMP_DTYPES)}")
    return Env(device=device, amp=amp, space=space, scaler=make_scaler(device, amp))


def method_generator(seed, name):
    """A CPU torch.Generator for a method's random draws (augmentation, mixing masks), distinct per rank
    and per method. The method saves its state in its checkpoint, so resume is exact, and no draw touches
    the global RNG, so evaluation or logging can never shift a method's randomness.

    name: the method's name (its GENERATOR_STREAM, e.g. "fada"): the stream is its CRC-32, a hash that is
    the same in every process and Python version (Python's hash() of a str is salted per process).
    """
    stream = zlib.crc32(name.encode("utf-8"))  # 0 <= stream < 2**32
    return torch.Generator().manual_seed((seed * 1000003 + stream) * 1009 + rank())


# --------------------------------------------------------------------------------------------------
# Resampling helpers used by every method
# --------------------------------------------------------------------------------------------------
def upsample(x, size, align_corners):
    """Bilinear resize of (B, C, h, w) logits or probabilities to size = (H, W).

    align_corners is a recipe value (--align-corners): FADA's and SDCA's official code uses True,
    DAFormer's (mmseg) False; it is saved in the checkpoint and used again by evaluate.py.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def downsample_labels(labels, size):
    """Nearest-neighbour resize of (B, H, W) int64 labels to size = (h, w) (F.interpolate 'nearest',
    as the official codes do); 255 stays 255."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    small = torch.nn.functional.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")
    return small[:, 0].long()  # (B, h, w)


def shard(dataset, limit=None):
    """This rank's share of the first `limit` items (all by default): every world_size-th index, no
    padding or repeats, so sums over ranks count every item once (evaluation, pseudo-labels)."""
    total = len(dataset) if limit is None else min(limit, len(dataset))
    return torch.utils.data.Subset(dataset, list(range(rank(), total, world_size())))


# --------------------------------------------------------------------------------------------------
# Mixed precision: one code path for off / bf16 / fp16
# --------------------------------------------------------------------------------------------------
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, amp):
    """The autocast context every forward runs under (disabled when amp == 'off')."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device, amp):
    """One GradScaler for all optimizers of a method; it only scales for fp16 (bf16 needs none)."""
    return torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))


# --------------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------------
def lr_factor(it, total_iters, power, warmup_iters=0, warmup_ratio=1e-6):
    """Multiplier of the base LR at iteration `it` (0-based).

    Poly decay (1 - it/total)^power over the schedule length `total_iters` (--iters) even when
    training stops earlier (--stop-iter), the FADA/ADVENT convention. Optional linear warmup from
    warmup_ratio to 1 over the first warmup_iters (DAFormer), multiplied into the poly factor as in
    mmcv's runner.
    """
    factor = max(1.0 - it / total_iters, 0.0) ** power
    if it < warmup_iters:
        factor *= 1.0 - (1.0 - it / warmup_iters) * (1.0 - warmup_ratio)
    return factor


def set_lr(optimizer, factor):
    """Every param group holds its own 'base_lr' (backbone LR, head LR x10, ...); scale all of them."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def sgd(param_groups, lr, momentum, weight_decay):
    """SGD over groups of the form {'params', 'lr_mult'[, 'weight_decay']}; records each group's base_lr."""
    groups = [dict(g, base_lr=lr * g.get("lr_mult", 1.0), lr=lr * g.get("lr_mult", 1.0)) for g in param_groups]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def adam(params, lr, betas, weight_decay=0.0):
    """Adam for a discriminator, with base_lr recorded so the same poly schedule drives it."""
    return torch.optim.Adam([{"params": list(params), "base_lr": lr}], lr=lr, betas=betas,
                            weight_decay=weight_decay)


# --------------------------------------------------------------------------------------------------
# Checkpoints and RNG state
# --------------------------------------------------------------------------------------------------
def atomic_save(obj, path):
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file.

    Temporary files of earlier saves that were killed are removed first; a failed write (disk full,
    permissions) removes its own temporary file and leaves the previous `path` untouched. Signals wait
    until the file is complete (`signals_deferred`): a second Ctrl-C, a scheduler's SIGTERM or the data
    loader's SIGCHLD handler (which raises when a worker dies) never lands inside torch.save.
    """
    remove_stale_temporaries(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with signals_deferred():
            torch.save(obj, tmp)
            os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError):
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
            reason = err.strerror or str(err)
        elif isinstance(err, RuntimeError) and "PytorchStreamWriter failed" in str(err):
            full, reason = True, str(err).strip().splitlines()[-1]  # torch's writer: a write() that failed
        else:
            raise  # not the file system's doing (a bug, an interrupt): not a "full disk"
        raise UserError(f"checkpoint {path}: could not be written ({reason}){'; is the disk full?' if full else '.'} "
                        f"Any earlier {os.path.basename(path)} is unchanged") from None


@contextmanager
def signals_deferred(signums=(signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)):
    """Hold back the Python handlers of `signums` for the duration of the block, then deliver what
    arrived, once each, to the handlers that were installed before (after the block, so a handler that
    raises or exits does so between two complete files).

    Python runs handlers in the main thread whichever thread the kernel picked, so swapping the
    handlers (not pthread_sigmask, which is per thread) is what keeps them out. Outside the main thread
    handlers cannot be changed, and nothing is deferred.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    # a handler installed from C (getsignal: None) cannot be put back from Python: that signal is not deferred
    previous = {signum: signal.getsignal(signum) for signum in signums}
    previous = {signum: handler for signum, handler in previous.items() if handler is not None}
    for signum in previous:
        signal.signal(signum, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


def remove_stale_temporaries(path):
    """Delete `<path>.tmp<pid>` files left by saves that were killed mid-write (never our own)."""
    folder, name = os.path.split(os.path.abspath(path))
    own = f"{name}.tmp{os.getpid()}"
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        if entry.startswith(f"{name}.tmp") and entry[len(name) + 4:].isdigit() and entry != own:
            try:
                os.remove(os.path.join(folder, entry))
            except OSError:
                pass  # another process's file that vanished meanwhile: nothing to clean


def lock_folder(folder, flag="--out", check=None):
    """Hold an exclusive lock on FOLDER/.lock for the life of this process, or raise a UserError naming
    the holder (host and pid, which the holder writes into the file). `check()`, run under the lock
    before anything is written, may refuse the folder (a UserError): the lock is then released and the
    file left as it was.

    flock: the kernel drops the lock when its holder dies, however (SIGKILL, a node's OOM killer), so
    a stale .lock file never blocks a resume; the file stays (removing it would race with a new holder).
    Forked children (data loader workers) close their copy at once, or an orphaned worker would keep
    the lock alive after its parent died.
    """
    path = os.path.join(folder, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"{flag} {folder}: cannot write there ({err.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that has not written its name yet"
        os.close(fd)
        raise UserError(f"{flag} {folder}: in use by another run ({holder}); wait for it to end, or choose "
                        f"another {flag}") from None
    try:
        if check is not None:
            check()
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode(), 0)
    _HELD_LOCKS[os.path.realpath(folder)] = fd


def unlock_folder(folder):
    """Release lock_folder's lock (a run that ends without its process ending: train.main in a test)."""
    fd = _HELD_LOCKS.pop(os.path.realpath(folder), None)
    if fd is not None:
        _close_quietly(fd)


_HELD_LOCKS = {}  # folder -> file descriptor of lock_folder, open until the run ends


def _close_quietly(fd):
    try:
        os.close(fd)
    except OSError:
        pass  # already closed in this child


def _release_locks_in_child():
    """A forked child (a loader worker) holds none of its parent's locks: it closes their descriptors."""
    for fd in _HELD_LOCKS.values():
        _close_quietly(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_release_locks_in_child)


def load_checkpoint(path):
    """Load a checkpoint file on CPU; a missing or unreadable file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise UserError(f"checkpoint {path}: not a readable torch checkpoint ({type(err).__name__})") from None


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Metrics: one confusion matrix over the whole split, IoU per class, mIoU over a class subset
# --------------------------------------------------------------------------------------------------
def confusion_matrix(pred, label, num_classes):
    """(C, C) int64 counts, rows = ground truth, columns = prediction; label 255 is skipped.

    pred, label: integer tensors of the same shape (any), values in [0, C) (labels may be 255).
    """
    valid = label != IGNORE_INDEX  # (...)
    index = label[valid].long() * num_classes + pred[valid].long()  # (N,)
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def iou_per_class(confusion):
    """IoU = TP / (TP + FP + FN) per class, float64; NaN for a class absent from labels and predictions."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return tp / union  # 0/0 -> NaN marks "never seen", excluded by nanmean below


def mean_iou(iou, classes):
    """mIoU in percent over the class indices `classes` (NaN entries -- class never seen -- skipped)."""
    values = iou[list(classes)]
    values = values[~torch.isnan(values)]
    return 100.0 * values.mean().item() if values.numel() else float("nan")


def format_duration(seconds):
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
