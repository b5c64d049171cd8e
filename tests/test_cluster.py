"""Runs on a cluster (train.py): nothing lost under SLURM / Kubernetes signals, torchrun restarts and
resubmissions, divergence, or two jobs on one folder. Each test names the case it checks; torchrun runs
use gloo on the CPU with tiny sizes."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import REPO, TOY_FAST, run_script
from uda import common
from uda.methods import METHODS

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TINY = ["--iters", "4", "--batch-size", "2", "--lr", "0.01", "--eval-every", "0", "--no-eval", "--log-every", "1",
        "--workers", "0", "--device", "cpu", "--crop", "64x32"]


def assert_one_error(result, *fragments, code=2):
    """One `error:` line holding every fragment, no traceback, exit `code`. code None: a torchrun launch,
    non-zero, whose agent prints its own ChildFailedError report; no rank adds a traceback ([rankN]:)."""
    output = result.stdout + result.stderr
    if code is None:
        assert result.returncode != 0 and "[rank" not in output, output
    else:
        assert result.returncode == code and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def load(path):
    return torch.load(path, weights_only=False)


def training_tensors(path):
    """Every floating-point tensor of a checkpoint's model and method state (optimizers, teachers,
    discriminators, banks, statistics), by path."""
    ckpt = load(path)
    return dict(train.float_tensors({"model": ckpt["model"], "method": ckpt["method"]}, ""))


def assert_same_training_state(a, b):
    ta, tb = training_tensors(a), training_tensors(b)
    assert ta.keys() == tb.keys() and ta
    differing = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differing, differing[:5]


def torchrun(*args, nproc=2, launcher=("--standalone",), timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}",
           os.path.join(REPO, "train.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=timeout)


def start(*args, session=True):
    """train.py in its own process group (as a scheduler's job step), stdout and stderr piped."""
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=session)


def wait_for_line(proc, prefix, seen):
    """Read stdout lines into `seen` until one starts with `prefix` (False when the process ended first)."""
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return True
    return False


def environment(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if b"=" in item)


def catches(pid, signum):
    """Whether process `pid` has a handler for `signum` (its SigCgt mask)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(mask >> (signum - 1) & 1)


def children(pid):
    """The pids of a process's children (its data loader workers)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(p) for p in f.read().split()]
    return found


# ---------------------------------------------------------------- 1. divergence
def test_non_finite_state_is_named_and_never_saved():
    """Unit: a NaN in an optimizer state (finite weights) is found and named with the iteration."""
    state = {"model": {"w": torch.ones(3)},
             "method": {"optimizer": {"state": {0: {"momentum_buffer": torch.tensor([1.0, float("nan")])}}},
                        "generator": torch.zeros(4, dtype=torch.uint8)}}
    with pytest.raises(common.UserError, match=r"method/optimizer/state/0/momentum_buffer is not finite after "
                                               r"iteration 7.*no checkpoint was saved yet"):
        train.check_finite_state(state, 7, "/nonexistent/last.pt")
    state["method"]["optimizer"]["state"][0]["momentum_buffer"][1] = 0.0
    train.check_finite_state(state, 7, "/nonexistent/last.pt")  # all finite: no error


@pytest.mark.slow
def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    """--lr 1e6 with a save every iteration ends with one line naming a tensor or loss
    term and the iteration, and last.pt is the previous, all-finite state."""
    out = tmp_path / "run"
    result = run_script("train.py", "--out", out, *TOY_FAST, "--iters", "60", "--lr", "1e6", "--eval-every", "1",
                        "--no-eval", "--log-every", "1")
    line = assert_one_error(result, "training stopped", "the last good checkpoint is")
    stopped = int(line.split(" iteration ")[1].split(":")[0])
    ckpt = load(out / "last.pt")
    assert ckpt["iter"] == stopped - 1 and f"(iteration {stopped - 1})" in line
    assert all(torch.isfinite(t).all() for t in training_tensors(out / "last.pt").values())


