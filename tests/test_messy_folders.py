"""Inputs from real folders: phone photos with an EXIF orientation, symlinked and
hidden files under --images, a run folder as --ckpt, images of mixed sizes in one batch, names too long,
unwritable or full output folders, Ctrl-C, running out of memory, edited labels under a statistics cache,
and label suffixes that differ in letter case."""
import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from conftest import REPO
from make_folder_dataset import make
from uda import common, datasets, models, samplers
from uda import evaluation as ev
from uda.common import UserError

CPU = torch.device("cpu")
FAST = ["--workers", "0", "--device", "cpu"]
ROTATED = 6  # EXIF Orientation 6: stored turned a quarter anticlockwise, shown turned back clockwise


def save_rotated_jpeg(path, upright):
    """Store the (H, W, 3) picture as a phone does: the pixels turned a quarter anticlockwise (W x H),
    Orientation 6 telling viewers to turn them back. Returns what the JPEG decodes to, upright (the
    stored pixels as decoded, turned clockwise: np.rot90 k=-1), for comparisons free of JPEG loss."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))
    exif = image.getexif()
    exif[datasets.EXIF_ORIENTATION] = ROTATED
    image.save(path, exif=exif, quality=95)
    with Image.open(path) as stored:
        return np.ascontiguousarray(np.rot90(np.asarray(stored.convert("RGB")), k=-1))


def save(path, array, **options):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **options)


def folder_dataset(root, classes=("ground", "water", "sky")):
    os.makedirs(root, exist_ok=True)
    (root / "classes.json").write_text(json.dumps({"classes": list(classes)}))
    return datasets.folder_space(datasets.read_folder_classes(str(root)))


def checkpoint(path, align_corners=False):
    torch.manual_seed(0)
    model = models.build_model("tiny", 19)
    torch.save({"model": model.state_dict(),
                "args": {"source": "toy-synth", "target": "toy-real", "backbone": "tiny", "method": "source_only",
                         "bn": "auto", "align_corners": align_corners}}, path)
    return model.eval()


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)


def expected_labels(model, upright, align_corners=False):
    """The labels predict_probs gives the (H, W, 3) uint8 picture, native input size."""
    image = datasets.to_tensors(upright, None)[0][None]                                    # (1, 3, H, W)
    probs = ev.predict_probs(model, image, image.shape[-2:], None, lambda: common.autocast(CPU, "off"),
                             align_corners=align_corners)
    return probs.argmax(1)[0].numpy()


# --------------------------------------------------------------------------------------------------
# 10. EXIF orientation wherever an image is read
# --------------------------------------------------------------------------------------------------
def test_exif_orientation_turns_training_pairs_and_labels_upright(tmp_path):
    root = tmp_path / "phone"
    space = folder_dataset(root)
    rng = np.random.default_rng(0)
    upright = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)       # portrait, as the photo is shown
    label = np.zeros((40, 30), np.uint8)
    label[:, 15:], label[:5] = 1, 2                                   # drawn on the portrait view
    shown = save_rotated_jpeg(root / "images" / "train" / "phone.jpg", upright)
    save(root / "labels" / "train" / "phone.png", label)
    assert Image.open(root / "images" / "train" / "phone.jpg").size == (40, 30)  # stored landscape

    ds = datasets.build_dataset("folder", "train", space, root=str(root))
    item = ds[0]
    assert item["image"].shape == (3, 40, 30)
    assert np.array_equal((item["image"] * 255).round().byte().permute(1, 2, 0).numpy(), shown)
    assert np.array_equal(item["label"].numpy(), label)  # not resized onto a landscape image
    assert datasets.probe_image(str(root / "images" / "train" / "phone.jpg"))[1] == (30, 40)

    # a label PNG carrying the tag is turned the same way
    exif = Image.Exif()
    exif[datasets.EXIF_ORIENTATION] = ROTATED
    save(root / "labels" / "train" / "tagged.png", np.ascontiguousarray(np.rot90(label, k=1)), exif=exif)
    assert np.array_equal(datasets.read_label_png(str(root / "labels" / "train" / "tagged.png")), label)


def test_datasets_check_compares_sizes_after_orientation(tmp_path):
    root = tmp_path / "phone"
    folder_dataset(root)
    rng = np.random.default_rng(1)
    upright = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    save_rotated_jpeg(root / "images" / "train" / "good.jpg", upright)
    save(root / "labels" / "train" / "good.png", np.zeros((40, 30), np.uint8))      # the shown frame: fine
    save_rotated_jpeg(root / "images" / "train" / "raw.jpg", upright)
    save(root / "labels" / "train" / "raw.png", np.zeros((30, 40), np.uint8))       # the stored frame
    lines = []
    report = datasets.check("folder", str(root), full=True, out=lines.append)
    assert report["size_mismatches"] == ["raw.jpg: image 30x40, label 40x30"]
    assert any("1 image/label size mismatches" in line and "EXIF orientation" in line for line in lines)


def test_images_are_predicted_upright(tmp_path, capsys):
    model = checkpoint(tmp_path / "last.pt")
    rng = np.random.default_rng(2)
    upright = rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)
    shown = save_rotated_jpeg(tmp_path / "photos" / "phone.jpg", upright)
    evaluate.main(["--ckpt", str(tmp_path / "last.pt"), "--images", str(tmp_path / "photos"),
                   "--save-pred", str(tmp_path / "pred"), *FAST])
    pred = np.array(Image.open(tmp_path / "pred" / "phone.png"))
    assert pred.shape == (70, 50) and Image.open(tmp_path / "pred" / "phone_overlay.png").size == (50, 70)
    assert np.array_equal(pred, expected_labels(model, shown))


# --------------------------------------------------------------------------------------------------
# 11. --images: symlinks, hidden files, a run folder as --ckpt, mixed sizes, names, unwritable output
# --------------------------------------------------------------------------------------------------
def test_images_follow_symlinked_folders_once_and_skip_hidden_files(tmp_path, capsys):
    checkpoint(tmp_path / "last.pt")
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    rng = np.random.default_rng(3)
    for path in (photos / "a.png", photos / "sub" / "b.jpg", elsewhere / "c.png", photos / ".thumbs" / "d.png"):
        save(path, rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    (photos / "._a.png").write_bytes(b"\x00\x05\x16\x07Mac OS X resource fork")  # not an image
    os.symlink(elsewhere, photos / "linked")       # a folder kept elsewhere
    os.symlink(elsewhere, photos / "twin")         # the same folder again: listed once
    os.symlink(photos, photos / "sub" / "loop")    # a link to a parent: would loop for ever
    names, hidden = evaluate.find_images(str(photos))
    assert names == ["a.png", os.path.join("linked", "c.png"), os.path.join("sub", "b.jpg")] and hidden == 2
    assert datasets.scan_images(str(photos)) == names  # training's scan: the same files, once each
    evaluate.main(["--ckpt", str(tmp_path), "--images", str(photos), "--save-pred", str(tmp_path / "pred"), *FAST])
    assert "predicting 3 images" in capsys.readouterr().out.replace("\n", " ")
    assert files_under(tmp_path / "pred") == sorted(f"{stem}{suffix}.png" for stem in ("a", "linked/c", "sub/b")
                                                    for suffix in ("", "_color", "_overlay"))


def test_ckpt_may_name_a_run_folder(tmp_path):
    checkpoint(tmp_path / "last.pt")
    assert evaluate.parse_args(["--ckpt", str(tmp_path)]).ckpt == str(tmp_path / "last.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"--ckpt .*empty: a folder without last\.pt"):
        evaluate.parse_args(["--ckpt", str(tmp_path / "empty")])


def test_batches_group_images_of_one_size(tmp_path, monkeypatch):
    checkpoint(tmp_path / "last.pt")
    rng = np.random.default_rng(4)
    sizes = {"a.png": (30, 40), "b.png": (22, 36), "c.png": (30, 40), "d.jpg": (22, 36), "e.png": (30, 40)}
    for name, (h, w) in sizes.items():
        save(tmp_path / "photos" / name, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    shapes = []
    predict_labels = evaluate.predict_labels
    monkeypatch.setattr(evaluate, "predict_labels", lambda model, images, *a: shapes.append(tuple(images.shape))
                        or predict_labels(model, images, *a))
    outputs = {}
    for batch in (1, 2):
        out = tmp_path / f"pred{batch}"
        evaluate.main(["--ckpt", str(tmp_path), "--images", str(tmp_path / "photos"), "--save-pred", str(out),
                       "--batch-size", str(batch), *FAST])
        outputs[batch] = {name: open(out / name, "rb").read() for name in files_under(out)}
    assert shapes[5:] == [(2, 3, 30, 40), (1, 3, 30, 40), (2, 3, 22, 36)]  # a + c, e; b + d
    assert outputs[2] == outputs[1] and len(outputs[1]) == 15


def test_a_name_too_long_for_the_file_system_is_refused_before_predicting(tmp_path):
    checkpoint(tmp_path / "last.pt")
    long_name = "x" * (evaluate.name_limit(str(tmp_path)) - 6) + ".png"  # fits; its _overlay.png does not
    save(tmp_path / "photos" / long_name, np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserError) as err:
        evaluate.main(["--ckpt", str(tmp_path), "--images", str(tmp_path / "photos"),
                       "--save-pred", str(tmp_path / "pred"), *FAST])
    assert long_name in str(err.value) and "_overlay.png" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "pred").exists()


def failing_open(folder, error, whole_files=0, after_bytes=0):
    """An `open` for evaluate.py: files under `folder` past the first whole_files raise `error` once
    after_bytes were written (0: on opening), as a read-only or full file system does."""
    opened = []

    class Failing:
        def __init__(self, path, mode):
            self.file, self.written = open(path, mode), 0

        def write(self, data):
            if self.written + len(data) > after_bytes:
                self.file.write(bytes(data)[:after_bytes - self.written])  # what reached the disk
                raise error
            self.written += len(data)
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    def fake_open(path, mode="r", *args, **kwargs):
        if not str(path).startswith(str(folder)):
            return open(path, mode, *args, **kwargs)
        opened.append(path)
        if len(opened) <= whole_files:
            return open(path, mode, *args, **kwargs)
        if after_bytes == 0:
            raise error
        return Failing(path, mode)
    return fake_open


def patch_open(monkeypatch, fake_open):
    """One fake `open` for evaluate.py's folder probe and datasets.write_png's PNGs (it counts the files)."""
    for module in (evaluate, datasets):
        monkeypatch.setattr(module, "open", fake_open, raising=False)


def test_unwritable_or_full_output_folders_are_one_line(tmp_path, monkeypatch):
    checkpoint(tmp_path / "last.pt")
    rng = np.random.default_rng(5)
    for name in ("a.png", "b.png"):
        save(tmp_path / "photos" / name, rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    argv = ["--ckpt", str(tmp_path), "--images", str(tmp_path / "photos"), *FAST]
    read_only = OSError(errno.EROFS, os.strerror(errno.EROFS))
    patch_open(monkeypatch, failing_open(tmp_path / "ro", read_only))
    with pytest.raises(UserError, match=r"--save-pred .*ro: cannot write into it \(Read-only file system\)"):
        evaluate.main([*argv, "--save-pred", str(tmp_path / "ro")])
    # the disk fills up in the middle of a PNG: one line, and no truncated or temporary file is left
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    # (files written: the probe of check_writable, a's three PNGs, then b.png fails after 100 bytes)
    patch_open(monkeypatch, failing_open(tmp_path / "full", full, 4, after_bytes=100))
    with pytest.raises(UserError, match=r"--save-pred: cannot write .*b\.png \(No space left on device\)"):
        evaluate.main([*argv, "--save-pred", str(tmp_path / "full")])
    assert files_under(tmp_path / "full") == ["a.png", "a_color.png", "a_overlay.png"]
    for name in files_under(tmp_path / "full"):
        Image.open(tmp_path / "full" / name).load()  # complete files
    # Ctrl-C in the middle of a PNG (exit_on_interrupt raises SystemExit(130) there): the same
    patch_open(monkeypatch, failing_open(tmp_path / "stop", SystemExit(130), 2, after_bytes=100))
    with pytest.raises(SystemExit):
        evaluate.main([*argv, "--save-pred", str(tmp_path / "stop")])
    assert files_under(tmp_path / "stop") == ["a.png"]


# --------------------------------------------------------------------------------------------------
# 12. Ctrl-C and out of memory in evaluate.py
# --------------------------------------------------------------------------------------------------
def start_evaluate(*args):
    """evaluate.py in its own process group, as a terminal runs it (Ctrl-C reaches the whole group)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "evaluate.py", *map(str, args)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def assert_interrupted(process):
    stdout, stderr = process.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert process.returncode == 130, stderr
    assert lines == ["evaluate.py: interrupted (Ctrl-C); the predictions written so far are complete files"], stderr


