"""The real-size harness (uda/bench/scale.py): its settings are train.py's, it runs end to end at a tiny
size factor with finite figures and a table, and a failing method becomes a one-line error in the file."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO

from uda import datasets, flags, models
from uda.bench import scale


@pytest.mark.parametrize("method", scale.METHOD_NAMES)
def test_recipe_settings_are_what_train_py_parses(method):
    args = flags.parse_args(["--method", method, "--source", "gta5", "--out", "unused"])
    ours = scale.recipe_settings(method)
    assert ours["backbone"] == args.backbone and ours["bn"] == models.resolve_bn(args.backbone, args.bn)
    assert ours["batch_size"] == args.batch_size and ours["crop"] == args.crop
    assert ours["random_scale"] == args.random_scale and ours["cat_max_ratio"] == args.cat_max_ratio
    assert ours["source_sampler"] == args.source_sampler
    # train.py leaves the sizes to datasets.default_train_size unless the recipe names them
    assert ours["source_size"] == (args.source_size or scale.size_text(datasets.default_train_size("gta5")))
    assert ours["target_size"] == (args.target_size or scale.size_text(datasets.default_train_size("cityscapes")))


def test_sizes_scale_and_selftrain_crop_is_its_flag_default():
    assert scale.scale_size("1280x720", 0.25) == "320x180" and scale.scale_size((2048, 1024), 0.06) == "123x61"
    assert scale.scale_size("native", 0.5) == "native" and scale.scale_size(None, 0.5) is None
    settings = scale.scaled_settings(scale.recipe_settings("selftrain", source="cityscapes"), 0.5)
    size_flags = scale.method_size_flags("selftrain", settings, 0.5)
    default = flags.parse_args(["--method", "selftrain", "--out", "unused"]).selftrain_crop
    assert size_flags == ["--selftrain-crop", scale.scale_size(default, 0.5)]
    size_flags = scale.method_size_flags("daformer", scale.recipe_settings("daformer"), 0.5)
    assert size_flags == ["--daformer-pseudo-ignore-top", "8", "--daformer-pseudo-ignore-bottom", "60",  # 15, 120
                          "--rcs-min-pixels", "750"]  # 3000 pixels x 0.5^2


def test_timing_and_error_parsers(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"iter": i, "sec_per_iter": s}) + "\n"
                               for i, s in [(1, 9.0), (2, 7.0), (3, 1.0), (4, 3.0), (5, 2.0)]))
    assert scale.median_sec_per_iter(str(metrics)) == 2.0  # iterations 1 and 2 skipped
    log = tmp_path / "run.log"
    log.write_text("$ python train.py\niter 1/3 ce 3.1 | 1.00 it/s eta 0:00:02 peak 812 MB\n"
                   "iter 2/3 ce 3.0 | 1.00 it/s eta 0:00:01 peak 964 MB\nTraceback ...\nerror: --crop 'x': bad\n")
    assert scale.last_peak_mb(str(log)) == 964.0
    assert scale.error_line(str(log), 2) == "exit 2: error: --crop 'x': bad"


@pytest.mark.slow
def test_a_failing_method_is_one_line_in_the_saved_results(tmp_path):
    """No data where the harness expects it: the method's entry holds the error, scale.json is written."""
    opts = argparse.Namespace(out=str(tmp_path / "out"), size_factor=0.06, iters=3, device="cpu", amp="off",
                              grad_checkpoint="off", argv=["--out", "x"])
    os.makedirs(os.path.join(opts.out, "logs"))
    missing = str(tmp_path / "nothing")
    data = argparse.Namespace(root=missing, train_target_root=missing, summary={},
                              lists={"gta5": missing, "cityscapes train": missing})
    harness = scale.Harness(opts, data, str(tmp_path / "work"))
    harness.method("source_only")
    with open(os.path.join(opts.out, "scale.json")) as f:
        entry = json.load(f)["methods"]["source_only"]
    assert isinstance(entry["error"], str) and "\n" not in entry["error"] and entry["sec_per_iter"] is None
    assert os.path.isfile(os.path.join(opts.out, "scale.md"))


def finite(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_harness_end_to_end_tiny(tmp_path):
    out = tmp_path / "scale"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "uda.bench.scale", "--out", str(out), "--methods",
                           "source_only,fada,data_loading,sampler_stats,evaluation", "--size-factor", "0.06",
                           "--iters", "3", "--grad-checkpoint", "off", "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out / "scale.json") as f:
        result = json.load(f)
    assert set(result) >= {"methods", "stages", "config", "baselines", "goals"}
    assert set(result["methods"]) == {"source_only", "fada"}
    for name, entry in result["methods"].items():
        assert "error" not in entry, entry
        for key in ("sec_per_iter", "peak_mem_mb", "sec_per_iter_ratio", "peak_mem_ratio"):
            assert finite(entry[key]), (name, key, entry[key])
        assert entry["grad_checkpoint"] is None and entry["official"] is None
        assert entry["settings"]["backbone"] == "deeplabv2-r101" and entry["settings"]["batch_size"] == 4
        assert entry["settings"]["source_size"] == "77x43"  # 1280x720 x 0.06
    assert result["methods"]["source_only"]["sec_per_iter_ratio"] == 1.0  # its own baseline
    assert result["methods"]["fada"]["baseline"] == result["methods"]["source_only"]["baseline"]
    loading = [k for k in result["stages"] if k.startswith("data_loading gta5")]
    assert loading and all(finite(result["stages"][k]["ms_per_item"]) for k in loading)
    assert finite(result["stages"]["sampler_stats synthia"]["ms_per_item"])
    assert math.isfinite(result["stages"]["evaluation"]["per_item_s"])  # a difference of two timings
    assert "500 images" in result["stages"]["evaluation"]["extrapolated"]
    config = result["config"]
    assert config["device"] == "cpu" and config["size_factor"] == 0.06 and config["iters"] == 3
    assert config["threads"] == 1 and config["torch"] and config["cpu"]
    goal = next(g for g in result["goals"] if g["row"] == "fada" and "step" in g["goal"])
    assert goal["status"] in ("met", "not met")
    table = (out / "scale.md").read_text()
    assert "| row | settings |" in table and "\n| fada | " in table and "\n| evaluation | " in table
    assert not os.path.exists(out / "runs")  # checkpoints stayed in the temporary folder, now removed
