"""Datasets, label spaces and paired image/label transforms.

Every dataset item is a dict:
    'image': float32 tensor (3, H, W), RGB in [0, 1]   -- the model normalises (its weights decide how)
    'label': int64 tensor (H, W), class indices, 255 = ignore   -- absent for an unlabeled target split
    'index': int
Training loaders index a dataset with (index, draw) pairs (see train.InfiniteSampler): `draw` is the
global draw number and seeds that item's random augmentation, so a resumed run sees exactly the crops
the uninterrupted run would have seen, whatever the number of workers. A plain int means draw 0. Rare
Class Sampling (uda/samplers.py) yields (index, draw, cls) triples: the crop is then re-drawn until it
holds enough pixels of class `cls`.

Images stay in [0, 1] RGB so that methods can apply photometric augmentation (colour jitter, blur,
ClassMix) on the batch, and each backbone applies the normalisation its pretrained weights expect
(ImageNet RGB mean/std, or Caffe BGR 0-255 minus mean: see uda/models.py).

Dataset names (for --source / --target) and their folders under --data-root DIR:
    toy-synth, toy-real          built in (uda/toy.py), no folder
    gta5                         DIR/gta5:  images/00001.png .., labels/00001.png .. (Cityscapes labelIds)
    synthia                      DIR/synthia[/RAND_CITYSCAPES]: RGB/0000000.png .., GT/LABELS/0000000.png ..
                                 (16-bit PNG, class id in channel 0: decoded by uda/png16.py)
    cityscapes                   DIR/cityscapes: leftImg8bit/<split>/<city>/*_leftImg8bit.png,
                                 gtFine/<split>/<city>/*_gtFine_labelIds.png
    crosscity-rome|rio|tokyo|taipei
                                 DIR/crosscity/<City>: Images/{Train,Test}/<id>.jpg (or .png),
                                 Labels/Test/<id>_eval.png (Cityscapes labelIds), List/{train,test}.txt
    folder                       any dataset in mmsegmentation's layout (--source-root / --target-root DIR,
                                 or DIR/folder): images/<split>/<path>.png|jpg|jpeg, labels/<split>/<path>.png
                                 (single-channel class indices, 255 ignore; nested sub-folders allowed),
                                 splits train and val, and classes.json = {"classes": [names], "palette":
                                 [[r, g, b], ..], "label_map": {"raw id": class index}} (palette, label_map
                                 optional). A target without labels/ is an unlabelled target.
Every benchmark label is mapped on the fly: raw id -> Cityscapes trainId -> class index of the model's
label space (LabelSpace.trainids), 255 for everything else. So one table per dataset serves 19-, 16- and
13-class models alike; e.g. a 16-class (SYNTHIA) model's Cityscapes labels lose terrain, truck and train.
A folder dataset carries its own classes (LabelSpace.class_names / .palette, trainids = 0..C-1): its
labels are class indices already (or raw ids mapped by classes.json's label_map), and a folder target
must list the source's classes in the same order (check_same_classes).
`--pseudo-dir DIR` replaces the labels of the source's train split by DIR/<item_name>.png (class indices
of the model's label space, written by evaluate.py --save-pseudo) and the label space by DIR/labelspace.json.
Data lists (--source-list / --target-list FILE, build_dataset(list_file=...)): train on the listed subset,
one path per line in data_lists/' format (relative to images/<split>/ for a folder dataset).

Broken input never surfaces as a traceback from deep inside a DataLoader worker: a missing, empty,
truncated or non-image file, an RGB label, a folder without images, a bad classes.json or data list is a
one-line UserError naming the file and the reason (a worker re-raises it in the main process, whose last
line is that one line). 16-bit grayscale images (Pillow modes I;16 / I) are scaled to 8 bits (/257)
instead of being clipped to white by Pillow's RGB conversion. Images and labels are read upright, their
EXIF orientation applied (phone photos), as a viewer shows them. A missing file whose name differs from
an existing one only in letter case (IMG_1.PNG for IMG_1.png) is named in the error, with classes.json's
"img_suffix" / "label_suffix" keys that declare other suffixes.

Training items (train.py): resize to the papers' size (--source-size / --target-size; GTA5 1280x720,
SYNTHIA 1280x760, Cityscapes and Cross-City 1024x512; native for a pseudo-labelled source and for a
folder dataset), optional random scale, random crop (--crop, padded with 0 / 255; cat-max-ratio re-draws,
DAFormer's 0.75 via --cat-max-ratio; RCS re-crops), horizontal flip; all random numbers from
(seed, draw, index). Photometric augmentation (colour jitter, grayscale, blur) is the methods' business,
on the batch. Samplers (--source-sampler class-balanced | rcs) live in uda/samplers.py.

Command line (see the README, "Preparing the datasets"):
    python -m uda.datasets check NAME ROOT [--split S] [--full] [--json FILE [--overwrite]]
    python -m uda.datasets lists NAME [ROOT] [--split S] [--out FILE] [--overwrite]
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from uda import common, png16, toy
from uda.common import IGNORE_INDEX, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTS_DIR = os.path.join(REPO, "data_lists")

# --------------------------------------------------------------------------------------------------
# Label maps and label spaces (conventions.md, section 1)
# --------------------------------------------------------------------------------------------------
CITYSCAPES_NAMES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                    "motorcycle", "bicycle"]
CITYSCAPES_PALETTE = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                      (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                      (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
                      (0, 80, 100), (0, 0, 230), (119, 11, 32)]
# Cityscapes labelId -> trainId (GTA5, Cityscapes and Cross-City labels hold labelIds)
LABELID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                      25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# SYNTHIA-RAND-CITYSCAPES raw class id (channel 0 of GT/LABELS) -> Cityscapes trainId, as DAFormer's
# tools/convert_datasets/synthia.py: 16 terrain, 18 truck and 20 train are mapped too (a 19-class model
# learns them from SYNTHIA's few pixels); the 16-class space has no trainId 9, 14 or 16, so label_lut
# leaves them ignored there. 0 void, 13 parking slot, 14 road-work, 22 lanemarking -> 255.
SYNTHIA_ID_TO_TRAINID = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12,
                         8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}
# The 16 SYNTHIA classes as trainIds (index i of a 16-class model = TRAINIDS_16[i]; FADA/SDCA order)
TRAINIDS_16 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
# The 13 classes of SYNTHIA's mIoU13 and of Cross-City, as Cityscapes trainIds
TRAINIDS_13 = [0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]


@dataclass
class LabelSpace:
    """The classes a model predicts and the class subsets its mIoU is reported over.

    trainids[i] is the Cityscapes trainId of class index i: benchmark labels (Cityscapes labelIds,
    SYNTHIA ids) are mapped through it, and names and colours come from the Cityscapes table.
    eval_sets maps a report name ('mIoU19', 'mIoU13', ...) to class indices; the first is the headline.
    class_names / class_palette: a folder dataset's own classes (classes.json), with trainids = 0..C-1
    as plain class indices; None for the benchmark spaces (their names follow from the trainIds).
    """
    trainids: list
    eval_sets: dict = field(default_factory=dict)
    class_names: list = None
    class_palette: list = None

    @property
    def num_classes(self):
        return len(self.trainids)

    @property
    def names(self):
        """Class names by class index."""
        if self.class_names is not None:
            return list(self.class_names)
        return [CITYSCAPES_NAMES[t] for t in self.trainids]

    @property
    def palette(self):
        """(r, g, b) colour by class index: the Cityscapes colour of the trainId, or the space's own."""
        if self.class_palette is not None:
            return [tuple(c) for c in self.class_palette]
        return [CITYSCAPES_PALETTE[t] for t in self.trainids]

    @property
    def has_trainids(self):
        """True when trainids[i] really is class i's Cityscapes trainId, so Cityscapes-style labels (and
        trainId-based choices such as DAFormer's thing classes) apply: every benchmark space, and a folder
        space whose classes.json lists Cityscapes names in trainId order from road. False otherwise."""
        if self.class_names is None:
            return True
        return all(t < len(CITYSCAPES_NAMES) and CITYSCAPES_NAMES[t] == n
                   for t, n in zip(self.trainids, self.class_names))

    def to_record(self):
        """The JSON-able form read back by read_pseudo_space (DIR/labelspace.json)."""
        record = {"trainids": list(self.trainids), "eval_sets": dict(self.eval_sets)}
        if self.class_names is not None:
            record["class_names"] = list(self.class_names)
            record["palette"] = [list(c) for c in self.palette]
        return record


def generated_palette(num_classes):
    """A deterministic, well-spread colour per class when classes.json has no palette.

    The bits of (index + 1) are dealt round-robin to R, G and B from the most significant bit down (the
    PASCAL VOC colour-map idea): neighbouring indices get very different colours, and +1 keeps class 0
    from being black, the colour people expect for 'ignore'.
    """
    palette = []
    for index in range(num_classes):
        code, rgb = index + 1, [0, 0, 0]
        for bit in range(7, -1, -1):  # bit 7 first: the low bits of the code decide the bright part
            for channel in range(3):
                rgb[channel] |= ((code >> channel) & 1) << bit
            code >>= 3
        palette.append(tuple(rgb))
    return palette


CITYSCAPES_19 = LabelSpace(list(range(19)), {"mIoU19": list(range(19))})
TOY_SPACE = LabelSpace(list(range(19)), {f"mIoU{len(toy.TOY_CLASSES)}": list(toy.TOY_CLASSES)})
# FADA/SDCA: a 16-class head; mIoU13 is a subset of the same predictions
SYNTHIA_16 = LabelSpace(list(TRAINIDS_16), {"mIoU16": list(range(16)),
                                            "mIoU13": [TRAINIDS_16.index(t) for t in TRAINIDS_13]})
