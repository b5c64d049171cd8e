"""Pseudo-labels for the self-training stages of FADA and SDCA: one streaming, DDP-aware generator.

    python evaluate.py --ckpt runs/fada/last.pt --save-pseudo runs/pl-fada --pseudo-rule argmax
    python evaluate.py --ckpt runs/sdca/last.pt --save-pseudo runs/pl-sdca --pseudo-rule classwise

The checkpoint's model is run over the target TRAIN split, whose labels are never read (the dataset is
built with labeled=False). Each image is resized to the evaluation input size (Cityscapes 1024x512),
its logits are upsampled bilinearly (with the checkpoint's --align-corners, as its evaluation) to the
image's own resolution (2048x1024), softmax, and:

- argmax (FADA, official test.py --saveres, arXiv 2007.09222): y = argmax_c p_c, no threshold, no flip.
- classwise (SDCA, arXiv 2105.05013, which follows BDL / IntraDA): a first pass collects, for every
  class c, the max-probabilities m = max_c' p_c' of the pixels predicted c; the threshold is
      thr_c = min(median_c, cap)   (cap = 0.9),   thr_c = 0 if c is never predicted,
  with median_c = the element at index round_half_even(n_c / 2) of the sorted values (numpy's round,
  as the official code); the second pass writes y = argmax_c p_c, and 255 where p_max < thr_y.
  The first pass works at the model's input resolution (softmax of logits upsampled to 1024x512), as
  the official code does; the second at the image's resolution.

Output: DIR/<dataset.item_name(i)>.png, uint8 class indices of the model's label space (255 = ignore;
indices, not Cityscapes trainIds: a 16-class SYNTHIA model writes 0..15), DIR/labelspace.json =
{"trainids", "eval_sets"[, "class_names", "palette"]} (LabelSpace.to_record) so that
`train.py --source <dataset> --pseudo-dir DIR` trains in the same label space, and DIR/pseudo.json with
the rule, thresholds, align_corners and per-class label fractions.

Streaming: nothing but a (C, bins) histogram of the first pass is kept (the official code np.appends
every probability of 2,975 images to RAM: ~18 GB). The median is read from the histogram, so it is
approximate to the bin width: we return the LOWER edge of the bin holding the median element, i.e. at
most 1/bins (0.001 by default) below the exact median and never above it, so every pixel the exact rule
keeps is kept. Under torchrun each rank labels every world_size-th image and the histograms are summed
over ranks before the thresholds are taken (all ranks get the same thresholds).

Deviations: the classwise median is the histogram approximation above (documented bound, tested).
"""
import json
import os

import numpy as np
import torch

from uda import common, datasets
from uda.common import IGNORE_INDEX, UserError

RULES = ("argmax", "classwise")
CLASSWISE_CAP = 0.9   # SDCA / IntraDA: thresholds above 0.9 are lowered to 0.9
HISTOGRAM_BINS = 1000  # bin width 0.001 of max-probability


# --------------------------------------------------------------------------------------------------
# Pure functions on probability maps
# --------------------------------------------------------------------------------------------------
def confidence_histograms(probs, bins):
    """Per-class histogram of max-probabilities over pixels predicted as that class.

    probs: (B, C, H, W) softmax probabilities (any float dtype). Returns (C, bins) int64 counts; bin b
    holds values in [b / bins, (b + 1) / bins) (1.0 goes into the last bin).
    """
    assert probs.dim() == 4, "probs must be (B, C, H, W)"
    num_classes = probs.shape[1]
    conf, pred = probs.float().max(dim=1)                                   # (B, H, W) each
    bin_index = (conf * bins).long().clamp_(0, bins - 1)                    # (B, H, W)
    flat = (pred * bins + bin_index).reshape(-1)                            # (N,)
    return torch.bincount(flat, minlength=num_classes * bins).view(num_classes, bins)  # (C, bins)


def median_index(count):
    """0-based index of the official 'median' element: numpy's round(0.5 * n) (half to even).

    count: (C,) int64. Returns (C,) int64 clipped to [0, n - 1] (0 where n = 0).
    """
    index = torch.round(count.double() * 0.5).long()  # torch.round rounds half to even, as numpy
    return torch.minimum(index, (count - 1).clamp(min=0))


