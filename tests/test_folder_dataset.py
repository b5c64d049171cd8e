"""Folder datasets (mmsegmentation's layout), data lists and broken input, on tiny folders made here.

Each test writes its own folder with tests/make_folder_dataset.py (odd image sizes, nested sub-folders,
classes.json with a palette) or by hand, then checks what a user would see: the items, the label
values, and for every kind of bad input a one-line UserError naming the file and the reason.
"""
import argparse
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from make_folder_dataset import CLASSES, PALETTE, RAW_IDS, SIZES, MakeError, make
from uda import datasets, models, samplers
from uda.common import UserError

ns = argparse.Namespace


def space_of(root):
    return datasets.label_space("folder", ns(source_root=str(root)))


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def one_line(err):
    text = str(err.value)
    assert "\n" not in text, text
    return text


@pytest.fixture
def folder(tmp_path):
    """A labelled folder dataset: 8 train, 4 val images in nested sub-folders."""
    root = tmp_path / "src"
    make(str(root), train=8, val=4)
    return root


# --------------------------------------------------------------------------------------------------
# Reading a folder dataset
# --------------------------------------------------------------------------------------------------
def test_folder_items_labels_and_space(folder):
    space = space_of(folder)
    assert space.names == CLASSES and space.palette == PALETTE and space.num_classes == 4
    assert space.trainids == [0, 1, 2, 3] and space.eval_sets == {"mIoU4": [0, 1, 2, 3]}
    assert not space.has_trainids  # its own classes, not Cityscapes trainIds
    ds = datasets.build_dataset("folder", "train", space, root=str(folder))
    assert len(ds) == 8
    names = [ds.item_name(i) for i in range(len(ds))]
    assert os.path.join("city_b", "street_1", "train_0001") in names  # nested, relative, no suffix
    for i, name in enumerate(names):
        index = int(name[-4:])
        width, height = SIZES[index % len(SIZES)]
        item = ds[i]
        assert item["image"].shape == (3, height, width) and item["label"].shape == (height, width)
        stored = np.array(Image.open(folder / "labels" / "train" / (name + ".png")))
        assert torch.equal(item["label"], torch.from_numpy(stored).long())  # class indices, unchanged
        assert set(item["label"].unique().tolist()) <= {0, 1, 2, 3, 255}
    assert (ds[0]["label"][0] == 255).all()  # the ignored frame
    assert datasets.has_labels("folder", "train", str(folder)) and datasets.has_labels("folder", "val", str(folder))
    # a training item at native size: crop and flip work on an odd-sized image
    train = datasets.build_dataset("folder", "train", space, root=str(folder), augment=True, crop=(64, 48))
    assert train[(0, 3)]["image"].shape == (3, 48, 64) and train[(0, 3)]["label"].shape == (48, 64)


def test_jpg_images_and_check_report(tmp_path):
    root = tmp_path / "jpg"
    make(str(root), jpg=True, train=4, val=2)
    assert all(f.endswith(".jpg") for _, _, files in os.walk(root / "images") for f in files)
    ds = datasets.build_dataset("folder", "val", space_of(root), root=str(root))
    assert len(ds) == 2 and ds[1]["image"].shape == (3, SIZES[1][1], SIZES[1][0])
    os.remove(root / "labels" / "train" / "city_a" / "train_0000.png")
    lines = []
    report = datasets.check("folder", str(root), full=True, out=lines.append)
    assert report["images"] == 4 and report["labels"] == 3 and len(report["missing"]) == 1
    assert report["classes"] == CLASSES and set(report["class_pixels"]) == {0, 1, 2, 3, 255}
    assert any(line.strip().startswith("3 car") for line in lines)  # the folder's own class names
    assert datasets.report_problems(report)
    with pytest.raises(SystemExit) as code:  # the CLI: exit status 1 on problems
        datasets.main(["check", "folder", str(root)])
    assert code.value.code == 1