@pytest.mark.slow
def test_ctrl_c_while_predicting_is_one_line_and_leaves_whole_pngs(tmp_path):
    checkpoint(tmp_path / "last.pt")
    rng = np.random.default_rng(6)
    for k in range(40):
        save(tmp_path / "photos" / f"{k:02d}.png", rng.integers(0, 256, (360, 480, 3), dtype=np.uint8))
    process = start_evaluate("--ckpt", tmp_path, "--images", tmp_path / "photos", "--save-pred", tmp_path / "pred",
                             "--workers", "2", "--device", "cpu")
    for line in process.stdout:  # wait for the first predictions, then press Ctrl-C
        if line.startswith("predicted"):
            break
    time.sleep(0.3)
    os.killpg(process.pid, signal.SIGINT)
    assert_interrupted(process)
    written = files_under(tmp_path / "pred")
    assert 0 < len(written) < 120 and not any(name.startswith(".") for name in written)
    for name in written:
        Image.open(tmp_path / "pred" / name).load()  # a truncated PNG fails here


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to see torch being loaded")
def test_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    process = start_evaluate("--ckpt", tmp_path / "none.pt")
    deadline = time.time() + 60
    while time.time() < deadline:  # interrupt once torch's library is being mapped: mid-import
        try:
            if "libtorch" in open(f"/proc/{process.pid}/maps").read():
                break
        except OSError:
            pass
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    assert_interrupted(process)