def classwise_thresholds(hist, cap):
    """thr_c = min(median_c, cap), 0 for a class never predicted, from (C, bins) histograms.

    The median is the lower edge of the bin holding element median_index(n_c) of the sorted values.
    Returns (C,) float64.
    """
    assert hist.dim() == 2, "hist must be (C, bins)"
    num_classes, bins = hist.shape
    count = hist.sum(dim=1)                                                  # (C,)
    cumulative = hist.cumsum(dim=1)                                          # (C, bins)
    target = median_index(count)                                             # (C,)
    # first bin whose cumulative count exceeds the target index: that bin holds the median element
    median_bin = (cumulative <= target[:, None]).sum(dim=1).clamp(max=bins - 1)  # (C,)
    median = median_bin.double() / bins                                     # (C,) lower bin edge
    thresholds = torch.clamp(median, max=cap)
    return torch.where(count > 0, thresholds, torch.zeros_like(thresholds))  # absent class -> 0


def exact_classwise_thresholds(probs, cap):
    """Reference (sort-based, all values in memory) thresholds, as the official code computes them.

    probs: (B, C, H, W). Returns (C,) float64. For tests and small inputs only.
    """
    num_classes = probs.shape[1]
    conf, pred = probs.double().max(dim=1)                                   # (B, H, W)
    thresholds = torch.zeros(num_classes, dtype=torch.float64)
    for c in range(num_classes):  # loop over classes, not pixels
        values = torch.sort(conf[pred == c]).values                         # (n_c,)
        if values.numel():
            thresholds[c] = min(values[int(np.round(values.numel() * 0.5))].item(), cap)
    return thresholds


def hard_labels(probs, thresholds=None):
    """argmax labels (B, H, W) uint8; with thresholds (C,), pixels with p_max < thr_argmax become 255.

    probs: (B, C, H, W) with C <= 255.
    """
    assert probs.dim() == 4 and probs.shape[1] < IGNORE_INDEX
    conf, pred = probs.float().max(dim=1)                                   # (B, H, W)
    if thresholds is not None:
        thr = thresholds.to(device=probs.device, dtype=torch.float32)[pred]  # (B, H, W)
        pred = torch.where(conf < thr, torch.full_like(pred, IGNORE_INDEX), pred)
    return pred.to(torch.uint8)


# --------------------------------------------------------------------------------------------------
# The streaming generator
# --------------------------------------------------------------------------------------------------
def check_flags(rule, cap, bins, limit=None):
    """The pseudo-label settings a user can get wrong, as one-line errors naming the flag."""
    if rule not in RULES:
        raise UserError(f"--pseudo-rule {rule!r}: expected one of {', '.join(RULES)}")
    if not 0.0 < cap <= 1.0:
        raise UserError(f"--pseudo-cap {cap}: expected a probability in (0, 1]")
    if bins < 2:
        raise UserError(f"--pseudo-bins {bins}: expected at least 2 bins")
    if limit is not None and limit < 1:
        raise UserError(f"--pseudo-limit {limit}: expected a positive number of images")


