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
symlinked ones followed once each, sorted; hidden files such as macOS ._photo.jpg skipped and counted)
is turned upright by its EXIF orientation, resized like the checkpoint's target (--input-size
overrides) and predicted at its own (upright) size; per image OUT/<path without suffix>.png (class
indices, uint8), <...>_color.png (the label space's palette) and <...>_overlay.png (the colours blended
50/50 over the image) are written. --batch-size N batches images of one size together. The logits are
upsampled, averaged and argmaxed a block of rows at a time (predict_labels), so a 48-megapixel photo
never holds its full-size probabilities (3.6 GB for 19 classes); the labels are those of predict_probs.
--ckpt may name a run folder (its last.pt is used).

Outputs are never clobbered: --json, --save-pred and --save-pseudo refuse an existing file or a
non-empty folder unless --overwrite is given (files of the same name are then replaced, others kept),
and never write inside the dataset folder being read (nor inside --images), even with --overwrite.
A checkpoint is refused on a target whose labels are another label space than its model's (toy vs
benchmark, a folder dataset with other classes).
Every PNG is written to a hidden temporary file and renamed into place: Ctrl-C (one line, exit status
130) or a full disk never leaves a truncated prediction under a name a user reads.
"""
import argparse
import functools
import json
import os
import signal
import sys


def exit_on_interrupt(signum, frame):
    """Ctrl-C: one line and exit status 130 (128 + SIGINT, as a shell reports it), no traceback. The
    exit unwinds normally, so a PNG being written is removed by datasets.write_png."""
    if os.getpid() != MAIN_PID:  # a DataLoader worker forked with this handler: quiet, as by default
        signal.default_int_handler(signum, frame)
    if os.environ.get("RANK", "0") == "0":
        print("evaluate.py: interrupted (Ctrl-C); the predictions written so far are complete files",
              file=sys.stderr, flush=True)
    sys.exit(128 + signal.SIGINT)


MAIN_PID = os.getpid()
if __name__ == "__main__":  # before the slow imports below (torch takes seconds): Ctrl-C there is one line too
    signal.signal(signal.SIGINT, exit_on_interrupt)

import numpy as np
import torch

from uda import common, datasets, pseudo_labels, toy
from uda import evaluation
from uda.common import UserError
from uda.methods import METHODS
from uda.evaluation import evaluate, format_table, model_from_checkpoint, predict_probs, progress, summarize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # --images: matched case-insensitively
OVERLAY_ALPHA = 0.5                         # weight of the class colours in <name>_overlay.png
# --images: how many values (classes x rows x width) of the full-size probabilities exist at once
# (16 MB in fp32; the whole map of an 8000x6000 photo would be 3.6 GB for 19 classes)
BLOCK_VALUES = 2 ** 22
# rows per block are a multiple of this: every block then starts and ends on the same 16-value
# boundaries of the flattened map as the whole-image softmax's vector lanes (AVX-512: 16 floats), so
# on one thread block by block gives the same bits as one softmax over the whole map
BLOCK_ROW_MULTIPLE = 16
OOM_HINT = "try a smaller --input-size, --slide WxH, --batch-size 1 or --amp bf16"


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
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (OUT/last.pt), or the run folder OUT")
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
    p.add_argument("--batch-size", type=common.positive_int, default=1,
                   help="images per forward pass (--images: images of one size are batched together)")
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
    args.ckpt = checkpoint_file(args.ckpt)
    check_combinations(args)
    pseudo_labels.check_flags(args.pseudo_rule, args.pseudo_cap, args.pseudo_bins, args.pseudo_limit)
    return args


def checkpoint_file(path):
    """--ckpt: a checkpoint file, or a run folder standing for its last.pt."""
    if not os.path.isdir(path):
        return path
    last = os.path.join(path, "last.pt")
    if not os.path.isfile(last):
        raise UserError(f"--ckpt {path}: a folder without last.pt (expected a checkpoint file, or a run folder "
                        f"of train.py holding last.pt)")
    return last


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


def check_writable(folder):
    """Create --save-pred and write (and remove) one file in it before any prediction: a read-only or
    full folder is refused at once, not after the first forward pass."""
    tmp = datasets.temporary_name(os.path.join(folder, "probe"))
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(b"\0")
        os.remove(tmp)
    except OSError as err:
        raise UserError(f"--save-pred {folder}: cannot write into it ({err.strerror or err})") from None


def prediction_saver(out_dir, dataset, space):
    """Callback writing <name>_trainid.png (Cityscapes trainIds) and <name>_color.png per image."""
    check_writable(out_dir)
    to_trainid = np.array(list(space.trainids) + [255] * (256 - space.num_classes), dtype=np.uint8)
    palette = palette_table(space)

    def save(pred, batch):
        for pred_one, index in zip(pred.cpu().numpy(), batch["index"].tolist()):
            stem = os.path.join(out_dir, dataset.item_name(index))
            datasets.write_png(stem + "_trainid.png", to_trainid[pred_one], "--save-pred")
            datasets.write_png(stem + "_color.png", palette[pred_one], "--save-pred")

    return save


# --------------------------------------------------------------------------------------------------
# Folder inference
# --------------------------------------------------------------------------------------------------
def find_images(folder):
    """(paths relative to `folder` of every .png/.jpg/.jpeg under it, any depth and case, sorted; the
    number of hidden files and folders skipped).

    Symbolic links to folders are followed, each real folder once (a link to a parent would loop for
    ever). Names starting with '.' are skipped as training's scan skips them (datasets.scan_images):
    macOS '._photo.jpg' resource forks carry an image suffix but no image.
    """
    if not os.path.isdir(folder):
        raise UserError(f"--images {folder}: no such folder")
    found, hidden, visited = [], 0, set()
    for dirpath, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # reached again through a link: listed already
            dirs[:] = []
            continue
        visited.add(real)
        hidden += sum(name.startswith(".") for name in dirs + files)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.relpath(os.path.join(dirpath, f), folder) for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    if not found:
        raise UserError(f"--images {folder}: no .png, .jpg or .jpeg file in it or its sub-folders")
    return sorted(found), hidden


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


def name_limit(folder):
    """The longest file name (bytes) the file system of `folder` (or of its nearest existing parent) takes."""
    while not os.path.isdir(folder):
        folder = os.path.dirname(os.path.abspath(folder))
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255  # Linux, macOS and Windows file systems alike


def check_name_lengths(folder, names, stems, out_dir):
    """Refuse, before any prediction, an image whose output name (<stem>_overlay.png, the longest) would
    be longer than --save-pred's file system allows."""
    limit = name_limit(out_dir)
    for name, stem in zip(names, stems):
        longest = max(os.path.dirname(stem).split(os.sep) + [os.path.basename(stem) + "_overlay.png"],
                      key=lambda part: len(os.fsencode(part)))
        if len(os.fsencode(longest)) > limit:
            raise UserError(f"--images {folder}: {name}: its prediction {longest} would have a name of "
                            f"{len(os.fsencode(longest))} bytes, longer than the {limit} the file system of "
                            f"--save-pred {out_dir} allows; shorten the image's name")


