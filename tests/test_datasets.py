"""Real-dataset readers, label maps, the PNG decoder, transforms, samplers and the `check` command.

Every test builds a tiny tree in the real layout inside a temporary folder; nothing is downloaded.
SYNTHIA labels are written by a deliberately naive per-pixel PNG encoder below (independent of
uda/png16.py's vectorised one), with every filter type.
"""
import argparse
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TOY_FAST, run_script
from uda import datasets, png16, samplers
from uda.common import UserError


# --------------------------------------------------------------------------------------------------
# A naive PNG encoder: one Python loop per byte (tiny images only), all five filters
# --------------------------------------------------------------------------------------------------
def naive_png(array, filters, interlace=0):
    """PNG bytes of uint8/uint16 (H, W, C); filters: one type per row. Straight from the PNG spec."""
    height, width, channels = array.shape
    depth = 16 if array.dtype == np.uint16 else 8
    bpp = channels * depth // 8
    raw = [list(array[y].astype(">u2" if depth == 16 else np.uint8).tobytes()) for y in range(height)]
    body = bytearray()
    for y in range(height):
        kind = filters[y]
        body.append(kind)
        for i in range(width * bpp):
            x = raw[y][i]
            a = raw[y][i - bpp] if i >= bpp else 0
            b = raw[y - 1][i] if y > 0 else 0
            c = raw[y - 1][i - bpp] if (y > 0 and i >= bpp) else 0
            if kind == 0:
                pred = 0
            elif kind == 1:
                pred = a
            elif kind == 2:
                pred = b
            elif kind == 3:
                pred = (a + b) // 2
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
            body.append((x - pred) % 256)
    color = {1: 0, 2: 4, 3: 2, 4: 6}[channels]

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace)
    return (png16.PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(body)))
            + chunk(b"IEND", b""))


def synthia_label(ids, rng):
    """16-bit RGB: channel 0 = class id, channel 1 = a large instance id, channel 2 = 0."""
    instance = rng.integers(0, 65535, size=ids.shape)
    return np.stack([ids, instance, np.zeros_like(ids)], -1).astype(np.uint16)


FILTER_CASES = [[0] * 6, [1] * 6, [2] * 6, [3] * 6, [4] * 6, [4, 3, 2, 1, 0, 4]]


@pytest.mark.parametrize("filters", FILTER_CASES)
def test_png16_decodes_every_filter(filters):
    rng = np.random.default_rng(sum(filters))
    array = synthia_label(rng.integers(0, 300, size=(6, 7)), rng)  # ids > 255 use the high byte too
    data = naive_png(array, filters)
    assert np.array_equal(png16.decode_png(data), array)
    # the vectorised encoder filters exactly like the naive one (same decompressed body)
    ours = png16.encode_png(array, filters)
    body = lambda png: zlib.decompress(png[png.index(b"IDAT") + 4:png.index(b"IEND") - 8])  # noqa: E731
    assert body(ours) == body(data)


def test_png16_against_pillow_8bit_and_16bit_gray():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(9, 11, 3)).astype(np.uint8)
    for kind in range(5):
        data = naive_png(rgb, [kind] * 9)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), rgb)
        assert np.array_equal(png16.decode_png(data), rgb)
    gray = rng.integers(0, 65536, size=(8, 5)).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG")  # Pillow's own 16-bit writer (its filter choice)
    assert np.array_equal(png16.decode_png(buffer.getvalue())[..., 0], gray)
    big = rng.integers(0, 23, size=(60, 90)).astype(np.uint16)  # a larger image: many diagonals
    big = synthia_label(np.kron(big, np.ones((3, 3), dtype=np.uint16))[:60, :90], rng)
    for kinds in ([4] * 60, list(rng.integers(0, 5, size=60))):
        assert np.array_equal(png16.decode_png(png16.encode_png(big, kinds)), big)


def test_png16_refuses_interlace_and_corruption():
    array = np.zeros((2, 2, 3), dtype=np.uint16)
    with pytest.raises(UserError, match="interlaced"):
        png16.decode_png(naive_png(array, [0, 0], interlace=1))
    data = bytearray(naive_png(array, [0, 0]))
    data[-20] ^= 0xFF  # inside the IDAT payload
    with pytest.raises(UserError, match="corrupt|CRC"):
        png16.decode_png(bytes(data))
    with pytest.raises(UserError, match="not a PNG"):
        png16.decode_png(b"GIF89a....")


