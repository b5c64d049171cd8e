"""Self-training (FADA's "self-distillation" stage): a fresh network trained on pseudo-labelled target images.

Copy with: uda/common.py, uda/augment.py, uda/source_only.py

Stage 4 of FADA's recipe (Haoran Wang, Tong Shen, Wei Zhang, Ling-Yu Duan, Tao Mei, "Classes Matter: A
Fine-grained Adversarial Approach to Cross-domain Semantic Segmentation", ECCV 2020, arXiv 2007.09222;
official code https://github.com/JDAI-CV/FADA, commit a1c6403 read: train_self_distill.py,
configs/deeplabv2_r101_tgt_self_distill.yaml, configs/deeplabv2_r101_tgt_synthia_self_distill.yaml,
core/datasets/build.py, core/datasets/transform.py, core/datasets/cityscapes_self_distill.py). The
pseudo-labels come from uda/pseudo_labels.py (`evaluate.py --save-pseudo DIR --pseudo-rule argmax`, with
the adapted model's align_corners from its checkpoint); train.py reads them as the source labels with
`--source cityscapes --pseudo-dir DIR`. The model starts from ImageNet weights (`--pretrained`), not
from the adapted model: the adapted model's knowledge reaches it only through the labels.

    L = CE(up(z), y_hat) + lambda_lovasz * Lovasz-softmax(softmax(up(z)), y_hat)

z: logits of the augmented pseudo-labelled image; up(.): bilinear upsampling to the crop size with
align_corners = --align-corners (True in RECIPE, as the official classifier); y_hat: pseudo-label, 255
ignored; lambda_lovasz = --lovasz-weight (0 in the official recipe: CE only; uda/source_only.py).

Augmentation, per image, in the official order (done here on the batch, in torch, on the device), all
random numbers from the method's generator:
1. colour jitter --selftrain-color-jitter (brightness, contrast, saturation, hue = 0.5 0.5 0.5 0.2;
   uda.augment.color_jitter: torchvision's ColorJitter, the four operations in an order per image);
2. random scale s ~ U(--selftrain-scale-range) = U(0.5, 1.5) of the image as delivered (bicubic image,
   antialiased when shrinking; nearest label);
3. random crop --selftrain-crop (1024x512, the official SOURCE_INPUT_SIZE_TRAIN; pad 0 / 255 where the
   scaled image is smaller);
4. horizontal flip with probability --selftrain-flip-prob (0.5).
The loader must therefore deliver whole images at full resolution: RECIPE's `crop` 2048x1024 (Cityscapes,
native size with --pseudo-dir); on the toy pass `--crop 256x128` (its whole images). Evaluation of this
stage is at full resolution in the official code (INPUT_SIZE_TEST 2048x1024): `python evaluate.py --ckpt
OUT/last.pt --input-size 2048x1024`.

Recipe (RECIPE below; each value's source beside it). BN: trainable (SyncBN under torchrun on GPU) in
the GTA5 config; the SYNTHIA config at commit a1c6403 freezes it (FREEZE_BN True since d3c7979; it was
False at 18c5386): pass `--bn frozen` for SYNTHIA -> Cityscapes.

DDP: gradients are averaged over ranks in common.optimizer_step.

Deviations (from the official code):
- Augmentation runs on the batch in torch rather than in PIL per item: the same operations and
  distributions, in float (PIL rounds to uint8 after each jitter operation and after the resize); the
  crop pads at the bottom / right (official: both sides), which only matters for scales below 0.5.
- Random numbers come from the method's generator (seeded by --seed and the rank, saved in the
  checkpoint), so a resumed run sees the same augmentation.
- train.py's loader also flips with probability 0.5 before this stage's flip; two independent 0.5
  flips still leave each image flipped with probability 0.5.
- The official code restarts the LR schedule on resume and leaves anomaly detection on; we do neither.
"""
import torch
import torch.nn.functional as F