# DAFormer/DIDA: a 19-class head trained on SYNTHIA, reported over the 16 (and 13) SYNTHIA classes
SYNTHIA_19 = LabelSpace(list(range(19)), {"mIoU16": list(TRAINIDS_16), "mIoU13": list(TRAINIDS_13)})
# Cross-City: a 19-class Cityscapes model evaluated on the 13 annotated classes
CROSSCITY_19 = LabelSpace(list(range(19)), {"mIoU13": list(TRAINIDS_13)})

CROSSCITY_CITIES = {"crosscity-rome": "Rome", "crosscity-rio": "Rio", "crosscity-tokyo": "Tokyo",
                    "crosscity-taipei": "Taipei"}
REAL_DATASETS = ["gta5", "synthia", "cityscapes", *CROSSCITY_CITIES]  # the benchmarks
FOLDER = "folder"  # a user's dataset in mmsegmentation's layout, with its own classes.json
DATASET_NAMES = [*toy.DOMAINS, *REAL_DATASETS, FOLDER]


def label_space(source, args=None):
    """The label space of a model trained on `source` (the target is evaluated in the same space).

    args may lack any attribute (old checkpoints, other scripts): pseudo_dir (-> DIR/labelspace.json),
    synthia_classes (16 = FADA/SDCA index space, 19 = DAFormer/DIDA trainIds), target (Cross-City -> mIoU13),
    and for a folder source: folder_classes (a classes.json record saved with a run, so that a checkpoint
    is readable without its dataset), else source_root (or DATA_ROOT/folder) holding classes.json.
    """
    pseudo_dir = getattr(args, "pseudo_dir", None)
    if pseudo_dir:
        return read_pseudo_space(pseudo_dir)
    if source in toy.DOMAINS:
        return TOY_SPACE
    if source == "synthia":
        classes = int(getattr(args, "synthia_classes", 16) or 16)
        if classes not in (16, 19):
            raise UserError(f"--synthia-classes {classes}: expected 16 (FADA/SDCA) or 19 (DAFormer/DIDA)")
        return SYNTHIA_16 if classes == 16 else SYNTHIA_19
    if source in REAL_DATASETS:
        return CROSSCITY_19 if getattr(args, "target", None) in CROSSCITY_CITIES else CITYSCAPES_19
    if source == FOLDER:
        saved = getattr(args, "folder_classes", None)
        if saved:
            return folder_space(parse_folder_classes(saved, "the checkpoint's folder_classes"))
        root = getattr(args, "source_root", None) or dataset_root(FOLDER, getattr(args, "data_root", None))
        return folder_space(read_folder_classes(root))
    raise UserError(f"--source {source!r}: unknown dataset (expected one of {', '.join(DATASET_NAMES)})")


def read_pseudo_space(pseudo_dir):
    """The label space a pseudo-label folder was written in (DIR/labelspace.json, LabelSpace.to_record).

    {"trainids", "eval_sets"} for a benchmark space; a folder space adds "class_names" (and "palette"),
    and then its trainids are plain class indices, not Cityscapes trainIds.
    """
    path = os.path.join(pseudo_dir, "labelspace.json")
    if not os.path.isfile(path):
        raise UserError(f"--pseudo-dir {pseudo_dir}: no labelspace.json in it (expected a folder written by "
                        f"evaluate.py --save-pseudo DIR)")
    try:
        with open(path) as f:
            record = json.load(f)
        trainids = [int(t) for t in record["trainids"]]
        eval_sets = {str(k): [int(c) for c in v] for k, v in record["eval_sets"].items()}
        names = [str(n) for n in record["class_names"]] if record.get("class_names") is not None else None
        palette = [tuple(int(v) for v in c) for c in record["palette"]] if record.get("palette") else None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path}: expected {{\"trainids\": [...], \"eval_sets\": {{name: [indices]}}}} (optional "
                        f"\"class_names\", \"palette\")") from None
    own = names is not None  # a folder space: trainids are class indices 0..C-1
    if not trainids or not all(0 <= c < len(trainids) for v in eval_sets.values() for c in v) or \
            (not own and not all(0 <= t < len(CITYSCAPES_NAMES) for t in trainids)):
        raise UserError(f"{path}: trainids must be Cityscapes trainIds 0..18 and eval_sets indices into them")
    if own and (len(names) != len(trainids) or (palette is not None and len(palette) != len(trainids))):
        raise UserError(f"{path}: class_names (and palette) must have one entry per trainid ({len(trainids)})")
    return LabelSpace(trainids, eval_sets or {f"mIoU{len(trainids)}": list(range(len(trainids)))},
                      class_names=names, class_palette=palette if own else None)


# --------------------------------------------------------------------------------------------------
# Folder datasets: classes.json and the check that a target has the source's classes
# --------------------------------------------------------------------------------------------------
FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # matched case-insensitively when no img_suffix is set
FOLDER_LABEL_SUFFIX = ".png"
FOLDER_SPLITS = ("train", "val")
MAX_FOLDER_CLASSES = 255  # labels are uint8 with 255 = ignore, so class indices are 0..254
CLASSES_FORMAT = ('{"classes": [names...], "palette": [[r, g, b], ...], "label_map": {"raw id": class index}}, '
                  'palette and label_map optional')
CLASSES_KEYS = ("classes", "palette", "label_map", "img_suffix", "label_suffix")


def classes_path(root):
    return os.path.join(root, "classes.json")


def read_folder_classes(root):
    """ROOT/classes.json as a checked record (see parse_folder_classes); missing or invalid: one line."""
    path = classes_path(root)
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found (a folder dataset needs classes.json = {CLASSES_FORMAT})")
    try:
        with open(path) as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({str(err).splitlines()[0]}); expected {CLASSES_FORMAT}") from None
    return parse_folder_classes(data, path)


def parse_folder_classes(data, where):
    """Check a classes.json object and normalise it.

    Returns {"classes": [str] (C), "palette": [(r, g, b)] (C) or None, "label_map": {raw id: index} or
    None, "img_suffix": str or None, "label_suffix": str or None}. `where` names the file in errors.
    Unknown keys are refused: a misspelt "label-map" must not be silently ignored.
    """
    if not isinstance(data, dict) or "classes" not in data:
        raise UserError(f"{where}: expected an object with a \"classes\" list: {CLASSES_FORMAT}")
    unknown = [k for k in data if k not in CLASSES_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(CLASSES_KEYS)})")
    names = data["classes"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise UserError(f"{where}: \"classes\" must be a non-empty list of class names (strings)")
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise UserError(f"{where}: class name {duplicate!r} is listed twice")
    if len(names) > MAX_FOLDER_CLASSES:
        raise UserError(f"{where}: {len(names)} classes; at most {MAX_FOLDER_CLASSES} (255 is the ignore label)")
    return {"classes": list(names), "palette": _parse_palette(data.get("palette"), len(names), where),
            "label_map": _parse_label_map(data.get("label_map"), len(names), where),
            "img_suffix": _parse_suffix(data.get("img_suffix"), "img_suffix", where),
            "label_suffix": _parse_suffix(data.get("label_suffix"), "label_suffix", where)}


def _parse_palette(palette, num_classes, where):
    if palette is None:
        return None
    ok = isinstance(palette, list) and len(palette) == num_classes and all(
        isinstance(c, (list, tuple)) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
        for c in palette)
    if not ok:
        raise UserError(f"{where}: \"palette\" must list one [r, g, b] (0..255) per class ({num_classes})")
    return [tuple(c) for c in palette]


def _parse_label_map(label_map, num_classes, where):
    """{"raw id": class index or 255} -> {int: int}; raw ids 0..65535 (8- or 16-bit label PNGs)."""
    if label_map is None:
        return None
    if not isinstance(label_map, dict) or not label_map:
        raise UserError(f"{where}: \"label_map\" must be a non-empty object {{\"raw id\": class index}}")
    parsed = {}
    for raw, index in label_map.items():
        if not str(raw).strip().isdigit() or int(raw) > 65535:
            raise UserError(f"{where}: label_map key {raw!r} is not a raw label id 0..65535")
        if isinstance(index, bool) or not isinstance(index, int) or not (0 <= index < num_classes or
                                                                          index == IGNORE_INDEX):
            raise UserError(f"{where}: label_map[{raw!r}] = {index!r} is not a class index 0..{num_classes - 1} "
                            f"or 255")
        parsed[int(raw)] = index
    return parsed


def _parse_suffix(suffix, key, where):
    if suffix is not None and (not isinstance(suffix, str) or not suffix):
        raise UserError(f"{where}: \"{key}\" must be a non-empty string such as \".png\"")
    return suffix


def folder_space(record):
    """The LabelSpace of a classes.json record: class indices 0..C-1, reported as mIoU<C> over all."""
    count = len(record["classes"])
    return LabelSpace(list(range(count)), {f"mIoU{count}": list(range(count))}, class_names=list(record["classes"]),
                      class_palette=record["palette"] or generated_palette(count))


def compare_classes(names, space, where):
    """Refuse `names` (a folder's classes, from `where`) unless they are the model's, in the same order."""
    if list(names) == space.names:
        return
    diff = next((i for i, (a, b) in enumerate(zip(names, space.names)) if a != b), min(len(names), len(space.names)))
    here = repr(names[diff]) if diff < len(names) else "missing"
    model = repr(space.names[diff]) if diff < len(space.names) else "none"
    raise UserError(f"{where}: its classes differ from the model's: class {diff} is {here} here, {model} in the "
                    f"model ({len(names)} vs {space.num_classes} classes; list the source's classes in its order)")


def check_same_classes(source_space, target_name, target_root):
    """Refuse a target whose labels are not in the model's classes (call before training; one line).

    folder target: its classes.json must list source_space's class names in the same order (a target
    without labels and without classes.json is accepted: nothing to compare). Benchmark or toy target:
    its labels are Cityscapes classes, so the model's space must be a trainId space (has_trainids).
    """
    if target_name == FOLDER:
        if not os.path.isfile(classes_path(target_root)) and \
                not any(has_labels(FOLDER, split, target_root) for split in FOLDER_SPLITS):
            return
        compare_classes(read_folder_classes(target_root)["classes"], source_space, classes_path(target_root))
        return
    # the toy's labels are trainIds 0..18 as generated (not mapped through the space), so a folder space
    # must then be all 19 Cityscapes classes; benchmark labels are mapped, any trainId space will do
    toy_mismatch = target_name in toy.DOMAINS and source_space.class_names is not None and \
        source_space.num_classes != len(CITYSCAPES_NAMES)
    if not source_space.has_trainids or toy_mismatch:
        raise UserError(f"--target {target_name}: its labels are Cityscapes classes, but the model predicts a "
                        f"classes.json's {source_space.num_classes} classes ({', '.join(source_space.names[:4])}"
                        f"{', ...' if source_space.num_classes > 4 else ''}); use a folder target with the same "
                        f"classes.json")


def label_lut(id_to_trainid, space, size=256, keep=None):
    """uint8 lookup table raw id -> class index of `space` (255 for ids outside the space or `keep`)."""
    index_of = {t: i for i, t in enumerate(space.trainids)}
    lut = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for raw, trainid in id_to_trainid.items():
        if trainid in index_of and (keep is None or trainid in keep):
            lut[raw] = index_of[trainid]
    return lut


# --------------------------------------------------------------------------------------------------
# Paired transforms; sizes are (width, height)
# --------------------------------------------------------------------------------------------------
CAT_MAX_TRIES = 10  # mmseg RandomCrop(cat_max_ratio): at most 10 re-draws (DAFormer's source crop)
RCS_MAX_TRIES = 10  # DAFormer get_rare_class_sample: at most 10 re-crops until the sampled class is present


def to_tensors(image, label):
    """uint8 (H, W, 3), uint8/int (H, W) or None -> float (3, H, W) in [0, 1], int64 (H, W) or None."""
    image = np.ascontiguousarray(image)
    image = torch.from_numpy(image if image.flags.writeable else image.copy()).permute(2, 0, 1).float().div_(255.0)
    if label is not None:
        label = np.ascontiguousarray(label)
        label = torch.from_numpy(label if label.flags.writeable else label.copy()).long()
    return image, label


def random_crop(image, label, crop, rng):
    """Toy crop on tensors: (width, height) at a random place; pad with 0 / 255 where the image is smaller."""
    crop_w, crop_h = crop
    _, height, width = image.shape
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h or pad_w:
        image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        if label is not None:
            label = torch.nn.functional.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        height, width = height + pad_h, width + pad_w
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    image = image[:, top:top + crop_h, left:left + crop_w]
    if label is not None:
        label = label[top:top + crop_h, left:left + crop_w]
    return image, label


def random_hflip(image, label, rng):
    if rng.random() < 0.5:
        image = image.flip(-1)
        label = label.flip(-1) if label is not None else None
    return image, label


def resize_pair(image, label, size):
    """Resize uint8 (H, W, 3) bicubic and the label (H, W) nearest to size = (width, height)."""
    if size is None or (image.shape[1], image.shape[0]) == tuple(size):
        return image, label
    image = np.asarray(Image.fromarray(image).resize(tuple(size), Image.BICUBIC))
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize(tuple(size), Image.NEAREST))
    return image, label


