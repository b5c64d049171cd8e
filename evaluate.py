"""Evaluate a checkpoint on a labelled split (per-class IoU, mIoU), or predict a folder of images.

    python evaluate.py --ckpt runs/toy/last.pt --target toy-real
    python evaluate.py --ckpt runs/gta/last.pt --target cityscapes --data-root /data --json runs/gta/eval.json
    python evaluate.py --ckpt runs/gta/last.pt --target cityscapes --data-root /data --scales 0.75 1.0 1.25 --flip
    python evaluate.py --ckpt runs/daformer/last.pt --data-root /data --slide 1024x1024 --slide-stride 768x768
    python evaluate.py --ckpt runs/gta/last.pt --images photos/ --save-pred photos-pred/

Evaluation (uda/evaluation.py): each image is resized to --input-size (bicubic; default: the dataset's
convention, e.g. 1024x512 for Cityscapes), logits are upsampled bilinearly to the label resolution with
the checkpoint's align_corners, argmax, and one confusion matrix is accumulated over the whole split
(summed over ranks under torchrun). mIoU is reported over every class subset of the model's label space
(19; 16 and 13 for SYNTHIA-trained models; 13 for Cross-City). train.py's periodic evaluation calls the
same functions, always single scale.

Test-time protocols: --scales multiplies the input size (each scale one view), --flip adds the mirrored
views; softmax probabilities of all views are averaged at the label resolution. --slide WxH predicts
windows of the (scaled) input with --slide-stride steps (mmsegmentation's slide mode: the last window
is shifted back to the border, a window larger than the image is clipped to it, overlapping logits are
averaged). A method's own test-time prediction (PLCA's test-time aggregation, --tta-aggregate) combines
with --scales and --flip (each view predicted on its own), not with --slide; a method whose official
code resizes logits to the input size before the label size (DAFormer, DIDA: mmseg) is evaluated so.
Both come from the checkpoint's method module (uda/source_only.py's contract), never from its name.
The header line and --json record the protocol.

Folder inference (--images DIR --save-pred OUT): every .png/.jpg/.jpeg under DIR (sub-folders too,
sorted) is resized like the checkpoint's target (--input-size overrides) and predicted at its own size;
per image OUT/<path without suffix>.png (class indices, uint8), <...>_color.png (the label space's
palette) and <...>_overlay.png (the colours blended 50/50 over the image) are written.

Outputs are never clobbered: --json, --save-pred and --save-pseudo refuse an existing file or a
non-empty folder unless --overwrite is given (files of the same name are then replaced, others kept),
and never write inside the dataset folder being read (nor inside --images), even with --overwrite.
A checkpoint is refused on a target whose labels are another label space than its model's (toy vs
benchmark, a folder dataset with other classes).
"""
import argparse
import functools
import json
import os

import numpy as np
import torch
from PIL import Image

from uda import common, datasets, pseudo_labels, toy
from uda.common import UserError
from uda.methods import METHODS
from uda.evaluation import evaluate, format_table, model_from_checkpoint, predict_probs, progress, summarize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # --images: matched case-insensitively
OVERLAY_ALPHA = 0.5                         # weight of the class colours in <name>_overlay.png


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default after its help (flags without a value
    by default, None or False, explain what they do when absent in their help instead)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def size_arg(text):
    """argparse type: 'WxH' -> (width, height)."""
    try:
        return common.parse_size(text, "size")
    except UserError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 1024x512") from None


def input_size_arg(text):
    """argparse type: 'WxH' -> (width, height), or 'native' (the images' own size)."""
    return "native" if text == "native" else size_arg(text)