# --------------------------------------------------------------------------------------------------
# Label maps: every entry of the tables in conventions.md
# --------------------------------------------------------------------------------------------------
# (name, Cityscapes labelId, trainId, RGB)
CITYSCAPES_TABLE = [("road", 7, 0, (128, 64, 128)), ("sidewalk", 8, 1, (244, 35, 232)),
                    ("building", 11, 2, (70, 70, 70)), ("wall", 12, 3, (102, 102, 156)),
                    ("fence", 13, 4, (190, 153, 153)), ("pole", 17, 5, (153, 153, 153)),
                    ("traffic light", 19, 6, (250, 170, 30)), ("traffic sign", 20, 7, (220, 220, 0)),
                    ("vegetation", 21, 8, (107, 142, 35)), ("terrain", 22, 9, (152, 251, 152)),
                    ("sky", 23, 10, (70, 130, 180)), ("person", 24, 11, (220, 20, 60)),
                    ("rider", 25, 12, (255, 0, 0)), ("car", 26, 13, (0, 0, 142)), ("truck", 27, 14, (0, 0, 70)),
                    ("bus", 28, 15, (0, 60, 100)), ("train", 31, 16, (0, 80, 100)),
                    ("motorcycle", 32, 17, (0, 0, 230)), ("bicycle", 33, 18, (119, 11, 32))]
# (class, SYNTHIA id, 16-class index, 19-class trainId, in the 13)
SYNTHIA_TABLE = [("road", 3, 0, 0, True), ("sidewalk", 4, 1, 1, True), ("building", 2, 2, 2, True),
                 ("wall", 21, 3, 3, False), ("fence", 5, 4, 4, False), ("pole", 7, 5, 5, False),
                 ("traffic light", 15, 6, 6, True), ("traffic sign", 9, 7, 7, True),
                 ("vegetation", 6, 8, 8, True), ("sky", 1, 9, 10, True), ("person", 10, 10, 11, True),
                 ("rider", 17, 11, 12, True), ("car", 8, 12, 13, True), ("bus", 19, 13, 15, True),
                 ("motorcycle", 12, 14, 17, True), ("bicycle", 11, 15, 18, True)]


def test_cityscapes_table():
    lut = datasets.label_lut(datasets.LABELID_TO_TRAINID, datasets.CITYSCAPES_19)
    for name, label_id, trainid, rgb in CITYSCAPES_TABLE:
        assert lut[label_id] == trainid and datasets.CITYSCAPES_NAMES[trainid] == name
        assert tuple(datasets.CITYSCAPES_PALETTE[trainid]) == rgb
    listed = {label_id for _, label_id, _, _ in CITYSCAPES_TABLE}
    assert all(lut[i] == 255 for i in range(256) if i not in listed)
    # a 16-class (SYNTHIA) model: labelIds [7,8,11,12,13,17,19,20,21,23,24,25,26,28,32,33] -> 0..15
    lut16 = datasets.label_lut(datasets.LABELID_TO_TRAINID, datasets.SYNTHIA_16)
    expected16 = [7, 8, 11, 12, 13, 17, 19, 20, 21, 23, 24, 25, 26, 28, 32, 33]
    assert [int(lut16[i]) for i in expected16] == list(range(16))
    assert all(lut16[i] == 255 for i in range(256) if i not in expected16)  # terrain, truck, train dropped