def crop_cat_max(image, label, crop, rng, cat_max_ratio=1.0):
    """Random crop (width, height) of numpy arrays, padded with 0 / 255 at the bottom/right when smaller.

    cat_max_ratio < 1 (DAFormer 0.75): re-draw the window (at most CAT_MAX_TRIES times) until no single
    class covers cat_max_ratio or more of its labelled pixels and at least two classes are present;
    the last window is kept. Returns (image, label) crops.
    """
    crop_w, crop_h = crop
    height, width = image.shape[:2]
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
        if label is not None:
            label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
        height, width = height + pad_h, width + pad_w
    tries = CAT_MAX_TRIES if (label is not None and cat_max_ratio < 1.0) else 1
    for _ in range(tries):
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        if tries == 1:
            break
        counts = np.bincount(label[top:top + crop_h, left:left + crop_w].ravel(), minlength=256)[:IGNORE_INDEX]
        counts = counts[counts > 0]  # (classes present,)
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    image = image[top:top + crop_h, left:left + crop_w]
    label = label[top:top + crop_h, left:left + crop_w] if label is not None else None
    return image, label


def train_transform(image, label, rng, size=None, scale_range=None, crop=None, cat_max_ratio=1.0, cls=None,
                    recrop_pixels=0):
    """The training pipeline on numpy arrays, in order: resize to `size` (bicubic / nearest) times a random
    scale in scale_range, random crop (cat-max-ratio; for RCS re-drawn until class `cls` has more than
    recrop_pixels pixels), horizontal flip with probability 0.5. Returns (image, label) uint8 arrays."""
    if scale_range is not None:
        scale = rng.uniform(*scale_range)
        base = size or (image.shape[1], image.shape[0])
        size = (max(1, round(base[0] * scale)), max(1, round(base[1] * scale)))
    image, label = resize_pair(image, label, size)
    if crop is not None:
        tries = RCS_MAX_TRIES if (cls is not None and recrop_pixels > 0 and label is not None) else 1
        full_image, full_label = image, label
        for _ in range(tries):
            image, label = crop_cat_max(full_image, full_label, crop, rng, cat_max_ratio)
            if tries == 1 or int((label == cls).sum()) > recrop_pixels:
                break
    if rng.random() < 0.5:
        image = image[:, ::-1]
        label = label[:, ::-1] if label is not None else None
    return image, label