def build_parser():
    p = common.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (OUT/last.pt)")
    p.add_argument("--target", default=None, choices=datasets.DATASET_NAMES, metavar="NAME",
                   help="dataset to evaluate on, one of: %(choices)s (default: the checkpoint's target)")
    p.add_argument("--data-root", default=None, help="folder holding one sub-folder per dataset")
    p.add_argument("--target-root", default=None, metavar="DIR",
                   help="the evaluated dataset's own folder (e.g. a folder dataset); wins over --data-root")
    p.add_argument("--split", default="val", help="split to evaluate (needs labels)")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="instead of evaluating, predict every .png/.jpg/.jpeg under DIR (no labels) into --save-pred")
    p.add_argument("--input-size", type=input_size_arg, default=None, metavar="WxH|native",
                   help="size the images are resized to before the forward (default: the dataset's convention, "
                        "e.g. 1024x512 for Cityscapes, the toy's own 256x128; --images: the checkpoint's target's)")
    p.add_argument("--batch-size", type=common.positive_int, default=1, help="images per forward pass")
    p.add_argument("--workers", type=common.nonnegative_int, default=2, help="data loader worker processes")
    p.add_argument("--amp", choices=list(common.AMP_DTYPES), default="off", help="autocast dtype for the forward")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", default=None, metavar="FILE",
                   help='write {"miou", "classes", "per_class", "scores", "protocol", ...} to this file')
    p.add_argument("--save-pred", default=None, metavar="DIR",
                   help="write the predictions here: <name>_trainid.png and <name>_color.png per evaluated image; "
                        "with --images <name>.png (class indices), <name>_color.png and <name>_overlay.png")
    p.add_argument("--overwrite", action="store_true",
                   help="let --json replace a file and --save-pred / --save-pseudo write into a non-empty folder")
    group = p.add_argument_group("test-time protocol")
    group.add_argument("--scales", type=common.positive_float, nargs="+", default=[1.0], metavar="S",
                       help="multi-scale testing: multiply the input size by each S, average the probabilities")
    group.add_argument("--flip", action="store_true", help="also predict the mirrored images, average the probabilities")
    group.add_argument("--slide", type=size_arg, default=None, metavar="WxH",
                       help="sliding-window inference with windows of WxH over the resized input (default: whole image)")
    group.add_argument("--slide-stride", type=size_arg, default=None, metavar="WxH",
                       help="step of the --slide windows, at most the window (default: the window, no overlap)")
    group.add_argument("--tta-aggregate", choices=["auto", "on", "off"], default="auto",
                       help="the method's own test-time prediction (PLCA: aggregation of features and "
                            "probabilities before the argmax, uda/plca.py); auto = on for checkpoints of a "
                            "method that has one, as in PLCA's official test configs")
    pseudo_labels.add_arguments(p)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_combinations(args)
    pseudo_labels.check_flags(args.pseudo_rule, args.pseudo_cap, args.pseudo_bins, args.pseudo_limit)
    return args


def check_combinations(args):
    """Flags that do not go together, refused before anything is loaded."""
    if args.slide_stride and not args.slide:
        raise UserError("--slide-stride: needs --slide WxH (the window it steps)")
    if args.slide_stride and any(s > w for s, w in zip(args.slide_stride, args.slide)):
        raise UserError(f"--slide-stride {args.slide_stride[0]}x{args.slide_stride[1]}: must not exceed the window "
                        f"--slide {args.slide[0]}x{args.slide[1]} (pixels between windows would get no prediction)")
    if args.images:
        for flag, given in (("--target", args.target), ("--json", args.json), ("--save-pseudo", args.save_pseudo)):
            if given:
                raise UserError(f"{flag}: not with --images (a folder without labels is predicted, not scored)")
        if not args.save_pred:
            raise UserError(f"--images {args.images}: pass --save-pred OUT, the folder the predictions go to")
        if args.batch_size != 1:
            raise UserError(f"--batch-size {args.batch_size}: --images predicts one image at a time (sizes differ)")
    if args.save_pseudo:
        if args.json or args.save_pred:
            raise UserError(f"--save-pseudo: labels the train split instead of evaluating; drop "
                            f"{'--json' if args.json else '--save-pred'}")
        if args.scales != [1.0] or args.flip or args.slide:
            raise UserError("--save-pseudo: pseudo-labels use the single-scale protocol of FADA and SDCA; drop "
                            "--scales, --flip and --slide")


