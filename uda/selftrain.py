"""Self-training (FADA's "self-distillation" stage): a fresh network trained on pseudo-labelled target images.

Stage 4 of FADA's recipe (Wang et al., "Classes Matter: A Fine-grained Adversarial Approach to
Cross-domain Semantic Segmentation", ECCV 2020, arXiv 2007.09222; official code github.com/JDAI-CV/FADA,
commit a1c6403 read: train_self_distill.py, configs/deeplabv2_r101_tgt_self_distill.yaml,
core/datasets/transform.py). The pseudo-labels come from uda/pseudo_labels.py (`evaluate.py
--save-pseudo DIR --pseudo-rule argmax`); train.py reads them as the source labels with
`--source cityscapes --pseudo-dir DIR`. The model starts from ImageNet weights (`--pretrained`), not
from the adapted model: the adapted model's knowledge reaches it only through the labels.

    L = CE(up(z), y_hat)

z: logits of the augmented pseudo-labelled image; up(.): bilinear upsampling to the crop size
(align_corners=True, as the official classifier); y_hat: pseudo-label, 255 ignored.

Augmentation, per image, in the official order (done here on the batch, in torch, on the device):
1. colour jitter (brightness 0.5, contrast 0.5, saturation 0.5, hue 0.2; torchvision's ColorJitter
   maths: factors drawn in [1 - x, 1 + x], hue shift in [-h, h], the four operations in random order);
2. random scale s ~ U(0.5, 1.5) of the image as delivered (bicubic image, nearest label);
3. random crop --distill-crop (1024x512 = 512x1024 HxW; pad 0 / 255 where the scaled image is smaller);
4. horizontal flip with probability 0.5.
The loader must therefore deliver whole images at full resolution (Cityscapes 2048x1024: `--crop
2048x1024`; the toy's 256x128: `--crop 256x128`). Evaluation of this stage is at full resolution in the
official code: `python evaluate.py --ckpt OUT/last.pt --input-size 2048x1024`.

Recipe (official config): LR 5e-4 (head x10), SGD momentum 0.9, wd 5e-4, poly 0.9 over 31,250
iterations stopping at 20,000, global batch 8. BN: trainable (SyncBN under torchrun on GPU) for GTA5,
frozen for SYNTHIA (a backbone choice, see the README).

Deviations:
- Augmentation runs on the batch in torch rather than in PIL per item: same operations; colour jitter's
  contrast uses the mean of the image as delivered (PIL: the same image), the order of the four jitter
  operations is drawn once per batch (torchvision: per image), and randomness comes from a generator
  seeded by (--seed, rank, iteration) so a resumed run sees the same augmentation.
"""
import torch
import torch.nn.functional as F

from uda import common
from uda.common import IGNORE_INDEX, UserError, optimizer_step, sgd

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
EPS = 1e-8