def split_key(key):
    """A loader key: int, (index, draw) or (index, draw, cls) -> (index, draw, cls or None)."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1]), (int(key[2]) if len(key) > 2 else None)
    return int(key), 0, None


# --------------------------------------------------------------------------------------------------
# Reading image and label files: every failure is one line naming the file and the reason
# --------------------------------------------------------------------------------------------------
EXIF_ORIENTATION = 0x0112  # EXIF tag: how the camera held the picture (1 upright, 5..8 turned a quarter)
LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N")  # single-channel: ids (P: palette indices)
GRAY16_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit (or 32-bit int) grayscale


def unreadable_reason(path, err):
    """A short, one-line reason why Pillow could not open or decode `path`."""
    if isinstance(err, FileNotFoundError):
        return "no such file"
    if isinstance(err, IsADirectoryError):
        return "a folder, not a file"
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    if isinstance(err, UnidentifiedImageError):  # Pillow's "cannot identify image file": no known format
        return "not an image Pillow can decode (unrecognised file content)"
    text = " ".join(str(err).split())  # Pillow's messages, on one line ("image file is truncated ...")
    return text or type(err).__name__


def decode_file(path, what, to_array):
    """Open `path` with Pillow, decode it fully (.load(): a truncated file fails here, not later inside a
    transform), turn it upright by its EXIF orientation, and return to_array(image). what: 'image' or
    'label', for the message.

    Phones store a portrait photo as landscape pixels plus an Orientation tag; every viewer shows it
    turned, and its label was drawn on what the viewer showed. So images and labels alike are read in
    that displayed frame (a label PNG rarely carries the tag; when it does, the same rule applies).

    Every Pillow failure becomes a one-line UserError; raised inside a DataLoader worker, the main process
    re-raises it with the worker's traceback above, and the last line stays `UserError: <that line>`.
    """
    try:
        with Image.open(path) as im:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of a 48-megapixel photo
            return to_array(im)
    except (UserError, MemoryError):  # ours already say what is wrong; running out of memory is no bad file
        raise
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, struct.error ... for broken files
        raise UserError(f"{what} {path}: unreadable ({unreadable_reason(path, err)})") from None


def image_to_rgb(im, path):
    """A decoded Pillow image -> uint8 (H, W, 3) RGB.

    16-bit grayscale (modes I;16*, I) is scaled to 8 bits (value / 257, so 65535 -> 255): Pillow's own
    convert("RGB") clips it, which turns a typical 16-bit image into 99% white.
    """
    if im.mode in GRAY16_MODES:
        gray = np.asarray(im).astype(np.float64)  # (H, W), 0..65535
        gray = np.clip(np.rint(gray / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)  # (H, W, 3)
    if im.mode == "F":
        raise UserError(f"image {path}: floating-point image (mode F); expected an 8-bit RGB or grayscale image")
    return np.asarray(im.convert("RGB"))


def label_ids(im, path):
    """A decoded single-channel Pillow label -> (H, W) uint8 / uint16 ids; a colour label is refused."""
    if im.mode not in LABEL_MODES:
        raise UserError(f"label {path}: expected a single-channel PNG of class ids, got mode {im.mode} (a colour "
                        f"label must be converted to ids first)")
    return np.asarray(im)


def read_image(path):
    """An image file as uint8 (H, W, 3) RGB (see image_to_rgb); a broken file is a one-line UserError."""
    return decode_file(path, "image", lambda im: image_to_rgb(im, path))


def probe_image(path, what="image"):
    """(mode, (width, height)) from the file header only (cheap: no pixel is decoded), the size as
    displayed: width and height swapped for an EXIF orientation turned a quarter (5..8).

    A PNG's orientation is read only when its eXIf chunk comes before the pixels (where Pillow writes
    it): finding a later one would decode the image. read_image always applies it.
    """
    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                exif = Image.Exif()
                if "exif" in im.info:
                    exif.load(im.info["exif"])
            else:
                exif = im.getexif()
            turned = exif.get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            return im.mode, (im.size[::-1] if turned else im.size)
    except MemoryError:
        raise
    except Exception as err:
        raise UserError(f"{what} {path}: unreadable ({unreadable_reason(path, err)})") from None


def read_label_png(path, lut=None, num_classes=None, hint=" (pseudo-labels hold the model's class indices)"):
    """An 8- or 16-bit single-channel label PNG as uint8 (H, W), mapped through `lut` when given.

    Without a lut (pseudo-labels, folder labels without label_map: class indices already), values must
    be < num_classes or 255; `hint` ends that error message.
    """
    raw = decode_file(path, "label", lambda im: label_ids(im, path))  # (H, W)
    if lut is not None:
        return lut[np.clip(raw, 0, len(lut) - 1)] if raw.dtype != np.uint8 else lut[raw]
    if num_classes is not None:
        bad = ((raw >= num_classes) & (raw != IGNORE_INDEX)) | (raw < 0)  # (H, W); < 0: 32-bit mode I
        if bad.any():
            raise UserError(f"label {path}: value {int(raw[bad][0])} is not a class index 0..{num_classes - 1} "
                            f"or 255{hint}")
    return raw.astype(np.uint8)


def read_synthia_label(path, lut):
    """SYNTHIA GT/LABELS: channel 0 of a 16-bit (or 8-bit) PNG holds the class id (uda/png16.py)."""
    raw = png16.read_png(path)[..., 0]  # (H, W) uint16 or uint8
    return lut[raw]


# --------------------------------------------------------------------------------------------------
# The toy domain pair
# --------------------------------------------------------------------------------------------------
TOY_CROP = (128, 64)  # half the toy image per side: cheap steps, and random crops as augmentation


class ToyDataset(Dataset):
    """toy-synth / toy-real, generated on the fly. Training items get a random crop and flip.

    `labeled=False` drops labels (the adaptation target's train split): they are never generated into
    the batch, so they cannot leak into a loss. pseudo_dir: labels are read from
    pseudo_dir/<item_name>.png instead (self-training on the toy).
    `seed` drives the augmentation only: the images of a split are fixed, like a dataset on disk, so
    item names (pseudo-labels, class statistics) mean the same images in every run.
    """

    def __init__(self, domain, split, labeled=True, crop=None, augment=False, seed=0, length=None,
                 pseudo_dir=None, cat_max_ratio=1.0, recrop_pixels=0, num_classes=None):
        self.domain, self.split, self.labeled = domain, split, labeled
        self.crop, self.augment, self.seed = crop, augment, seed
        self.length = length or toy.SPLIT_LENGTHS[split]
        self.pseudo_dir, self.num_classes = pseudo_dir, num_classes
        self.cat_max_ratio, self.recrop_pixels = cat_max_ratio, recrop_pixels
        if pseudo_dir and labeled:
            check_pseudo_labels(pseudo_dir, [self.item_name(i) for i in range(self.length)])

    def __len__(self):
        return self.length

    def item_name(self, index):
        return f"{self.domain}_{self.split}_{index:05d}"

    def label_array(self, index):
        """The label as uint8 (H, W) class indices, without augmentation (class statistics)."""
        if self.pseudo_dir:
            return read_label_png(os.path.join(self.pseudo_dir, self.item_name(index) + ".png"),
                                  num_classes=self.num_classes)
        return toy.generate(self.domain, self.split, index)[1]

    def label_files(self):
        """The label files label_array reads (the pseudo-labels; none for generated labels)."""
        if not self.pseudo_dir:
            return []
        return [os.path.join(self.pseudo_dir, self.item_name(i) + ".png") for i in range(self.length)]

    def __getitem__(self, key):
        index, draw, cls = split_key(key)
        image, label = toy.generate(self.domain, self.split, index)
        if self.pseudo_dir and self.labeled:
            label = self.label_array(index)
        if not self.labeled:
            label = None
        if self.augment and (self.cat_max_ratio < 1.0 or cls is not None):
            # the real datasets' numpy pipeline (cat-max-ratio / RCS re-crops); no resize on the toy
            rng = np.random.default_rng([self.seed, draw, index])
            image, label = train_transform(image, label, rng, crop=self.crop, cat_max_ratio=self.cat_max_ratio,
                                           cls=cls, recrop_pixels=self.recrop_pixels)
            image, label = to_tensors(image, label)
        else:
            image, label = to_tensors(image, label)
            if self.augment:
                rng = np.random.default_rng([self.seed, draw, index])
                if self.crop is not None:
                    image, label = random_crop(image, label, self.crop, rng)
                image, label = random_hflip(image, label, rng)
        item = {"image": image, "index": index}
        if label is not None:
            item["label"] = label
        return item


# --------------------------------------------------------------------------------------------------
# Real datasets: a list of (image path, label path or None, item name) and a label reader
# --------------------------------------------------------------------------------------------------
class FileDataset(Dataset):
    """Images and labels read from files. Labels are mapped to the model's label space on the fly.

    Evaluation items (augment=False) are the images at their own size; evaluate.py resizes the input
    and compares upsampled logits with the native label. Training items go through train_transform.
    A label whose size differs from its image's (a few GTA5 pairs) is resized to it (nearest).
    """

    def __init__(self, name, split, items, read_label=None, augment=False, seed=0, size=None, scale_range=None,
                 crop=None, cat_max_ratio=1.0, recrop_pixels=0, root=None, list_file=None, lines=None,
                 label_key=None):
        self.name, self.split, self.items, self.read_label = name, split, items, read_label
        self.augment, self.seed, self.size, self.scale_range = augment, seed, size, scale_range
        self.crop, self.cat_max_ratio, self.recrop_pixels = crop, cat_max_ratio, recrop_pixels
        # where the items came from, for check_files_exist's message: the dataset folder, and the data
        # list with the line number of every item (None when the split was listed from the folder)
        self.root, self.list_file, self.lines = root, list_file, lines
        # what else the label values depend on (a folder's classes.json), for the class-statistics cache key
        self.label_key = label_key

    def __len__(self):
        return len(self.items)

    def item_name(self, index):
        return self.items[index][2]

    def label_array(self, index):
        """The label as uint8 (H, W) class indices at the label file's resolution (class statistics)."""
        if self.read_label is None or self.items[index][1] is None:
            raise UserError(f"{self.name} {self.split}: built without labels (labeled=False); its labels cannot "
                            f"be read")
        return self.read_label(self.items[index][1])

    def label_files(self):
        """The label files label_array reads, in item order."""
        return [label for _, label, _ in self.items if label is not None]

    def load(self, index):
        image_path, label_path, _ = self.items[index]
        image = read_image(image_path)
        label = None
        if label_path is not None:
            label = self.read_label(label_path)
            if label.shape != image.shape[:2]:  # e.g. GTA5 pairs of different sizes
                label = np.asarray(Image.fromarray(label).resize((image.shape[1], image.shape[0]), Image.NEAREST))
        return image, label

    def __getitem__(self, key):
        index, draw, cls = split_key(key)
        image, label = self.load(index)
        if self.augment:
            rng = np.random.default_rng([self.seed, draw, index])
            image, label = train_transform(image, label, rng, self.size, self.scale_range, self.crop,
                                           self.cat_max_ratio, cls, self.recrop_pixels)
        image, label = to_tensors(image, label)
        item = {"image": image, "index": index}
        if label is not None:
            item["label"] = label
        return item


LAYOUTS = {
    "gta5": "images/00001.png .. images/24966.png and labels/00001.png .. (Cityscapes labelIds)",
    "synthia": "RGB/0000000.png .. RGB/0009399.png and GT/LABELS/0000000.png .. (16-bit PNG), "
               "optionally inside RAND_CITYSCAPES/",
    "cityscapes": "leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png and "
                  "gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png",
    "crosscity": "Images/Train/<id>.jpg, Images/Test/<id>.jpg, Labels/Test/<id>_eval.png, List/{train,test}.txt",
    FOLDER: "images/<split>/<path>.png|jpg|jpeg, labels/<split>/<path>.png (class indices) and classes.json",
}
FOLDERS = {"gta5": "gta5", "synthia": "synthia", "cityscapes": "cityscapes",
           **{name: os.path.join("crosscity", city) for name, city in CROSSCITY_CITIES.items()}, FOLDER: FOLDER}
SPLITS = {"gta5": ("train",), "synthia": ("train",), "cityscapes": ("train", "val", "test"),
          **{name: ("train", "val", "test") for name in CROSSCITY_CITIES}, FOLDER: FOLDER_SPLITS}
# What a complete copy holds (conventions.md); Cross-City: 100 labelled test images per city, train
# counts unverified, so not checked
EXPECTED = {("gta5", "train"): 24966, ("synthia", "train"): 9400, ("cityscapes", "train"): 2975,
            ("cityscapes", "val"): 500, ("cityscapes", "test"): 1525,
            **{(name, split): 100 for name in CROSSCITY_CITIES for split in ("val", "test")}}
CROSSCITY_SPLIT_FOLDER = {"train": "Train", "val": "Test", "test": "Test"}


def layout(name):
    return LAYOUTS["crosscity" if name in CROSSCITY_CITIES else name]


def dataset_root(name, data_root, override=None):
    """The folder of dataset `name`: `override` (--source-root / --target-root) or DATA_ROOT/<folder>.

    None for the built-in toy. A real dataset without either is a one-line error naming the layout.
    """
    if name in toy.DOMAINS:
        return None
    if name is None:
        raise UserError(f"--target: this source has no default target; pass --target NAME (one of "
                        f"{', '.join(DATASET_NAMES)})")
    if name not in FOLDERS:
        raise UserError(f"dataset {name!r}: unknown (expected one of {', '.join(DATASET_NAMES)})")
    if override:
        return override
    if not data_root:
        where = "--source-root / --target-root DIR, or " if name == FOLDER else ""
        raise UserError(f"dataset {name}: no folder given; pass {where}--data-root DIR with DIR/{FOLDERS[name]} "
                        f"holding {layout(name)}")
    return os.path.join(data_root, FOLDERS[name])


def checkpoint_root(name, data_root, saved=None):
    """The folder of `name` for evaluate.py: DATA_ROOT/<folder> when --data-root is given, else the folder
    the checkpoint's run used (its --target-root / --source-root / --data-root, from the saved args)."""
    if data_root or saved is None or name in toy.DOMAINS:
        return dataset_root(name, data_root)
    for side in ("target", "source"):
        if getattr(saved, side, None) == name and getattr(saved, f"{side}_root", None):
            return getattr(saved, f"{side}_root")
    return dataset_root(name, getattr(saved, "data_root", None))


def has_labels(name, split, root=None):
    """Whether split `split` of dataset `name` has labels to evaluate on (train.py skips its periodic
    evaluation without them). A folder dataset has them when ROOT/labels/<split>/ exists; the
    benchmarks by definition (Cityscapes test and Cross-City train are unlabelled)."""
    if name == FOLDER:
        return root is not None and os.path.isdir(os.path.join(root, "labels", split))
    if name == "cityscapes":
        return split != "test"
    if name in CROSSCITY_CITIES:
        return split != "train"
    return name in toy.DOMAINS or name in FOLDERS


def require_dir(path, name, what):
    if not os.path.isdir(path):
        raise UserError(f"{name}: folder {path} not found (expected {what}: {layout(name)}); set --data-root "
                        f"(or --source-root / --target-root)")


def read_list(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def read_list_file(path):
    """A user's data list: [(line number, relative path)], blank lines and '#' comments skipped.

    A missing, unreadable or empty list, or an absolute path in it, is a one-line error naming the list.
    """
    if not os.path.isfile(path):
        raise UserError(f"list {path}: no such file (expected one relative path per line)")
    entries = []
    try:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                text = line.strip()
                if text and not text.startswith("#"):
                    entries.append((number, text))
    except UnicodeDecodeError:
        raise UserError(f"list {path}: not a text file (expected one relative path per line)") from None
    if not entries:
        raise UserError(f"list {path}: lists no files (expected one relative path per line)")
    for number, text in entries:
        if os.path.isabs(text):
            raise UserError(f"list {path} line {number}: {text} is an absolute path (expected a path relative to "
                            f"the split's image folder)")
    return entries


def repo_list(name, split):
    """data_lists/<name>/<split>.txt if it exists (the naming-rule lists of GTA5 and SYNTHIA), else None.
    Never for a folder dataset: "folder" names every user's dataset, so no shipped list can be its."""
    path = os.path.join(LISTS_DIR, name, f"{split}.txt")
    return read_list(path) if name != FOLDER and os.path.isfile(path) else None


def synthia_dir(root):
    """SYNTHIA's folder holding RGB/ and GT/: root itself or root/RAND_CITYSCAPES."""
    nested = os.path.join(root, "RAND_CITYSCAPES")
    return nested if not os.path.isdir(os.path.join(root, "RGB")) and os.path.isdir(nested) else root


def scan(folder, suffix):
    """Paths relative to `folder` of every file ending in `suffix`, sorted."""
    found = []
    for dirpath, _, files in os.walk(folder):
        found += [os.path.relpath(os.path.join(dirpath, f), folder) for f in files if f.endswith(suffix)]
    return sorted(found)


def rule_list(name):
    """GTA5 and SYNTHIA lists follow from their naming rule."""
    if name == "gta5":
        return [f"{i:05d}.png" for i in range(1, EXPECTED[("gta5", "train")] + 1)]
    return [f"{i:07d}.png" for i in range(EXPECTED[("synthia", "train")])]


def folder_list(name, split, root, img_suffix=None):
    """The list of a split as found in the dataset folder (`lists` command; Cityscapes / Cross-City / folder)."""
    if name == "gta5":
        require_dir(os.path.join(root, "images"), name, "images/")
        return sorted(f for f in os.listdir(os.path.join(root, "images")) if f.endswith(".png"))
    if name == "synthia":
        rgb = os.path.join(synthia_dir(root), "RGB")
        require_dir(rgb, name, "RGB/")
        return sorted(f for f in os.listdir(rgb) if f.endswith(".png"))
    if name == "cityscapes":
        folder = os.path.join(root, "leftImg8bit", split)
        require_dir(folder, name, f"leftImg8bit/{split}")
        return scan(folder, "_leftImg8bit.png")
    if name == FOLDER:
        folder = os.path.join(root, "images", split)
        require_dir(folder, name, f"images/{split}/")
        return scan_images(folder, img_suffix)
    folder = os.path.join(root, "Images", CROSSCITY_SPLIT_FOLDER[split])
    require_dir(folder, name, f"Images/{CROSSCITY_SPLIT_FOLDER[split]}")
    return sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".png")))