# --------------------------------------------------------------------------------------------------
# Safety: never clobber an output, never write into a dataset, never score another label space
# --------------------------------------------------------------------------------------------------
def inside(path, folder):
    """True when `path` is `folder` or lies under it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def check_output(flag, path, is_file, overwrite, reading):
    """Refuse an output that would clobber something. reading: [(what, path)] being read (dataset
    folders, --images, the checkpoint), which no output may be in, even with --overwrite; nor may an
    output folder hold a folder being read (its outputs could land on the dataset's files)."""
    for what, source in reading:
        if source and inside(path, source):
            raise UserError(f"{flag} {path}: inside {what} {source}, which is being read; write elsewhere "
                            f"(--overwrite does not allow this)")
        if source and not is_file and os.path.isdir(source) and inside(source, path):
            raise UserError(f"{flag} {path}: holds {what} {source}, which is being read; write elsewhere "
                            f"(--overwrite does not allow this)")
    if is_file and os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a folder; expected a file name")
    if is_file and os.path.exists(path) and not overwrite:
        raise UserError(f"{flag} {path}: exists; pass --overwrite to replace it")
    if not is_file and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a file; expected a folder")
    if not is_file and os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise UserError(f"{flag} {path}: folder is not empty; pass --overwrite to write into it "
                        f"(files of the same name are replaced)")


def check_outputs(args, reading):
    reading = [*reading, ("--ckpt", args.ckpt)]
    for flag, path, is_file in (("--json", args.json, True), ("--save-pred", args.save_pred, False),
                                ("--save-pseudo", args.save_pseudo, False)):
        if path:
            check_output(flag, path, is_file, args.overwrite, reading)


def label_kind(name):
    """What a dataset's label files hold: the toy's classes, Cityscapes classes (every benchmark) or a
    folder dataset's own (its classes.json)."""
    if name in toy.DOMAINS:
        return "the toy's"
    return "a classes.json's" if name == getattr(datasets, "FOLDER", None) else "Cityscapes"


def target_root(args, saved, space, target, split):
    """The folder of the target being read (None for the toy), once its labels are known to be in the
    label space the checkpoint's model predicts.

    The toy and the benchmarks never mix (both are indexed by Cityscapes trainIds, so nothing else would
    notice). A 16-class SYNTHIA model on Cityscapes is the benchmark protocol and passes; a folder target
    must list the model's classes (datasets.check_same_classes).
    """
    source = getattr(saved, "source", None)
    model_kind, target_kind = label_kind(source), label_kind(target)
    if (source in toy.DOMAINS) != (target in toy.DOMAINS):
        raise UserError(f"--target {target}: its labels are {target_kind} classes, but the checkpoint's model was "
                        f"trained on {source} ({model_kind} classes, {space.num_classes} outputs); evaluate it on "
                        f"a dataset of its own label space")
    root = args.target_root or datasets.checkpoint_root(target, args.data_root, saved)
    if source not in toy.DOMAINS:
        datasets.check_same_classes(space, target, root)
    if split is not None and not datasets.has_labels(target, split, root):
        raise UserError(f"--split {split}: {target} has no labels for it to be scored against (predict its images "
                        f"with --images DIR --save-pred OUT)")
    return root


def barrier():
    """Every rank has passed its checks before any rank writes (a rank's first file must not make the
    non-empty check of a slower rank fail)."""
    if common.is_distributed():
        torch.distributed.barrier()


# --------------------------------------------------------------------------------------------------
# The protocol, as printed and as recorded in --json
# --------------------------------------------------------------------------------------------------
def resolve_input_size(args, dataset_name):
    if args.input_size == "native":
        return None
    return args.input_size or datasets.default_eval_size(dataset_name)


def protocol_record(args, input_size, aggregate, align_corners, resize_via_input=False):
    return {"scales": list(args.scales), "flip": args.flip,
            "slide": list(args.slide) if args.slide else None,
            "slide_stride": list(args.slide_stride or args.slide) if args.slide else None,
            "input_size": f"{input_size[0]}x{input_size[1]}" if input_size else "native",
            "align_corners": align_corners, "tta_aggregate": aggregate, "resize_via_input": resize_via_input}


def describe_protocol(protocol, tta_flag):
    slide = "off" if protocol["slide"] is None else \
        "{}x{} stride {}x{}".format(*protocol["slide"], *protocol["slide_stride"])
    return (f"input {protocol['input_size']}, scales {' '.join(str(s) for s in protocol['scales'])}, "
            f"flip {'on' if protocol['flip'] else 'off'}, slide {slide}, align_corners {protocol['align_corners']}, "
            f"test-time aggregation {'on' if protocol['tta_aggregate'] else 'off'} ({tta_flag})"
            + (", logits resized to the input size, then the labels'" if protocol["resize_via_input"] else ""))


def method_module(saved):
    """The module of the checkpoint's method (None: a method this copy of the code does not have)."""
    return METHODS.get(getattr(saved, "method", None))


def test_time_predict_of(args, saved):
    """The checkpoint's method's own test-time prediction (its module's `test_time_predict`), or None:
    --tta-aggregate auto and on use it, off (and a method without one under auto) predicts plainly."""
    predict = getattr(method_module(saved), "test_time_predict", None)
    if args.tta_aggregate == "on" and predict is None:
        raise UserError(f"--tta-aggregate on: the checkpoint's method ({getattr(saved, 'method', None)}) has no "
                        f"test-time prediction of its own (use --tta-aggregate auto or off)")
    if args.tta_aggregate == "off":
        return None
    if predict is not None and args.slide:
        raise UserError(f"--slide: the test-time prediction of {saved.method} (--tta-aggregate {args.tta_aggregate}) "
                        f"runs over the whole image, not a window; pass --tta-aggregate off to slide")
    return predict


def resize_via_input_of(saved):
    """Whether the checkpoint's method evaluates as mmseg does: logits to the input size, then the labels'."""
    return getattr(method_module(saved), "RESIZE_VIA_INPUT", False)


def predictor(args, input_size, test_time_predict, align_corners, resize_via_input, device):
    """images (B, 3, H, W) -> probabilities (B, C, H, W) at label_size, with this run's protocol."""
    autocast = functools.partial(common.autocast, device, args.amp)  # a fresh context per forward

    def predict(model, images, label_size):
        return predict_probs(model, images, label_size, input_size, autocast, test_time_predict, align_corners,
                             args.scales, args.flip, args.slide, args.slide_stride, resize_via_input)
    return predict


def write_json(path, record):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def log_line(text):
    print(text, flush=True)


# --------------------------------------------------------------------------------------------------
# Saving predictions
# --------------------------------------------------------------------------------------------------
def palette_table(space):
    """(256, 3) uint8: row i = class i's colour (the space's own palette, else Cityscapes by trainId)."""
    colours = getattr(space, "palette", None) or [datasets.CITYSCAPES_PALETTE[t] for t in space.trainids]
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:len(colours)] = np.asarray(colours, dtype=np.uint8)
    return table