def test_mixed_suffixes_explicit_suffixes_and_duplicate_names(tmp_path):
    root = tmp_path / "mixed"
    make(str(root), train=2, val=1)
    image = root / "images" / "train" / "city_a" / "train_0000.png"
    Image.open(image).save(root / "images" / "train" / "extra.JPEG")  # any case of .jpeg is an image
    shutil.copy(root / "labels" / "train" / "city_a" / "train_0000.png", root / "labels" / "train" / "extra.png")
    (root / "images" / "train" / "._extra.png").write_bytes(b"\0\0")  # a macOS resource fork: skipped
    space = space_of(root)
    ds = datasets.build_dataset("folder", "train", space, root=str(root))
    assert sorted(ds.item_name(i) for i in range(len(ds)))[-1] == "extra" and len(ds) == 3
    only_png = datasets.build_dataset("folder", "train", space, root=str(root), img_suffix=".png")
    assert len(only_png) == 2
    # labels with another suffix, set by keyword or in classes.json
    val_labels = root / "labels" / "val" / "city_a"
    os.rename(val_labels / "val_0000.png", val_labels / "val_0000_gt.png")
    val = datasets.build_dataset("folder", "val", space, root=str(root), label_suffix="_gt.png")
    assert val[0]["label"].shape == val[0]["image"].shape[1:]
    record = json.loads((root / "classes.json").read_text())
    (root / "classes.json").write_text(json.dumps({**record, "label_suffix": "_gt.png"}))
    assert len(datasets.build_dataset("folder", "val", space, root=str(root))) == 1
    Image.open(image).save(image.with_suffix(".jpg"))  # train_0000.png and train_0000.jpg: one name
    with pytest.raises(UserError) as err:
        datasets.build_dataset("folder", "train", space, root=str(root))
    assert "share the name" in one_line(err) and "train_0000" in str(err.value)


def test_label_map_and_out_of_range_values(tmp_path):
    root = tmp_path / "mapped"
    make(str(root), train=2, val=1, label_map=True)
    stored = np.asarray(Image.open(root / "labels" / "train" / "city_a" / "train_0000.png"))
    assert set(np.unique(stored).tolist()) <= set(RAW_IDS) | {99}
    ds = datasets.build_dataset("folder", "train", space_of(root), root=str(root))
    label = ds[0]["label"].numpy()
    expected = np.full(stored.shape, 255)
    for index, raw in enumerate(RAW_IDS):
        expected[stored == raw] = index
    assert np.array_equal(label, expected) and (label[stored == 99] == 255).all()  # unmapped raw id -> ignore
    # without a label_map, a value that is no class index (nor 255) is an error naming the file
    record = json.loads((root / "classes.json").read_text())
    del record["label_map"]
    (root / "classes.json").write_text(json.dumps(record))
    ds = datasets.build_dataset("folder", "train", space_of(root), root=str(root))
    with pytest.raises(UserError) as err:
        ds[0]
    # the first bad pixel in raster order: the frame, stored as the unmapped raw id 99
    assert "train_0000.png: value 99 is not a class index 0..3 or 255" in one_line(err)


# --------------------------------------------------------------------------------------------------
# classes.json and the classes of a target
# --------------------------------------------------------------------------------------------------
def test_missing_classes_json(folder):
    os.remove(folder / "classes.json")
    for build in (lambda: space_of(folder),
                  lambda: datasets.build_dataset("folder", "train", None, root=str(folder))):
        with pytest.raises(UserError) as err:
            build()
        text = one_line(err)
        assert str(folder / "classes.json") in text and '"classes"' in text and "palette" in text
    with pytest.raises(UserError, match="--source-root"):  # no root at all: the flags are named
        datasets.label_space("folder", ns())


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"names": ["a"]}', '"classes" list'),
    ('{"classes": []}', "non-empty list"),
    ('{"classes": ["a", "a"]}', "listed twice"),
    ('{"classes": ["a", "b"], "palette": [[1, 2, 3]]}', "one \\[r, g, b\\]"),
    ('{"classes": ["a", "b"], "label_map": {"7": 2}}', "not a class index 0..1 or 255"),
    ('{"classes": ["a", "b"], "label_map": {"x": 0}}', "not a raw label id"),
    ('{"classes": ["a"], "label-map": {}}', "unknown key 'label-map'"),
])
def test_bad_classes_json(tmp_path, content, message):
    (tmp_path / "classes.json").write_text(content)
    with pytest.raises(UserError, match=message) as err:
        datasets.read_folder_classes(str(tmp_path))
    assert str(tmp_path / "classes.json") in one_line(err)


