"""The toy benchmark harness (uda/bench/toy.py): a tiny-budget end-to-end run (with PLCA's recipe-only
control), the pipeline it builds (controls and --backbone included), and the summary maths (recipe and
idea columns too) against hand-computed numbers."""
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO

from uda import daformer, fada, flags, plca
from uda.bench import toy


def run_benchmark(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "uda.bench.toy", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_tiny_run_writes_results_json_and_table(tmp_path):
    out = tmp_path / "bench"
    proc = run_benchmark("--out", out, "--methods", "plca", "--seeds", "1", "--iters", "4",
                         "--warmup-iters", "4", "--batch-size", "2", "--windows", "2", "--controls", "on")
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
    # the recipe-only control (--controls on): PLCA's command with its terms off, from the same
    # warm-up, evaluated without test-time aggregation; not a row of its own
    control_dir = out / "runs" / "s0" / "plca-control"
    control = results["methods"]["plca"]["control"]
    assert control["flags"] == plca.CONTROL_FLAGS and control["seeds"] == [0]
    control_eval = json.loads((control_dir / "eval.json").read_text())
    assert control["miou"] == [control_eval["miou"]] and control_eval["tta_aggregate"] is False
    first = (control_dir / "train.log").read_text().splitlines()[0]
    assert f"--pretrained {warm}" in first and " ".join(plca.CONTROL_FLAGS) in first and "--seed 0" in first
    source_miou = results["methods"]["source_only"]["miou"][0]
    for name in ("plca", no_tta):  # paired per seed; recipe + idea = the row's gain
        entry = results["methods"][name]
        assert entry["idea_gain"] == [entry["miou"][0] - control["miou"][0]]
        assert entry["recipe_gain"] == [control["miou"][0] - source_miou]
    assert "recipe: control − source_only" in table and "`--plca-lambda-fass 0 --plca-lambda-cass 0" in table


def test_pipeline_commands():
    args = toy.parse_args(["--out", "/tmp/unused", "--methods", "fada,sdca,daformer", "--seeds", "2",
                           "--iters", "100", "--warmup-iters", "200", "--controls", "on"])
    assert args.rows == ["source_only", "oracle", "fada", "sdca", "daformer", "fada+selftrain"]
    assert "plca, no test-time aggregation" in toy.parse_args(["--out", "/x", "--methods", "plca"]).rows
    tasks = {t.key: t for t in toy.build_tasks(args, args.methods)}
    assert set(tasks) == {f"s{s}/{n}" for s in (0, 1)
                          for n in ["warmup", *args.rows, *(f"{m}-control" for m in args.methods)]}
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


def test_controls_are_planned_with_their_flags():
    """Every method has a control: its own training command (same warm-up, seed, toy flags) plus its
    module's CONTROL_FLAGS, which train.py parses to weights 0; SDCA's control skips the init pass, PLCA's
    is evaluated without aggregation (CONTROL_EVALUATE_FLAGS). --controls off plans none."""
    assert toy.controlled(toy.method_names()) == toy.method_names()
    args = toy.parse_args(["--out", "/tmp/unused", "--seeds", "2", "--iters", "100", "--warmup-iters", "200",
                           "--controls", "on"])
    tasks = {t.key: t for t in toy.build_tasks(args, args.methods)}
    for seed in (0, 1):
        for method in args.methods:
            own, control = tasks[f"s{seed}/{method}"], tasks[f"s{seed}/{method}-control"]
            own_cmd, control_cmd = own.commands[own.train_index], control.commands[control.train_index]
            assert control.deps == [f"s{seed}/warmup"] and control.evals == [(f"{method}-control", "eval.json")]
            expected = own_cmd + toy.control_flags(method)
            if method == "sdca":  # its init statistics feed only the contrastive terms
                at = expected.index("--sdca-init-stats")
                expected = expected[:at] + expected[at + 2:]
                assert control.train_index == 0 and len(control.commands) == 2
            out_at = expected.index("--out") + 1
            assert control_cmd[out_at] == control.run_dir and own_cmd[out_at] == own.run_dir
            expected[out_at] = control.run_dir
            assert control_cmd == expected, method
            evaluation = control.commands[-1]
            assert evaluation[1].endswith("evaluate.py")
            evaluate_flags = getattr(toy.METHODS[method], "CONTROL_EVALUATE_FLAGS", [])
            assert evaluation[evaluation.index("--json") + 2:] == evaluate_flags
    for method in toy.method_names():  # every flag exists and turns its term off
        off = toy.control_flags(method)
        parsed = vars(flags.parse_args(["--method", method, "--out", "/tmp/unused", *off]))
        for name, value in zip(off[::2], off[1::2]):
            assert parsed[name[2:].replace("-", "_")] == (value if value == "clean" else float(value)), name
    off = toy.parse_args(["--out", "/tmp/unused"])  # the default
    assert off.controls == "off" and not [t for t in toy.build_tasks(off, off.methods) if t.key.endswith("-control")]


def test_backbone_reaches_every_run_and_mit_turns_plca_aggregation_off():
    """--backbone goes to every train.py command, the warm-up included; MiT's DAFormer head has no
    .classifier to re-apply after aggregation, so PLCA is evaluated without it and the extra row goes."""
    args = toy.parse_args(["--out", "/tmp/unused", "--methods", "plca,daformer", "--seeds", "1",
                           "--backbone", "mit-b0"])
    assert args.rows == ["source_only", "oracle", "plca", "daformer"] and not args.test_time_aggregation
    tasks = {t.key: t for t in toy.build_tasks(args, args.methods)}
    for task in tasks.values():
        train_cmd = task.commands[task.train_index]
        assert train_cmd[train_cmd.index("--backbone") + 1] == "mit-b0", task.key
    plca_eval = tasks["s0/plca"].commands[-1]
    assert tasks["s0/plca"].evals == [("plca", "eval.json")] and plca_eval[-2:] == ["--tta-aggregate", "off"]
    assert "PLCA's test-time aggregation is off" in toy.markdown_notes(args)
    tiny = toy.parse_args(["--out", "/tmp/unused", "--methods", "plca"])
    assert tiny.backbone == "tiny" and tiny.test_time_aggregation
    plca_task = toy.build_tasks(tiny, tiny.methods)[1]  # evaluated as evaluate.py does for PLCA, then without
    assert "--tta-aggregate" not in plca_task.commands[1] and plca_task.commands[2][-2:] == ["--tta-aggregate", "off"]


def test_the_toy_keeps_a_recipe_and_scales_only_its_real_data_constants(monkeypatch):
    """The toy keeps every RECIPE value (a new method's included) but the real-data ones uda/flags.py
    drops: the DeepLab-v2 LR becomes --lr, an LR warm-up and RCS's pixel threshold are scaled to the toy,
    and a method's TOY_FLAGS (FADA: uniform sampling) are added; momentum, sampler, head LR stay."""
    monkeypatch.setattr(fada, "RECIPE", {"lr": 2.5e-4, "source_sampler": "class-balanced", "bn": "frozen",
                                         "momentum": 0.5, "align_corners": True, "stop_iter": 40000})
    monkeypatch.setattr(plca, "RECIPE", {"head_lr_mult": 1.0, "bn": "train", "lovasz_weight": 1.5,
                                         "source_sampler": "class-balanced"})
    monkeypatch.setattr(daformer, "RECIPE", {"lr": 6e-5, "warmup_iters": 1000, "iters": 8000, "source_sampler": "rcs"})
    args = toy.parse_args(["--out", "/x", "--methods", "fada,plca,daformer", "--lr", "0.02", "--iters", "400"])
    assert toy.toy_flags("fada", args) == ["--lr", "0.02", "--source-sampler", "uniform"]
    assert toy.toy_flags("plca", args) == ["--lr", "0.02"]
    assert toy.toy_flags("daformer", args) == ["--warmup-iters", "50",  # 1000 / 8000 of 400
                                               "--rcs-min-pixels", str(round(3000 * 256 * 128 / (1280 * 720)))]


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


def test_recipe_and_idea_are_paired_per_seed():
    """recipe = control - source_only and idea = method - control per seed, over the seeds where all
    three finished; PLCA's extra row shares PLCA's control; a failed control is said so in the table."""
    runs = {"source_only": [20.0, 22.0, 21.0], "plca-control": [23.0, 23.0, None], "fada-control": [None] * 3}
    tasks = []
    for name, values in runs.items():
        for seed, miou in enumerate(values):
            task = toy.Task(f"s{seed}/{name}", "/nonexistent", [], 0, row=name, seed=seed)
            task.result = record(name, miou) if miou is not None else {"error": "exit 1", "wall_s": 1.0}
            tasks.append(task)
    no_tta = toy.NO_AGGREGATION_ROW
    for seed, (with_tta, without) in enumerate([(26.0, 28.0), (21.0, 25.0), (30.0, 30.0)]):
        task = toy.Task(f"s{seed}/plca", "/nonexistent", [], 0, row="plca", seed=seed,
                        evals=[("plca", "eval.json"), (no_tta, "eval_0.json")])
        task.result = {**record("plca", with_tta), "miou_by_row": {"plca": with_tta, no_tta: without}}
        tasks.append(task)
    for seed in range(3):
        task = toy.Task(f"s{seed}/fada", "/nonexistent", [], 0, row="fada", seed=seed)
        task.result = record("fada", 30.0)
        tasks.append(task)
    methods = toy.summarize(tasks, ["source_only", "fada", "plca", no_tta])
    entry = methods["plca"]
    assert entry["control"]["miou"] == [23.0, 23.0] and entry["control"]["seeds"] == [0, 1]
    assert entry["control"]["flags"] == plca.CONTROL_FLAGS and entry["control"]["errors"] == ["exit 1"]
    assert entry["paired_seeds"] == [0, 1]  # seed 2's control failed
    assert entry["idea_gain"] == [3.0, -2.0] and entry["recipe_gain"] == [3.0, 1.0]
    assert entry["idea_gain_mean"] == 0.5 and math.isclose(entry["idea_gain_std"], math.sqrt(12.5))
    assert entry["recipe_gain_mean"] == 2.0 and math.isclose(entry["recipe_gain_std"], math.sqrt(2.0))
    assert methods[no_tta]["idea_gain"] == [5.0, 2.0] and methods[no_tta]["recipe_gain"] == [3.0, 1.0]
    assert "control" not in methods["source_only"] and methods["fada"]["control"]["miou"] == []
    table = toy.markdown_table(methods)
    assert "| +2.00 ± 1.41 | +0.50 ± 3.54 |" in table  # the plca row
    assert "| control failed | control failed |" in table and "| 1.00 | – | – |" in table  # fada; source_only


def test_failed_run_is_reported_not_hidden():
    tasks = [toy.Task("s0/source_only", "/x", [], 0, row="source_only", seed=0),
             toy.Task("s0/m", "/x", [], 0, row="m", seed=0)]
    tasks[0].result = record("source_only", 20.0)
    tasks[1].result = {"error": "exit 1 of command 1; see /x/train.log", "wall_s": 1.0}
    methods = toy.summarize(tasks, ["source_only", "m"])
    assert methods["m"]["miou"] == [] and methods["m"]["errors"]
    assert "| m | failed: exit 1" in toy.markdown_table(methods)


@pytest.mark.slow
def test_unknown_method_is_a_one_line_error(tmp_path):
    proc = run_benchmark("--out", tmp_path, "--methods", "fada,nosuch", timeout=120)
    assert proc.returncode == 2 and "--methods" in proc.stderr and "nosuch" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_launch_order_starts_every_warmup_then_the_costliest_rows_of_all_seeds():
    args = toy.parse_args(["--out", "/tmp/unused", "--methods", "fada,plca", "--seeds", "3"])
    tasks = toy.build_tasks(args, args.methods)
    order = [t.key for t in toy.launch_order(tasks)]
    assert order[:3] == ["s0/warmup", "s1/warmup", "s2/warmup"] and sorted(order) == sorted(t.key for t in tasks)
    assert order[3:6] == ["s0/fada", "s1/fada", "s2/fada"]  # build_tasks' first row of a seed
    assert order[-3:] == ["s0/source_only", "s1/source_only", "s2/source_only"]  # its last
