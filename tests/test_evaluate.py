"""evaluate.py: test-time protocols (uda/evaluation.py), folder inference, and refusing unsafe outputs."""
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
from conftest import REPO, assert_user_error, run_script
from uda import common, datasets, models, plca, pseudo_labels
from uda import evaluation as ev
from uda.common import UserError

CPU = torch.device("cpu")
FAST = ["--workers", "0", "--device", "cpu"]


def no_autocast():
    return common.autocast(CPU, "off")


def tiny_model(num_classes=19, seed=0):
    torch.manual_seed(seed)
    return models.build_model("tiny", num_classes).eval()


def save_checkpoint(path, model, **args):
    """A checkpoint in train.py's format ({"model", "args"}) of a randomly initialised tiny model."""
    saved = {"source": "toy-synth", "target": "toy-real", "backbone": "tiny", "method": "source_only",
             "bn": "auto", "align_corners": False, **args}
    torch.save({"model": model.state_dict(), "args": saved}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    return {"toy": save_checkpoint(folder / "toy.pt", tiny_model(), align_corners=True),
            "synthia16": save_checkpoint(folder / "synthia16.pt", tiny_model(16), source="synthia",
                                         target="cityscapes", synthia_classes=16),
            "gta": save_checkpoint(folder / "gta.pt", tiny_model(), source="gta5", target="cityscapes")}


def snapshot(folder):
    """{relative path: bytes} of every file under folder: 'byte-identical' is equality of two snapshots."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            files[os.path.relpath(path, folder)] = open(path, "rb").read()
    return files


def refused_in_process(argv, *needles):
    with pytest.raises(UserError) as err:
        evaluate.main([*map(str, argv), *FAST])
    for needle in needles:
        assert str(needle) in str(err.value), str(err.value)


# --------------------------------------------------------------------------------------------------
# The maths of the protocols (in process)
# --------------------------------------------------------------------------------------------------
def plain_probs(model, images, label_size, align_corners=False):
    """The single-scale protocol written out: softmax of the logits upsampled to the label size."""
    with torch.no_grad():
        _, logits = model(images)
    return torch.softmax(common.upsample(logits, label_size, align_corners), dim=1)


def test_one_scale_is_the_default_and_several_scales_average_the_views():
    model, images = tiny_model(), torch.rand(2, 3, 40, 72)
    default = ev.predict_probs(model, images, (40, 72), None, no_autocast)
    assert torch.equal(default, plain_probs(model, images, (40, 72)))
    assert torch.equal(ev.predict_probs(model, images, (40, 72), None, no_autocast, scales=[1.0]), default)
    # each scale multiplies the input size (half up); probabilities are averaged at the label size
    multi = ev.predict_probs(model, images, (80, 144), (72, 40), no_autocast, scales=[0.5, 1.25])
    assert ev.scaled_size((72, 40), 0.5) == (36, 20) and ev.scaled_size((72, 40), 1.25) == (90, 50)
    views = [plain_probs(model, ev.resize_images(images, size), (80, 144)) for size in ((36, 20), (90, 50))]
    assert torch.allclose(multi, (views[0] + views[1]) / 2, atol=1e-6)
    assert torch.allclose(multi.sum(1), torch.ones(2, 80, 144), atol=1e-5)


def test_flip_averages_the_mirrored_view_and_is_mirror_symmetric():
    model = tiny_model()
    half = torch.rand(1, 3, 32, 24)
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)                          # (1, 3, 32, 48)
    plain = ev.predict_probs(model, symmetric, (32, 48), None, no_autocast)
    flipped = ev.predict_probs(model, symmetric, (32, 48), None, no_autocast, flip=True)
    assert not torch.equal(plain, plain.flip(-1))  # the network itself is not mirror-symmetric ...
    assert torch.equal(flipped, flipped.flip(-1))  # ... the flip protocol on a symmetric input is
    assert torch.allclose(flipped, (plain + plain.flip(-1)) / 2, atol=1e-7)
    images = torch.rand(1, 3, 32, 48)  # on any input: predicting the mirror image mirrors the prediction
    assert torch.equal(ev.predict_probs(model, images.flip(-1), (32, 48), None, no_autocast, flip=True),
                       ev.predict_probs(model, images, (32, 48), None, no_autocast, flip=True).flip(-1))


def test_plca_aggregation_combines_with_scales_and_flip():
    model, images = tiny_model(), torch.rand(1, 3, 32, 48)
    got = ev.predict_probs(model, images, (32, 48), None, no_autocast, plca.test_time_predict, scales=[1.0, 0.5],
                           flip=True)
    views = []
    for size in ((48, 32), (24, 16)):
        for mirrored in (False, True):
            view = ev.resize_images(images, size)
            probs = common.upsample(plca.aggregate_predict(model, view.flip(-1) if mirrored else view, no_autocast),
                                    (32, 48), False)
            views.append(probs.flip(-1) if mirrored else probs)
    assert torch.allclose(got, sum(views) / 4, atol=1e-6)


def test_slide_windows_follow_mmseg():
    # h 10, w 7, window 4x4, stride 3x3: rows (10 - 4 + 2) // 3 + 1 = 3, the last shifted back to end at 10
    assert ev.slide_windows(10, 7, (4, 4), (3, 3)) == [(0, 4, 0, 4), (0, 4, 3, 7), (3, 7, 0, 4), (3, 7, 3, 7),
                                                       (6, 10, 0, 4), (6, 10, 3, 7)]
    assert ev.slide_windows(3, 5, (8, 8), (4, 4)) == [(0, 3, 0, 5)]  # larger than the image: clipped to it


class WindowContext(torch.nn.Module):
    """Logits that depend on the window they are computed in (minus the window's mean), at stride 1."""

    def forward(self, images):
        return images, 3.0 * (images - images.mean(dim=(2, 3), keepdim=True))


def test_slide_equals_a_per_pixel_loop_over_the_windows():
    model, images = WindowContext(), torch.rand(2, 3, 11, 9)
    window, stride = (5, 4), (3, 3)  # (width, height)
    got = ev.slide_logits(model, images, window, stride, no_autocast, align_corners=False)
    total, count = torch.zeros(2, 3, 11, 9), torch.zeros(11, 9)
    rows, cols = (11 - 4 + 2) // 3 + 1, (9 - 5 + 2) // 3 + 1
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * 3 + 4, 11), min(c * 3 + 5, 9)
            y1, x1 = max(y2 - 4, 0), max(x2 - 5, 0)
            logits = model(images[:, :, y1:y2, x1:x2])[1]
            for y in range(y1, y2):
                for x in range(x1, x2):
                    total[:, :, y, x] += logits[:, :, y - y1, x - x1]
                    count[y, x] += 1
    assert count.min() >= 1
    assert torch.allclose(got, total / count, atol=1e-6)
    probs = ev.predict_probs(model, images, (11, 9), None, no_autocast, slide=window, slide_stride=stride)
    assert torch.allclose(probs, torch.softmax(total / count, dim=1), atol=1e-6)


def test_slide_over_the_whole_image_is_the_plain_prediction():
    model, images = tiny_model(), torch.rand(1, 3, 40, 72)
    plain = ev.predict_probs(model, images, (40, 72), None, no_autocast, align_corners=True)
    for window in ((72, 40), (100, 64)):  # exactly the image, and larger (clipped to it)
        slid = ev.predict_probs(model, images, (40, 72), None, no_autocast, align_corners=True, slide=window)
        assert torch.equal(slid, plain)
    with pytest.raises(UserError, match="--slide"):
        ev.predict_probs(model, images, (40, 72), None, no_autocast, plca.test_time_predict, slide=(72, 40))


def test_align_corners_reaches_the_upsampling_and_the_pseudo_labels(tmp_path):
    model, images = tiny_model(), torch.rand(1, 3, 40, 72)
    on = ev.predict_probs(model, images, (40, 72), None, no_autocast, align_corners=True)
    assert torch.equal(on, plain_probs(model, images, (40, 72), align_corners=True))
    assert not torch.allclose(on, ev.predict_probs(model, images, (40, 72), None, no_autocast))
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("align_corners"))
        return ev.predict_probs(*args, **kwargs)

    data = datasets.ToyDataset("toy-real", "train", labeled=False)
    summary = pseudo_labels.generate(model, data, datasets.TOY_SPACE, str(tmp_path), "argmax", CPU, spy,
                                     no_autocast, limit=2, log=lambda text: None, align_corners=True)
    assert seen == [True, True] and summary["align_corners"] is True


