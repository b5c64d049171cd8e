"""The toy benchmark harness (uda/bench/toy.py): a tiny-budget end-to-end run, the pipeline it builds,
and the summary maths against hand-computed numbers."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

from conftest import REPO

from uda import fada, plca
from uda.bench import toy


def run_benchmark(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "uda.bench.toy", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_tiny_run_writes_results_json_and_table(tmp_path):
    out = tmp_path / "bench"
    proc = run_benchmark("--out", out, "--methods", "plca", "--seeds", "1", "--iters", "4",
                         "--warmup-iters", "4", "--batch-size", "2", "--windows", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    no_tta = "plca, no test-time aggregation"
    assert list(results["methods"]) == ["source_only", "oracle", "plca", no_tta]
    for name, entry in results["methods"].items():
        assert len(entry["miou"]) == 1 and 0.0 <= entry["miou"][0] <= 100.0, name
        assert entry["sec_per_iter"] > 0 and entry["peak_mem_mb"] > 50, name  # torch alone is more
    for name in ("source_only", "oracle", "plca"):
        run_dir = out / "runs" / "s0" / name
        assert (run_dir / "last.pt").is_file() and (run_dir / "eval.json").is_file()
        # the mIoU in the table is the one evaluate.py wrote
        assert results["methods"][name]["miou"][0] == json.loads((run_dir / "eval.json").read_text())["miou"]
    # the extra row: the same PLCA checkpoint (same cost figures), evaluated without aggregation
    plca_dir = out / "runs" / "s0" / "plca"
    assert json.loads((plca_dir / "eval_0.json").read_text())["tta_aggregate"] is False
    assert json.loads((plca_dir / "eval.json").read_text())["tta_aggregate"] is True
    assert results["methods"][no_tta]["miou"][0] == json.loads((plca_dir / "eval_0.json").read_text())["miou"]
    assert results["methods"][no_tta]["sec_per_iter"] == results["methods"]["plca"]["sec_per_iter"]
    assert results["methods"]["source_only"]["sec_per_iter_ratio"] == 1.0
    # every row started from the seed's warm-up checkpoint, with the same iterations and seed
    warm = str(out / "runs" / "s0" / "warmup" / "last.pt")
    for name in ("source_only", "oracle", "plca"):
        log = (out / "runs" / "s0" / name / "train.log").read_text()
        first = log.splitlines()[0]
        assert f"--pretrained {warm}" in first and "--iters 4" in first and "--seed 0" in first, first
    table = (out / "results.md").read_text()
    assert "| plca |" in table and "| oracle |" in table and "share of gap closed" in table


def test_pipeline_commands():
    args = toy.parse_args(["--out", "/tmp/unused", "--methods", "fada,sdca,daformer", "--seeds", "2",
                                 "--iters", "100", "--warmup-iters", "200"])
    assert args.rows == ["source_only", "oracle", "fada", "sdca", "daformer", "fada+selftrain"]
    assert "plca, no test-time aggregation" in toy.parse_args(["--out", "/x", "--methods", "plca"]).rows
    tasks = {t.key: t for t in toy.build_tasks(args, args.methods)}
    assert set(tasks) == {f"s{s}/{n}" for s in (0, 1) for n in ["warmup", *args.rows]}
    assert tasks["s0/fada"].evals == [("fada", "eval.json")]
    for seed in (0, 1):
        warm = tasks[f"s{seed}/warmup"]
        assert warm.deps == [] and "--pretrained" not in warm.commands[0]
        for name in args.rows:
            task = tasks[f"s{seed}/{name}"]
            cmd = task.commands[task.train_index]
            assert cmd[cmd.index("--iters") + 1] == "100" and cmd[cmd.index("--seed") + 1] == str(seed)
            assert cmd[cmd.index("--pretrained") + 1] == os.path.join(warm.run_dir, "last.pt")
            assert task.commands[-1][1].endswith("evaluate.py") and "--json" in task.commands[-1]
        oracle = tasks[f"s{seed}/oracle"].commands[0]
        assert oracle[oracle.index("--source") + 1] == "toy-real"
        sdca = tasks[f"s{seed}/sdca"]  # init pass first, its statistics handed to training
        assert sdca.train_index == 1 and sdca.commands[0][2:4] == ["uda.sdca", "init"]
        stats = sdca.commands[0][sdca.commands[0].index("--out") + 1]
        assert sdca.commands[1][sdca.commands[1].index("--sdca-init-stats") + 1] == stats
        selftrain = tasks[f"s{seed}/fada+selftrain"]  # pseudo-labels of this seed's FADA model
        assert selftrain.deps == [f"s{seed}/fada"] and "--save-pseudo" in selftrain.commands[0]
        daformer = tasks[f"s{seed}/daformer"].commands[0]  # AdamW recipe kept, warm-up scaled to the budget
        assert "--lr" not in daformer and daformer[daformer.index("--warmup-iters") + 1] == str(round(100 * 1500 / 40000))
        selftrain_cmd = selftrain.commands[selftrain.train_index]
        assert selftrain_cmd[selftrain_cmd.index("--selftrain-crop") + 1] == "128x64"
    for task in tasks.values():  # every training stops where its schedule ends, whatever a RECIPE says
        for cmd in task.commands:
            if cmd[1].endswith("train.py"):
                assert cmd[cmd.index("--stop-iter") + 1] == cmd[cmd.index("--iters") + 1]


def test_recipe_values_new_to_the_toy_are_pinned(monkeypatch):
    """A RECIPE's sampler, momentum ... fall back to train.py's defaults on the toy; align_corners,
    lovasz_weight and what a method set before RECIPEs existed (PLCA: head x1) stay; BN is train.py's."""
    monkeypatch.setattr(fada, "RECIPE", {"lr": 2.5e-4, "source_sampler": "class-balanced", "bn": "frozen",
                                         "momentum": 0.5, "align_corners": True, "stop_iter": 40000})
    monkeypatch.setattr(plca, "RECIPE", {"head_lr_mult": 1.0, "bn": "train", "lovasz_weight": 1.5,
                                         "source_sampler": "class-balanced"})
    args = toy.parse_args(["--out", "/x", "--methods", "fada,plca", "--lr", "0.02"])
    assert toy.toy_flags("fada", args) == ["--lr", "0.02", "--source-sampler", "uniform", "--momentum", "0.9"]
    assert toy.toy_flags("plca", args) == ["--lr", "0.02", "--source-sampler", "uniform"]