def test_synthia_tables_and_spaces():
    lut16 = datasets.label_lut(datasets.SYNTHIA_ID_TO_TRAINID, datasets.SYNTHIA_16, size=2 ** 16)
    lut19 = datasets.label_lut(datasets.SYNTHIA_ID_TO_TRAINID, datasets.SYNTHIA_19, size=2 ** 16)
    for name, raw, index16, trainid, in13 in SYNTHIA_TABLE:
        assert lut16[raw] == index16 and lut19[raw] == trainid
        assert datasets.SYNTHIA_16.names[index16] == name and datasets.CITYSCAPES_NAMES[trainid] == name
        assert (index16 in datasets.SYNTHIA_16.eval_sets["mIoU13"]) == in13
        assert (trainid in datasets.SYNTHIA_19.eval_sets["mIoU13"]) == in13
    used = {raw for _, raw, _, _, _ in SYNTHIA_TABLE}
    for raw in [0, 13, 14, 22, 23, 300, 65535]:  # void, parking, road-work, lanemarking, beyond the table
        assert raw not in used and lut16[raw] == 255 and lut19[raw] == 255
    # terrain, truck, train (DAFormer's tools/convert_datasets/synthia.py): trainIds 9, 14, 16 in the
    # 19-class space; not among the 16 classes, so ignored there
    for raw, trainid in [(16, 9), (18, 14), (20, 16)]:
        assert raw not in used and lut19[raw] == trainid and lut16[raw] == 255
        assert trainid not in datasets.SYNTHIA_19.eval_sets["mIoU16"]  # trained, not reported
    assert datasets.SYNTHIA_16.eval_sets["mIoU13"] == [0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert datasets.SYNTHIA_19.eval_sets["mIoU13"] == [0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
    assert datasets.SYNTHIA_19.eval_sets["mIoU16"] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
    assert list(datasets.SYNTHIA_16.eval_sets) == ["mIoU16", "mIoU13"]  # mIoU16 is the headline


def test_label_space_from_partial_args():
    ns = argparse.Namespace
    assert datasets.label_space("synthia", ns()).num_classes == 16  # old checkpoints: no synthia_classes
    assert datasets.label_space("synthia", ns(synthia_classes=19)).num_classes == 19
    assert datasets.label_space("gta5", None).eval_sets == {"mIoU19": list(range(19))}
    assert datasets.label_space("cityscapes", ns(target="crosscity-rome")).eval_sets == {
        "mIoU13": datasets.TRAINIDS_13}
    assert datasets.label_space("toy-synth", ns(pseudo_dir=None)) is datasets.TOY_SPACE
    with pytest.raises(UserError, match="unknown"):
        datasets.label_space("kitti", ns())


# --------------------------------------------------------------------------------------------------
# Tiny trees in the real layouts
# --------------------------------------------------------------------------------------------------
def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def rgb(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3)).astype(np.uint8)


@pytest.fixture
def lists_dir(tmp_path, monkeypatch):
    """data_lists/ of the tiny trees (the repository's lists name the full datasets)."""
    folder = tmp_path / "lists"
    monkeypatch.setattr(datasets, "LISTS_DIR", str(folder))
    return folder


def write_list(lists_dir, name, split, names):
    os.makedirs(lists_dir / name, exist_ok=True)
    (lists_dir / name / f"{split}.txt").write_text("".join(n + "\n" for n in names))


def make_gta5(root, lists_dir):
    ids = np.array([[7, 8, 11, 0], [26, 26, 24, 255], [23, 23, 23, 33]], dtype=np.uint8)  # labelIds
    for i in (1, 2, 3):
        save(f"{root}/gta5/images/{i:05d}.png", rgb(6, 8, i))
        label = np.kron(ids, np.ones((2, 2), dtype=np.uint8))  # (6, 8)
        if i == 3:  # a size-mismatched pair: the label is half the size
            label = ids  # (3, 4)
        save(f"{root}/gta5/labels/{i:05d}.png", label)
    write_list(lists_dir, "gta5", "train", [f"{i:05d}.png" for i in (1, 2, 3)])
    return ids


def test_gta5_reader_and_size_mismatch(tmp_path, lists_dir):
    ids = make_gta5(tmp_path, lists_dir)
    ds = datasets.build_dataset("gta5", "train", datasets.CITYSCAPES_19, root=str(tmp_path / "gta5"))
    assert len(ds) == 3 and ds.item_name(0) == "00001"
    lut = datasets.label_lut(datasets.LABELID_TO_TRAINID, datasets.CITYSCAPES_19)
    item = ds[0]
    assert item["image"].shape == (3, 6, 8) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert torch.equal(item["label"], torch.from_numpy(lut[np.kron(ids, np.ones((2, 2), np.uint8))]).long())
    mismatched = ds[(2, 5)]  # label (3, 4) resized to the (6, 8) image, nearest
    assert mismatched["label"].shape == (6, 8)
    assert torch.equal(mismatched["label"], item["label"])
    assert ds[(2, 5, 13)]["index"] == 2  # 2- and 3-tuples are accepted


def test_missing_files_and_roots(tmp_path, lists_dir):
    make_gta5(tmp_path, lists_dir)
    os.remove(tmp_path / "gta5" / "labels" / "00002.png")
    os.remove(tmp_path / "gta5" / "images" / "00003.png")
    with pytest.raises(UserError) as err:
        datasets.build_dataset("gta5", "train", datasets.CITYSCAPES_19, root=str(tmp_path / "gta5"))
    message = str(err.value)
    assert "\n" not in message and "2 of 3" in message and "00002.png" in message
    with pytest.raises(UserError, match="images/00001.png"):  # the layout is named
        datasets.build_dataset("gta5", "train", datasets.CITYSCAPES_19, root=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="--data-root"):
        datasets.dataset_root("cityscapes", None)
    assert datasets.dataset_root("crosscity-rio", "/d") == os.path.join("/d", "crosscity", "Rio")
    assert datasets.dataset_root("gta5", "/d", "/elsewhere") == "/elsewhere"
    # evaluate.py: --data-root wins, else the folders the checkpoint's run used
    saved = argparse.Namespace(source="gta5", target="cityscapes", data_root="/d", target_root="/cs", source_root=None)
    assert datasets.checkpoint_root("cityscapes", None, saved) == "/cs"
    assert datasets.checkpoint_root("cityscapes", "/e", saved) == os.path.join("/e", "cityscapes")
    assert datasets.checkpoint_root("gta5", None, saved) == os.path.join("/d", "gta5")
    assert datasets.checkpoint_root("toy-real", None, argparse.Namespace(target="toy-real")) is None


def make_synthia(root, lists_dir, nested=True):
    rng = np.random.default_rng(1)
    base = f"{root}/synthia/RAND_CITYSCAPES" if nested else f"{root}/synthia"
    raw = np.arange(24, dtype=np.uint16).reshape(4, 6)  # every SYNTHIA id 0..22 (+ 23, undefined)
    for i, filters in enumerate(FILTER_CASES[:5]):
        save(f"{base}/RGB/{i:07d}.png", rgb(4, 6, i))
        os.makedirs(f"{base}/GT/LABELS", exist_ok=True)
        with open(f"{base}/GT/LABELS/{i:07d}.png", "wb") as f:
            f.write(naive_png(synthia_label(raw, rng), filters[:4]))
    write_list(lists_dir, "synthia", "train", [f"{i:07d}.png" for i in range(5)])
    return raw


@pytest.mark.parametrize("classes", [16, 19])
def test_synthia_reader(tmp_path, lists_dir, classes):
    raw = make_synthia(tmp_path, lists_dir)
    space = datasets.label_space("synthia", argparse.Namespace(synthia_classes=classes))
    ds = datasets.build_dataset("synthia", "train", space, root=str(tmp_path / "synthia"))
    expected = np.full(raw.shape, 255)
    for _, synthia_id, index16, trainid, _ in SYNTHIA_TABLE:
        expected[raw == synthia_id] = index16 if classes == 16 else trainid
    if classes == 19:  # terrain, truck, train: only the 19-class space has them
        for synthia_id, trainid in [(16, 9), (18, 14), (20, 16)]:
            expected[raw == synthia_id] = trainid
    for i in range(len(ds)):  # one file per filter type
        assert np.array_equal(ds[i]["label"].numpy(), expected)


def make_cityscapes(root):
    ids = np.array([[7, 22, 27, 31], [24, 26, 0, 33]], dtype=np.uint8)
    for split, city in (("train", "aachen"), ("train", "bonn"), ("val", "frankfurt")):
        stem = f"{city}_000000_000019"
        save(f"{root}/cityscapes/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", rgb(2, 4, len(city)))
        save(f"{root}/cityscapes/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png", ids)
    return ids


def test_cityscapes_reader_16_19_and_unlabeled_train(tmp_path):
    ids = make_cityscapes(tmp_path)
    root = str(tmp_path / "cityscapes")
    val19 = datasets.build_dataset("cityscapes", "val", datasets.CITYSCAPES_19, root=root)
    assert len(val19) == 1 and val19.item_name(0) == "frankfurt/frankfurt_000000_000019_leftImg8bit"
    assert val19[0]["label"].tolist() == [[0, 9, 14, 16], [11, 13, 255, 18]]
    val16 = datasets.build_dataset("cityscapes", "val", datasets.SYNTHIA_16, root=root)
    assert val16[0]["label"].tolist() == [[0, 255, 255, 255], [10, 12, 255, 15]]  # terrain/truck/train gone
    import shutil
    shutil.rmtree(tmp_path / "cityscapes" / "gtFine" / "train")  # the target's labels are never read
    train = datasets.build_dataset("cityscapes", "train", datasets.CITYSCAPES_19, root=root, labeled=False,
                                   augment=True, size=None)
    assert len(train) == 2 and "label" not in train[(0, 3)]
    with pytest.raises(UserError, match="missing"):
        datasets.build_dataset("cityscapes", "train", datasets.CITYSCAPES_19, root=root, labeled=True)


def test_crosscity_reader_13_classes(tmp_path):
    city = tmp_path / "crosscity" / "Rome"
    ids = np.array([[7, 12, 23, 26], [21, 13, 33, 0]], dtype=np.uint8)
    for stem in ("pic_001", "pic_002"):
        save(f"{city}/Images/Train/{stem}.jpg", rgb(2, 4, 1))
    save(f"{city}/Images/Test/pic_900.png", rgb(2, 4, 2))  # png fallback
    save(f"{city}/Labels/Test/pic_900_eval.png", ids)
    os.makedirs(city / "List")
    (city / "List" / "train.txt").write_text("pic_001.jpg\npic_002.jpg\n")
    root = datasets.dataset_root("crosscity-rome", str(tmp_path))
    space = datasets.label_space("cityscapes", argparse.Namespace(target="crosscity-rome"))
    val = datasets.build_dataset("crosscity-rome", "val", space, root=root)
    assert val[0]["label"].tolist() == [[0, 255, 10, 13], [8, 255, 18, 255]]  # wall, fence not annotated
    train = datasets.build_dataset("crosscity-rome", "train", space, root=root, labeled=False, augment=True)
    assert len(train) == 2 and train[(1, 0)]["image"].shape == (3, 512, 1024)  # resized to 1024x512
    with pytest.raises(UserError, match="unlabeled"):
        datasets.build_dataset("crosscity-rome", "train", space, root=root, labeled=True)


def test_pseudo_labels_replace_source_labels(tmp_path):
    make_cityscapes(tmp_path)
    pseudo = tmp_path / "pseudo"
    space = {"trainids": datasets.TRAINIDS_16, "eval_sets": {"mIoU16": list(range(16)), "mIoU13": [0, 1]}}
    os.makedirs(pseudo)
    (pseudo / "labelspace.json").write_text(json.dumps(space))
    args = argparse.Namespace(source="cityscapes", pseudo_dir=str(pseudo))
    loaded = datasets.label_space("cityscapes", args)
    assert loaded.trainids == datasets.TRAINIDS_16 and loaded.eval_sets["mIoU13"] == [0, 1]
    root = str(tmp_path / "cityscapes")
    names = ["aachen/aachen_000000_000019_leftImg8bit", "bonn/bonn_000000_000019_leftImg8bit"]
    save(str(pseudo / (names[0] + ".png")), np.array([[3, 15, 255, 0], [1, 1, 1, 1]], np.uint8))
    with pytest.raises(UserError, match="bonn_000000_000019_leftImg8bit.png"):  # the missing one is named
        datasets.build_dataset("cityscapes", "train", loaded, root=root, pseudo_dir=str(pseudo))
    save(str(pseudo / (names[1] + ".png")), np.array([[2, 2, 2, 2], [2, 2, 2, 2]], np.uint8))
    ds = datasets.build_dataset("cityscapes", "train", loaded, root=root, pseudo_dir=str(pseudo))
    assert ds[0]["label"].tolist() == [[3, 15, 255, 0], [1, 1, 1, 1]]  # no mapping
    assert ds.size is None  # self-training scales the full-resolution image
    (pseudo / "labelspace.json").write_text("{}")
    with pytest.raises(UserError, match="labelspace.json"):
        datasets.label_space("cityscapes", args)


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------
def test_crop_pads_with_ignore_and_cat_max_ratio():
    rng = np.random.default_rng(0)
    image, label = np.ones((4, 6, 3), np.uint8), np.zeros((4, 6), np.uint8)
    crop_img, crop_lab = datasets.crop_cat_max(image, label, (8, 5), rng)
    assert crop_img.shape == (5, 8, 3) and (crop_lab[4] == 255).all() and (crop_lab[:, 6:] == 255).all()
    assert (crop_img[4] == 0).all() and (crop_lab[:4, :6] == 0).all()
    # class 1 fills the left 90 columns of a 100-wide label: a 20-wide crop is mixed only at 80..99
    label = np.zeros((10, 100), np.uint8)
    label[:, 90:] = 2
    label[:, :90] = 1
    hits = 0
    for seed in range(50):
        _, crop = datasets.crop_cat_max(np.zeros((10, 100, 3), np.uint8), label, (20, 10),
                                        np.random.default_rng(seed), cat_max_ratio=0.75)
        counts = np.bincount(crop.ravel(), minlength=3)
        hits += counts.max() / counts.sum() < 0.75
    # a window is acceptable for left in 76..80: P = 5/81 per draw; with 10 draws 1 - (76/81)^10 = 0.47
    assert hits >= 15


def test_train_transform_resize_rcs_recrop_and_determinism(tmp_path, lists_dir):
    make_gta5(tmp_path, lists_dir)
    ds = datasets.build_dataset("gta5", "train", datasets.CITYSCAPES_19, root=str(tmp_path / "gta5"), augment=True,
                                crop=(4, 4), size=(16, 12), seed=3)
    a, b, c = ds[(0, 7)], ds[(0, 7)], ds[(0, 8)]
    assert a["image"].shape == (3, 4, 4) and torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"]) or not torch.equal(a["label"], c["label"])
    # RCS: re-crop until the sampled class (13 = car, 2x2 cells x4 scale) has more than recrop_pixels pixels
    ds.recrop_pixels = 3
    found = sum(int((ds[(0, d, 13)]["label"] == 13).sum()) > 3 for d in range(20))
    plain = sum(int((ds[(0, d)]["label"] == 13).sum()) > 3 for d in range(20))
    assert found > plain


# --------------------------------------------------------------------------------------------------
# Samplers and class statistics
# --------------------------------------------------------------------------------------------------
class FakeLabels(torch.utils.data.Dataset):
    """Images whose labels are given arrays; counts how often a label is read."""

    def __init__(self, labels):
        self.labels, self.reads = labels, 0

    def __len__(self):
        return len(self.labels)

    def item_name(self, index):
        return f"img{index}"

    def label_array(self, index):
        self.reads += 1
        return self.labels[index]


def test_class_statistics_hand_count_and_cache(tmp_path):
    labels = [np.array([[0, 0, 1], [255, 2, 2]], np.uint8), np.array([[2, 2, 2], [2, 255, 255]], np.uint8),
              np.array([[1, 1, 1], [1, 1, 0]], np.uint8)]
    ds = FakeLabels(labels)
    path = str(tmp_path / "stats.json")
    counts = samplers.class_statistics(ds, 3, path)
    assert counts.tolist() == [[2, 1, 2], [0, 0, 4], [1, 5, 0]]
    reads = ds.reads
    again = samplers.class_statistics(ds, 3, path)  # from the cache: no label is read
    assert ds.reads == reads and again.tolist() == counts.tolist()
    args = argparse.Namespace(source="toy-synth", out=str(tmp_path / "runs" / "a"), pseudo_dir=None)
    toy = datasets.build_dataset("toy-synth", "train", datasets.TOY_SPACE)
    assert os.path.dirname(samplers.default_cache_path(args, toy, datasets.TOY_SPACE)) == str(tmp_path / "runs")


def test_rcs_probabilities_against_formula():
    counts = np.array([[5000, 0, 10], [4000, 3500, 0], [100, 0, 2000]])
    classes, probs, files_of = samplers.rcs_probabilities(counts, 0.01, 3000)
    assert classes == [0, 1]  # class 2 has pixels but no image above 3000
    freq = counts.sum(0) / counts.sum()
    logits = (1 - freq[[0, 1]]) / 0.01
    expected = np.exp(logits) / np.exp(logits).sum()
    assert np.allclose(probs, expected)
    assert files_of[0].tolist() == [0, 1] and files_of[1].tolist() == [1]
    sampler = samplers.RareClassSampler(counts, 0.01, 3000, seed=0)
    draws = [next(iter(samplers.RareClassSampler(counts, 0.01, 3000, seed=0, start_draw=k))) for k in range(3)]
    stream = iter(sampler)
    assert [next(stream) for _ in range(3)] == draws  # a pure function of (seed, draw)
    assert all(index in files_of[c] for index, _, c in draws)


def test_class_balanced_sampler_formula_resume_and_shards():
    rng = np.random.default_rng(0)
    counts = (rng.random((40, 5)) < [0.9, 0.5, 0.2, 0.05, 0.0]) * 100  # class 4 never present
    counts[0, 3] = 100  # class 3 in at least one image
    sampler = samplers.ClassBalancedSampler(counts, seed=1, sub_epoch=50)
    drawn = np.array([3.0, 1.0, 0.0, 0.0, 0.0])
    w = 1 / np.log(1.01 + drawn / 4.0)
    w[4] = 0.0
    assert np.allclose(sampler.class_probabilities(drawn), w / w.sum())
    stream = iter(sampler)
    full = [next(stream) for _ in range(120)]
    assert [g for _, g in full] == list(range(120))
    assert all(counts[i, 4] == 0 for i, _ in full) and len({i for i, _ in full}) > 20
    resumed = iter(samplers.ClassBalancedSampler(counts, seed=1, start_draw=73, sub_epoch=50))
    assert [next(resumed) for _ in range(47)] == full[73:]
    shards = []
    for rank in range(2):  # what rank r of 2 would see: every other global draw
        s = samplers.ClassBalancedSampler(counts, seed=1, sub_epoch=50)
        s.rank, s.world = rank, 2
        it = iter(s)
        shards.append([next(it) for _ in range(60)])
    assert sorted(shards[0] + shards[1], key=lambda t: t[1]) == full
    # rare classes are drawn more often than their share of images
    share3 = counts[:, 3].astype(bool).mean()
    drawn3 = np.mean([counts[i, 3] > 0 for i, _ in full])
    assert drawn3 > share3


# --------------------------------------------------------------------------------------------------
# The check command and the scripts
# --------------------------------------------------------------------------------------------------
def test_check_report(tmp_path, lists_dir, capsys):
    make_gta5(tmp_path, lists_dir)
    os.remove(tmp_path / "gta5" / "labels" / "00002.png")
    report = datasets.check("gta5", str(tmp_path / "gta5"), full=True)
    assert report["images"] == 3 and report["labels"] == 2 and report["expected"] == 24966
    assert [os.path.basename(m) for m in report["missing"]] == ["00002.png"]
    assert len(report["size_mismatches"]) == 1
    # hand count over 00001 (2x2 cells) and 00003 (1x1 cells): 7->0 8->1 11->2 26->13 24->11 23->10 33->18
    cells = {0: 1, 1: 1, 2: 1, 13: 2, 11: 1, 10: 3, 18: 1, 255: 2}
    assert {k: v for k, v in report["class_pixels"].items() if v} == {k: 5 * v for k, v in cells.items()}
    assert "MISSING 1 files" in capsys.readouterr().out


def test_check_cli_json_and_wrong_synthia_decode(tmp_path, lists_dir, capsys):
    make_synthia(tmp_path, lists_dir, nested=False)
    json_path = tmp_path / "report.json"
    with pytest.raises(SystemExit) as exit_code:  # exit status 1: files are missing
        datasets.main(["check", "synthia", str(tmp_path / "synthia"), "--json", str(json_path)])
    assert exit_code.value.code == 1
    report = json.loads(json_path.read_text())
    os.remove(lists_dir / "synthia" / "train.txt")  # now the naming rule: 9,400 names
    with pytest.raises(SystemExit):
        datasets.main(["check", "synthia", str(tmp_path / "synthia")])
    assert "MISSING 18790 files" in capsys.readouterr().out  # 9,395 images + 9,395 labels
    assert report["dataset"] == "synthia" and report["images"] == 5 and report["labels"] == 5
    assert report["missing"] == [] and report["expected"] == 9400
    assert report["class_pixels"]["255"] == 5 * 8  # ids 0, 13, 14, 16, 18, 20, 22, 23 per label
    assert report["class_pixels"]["9"] == 5  # sky (SYNTHIA id 1) is 16-class index 9
    # labels re-saved as 8-bit zeros (what a Pillow round trip of SYNTHIA labels gives): the check says so
    for name in os.listdir(tmp_path / "synthia" / "GT" / "LABELS"):
        save(str(tmp_path / "synthia" / "GT" / "LABELS" / name), np.zeros((4, 6), np.uint8))
    lines = []
    datasets.check("synthia", str(tmp_path / "synthia"), out=lines.append)
    assert any("over 90%" in line for line in lines)


def test_lists_command(tmp_path, lists_dir):
    make_cityscapes(tmp_path)
    out = tmp_path / "val.txt"
    datasets.main(["lists", "cityscapes", str(tmp_path / "cityscapes"), "--split", "val", "--out", str(out)])
    assert out.read_text() == "frankfurt/frankfurt_000000_000019_leftImg8bit.png\n"
    with pytest.raises(UserError, match="already exists; pass --overwrite"):  # a user's file is never replaced
        datasets.main(["lists", "gta5", "--out", str(out)])
    assert out.read_text() == "frankfurt/frankfurt_000000_000019_leftImg8bit.png\n"
    datasets.main(["lists", "gta5", "--out", str(out), "--overwrite"])
    names = out.read_text().splitlines()
    assert len(names) == 24966 and names[0] == "00001.png" and names[-1] == "24966.png"
    repo = os.path.join(REPO, "data_lists")
    assert open(os.path.join(repo, "gta5", "train.txt")).read() == out.read_text()
    datasets.main(["lists", "synthia", "--out", str(out), "--overwrite"])
    assert open(os.path.join(repo, "synthia", "train.txt")).read() == out.read_text()


def test_train_errors_are_one_line(tmp_path):
    import train
    with pytest.raises(UserError) as err:
        train.main(["--source", "gta5", "--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                    "--backbone", "tiny", *TOY_FAST])
    assert "\n" not in str(err.value) and "gta5" in str(err.value) and "images/" in str(err.value)


@pytest.mark.slow
def test_toy_pseudo_labels_and_samplers_in_train(tmp_path):
    pseudo = tmp_path / "pseudo"
    os.makedirs(pseudo)
    (pseudo / "labelspace.json").write_text(json.dumps({"trainids": list(range(19)),
                                                        "eval_sets": {"mIoU9": [0, 1, 2, 5, 7, 8, 10, 11, 13]}}))
    stripes = np.repeat(np.array([0, 13, 10, 255], np.uint8), 32)[None, :].repeat(128, 0)  # (128, 128)
    first = pseudo / "toy-real_train_00000.png"
    Image.fromarray(np.concatenate([stripes, stripes], 1)).save(first)  # (128, 256), the toy's size
    for i in range(1, 4000):  # the same file under every item name
        os.link(first, pseudo / f"toy-real_train_{i:05d}.png")
    out = tmp_path / "runs" / "pseudo"
    result = run_script("train.py", "--source", "toy-real", "--pseudo-dir", pseudo, "--out", out,
                        "--source-sampler", "rcs", "--rcs-min-pixels", "100", "--cat-max-ratio", "0.75", *TOY_FAST)
    assert result.returncode == 0, result.stderr
    stats = [f for f in os.listdir(tmp_path / "runs") if f.startswith("class_stats_toy-real_")]
    assert len(stats) == 1
    counts = np.asarray(json.loads((tmp_path / "runs" / stats[0]).read_text())["counts"])
    assert counts.shape == (4000, 19) and (counts[:, [0, 13, 10]] == 64 * 128).all()
    assert counts.sum() == 3 * 4000 * 64 * 128
    space = datasets.label_space("toy-real", argparse.Namespace(pseudo_dir=str(pseudo)))
    ds = datasets.build_dataset("toy-real", "train", space, pseudo_dir=str(pseudo), augment=True, crop=(128, 64))
    assert set(ds[(12, 3, 13)]["label"].unique().tolist()) <= {0, 10, 13, 255}
    os.remove(pseudo / "toy-real_train_00012.png")
    with pytest.raises(UserError) as err:
        datasets.build_dataset("toy-real", "train", space, pseudo_dir=str(pseudo))
    assert "toy-real_train_00012.png" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_train_on_real_layouts(tmp_path, lists_dir):
    """gta5 -> cityscapes through train.py on the tiny trees: real readers, class-balanced sampler, eval."""
    import train
    make_gta5(tmp_path, lists_dir)
    make_cityscapes(tmp_path)
    out = tmp_path / "runs" / "gta"
    train.main(["--method", "fada", "--source", "gta5", "--data-root", str(tmp_path), "--backbone", "tiny",
                "--out", str(out), "--source-size", "32x24", "--target-size", "32x16", "--crop", "16x16",
                "--source-sampler", "class-balanced", "--stats-cache", str(tmp_path / "stats.json"), *TOY_FAST])
    assert (out / "last.pt").exists() and (tmp_path / "stats.json").exists()
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert "eval/mIoU19" in record


def test_random_scale_flag_scales_the_resize_before_the_crop():
    options = datasets.train_options(argparse.Namespace(random_scale=[1.0, 1.3], cat_max_ratio=1.0), "source")
    assert options["scale_range"] == (1.0, 1.3)
    image, label = np.zeros((76, 100, 3), np.uint8), np.zeros((76, 100), np.uint8)
    heights = set()
    for draw in range(20):
        out, out_label = datasets.train_transform(image, label, np.random.default_rng(draw), size=(100, 76),
                                                  scale_range=options["scale_range"])
        assert out.shape[:2] == out_label.shape and 76 <= out.shape[0] <= round(76 * 1.3)
        heights.add(out.shape[0])
    assert len(heights) > 1  # the scale really varies
    with pytest.raises(UserError, match="--random-scale"):
        datasets.train_options(argparse.Namespace(random_scale=[2.0, 1.0]), "source")