class ImageFolder(torch.utils.data.Dataset):
    """The images of --images, upright, at their own size: {'image': (3, H, W) uint8, 'index'} (uint8: a
    quarter of the float image, across the worker processes)."""

    def __init__(self, folder, names):
        self.folder, self.names = folder, names

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        image = datasets.read_image(os.path.join(self.folder, self.names[index]))  # (H, W, 3); broken: one line
        image = image if image.flags.writeable else image.copy()  # Pillow's buffer is read-only
        return {"image": torch.from_numpy(image).permute(2, 0, 1), "index": index}


def as_list(items):
    """DataLoader collate_fn: the items as they are (batch_sampler groups them by size already)."""
    return items


def size_batches(folder, names, indices, batch_size):
    """`indices` in batches of at most batch_size images of one size (upright, read from the file headers,
    no pixel decoded): images of different sizes cannot share a forward pass."""
    if batch_size == 1:
        return [[i] for i in indices]
    groups = {}
    for i in indices:
        groups.setdefault(datasets.probe_image(os.path.join(folder, names[i]))[1], []).append(i)
    return [group[k:k + batch_size] for group in groups.values() for k in range(0, len(group), batch_size)]


def same_size_groups(items):
    """The loaded items split by image size, in order (a file's header can disagree with its pixels: a PNG
    whose orientation comes after them)."""
    groups = {}
    for item in items:
        groups.setdefault(tuple(item["image"].shape), []).append(item)
    return list(groups.values())


