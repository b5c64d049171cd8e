"""The cost tool (uda/bench/cost.py): methods built without train.py get train.py's flags, the shared
timing loop takes turns, and two cheap measurements run end to end with finite figures."""
import math
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

import train
from uda import bench, flags
from uda.bench import cost


def run_cost(*args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "uda.bench.cost", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=timeout)


def table_rows(stdout):
    """The body rows of the first markdown table in stdout, as lists of cell strings."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(lines) >= 3 and set(lines[1]) <= set("|-"), stdout
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_method_registry_and_defaults_are_train_py_s():
    """The tools' defaults (flags.defaults: every common flag) are those a run parses without any flag but --out."""
    assert bench.METHODS is train.METHODS
    for method, source in (("source_only", "toy-synth"), ("daformer", "toy-synth"), ("daformer", "gta5"),
                           ("fada", "gta5")):
        parsed = vars(flags.parse_args(["--method", method, "--source", source, "--out", "unused"]))
        ours = flags.defaults(method, source)
        assert set(ours) == set(flags.common_defaults()) and ours == {k: parsed[k] for k in ours}, (method, source)


@pytest.mark.parametrize("method", list(train.METHODS))
def test_method_args_equal_train_parse_args(method):
    """Every value a method can read is the one train.py would give it: defaults, RECIPE, flags."""
    ours = vars(cost.method_args(method, batch_size=2, lovasz_weight=0.5))
    theirs = vars(flags.parse_args(["--method", method, "--out", "unused", "--batch-size", "2",
                                    "--lovasz-weight", "0.5"]))
    assert {key: theirs[key] for key in ours} == ours
    # the method's own flags: every one train.py has (train.py's own flags aside)
    common = vars(flags.parse_args(["--method", "source_only", "--out", "unused"]))
    assert set(theirs) - set(common) <= set(ours)


def test_method_flags_are_parsed_with_the_method_s_types():
    ours = cost.method_args("dida", ["--dida-mode", "released"], iters=10)
    theirs = flags.parse_args(["--method", "dida", "--out", "unused", "--dida-mode", "released", "--iters", "10"])
    assert ours.dida_mode == theirs.dida_mode == "released" and ours.stop_iter == theirs.stop_iter == 10
    with pytest.raises(cost.common.UserError, match="--method dida: unrecognized arguments: --nosuch"):
        cost.method_args("dida", ["--nosuch"])


def test_time_in_turns_alternates_and_takes_medians():
    calls = []

    def run(name, seconds):
        def step(i, batch):
            calls.append((name, i, batch))
            time.sleep(seconds)
        return step

    times = cost.time_in_turns({"a": run("a", 0.0), "b": run("b", 0.02)}, steps=3, warmup=1,
                               device=cost.torch.device("cpu"), batches=lambda i: 10 * i)
    assert calls == [(n, i, 10 * i) for i in range(4) for n in ("a", "b")]  # A B A B ..., one batch per turn
    assert times["b"][0] >= 0.02 > times["a"][0] and times["b"][1] < 0.02  # sleeping costs wall time, not CPU


@pytest.mark.parametrize("what, flags, rows, numbers", [
    ("backbones", ["--backbones", "tiny", "--crop", "64x32", "--steps", "2", "--warmup", "1"], ["tiny"], 4),
    ("fada", ["--device", "cpu", "--crop", "64x32", "--batch-size", "1", "--steps", "2", "--warmup", "1"],
     ["source_only", "fada", "fada generator step", "fada discriminator step"], 3),
])
@pytest.mark.slow
def test_cheap_measurements_print_finite_figures(what, flags, rows, numbers):
    proc = run_cost("--what", what, *flags)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = table_rows(proc.stdout)
    assert [row[0] for row in table] == rows
    for row in table:
        values = [float(cell) for cell in row[1:] if cell.replace(".", "", 1).isdigit()]
        assert len(values) == numbers and all(math.isfinite(v) and v >= 0 for v in values), row
    if what == "fada":
        assert float(table[0][3]) == 1.0  # ratios are to the first row


@pytest.mark.slow
def test_unknown_measurement_is_a_one_line_error():
    proc = run_cost("--what", "nosuch", timeout=120)
    assert proc.returncode == 2 and "--what" in proc.stderr and "nosuch" in proc.stderr
    assert "Traceback" not in proc.stderr