def prediction_saver(out_dir, dataset, space):
    """Callback writing <name>_trainid.png (Cityscapes trainIds) and <name>_color.png per image."""
    os.makedirs(out_dir, exist_ok=True)
    to_trainid = np.array(list(space.trainids) + [255] * (256 - space.num_classes), dtype=np.uint8)
    palette = palette_table(space)

    def save(pred, batch):
        for pred_one, index in zip(pred.cpu().numpy(), batch["index"].tolist()):
            stem = os.path.join(out_dir, dataset.item_name(index))
            os.makedirs(os.path.dirname(stem), exist_ok=True)
            Image.fromarray(to_trainid[pred_one]).save(stem + "_trainid.png")
            Image.fromarray(palette[pred_one]).save(stem + "_color.png")

    return save


# --------------------------------------------------------------------------------------------------
# Folder inference
# --------------------------------------------------------------------------------------------------
def find_images(folder):
    """Paths relative to `folder` of every .png/.jpg/.jpeg under it (any depth, any case), sorted."""
    if not os.path.isdir(folder):
        raise UserError(f"--images {folder}: no such folder")
    found = []
    for dirpath, _, files in os.walk(folder):
        found += [os.path.relpath(os.path.join(dirpath, f), folder) for f in files
                  if f.lower().endswith(IMAGE_SUFFIXES)]
    if not found:
        raise UserError(f"--images {folder}: no .png, .jpg or .jpeg file in it or its sub-folders")
    return sorted(found)


def output_stems(folder, names):
    """The output stem (relative path without suffix) of every image; two images that would write the
    same file (a.png and a.jpg, or a.png and a_color.png) are refused."""
    stems, owner = [], {}
    for name in names:
        stem = os.path.splitext(name)[0]
        for path in (stem, stem + "_color", stem + "_overlay"):
            if path in owner:
                raise UserError(f"--images {folder}: {owner[path]} and {name} would both write {path}.png; "
                                f"rename one")
            owner[path] = name
        stems.append(stem)
    return stems


class ImageFolder(torch.utils.data.Dataset):
    """The images of --images, at their own size: {'image': (3, H, W) in [0, 1], 'index'}."""

    def __init__(self, folder, names):
        self.folder, self.names = folder, names

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        image = datasets.read_image(os.path.join(self.folder, self.names[index]))  # (H, W, 3); broken: one line
        return {"image": datasets.to_tensors(image, None)[0], "index": index}


def save_folder_prediction(stem, pred, image, palette):
    """stem.png (class indices), stem_color.png and stem_overlay.png. pred: (H, W) uint8; image: (3, H, W)."""
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    colour = palette[pred]                                                          # (H, W, 3) uint8
    rgb = image.permute(1, 2, 0).numpy() * 255.0                                    # (H, W, 3)
    overlay = OVERLAY_ALPHA * colour + (1.0 - OVERLAY_ALPHA) * rgb
    Image.fromarray(pred).save(stem + ".png")
    Image.fromarray(colour).save(stem + "_color.png")
    Image.fromarray(np.clip(np.rint(overlay), 0, 255).astype(np.uint8)).save(stem + "_overlay.png")