# ---------------------------------------------------------------- 2. one run per folder
@pytest.mark.slow
def test_second_run_on_one_out_is_refused_and_a_killed_run_blocks_nothing(tmp_path):
    """A second run (python or torchrun) on the folder of a running one is refused with one
    line naming host and pid, leaving the files alone; after the first is SIGKILLed (its loader workers
    orphaned), --resume auto continues at once."""
    out = tmp_path / "run"
    first = start("--out", out, *TOY_FAST, "--iters", "400", "--log-every", "1", "--save-every", "2",
                  "--workers", "2", "--seed", "0")
    try:
        seen = []
        assert wait_for_line(first, "iter 5/", seen), "".join(seen) + first.stderr.read()
        second = run_script("train.py", "--out", out, *TOY_FAST, "--iters", "400", "--seed", "1", "--resume", "auto")
        assert_one_error(second, "in use by another run", f"pid {first.pid}", socket.gethostname())
        ranked = torchrun("--out", out, *TOY_FAST, "--iters", "400", "--resume", "auto")
        assert_one_error(ranked, "in use by another run", f"pid {first.pid}", code=None)
        workers = children(first.pid)
        assert len(workers) == 2
        for pid in workers:  # they closed their inherited copy of the lock at once
            assert not [fd for fd in os.listdir(f"/proc/{pid}/fd")
                        if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(os.sep + ".lock")]
    finally:
        first.send_signal(signal.SIGKILL)  # the main process only: its workers live on for a while
        first.communicate(timeout=60)
    common.lock_folder(str(out))  # free at once, orphaned workers or not
    common.unlock_folder(str(out))
    saved = load(out / "last.pt")["iter"]
    resumed = run_script("train.py", "--out", out, *TOY_FAST, "--iters", str(saved + 2), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and load(out / "last.pt")["iter"] == saved + 2


# ---------------------------------------------------------------- 3. SIGTERM / SIGINT however delivered
DELIVERIES = ["group", "group", "group", "group twice", "group twice", "main only", "workers first", "ctrl-c group"]


@pytest.mark.slow
def test_stop_signals_at_random_moments_leave_a_complete_checkpoint(tmp_path):
    """SIGTERM to the whole process group (or to the main process only, to the workers
    first, twice in a row; SIGINT to the group), at random moments of a run with --workers 2 and a save
    every 2 iterations: exit 143 / 130, no traceback, the resume command printed, and last.pt a complete
    checkpoint of the iteration the message names; no temporary file left behind."""
    rng = random.Random()
    seed = rng.randrange(10 ** 6)
    rng.seed(seed)
    for attempt, delivery in enumerate(DELIVERIES):
        out = tmp_path / f"run{attempt}"
        proc = start("--out", out, *TOY_FAST, "--iters", "400", "--log-every", "1", "--save-every", "2",
                     "--workers", "2")
        seen = []
        assert wait_for_line(proc, "iter 1/", seen), "".join(seen) + proc.stderr.read()
        time.sleep(rng.uniform(0.0, 1.5))
        signum = signal.SIGINT if delivery.startswith("ctrl-c") else signal.SIGTERM
        if delivery == "main only":
            proc.send_signal(signum)
        elif delivery == "workers first":
            for pid in children(proc.pid):
                os.kill(pid, signum)
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signum)
        else:
            os.killpg(proc.pid, signum)
        if delivery == "group twice":
            time.sleep(rng.uniform(0.0, 0.2))
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass  # already gone
        rest, err = proc.communicate(timeout=120)
        output = "".join(seen) + rest + err
        context = f"attempt {attempt} ({delivery}, random seed {seed}):\n{output}"
        assert proc.returncode == 128 + signum, context
        assert "Traceback" not in output and "disk" not in output, context
        messages = [line for line in output.splitlines() if line.startswith("interrupted")]
        assert len(messages) == 1, context
        if "before the first checkpoint" in messages[0]:  # a second signal before the first save
            assert delivery == "group twice" and not (out / "last.pt").exists(), context
            continue
        assert messages[0].startswith("interrupted at iteration") and "resume with: python " in messages[0], context
        done = int(messages[0].split()[3].rstrip(";"))
        assert load(out / "last.pt")["iter"] == done, context
        assert sorted(os.listdir(out)) == [".lock", "last.pt", "metrics.jsonl"], context


