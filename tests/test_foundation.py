"""The foundation end to end: toy generator, train.py / evaluate.py smoke runs, resume, AMP, torchrun,
and every bad input giving a one-line error with exit code 2."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TOY_FAST, assert_user_error, run_script
from uda import datasets, models, toy


# ---------------------------------------------------------------- toy generator
@pytest.mark.parametrize("domain", toy.DOMAINS)
def test_toy_is_deterministic_and_uses_toy_classes(domain):
    image_a, label_a = toy.generate(domain, "train", 3, seed=5)
    image_b, label_b = toy.generate(domain, "train", 3, seed=5)
    assert np.array_equal(image_a, image_b) and np.array_equal(label_a, label_b)
    image_c, _ = toy.generate(domain, "train", 4, seed=5)
    assert not np.array_equal(image_a, image_c)
    width, height = toy.TOY_SIZE
    assert image_a.shape == (height, width, 3) and image_a.dtype == np.uint8
    labels = np.unique(np.concatenate([toy.generate(domain, "val", i)[1].ravel() for i in range(20)]))
    assert set(labels.tolist()) <= set(toy.TOY_CLASSES)
    assert len(labels) >= 8  # at least 8 classes actually occur


def test_toy_domains_differ_in_appearance_and_statistics():
    synth = np.stack([toy.generate("toy-synth", "val", i)[0] for i in range(20)]).astype(float)
    real = np.stack([toy.generate("toy-real", "val", i)[0] for i in range(20)]).astype(float)
    # the real domain is textured and noisy: much larger local pixel differences
    def roughness(images):
        return np.abs(np.diff(images, axis=2)).mean()
    assert roughness(real) > 2 * roughness(synth)
    car_share = [np.mean([(toy.generate(d, "val", i)[1] == toy.CAR).mean() for i in range(40)]) for d in toy.DOMAINS]
    assert car_share[1] > 1.5 * car_share[0]  # more and bigger cars in toy-real


def test_unlabeled_target_items_carry_no_label():
    target = datasets.build_dataset("toy-real", "train", datasets.TOY_SPACE, labeled=False, crop=(64, 32),
                                    augment=True)
    item = target[(0, 0)]
    assert "label" not in item and item["image"].shape == (3, 32, 64)
    val = datasets.build_dataset("toy-real", "val", datasets.TOY_SPACE, labeled=True)
    assert val[0]["label"].shape == (toy.TOY_SIZE[1], toy.TOY_SIZE[0])


def test_tiny_backbone_shapes():
    model = models.build_model("tiny", 19)
    features, logits = model(torch.rand(2, 3, 64, 128))
    assert features.shape == (2, model.feature_dim, 8, 16) and logits.shape == (2, 19, 8, 16)


# ---------------------------------------------------------------- train.py / evaluate.py
def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_train_and_evaluate_smoke(tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", "--method", "source_only", "--lovasz-weight", "0.75", "--out", out, *TOY_FAST)
    assert result.returncode == 0, result.stderr
    assert "eval iter 6: mIoU9" in result.stdout
    records = read_metrics(out)
    losses = [r for r in records if "loss/ce" in r]
    assert [r["iter"] for r in losses] == [1, 2, 4, 5, 6]  # the first few, then every --log-every
    assert all(np.isfinite(r["loss/ce"]) and np.isfinite(r["loss/lovasz"]) and r["lr"] > 0 for r in losses)
    assert any("eval/mIoU9" in r for r in records)
    pred_dir, json_path = tmp_path / "pred", tmp_path / "scores.json"
    result = run_script("evaluate.py", "--ckpt", out / "last.pt", "--target", "toy-real", "--json", json_path,
                        "--save-pred", pred_dir, "--workers", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "mIoU9" in result.stdout and "vegetation" in result.stdout
    scores = json.load(open(json_path))
    assert scores["classes"] == 9 and 0 <= scores["miou"] <= 100 and set(scores["per_class"]) >= {"road", "car"}
    names = sorted(os.listdir(pred_dir))
    assert len(names) == 2 * toy.SPLIT_LENGTHS["val"] and names[0].endswith("_color.png")


def load_model_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    common_flags = [*TOY_FAST, "--workers", "1"]
    common_flags[common_flags.index("--iters") + 1] = "8"
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_script("train.py", "--out", straight, *common_flags).returncode == 0
    first = run_script("train.py", "--out", split, *common_flags, "--stop-iter", "4")
    assert first.returncode == 0, first.stderr
    assert torch.load(split / "last.pt", weights_only=False)["iter"] == 4
    second = run_script("train.py", "--out", split, *common_flags, "--resume", split / "last.pt")
    assert second.returncode == 0, second.stderr
    a, b = load_model_state(straight / "last.pt"), load_model_state(split / "last.pt")
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), atol=1e-6, rtol=0), key
    # the logged losses of iterations 6 and 8 agree too
    tail = lambda out: [r["loss/ce"] for r in read_metrics(out) if r.get("iter") in (6, 8) and "loss/ce" in r]
    assert tail(straight) == pytest.approx(tail(split), abs=1e-6)


@pytest.mark.slow
def test_bf16_autocast_step_runs_on_cpu(tmp_path):
    result = run_script("train.py", "--out", tmp_path / "bf16", "--amp", "bf16", *TOY_FAST)
    assert result.returncode == 0, result.stderr
    losses = [r["loss/ce"] for r in read_metrics(tmp_path / "bf16") if "loss/ce" in r]
    assert losses and all(np.isfinite(losses))


def test_bf16_forward_close_to_fp32():
    torch.manual_seed(0)
    model = models.build_model("tiny", 19).eval()
    images = torch.rand(2, 3, 64, 128)
    _, reference = model(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, low = model(images)
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max() + 1e-3


@pytest.mark.slow
def test_torchrun_two_processes_keep_replicas_identical(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "train.py"), "--out", str(out), *TOY_FAST]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    checksums = dict(re.findall(r"rank (\d) parameter checksum (\S+)", result.stdout))
    assert set(checksums) == {"0", "1"} and checksums["0"] == checksums["1"]
    losses = [r["loss/ce"] for r in read_metrics(out) if "loss/ce" in r]
    assert len(losses) == 5 and all(np.isfinite(losses))  # iterations 1, 2, 4, 5, 6
    assert "eval iter 6" in result.stdout


# ---------------------------------------------------------------- bad input: one line, exit 2
@pytest.mark.slow
def test_unknown_method_dataset_backbone(tmp_path):
    assert_user_error(run_script("train.py", "--method", "nope", "--out", tmp_path / "a"), "--method", "nope")
    assert_user_error(run_script("train.py", "--source", "mnist", "--out", tmp_path / "b", *TOY_FAST), "mnist")
    assert_user_error(run_script("train.py", "--backbone", "resnet9", "--out", tmp_path / "c", *TOY_FAST),
                      "--backbone", "resnet9")


@pytest.mark.slow
def test_output_folder_of_another_run_is_refused(tmp_path):
    out = tmp_path / "run"
    assert run_script("train.py", "--out", out, *TOY_FAST).returncode == 0
    before = os.path.getmtime(out / "last.pt")
    assert_user_error(run_script("train.py", "--out", out, *TOY_FAST), "--out", "another run")
    assert os.path.getmtime(out / "last.pt") == before  # nothing overwritten


@pytest.mark.slow
def test_checkpoint_of_another_class_count_is_refused(tmp_path):
    other = models.build_model("tiny", 16)  # a 16-class head where the toy expects 19
    path = tmp_path / "other.pt"
    torch.save({"model": other.state_dict(), "args": {"source": "toy-synth", "target": "toy-real",
                                                      "backbone": "tiny", "method": "source_only"}}, path)
    assert_user_error(run_script("train.py", "--out", tmp_path / "x", "--pretrained", path, *TOY_FAST),
                      str(path), "19 classes")
    # evaluate.py rebuilds the model from the saved args, so a state dict of another shape is refused too
    assert_user_error(run_script("evaluate.py", "--ckpt", path, "--workers", "0", "--device", "cpu"), "19 classes")
    assert_user_error(run_script("evaluate.py", "--ckpt", tmp_path / "missing.pt"), "missing.pt", "no such file")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert_user_error(run_script("evaluate.py", "--ckpt", tmp_path / "garbage.pt"), "garbage.pt")


@pytest.mark.slow
def test_bad_sizes_and_schedule_flags(tmp_path):
    assert_user_error(run_script("train.py", "--out", tmp_path / "a", "--crop", "128", *TOY_FAST), "--crop")
    assert_user_error(run_script("train.py", "--out", tmp_path / "b", *TOY_FAST, "--stop-iter", "99"), "--stop-iter")
