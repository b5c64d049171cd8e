"""uda/analyze.py and uda/plots.py: FADA's Class Center Distance against a brute-force computation, the
streamed pixel sample, PCA, metrics.jsonl reading, one pass against evaluate's confusion matrix, bad
input, the figures, running without matplotlib and under torchrun."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from uda import analyze, common, datasets, models, plots
from uda import evaluation as ev
from uda.common import UserError

CPU = torch.device("cpu")
FAST = ["--workers", "0", "--device", "cpu"]


# --------------------------------------------------------------------------------------------------
# Class Center Distance
# --------------------------------------------------------------------------------------------------
def brute_force_ccd(features, labels, num_classes):
    """CCD written out from the paper's formula: every class's features gathered, centres, spreads and
    the ratio averaged over the other present classes, with Python loops over classes."""
    flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).double()
    labels = labels.reshape(-1)
    members = {c: flat[labels == c] for c in range(num_classes) if (labels == c).any()}
    centres = {c: x.mean(0) for c, x in members.items()}
    out = []
    for i in range(num_classes):
        others = [j for j in centres if j != i]
        if i not in members or not others:
            out.append(float("nan"))
            continue
        spread = ((members[i] - centres[i]) ** 2).sum(1).mean()
        out.append(sum((spread / ((centres[i] - centres[j]) ** 2).sum()).item() for j in others) / len(others))
    return torch.tensor(out, dtype=torch.float64)


def streamed_ccd(batches, num_classes, dim):
    sums = analyze.ClassFeatureSums(num_classes, dim, CPU)
    for features, labels in batches:
        sums.add(features, labels)
    return analyze.class_center_distance(sums.sums, sums.sq_norms, sums.counts)


def random_case(seed=0, num_classes=5, dim=7):
    """Two batches of features and labels with ignored pixels, an absent class (3) and a one-pixel class."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(3, dim, 6, 5, generator=g) + torch.randn(1, dim, 1, 1, generator=g)
    labels = torch.randint(0, num_classes, (3, 6, 5), generator=g)
    labels[labels == 3] = 0
    labels[0, 0, :2] = common.IGNORE_INDEX
    labels[labels == 4] = 1
    labels[2, 5, 4] = 4  # class 4: a single pixel (spread 0 -> CCD 0)
    return features, labels, num_classes, dim


def test_ccd_matches_brute_force_streamed_over_batches():
    features, labels, num_classes, dim = random_case()
    expected = brute_force_ccd(features, labels, num_classes)
    got = streamed_ccd([(features[:1], labels[:1]), (features[1:], labels[1:])], num_classes, dim)
    assert torch.isnan(expected[3]) and torch.isnan(got[3])  # absent class: undefined
    assert expected[4] == 0 and got[4] == 0                  # one pixel: no spread
    assert torch.allclose(got[~torch.isnan(got)], expected[~torch.isnan(expected)], rtol=1e-10, atol=1e-12)
    record = analyze.ccd_record(got, [0, 1, 2, 3, 4])
    assert record["per_class"][3] is None and json.dumps(record)  # null, never NaN, in JSON
    assert record["mean"] == pytest.approx(np.mean([v for v in got.tolist() if not np.isnan(v)]))


def test_ccd_is_a_ratio_invariant_to_scale_and_shift_and_undefined_alone():
    features, labels, num_classes, dim = random_case(seed=1)
    features = features.double()  # the transform itself exact enough for a 1e-9 comparison
    base = streamed_ccd([(features, labels)], num_classes, dim)
    moved = streamed_ccd([(3.0 * features + 5.0, labels)], num_classes, dim)
    assert torch.allclose(base[~torch.isnan(base)], moved[~torch.isnan(moved)], rtol=1e-9, atol=1e-12)
    alone = torch.zeros_like(labels)  # one class only: no other centre to compare with
    assert torch.isnan(streamed_ccd([(features, alone)], num_classes, dim)).all()
    same = features.clone()
    same[:, :, :, :] = 1.0  # two classes with one centre: infinite, reported undefined
    assert torch.isnan(streamed_ccd([(same, labels)], num_classes, dim)[:2]).all()