def test_signals_wait_for_the_checkpoint_and_an_interrupted_write_is_no_full_disk(tmp_path, monkeypatch):
    """A SIGTERM (here raised by the handler, as the loader's SIGCHLD handler does)
    arriving inside torch.save is handled after the file is complete; an exception that is not the file
    system's is re-raised as itself, not reported as a full disk, and the previous file stays."""
    path = tmp_path / "last.pt"
    common.atomic_save({"x": 1}, path)
    real_save, delivered = torch.save, []

    def save_hit_by_a_signal(obj, f):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered while the file is half written
        time.sleep(0.05)
        real_save(obj, f)

    def handler(signum, frame):
        delivered.append(load(path)["x"])  # by now the new file is complete
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        monkeypatch.setattr(torch, "save", save_hit_by_a_signal)
        with pytest.raises(RuntimeError, match="DataLoader worker"):
            common.atomic_save({"x": 2}, path)
        assert delivered == [2] and load(path)["x"] == 2 and os.listdir(tmp_path) == ["last.pt"]

        def interrupted_write(obj, f):
            open(f, "wb").write(b"partial")
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")
        monkeypatch.setattr(torch, "save", interrupted_write)
        with pytest.raises(RuntimeError, match="DataLoader worker"):  # not a UserError "is the disk full?"
            common.atomic_save({"x": 3}, path)
        assert load(path)["x"] == 2 and os.listdir(tmp_path) == ["last.pt"]
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- 4. exact resume under torchrun, every method
@pytest.fixture(scope="module")
def pseudo_dir(tmp_path_factory):
    """Pseudo-labels of every toy-real train image (one striped label, hard-linked), for selftrain."""
    pseudo = tmp_path_factory.mktemp("pseudo")
    (pseudo / "labelspace.json").write_text(json.dumps({"trainids": list(range(19)),
                                                        "eval_sets": {"mIoU9": [0, 1, 2, 5, 7, 8, 10, 11, 13]}}))
    stripes = np.repeat(np.array([0, 13, 10, 255], np.uint8), 32)[None, :].repeat(128, 0)  # (128, 128)
    first = pseudo / "toy-real_train_00000.png"
    Image.fromarray(np.concatenate([stripes, stripes], 1)).save(first)  # (128, 256), the toy's size
    for i in range(1, 4000):
        os.link(first, pseudo / f"toy-real_train_{i:05d}.png")
    return pseudo


