"""Prediction and metrics shared by evaluate.py, train.py's periodic evaluation and the tools.

Protocol (conventions.md, section 3): the image is resized to the input size (bicubic, antialiased
when shrinking; default: the dataset's convention), logits are upsampled bilinearly to the label
resolution with the checkpoint's align_corners (a recipe value: FADA/SDCA True, DAFormer False), argmax,
and one confusion matrix is accumulated over the whole split (summed over ranks under torchrun).
mIoU is reported over every class subset of the model's label space.
"""
import argparse

import torch
import torch.nn.functional as F

from uda import common, datasets, models, plca
from uda.common import UserError


def resize_images(images, size):
    """Bicubic resize of (B, 3, H, W) images in [0, 1] to size = (width, height); antialiased when shrinking."""
    if size is None or tuple(images.shape[-2:]) == (size[1], size[0]):
        return images
    return F.interpolate(images, size=(size[1], size[0]), mode="bicubic", align_corners=False,
                         antialias=True).clamp_(0.0, 1.0)


@torch.no_grad()
def predict_probs(model, images, label_size, input_size, autocast, aggregate=False, align_corners=False):
    """Softmax probabilities (B, C, H, W) at label_size = (H, W), in fp32.

    aggregate: PLCA's test-time aggregation of features and probabilities (uda/plca.aggregate_predict);
    its stride-8 probabilities are upsampled, as in the official test script.
    """
    if aggregate:
        probs = plca.aggregate_predict(model, resize_images(images, input_size), autocast)  # (B, C, h/s, w/s)
        return common.upsample(probs, label_size, align_corners)
    with autocast():
        _, logits = model(resize_images(images, input_size))  # (B, C, h/s, w/s)
    return torch.softmax(common.upsample(logits.float(), label_size, align_corners), dim=1)


@torch.no_grad()
def evaluate(model, dataset, space, device, autocast, input_size=None, batch_size=1, workers=0,
             on_prediction=None, aggregate=False, align_corners=False):
    """Confusion matrix (C, C) over the whole dataset, summed over ranks.

    aggregate: PLCA's test-time aggregation (see predict_probs).
    on_prediction(pred (B, H, W) int64, batch): optional callback, e.g. to save predictions.
    """
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(common.shard(dataset), batch_size=batch_size, num_workers=workers)
    confusion = torch.zeros(space.num_classes, space.num_classes, dtype=torch.int64, device=device)
    for batch in loader:
        images, labels = batch["image"].to(device), batch["label"].to(device)
        pred = predict_probs(model, images, labels.shape[-2:], input_size, autocast, aggregate,
                             align_corners).argmax(1)
        confusion += common.confusion_matrix(pred, labels, space.num_classes)
        if on_prediction is not None:
            on_prediction(pred, batch)
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
    saved = argparse.Namespace(**ckpt["args"])
    space = datasets.label_space(saved.source, saved)
    model = models.build_model(saved.backbone, space.num_classes, bn=getattr(saved, "bn", "auto"))
    models.load_state_strict(model, ckpt["model"], path, saved.backbone)
    return model.to(device), saved, space