from uda import common
from uda.augment import color_jitter
from uda.common import IGNORE_INDEX, UserError, optimizer_step, sgd
from uda.source_only import supervised_loss

GENERATOR_STREAM = "selftrain"  # common.method_generator's stream, named after the method (jitter, scale, crop, flip)


# --------------------------------------------------------------------------------------------------
# Geometric augmentation on the batch: random scale, crop (pad 0 / 255), flip
# --------------------------------------------------------------------------------------------------
def scale_crop_flip(images, labels, scale_range, crop, flip_prob, generator):
    """images (B, 3, H, W) in [0, 1], labels (B, H, W) int64 -> (B, 3, h, w), (B, h, w), crop = (w, h).

    Each image is resized by s ~ U(scale_range) (bicubic, antialiased when shrinking; label nearest),
    cropped at a random place to `crop` (padded with 0 / 255 when smaller), and flipped with flip_prob.
    """
    assert images.dim() == 4 and labels.shape == (images.shape[0],) + images.shape[2:]
    crop_w, crop_h = crop
    out_images, out_labels = [], []
    for image, label in zip(images, labels):  # per image: sizes differ after scaling
        s = scale_range[0] + (scale_range[1] - scale_range[0]) * torch.rand((), generator=generator).item()
        height, width = int(image.shape[1] * s), int(image.shape[2] * s)
        image = F.interpolate(image[None], size=(height, width), mode="bicubic", align_corners=False,
                              antialias=s < 1).clamp_(0.0, 1.0)[0]                     # (3, h', w')
        label = F.interpolate(label[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = int(torch.randint(0, image.shape[1] - crop_h + 1, (), generator=generator))
        left = int(torch.randint(0, image.shape[2] - crop_w + 1, (), generator=generator))
        image = image[:, top:top + crop_h, left:left + crop_w]
        label = label[top:top + crop_h, left:left + crop_w]
        if torch.rand((), generator=generator).item() < flip_prob:
            image, label = image.flip(-1), label.flip(-1)
        out_images.append(image)
        out_labels.append(label)
    return torch.stack(out_images), torch.stack(out_labels)  # (B, 3, h, w), (B, h, w)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
RECIPE = {
    "lr": 5e-4,                # configs/deeplabv2_r101_tgt_self_distill.yaml: SOLVER.BASE_LR
    "head_lr_mult": 10.0,      # train_self_distill.py: optimizer_cls at BASE_LR * 10
    "momentum": 0.9,           # core/configs/defaults.py: SOLVER.MOMENTUM
    "weight_decay": 5e-4,      # defaults.py: SOLVER.WEIGHT_DECAY
    "poly_power": 0.9,         # defaults.py: SOLVER.LR_METHOD 'poly', LR_POWER 0.9
    "iters": 31250,            # deeplabv2_r101_tgt_self_distill.yaml: SOLVER.MAX_ITER (the poly horizon)
    "stop_iter": 20000,        # deeplabv2_r101_tgt_self_distill.yaml: SOLVER.STOP_ITER
    # BATCH_SIZE 8 over 4 GPUs (2 each): this is the one-process value; under torchrun pass
    # --batch-size 8 / (number of processes)
    "batch_size": 8,
    "bn": "train",             # deeplabv2_r101_tgt_self_distill.yaml (GTA5): FREEZE_BN False (SYNTHIA: True)
    "crop": "2048x1024",       # whole Cityscapes images: the official dataset applies no resize before RandomScale
    "align_corners": True,     # classifier.py ASPP_Classifier_V2: F.interpolate(align_corners=True)
}
# Read by the tools through uda/methods.py (the contract in uda/source_only.py):
# a stage on another method's pseudo-labels (FADA's stage 4), not a benchmark row of its own
BENCHMARK_ROW = False
SIZE_FLAGS = {"--selftrain-crop": None}  # a pixel size, scaled by uda/bench/scale.py (None: its default)


class SelfTrain:
    """CE on pseudo-labelled target images with the distillation augmentations. One SGD optimizer."""

    needs_target = False  # the pseudo-labelled target IS the (labelled) source of this stage

    def __init__(self, model, args, env):
        check_args(args)
        self.model, self.env = model, env
        self.crop = common.parse_size(args.selftrain_crop, "--selftrain-crop")
        self.scale_range, self.flip_prob = tuple(args.selftrain_scale_range), args.selftrain_flip_prob
        self.jitter = tuple(args.selftrain_color_jitter)
        self.lovasz_weight, self.align_corners = args.lovasz_weight, args.align_corners
        self.generator = common.method_generator(args.seed, GENERATOR_STREAM)
        self.optimizer = sgd(model.param_groups(args.head_lr_mult), args.lr, args.momentum, args.weight_decay)
        self.optimizers = [self.optimizer]

    def augment(self, images, labels):
        """Steps 1-4 of the augmentation: (B, 3, H, W), (B, H, W) -> (B, 3, h, w), (B, h, w), (w, h) = crop."""
        images = color_jitter(images, *self.jitter, self.generator)
        return scale_crop_flip(images, labels, self.scale_range, self.crop, self.flip_prob, self.generator)

    def train_step(self, source, target, it):
        images, labels = self.augment(source["image"], source["label"])  # (B, 3, h, w), (B, h, w)
        self.optimizer.zero_grad(set_to_none=True)
        with self.env.autocast():
            _, logits = self.model(images)
        # fp32 before the upsampling, as the official loss sees fp32 logits
        ce, lovasz = supervised_loss(logits.float(), labels, self.lovasz_weight, self.align_corners)
        self.env.scaler.scale(ce + self.lovasz_weight * lovasz).backward()
        optimizer_step(self.optimizer, self.env.scaler)
        logged = {"ce": ce.detach()}
        if self.lovasz_weight:
            logged["lovasz"] = lovasz.detach()
        return logged

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])


