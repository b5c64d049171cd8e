"""Evaluate a checkpoint on a labelled split: confusion matrix over the whole split, per-class IoU, mIoU.

    python evaluate.py --ckpt runs/toy/last.pt --target toy-real
    python evaluate.py --ckpt runs/gta/last.pt --target cityscapes --data-root /data --input-size 1024x512

Protocol (uda/evaluation.py): the image is resized to --input-size
(bicubic; default: the dataset's convention), logits are upsampled bilinearly to the label resolution,
argmax, and one confusion matrix is accumulated over the whole split (summed over ranks under torchrun).
mIoU is reported over every class subset of the model's label space (19; 16 and 13 for SYNTHIA-trained
models; 13 for Cross-City). train.py's periodic evaluation calls the same functions (uda/evaluation.py).
"""
import argparse
import json
import os

import numpy as np
import torch
from PIL import Image

from uda import common, datasets, pseudo_labels
from uda.evaluation import evaluate, format_table, model_from_checkpoint, predict_probs, summarize
from uda.common import UserError


def write_json(path, scores, space, per_class, extra):
    headline = next(iter(space.eval_sets))
    record = {"miou": scores[headline], "classes": len(space.eval_sets[headline]), "per_class": per_class,
              "scores": scores, **extra}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


# --------------------------------------------------------------------------------------------------
# Saving predictions
# --------------------------------------------------------------------------------------------------
def prediction_saver(out_dir, dataset, space):
    """Callback writing <name>_trainid.png (Cityscapes trainIds) and <name>_color.png per image."""
    os.makedirs(out_dir, exist_ok=True)
    to_trainid = np.array(space.trainids + [255] * (256 - space.num_classes), dtype=np.uint8)
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:len(datasets.CITYSCAPES_PALETTE)] = datasets.CITYSCAPES_PALETTE

    def save(pred, batch):
        for pred_one, index in zip(pred.cpu().numpy(), batch["index"].tolist()):
            stem = os.path.join(out_dir, dataset.item_name(index))
            os.makedirs(os.path.dirname(stem), exist_ok=True)
            trainid = to_trainid[pred_one]
            Image.fromarray(trainid).save(stem + "_trainid.png")
            Image.fromarray(palette[trainid]).save(stem + "_color.png")

    return save


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (OUT/last.pt)")
    p.add_argument("--target", default=None,
                   help="dataset to evaluate on (default: the target the checkpoint was trained for)")
    p.add_argument("--data-root", default=None, help="folder holding one sub-folder per dataset")
    p.add_argument("--split", default="val", help="split to evaluate (needs labels)")
    p.add_argument("--input-size", default=None,
                   help="WxH the images are resized to before the forward pass (default: per dataset, "
                        "e.g. 1024x512 for Cityscapes; the toy's own 256x128)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    p.add_argument("--amp", choices=list(common.AMP_DTYPES), default="off", help="autocast dtype for the forward")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", default=None, help='write {"miou", "classes", "per_class"} to this file')
    p.add_argument("--save-pred", default=None, help="write trainId and colour PNGs of the predictions here")
    p.add_argument("--tta-aggregate", choices=["auto", "on", "off"], default="auto",
                   help="PLCA test-time aggregation of features and probabilities before the argmax "
                        "(uda/plca.py); auto = on for checkpoints trained with --method plca, as in the "
                        "official test configs")
    pseudo_labels.add_arguments(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = common.setup_distributed(args.device)
    model, saved, space = model_from_checkpoint(args.ckpt, device)
    target = args.target or saved.target
    if args.save_pseudo:  # label the unlabelled target train split instead of evaluating (uda/pseudo_labels.py)
        pseudo_labels.run(args, model, saved, space, target, device, predict_probs)
        common.cleanup_distributed()
        return
    dataset = datasets.build_dataset(target, args.split, space, root=datasets.checkpoint_root(target, args.data_root, saved),
                                     labeled=True)
    input_size = common.parse_size(args.input_size, "--input-size") if args.input_size else \
        datasets.default_eval_size(target)
    on_prediction = prediction_saver(args.save_pred, dataset, space) if args.save_pred else None
    aggregate = args.tta_aggregate == "on" or (args.tta_aggregate == "auto" and saved.method == "plca")
    confusion = evaluate(model, dataset, space, device, lambda: common.autocast(device, args.amp),
                         input_size=input_size, batch_size=args.batch_size, workers=args.workers,
                         on_prediction=on_prediction, aggregate=aggregate)
    scores, per_class = summarize(confusion, space)
    if common.is_main_process():
        size_text = f"{input_size[0]}x{input_size[1]}" if input_size else "native"
        print(f"{args.ckpt} on {target} {args.split} ({len(dataset)} images, input {size_text}, test-time "
              f"aggregation {'on' if aggregate else 'off'} ({args.tta_aggregate}))")
        print(format_table(scores, per_class))
        if args.json:
            write_json(args.json, scores, space, per_class,
                       {"target": target, "split": args.split, "input_size": size_text, "ckpt": args.ckpt,
                        "tta_aggregate": aggregate})
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_cli(main)