def scan_images(folder, img_suffix=None):
    """Image paths relative to `folder`, nested sub-folders included (symlinked ones too, each real folder
    once: a link to a parent would list its files again and again), sorted.

    img_suffix None: any of .png/.jpg/.jpeg, any case. Hidden files (macOS '._x.png' resource forks,
    '.DS_Store') are skipped: they carry an image suffix but no image.
    """
    found, visited = [], set()
    for dirpath, dirs, files in os.walk(folder, followlinks=True):
        if os.path.realpath(dirpath) in visited:
            dirs[:] = []
            continue
        visited.add(os.path.realpath(dirpath))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.relpath(os.path.join(dirpath, f), folder) for f in files
                  if not f.startswith(".") and image_stem(f, img_suffix) is not None]
    return sorted(found)


def image_stem(path, img_suffix=None):
    """path without its image suffix, or None when it has none (img_suffix None: .png/.jpg/.jpeg)."""
    if img_suffix is not None:
        return path[:-len(img_suffix)] if path.endswith(img_suffix) else None
    stem, ext = os.path.splitext(path)
    return stem if ext.lower() in FOLDER_IMAGE_SUFFIXES else None


def folder_items(split, root, labeled, names=None, img_suffix=None, label_suffix=FOLDER_LABEL_SUFFIX):
    """[(image, label or None, item name)] of a folder dataset: images/<split>/<stem><img suffix> pairs
    with labels/<split>/<stem><label_suffix>; item name = <stem> (relative, sub-folders included).

    names: relative image paths (a data list), else every image under images/<split>/. Two images with
    one stem (a.png and a.jpg) are refused: they would share one label, one pseudo-label, one name.
    """
    images_dir, labels_dir = os.path.join(root, "images", split), os.path.join(root, "labels", split)
    require_dir(images_dir, FOLDER, f"images/{split}/")
    if labeled and not os.path.isdir(labels_dir):
        raise UserError(f"folder {root}: no labels/{split}/ folder (expected labels/{split}/<path>{label_suffix} "
                        f"beside images/{split}/; a folder without labels can only be an unlabelled target)")
    if names is None:
        names = scan_images(images_dir, img_suffix)
        if not names:
            kinds = img_suffix or "/".join(FOLDER_IMAGE_SUFFIXES)
            raise UserError(f"folder {images_dir}: holds no images (expected <path>{kinds} files, sub-folders "
                            f"allowed)")
    items, first = [], {}
    for rel in names:
        stem = image_stem(rel, img_suffix)
        if stem is None:
            raise UserError(f"folder {root}: {rel} does not end in an image suffix "
                            f"({img_suffix or ', '.join(FOLDER_IMAGE_SUFFIXES)})")
        if first.setdefault(stem, rel) != rel:
            raise UserError(f"folder {images_dir}: {first[stem]} and {rel} share the name {stem} (one label each "
                            f"is expected; remove or rename one)")
        label = os.path.join(labels_dir, stem + label_suffix) if labeled else None
        items.append((os.path.join(images_dir, rel), label, stem))
    return items