def method_flags(method, pseudo):
    """The tiny toy setting of each method: uniform source sampling (no class statistics to compute);
    selftrain trains on pseudo-labelled toy-real."""
    extra = {"selftrain": ["--source", "toy-real", "--pseudo-dir", pseudo, "--selftrain-crop", "64x32"]}
    return ["--method", method, *TINY, "--source-sampler", "uniform", *extra.get(method, [])]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_torchrun_resume_is_exact_for_every_method(tmp_path, method, pseudo_dir):
    """2 processes, 4 iterations straight vs. 2 (a save at no evaluation point of the
    straight run) + resume: every float tensor of last.pt is identical, and last.pt holds both ranks'
    random streams (the method generators differ per rank)."""
    flags = method_flags(method, pseudo_dir)
    straight = torchrun("--out", tmp_path / "a", *flags)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    first = torchrun("--out", tmp_path / "b", *flags, "--stop-iter", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun("--out", tmp_path / "b", *flags, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    ckpt = load(tmp_path / "b" / "last.pt")
    assert ckpt["iter"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    if "generator" in ckpt["method"]:
        assert not torch.equal(ckpt["rng"][0]["generator"], ckpt["rng"][1]["generator"])
        assert torch.equal(ckpt["rng"][0]["generator"], ckpt["method"]["generator"])
    assert_same_training_state(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")


# ---------------------------------------------------------------- 5. 6. 7. what a resume refuses or accepts
@pytest.mark.slow
def test_resume_on_another_number_of_processes(tmp_path):
    """1 process x batch 2 resumed on 2 processes: refused with both global batches and
    the --batch-size that keeps it; with that --batch-size, accepted with a note that it is not exact."""
    out = tmp_path / "run"
    assert run_script("train.py", "--out", out, *TINY, "--stop-iter", "2").returncode == 0
    before = (out / "last.pt").read_bytes()
    refused = torchrun("--out", out, *TINY, "--resume", "auto")
    assert_one_error(refused, "global batch of 2", "2 x 2 = 4", "--batch-size 1 keeps it", code=None)
    assert (out / "last.pt").read_bytes() == before
    accepted = torchrun("--out", out, *TINY, "--batch-size", "1", "--resume", "auto")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert "random streams are re-split" in accepted.stdout and "not bit-exact" in accepted.stdout
    ckpt = load(out / "last.pt")
    assert ckpt["iter"] == 4 and ckpt["world_size"] == 2


@pytest.mark.slow
def test_resume_on_other_class_names_is_refused(tmp_path):
    """The same number of classes under other names: refused, naming the first one."""
    from make_folder_dataset import make
    root = tmp_path / "data"
    make(root, train=4, val=1)
    flags = ["--source", "folder", "--source-root", root, "--target", "folder", "--target-root", root,
             "--backbone", "tiny", *TINY]
    out = tmp_path / "run"
    assert run_script("train.py", "--out", out, *flags, "--stop-iter", "2").returncode == 0
    classes = json.loads((root / "classes.json").read_text())
    assert classes["classes"][2] == "building"
    classes["classes"][2] = "house"
    (root / "classes.json").write_text(json.dumps(classes))
    assert_one_error(run_script("train.py", "--out", out, *flags, "--resume", "auto"),
                     "class 2 is 'building' there and 'house' in this dataset")
    assert load(out / "last.pt")["iter"] == 2


@pytest.mark.slow
def test_resume_auto_of_a_finished_run_succeeds(tmp_path):
    """A requeued job of a finished run exits 0 with one line and changes nothing; an
    explicit --resume of it stays an error."""
    out = tmp_path / "run"
    assert run_script("train.py", "--out", out, *TINY).returncode == 0
    before = {name: (out / name).read_bytes() for name in ("last.pt", "metrics.jsonl")}
    again = run_script("train.py", "--out", out, *TINY, "--resume", "auto")
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert again.stdout.strip() == f"{out} already finished at iteration 4"
    assert {name: (out / name).read_bytes() for name in before} == before
    assert_one_error(run_script("train.py", "--out", out, *TINY, "--resume", out / "last.pt"),
                     "already at iteration 4")


# ---------------------------------------------------------------- 8. multi-node and elastic restarts
ELASTIC = ["--method", "fada", *TINY, "--iters", "12", "--source-sampler", "uniform", "--save-every", "1",
           "--resume", "auto"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 2-process run of ELASTIC: (stdout, last.pt)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = torchrun("--out", out, *ELASTIC)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, out / "last.pt"


def checksums(stdout):
    return sorted(line.split("checksum ")[1] for line in stdout.splitlines() if "parameter checksum" in line)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous_match_one_launch(tmp_path, reference_run):
    """Two torchrun launches (--nnodes 2 --nproc_per_node 1, c10d rendezvous on
    127.0.0.1) end with the checksum and last.pt of one --nproc_per_node 2 launch."""
    launcher = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                "--rdzv-id", "cluster-test"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node=1",
           os.path.join(REPO, "train.py"), "--out", str(tmp_path / "run"), *map(str, ELASTIC)]
    nodes = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    stdout = "".join(out for out, _ in outputs)
    assert len(checksums(stdout)) == 2 and set(checksums(stdout)) == set(checksums(reference_run[0]))
    assert_same_training_state(tmp_path / "run" / "last.pt", reference_run[1])


@pytest.mark.slow
def test_elastic_restart_after_a_killed_worker_resumes_exactly(tmp_path, reference_run):
    """torchrun --max-restarts 2, rank 1 SIGKILLed mid-run: the group restarts, resumes
    from last.pt (--resume auto) and ends with the weights of the uninterrupted run."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts", "2",
           "--monitor-interval", "0.5", os.path.join(REPO, "train.py"), "--out", str(out), *map(str, ELASTIC)]
    agent = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    seen = []
    assert wait_for_line(agent, "iter 5/", seen), "".join(seen)
    rank1 = [pid for pid in children(agent.pid) if environment(pid).get("RANK") == "1"]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    try:
        rest, err = agent.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        workers = children(agent.pid)  # a rank stuck in its process group's set-up ignores SIGTERM
        for pid in [agent.pid, *workers]:
            os.kill(pid, signal.SIGKILL)
        rest, err = agent.communicate()
        raise AssertionError("".join(seen) + rest + err) from None
    output = "".join(seen) + rest + err
    assert agent.returncode == 0, output[-4000:]
    assert "resumed from" in rest, output[-4000:]
    assert_same_training_state(out / "last.pt", reference_run[1])
    assert set(checksums(rest)) == set(checksums(reference_run[0]))


# ---------------------------------------------------------------- 12. one line where a traceback was
@pytest.mark.slow
@pytest.mark.parametrize("moment", ["import", "class statistics"])
def test_ctrl_c_before_training_is_one_line(tmp_path, moment):
    """Ctrl-C (SIGINT to the process group, loader workers included) while torch is
    imported, or while the samplers' class statistics are computed: one line, exit 130."""
    out = tmp_path / "run"
    proc = start("--out", out, *TOY_FAST, "--source-sampler", "rcs", "--workers", "2")
    seen = []
    if moment == "import":  # train.py's handlers are in (SIGTERM caught), torch is being imported
        while proc.poll() is None and not catches(proc.pid, signal.SIGTERM):
            time.sleep(0.01)
    else:
        assert wait_for_line(proc, "computing per-image class statistics", seen), "".join(seen)
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(seen) + rest, err)
    assert_one_error(result, "interrupted (SIGINT) before training started", code=130)
    assert not (out / "last.pt").exists()


@pytest.mark.slow
def test_full_disk_while_appending_metrics_is_one_line(tmp_path, monkeypatch, capsys):
    """ENOSPC when appending to metrics.jsonl (after the save at iteration 2) stops the
    run with a UserError naming the file and the last good checkpoint, which is intact."""
    import builtins
    real_open = builtins.open
    appends = []

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(28, "No space left on device")

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if str(path).endswith("metrics.jsonl") and mode == "a":
            appends.append(path)
            if len(appends) >= 3:  # iterations 1 and 2 were logged, 2 saved
                return FullFile(f)
        return f

    out = tmp_path / "run"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    try:
        with pytest.raises(common.UserError) as err:
            train.main(["--out", str(out), *TINY, "--iters", "6", "--save-every", "2"])
    finally:
        monkeypatch.undo()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    text = str(err.value)
    assert "\n" not in text and "metrics.jsonl" in text and "is the disk full?" in text
    assert "stopped at iteration 3" in text and "the last good checkpoint is" in text and "(iteration 2)" in text
    assert load(out / "last.pt")["iter"] == 2
    assert [r["iter"] for r in train.read_records(out / "metrics.jsonl")] == [1, 2]


@pytest.mark.slow
def test_loader_worker_killed_by_the_oom_killer_is_one_line(tmp_path):
    """SIGKILL to one loader worker (what the out-of-memory killer does): one line naming
    the worker and the signal, exit 2, last.pt intact at its last save."""
    out = tmp_path / "run"
    proc = start("--out", out, *TOY_FAST, "--iters", "400", "--log-every", "1", "--save-every", "2", "--workers", "2")
    seen = []
    assert wait_for_line(proc, "iter 5/", seen), "".join(seen)
    victim = children(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    rest, err = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(seen) + rest, err)
    line = assert_one_error(result, f"pid {victim}", "Killed", "out-of-memory killer", "the last good checkpoint is")
    saved = load(out / "last.pt")["iter"]
    assert saved >= 4 and f"(iteration {saved})" in line
