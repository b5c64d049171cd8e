"""Long runs that survive (train.py): nothing a user made is overwritten, every bad input is one line,
interrupts save and print the exact resume command, resume is exact, temp files are cleaned up."""
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TOY_FAST, assert_user_error, run_script
from uda import common


def digest(folder):
    """{relative path: sha256} of every file under folder: 'byte-identical afterwards' in one comparison."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def float_tensors(obj, prefix=""):
    """Every floating-point tensor of a (nested) checkpoint, by a path-like key."""
    if torch.is_tensor(obj):
        return {prefix: obj} if obj.is_floating_point() else {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    found = {}
    for key, value in items:
        found.update(float_tensors(value, f"{prefix}/{key}"))
    return found


def assert_same_checkpoints(a, b):
    ta = float_tensors({k: v for k, v in torch.load(a, weights_only=False).items() if k in ("model", "method")})
    tb = float_tensors({k: v for k, v in torch.load(b, weights_only=False).items() if k in ("model", "method")})
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def flags(**changes):
    """TOY_FAST with some values replaced (keys in flag form without the dashes: iters=8)."""
    out = list(TOY_FAST)
    for key, value in changes.items():
        flag = "--" + key.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = str(value)
        else:
            out += [flag, str(value)]
    return out


# ---------------------------------------------------------------- nothing a user made is lost
@pytest.mark.slow
def test_resume_into_a_folder_of_another_run_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_script("train.py", "--out", a, *flags(iters=4), "--stop-iter", "2").returncode == 0
    assert run_script("train.py", "--out", b, *flags(iters=4)).returncode == 0
    before = digest(b)
    assert_user_error(run_script("train.py", "--out", b, *flags(iters=4), "--resume", a / "last.pt"),
                      "--out", "another run")
    assert digest(b) == before
    # into an empty folder it continues A's run
    assert run_script("train.py", "--out", tmp_path / "c", *flags(iters=4), "--resume", a / "last.pt").returncode == 0


@pytest.mark.slow
def test_out_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    assert_user_error(run_script("train.py", "--out", path, *TOY_FAST), "--out", "not a folder")
    assert path.read_text() == "mine"


@pytest.mark.slow
def test_resume_auto_starts_fresh_then_resumes(tmp_path):
    out = tmp_path / "run"
    first = run_script("train.py", "--out", out, *flags(iters=6), "--stop-iter", "3", "--resume", "auto")
    assert first.returncode == 0, first.stderr
    assert torch.load(out / "last.pt", weights_only=False)["iter"] == 3
    second = run_script("train.py", "--out", out, *flags(iters=6), "--resume", "auto")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout
    assert torch.load(out / "last.pt", weights_only=False)["iter"] == 6


@pytest.mark.slow
def test_torn_metrics_line_and_stale_temp_files(tmp_path):
    out = tmp_path / "run"
    assert run_script("train.py", "--out", out, *flags(iters=6), "--stop-iter", "3").returncode == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iter": 4, "loss/c')  # a kill mid-write
    stale = out / f"last.pt.tmp{999999}"
    stale.write_bytes(b"half a checkpoint")
    resumed = run_script("train.py", "--out", out, *flags(iters=6), "--resume", out / "last.pt")
    assert resumed.returncode == 0, resumed.stderr
    assert not stale.exists()
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["iter"] for r in records if "loss/ce" in r] == [1, 2, 3, 4, 5, 6]


def test_failed_checkpoint_write_is_one_line_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    common.atomic_save({"x": 1}, path)
    before = path.read_bytes()

    def full_disk(obj, f):
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(common.UserError, match="could not be written"):
        common.atomic_save({"x": 2}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


# ---------------------------------------------------------------- flags checked at parse time
@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--workers", "-1"), ("--log-every", "0"),
                                        ("--iters", "0"), ("--iters", "-5"), ("--lr", "nan"), ("--lr", "-1"),
                                        ("--eval-every", "-2")])
@pytest.mark.slow
def test_bad_counts_and_rates_are_refused(tmp_path, flag, value):
    assert_user_error(run_script("train.py", "--out", tmp_path / "x", *TOY_FAST, flag, value), flag)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_help_shows_recipe_defaults_and_choices():
    text = run_script("train.py", "--method", "daformer", "--help").stdout
    assert "6e-05" in text and "toy-synth" in text and "mit-b5" in text and "deeplabv2-r101" in text


def test_recipe_applies_and_explicit_flags_win():
    from uda import flags
    args, run = flags.parse(["--method", "daformer", "--out", "unused", "--lr", "0.01", "--source", "gta5"])
    assert args.lr == 0.01 and run.overridden == ["lr"] and args.weight_decay == 0.01 and args.crop == "512x512"
    line = flags.describe_recipe(args, run)
    assert "recipe of daformer" in line and "lr 0.01 (recipe 6e-05)" in line
    toy = flags.parse_args(["--method", "daformer", "--out", "unused"])
    assert toy.crop is None and toy.backbone == "tiny"  # real-data sizes and networks skip the toy


@pytest.mark.slow
def test_single_process_run_output(tmp_path):
    result = run_script("train.py", "--out", tmp_path / "s", *flags(iters=2))
    assert result.returncode == 0, result.stderr
    assert "recipe of source_only" in result.stdout
    assert "checksum" not in result.stdout  # a single process has no replicas to compare
    assert "iter 1/2" in result.stdout     # the first iterations are shown, not only every --log-every
    assert "lovasz" not in result.stdout   # a term that is off is not a column of zeros


@pytest.mark.slow
def test_single_value_batchnorm_is_one_line(tmp_path):
    # the tiny net at a 8x8 crop has a 1x1 feature map: trainable BN cannot normalise one value
    assert_user_error(run_script("train.py", "--out", tmp_path / "x", *flags(batch_size=1), "--crop", "8x8"),
                      "--batch-size")


@pytest.mark.slow
def test_resume_with_a_changed_architecture_flag_names_it(tmp_path):
    out = tmp_path / "run"
    assert run_script("train.py", "--method", "fada", "--out", out, *flags(iters=4), "--stop-iter", "2",
                      "--fada-d-width", "16").returncode == 0
    assert_user_error(run_script("train.py", "--method", "fada", "--out", out, *flags(iters=4),
                                 "--fada-d-width", "32", "--resume", out / "last.pt"), "--fada-d-width")


@pytest.mark.slow
def test_out_of_memory_is_one_line(tmp_path):
    script = ("import torch\nfrom uda import common\n"
              "def main():\n    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 120.00 GiB')\n"
              "common.run_cli(main)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert_user_error(result, "out of memory", "--crop")


# ---------------------------------------------------------------- interrupts
def interrupt_run(out, extra, signum, group):
    """Start train.py, send `signum` once it is training, return (returncode, stdout)."""
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter 5/"):
            # Ctrl-C reaches the whole foreground process group (loader workers too); a scheduler's
            # SIGTERM may reach only the main process
            os.killpg(proc.pid, signum) if group else proc.send_signal(signum)
            break
    rest, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + rest, err


@pytest.mark.parametrize("signum,workers", [(signal.SIGINT, 2), (signal.SIGTERM, 0)])
@pytest.mark.slow
def test_interrupt_saves_and_resume_matches_a_straight_run(tmp_path, signum, workers):
    extra = flags(iters=60, workers=workers, log_every=1000)
    code, stdout, stderr = interrupt_run(tmp_path / "cut", extra, signum, group=signum == signal.SIGINT)
    assert code == 128 + signum, stdout + stderr
    assert "Traceback" not in stdout + stderr
    message = [line for line in stdout.splitlines() if line.startswith("interrupted at iteration")]
    assert len(message) == 1, stdout
    done = int(message[0].split()[3].rstrip(";"))
    assert 5 <= done < 60 and torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["iter"] == done
    command = shlex.split(message[0].split("resume with: ", 1)[1])
    assert command[0] == "python" and command[command.index("--resume") + 1] == str(tmp_path / "cut" / "last.pt")
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    straight = run_script("train.py", "--out", tmp_path / "straight", *extra)
    assert straight.returncode == 0, straight.stderr
    assert_same_checkpoints(tmp_path / "cut" / "last.pt", tmp_path / "straight" / "last.pt")


# ---------------------------------------------------------------- broken files, named
def folder_run_flags(root, *extra):
    return ["--source", "folder", "--source-root", root, "--target", "folder", "--target-root", root,
            "--backbone", "tiny", "--crop", "96x64", *flags(iters=3), *extra]


@pytest.mark.slow
def test_unreadable_val_file_keeps_the_training(tmp_path):
    from make_folder_dataset import make
    root = tmp_path / "data"
    make(root, train=4, val=2)
    broken = next((root / "images" / "val").rglob("*.png"))
    broken.write_bytes(broken.read_bytes()[:200])  # truncated
    result = run_script("train.py", "--out", tmp_path / "run", *folder_run_flags(root))
    assert_user_error(result, str(broken), f"saved in {tmp_path / 'run' / 'last.pt'}")
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["iter"] == 3
    # kept means all of it: the same training without evaluation ends in the same weights and method state
    unevaluated = run_script("train.py", "--out", tmp_path / "no-eval", *folder_run_flags(root, "--no-eval"))
    assert unevaluated.returncode == 0, unevaluated.stderr
    assert_same_checkpoints(tmp_path / "run" / "last.pt", tmp_path / "no-eval" / "last.pt")


@pytest.mark.parametrize("workers", ["0", "2"])
@pytest.mark.slow
def test_unreadable_training_label_is_named_from_a_worker(tmp_path, workers):
    from make_folder_dataset import make
    root = tmp_path / "data"
    make(root, train=4, val=1)
    label = next((root / "labels" / "train").rglob("*.png"))
    label.write_bytes(b"")  # a 0-byte file
    before = digest(root)
    result = run_script("train.py", "--out", tmp_path / "run", *folder_run_flags(root, "--workers", workers))
    assert_user_error(result, str(label))
    assert digest(root) == before


@pytest.mark.slow
def test_torchrun_setup_error_is_one_line_from_rank_0(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("mine\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "train.py"), "--out", str(out), *TOY_FAST]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another run" in errors[0], output
    assert "[rank1]" not in output and "[rank0]" not in output  # no rank adds a traceback
    assert (out / "metrics.jsonl").read_text() == "mine\n"
