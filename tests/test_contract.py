"""The method contract (uda/source_only.py) carries every obligation: a new method is one file plus one
line in uda/methods.py; the flags' defaults live in uda/flags.py and --help shows one default per flag;
random streams are named; evaluation resizes as each method's official code does."""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import zlib
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TOY_FAST

from uda import common, datasets, evaluation, fada, flags
from uda.methods import METHODS

NEW = "mymethod"  # a copy of source_only, registered under this name by the test only


# --------------------------------------------------------------------------------------------------
# A new method: a copy of source_only, registered in the test only, through every script and tool
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def new_method_env(tmp_path_factory):
    """PYTHONPATH with `mymethod.py` (source_only.py as it is) and a sitecustomize.py that adds it to
    METHODS in every Python process started with it: the scripts and the tools' own subprocesses. That
    line of sitecustomize is the line a user adds to uda/methods.py; nothing else is edited."""
    folder = tmp_path_factory.mktemp("new_method")
    with open(os.path.join(REPO, "uda", "source_only.py")) as f:
        (folder / f"{NEW}.py").write_text(f.read())
    (folder / "sitecustomize.py").write_text(
        f"import {NEW}\nfrom uda.methods import METHODS\nMETHODS[{NEW!r}] = {NEW}\n")
    path = os.pathsep.join([str(folder), REPO, os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_with(env, *command, timeout=600):
    return subprocess.run([sys.executable, *map(str, command)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_a_new_method_runs_through_train_evaluate_and_both_benchmarks(new_method_env, tmp_path):
    env = new_method_env
    out = tmp_path / "run"
    trained = run_with(env, "train.py", "--method", NEW, "--out", out, *TOY_FAST)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert f"recipe of {NEW}: the common defaults" in trained.stdout
    assert torch.load(out / "last.pt", weights_only=False)["args"]["method"] == NEW

    evaluated = run_with(env, "evaluate.py", "--ckpt", out / "last.pt", "--workers", "0", "--device", "cpu",
                         "--json", tmp_path / "eval.json")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    record = json.loads((tmp_path / "eval.json").read_text())
    assert math.isfinite(record["miou"]) and not record["tta_aggregate"] and not record["protocol"]["resize_via_input"]

    bench = run_with(env, "-m", "uda.bench.toy", "--out", tmp_path / "toy", "--methods", NEW, "--seeds", "1",
                     "--iters", "2", "--warmup-iters", "2", "--batch-size", "2", "--windows", "1", "--controls", "on",
                     "--jobs", "1", timeout=900)
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-2000:]
    results = json.loads((tmp_path / "toy" / "results.json").read_text())
    assert list(results["methods"]) == ["source_only", "oracle", NEW]
    assert len(results["methods"][NEW]["miou"]) == 1 and "control" not in results["methods"][NEW]  # no CONTROL_FLAGS
    assert results["config"]["flags"][NEW] == ["--lr", "0.01"]  # train.py's LR: the toy's SGD LR

    scaled = run_with(env, "-m", "uda.bench.scale", "--out", tmp_path / "scale", "--methods", NEW,
                      "--size-factor", "0.06", "--iters", "3", "--grad-checkpoint", "off", "--device", "cpu",
                      timeout=900)
    assert scaled.returncode == 0, scaled.stdout[-2000:] + scaled.stderr[-2000:]
    entry = json.loads((tmp_path / "scale" / "scale.json").read_text())["methods"][NEW]
    assert "error" not in entry and entry["sec_per_iter"] > 0 and entry["sec_per_iter_ratio"] > 0


SHARED = ["train.py", "evaluate.py", "uda/evaluation.py", "uda/datasets.py", "uda/samplers.py", "uda/flags.py",
          "uda/common.py", "uda/models.py", "uda/pseudo_labels.py", "uda/augment.py"]


@pytest.mark.parametrize("path", SHARED)
def test_no_shared_module_imports_a_method_or_tests_its_name(path):
    """Methods reach train.py, evaluate.py and the shared modules through METHODS only. (uda/bench/ is
    exempt where it measures a named method's internals or pipeline: cost.py's measurements, the toy's
    fada+selftrain row, SDCA's init pass, PLCA's extra evaluation row; see its docstrings.)"""
    with open(os.path.join(REPO, path)) as f:
        code = f.read()
    names = "|".join(METHODS)
    assert not re.search(rf"^\s*(from uda import .*\b({names})\b|import uda\.({names})\b|from uda\.({names}) )",
                         code, re.M), path
    # a name in a comparison or a membership test: == "plca", in ("daformer", "dida"), ...
    assert not re.search(rf"(==|!=|\bin)\s*\(?[^)\n]*[\"']({names})[\"']", code), path


def test_the_tools_list_every_method_from_methods():
    from uda.bench import scale, toy
    rows = [name for name, module in METHODS.items() if getattr(module, "BENCHMARK_ROW", True)]
    assert scale.METHOD_NAMES == rows and toy.method_names() == rows[1:]  # the toy's baseline is source_only
    assert "selftrain" not in rows  # a stage on FADA's pseudo-labels, not a row


# --------------------------------------------------------------------------------------------------
# Flags: defaults in one place, one default per flag in --help
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_help_shows_one_default_per_flag_from_the_recipe_where_it_applies():
    toy = subprocess.run([sys.executable, "train.py", "--method", "daformer", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120).stdout
    real = subprocess.run([sys.executable, "train.py", "--method", "daformer", "--source", "gta5", "--help"],
                          cwd=REPO, capture_output=True, text=True, timeout=120).stdout
    for text in (toy, real):
        flat = re.sub(r"\s+", " ", text)
        # no flag's help carries two defaults (the former "tiny ..., deeplabv2-r101 otherwise) (default: mit-b5)")
        assert not re.search(r"\(default: [^)]*\) \(default:", flat), text
        assert "(default: 6e-05, daformer recipe)" in flat and "(default: 40000, daformer recipe)" in flat
        assert "(default: 0.9)" in flat  # momentum: not in DAFormer's recipe, no mark
    toy_flat, real_flat = re.sub(r"\s+", " ", toy), re.sub(r"\s+", " ", real)
    # the toy: the recipe's network, crop and sizes do not apply, so they are not shown as defaults
    assert "mit-b5, daformer recipe" not in toy_flat and "512x512" not in toy_flat
    assert re.search(r"--backbone .*?network \(tiny for the toy; for real data the recipe's, else "
                     r"deeplabv2-r101\) \(default: tiny\)", toy_flat)
    assert "(default: the toy's 128x64; real data: the whole resized image)" in toy_flat
    assert "(default: toy-real)" in toy_flat and "(default: cityscapes)" in real_flat
    # real data: the recipe's network and crop, and --stop-iter = --iters once, not "--iters" beside a number
    assert "(default: mit-b5, daformer recipe)" in real_flat and "(default: 512x512, daformer recipe)" in real_flat
    assert re.search(r"--stop-iter STOP_ITER [^(]*\(the FADA/ADVENT convention\) \(default: 40000\)", real_flat)
    assert "(default: --iters)" not in real_flat


def test_parsing_resolves_every_default_and_returns_derived_values_apart():
    args, run = flags.parse(["--method", "fada", "--out", "x", "--iters", "10"])
    assert (args.target, args.backbone, args.stop_iter) == ("toy-real", "tiny", 10)  # resolved by the parser
    assert args.source_sampler == "class-balanced" and "stop_iter" not in run.recipe and run.overridden == ["iters"]
    assert not hasattr(args, "recipe") and not hasattr(args, "overridden") and run.folder_classes is None
    real, run = flags.parse(["--method", "fada", "--source", "gta5", "--out", "x"])
    assert (real.target, real.backbone, real.stop_iter, real.bn) == ("cityscapes", "deeplabv2-r101", 40000, "frozen")
    assert run.recipe == fada.RECIPE and run.overridden == []
    assert flags.defaults("fada", "gta5") == {k: getattr(real, k) for k in flags.common_defaults()}


# --------------------------------------------------------------------------------------------------
# Random streams by name
# --------------------------------------------------------------------------------------------------
def test_random_streams_are_named_after_their_method_and_stable():
    streams = {m: module.GENERATOR_STREAM for m, module in METHODS.items() if hasattr(module, "GENERATOR_STREAM")}
    assert streams == {m: m for m in ("fada", "selftrain", "daformer", "dida", "sdca", "plca")}
    seeds = {m: common.method_generator(0, m).initial_seed() for m in streams}
    assert len(set(seeds.values())) == len(seeds)  # one stream per method (selftrain and daformer shared 3)
    # the stream is the CRC-32 of the name: the same in every process (Python's str hash is salted per process)
    assert seeds["fada"] == (0 * 1000003 + zlib.crc32(b"fada")) * 1009 + common.rank()
    code = "from uda import common; print(common.method_generator(3, 'daformer').initial_seed())"
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONHASHSEED="123"))
    assert int(other.stdout) == common.method_generator(3, "daformer").initial_seed()


# --------------------------------------------------------------------------------------------------
# Evaluation as each official code evaluates
# --------------------------------------------------------------------------------------------------
class FixedLogits(torch.nn.Module):
    """A 'network' whose logits are given: (features, logits) as the models return them."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return None, self.logits


def test_daformer_and_dida_resize_logits_via_the_input_as_mmseg_others_once():
    """mmseg (DAFormer, DIDA): logits to the input size, then to the label size; FADA/SDCA/PLCA/CDGA:
    once to the label size. Compared with plain F.interpolate calls on the same logits."""
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 16, 32) * 4                                   # (B, C, h/s, w/s), stride 8
    images = torch.rand(1, 3, 128, 256)                                       # the input (h, w)
    label_size = (200, 400)                                                   # labels at another size
    model = FixedLogits(logits)
    two_step = F.interpolate(F.interpolate(logits, size=(128, 256), mode="bilinear", align_corners=False),
                             size=label_size, mode="bilinear", align_corners=False).softmax(1)
    one_step = F.interpolate(logits, size=label_size, mode="bilinear", align_corners=False).softmax(1)
    assert not torch.allclose(two_step, one_step, atol=1e-4)  # the two protocols do differ
    assert (two_step.argmax(1) != one_step.argmax(1)).any()
    for name, module in METHODS.items():
        via_input = getattr(module, "RESIZE_VIA_INPUT", False)
        assert via_input == (name in ("daformer", "dida")), name
        got = evaluation.predict_probs(model, images, label_size, None, nullcontext,
                                       resize_via_input=via_input)
        assert torch.allclose(got, two_step if via_input else one_step, atol=1e-6), name


def test_periodic_and_offline_evaluation_read_the_method_s_resize(monkeypatch):
    """evaluate.py and train.py's periodic evaluation take the resize from the checkpoint's (run's) method."""
    import evaluate
    import train
    named = lambda method: argparse.Namespace(method=method)
    assert evaluate.resize_via_input_of(named("dida")) and not evaluate.resize_via_input_of(named("fada"))
    assert not evaluate.resize_via_input_of(named("a method this copy of the code does not have"))
    seen = {}

    def fake_evaluate(*args, **kwargs):
        seen.update(kwargs)
        return torch.zeros(datasets.TOY_SPACE.num_classes, datasets.TOY_SPACE.num_classes, dtype=torch.int64)
    monkeypatch.setattr(train.evaluation, "evaluate", fake_evaluate)
    log = type("Log", (), {"write": lambda self, record: None})()
    env = common.make_env("cpu", "off", datasets.TOY_SPACE)
    for method in ("daformer", "plca"):
        args = argparse.Namespace(method=method, target="toy-real", align_corners=False)
        train.run_evaluation(None, None, datasets.TOY_SPACE, env, args, 1, log, "unused")
        assert seen["resize_via_input"] == (method == "daformer") and "test_time_predict" not in seen, method


@pytest.mark.slow
def test_a_folder_run_saves_its_classes_beside_the_flags_and_old_checkpoints_still_load(tmp_path):
    """folder_classes is derived from the data, not a flag: the checkpoint keeps it under its own key (no
    longer in args), and evaluate.py rebuilds the model without the dataset; an older checkpoint with
    it among the args loads the same."""
    import shutil

    import train
    from make_folder_dataset import make
    root = tmp_path / "data"
    make(str(root), train=8, val=4)
    out = tmp_path / "run"
    train.main(["--method", "source_only", "--source", "folder", "--source-root", str(root), "--target", "folder",
                "--target-root", str(root), "--out", str(out), "--crop", "64x48", "--iters", "2", "--batch-size", "2",
                "--lr", "0.001", "--no-eval", "--eval-every", "0", "--workers", "0", "--device", "cpu"])
    ckpt = torch.load(out / "last.pt", weights_only=False)
    classes = datasets.read_folder_classes(str(root))
    assert ckpt["folder_classes"] == classes and "folder_classes" not in ckpt["args"]
    shutil.rmtree(root)  # the checkpoint is readable without its dataset
    _, saved, space = evaluation.model_from_checkpoint(str(out / "last.pt"), "cpu")
    assert saved.folder_classes == classes and space.names == list(classes["classes"])
    old = dict(ckpt, args={**ckpt["args"], "folder_classes": classes})
    del old["folder_classes"]
    torch.save(old, tmp_path / "old.pt")
    assert evaluation.model_from_checkpoint(str(tmp_path / "old.pt"), "cpu")[2].names == space.names


def test_evaluate_takes_the_test_time_prediction_from_the_checkpoint_s_method():
    import evaluate
    from uda import plca
    flags_of = lambda mode, slide=None: argparse.Namespace(tta_aggregate=mode, slide=slide)
    saved = lambda method: argparse.Namespace(method=method)
    assert evaluate.test_time_predict_of(flags_of("auto"), saved("plca")) is plca.test_time_predict
    assert evaluate.test_time_predict_of(flags_of("auto"), saved("fada")) is None
    assert evaluate.test_time_predict_of(flags_of("off"), saved("plca")) is None
    with pytest.raises(common.UserError, match="--tta-aggregate on: .*fada.* has no test-time prediction"):
        evaluate.test_time_predict_of(flags_of("on"), saved("fada"))
    with pytest.raises(common.UserError, match="--slide"):
        evaluate.test_time_predict_of(flags_of("auto", slide=(64, 64)), saved("plca"))
    assert evaluate.test_time_predict_of(flags_of("off", slide=(64, 64)), saved("plca")) is None