# Blocked upsampling: rows r0..r1 of F.interpolate(logits, (H, W), bilinear) without the other rows
def linear_taps(size_in, size_out, align_corners):
    """Per output row y of a bilinear resize from size_in to size_out rows: the two input rows
    (i0, i1) (S,) int64 and their weights (w0, w1) (S,) float32, exactly as PyTorch's CPU kernel makes
    them (aten/src/ATen/native/UpSample.h, area_pixel_compute_scale / area_pixel_compute_source_index):
        align_corners:  s = (size_in - 1) / (size_out - 1),  x = s y
        otherwise:      s = size_in / size_out,              x = max(s (y + 0.5) - 0.5, 0)
        i0 = floor(x), i1 = min(i0 + 1, size_in - 1), w1 = x - i0, w0 = 1 - w1.
    s is a float32 division; x is computed with one rounding, as the kernel's fused multiply-add.
    """
    rows = torch.arange(size_out, dtype=torch.float64)
    if align_corners:
        scale = torch.tensor(float(size_in - 1)) / (size_out - 1) if size_out > 1 else torch.tensor(0.0)
        source = scale * rows.float()
    else:
        scale = torch.tensor(float(size_in)) / torch.tensor(float(size_out))  # float32, as the kernel
        source = (scale.double() * (rows + 0.5) - 0.5).float().clamp(min=0.0)
    i0 = source.long()
    w1 = (source - i0).clamp(0.0, 1.0)
    i1 = torch.where(i0 < size_in - 1, i0 + 1, i0)
    return i0, i1, 1.0 - w1, w1


def upsample_rows(x, rows, taps, width, align_corners):
    """Rows [r0, r1) of common.upsample(x, (H, width), align_corners) for x (B, C, h, w) fp32, computing
    only those rows. taps: linear_taps(h, H, align_corners). Returns (B, C, r1 - r0, width) fp32.

    PyTorch's kernel interpolates each needed input row along the width, then blends the two input rows
    of every output row; so do we: the width pass on the few input rows these output rows read (a
    resize of (h', w) to (h', width), whose height pass is the identity), then the blend t0 w0 + t1 w1
    per output row as the kernel computes it, t0 w0 added to the rounded t1 w1 (addcmul, the same
    vectorised multiply-add). On the CPU tried (AVX-512) the values equal the one-shot upsampling's to
    the last bit once the maps are 24x40 or larger (tiny maps take another kernel path and differ in the
    last bit); tests/test_predict_large.py checks closeness and the argmax.
    """
    r0, r1 = rows
    i0, i1, w0, w1 = (t[r0:r1] for t in taps)
    low, high = int(i0.min()), int(i1.max()) + 1
    across = common.upsample(x[:, :, low:high], (high - low, width), align_corners)   # (B, C, h', width)
    t0, t1 = across[:, :, i0 - low], across[:, :, i1 - low]                           # (B, C, r1 - r0, width)
    w0, w1 = w0.view(-1, 1), w1.view(-1, 1)                                           # (r1 - r0, 1)
    return torch.addcmul(t1 * w1, t0, w0)


def block_rows(num_classes, batch, width):
    """Rows per block: about BLOCK_VALUES values, a multiple of BLOCK_ROW_MULTIPLE rows."""
    rows = BLOCK_VALUES // max(1, num_classes * batch * width)
    return max(BLOCK_ROW_MULTIPLE, rows - rows % BLOCK_ROW_MULTIPLE)


def view_logits(model, images, input_size, autocast, protocol):
    """The views of evaluation.predict_probs before their last upsampling to the image size:
    [(fp32 logits (B, C, h, w) of the view, mirrored)], made as predict_probs makes them (a method
    that resizes via the input, RESIZE_VIA_INPUT, has its logits at the view's input size here)."""
    base = input_size or (images.shape[-1], images.shape[-2])
    align_corners, slide = protocol["align_corners"], protocol["slide"]
    views = []
    for scale in protocol["scales"]:
        resized = evaluation.resize_images(images, evaluation.scaled_size(base, scale))   # (B, 3, s h, s w)
        for mirrored in ((False, True) if protocol["flip"] else (False,)):
            view = resized.flip(-1) if mirrored else resized
            if slide is not None:
                logits = evaluation.slide_logits(model, view, slide, protocol["slide_stride"] or slide, autocast,
                                                 align_corners)                           # (B, C, s h, s w)
            else:
                with autocast():
                    _, logits = model(view)                                               # (B, C, h/s, w/s)
                if protocol["resize_via_input"]:  # mmseg's first resize, as evaluation.view_probs
                    logits = common.upsample(logits.float(), view.shape[-2:], align_corners)  # (B, C, s h, s w)
            views.append((logits.float(), mirrored))
    return views