# --------------------------------------------------------------------------------------------------
# Pixel sample and PCA
# --------------------------------------------------------------------------------------------------
def test_pixel_sample_keeps_the_smallest_keys_per_class_whatever_the_chunks():
    g = torch.Generator().manual_seed(0)
    features, classes = torch.randn(500, 4, generator=g), torch.randint(0, 3, (500,), generator=g)
    classes[:20] = common.IGNORE_INDEX
    keys = torch.rand(500, generator=g, dtype=torch.float64)
    whole = analyze.PixelSample(10)
    whole.add(features, classes, keys)
    rank0, rank1 = analyze.PixelSample(10), analyze.PixelSample(10)
    for start in range(0, 500, 37):  # two "ranks" taking alternate chunks, then merged
        part = rank0 if start // 37 % 2 == 0 else rank1
        part.add(features[start:start + 37], classes[start:start + 37], keys[start:start + 37])
    for c, (k, f) in rank1.kept.items():
        rank0.merge(c, k, f)
    for c in range(3):
        mine = torch.nonzero(classes == c)[:, 0]
        best = mine[torch.argsort(keys[mine])[:10]]  # brute force: the 10 smallest keys of the class
        assert torch.equal(whole.kept[c][1], features[best]) and torch.equal(rank0.kept[c][1], features[best])
    assert common.IGNORE_INDEX not in whole.kept
    sample, labels = whole.arrays()
    assert sample.shape == (30, 4) and labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10


def test_pixel_keys_depend_on_the_image_not_on_the_order():
    assert torch.equal(analyze.pixel_keys(0, "target", 7, 50), analyze.pixel_keys(0, "target", 7, 50))
    assert not torch.equal(analyze.pixel_keys(0, "target", 7, 50), analyze.pixel_keys(0, "source", 7, 50))


def test_pca_projects_on_the_top_two_axes_with_a_fixed_sign():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(200, 6, generator=g) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    points, explained = analyze.pca_2d(data)
    centred = data.double().numpy() - data.double().numpy().mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    reference = centred @ vt[:2].T
    for k in range(2):  # same axes up to sign; the sign rule makes the largest loading positive
        assert np.allclose(np.abs(points[:, k].numpy()), np.abs(reference[:, k]), atol=1e-4)
        axis = np.linalg.lstsq(centred, points[:, k].double().numpy(), rcond=None)[0]
        assert axis[np.abs(axis).argmax()] > 0
    assert explained == pytest.approx((s[:2] ** 2 / (s ** 2).sum()).tolist(), rel=1e-6)
    assert torch.equal(analyze.pca_2d(data)[0], points)


# --------------------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------------------
def write_metrics(path, torn=True):
    lines = [{"iter": 10, "lr": 0.01, "sec_per_iter": 0.1, "loss/seg": 1.0, "loss/adv": 0.5},
             {"iter": 20, "lr": 0.009, "sec_per_iter": 0.1, "loss/seg": 0.8},
             {"iter": 20, "eval/mIoU9": 25.0}]
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if torn:
        text += '{"iter": 30, "lr": 0.0\n["a list"]\n'  # a line torn by a kill, a foreign line
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_metrics_torn_lines_are_skipped_and_counted(tmp_path):
    records, torn = analyze.read_metrics(write_metrics(tmp_path / "run" / "metrics.jsonl"))
    assert len(records) == 3 and torn == 2
    series = analyze.curve_series(records)
    assert set(series) == {"lr", "loss/seg", "loss/adv", "eval/mIoU9"}  # sec_per_iter is not a curve
    assert series["loss/seg"] == ([10, 20], [1.0, 0.8]) and series["eval/mIoU9"] == ([20], [25.0])
    with pytest.raises(UserError, match="no metrics.jsonl"):
        analyze.read_runs([str(tmp_path / "nowhere")])


# --------------------------------------------------------------------------------------------------
# One pass against evaluation.evaluate; checkpoints
# --------------------------------------------------------------------------------------------------
def tiny_model(num_classes=19, seed=0):
    torch.manual_seed(seed)
    return models.build_model("tiny", num_classes).eval()


