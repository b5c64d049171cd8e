"""Prediction and metrics shared by evaluate.py, train.py's periodic evaluation and the tools.

Single-scale protocol (the default, and train.py's periodic evaluation): the image is resized to the
input size (bicubic, antialiased when shrinking; default: the dataset's convention), logits are
upsampled bilinearly to the label resolution with the checkpoint's align_corners (a recipe value:
FADA/SDCA True, DAFormer False), softmax, argmax, and one confusion matrix is accumulated over the whole
split (summed over ranks under torchrun). mIoU is reported over every class subset of the model's label
space.

Test-time protocols (evaluate.py --scales / --flip / --slide; predict_probs), in mmsegmentation's way:
- Views. For every scale s in `scales` the input size (W, H) becomes (round(s W), round(s H)) (half up,
  as mmcv's rescale); with `flip` each scaled image is also predicted mirrored. With p_v the softmax of
  view v's logits upsampled to the label size (mirrored back for a flipped view),
      p = (1 / V) sum_v p_v,
  i.e. probabilities are averaged at the label resolution (mmseg aug_test; the papers' multi-scale
  testing, e.g. FADA's 0.7 1.0 1.3 + flip). One view (scales [1.0], no flip) is the single-scale protocol.
- Slide (mmseg slide_inference), window (w_c, h_c), stride (w_s, h_s), over a view's input of (w, h):
      rows = max(h - h_c + h_s - 1, 0) // h_s + 1,   y2 = min(r h_s + h_c, h),   y1 = max(y2 - h_c, 0)
  (columns alike), so the last window is shifted back to end at the border, and a window larger than the
  image is clipped to it. Each window's logits are upsampled to the window's size, summed into an
  (h, w) map and divided by the number of windows covering each pixel; that map is the view's logits.
  One window holding the whole image is whole-image inference with the logits upsampled twice (to the
  input, then to the label size), the same as without --slide when the input is at the label size.
- A method's own test-time prediction (its module's `test_time_predict`, passed as test_time_predict;
  PLCA's test-time aggregation) works on one view's whole image: it combines with scales and flip (each
  view predicted on its own, probabilities averaged), not with slide (PLCA would aggregate within a
  window only): refused.
- resize_via_input (a method's `RESIZE_VIA_INPUT`: DAFormer, DIDA): a view's logits (or probabilities)
  are resized to the view's input size first, then to the label size, as mmseg's inference does
  (github.com/lhoyer/DAFormer @ e6f6e04, mmseg/models/segmentors/encoder_decoder.py:77-81, encode_decode:
  `resize(out, size=img.shape[2:])`; :221-232, whole_inference: `resize(seg_logit, size=ori_shape[:2])`;
  softmax after both, :260). Two bilinear resizes differ from one at some pixels (on identical logits,
  up to 0.7% of the pixels of a 1024x512 input against 2048x1024 labels). Slide windows are always resized to
  their input (mmseg's slide_inference), so this changes only whole-image views.
Neither is ever chosen here by a method's name: the caller reads them from the method's module.
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F

from uda import common, datasets, models
from uda.common import UserError


def resize_images(images, size):
    """Bicubic resize of (B, 3, H, W) images in [0, 1] to size = (width, height); antialiased when shrinking."""
    if size is None or tuple(images.shape[-2:]) == (size[1], size[0]):
        return images
    return F.interpolate(images, size=(size[1], size[0]), mode="bicubic", align_corners=False,
                         antialias=True).clamp_(0.0, 1.0)


def scaled_size(size, scale):
    """(width, height) times `scale`, rounded half up (mmcv rescale), at least one pixel."""
    return tuple(max(1, int(value * scale + 0.5)) for value in size)


# --------------------------------------------------------------------------------------------------
# Prediction: one view (whole image or sliding window), then the average over scales and flips
# --------------------------------------------------------------------------------------------------
def slide_windows(height, width, window, stride):
    """mmseg slide_inference's windows [(y1, y2, x1, x2)] over a (height, width) input.

    window, stride: (width, height). Every pixel is covered when stride <= window.
    """
    (win_w, win_h), (stride_w, stride_h) = window, stride
    rows = max(height - win_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - win_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride_h + win_h, height), min(c * stride_w + win_w, width)
            windows.append((max(y2 - win_h, 0), y2, max(x2 - win_w, 0), x2))
    return windows


def slide_logits(model, images, window, stride, autocast, align_corners):
    """(B, C, h, w) fp32 logits at the input resolution, averaged over overlapping windows (mmseg slide)."""
    batch, _, height, width = images.shape
    total, count = None, images.new_zeros(1, 1, height, width, dtype=torch.float32)
    for y1, y2, x1, x2 in slide_windows(height, width, window, stride):
        with autocast():
            _, logits = model(images[:, :, y1:y2, x1:x2])                           # (B, C, h_c/s, w_c/s)
        logits = common.upsample(logits.float(), (y2 - y1, x2 - x1), align_corners)  # (B, C, h_c, w_c)
        if total is None:
            total = logits.new_zeros(batch, logits.shape[1], height, width)          # (B, C, h, w)
        total[:, :, y1:y2, x1:x2] += logits
        count[:, :, y1:y2, x1:x2] += 1
    return total / count


def view_probs(model, images, label_size, autocast, test_time_predict, align_corners, slide, slide_stride,
               resize_via_input=False):
    """Softmax probabilities (B, C, H, W) at label_size = (H, W) of one view: `images` as given."""
    input_size = images.shape[-2:]                                                  # (h, w)
    if test_time_predict is not None:
        probs = test_time_predict(model, images, autocast)                          # (B, C, h', w')
        if resize_via_input:
            probs = common.upsample(probs, input_size, align_corners)               # (B, C, h, w)
        return common.upsample(probs, label_size, align_corners)
    if slide is not None:
        logits = slide_logits(model, images, slide, slide_stride, autocast, align_corners)  # (B, C, h, w)
    else:
        with autocast():
            _, logits = model(images)                                               # (B, C, h/s, w/s)
        if resize_via_input:  # mmseg: to the input size first (see the module docstring)
            logits = common.upsample(logits.float(), input_size, align_corners)    # (B, C, h, w)
    return torch.softmax(common.upsample(logits.float(), label_size, align_corners), dim=1)


@torch.no_grad()
def predict_probs(model, images, label_size, input_size, autocast, test_time_predict=None, align_corners=False,
                  scales=(1.0,), flip=False, slide=None, slide_stride=None, resize_via_input=False):
    """Softmax probabilities (B, C, H, W) at label_size = (H, W), in fp32, averaged over the views.

    images: (B, 3, h0, w0) in [0, 1]. input_size: (width, height) the images are resized to (None: their
    own size); each scale multiplies it. flip: add the mirrored views. slide: (width, height) window of
    sliding-window inference, slide_stride its step (default: the window, no overlap).
    test_time_predict: a method's own prediction of a whole view (its module's `test_time_predict`, e.g.
    PLCA's test-time aggregation, whose stride-8 probabilities are upsampled, as in its official test
    script); resize_via_input: the method's RESIZE_VIA_INPUT (mmseg's two resizes). The defaults are the
    single-scale protocol.
    """
    if test_time_predict is not None and slide is not None:
        raise UserError("--slide: the method's test-time prediction (PLCA's aggregation) runs over the whole "
                        "image, not a window (use --tta-aggregate off, or drop --slide)")
    stride = slide_stride or slide
    base = input_size or (images.shape[-1], images.shape[-2])
    total, views = None, 0
    for scale in scales:
        resized = resize_images(images, scaled_size(base, scale))                   # (B, 3, s h, s w)
        for mirrored in ((False, True) if flip else (False,)):
            view = resized.flip(-1) if mirrored else resized
            probs = view_probs(model, view, label_size, autocast, test_time_predict, align_corners, slide, stride,
                               resize_via_input)
            probs = probs.flip(-1) if mirrored else probs                           # (B, C, H, W)
            total = probs if total is None else total + probs
            views += 1
    return total if views == 1 else total / views


# --------------------------------------------------------------------------------------------------
# Evaluation over a split
# --------------------------------------------------------------------------------------------------
class Progress:
    """'LABEL 120/500 images (24%), 0:00:12 elapsed, ETA 0:00:38', about every `every` of the total and
    once at the end; prints nothing when log is None (ranks other than 0)."""

    def __init__(self, label, total, every, log):
        self.label, self.total, self.log = label, total, log
        self.step = max(1, math.ceil(total * every))
        self.done, self.next = 0, self.step
        self.start = time.perf_counter()

    def update(self, count):
        self.done += count
        if self.log is None or (self.done < self.next and self.done < self.total):
            return
        self.next = (self.done // self.step + 1) * self.step
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * max(self.total - self.done, 0)
        self.log(f"{self.label} {self.done}/{self.total} images ({100 * self.done / max(self.total, 1):.0f}%), "
                 f"{common.format_duration(elapsed)} elapsed, ETA {common.format_duration(eta)}")


def progress(label, total, every, log):
    """A Progress printing on rank 0 only; under torchrun it counts rank 0's share of the images."""
    if common.world_size() > 1:
        label = f"rank 0: {label}"
    return Progress(label, total, every, log if common.is_main_process() else None)