@torch.no_grad()
def predict_labels(model, images, args, input_size, test_time_predict, protocol, device):
    """Class indices (B, H, W) uint8 of images (B, 3, H, W) in [0, 1]: predict_probs(...).argmax(1) of
    this run's protocol, at a fraction of its memory.

    predict_probs holds the full-size probabilities of every view; here each view's logits stay at the
    network's resolution, and the softmax of their upsampling, the average over the views and the
    argmax are taken a block of rows at a time (upsample_rows). A method's own test-time prediction
    (test_time_predict, PLCA's aggregation) keeps predict_probs' whole-image path.
    """
    autocast = functools.partial(common.autocast, device, args.amp)  # a fresh context per forward
    batch, _, height, width = images.shape
    align_corners = protocol["align_corners"]
    if test_time_predict is not None:
        return predict_probs(model, images, (height, width), input_size, autocast, test_time_predict, align_corners,
                             args.scales, args.flip, args.slide, args.slide_stride,
                             protocol["resize_via_input"]).argmax(1).to(torch.uint8)
    views = view_logits(model, images, input_size, autocast, protocol)
    taps = [linear_taps(logits.shape[-2], height, align_corners) for logits, _ in views]
    labels = torch.empty(batch, height, width, dtype=torch.uint8, device=images.device)
    step = block_rows(views[0][0].shape[1], batch, width)
    for r0 in range(0, height, step):
        rows = (r0, min(r0 + step, height))
        total = None
        for (logits, mirrored), view_taps in zip(views, taps):
            probs = torch.softmax(upsample_rows(logits, rows, view_taps, width, align_corners), dim=1)
            probs = probs.flip(-1) if mirrored else probs                                  # (B, C, rows, W)
            total = probs if total is None else total + probs
        total = total if len(views) == 1 else total / len(views)
        # max(1).indices: argmax's first-maximum rule, about three times faster on a (B, C, rows, W) block
        labels[:, rows[0]:rows[1]] = total.max(1).indices.to(torch.uint8)
    return labels


def overlay_image(pred, image, palette):
    """The class colours blended over the image, uint8 (H, W, 3), from pred (H, W) uint8 and the image
    (3, H, W) uint8, a block of rows at a time (the float image of a 48-megapixel photo is 0.6 GB)."""
    height = pred.shape[0]
    overlay = np.empty((height, pred.shape[1], 3), dtype=np.uint8)
    step = max(1, BLOCK_VALUES // max(1, 3 * pred.shape[1]))
    for r0 in range(0, height, step):
        block = slice(r0, r0 + step)
        colour = palette[pred[block]]                                                      # (rows, W, 3)
        rgb = image[:, block].permute(1, 2, 0).float().div_(255.0).numpy() * 255.0         # (rows, W, 3)
        blended = OVERLAY_ALPHA * colour + (1.0 - OVERLAY_ALPHA) * rgb
        overlay[block] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return overlay


def save_folder_prediction(stem, pred, image, palette):
    """stem.png (class indices), stem_color.png and stem_overlay.png. pred: (H, W) uint8; image: (3, H, W)
    uint8."""
    datasets.write_png(stem + ".png", pred, "--save-pred")
    datasets.write_png(stem + "_color.png", palette[pred], "--save-pred")
    datasets.write_png(stem + "_overlay.png", overlay_image(pred, image, palette), "--save-pred")


def predict_folder(args, model, saved, space, device):
    names, hidden = find_images(args.images)
    stems = output_stems(args.images, names)
    check_outputs(args, [("--images", args.images)])
    check_name_lengths(args.images, names, stems, args.save_pred)
    input_size = resolve_input_size(args, getattr(saved, "target", None))
    test_time_predict = test_time_predict_of(args, saved)
    protocol = protocol_record(args, input_size, test_time_predict is not None,
                               bool(getattr(saved, "align_corners", False)), resize_via_input_of(saved))
    barrier()
    check_writable(args.save_pred)
    if common.is_main_process():
        skipped = f"; skipped {hidden} hidden files and folders (names starting with '.')" if hidden else ""
        log_line(f"{args.ckpt}: predicting {len(names)} images under {args.images} into {args.save_pred} "
                 f"({describe_protocol(protocol, args.tta_aggregate)}){skipped}")
    mine = list(range(common.rank(), len(names), common.world_size()))  # this rank's share (common.shard)
    batches = size_batches(args.images, names, mine, args.batch_size)
    loader = torch.utils.data.DataLoader(ImageFolder(args.images, names), batch_sampler=batches,
                                         num_workers=args.workers, collate_fn=as_list)
    meter = progress("predicted", len(mine), 0.05, log_line)
    palette = palette_table(space)
    model.eval()
    for items in loader:
        for group in same_size_groups(items):
            images = torch.stack([item["image"] for item in group]).to(device).float().div_(255.0)  # (B, 3, H, W)
            labels = predict_labels(model, images, args, input_size, test_time_predict, protocol, device)
            del images
            for item, pred in zip(group, labels.cpu().numpy()):
                save_folder_prediction(os.path.join(args.save_pred, stems[item["index"]]), pred, item["image"],
                                       palette)
            meter.update(len(group))
    written = int(common.all_reduce_sum(torch.tensor([len(mine)], device=device)))
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
    common.run_cli(main, oom_hint=OOM_HINT)