def record(row, miou, sec=0.1, mem=400.0):
    return {"miou": miou, "miou_by_row": {row: miou}, "sec_per_iter": sec, "peak_mem_mb": mem}


def test_summary_maths():
    rows = ["source_only", "oracle", "m"]
    values = {"source_only": [(20.0, 0.1), (22.0, 0.1)], "oracle": [(40.0, 0.2), (42.0, 0.2)],
              "m": [(25.0, 0.3), (21.0, 0.5)]}
    tasks = []
    for name, runs in values.items():
        for seed, (miou, sec) in enumerate(runs):
            task = toy.Task(f"s{seed}/{name}", "/nonexistent", [], 0, row=name, seed=seed)
            task.result = record(name, miou, sec, 500.0 if name == "m" else 400.0)
            tasks.append(task)
    methods = toy.summarize(tasks, rows)
    m = methods["m"]
    assert m["miou_mean"] == 23.0 and math.isclose(m["miou_std"], math.sqrt(8.0))
    assert m["gain"] == 2.0 and math.isclose(m["gap_closed"], 2.0 / 20.0)
    assert m["seeds_above_source_only"] == 1  # 25 > 20, 21 < 22
    assert math.isclose(m["sec_per_iter_ratio"], 4.0) and math.isclose(m["peak_mem_ratio"], 1.25)
    assert methods["oracle"]["gap_closed"] == 1.0
    table = toy.markdown_table(methods)
    assert "| m | 23.00 ± 2.83 | 25.0, 21.0 | +2.00 | 1/2 | 10% | 0.4000 | 4.00 | 500 | 1.25 |" in table


def test_failed_run_is_reported_not_hidden():
    tasks = [toy.Task("s0/source_only", "/x", [], 0, row="source_only", seed=0),
             toy.Task("s0/m", "/x", [], 0, row="m", seed=0)]
    tasks[0].result = record("source_only", 20.0)
    tasks[1].result = {"error": "exit 1 of command 1; see /x/train.log", "wall_s": 1.0}
    methods = toy.summarize(tasks, ["source_only", "m"])
    assert methods["m"]["miou"] == [] and methods["m"]["errors"]
    assert "| m | failed: exit 1" in toy.markdown_table(methods)


def test_unknown_method_is_a_one_line_error(tmp_path):
    proc = run_benchmark("--out", tmp_path, "--methods", "fada,nosuch", timeout=120)
    assert proc.returncode == 2 and "--methods" in proc.stderr and "nosuch" in proc.stderr
    assert "Traceback" not in proc.stderr