def predict_folder(args, model, saved, space, device):
    names = find_images(args.images)
    stems = output_stems(args.images, names)
    check_outputs(args, [("--images", args.images)])
    input_size = resolve_input_size(args, getattr(saved, "target", None))
    test_time_predict = test_time_predict_of(args, saved)
    protocol = protocol_record(args, input_size, test_time_predict is not None,
                               bool(getattr(saved, "align_corners", False)), resize_via_input_of(saved))
    predict = predictor(args, input_size, test_time_predict, protocol["align_corners"],
                        protocol["resize_via_input"], device)
    barrier()
    if common.is_main_process():
        os.makedirs(args.save_pred, exist_ok=True)
        log_line(f"{args.ckpt}: predicting {len(names)} images under {args.images} into {args.save_pred} "
                 f"({describe_protocol(protocol, args.tta_aggregate)})")
    shard = common.shard(ImageFolder(args.images, names))
    # batch_size None: items one by one (the images differ in size)
    loader = torch.utils.data.DataLoader(shard, batch_size=None, num_workers=args.workers)
    meter = progress("predicted", len(shard), 0.05, log_line)
    palette = palette_table(space)
    model.eval()
    for item in loader:
        image = item["image"]                                                       # (3, H, W)
        probs = predict(model, image[None].to(device), image.shape[-2:])            # (1, C, H, W)
        pred = probs.argmax(1)[0].to(torch.uint8).cpu().numpy()                     # (H, W)
        save_folder_prediction(os.path.join(args.save_pred, stems[item["index"]]), pred, image, palette)
        meter.update(1)
    written = int(common.all_reduce_sum(torch.tensor([len(shard)], device=device)))
    if common.is_main_process():
        log_line(f"wrote the predictions of {written} images to {args.save_pred}")


# --------------------------------------------------------------------------------------------------
# Evaluation of a labelled split, pseudo-labels of a train split
# --------------------------------------------------------------------------------------------------
def evaluate_split(args, model, saved, space, target, device):
    root = target_root(args, saved, space, target, args.split)
    check_outputs(args, [("the dataset folder", root)])
    input_size = resolve_input_size(args, target)
    test_time_predict = test_time_predict_of(args, saved)
    align_corners = bool(getattr(saved, "align_corners", False))  # old checkpoints: the former default
    protocol = protocol_record(args, input_size, test_time_predict is not None, align_corners,
                               resize_via_input_of(saved))
    dataset = datasets.build_dataset(target, args.split, space, root=root, labeled=True)
    barrier()
    on_prediction = prediction_saver(args.save_pred, dataset, space) if args.save_pred else None
    if common.is_main_process():
        log_line(f"{args.ckpt} on {target} {args.split} ({len(dataset)} images, "
                 f"{describe_protocol(protocol, args.tta_aggregate)})")
    confusion = evaluate(model, dataset, space, device, lambda: common.autocast(device, args.amp),
                         input_size=input_size, batch_size=args.batch_size, workers=args.workers,
                         on_prediction=on_prediction, test_time_predict=test_time_predict,
                         align_corners=align_corners, scales=args.scales, flip=args.flip, slide=args.slide,
                         slide_stride=args.slide_stride, log=log_line, resize_via_input=protocol["resize_via_input"])
    scores, per_class = summarize(confusion, space)
    if common.is_main_process():
        print(format_table(scores, per_class), flush=True)
        if args.json:
            headline = next(iter(space.eval_sets))
            write_json(args.json, {"miou": scores[headline], "classes": len(space.eval_sets[headline]),
                                   "per_class": per_class, "scores": scores, "target": target, "split": args.split,
                                   "images": len(dataset), "input_size": protocol["input_size"], "ckpt": args.ckpt,
                                   "tta_aggregate": protocol["tta_aggregate"], "protocol": protocol})


def label_target(args, model, saved, space, target, device):
    """--save-pseudo: pseudo-labels of the target's train split (uda/pseudo_labels.py)."""
    root = target_root(args, saved, space, target, None)  # the train split: its labels are not read
    check_outputs(args, [("the dataset folder", root)])
    barrier()
    pseudo_labels.run(args, model, saved, space, target, root, resolve_input_size(args, target), device,
                      predict_probs)


def main(argv=None):
    args = parse_args(argv)
    device = common.setup_distributed(args.device)
    model, saved, space = model_from_checkpoint(args.ckpt, device)
    if args.images:
        predict_folder(args, model, saved, space, device)
    elif args.save_pseudo:
        label_target(args, model, saved, space, args.target or saved.target, device)
    else:
        evaluate_split(args, model, saved, space, args.target or saved.target, device)
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_cli(main)