# --------------------------------------------------------------------------------------------------
# Folder inference (--images)
# --------------------------------------------------------------------------------------------------
def write_images(folder):
    """Odd sizes, a nested folder, a jpg, an upper-case suffix; a text file that is not an image."""
    rng = np.random.default_rng(0)
    shapes = {"a.png": (177, 333), "nested/deeper/b.jpg": (48, 64), "nested/C.JPEG": (31, 45)}
    for name, (h, w) in shapes.items():
        os.makedirs(os.path.dirname(folder / name), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return shapes


@pytest.mark.slow
def test_folder_inference_writes_indices_colours_and_overlays(tmp_path, ckpts, capsys):
    images, out = tmp_path / "images", tmp_path / "pred"
    shapes = write_images(images)
    evaluate.main(["--ckpt", str(ckpts["toy"]), "--images", str(images), "--save-pred", str(out), *FAST])
    stdout = capsys.readouterr().out
    assert "predicting 3 images" in stdout and "input native" in stdout and "align_corners True" in stdout
    assert "predicted 3/3 images (100%)" in stdout and "ETA" in stdout
    model = tiny_model()  # the checkpoint's weights
    for name, (h, w) in shapes.items():
        stem = str(out / os.path.splitext(name)[0])
        pred = np.array(Image.open(stem + ".png"))
        assert pred.shape == (h, w) and pred.dtype == np.uint8 and pred.max() < 19
        for suffix in ("_color.png", "_overlay.png"):
            picture = Image.open(stem + suffix)
            assert picture.mode == "RGB" and picture.size == (w, h)
        image = datasets.to_tensors(datasets.read_image(images / name), None)[0][None]   # (1, 3, h, w)
        expected = ev.predict_probs(model, image, (h, w), None, no_autocast, align_corners=True).argmax(1)[0]
        assert np.array_equal(pred, expected.numpy())  # the checkpoint's align_corners (True) was used
    colour = np.array(Image.open(out / "a_color.png"))
    palette = np.array(datasets.CITYSCAPES_PALETTE, dtype=np.uint8)
    assert np.array_equal(colour, palette[np.array(Image.open(out / "a.png"))])
    assert sorted(os.listdir(out)) == ["a.png", "a_color.png", "a_overlay.png", "nested"]

    # again into the same (now non-empty) folder: refused, nothing changed; inside --images: refused
    before = snapshot(out)
    again = run_script("evaluate.py", "--ckpt", ckpts["toy"], "--images", images, "--save-pred", out, *FAST)
    assert_user_error(again, "--save-pred", str(out), "not empty", "--overwrite")
    assert snapshot(out) == before
    refused_in_process(["--ckpt", ckpts["toy"], "--images", images, "--save-pred", images / "pred", "--overwrite"],
                       "--save-pred", "inside --images")
    refused_in_process(["--ckpt", ckpts["toy"], "--images", images, "--save-pred", tmp_path, "--overwrite"],
                       "--save-pred", "holds --images")
    assert not (images / "pred").exists() and snapshot(out) == before


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
@pytest.mark.slow
def test_folder_inference_under_torchrun_writes_what_one_process_writes(tmp_path, ckpts):
    images = tmp_path / "images"
    write_images(images)
    evaluate.main(["--ckpt", str(ckpts["toy"]), "--images", str(images), "--save-pred", str(tmp_path / "one"), *FAST])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "evaluate.py", "--ckpt", str(ckpts["toy"]), "--images", str(images), "--save-pred",
                          str(tmp_path / "two"), *FAST], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    assert "rank 0: predicted 2/2 images (100%)" in two.stdout and "wrote the predictions of 3 images" in two.stdout
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two") and len(snapshot(tmp_path / "one")) == 9


