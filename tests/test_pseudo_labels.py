"""The pseudo-label generator (uda/pseudo_labels.py) shared by FADA (argmax) and SDCA (class-wise)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train
from conftest import run_script
from uda import common, datasets, flags, pseudo_labels as pl


def hand_probs():
    """(1, 3, 3, 3) probabilities. Class 0 is the argmax at six pixels with max-probability 0.4 0.5 0.6
    0.6 0.95 0.97, class 1 at three (0.95 0.96 0.99); class 2 is never the argmax although every pixel
    gives it some probability (statistics are over PREDICTED classes)."""
    pixels = [[c, (1 - c) / 2, (1 - c) / 2] for c in (0.4, 0.5, 0.6, 0.6, 0.95, 0.97)]
    pixels += [[(1 - c) / 2, c, (1 - c) / 2] for c in (0.95, 0.96, 0.99)]
    probs = torch.tensor(pixels, dtype=torch.float64).t().reshape(1, 3, 3, 3)  # (B, C, H, W)
    assert torch.allclose(probs.sum(1), torch.ones(1, 3, 3, dtype=torch.float64))
    return probs


def test_hand_case_medians_cap_and_absent_class():
    probs = hand_probs()
    # class 0: n = 6, index round(3.0) = 3 -> sorted[3] = 0.6; class 1: n = 3, index round(1.5) = 2 -> 0.99,
    # capped at 0.9; class 2 is never predicted -> 0
    exact = pl.exact_classwise_thresholds(probs, cap=0.9)
    assert torch.allclose(exact, torch.tensor([0.6, 0.9, 0.0], dtype=torch.float64))
    hist = pl.confidence_histograms(probs, bins=1000)
    assert hist.sum(1).tolist() == [6, 3, 0]
    thr = pl.classwise_thresholds(hist, cap=0.9)
    assert thr[2] == 0.0 and thr[1] == pytest.approx(0.9)
    assert exact[0] - 1e-3 <= thr[0] <= exact[0]  # lower bin edge: at most one bin below the median
    labels = pl.hard_labels(probs, thr)[0]
    conf, pred = probs.max(1)
    expected = torch.where(conf[0] < torch.tensor([0.6, 0.9, 0.0], dtype=torch.float64)[pred[0]],
                           torch.full_like(pred[0], 255), pred[0])
    assert torch.equal(labels.long(), expected)
    assert (labels == 255).sum() == 2  # the 0.4 and 0.5 pixels of class 0; every class-1 pixel is >= 0.9


def test_argmax_rule_labels_every_pixel():
    probs = hand_probs()
    labels = pl.hard_labels(probs)
    assert labels.dtype == torch.uint8 and torch.equal(labels.long(), probs.argmax(1))


def test_median_index_rounds_half_to_even_like_numpy():
    counts = torch.arange(0, 40)
    expected = [min(int(np.round(n * 0.5)), max(n - 1, 0)) for n in range(40)]
    assert pl.median_index(counts).tolist() == expected


def test_histogram_thresholds_bound_the_exact_ones():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 5, 20, 30) * 2.0, dim=1)
    exact = pl.exact_classwise_thresholds(probs, cap=0.9)
    for bins in (10, 1000):
        thr = pl.classwise_thresholds(pl.confidence_histograms(probs, bins), cap=0.9)
        assert (thr <= exact + 1e-12).all() and (exact - thr < 1.0 / bins + 1e-9).all()
    # the histogram of two halves summed (what the all-reduce does) equals the histogram of the whole
    whole = pl.confidence_histograms(probs, 1000)
    assert torch.equal(pl.confidence_histograms(probs[:1], 1000) + pl.confidence_histograms(probs[1:], 1000), whole)


# --------------------------------------------------------------------------------------------------
# The generator end to end, in-process and through evaluate.py (single process and torchrun)
# --------------------------------------------------------------------------------------------------
class LogitsFromImage(torch.nn.Module):
    """A fixed 'model': logits = 4 x the image's first channels, at stride 1. Predictions are known."""

    num_classes = 3

    def forward(self, images):
        return images, 4.0 * images