def test_generated_palette_and_saved_classes(tmp_path):
    (tmp_path / "classes.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(30)]}))
    space = space_of(tmp_path)
    assert len(space.palette) == 30 and len(set(space.palette)) == 30 and (0, 0, 0) not in space.palette
    assert space.palette == space_of(tmp_path).palette  # deterministic
    # a checkpoint's saved record needs no dataset folder
    saved = datasets.read_folder_classes(str(tmp_path))
    assert datasets.label_space("folder", ns(folder_classes=saved, source_root="/nowhere")) == space
    # pseudo-label folders keep the folder's classes (labelspace.json written from space.to_record())
    pseudo = tmp_path / "pseudo"
    os.makedirs(pseudo)
    (pseudo / "labelspace.json").write_text(json.dumps(space.to_record()))
    assert datasets.label_space("folder", ns(pseudo_dir=str(pseudo))) == space
    # the benchmark spaces: the Cityscapes colour of each class's trainId
    assert datasets.SYNTHIA_16.palette[9] == datasets.CITYSCAPES_PALETTE[10]  # sky
    assert datasets.CITYSCAPES_19.has_trainids and datasets.CITYSCAPES_19.to_record().keys() == {"trainids",
                                                                                                  "eval_sets"}


def test_target_classes_must_match(tmp_path, folder):
    space = space_of(folder)
    same = tmp_path / "same"
    make(str(same), train=2, val=1, style="real", seed=1)
    datasets.check_same_classes(space, "folder", str(same))  # same classes.json: fine
    other = tmp_path / "other"
    make(str(other), train=2, val=1)
    record = json.loads((other / "classes.json").read_text())
    record["classes"] = ["sky", "road", "car", "building"]  # same names, another order
    (other / "classes.json").write_text(json.dumps(record))
    for check in (lambda: datasets.check_same_classes(space, "folder", str(other)),
                  lambda: datasets.build_dataset("folder", "val", space, root=str(other)),
                  lambda: datasets.build_dataset("folder", "train", space, root=str(other), labeled=False)):
        with pytest.raises(UserError) as err:
            check()
        assert "class 2 is 'car' here, 'building' in the model" in one_line(err)
        assert str(other / "classes.json") in str(err.value)
    # a benchmark source (19 Cityscapes classes) with this 4-class folder target
    with pytest.raises(UserError, match="class 0 is 'sky' here, 'road' in the model"):
        datasets.check_same_classes(datasets.CITYSCAPES_19, "folder", str(folder))
    # a folder source with a benchmark target: its labels are Cityscapes classes
    for target in ("cityscapes", "toy-real"):
        with pytest.raises(UserError, match=f"--target {target}: its labels are Cityscapes classes"):
            datasets.check_same_classes(space, target, None)
    with pytest.raises(UserError, match="Cityscapes"):
        datasets.build_dataset("toy-real", "val", space)
    # ... unless the folder lists the Cityscapes classes in trainId order
    (other / "classes.json").write_text(json.dumps({"classes": datasets.CITYSCAPES_NAMES}))
    cityscapes_like = space_of(other)
    assert cityscapes_like.has_trainids
    datasets.check_same_classes(cityscapes_like, "cityscapes", None)


def test_unlabelled_target(tmp_path, folder):
    target = tmp_path / "tgt"
    make(str(target), unlabelled=True, jpg=True, train=3, val=2)
    assert not os.path.exists(target / "labels")
    assert not datasets.has_labels("folder", "train", str(target))
    assert not datasets.has_labels("folder", "val", str(target))
    space = space_of(folder)
    datasets.check_same_classes(space, "folder", str(target))
    ds = datasets.build_dataset("folder", "train", space, root=str(target), labeled=False, augment=True, crop=(32, 32))
    assert len(ds) == 3 and "label" not in ds[(1, 4)]
    with pytest.raises(UserError) as err:
        datasets.build_dataset("folder", "val", space, root=str(target))
    assert "no labels/val/ folder" in one_line(err)
    os.remove(target / "classes.json")  # images only: still a valid unlabelled target
    datasets.check_same_classes(space, "folder", str(target))
    assert len(datasets.build_dataset("folder", "train", space, root=str(target), labeled=False)) == 3
    lines = []
    report = datasets.check("folder", str(target), out=lines.append)
    assert report["images"] == 3 and report["labels"] == 0 and not datasets.report_problems(report)
    assert any("unlabelled target" in line for line in lines)


# --------------------------------------------------------------------------------------------------
# Broken files: one line naming the file and the reason
# --------------------------------------------------------------------------------------------------
def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_truncated_png_in_dataloader_workers(folder):
    ds = datasets.build_dataset("folder", "train", space_of(folder), root=str(folder))
    broken = folder / "images" / "train" / "city_a" / "train_0003.png"
    truncate(broken)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
    with pytest.raises(UserError) as err:
        for _ in loader:
            pass
    assert err.type is UserError
    text = str(err.value).strip()
    assert "DataLoader worker process" in text  # the worker's traceback is kept above ...
    # ... and the last line is the one-line message (what the CLI prints)
    assert text.splitlines()[-1] == f"uda.common.UserError: image {broken}: unreadable (image file is truncated)"


@pytest.mark.parametrize("kind", ["image", "label"])
@pytest.mark.parametrize("damage, reason", [("empty", "empty file (0 bytes)"),
                                            ("text", "not an image Pillow can decode"),
                                            ("truncate", "image file is truncated")])
def test_broken_files_are_one_line_errors(folder, kind, damage, reason):
    folder_of = {"image": "images", "label": "labels"}[kind]
    path = folder / folder_of / "train" / "city_a" / "train_0000.png"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("this is not an image\n")
    else:
        truncate(path)
    ds = datasets.build_dataset("folder", "train", space_of(folder), root=str(folder))
    index = [ds.item_name(i) for i in range(len(ds))].index(os.path.join("city_a", "train_0000"))
    with pytest.raises(UserError) as err:
        ds[index]
    assert one_line(err).startswith(f"{kind} {path}: unreadable (") and reason in str(err.value)
    report = datasets.check("folder", str(folder), full=True, out=lambda line: None)
    assert any(str(path) in entry and reason in entry for entry in report["unreadable"])


def test_synthia_empty_label_is_named(tmp_path):
    path = tmp_path / "0000000.png"
    path.write_bytes(b"")
    with pytest.raises(UserError, match="empty file"):
        datasets.read_synthia_label(str(path), np.zeros(2 ** 16, np.uint8))


def test_16bit_gray_image_is_scaled_and_flagged(folder):
    path = folder / "images" / "train" / "city_a" / "train_0000.png"
    width, height = Image.open(path).size
    gray = (np.arange(height * width).reshape(height, width) * 37 % 65536).astype(np.uint16)
    Image.fromarray(gray).save(path)
    assert Image.open(path).mode.startswith("I")  # Pillow's 16-bit grayscale
    image = datasets.read_image(str(path))
    assert image.shape == (height, width, 3) and image.dtype == np.uint8
    assert np.array_equal(image[..., 0], np.rint(gray / 257.0).astype(np.uint8))  # not 99% saturated
    assert (image == 255).mean() < 0.01
    lines = []
    report = datasets.check("folder", str(folder), full=True, out=lines.append)
    assert report["gray16_images"] == [str(path)] and any("16-bit grayscale" in line for line in lines)


def test_rgb_label_is_refused(folder):
    path = folder / "labels" / "train" / "city_a" / "train_0000.png"
    label = np.asarray(Image.open(path))
    Image.fromarray(np.stack([label] * 3, -1)).save(path)
    ds = datasets.build_dataset("folder", "train", space_of(folder), root=str(folder))
    with pytest.raises(UserError) as err:
        ds.label_array([ds.item_name(i) for i in range(len(ds))].index(os.path.join("city_a", "train_0000")))
    assert one_line(err).startswith(f"label {path}: expected a single-channel PNG") and "mode RGB" in str(err.value)


def test_empty_split_and_empty_samplers(tmp_path, folder):
    shutil.rmtree(folder / "images" / "val")
    os.makedirs(folder / "images" / "val" / "city_a")  # the folders exist, no image in them
    with pytest.raises(UserError) as err:
        datasets.build_dataset("folder", "val", space_of(folder), root=str(folder))
    assert "holds no images" in one_line(err) and str(folder / "images" / "val") in str(err.value)
    os.makedirs(tmp_path / "cityscapes" / "leftImg8bit" / "train")  # a benchmark split without images
    with pytest.raises(UserError, match="cityscapes train: no images under"):
        datasets.build_dataset("cityscapes", "train", datasets.CITYSCAPES_19, root=str(tmp_path / "cityscapes"),
                               labeled=False)
    empty = np.zeros((0, 4), np.int64)
    with pytest.raises(UserError, match="class-balanced: the source dataset holds no images"):
        samplers.ClassBalancedSampler(empty, seed=0)
    with pytest.raises(UserError, match="rcs: the source dataset holds no images"):
        samplers.RareClassSampler(empty, 0.01, 10, seed=0)
    args = ns(source_sampler="rcs", rcs_temperature=0.01, source="folder")
    with pytest.raises(UserError, match="holds no images"):
        samplers.build_source_sampler(args, [], space_of(folder), 0)


def test_missing_val_file_is_named_with_the_count(folder):
    val = datasets.build_dataset("folder", "val", space_of(folder), root=str(folder))
    datasets.check_files_exist(val)  # complete: nothing raised
    datasets.check_files_exist(datasets.build_dataset("toy-real", "val", datasets.TOY_SPACE))  # no files
    first = folder / "labels" / "val" / "city_a" / "val_0000.png"
    os.remove(first)
    os.remove(folder / "labels" / "val" / "city_b" / "street_2" / "val_0002.png")
    with pytest.raises(UserError) as err:
        datasets.check_files_exist(val)
    text = one_line(err)
    assert "2 of 4" in text and str(first) in text
    with pytest.raises(UserError, match="2 of 4"):
        datasets.build_dataset("folder", "val", space_of(folder), root=str(folder))


def test_images_of_different_sizes_need_a_crop_to_be_batched(folder):
    space = space_of(folder)
    with pytest.raises(UserError) as err:
        datasets.build_dataset("folder", "train", space, root=str(folder), augment=True, batch_size=2)
    assert "images differ in size" in one_line(err) and "--crop" in str(err.value)
    datasets.build_dataset("folder", "train", space, root=str(folder), augment=True, batch_size=1)
    datasets.build_dataset("folder", "train", space, root=str(folder), augment=True, batch_size=2, crop=(32, 32))
    datasets.build_dataset("folder", "train", space, root=str(folder), augment=True, batch_size=2, size=(64, 32))
    with pytest.raises(UserError, match="--random-scale without --crop"):  # a random scale: sizes vary again
        datasets.build_dataset("folder", "train", space, root=str(folder), augment=True, batch_size=2,
                               size=(64, 32), scale_range=(1.0, 1.5))
    assert datasets.train_options(ns(batch_size=4), "target")["batch_size"] == 4


# --------------------------------------------------------------------------------------------------
# Data lists
# --------------------------------------------------------------------------------------------------
def test_list_file_selects_a_subset(tmp_path, folder):
    names = [os.path.join("city_b", "street_1", "train_0004.png"), "city_a/train_0000.png"]
    listed = tmp_path / "subset.txt"
    listed.write_text("# two of the eight\n" + names[0] + "\n\n" + names[1] + "\n")
    args = ns(source_list=str(listed), cat_max_ratio=1.0)
    options = datasets.train_options(args, "source")
    assert options["list_file"] == str(listed) and "list_file" not in datasets.train_options(args, "target")
    ds = datasets.build_dataset("folder", "train", space_of(folder), root=str(folder), **options)
    assert [ds.item_name(i) for i in range(len(ds))] == [os.path.join("city_b", "street_1", "train_0004"),
                                                        os.path.join("city_a", "train_0000")]
    assert ds[1]["label"].shape == (SIZES[0][1], SIZES[0][0])
    # a listed file that does not exist: the list, its line number and the path
    listed.write_text(names[0] + "\n" + "city_a/nope.png\n" + names[1] + "\n")
    with pytest.raises(UserError) as err:
        datasets.build_dataset("folder", "train", space_of(folder), root=str(folder), list_file=str(listed))
    text = one_line(err)
    assert text.startswith(f"list {listed} line 2: ")
    assert str(folder / "images" / "train" / "city_a" / "nope.png") in text
    assert "2 missing files among its 3 entries" in text  # the image and its label
    listed.write_text("# nothing\n\n")
    with pytest.raises(UserError, match="lists no files"):
        datasets.build_dataset("folder", "train", space_of(folder), root=str(folder), list_file=str(listed))
    with pytest.raises(UserError, match="no such file"):
        datasets.build_dataset("folder", "train", space_of(folder), root=str(folder), list_file=str(tmp_path / "x"))
    listed.write_text("/abs/a.png\n")
    with pytest.raises(UserError, match="line 1: /abs/a.png is an absolute path"):
        datasets.build_dataset("folder", "train", space_of(folder), root=str(folder), list_file=str(listed))


def test_list_file_of_a_benchmark(tmp_path):
    root = tmp_path / "gta5"
    ids = np.full((4, 6), 7, np.uint8)
    for i in (1, 2, 3):
        save(f"{root}/images/{i:05d}.png", np.zeros((4, 6, 3), np.uint8))
        save(f"{root}/labels/{i:05d}.png", ids)
    listed = tmp_path / "gta5_subset.txt"
    listed.write_text("00003.png\n00001.png\n")
    ds = datasets.build_dataset("gta5", "train", datasets.CITYSCAPES_19, root=str(root), list_file=str(listed))
    assert [ds.item_name(i) for i in range(2)] == ["00003", "00001"] and (ds[0]["label"] == 0).all()
    listed.write_text("00001.png\n00009.png\n")
    with pytest.raises(UserError, match=f"list {listed} line 2: .*00009.png not found"):
        datasets.build_dataset("gta5", "train", datasets.CITYSCAPES_19, root=str(root), list_file=str(listed))


def test_lists_command_for_folders_refuses_to_overwrite(tmp_path, folder, monkeypatch):
    out = tmp_path / "lists" / "train.txt"
    with pytest.raises(UserError, match="pass --out FILE"):
        datasets.main(["lists", "folder", str(folder)])
    with pytest.raises(UserError, match="inside the dataset folder"):  # never written into a dataset
        datasets.main(["lists", "folder", str(folder), "--out", str(folder / "train.txt")])
    assert not (folder / "train.txt").exists()
    datasets.main(["lists", "folder", str(folder), "--out", str(out)])
    lines = out.read_text().splitlines()
    assert len(lines) == 8 and os.path.join("city_b", "street_2", "train_0005.png") in lines
    ds = datasets.build_dataset("folder", "train", space_of(folder), root=str(folder), list_file=str(out))
    assert len(ds) == 8  # a written list reads back
    out.write_text("mine\n")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        datasets.main(["lists", "folder", str(folder), "--out", str(out)])
    assert out.read_text() == "mine\n"
    datasets.main(["lists", "folder", str(folder), "--split", "val", "--out", str(out), "--overwrite"])
    assert len(out.read_text().splitlines()) == 4
    # the default path inside data_lists/ is protected too
    monkeypatch.setattr(datasets, "LISTS_DIR", str(tmp_path / "data_lists"))
    os.makedirs(tmp_path / "data_lists" / "gta5")
    (tmp_path / "data_lists" / "gta5" / "train.txt").write_text("shipped\n")
    with pytest.raises(UserError, match="already exists"):
        datasets.main(["lists", "gta5"])
    assert (tmp_path / "data_lists" / "gta5" / "train.txt").read_text() == "shipped\n"
    report = tmp_path / "report.json"
    report.write_text("{}")
    with pytest.raises(UserError, match="--json .* already exists"):
        datasets.main(["check", "folder", str(folder), "--json", str(report)])


# --------------------------------------------------------------------------------------------------
# Samplers, the make script, train.py
# --------------------------------------------------------------------------------------------------
def test_samplers_on_a_folder_dataset(tmp_path, folder):
    space = space_of(folder)
    ds = datasets.build_dataset("folder", "train", space, root=str(folder), augment=True, crop=(64, 64),
                                recrop_pixels=10)
    counts = samplers.class_statistics(ds, space.num_classes, str(tmp_path / "stats.json"))
    assert counts.shape == (8, 4)
    expected = [np.bincount(ds.label_array(i).ravel(), minlength=256)[:4] for i in range(8)]
    assert counts.tolist() == np.stack(expected).tolist()
    balanced = iter(samplers.ClassBalancedSampler(counts, seed=0, sub_epoch=20))
    assert all(0 <= next(balanced)[0] < 8 for _ in range(30))
    rcs = samplers.RareClassSampler(counts, 0.01, 100, seed=0)
    assert set(rcs.classes) <= {0, 1, 2, 3} and 3 in rcs.classes  # car, the rarest, can be drawn
    stream = iter(rcs)
    for _ in range(5):
        index, draw, cls = next(stream)
        assert ds[(index, draw, cls)]["label"].shape == (64, 64)
    # the cache key follows classes.json: another label_map means other statistics
    args = ns(source="folder", out=str(tmp_path / "runs" / "a"), stats_cache=None)
    key = samplers.default_cache_path(args, ds, space)
    ds.label_key = "edited"
    assert samplers.default_cache_path(args, ds, space) != key


@pytest.mark.slow
def test_make_script_cli(tmp_path, run):
    out = tmp_path / "made"
    result = run("tests/make_folder_dataset.py", out, "--unlabelled", "--jpg", "--train", "2", "--val", "1")
    assert result.returncode == 0, result.stderr
    assert (out / "classes.json").exists() and not (out / "labels").exists()
    again = run("tests/make_folder_dataset.py", out)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "not an empty folder" in again.stderr
    with pytest.raises(MakeError):
        make(str(out))


@pytest.mark.slow
def test_train_folder_to_folder(tmp_path, folder):
    """train.py end to end: --source folder -> --target folder, class-balanced sampler, evaluation mIoU4."""
    import train
    target = tmp_path / "tgt"
    make(str(target), style="real", seed=3, train=4, val=2)
    out = tmp_path / "runs" / "folder"
    train.main(["--method", "source_only", "--source", "folder", "--source-root", str(folder),
                "--target", "folder", "--target-root", str(target), "--backbone", "tiny", "--out", str(out),
                "--crop", "64x48", "--source-sampler", "class-balanced", "--iters", "4", "--batch-size", "2",
                "--lr", "0.01", "--eval-every", "0", "--log-every", "2", "--workers", "0", "--device", "cpu"])
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    # the class-balanced sampler read its per-image statistics of the source (cached beside the run)
    assert len(list((tmp_path / "runs").glob("class_stats_folder_*.json"))) == 1
    # the logged mIoU4 is the last checkpoint's, recomputed here image by image with plain counts
    model = models.build_model("tiny", 4, bn="train")
    model.load_state_dict(torch.load(out / "last.pt", weights_only=False)["model"])
    model.eval()
    val = datasets.build_dataset("folder", "val", space_of(target), root=str(target))
    inter, union = np.zeros(4), np.zeros(4)
    for i in range(len(val)):
        image, label = val[i]["image"], val[i]["label"].numpy()            # (3, H, W), (H, W)
        with torch.no_grad():
            logits = model(image[None])[1]                                  # (1, 4, h, w)
        logits = torch.nn.functional.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False)
        pred = logits[0].argmax(0).numpy()
        for c in range(4):
            inter[c] += ((pred == c) & (label == c)).sum()
            union[c] += (((pred == c) & (label != 255)) | (label == c)).sum()
    seen = union > 0
    assert record["eval/mIoU4"] == pytest.approx(100 * np.mean(inter[seen] / union[seen]), abs=1e-6)