@torch.no_grad()
def evaluate(model, dataset, space, device, autocast, input_size=None, batch_size=1, workers=0,
             on_prediction=None, test_time_predict=None, align_corners=False, scales=(1.0,), flip=False, slide=None,
             slide_stride=None, log=None, resize_via_input=False):
    """Confusion matrix (C, C) over the whole dataset, summed over ranks.

    test_time_predict, scales, flip, slide, slide_stride, resize_via_input: the test-time protocol (see
    predict_probs).
    on_prediction(pred (B, H, W) int64, batch): optional callback, e.g. to save predictions.
    log: print progress lines with it (about every 10% and at the end, rank 0); None: silent.
    """
    was_training = model.training
    model.eval()
    shard = common.shard(dataset)
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=workers)
    meter = progress("evaluated", len(shard), 0.1, log) if log is not None else None
    confusion = torch.zeros(space.num_classes, space.num_classes, dtype=torch.int64, device=device)
    for batch in loader:
        images, labels = batch["image"].to(device), batch["label"].to(device)
        pred = predict_probs(model, images, labels.shape[-2:], input_size, autocast, test_time_predict, align_corners,
                             scales, flip, slide, slide_stride, resize_via_input).argmax(1)
        confusion += common.confusion_matrix(pred, labels, space.num_classes)
        if on_prediction is not None:
            on_prediction(pred, batch)
        if meter is not None:
            meter.update(len(images))
    model.train(was_training)
    return common.all_reduce_sum(confusion)