@pytest.mark.slow
def test_out_of_memory_names_evaluates_remedies(tmp_path):
    checkpoint(tmp_path / "last.pt")
    code = ("import runpy, sys, torch\n"
            "import uda.evaluation\n"
            "def out_of_memory(*args):\n"
            "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 3.56 GiB')\n"
            "uda.evaluation.model_from_checkpoint = out_of_memory\n"
            f"sys.argv = ['evaluate.py', '--ckpt', {str(tmp_path)!r}]\n"
            "runpy.run_path('evaluate.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for remedy in ("--input-size", "--slide", "--batch-size 1", "--amp"):
        assert remedy in lines[0]
    assert "--crop" not in lines[0] and "--grad-checkpoint" not in lines[0]


def test_run_cli_keeps_trains_out_of_memory_remedies(capsys):
    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(SystemExit) as code:
        common.run_cli(out_of_memory)
    assert code.value.code == 2
    assert "--crop" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        common.run_cli(out_of_memory, oom_hint="try --input-size")
    assert capsys.readouterr().err.strip().endswith("try --input-size")


# --------------------------------------------------------------------------------------------------
# 13. Class statistics follow edited labels
# --------------------------------------------------------------------------------------------------
def test_editing_a_label_recomputes_the_class_statistics(tmp_path):
    root = tmp_path / "src"
    make(str(root), train=4, val=1)
    space = datasets.label_space("folder", argparse.Namespace(source_root=str(root)))
    ds = datasets.build_dataset("folder", "train", space, root=str(root))
    args = argparse.Namespace(source="folder", out=str(tmp_path / "runs" / "a"), stats_cache=None)
    key = samplers.default_cache_path(args, ds, space)
    before = samplers.class_statistics(ds, space.num_classes, key)
    reads = []
    read_label = ds.read_label
    ds.read_label = lambda path: reads.append(path) or read_label(path)
    assert np.array_equal(samplers.class_statistics(ds, space.num_classes, key), before) and not reads  # cached

    # the user repaints one label (same name, same size): every pixel becomes class 3
    label_path = ds.items[1][1]
    old = np.array(Image.open(label_path))
    Image.fromarray(np.full_like(old, 3)).save(label_path)
    stat = os.stat(label_path)
    os.utime(label_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # coarse file-system clocks
    edited = before.copy()
    edited[1] = 0
    edited[1, 3] = old.size
    assert samplers.default_cache_path(args, ds, space) != key  # a cache file of its own
    assert np.array_equal(samplers.class_statistics(ds, space.num_classes, samplers.default_cache_path(
        args, ds, space)), edited)
    reads.clear()
    assert np.array_equal(samplers.class_statistics(ds, space.num_classes, key), edited)  # --stats-cache FILE too
    assert len(reads) == 4


# --------------------------------------------------------------------------------------------------
# 14. Label suffixes that differ in letter case
# --------------------------------------------------------------------------------------------------
def test_a_label_suffix_in_other_case_is_named_with_the_classes_json_keys(tmp_path):
    root = tmp_path / "camera"
    space = folder_dataset(root)
    save(root / "images" / "train" / "IMG_1.jpg", np.zeros((8, 8, 3), np.uint8))
    save(root / "labels" / "train" / "IMG_1.PNG", np.zeros((8, 8), np.uint8))
    with pytest.raises(UserError) as err:
        datasets.build_dataset("folder", "train", space, root=str(root))
    text = str(err.value)
    assert "IMG_1.PNG" in text and "IMG_1.png" in text and "letter case" in text and "\n" not in text
    assert '"label_suffix": ".PNG"' in text and '"img_suffix"' in text and "classes.json" in text
    lines = []
    datasets.check("folder", str(root), out=lines.append)
    assert any(line.strip().startswith("HINT:") and '"label_suffix": ".PNG"' in line for line in lines)
    (root / "classes.json").write_text(json.dumps({"classes": ["ground", "water", "sky"], "label_suffix": ".PNG"}))
    assert len(datasets.build_dataset("folder", "train", space, root=str(root))) == 1