@pytest.mark.slow
def test_folder_inference_refuses_broken_and_clashing_images(tmp_path, ckpts):
    images = tmp_path / "images"
    write_images(images)
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    result = run_script("evaluate.py", "--ckpt", ckpts["toy"], "--images", images, "--save-pred",
                        tmp_path / "out", *FAST)
    assert_user_error(result, "broken.png")
    (images / "broken.png").unlink()
    Image.new("RGB", (8, 8)).save(images / "a.jpg")  # a.png and a.jpg would write the same a.png
    refused_in_process(["--ckpt", ckpts["toy"], "--images", images, "--save-pred", tmp_path / "out2"],
                       "a.jpg", "a.png")
    refused_in_process(["--ckpt", ckpts["toy"], "--images", tmp_path / "nowhere", "--save-pred", tmp_path / "o"],
                       "--images", "no such folder")
    refused_in_process(["--ckpt", ckpts["toy"], "--images", images], "--save-pred")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------
# Evaluation of a labelled split: the protocol in the header and the JSON; refusing to clobber
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def short_val(monkeypatch):
    """evaluate.py in process on the first 20 images of toy-real val, to keep these tests fast."""
    build = datasets.build_dataset

    def first_images(name, split, space, **kwargs):
        return torch.utils.data.Subset(build(name, split, space, **kwargs), range(20))
    monkeypatch.setattr(datasets, "build_dataset", first_images)