def dataset_items(name, split, root, labeled, names=None, img_suffix=None, label_suffix=FOLDER_LABEL_SUFFIX):
    """[(image path, label path or None, item name)] of a real dataset split, before any existence check.

    names: the split's relative paths from a data list (data_lists/ format); None = the shipped list,
    the naming rule or the folder. img_suffix / label_suffix: folder datasets only.
    """
    if split not in SPLITS[name]:
        raise UserError(f"--split {split!r}: {name} has splits {', '.join(SPLITS[name])}")
    require_dir(root, name, "the dataset folder")
    if name == FOLDER:
        return folder_items(split, root, labeled, names, img_suffix, label_suffix)
    if name == "gta5":
        names = names or repo_list(name, split) or rule_list(name)
        return [(os.path.join(root, "images", n), os.path.join(root, "labels", n) if labeled else None,
                 os.path.splitext(n)[0]) for n in names]
    if name == "synthia":
        base = synthia_dir(root)
        names = names or repo_list(name, split) or rule_list(name)
        return [(os.path.join(base, "RGB", n), os.path.join(base, "GT", "LABELS", n) if labeled else None,
                 os.path.splitext(n)[0]) for n in names]
    if name == "cityscapes":
        if labeled and split == "test":
            raise UserError("cityscapes test: its labels are withheld (use --split val)")
        names = names or repo_list(name, split) or folder_list(name, split, root)
        gt = os.path.join(root, "gtFine", split)
        return [(os.path.join(root, "leftImg8bit", split, n),
                 os.path.join(gt, n.replace("_leftImg8bit.png", "_gtFine_labelIds.png")) if labeled else None,
                 n[:-len(".png")]) for n in names]
    # Cross-City: ids from the repository's list, the city's List/<split>.txt, or the image folder
    if labeled and split == "train":
        raise UserError(f"{name} train: the Cross-City train images are unlabeled (use --split val)")
    sub = CROSSCITY_SPLIT_FOLDER[split]
    city_list = os.path.join(root, "List", "train.txt" if split == "train" else "test.txt")
    names = names or repo_list(name, split) or (read_list(city_list) if os.path.isfile(city_list) else
                                                folder_list(name, split, root))
    items = []
    for line in names:
        stem = os.path.splitext(os.path.basename(line))[0]
        image = os.path.join(root, "Images", sub, stem + ".jpg")
        if not os.path.isfile(image) and os.path.isfile(image[:-4] + ".png"):
            image = image[:-4] + ".png"
        label = os.path.join(root, "Labels", sub, stem + "_eval.png") if labeled else None
        items.append((image, label, stem))
    return items