class NamedImages(torch.utils.data.Dataset):
    def __init__(self, count):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(count, 3, 6, 10, generator=g)

    def __len__(self):
        return len(self.images)

    def item_name(self, index):
        return f"city{index % 2}/img_{index:03d}"

    def __getitem__(self, index):
        return {"image": self.images[index], "index": index}


def test_generate_writes_class_indices_and_labelspace(tmp_path):
    model, data = LogitsFromImage().train(), NamedImages(5)
    space = datasets.LabelSpace([0, 1, 2], {"mIoU3": [0, 1, 2]})
    summary = pl.generate(model, data, space, str(tmp_path), "classwise", torch.device("cpu"),
                          evaluate.predict_probs, lambda: common.autocast(torch.device("cpu"), "off"),
                          log=lambda text: None)
    assert model.training  # restored
    probs = torch.softmax(4.0 * data.images.double(), dim=1)
    thresholds = pl.classwise_thresholds(pl.confidence_histograms(probs, pl.HISTOGRAM_BINS), pl.CLASSWISE_CAP)
    assert summary["images"] == 5 and summary["thresholds"] == pytest.approx(thresholds.tolist())
    expected = pl.hard_labels(probs, thresholds).numpy()
    for index in range(5):
        saved = np.array(Image.open(tmp_path / f"{data.item_name(index)}.png"))
        assert saved.dtype == np.uint8 and np.array_equal(saved, expected[index])
    with open(tmp_path / "labelspace.json") as f:
        assert json.load(f) == {"trainids": [0, 1, 2], "eval_sets": {"mIoU3": [0, 1, 2]}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A train.py-format checkpoint of a randomly initialised tiny model (no training needed here)."""
    folder = tmp_path_factory.mktemp("ckpt")
    args = flags.parse_args(["--method", "source_only", "--out", str(folder), "--device", "cpu"])
    space = datasets.label_space(args.source, args)
    torch.manual_seed(0)
    model = train.build_model(args, space, torch.device("cpu"))
    path = folder / "last.pt"
    torch.save({"model": model.state_dict(), "args": vars(args)}, path)
    return path


def pseudo_files(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".png"))


@pytest.mark.slow
def test_evaluate_save_pseudo_on_toy_target_train(tmp_path, checkpoint):
    out = tmp_path / "argmax"
    result = run_script("evaluate.py", "--ckpt", checkpoint, "--save-pseudo", out, "--pseudo-limit", "3",
                        "--workers", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert pseudo_files(out) == [f"toy-real_train_{i:05d}.png" for i in range(3)]  # the TRAIN split
    label = np.array(Image.open(out / "toy-real_train_00000.png"))
    assert label.shape == (128, 256) and label.dtype == np.uint8 and label.max() < 19  # argmax: no 255
    with open(out / "labelspace.json") as f:
        assert json.load(f)["trainids"] == list(range(19))
    bad = run_script("evaluate.py", "--ckpt", checkpoint, "--save-pseudo", out, "--pseudo-limit", "0",
                     "--workers", "0", "--device", "cpu")
    assert bad.returncode == 2 and "--pseudo-limit" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
@pytest.mark.slow
def test_torchrun_two_processes_give_the_same_classwise_labels(tmp_path, checkpoint):
    flags = ["--ckpt", checkpoint, "--pseudo-rule", "classwise", "--pseudo-limit", "5", "--workers", "0",
             "--device", "cpu"]
    single = run_script("evaluate.py", *flags, "--save-pseudo", tmp_path / "one")
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "evaluate.py", *map(str, flags), "--save-pseudo", str(tmp_path / "two")],
                            cwd=repo, capture_output=True, text=True, env=env, timeout=300)
    assert double.returncode == 0, double.stderr
    assert pseudo_files(tmp_path / "one") == pseudo_files(tmp_path / "two") and len(pseudo_files(tmp_path / "one")) == 5
    for name in pseudo_files(tmp_path / "one"):
        assert np.array_equal(np.array(Image.open(tmp_path / "one" / name)), np.array(Image.open(tmp_path / "two" / name)))
    with open(tmp_path / "one" / "pseudo.json") as f1, open(tmp_path / "two" / "pseudo.json") as f2:
        assert json.load(f1)["thresholds"] == json.load(f2)["thresholds"]