def save_checkpoint(path, model, **args):
    saved = {"source": "toy-synth", "target": "toy-real", "backbone": "tiny", "method": "source_only",
             "bn": "auto", "align_corners": False, **args}
    torch.save({"model": model.state_dict(), "args": saved}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    (folder / "src").mkdir()
    (folder / "ada").mkdir()
    return {"src": save_checkpoint(folder / "src" / "last.pt", tiny_model(seed=0)),
            "ada": save_checkpoint(folder / "ada" / "last.pt", tiny_model(seed=1), method="fada", align_corners=True),
            "synthia16": save_checkpoint(folder / "synthia16.pt", tiny_model(16), source="synthia",
                                         target="cityscapes", synthia_classes=16)}


def test_one_pass_gives_evaluates_confusion_and_the_features_sums():
    model, space = tiny_model(), datasets.TOY_SPACE
    data = torch.utils.data.Subset(datasets.build_dataset("toy-real", "val", space), range(3))
    protocol = {"input_size": None, "autocast": lambda: common.autocast(CPU, "off"), "test_time_predict": None,
                "resize_via_input": False, "align_corners": True, "workers": 0}
    confusion, sums, sample = analyze.analyse_split(model, data, space, CPU, protocol, "target", 5, 0, True, True,
                                                    None, "test")
    assert torch.equal(confusion, ev.evaluate(model, data, space, CPU, protocol["autocast"], align_corners=True))
    features = torch.cat([model(item["image"][None])[0] for item in data])            # (3, D, h, w)
    labels = torch.stack([item["label"] for item in data])                             # (3, H, W)
    grid = torch.nn.functional.interpolate(labels[:, None].float(), size=features.shape[-2:], mode="nearest")[:, 0]
    expected = brute_force_ccd(features, grid.long(), space.num_classes)
    got = analyze.class_center_distance(sums.sums, sums.sq_norms, sums.counts)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.allclose(got[~torch.isnan(got)], expected[~torch.isnan(expected)], rtol=1e-6)
    assert all(len(k) <= 5 for k, _ in sample.kept.values()) and set(sample.kept) <= set(datasets.toy.TOY_CLASSES)


def test_checkpoints_of_other_label_spaces_are_refused(tmp_path, ckpts):
    with pytest.raises(UserError, match="another label space") as err:
        analyze.main(["--ckpt", ckpts["src"], ckpts["synthia16"], "--out", str(tmp_path / "a"), *FAST])
    assert ckpts["synthia16"] in str(err.value) and not (tmp_path / "a").exists()


def test_the_confusion_picture_keeps_predictions_outside_the_evaluated_classes():
    confusion = np.arange(16.0).reshape(4, 4)  # classes 0 and 2 evaluated; 1 and 3 predicted too
    matrix, columns = analyze.evaluated_confusion(confusion, [0, 2], ["a", "b"])
    assert columns == ["a", "b", "other classes"]
    assert matrix.tolist() == [[0, 2, 1 + 3], [8, 10, 9 + 11]]  # every pixel of a row is still there
    matrix, columns = analyze.evaluated_confusion(np.diag([1.0, 0, 2, 0]), [0, 2], ["a", "b"])
    assert columns == ["a", "b"] and matrix.tolist() == [[1, 0], [0, 2]]


def test_a_source_of_another_label_kind_is_refused_naming_source(tmp_path, ckpts):
    with pytest.raises(UserError, match="^--source cityscapes: its labels are Cityscapes classes"):
        analyze.main(["--ckpt", ckpts["src"], "--source", "cityscapes", "--out", str(tmp_path / "a"), *FAST])


def test_a_non_empty_out_is_refused_without_overwrite(tmp_path, ckpts):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="--out .* not empty; pass --overwrite"):
        analyze.main(["--ckpt", ckpts["src"], "--out", str(tmp_path / "a"), *FAST])