def missing_files(items):
    """Listed image / label paths that do not exist (one directory listing per folder, not a stat per file)."""
    listing = {}
    missing = []
    for item in items:
        for path in item[:2]:
            if path is None:
                continue
            folder, base = os.path.split(path)
            if folder not in listing:
                listing[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
            if base not in listing[folder]:
                missing.append(path)
    return missing


def case_twin(path):
    """The name of a file beside `path` that differs from its name only in letter case (IMG_1.PNG for an
    expected IMG_1.png), or None. File names are case-sensitive here, so such a file is 'missing'."""
    folder, base = os.path.split(path)
    if not os.path.isdir(folder):
        return None
    return next((f for f in sorted(os.listdir(folder)) if f != base and f.lower() == base.lower()), None)


def case_hint(missing, name):
    """' (...)' telling why the first missing file whose twin differs in case is missing, and how to fix
    it; '' when no missing file has one. Looks at a few files only (one folder listing each)."""
    for path in missing[:3]:
        twin = case_twin(path)
        if twin is None:
            continue
        fix = "rename the files"
        if name == FOLDER:
            suffix = os.path.splitext(twin)[1]
            fix = (f'set the suffix the files have in classes.json, "label_suffix": "{suffix}" for labels or '
                   f'"img_suffix": "{suffix}" for images (or rename the files)')
        return (f" ({os.path.join(os.path.dirname(path), twin)} differs from the expected {os.path.basename(path)} "
                f"only in letter case, and file names are case-sensitive: {fix})")
    return ""


def check_files_exist(dataset):
    """Refuse a dataset any of whose listed image / label files is missing: one line naming the first
    missing file (with its data-list line when the dataset came from a list) and how many are missing.

    Cheap (one directory listing per folder), so train.py can call it on the validation set at start
    instead of failing at the first evaluation; build_dataset already calls it on every dataset it builds.
    The toy has no files: nothing to check.
    """
    items = getattr(dataset, "items", None)
    if not items:
        return
    missing = missing_files(items)
    if not missing:
        return
    name, split, root = dataset.name, dataset.split, dataset.root
    if dataset.list_file is not None:
        absent = set(missing)
        first = next(i for i, item in enumerate(items) if item[0] in absent or item[1] in absent)
        raise UserError(f"list {dataset.list_file} line {dataset.lines[first]}: {missing[0]} not found "
                        f"({len(missing)} missing files among its {len(items)} entries){case_hint(missing, name)}")
    hint = case_hint(missing, name) or (f" (see `python -m uda.datasets check {name} {root}`; "
                                        f"`python -m uda.datasets lists {name} {root}` lists what is there)")
    raise UserError(f"{name} {split}: {len(missing)} of {len(items)} listed images/labels are missing under "
                    f"{root}, e.g. {', '.join(missing[:3])}{hint}")


def check_batchable(dataset, batch_size):
    """Refuse training items of different sizes in batches of batch_size > 1 without a crop: one line,
    before the DataLoader's collate fails with a bare 'stack expects each tensor to be equal size'.

    A random scale without a crop gives every item its own size; a folder dataset at its native size
    (no resize) must hold images of one size, read from the file headers (no pixel is decoded).
    """
    if dataset.scale_range is not None:
        raise UserError(f"--random-scale without --crop: every {dataset.name} image gets its own size, and batches "
                        f"of {batch_size} need one; pass --crop WxH (or --batch-size 1)")
    if dataset.size is None and dataset.name == FOLDER:
        check_same_size(dataset, batch_size)


def check_same_size(dataset, batch_size):
    """The images of `dataset` share one size (see check_batchable)."""
    sizes = {}
    for image_path, _, _ in dataset.items:
        size = probe_image(image_path)[1]
        sizes.setdefault(size, image_path)
        if len(sizes) > 1:
            (a, path_a), (b, path_b) = sizes.items()
            raise UserError(f"{dataset.name} {dataset.split}: images differ in size ({path_a} {a[0]}x{a[1]}, {path_b} "
                            f"{b[0]}x{b[1]}) and batches of {batch_size} need one size: pass --crop WxH or "
                            f"--source-size / --target-size WxH")


def check_pseudo_labels(pseudo_dir, names):
    if not os.path.isdir(pseudo_dir):
        raise UserError(f"--pseudo-dir {pseudo_dir}: no such folder")
    missing = missing_files([(os.path.join(pseudo_dir, n + ".png"), None) for n in names])
    if missing:
        raise UserError(f"--pseudo-dir {pseudo_dir}: {len(missing)} of {len(names)} pseudo-labels are missing, "
                        f"e.g. {missing[0]}")


class LabelReader:
    """path -> uint8 (H, W) class indices of the model's label space (a class, not a lambda: picklable
    for DataLoader workers started with spawn).

    kind: 'synthia' (16-bit PNG, lut), 'ids' (labelIds, lut), 'pseudo' (class indices, checked),
    'folder' (class indices checked against num_classes, or raw ids through classes.json's label_map lut).
    """

    def __init__(self, kind, lut=None, num_classes=None):
        self.kind, self.lut, self.num_classes = kind, lut, num_classes

    def __call__(self, path):
        if self.kind == "synthia":
            return read_synthia_label(path, self.lut)
        if self.kind == "folder":
            return read_label_png(path, self.lut, self.num_classes,
                                  hint=" (classes.json lists the classes; a \"label_map\" maps other raw ids)")
        return read_label_png(path, self.lut, self.num_classes)


def folder_label_lut(label_map):
    """uint8 lookup table raw id (0..65535) -> class index from classes.json's label_map; unlisted ids -> 255."""
    lut = np.full(2 ** 16, IGNORE_INDEX, dtype=np.uint8)
    for raw, index in label_map.items():
        lut[raw] = index
    return lut


def label_reader(name, space, classes=None):
    """The LabelReader of a real dataset's label files, mapping them into `space` (classes: a folder's
    classes.json record)."""
    if name == FOLDER:
        if classes["label_map"] is not None:
            return LabelReader("folder", lut=folder_label_lut(classes["label_map"]))
        return LabelReader("folder", num_classes=len(classes["classes"]))
    if space is None or not space.has_trainids:
        own = f" ({', '.join(space.names[:4])}, ...)" if space is not None else ""
        raise UserError(f"{name}: its labels are Cityscapes classes, but the model predicts a classes.json's "
                        f"classes{own}; evaluate it on a folder dataset with the same classes.json")
    if name == "synthia":
        return LabelReader("synthia", label_lut(SYNTHIA_ID_TO_TRAINID, space, size=2 ** 16))
    keep = TRAINIDS_13 if name in CROSSCITY_CITIES else None  # Cross-City annotates 13 classes only
    return LabelReader("ids", label_lut(LABELID_TO_TRAINID, space, keep=keep))


def folder_options(root, img_suffix, label_suffix, labeled, space):
    """A folder dataset's classes.json record (None when an unlabelled folder has none), its image and
    label suffixes (keyword > classes.json > default), and the check that its classes are the model's."""
    classes = None
    if labeled or os.path.isfile(classes_path(root)):
        classes = read_folder_classes(root)
        if space is not None:
            compare_classes(classes["classes"], space, classes_path(root))
    img_suffix = img_suffix or (classes or {}).get("img_suffix")
    label_suffix = label_suffix or (classes or {}).get("label_suffix") or FOLDER_LABEL_SUFFIX
    return classes, img_suffix, label_suffix


def list_entries(list_file, name):
    """(names, line numbers) of a data list for dataset `name`, paths normalised ('a//b' -> 'a/b')."""
    if name in toy.DOMAINS:
        raise UserError(f"list {list_file}: the toy datasets are generated, a data list cannot select from them")
    entries = read_list_file(list_file)
    return [os.path.normpath(text) for _, text in entries], [number for number, _ in entries]


def build_dataset(name, split, space, root=None, labeled=True, crop=None, augment=False, seed=0, size="default",
                  scale_range=None, cat_max_ratio=1.0, pseudo_dir=None, recrop_pixels=0, list_file=None,
                  img_suffix=None, label_suffix=None, batch_size=1):
    """Construct dataset `name` for `split` in label space `space`.

    root: the dataset's folder (None for the built-in toy). crop: (width, height) of training crops.
    labeled=False: the loader does not read labels at all (adaptation target).
    size: training resize (width, height); "default" = default_train_size(name) (None with pseudo_dir:
    the self-training stages scale the full-resolution image); ignored when augment is False.
    scale_range: random scale (lo, hi) on top of `size`. cat_max_ratio: see crop_cat_max.
    pseudo_dir: labels from pseudo_dir/<item_name>.png (class indices of `space`, no mapping).
    recrop_pixels: with (index, draw, cls) keys (Rare Class Sampling), re-crop until cls has more pixels.
    list_file: train on the paths listed there (data_lists/ format; a folder's relative to images/<split>/).
    img_suffix / label_suffix (folder datasets): default any of .png/.jpg/.jpeg and .png (or classes.json's).
    batch_size: the training batch; above 1 without a crop, items must share one size (check_batchable:
    no --random-scale, and a folder at native size must hold images of one size).
    Every listed file must exist (check_files_exist) and a split must hold at least one image.
    """
    names, lines = list_entries(list_file, name) if list_file else (None, None)
    if name in toy.DOMAINS:
        if split not in toy.SPLIT_LENGTHS:
            raise UserError(f"--split {split!r}: the toy datasets have splits {', '.join(toy.SPLIT_LENGTHS)}")
        if labeled and not pseudo_dir and space is not None:
            check_same_classes(space, name, None)  # its labels are trainIds: a folder's classes cannot read them
        return ToyDataset(name, split, labeled=labeled, crop=crop, augment=augment, seed=seed,
                          pseudo_dir=pseudo_dir, cat_max_ratio=cat_max_ratio, recrop_pixels=recrop_pixels,
                          num_classes=space.num_classes if space is not None else None)
    if name not in FOLDERS:
        raise UserError(f"dataset {name!r}: unknown (expected one of {', '.join(DATASET_NAMES)})")
    if root is None:
        root = dataset_root(name, None)
    classes, label_key = None, None
    if name == FOLDER:
        # pseudo-labels replace the folder's labels: then its classes.json is not needed to read them
        classes, img_suffix, label_suffix = folder_options(root, img_suffix, label_suffix,
                                                           labeled and not pseudo_dir, None if pseudo_dir else space)
        label_key = json.dumps([classes["classes"], sorted((classes["label_map"] or {}).items())]) if classes else None
    label_suffix = label_suffix or FOLDER_LABEL_SUFFIX
    if pseudo_dir and labeled:
        items = dataset_items(name, split, root, False, names, img_suffix, label_suffix)
        check_pseudo_labels(pseudo_dir, [n for _, _, n in items])
        items = [(image, os.path.join(pseudo_dir, n + ".png"), n) for image, _, n in items]
        reader = LabelReader("pseudo", num_classes=space.num_classes)
    else:
        items = dataset_items(name, split, root, labeled, names, img_suffix, label_suffix)
        reader = label_reader(name, space, classes) if labeled else None
    if not items:
        raise UserError(f"{name} {split}: no images under {root} (expected {layout(name)})")
    if size == "default":
        size = None if pseudo_dir else default_train_size(name)
    dataset = FileDataset(name, split, items, reader, augment=augment, seed=seed, size=size, scale_range=scale_range,
                          crop=crop, cat_max_ratio=cat_max_ratio, recrop_pixels=recrop_pixels, root=root,
                          list_file=list_file, lines=lines, label_key=label_key)
    check_files_exist(dataset)
    if augment and crop is None and batch_size > 1:
        check_batchable(dataset, batch_size)
    return dataset


def train_options(args, side):
    """build_dataset keywords of train.py's training streams from its flags (side: 'source' or 'target'):
    --cat-max-ratio, --random-scale, --<side>-size, --<side>-list, --batch-size, and for the source
    --pseudo-dir and the RCS re-crop threshold. Any flag may be absent from `args`."""
    from uda.common import parse_size
    options = {"cat_max_ratio": getattr(args, "cat_max_ratio", 1.0), "batch_size": getattr(args, "batch_size", 1)}
    scale = getattr(args, "random_scale", None)
    if scale:
        if not 0 < scale[0] <= scale[1]:
            raise UserError(f"--random-scale {scale[0]} {scale[1]}: expected 0 < MIN <= MAX")
        options["scale_range"] = tuple(scale)
    size = getattr(args, f"{side}_size", None)
    if size:
        options["size"] = None if size == "native" else parse_size(size, f"--{side}-size")
    list_file = getattr(args, f"{side}_list", None)
    if list_file:
        options["list_file"] = list_file
    if side == "source":
        options["pseudo_dir"] = getattr(args, "pseudo_dir", None)
        if getattr(args, "source_sampler", "uniform") == "rcs":
            options["recrop_pixels"] = args.rcs_min_pixels * args.rcs_min_crop_ratio
    return options


def default_target(source):
    """The adaptation target that goes with a source: gta5/synthia -> cityscapes, toy-synth -> toy-real;
    a (pseudo-labelled) Cityscapes or toy-real source is evaluated on its own val split. Cross-City
    targets are always named (--target crosscity-rome, ...)."""
    return {"toy-synth": "toy-real", "toy-real": "toy-real", "gta5": "cityscapes",
            "synthia": "cityscapes", "cityscapes": "cityscapes"}.get(source)


def default_crop(name):
    """(width, height) of training crops when --crop is not given: the toy's 128x64; None for real data
    (FADA/SDCA train on the whole resized image; DAFormer/DIDA pass --crop 512x512)."""
    if name in toy.DOMAINS:
        return TOY_CROP
    return None


def default_train_size(name):
    """The papers' training resize (width, height): GTA5 1280x720, SYNTHIA 1280x760, Cityscapes and
    Cross-City 1024x512; None = keep the image's size (the toy)."""
    return {"gta5": (1280, 720), "synthia": (1280, 760), "cityscapes": (1024, 512),
            **{name: (1024, 512) for name in CROSSCITY_CITIES}}.get(name)


def default_eval_size(name):
    """(width, height) evaluation input size of a dataset; None = the images' own size.

    Cityscapes val: 1024x512 in, logits upsampled to the 2048x1024 label (the de-facto protocol);
    Cross-City test: the same (its images are 2048x1024 too); GTA5 / SYNTHIA: their training sizes.
    """
    if name in toy.DOMAINS:
        return None
    return default_train_size(name)


# --------------------------------------------------------------------------------------------------
# Command line: check a copy of a dataset, write data lists
# --------------------------------------------------------------------------------------------------
def check_space(name, synthia_classes, classes=None):
    """The label space a `check` histogram is drawn in; a folder's from its classes.json record `classes`
    (None: an unlabelled folder without classes.json, no histogram)."""
    if name == FOLDER:
        return folder_space(classes) if classes is not None else None
    if name == "synthia":
        return SYNTHIA_16 if synthia_classes == 16 else SYNTHIA_19
    return CROSSCITY_19 if name in CROSSCITY_CITIES else CITYSCAPES_19


def check_images(chosen, reader):
    """Decode the chosen (image, label, name) items: (pixel histogram (256,), unreadable, size mismatches,
    16-bit grayscale images). Nothing raises: every broken file is reported with its reason. Sizes are
    compared as the training reads the pair: both turned upright by their EXIF orientation."""
    pixels = np.zeros(256, dtype=np.int64)
    unreadable, mismatched, gray16 = [], [], []
    for image_path, label_path, _ in chosen:
        try:
            mode = probe_image(image_path)[0]
            image = read_image(image_path)  # a full decode: truncated files fail here
            image_size = (image.shape[1], image.shape[0])  # (width, height), upright
        except UserError as err:
            unreadable.append(str(err))
            continue
        if mode in GRAY16_MODES:
            gray16.append(image_path)
        if label_path is None:
            continue
        try:
            label = reader(label_path)
        except UserError as err:
            unreadable.append(str(err))
            continue
        if (label.shape[1], label.shape[0]) != image_size:
            mismatched.append(f"{os.path.basename(image_path)}: image {image_size[0]}x{image_size[1]}, "
                              f"label {label.shape[1]}x{label.shape[0]}")
        pixels += np.bincount(label.ravel(), minlength=256)
    return pixels, unreadable, mismatched, gray16


def check(name, root, split=None, full=False, sample=50, synthia_classes=16, out=print, img_suffix=None,
          label_suffix=None):
    """Count, open and decode a dataset copy; returns the JSON-able report (see the README)."""
    if name not in FOLDERS:
        raise UserError(f"dataset {name!r}: unknown (expected one of {', '.join([*REAL_DATASETS, FOLDER])})")
    split = split or ("val" if name in CROSSCITY_CITIES else "train")
    if split not in SPLITS[name]:
        raise UserError(f"--split {split!r}: {name} has splits {', '.join(SPLITS[name])}")
    labeled = has_labels(name, split, root)
    classes = None
    if name == FOLDER:
        require_dir(root, name, "the dataset folder")
        classes, img_suffix, label_suffix = folder_options(root, img_suffix, label_suffix, labeled, None)
    space = check_space(name, synthia_classes, classes)
    items = dataset_items(name, split, root, labeled, img_suffix=img_suffix,
                          label_suffix=label_suffix or FOLDER_LABEL_SUFFIX)
    missing = missing_files(items)
    absent = set(missing)
    images = sum(image not in absent for image, _, _ in items)
    labels = sum(label is not None and label not in absent for _, label, _ in items)
    expected = EXPECTED.get((name, split))
    complete = [item for item in items if item[0] not in absent and item[1] not in absent]
    chosen = complete if full or len(complete) <= sample else \
        [complete[i] for i in np.linspace(0, len(complete) - 1, sample).round().astype(int)]
    reader = label_reader(name, space, classes) if labeled else None
    pixels, unreadable, mismatched, gray16 = check_images(chosen, reader)
    num_classes = space.num_classes if space is not None else 0
    class_pixels = {int(c): int(pixels[c]) for c in range(num_classes)}
    class_pixels[IGNORE_INDEX] = int(pixels[IGNORE_INDEX])
    report = {"dataset": name, "split": split, "root": root, "expected": expected, "listed": len(items),
              "images": images, "labels": labels, "missing": missing, "unreadable": unreadable,
              "size_mismatches": mismatched, "gray16_images": gray16, "checked": len(chosen),
              "class_pixels": class_pixels, "classes": space.names if space is not None else None}
    print_report(report, labeled, space, pixels, full, out)
    return report


def print_report(report, labeled, space, pixels, full, out):
    """The human-readable form of check()'s report."""
    name, items, expected, missing = report["dataset"], report["listed"], report["expected"], report["missing"]
    out(f"{name} {report['split']} at {report['root']}")
    exp = f" (expected {expected})" if expected else ""
    out(f"  images: {report['images']} of {items} listed{exp}")
    if labeled:
        out(f"  labels: {report['labels']} of {items} listed")
    elif name == FOLDER:
        out(f"  labels: none (no labels/{report['split']}/ folder: usable as an unlabelled target)")
    if missing:
        out(f"  MISSING {len(missing)} files: " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
        hint = case_hint(missing, name)
        if hint:
            out(f"  HINT: {hint[2:-1]}")
    if expected and items != expected:
        out(f"  WARNING: {items} listed, a complete copy has {expected}")
    for text in report["unreadable"][:10]:
        out(f"  UNREADABLE {text}")
    if report["size_mismatches"]:
        out(f"  {len(report['size_mismatches'])} image/label size mismatches (sizes as displayed, after EXIF "
            f"orientation; labels are resized to the image, nearest): " + "; ".join(report["size_mismatches"][:5]))
    if report["gray16_images"]:
        out(f"  NOTE: {len(report['gray16_images'])} images are 16-bit grayscale (read as 8-bit gray, value / 257), "
            f"e.g. {report['gray16_images'][0]}")
    total = int(pixels.sum())
    if labeled and total:
        kind = "class index" if space.trainids != list(range(len(space.trainids))) or not space.has_trainids \
            else "trainId"
        out(f"  label pixels over {report['checked']} {'' if full else 'sampled '}labels, by {kind}:")
        width = max(14, *(len(n) for n in space.names))
        for c in range(space.num_classes):
            out(f"    {c:3d} {space.names[c]:<{width}} {100.0 * pixels[c] / total:6.2f} %")
        out(f"    255 {'ignore':<{width}} {100.0 * pixels[IGNORE_INDEX] / total:6.2f} %")
        if pixels[IGNORE_INDEX] > 0.9 * total:
            out("  WARNING: over 90% of the label pixels are ignore (255): wrong folder, or labels decoded wrong "
                "(e.g. SYNTHIA labels converted to 8 bits, which turns every class id into 0)")
    out("  OK" if not report_problems(report) else "  PROBLEMS found (see above)")


def report_problems(report):
    """Whether check()'s report shows a broken copy (exit status 1): missing, unreadable, wrong count."""
    return bool(report["missing"] or report["unreadable"] or
                (report["expected"] is not None and report["listed"] != report["expected"]))


def refuse_output(path, overwrite, root=None, flag="--out"):
    """Nothing a user made is overwritten, and nothing is written into a dataset folder."""
    if root is not None:
        inside = os.path.realpath(os.path.abspath(path))
        dataset = os.path.realpath(root)
        if os.path.commonpath([inside, dataset]) == dataset:
            raise UserError(f"{flag} {path}: inside the dataset folder {root}; write it elsewhere (a dataset "
                            f"folder is never written to)")
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{flag} {path}: already exists; pass --overwrite to replace it")


def write_text(path, text):
    """Write `text` atomically: a crash never leaves half a list where a whole one was."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_list(name, root, split, out_path, overwrite=False, img_suffix=None):
    """Write the data list of a split (from ROOT, or the naming rule of GTA5/SYNTHIA); returns its length."""
    refuse_output(out_path, overwrite, root)
    names = rule_list(name) if root is None else folder_list(name, split, root, img_suffix)
    if not names:
        raise UserError(f"lists {name}: no images found for split {split} under {root} (expected {layout(name)})")
    write_text(out_path, "".join(n + "\n" for n in names))
    return len(names)



# --------------------------------------------------------------------------------------------------
# Writing PNGs (evaluate.py --save-pred, --save-pseudo)
# --------------------------------------------------------------------------------------------------
def temporary_name(path):
    """A hidden name beside `path` for writing it: short (the final name may be near the file system's
    limit) and one per process (ranks write side by side)."""
    return os.path.join(os.path.dirname(path), f".evaluate-{os.getpid()}.tmp")


def write_png(path, array, flag):
    """Write the uint8 array (H, W) or (H, W, 3) as a PNG at `path`, atomically: into a temporary file
    that is renamed over `path` once complete, and removed on any failure or interrupt, so nothing
    half-written is left for a reader (or the next stage) to find. A file that cannot be written
    (read-only folder, full disk, name too long) is one line naming it and `flag`."""
    tmp = temporary_name(path)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            Image.fromarray(array).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError):
            raise UserError(f"{flag}: cannot write {path} ({err.strerror or err})") from None
        raise

def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m uda.datasets", description="Check a dataset copy or write lists.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="count, open and decode a dataset copy; print a class histogram")
    c.add_argument("name", choices=[*REAL_DATASETS, FOLDER])
    c.add_argument("root", help="the dataset's folder, e.g. /data/gta5 or /data/crosscity/Rome")
    c.add_argument("--split", default=None, help="split to check (default: train; val for Cross-City)")
    c.add_argument("--full", action="store_true", help="decode every label (default: a sample)")
    c.add_argument("--sample", type=common.positive_int, default=50, help="labels decoded for the histogram without --full")
    c.add_argument("--synthia-classes", type=int, choices=[16, 19], default=16, help="SYNTHIA histogram space")
    c.add_argument("--img-suffix", default=None, help="folder: image suffix (default: .png, .jpg or .jpeg)")
    c.add_argument("--label-suffix", default=None, help="folder: label suffix (default: .png)")
    c.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --json FILE")
    ls = sub.add_parser("lists", help="write a data list (one relative path per line)")
    ls.add_argument("name", choices=[*REAL_DATASETS, FOLDER])
    ls.add_argument("root", nargs="?", default=None,
                    help="dataset folder to list (optional for gta5/synthia: their naming rule)")
    ls.add_argument("--split", default="train", help="split (default: train)")
    ls.add_argument("--out", default=None,
                    help="output file (default: data_lists/NAME/SPLIT.txt; required for folder); never inside ROOT")
    ls.add_argument("--img-suffix", default=None, help="folder: image suffix (default: .png, .jpg or .jpeg)")
    ls.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    if args.command == "check":
        if args.json:
            refuse_output(args.json, args.overwrite, args.root, flag="--json")
        report = check(args.name, args.root, args.split, args.full, args.sample, args.synthia_classes,
                       img_suffix=args.img_suffix, label_suffix=args.label_suffix)
        if args.json:
            write_text(args.json, json.dumps(report, indent=1))
        sys.exit(1 if report_problems(report) else 0)
    if args.root is None and args.name not in ("gta5", "synthia"):
        raise UserError(f"lists {args.name}: pass the dataset folder (its list follows from the folder)")
    if args.split not in SPLITS[args.name]:
        raise UserError(f"--split {args.split!r}: {args.name} has splits {', '.join(SPLITS[args.name])}")
    if args.out is None and args.name == FOLDER:
        raise UserError("lists folder: pass --out FILE (a folder dataset has no list in data_lists/, which names "
                        "the benchmarks)")
    out_path = args.out or os.path.join(LISTS_DIR, args.name, f"{args.split}.txt")
    count = write_list(args.name, args.root, args.split, out_path, args.overwrite, args.img_suffix)
    print(f"wrote {count} names to {out_path}")


if __name__ == "__main__":
    from uda.common import run_cli
    run_cli(main)
