"""Write a tiny folder dataset (mmsegmentation's layout) for the tests and the README's worked example.

    python tests/make_folder_dataset.py OUT_DIR [--unlabelled] [--jpg] [--style synth|real] [--seed N]

OUT_DIR/images/{train,val}/<nested folders>/<name>.png|jpg, OUT_DIR/labels/{train,val}/.../<name>.png
(single-channel class indices, a 2-pixel ignored (255) frame) and OUT_DIR/classes.json with four
classes and their palette. The scenes are toy street views drawn with numpy: sky above a horizon,
road below it, buildings standing on the horizon, cars on the road. Images have odd sizes (333x177,
257x129, ...) and live in nested sub-folders, so readers cannot get away with assuming either.

--style synth: flat colours; --style real: another palette, per-pixel noise and a lighting gradient,
so that `--source folder` (synth) -> `--target folder` (real) has a domain gap to adapt across.
--unlabelled: no labels/ folder at all (an unlabelled adaptation target; classes.json is still written
so the target's classes can be checked against the source's). --jpg: images as JPEG.
`make(out_dir, label_map=True)` (tests) stores raw ids 10/20/30/40 in the labels plus an unmapped 99,
and classes.json maps them with a "label_map".

Only numpy and Pillow: the script can be copied and run alone. An OUT_DIR that holds anything is
refused (nothing a user made is overwritten).
"""
import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

CLASSES = ["sky", "road", "building", "car"]
PALETTE = [(70, 130, 180), (128, 64, 128), (70, 70, 70), (0, 0, 142)]  # Cityscapes colours of the classes
SKY, ROAD, BUILDING, CAR = range(len(CLASSES))
IGNORE = 255
RAW_IDS = [10, 20, 30, 40]  # label_map mode: raw id of each class; RAW_UNMAPPED has no entry -> ignored
RAW_UNMAPPED = 99
# (width, height): odd on purpose, and one portrait image
SIZES = [(333, 177), (257, 129), (190, 301), (401, 223)]
# nested sub-folders of every split, used round robin
SUBFOLDERS = ["city_a", os.path.join("city_b", "street_1"), os.path.join("city_b", "street_2")]
# scene colours per style: how the pixels of each class look (not the palette of the predictions)
STYLE_COLOURS = {"synth": [(90, 150, 230), (110, 110, 110), (180, 120, 90), (200, 30, 30)],
                 "real": [(170, 190, 200), (60, 60, 70), (120, 110, 100), (40, 60, 160)]}
FRAME = 2  # pixels of ignored frame around every label


class MakeError(Exception):
    """Bad arguments or an occupied output folder; the script prints it as one line, exit code 2."""


def draw_scene(width, height, rng):
    """(H, W) uint8 class indices of one street scene, with an ignored frame."""
    label = np.full((height, width), SKY, dtype=np.uint8)
    horizon = int(height * rng.uniform(0.35, 0.55))
    label[horizon:] = ROAD
    for _ in range(int(rng.integers(2, 5))):  # buildings standing on the horizon
        left = int(rng.integers(0, width - 10))
        right = min(width, left + int(rng.integers(width // 8, width // 3)))
        top = int(rng.integers(FRAME, max(FRAME + 1, horizon - 5)))
        label[top:horizon, left:right] = BUILDING
    for _ in range(int(rng.integers(1, 4))):  # cars on the road, lower = larger
        bottom = int(rng.integers(horizon + 8, height))
        car_h = max(4, (bottom - horizon) // 3)
        car_w = min(width - 1, car_h * 2)
        left = int(rng.integers(0, width - car_w))
        label[bottom - car_h:bottom, left:left + car_w] = CAR
    label[:FRAME], label[-FRAME:], label[:, :FRAME], label[:, -FRAME:] = IGNORE, IGNORE, IGNORE, IGNORE
    return label


def render(label, style, rng):
    """(H, W, 3) uint8 image of a label: the style's class colours (black where ignored)."""
    colours = np.zeros((256, 3), dtype=np.float64)
    colours[:len(CLASSES)] = STYLE_COLOURS[style]
    image = colours[label]  # (H, W, 3)
    if style == "real":
        height, width = label.shape
        gradient = np.linspace(0.7, 1.2, width)[None, :, None]  # (1, W, 1): light from the right
        image = image * gradient + rng.normal(0.0, 12.0, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def check_out_dir(out_dir):
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise MakeError(f"{out_dir}: exists and is not an empty folder (nothing is overwritten; pick a new path)")


def make(out_dir, unlabelled=False, jpg=False, style="synth", seed=0, train=8, val=4, label_map=False):
    """Write the dataset into out_dir (new or empty); returns {split: [item names]} (relative, no suffix)."""
    if style not in STYLE_COLOURS:
        raise MakeError(f"--style {style!r}: expected one of {', '.join(STYLE_COLOURS)}")
    if train < 1 or val < 0:
        raise MakeError(f"--train {train} / --val {val}: expected at least one train image and val >= 0")
    check_out_dir(out_dir)
    rng = np.random.default_rng(seed)
    suffix = ".jpg" if jpg else ".png"
    raw_of = np.full(256, IGNORE, dtype=np.uint8)  # class index -> stored value
    raw_of[:len(CLASSES)] = RAW_IDS if label_map else range(len(CLASSES))
    if label_map:
        raw_of[IGNORE] = RAW_UNMAPPED  # an id classes.json does not map: must come back as 255
    names = {}
    for split, count in (("train", train), ("val", val)):
        names[split] = []
        for i in range(count):
            width, height = SIZES[i % len(SIZES)]
            name = os.path.join(SUBFOLDERS[i % len(SUBFOLDERS)], f"{split}_{i:04d}")
            label = draw_scene(width, height, rng)
            save(os.path.join(out_dir, "images", split, name + suffix), render(label, style, rng))
            if not unlabelled:
                save(os.path.join(out_dir, "labels", split, name + ".png"), raw_of[label])
            names[split].append(name)
    classes = {"classes": CLASSES, "palette": [list(c) for c in PALETTE]}
    if label_map:
        classes["label_map"] = {str(raw): index for index, raw in enumerate(RAW_IDS)}
    with open(os.path.join(out_dir, "classes.json"), "w") as f:
        json.dump(classes, f, indent=1)
    return names


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".jpg"):
        Image.fromarray(array).save(path, quality=95)  # little JPEG damage: the scene stays recognisable
    else:
        Image.fromarray(array).save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="new (or empty) folder to write the dataset into")
    p.add_argument("--unlabelled", action="store_true", help="write no labels/ folder (an unlabelled target)")
    p.add_argument("--jpg", action="store_true", help="images as .jpg instead of .png")
    p.add_argument("--style", default="synth", help="synth (flat colours) or real (other colours, noise, light)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the scenes")
    p.add_argument("--train", type=int, default=8, help="train images")
    p.add_argument("--val", type=int, default=4, help="val images")
    args = p.parse_args(argv)
    try:
        names = make(args.out_dir, args.unlabelled, args.jpg, args.style, args.seed, args.train, args.val)
    except MakeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    labels = "no labels" if args.unlabelled else "labels"
    print(f"wrote {len(names['train'])} train and {len(names['val'])} val images ({labels}, {args.style}) and "
          f"classes.json to {args.out_dir}")


if __name__ == "__main__":
    main()