def test_an_unlabelled_split_still_gets_the_picture(tmp_path, ckpts, monkeypatch, capsys):
    monkeypatch.setattr(datasets, "has_labels", lambda name, split, root=None: False)
    monkeypatch.setattr(plots, "available", lambda: False)  # figures: their own tests
    analyze.main(["--ckpt", ckpts["src"], "--out", str(tmp_path / "a"), "--max-images", "2", "--pca-pixels", "3",
                  *FAST])
    out = capsys.readouterr().out
    assert "has no labels: per-class IoU and CCD need them" in out and plots.MISSING in out
    record = json.loads((tmp_path / "a" / "analysis.json").read_text())
    ckpt = record["checkpoints"][0]
    assert ckpt["miou"] is None and ckpt["ccd"] == {"target": None, "source": None}
    assert ckpt["pca"]["pixels"]["target"] and not record["labelled"]  # classed by the prediction
    assert "has no labels: no IoU and no CCD" in (tmp_path / "a" / "analysis.md").read_text()


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
def assert_png(path, size):
    assert os.path.getsize(path) > 1000
    with Image.open(path) as image:
        image.load()  # decodes the whole file
        assert image.format == "PNG" and image.size == tuple(size)


@pytest.mark.slow  # matplotlib's import and five figures: seconds
def test_every_figure_is_a_decodable_png_of_its_size(tmp_path):
    pytest.importorskip("matplotlib")
    classes, labels = ["road", "car", "sky"], ["a", "b"]
    size = plots.grouped_bars(tmp_path / "bars.png", classes, labels, [[50.0, None, 20.0], [60.0, 10.0, 25.0]],
                              "IoU", "t")
    assert_png(tmp_path / "bars.png", size)
    assert size == (600, 400)
    size = plots.ccd_bars(tmp_path / "ccd.png", classes, labels, [("target", [[1, 2, 3], [1, None, 2]]),
                                                                  ("source", [[1, 2, 3], [2, 2, 2]])])
    assert_png(tmp_path / "ccd.png", size)
    assert size == (600, 800)
    size = plots.confusion_image(tmp_path / "conf.png", classes, np.array([[5, 1, 0, 1], [0, 0, 0, 0], [2, 0, 9, 0]]),
                                 "a", [*classes, "other classes"])
    assert_png(tmp_path / "conf.png", size)
    assert size == (700, 600)
    g = np.random.default_rng(0)
    points = {"source": (g.normal(size=(30, 2)), np.repeat([0, 1, 13], 10)),
              "target": (g.normal(size=(30, 2)), np.repeat([0, 1, 13], 10))}
    names, palette = datasets.TOY_SPACE.names, datasets.TOY_SPACE.palette
    size = plots.feature_pca(tmp_path / "pca.png", [("a", points, [0.5, 0.2]), ("b", points, [0.4, 0.3])],
                             names, palette, "target classes: labels")
    assert_png(tmp_path / "pca.png", size)
    assert size == (1050, 420)
    runs = [("a", {"loss/seg": ([1, 2], [1.0, 0.5]), "lr": ([1, 2], [0.01, 0.009])}),
            ("b", {"loss/seg": ([1, 2], [0.9, 0.4]), "eval/mIoU9": ([2], [30.0])})]
    size = plots.learning_curves(tmp_path / "curves.png", runs)
    assert_png(tmp_path / "curves.png", size)
    assert size == (1200, 300)