def check_args(args):
    """One UserError per flag out of range that its argparse type lets through, before anything is built."""
    if not args.pseudo_dir:
        raise UserError("--method selftrain trains on pseudo-labels: pass --pseudo-dir DIR "
                        "(written by evaluate.py --save-pseudo DIR)")
    low, high = args.selftrain_scale_range
    if low > high:
        raise UserError(f"--selftrain-scale-range {low} {high}: expected MIN <= MAX")
    if args.selftrain_color_jitter[3] > 0.5:
        raise UserError(f"--selftrain-color-jitter {' '.join(map(str, args.selftrain_color_jitter))}: expected "
                        f"the hue amount in [0, 0.5] (torchvision ColorJitter)")


def add_arguments(parser):
    group = parser.add_argument_group("selftrain")
    group.add_argument("--selftrain-crop", default="1024x512",
                       help="WxH crop after random scaling (FADA self-distillation SOURCE_INPUT_SIZE_TRAIN: 1024x512)")
    group.add_argument("--selftrain-scale-range", type=common.positive_float, nargs=2, default=(0.5, 1.5),
                       metavar=("MIN", "MAX"),
                       help="random scale of the delivered image before the crop (FADA INPUT_SCALES_TRAIN: 0.5 1.5)")
    group.add_argument("--selftrain-flip-prob", type=common.fraction, default=0.5,
                       help="horizontal flip probability after the crop (FADA: 0.5; train.py's loader also flips "
                            "with 0.5, which composes to an overall 0.5)")
    group.add_argument("--selftrain-color-jitter", type=common.nonnegative_float, nargs=4,
                       default=(0.5, 0.5, 0.5, 0.2), metavar=("B", "C", "S", "H"),
                       help="brightness, contrast, saturation, hue jitter (FADA: 0.5 0.5 0.5 0.2; 0 0 0 0 disables)")


Method = SelfTrain