def summarize(confusion, space):
    """{'mIoU19': 48.3, ...} over every class subset of the label space, and the per-class IoU (%)."""
    iou = common.iou_per_class(confusion.cpu())
    scores = {name: common.mean_iou(iou, classes) for name, classes in space.eval_sets.items()}
    evaluated = sorted({c for classes in space.eval_sets.values() for c in classes})
    per_class = {space.names[c]: 100.0 * iou[c].item() for c in evaluated}
    return scores, per_class


def format_table(scores, per_class):
    lines = [f"{'class':<16} IoU"]
    lines += [f"{name:<16} {value:5.1f}" for name, value in per_class.items()]
    lines.append(" | ".join(f"{name} {value:.2f}" for name, value in scores.items()))
    return "\n".join(lines)


def model_from_checkpoint(path, device):
    """Rebuild the model a train.py checkpoint was made with; returns (model, saved args, label space)."""
    ckpt = common.load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        raise UserError(f"--ckpt {path}: not a checkpoint written by train.py (expected keys 'model' and 'args')")
    # a folder source's classes: beside the flags (checkpoints before uda/flags.py: among them)
    folder_classes = ckpt.get("folder_classes") or ckpt["args"].get("folder_classes")
    saved = argparse.Namespace(**{**ckpt["args"], "folder_classes": folder_classes})
    space = datasets.label_space(saved.source, saved)
    model = models.build_model(saved.backbone, space.num_classes, bn=getattr(saved, "bn", "auto"))
    models.load_state_strict(model, ckpt["model"], path, saved.backbone)
    return model.to(device), saved, space