@pytest.mark.slow
def test_the_protocol_is_printed_and_recorded(tmp_path, ckpts, short_val, capsys):
    plain, multi = tmp_path / "plain.json", tmp_path / "multi.json"
    evaluate.main(["--ckpt", str(ckpts["toy"]), "--json", str(plain), *FAST])
    out = capsys.readouterr().out
    assert "on toy-real val (20 images, input native, scales 1.0, flip off, slide off, align_corners True" in out
    assert "evaluated 2/20 images (10%)" in out and "evaluated 20/20 images (100%)" in out and "ETA" in out
    record = json.loads(plain.read_text())
    assert record["protocol"] == {"scales": [1.0], "flip": False, "slide": None, "slide_stride": None,
                                  "input_size": "native", "align_corners": True, "tta_aggregate": False,
                                  "resize_via_input": False}
    assert record["images"] == 20 and record["classes"] == 9

    evaluate.main(["--ckpt", str(ckpts["toy"]), "--json", str(multi), "--scales", "0.5", "1.0", "--slide", "128x128",
                   "--slide-stride", "96x64", *FAST])
    assert "scales 0.5 1.0, flip off, slide 128x128 stride 96x64" in capsys.readouterr().out
    protocol = json.loads(multi.read_text())["protocol"]
    assert protocol == {**record["protocol"], "scales": [0.5, 1.0], "slide": [128, 128], "slide_stride": [96, 64]}
    evaluate.main(["--ckpt", str(ckpts["toy"]), "--json", str(multi), "--overwrite", "--flip", *FAST])
    assert json.loads(multi.read_text())["protocol"]["flip"] is True  # --overwrite replaced the file


@pytest.mark.slow
def test_an_existing_json_is_not_clobbered(tmp_path, ckpts):
    json_path = tmp_path / "scores.json"
    json_path.write_text('{"miou": 50.0}')
    assert_user_error(run_script("evaluate.py", "--ckpt", ckpts["toy"], "--json", json_path, *FAST),
                      "--json", str(json_path), "exists", "--overwrite")
    assert json_path.read_text() == '{"miou": 50.0}'
    refused_in_process(["--ckpt", ckpts["toy"], "--json", ckpts["toy"], "--overwrite"], "--json", "inside --ckpt")
    refused_in_process(["--ckpt", ckpts["toy"], "--json", tmp_path], "--json", "is a folder")