def generate(model, dataset, space, out_dir, rule, device, predict_probs, autocast, input_size=None,
             cap=CLASSWISE_CAP, bins=HISTOGRAM_BINS, batch_size=1, workers=0, limit=None, log=print,
             align_corners=False):
    """Write pseudo-labels of `dataset` (unlabelled items) into out_dir; returns the summary dict.

    predict_probs(model, images, label_size, input_size, autocast, align_corners=...) -> (B, C, H, W)
    fp32 softmax at label_size: uda/evaluation.py's function, passed in so both use one protocol.
    input_size: (width, height) the images are resized to before the forward (None: their own size).
    align_corners: of the logit upsampling, the checkpoint's (its --align-corners).
    """
    check_flags(rule, cap, bins, limit)
    num_classes = space.num_classes
    os.makedirs(out_dir, exist_ok=True)
    loader = torch.utils.data.DataLoader(common.shard(dataset, limit), batch_size=batch_size, num_workers=workers)
    was_training = model.training
    model.eval()

    def probs_of(batch, full):
        images = batch["image"].to(device)                                  # (B, 3, H, W)
        size = images.shape[-2:] if full or input_size is None else (input_size[1], input_size[0])
        return predict_probs(model, images, size, input_size, autocast, align_corners=align_corners)  # (B, C, *size)

    thresholds = None
    if rule == "classwise":  # pass 1: class-wise confidence histograms, summed over ranks
        hist = torch.zeros(num_classes, bins, dtype=torch.int64, device=device)
        for batch in loader:
            hist += confidence_histograms(probs_of(batch, full=False), bins)
        thresholds = classwise_thresholds(common.all_reduce_sum(hist).cpu(), cap)
        log("class-wise thresholds: " + " ".join(f"{n} {t:.3f}" for n, t in zip(space.names, thresholds.tolist())))

    # pass 2: hard labels at the image resolution; pixel counts per class (index C = ignored)
    counts = torch.zeros(num_classes + 1, dtype=torch.int64, device=device)
    written = torch.zeros((), dtype=torch.int64, device=device)
    for batch in loader:
        labels = hard_labels(probs_of(batch, full=True), thresholds)  # (B, H, W) uint8
        counts += torch.bincount(labels.reshape(-1).long().clamp(max=num_classes), minlength=num_classes + 1)
        for label, index in zip(labels.cpu().numpy(), batch["index"].tolist()):
            datasets.write_png(os.path.join(out_dir, dataset.item_name(index) + ".png"), label, "--save-pseudo")
        written += labels.shape[0]
    counts, written = common.all_reduce_sum(counts).cpu(), int(common.all_reduce_sum(written))  # also a barrier
    model.train(was_training)

    fraction = (counts.double() / counts.sum().clamp(min=1)).tolist()
    summary = {"rule": rule, "images": written, "num_classes": num_classes,
               "thresholds": thresholds.tolist() if thresholds is not None else None,
               "cap": cap if rule == "classwise" else None, "bins": bins if rule == "classwise" else None,
               "align_corners": align_corners,
               "class_fraction": dict(zip(space.names, fraction[:num_classes])), "ignored_fraction": fraction[-1]}
    if common.is_main_process():
        with open(os.path.join(out_dir, "labelspace.json"), "w") as f:
            json.dump(space.to_record(), f)
        with open(os.path.join(out_dir, "pseudo.json"), "w") as f:
            json.dump(summary, f, indent=2)
        log(f"wrote {written} pseudo-labels ({rule}) to {out_dir}; ignored pixels {100 * fraction[-1]:.1f}%")
    return summary


def run(args, model, saved, space, target, root, input_size, device, predict_probs):
    """evaluate.py --save-pseudo: label `target`'s train split (its folder `root`; None for the toy) with the
    checkpoint's model (saved: its args), images resized to input_size (width, height; None: native)."""
    dataset = datasets.build_dataset(target, "train", space, root=root, labeled=False)  # labels never read
    align_corners = bool(getattr(saved, "align_corners", False))  # old checkpoints: the former default
    if common.is_main_process():
        size_text = f"{input_size[0]}x{input_size[1]}" if input_size else "native"
        print(f"pseudo-labels ({args.pseudo_rule}) of {target} train ({len(dataset)} images, input {size_text}, "
              f"align_corners {align_corners}) from {args.ckpt}", flush=True)
    log = (lambda text: print(text, flush=True)) if common.is_main_process() else (lambda text: None)
    return generate(model, dataset, space, args.save_pseudo, args.pseudo_rule, device, predict_probs,
                    lambda: common.autocast(device, args.amp), input_size=input_size, cap=args.pseudo_cap,
                    bins=args.pseudo_bins, batch_size=args.batch_size, workers=args.workers,
                    limit=args.pseudo_limit, log=log, align_corners=align_corners)


def add_arguments(parser):
    """evaluate.py's pseudo-label flags."""
    group = parser.add_argument_group("pseudo-labels (self-training stage of FADA and SDCA)")
    group.add_argument("--save-pseudo", default=None, metavar="DIR",
                       help="instead of evaluating, label the target TRAIN split (its labels are not read) and "
                            "write DIR/<name>.png class indices + DIR/labelspace.json")
    group.add_argument("--pseudo-rule", choices=RULES, default="argmax",
                       help="argmax: FADA (every pixel labelled); classwise: SDCA (255 below min(class median, cap))")
    group.add_argument("--pseudo-cap", type=common.fraction, default=CLASSWISE_CAP,
                       help="classwise: upper bound of every class threshold (SDCA/IntraDA: 0.9)")
    group.add_argument("--pseudo-bins", type=common.positive_int, default=HISTOGRAM_BINS,
                       help="classwise: histogram bins of max-probability; the median is exact to 1/bins")
    group.add_argument("--pseudo-limit", type=common.positive_int, default=None, metavar="N",
                       help="label only the first N images of the split (smoke tests)")