# --------------------------------------------------------------------------------------------------
# Photometric augmentation on the batch (torchvision ColorJitter maths, vectorised over images)
# --------------------------------------------------------------------------------------------------
def grayscale(images):
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma."""
    weights = images.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)  # (B, 1, H, W)


def rgb_to_hsv(images):
    """(B, 3, H, W) RGB in [0, 1] -> (B, 3, H, W) HSV in [0, 1]; hue 0 for gray pixels."""
    r, g, b = images.unbind(dim=1)                                         # (B, H, W) each
    maxc, minc = images.max(dim=1).values, images.min(dim=1).values        # (B, H, W)
    delta = maxc - minc
    sat = delta / maxc.clamp(min=EPS)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, sat, maxc], dim=1)                            # (B, 3, H, W)


def hsv_to_rgb(hsv):
    """Inverse of rgb_to_hsv: (B, 3, H, W) HSV -> RGB."""
    hue, sat, val = hsv.unbind(dim=1)                                      # (B, H, W) each
    sector = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    sector = sector.long() % 6
    p, q, t = val * (1.0 - sat), val * (1.0 - sat * frac), val * (1.0 - sat * (1.0 - frac))
    # rows: the (r, g, b) sources of each of the six hue sectors
    table = torch.stack([torch.stack(x, dim=0) for x in
                         [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)]])  # (6, 3, B, H, W)
    index = sector[None, None].expand(1, 3, *sector.shape)                # (1, 3, B, H, W)
    return torch.gather(table, 0, index)[0].permute(1, 0, 2, 3)            # (B, 3, H, W)


def color_jitter(images, strength, generator):
    """Random brightness, contrast, saturation, hue per image, in a random order; images in [0, 1].

    images: (B, 3, H, W) float; strength: (brightness, contrast, saturation, hue) as torchvision's
    ColorJitter (0 disables an operation); generator: a CPU torch.Generator. Returns a new tensor.
    """
    assert images.dim() == 4 and images.shape[1] == 3 and len(strength) == 4
    batch = images.shape[0]
    out = images.float()

    def factors(amount):  # U(max(0, 1 - x), 1 + x) per image, (B, 1, 1, 1)
        low = max(0.0, 1.0 - amount)
        draw = torch.rand(batch, generator=generator) * (1.0 + amount - low) + low
        return draw.to(out.device).view(batch, 1, 1, 1)

    for op in torch.randperm(4, generator=generator).tolist():
        amount = strength[op]
        if amount <= 0:
            continue
        if op == 0:    # brightness: scale towards black
            out = (out * factors(amount)).clamp(0.0, 1.0)
        elif op == 1:  # contrast: blend with the image's mean luma
            mean = grayscale(out).mean(dim=(1, 2, 3), keepdim=True)       # (B, 1, 1, 1)
            f = factors(amount)
            out = (f * out + (1.0 - f) * mean).clamp(0.0, 1.0)
        elif op == 2:  # saturation: blend with the gray image
            f = factors(amount)
            out = (f * out + (1.0 - f) * grayscale(out)).clamp(0.0, 1.0)
        else:          # hue: rotate the hue circle by U(-h, h)
            shift = ((torch.rand(batch, generator=generator) * 2.0 - 1.0) * amount).to(out.device)
            hsv = rgb_to_hsv(out)
            hue = (hsv[:, 0] + shift.view(batch, 1, 1)) % 1.0
            out = hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))
    return out.to(images.dtype)


def step_generator(seed, it):
    """CPU generator for iteration `it` of this rank: resumable and distinct per rank."""
    return torch.Generator().manual_seed((seed * 1000003 + common.rank()) * 1000003 + it)


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
# Loss
# --------------------------------------------------------------------------------------------------
def cross_entropy(logits, labels):
    """CE of stride-s logits (B, C, h, w), upsampled (align_corners=True) to labels (B, H, W); fp32.

    255 pixels are ignored; 0 (with a graph) when every pixel is ignored.
    """
    assert logits.dim() == 4 and labels.dim() == 3 and logits.shape[0] == labels.shape[0]
    logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=True)
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
RECIPE = {}


class SelfTrain:
    """CE on pseudo-labelled target images with the distillation augmentations. One SGD optimizer."""

    needs_target = False  # the pseudo-labelled target IS the (labelled) source of this stage

    def __init__(self, model, args, env):
        if hasattr(args, "pseudo_dir") and not args.pseudo_dir:
            raise UserError("--method selftrain trains on pseudo-labels: pass --pseudo-dir DIR "
                            "(written by evaluate.py --save-pseudo DIR)")
        if not 0 < args.scale_range[0] <= args.scale_range[1]:
            raise UserError(f"--scale-range {args.scale_range}: expected 0 < MIN <= MAX")
        self.model, self.env, self.seed = model, env, args.seed
        self.crop = common.parse_size(args.distill_crop, "--distill-crop")
        self.scale_range, self.flip_prob, self.jitter = tuple(args.scale_range), args.flip_prob, args.color_jitter
        self.optimizer = sgd(model.param_groups(args.head_lr_mult), args.lr, args.momentum, args.weight_decay)
        self.optimizers = [self.optimizer]

    def augment(self, images, labels, it):
        generator = step_generator(self.seed, it)
        images = color_jitter(images, self.jitter, generator)
        return scale_crop_flip(images, labels, self.scale_range, self.crop, self.flip_prob, generator)

    def train_step(self, source, target, it):
        images, labels = self.augment(source["image"], source["label"], it)  # (B, 3, h, w), (B, h, w)
        self.optimizer.zero_grad(set_to_none=True)
        with self.env.autocast():
            _, logits = self.model(images)
        ce = cross_entropy(logits, labels)
        self.env.scaler.scale(ce).backward()
        optimizer_step(self.optimizer, self.env.scaler)
        return {"ce": ce.detach()}

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])


def add_arguments(parser):
    group = parser.add_argument_group("selftrain")
    group.add_argument("--distill-crop", default="1024x512",
                       help="WxH crop after random scaling (FADA self-distillation: 1024x512; toy: 128x64)")
    group.add_argument("--scale-range", type=float, nargs=2, default=(0.5, 1.5), metavar=("MIN", "MAX"),
                       help="random scale of the delivered image before the crop (FADA: 0.5 1.5)")
    group.add_argument("--flip-prob", type=float, default=0.5,
                       help="horizontal flip probability after the crop (FADA: 0.5; train.py's loader also flips "
                            "with 0.5, which composes to an overall 0.5)")
    group.add_argument("--color-jitter", type=float, nargs=4, default=(0.5, 0.5, 0.5, 0.2),
                       metavar=("B", "C", "S", "H"),
                       help="brightness, contrast, saturation, hue jitter (FADA: 0.5 0.5 0.5 0.2; 0 disables)")
    parser.set_defaults(lr=5e-4)  # FADA's self-distillation config: BASE_LR 5e-4


Method = SelfTrain