@pytest.mark.slow
def test_outputs_never_go_into_the_dataset_or_over_pseudo_labels(tmp_path, ckpts):
    data = tmp_path / "data"
    (data / "cityscapes").mkdir(parents=True)
    (data / "cityscapes" / "keep.txt").write_text("dataset file")
    before = snapshot(data)
    for flag, path in (("--save-pseudo", data / "cityscapes" / "pl"), ("--json", data / "cityscapes" / "keep.txt"),
                       ("--save-pred", data / "cityscapes")):
        refused_in_process(["--ckpt", ckpts["gta"], "--data-root", data, flag, path, "--overwrite"],
                           flag, "inside the dataset folder")
    assert snapshot(data) == before
    # pseudo-labels into a non-empty folder: refused (exit 2, one line), byte-identical
    pseudo = tmp_path / "pseudo"
    pseudo.mkdir()
    (pseudo / "toy-real_train_00000.png").write_bytes(b"an earlier pseudo-label")
    before = snapshot(pseudo)
    assert_user_error(run_script("evaluate.py", "--ckpt", ckpts["toy"], "--save-pseudo", pseudo, *FAST),
                      "--save-pseudo", "not empty")
    assert snapshot(pseudo) == before


@pytest.mark.slow
def test_another_label_space_is_refused(tmp_path, ckpts):
    # a 16-class SYNTHIA model scored on the toy printed 'mIoU16 0.44' before
    assert_user_error(run_script("evaluate.py", "--ckpt", ckpts["synthia16"], "--target", "toy-real", *FAST),
                      "--target toy-real", "synthia")
    refused_in_process(["--ckpt", ckpts["toy"], "--target", "cityscapes", "--data-root", tmp_path],
                       "--target cityscapes", "toy-synth")
    refused_in_process(["--ckpt", ckpts["toy"], "--target", "cityscapes", "--data-root", tmp_path,
                        "--save-pseudo", tmp_path / "pl"], "--target cityscapes")
    assert not (tmp_path / "pl").exists()
    # the benchmark protocol: a 16-class SYNTHIA model on Cityscapes passes the check (then wants the data)
    refused_in_process(["--ckpt", ckpts["synthia16"], "--data-root", tmp_path], "cityscapes", "not found")
    # a folder dataset's classes: not Cityscapes', not the toy's, not another folder's
    folder_ckpt = save_checkpoint(tmp_path / "folder.pt", tiny_model(2), source="folder", target="folder",
                                  folder_classes={"classes": ["ground", "sky"]})
    refused_in_process(["--ckpt", folder_ckpt, "--target", "cityscapes", "--data-root", tmp_path], "--target cityscapes")
    refused_in_process(["--ckpt", folder_ckpt, "--target", "toy-real"], "--target toy-real", "folder")
    other = tmp_path / "data" / "folder"
    (other / "labels" / "val").mkdir(parents=True)
    (other / "classes.json").write_text(json.dumps({"classes": ["ground", "water"]}))
    refused_in_process(["--ckpt", folder_ckpt, "--data-root", tmp_path / "data"], "classes.json", "water")


@pytest.mark.slow
def test_bad_flags_are_one_line_errors(tmp_path, ckpts):
    assert_user_error(run_script("evaluate.py", "--ckpt", ckpts["toy"], "--batch-size", "0"), "--batch-size", "0")
    for flags, needle in ((["--workers", "-1"], "--workers"), (["--scales", "1.0", "0"], "--scales"),
                          (["--scales", "nan"], "--scales"), (["--input-size", "1024"], "--input-size"),
                          (["--slide", "0x5"], "--slide"), (["--slide-stride", "8x8"], "--slide-stride"),
                          (["--slide", "8x8", "--slide-stride", "16x8"], "--slide-stride"),
                          (["--target", "mnist"], "--target"), (["--pseudo-limit", "0"], "--pseudo-limit"),
                          (["--save-pseudo", tmp_path / "p", "--flip"], "--save-pseudo")):
        with pytest.raises(UserError, match=needle.replace("-", r"\-")):
            evaluate.parse_args(["--ckpt", str(ckpts["toy"]), *map(str, flags)])
    assert not os.listdir(tmp_path)


def test_help_shows_defaults_and_targets_and_stays_in_the_repository():
    text = evaluate.build_parser().format_help()
    assert "(default: 1)" in text and "(default: [1.0])" in text and "(default: auto)" in text
    assert "one of: toy-synth, toy-real" in text and "cityscapes" in text  # --target's choices
    assert "shared/" not in text and "conventions.md" not in text and "../" not in text