@pytest.mark.slow
def test_the_toy_benchmark_figure_with_and_without_controls(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    methods = {"source_only": {"miou": [20.0, 21.0], "seeds": [0, 1]},
               "fada": {"miou": [30.0, 31.0], "seeds": [0, 1], "recipe_gain": [9.0, 10.0], "idea_gain": [1.0, 0.0]}}
    assert plots.benchmark_figure(methods, str(tmp_path / "results.png")) == str(tmp_path / "results.png")
    assert_png(tmp_path / "results.png", (700, 450))
    del methods["fada"]["recipe_gain"], methods["fada"]["idea_gain"]
    plots.benchmark_bars(tmp_path / "plain.png", methods)
    assert_png(tmp_path / "plain.png", (700, 450))


@pytest.mark.slow
def test_the_command_writes_json_markdown_and_figures(tmp_path, ckpts, capsys):
    pytest.importorskip("matplotlib")
    run = os.path.dirname(write_metrics(str(tmp_path / "runs" / "ada" / "metrics.jsonl")))
    out = tmp_path / "analysis"
    analyze.main(["--ckpt", ckpts["src"], ckpts["ada"], "--out", str(out), "--max-images", "3", "--source",
                  "toy-synth", "--source-images", "2", "--runs", run, "--pca-pixels", "4", *FAST])
    printed = capsys.readouterr().out
    assert "skipped 2 torn or foreign line(s)" in printed and "ETA" in printed
    record = json.loads((out / "analysis.json").read_text())
    assert record["classes"] == [datasets.TOY_SPACE.names[c] for c in datasets.toy.TOY_CLASSES]
    src, ada = record["checkpoints"]
    assert (src["label"], ada["label"], ada["method"]) == ("src", "ada", "fada")
    for ckpt in (src, ada):
        assert len(ckpt["per_class_iou"]) == 9 and len(ckpt["ccd"]["target"]["per_class"]) == 9
        assert ckpt["ccd"]["source"]["mean"] > 0 and np.array(ckpt["confusion"]).sum() == 3 * 256 * 128
        assert set(ckpt["pca"]["pixels"]) == {"source", "target"}
    assert record["runs"][0]["torn_lines"] == 2 and record["runs"][0]["records"] == 3
    md = (out / "analysis.md").read_text()
    assert "| class | src | ada | ada − src |" in md and "torn lines skipped" in md
    assert record["figures"] == ["iou_per_class.png", "ccd_per_class.png", "confusion_1.png", "confusion_2.png",
                                 "features_pca.png", "learning_curves.png"]
    for name in record["figures"]:
        with Image.open(out / name) as image:
            image.load()


# --------------------------------------------------------------------------------------------------
# Subprocesses: without matplotlib, bad input on the command line, torchrun
# --------------------------------------------------------------------------------------------------
def run_python(code, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.slow
def test_without_matplotlib_json_and_markdown_are_written_and_one_line_says_why(tmp_path, ckpts):
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # `import matplotlib` now raises ImportError
            "from uda import analyze, common\n"
            "common.run_cli(lambda: analyze.main(sys.argv[1:]))")
    result = run_python(code, "--ckpt", ckpts["src"], "--out", tmp_path / "a", "--max-images", "2", *FAST)
    assert result.returncode == 0, result.stderr
    assert "figures skipped: matplotlib is not installed (pip install matplotlib)" in result.stdout
    assert sorted(os.listdir(tmp_path / "a")) == ["analysis.json", "analysis.md"]
    assert json.loads((tmp_path / "a" / "analysis.json").read_text())["figures"] == []


@pytest.mark.slow
def test_bad_input_is_one_line_on_the_command_line(tmp_path, ckpts):
    result = subprocess.run([sys.executable, "-m", "uda.analyze", "--ckpt", ckpts["src"], ckpts["synthia16"],
                             "--out", str(tmp_path / "a"), *FAST], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --ckpt "), result.stderr
    assert "another label space" in lines[0]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_torchrun_two_processes_give_the_single_process_numbers(tmp_path, ckpts, monkeypatch):
    flags = ["--ckpt", ckpts["src"], "--max-images", "5", "--source", "toy-synth", "--source-images", "3",
             "--pca-pixels", "4", *FAST]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    monkeypatch.setattr(plots, "available", lambda: False)  # the numbers only
    analyze.main([*flags, "--out", str(tmp_path / "one")])
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "uda.analyze", *flags, "--out", str(tmp_path / "two")], cwd=REPO,
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    assert "rank 0: src toy-real val 3/3 images" in two.stdout  # rank 0's share of 5 images
    a, b = (json.loads((tmp_path / n / "analysis.json").read_text())["checkpoints"][0] for n in ("one", "two"))
    assert a["confusion"] == b["confusion"] and a["pca"]["pixels"] == b["pca"]["pixels"]
    for domain in ("target", "source"):
        assert np.allclose(a["ccd"][domain]["per_class"], b["ccd"][domain]["per_class"], rtol=1e-9)
    assert np.allclose(a["pca"]["explained_variance"], b["pca"]["explained_variance"], rtol=1e-5)
