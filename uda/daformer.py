"""DAFormer: the DACS self-training base with DAFormer's training strategies (`--method daformer`).

Papers:
- Hoyer, Dai, Van Gool, "DAFormer: Improving Network Architectures and Training Strategies for
  Domain-Adaptive Semantic Segmentation", CVPR 2022, arXiv 2111.14887.
- Tranheden, Olsson, Pinto, Svensson, "DACS: Domain Adaptation via Cross-domain Mixed Sampling",
  WACV 2021, arXiv 2007.08702 (ClassMix across domains, the strong augmentation).
Official code checked: github.com/lhoyer/DAFormer commit e6f6e04 (mmseg/models/uda/dacs.py,
mmseg/models/utils/dacs_transforms.py, mmseg/utils/utils.py, configs/_base_/uda/dacs*.py and
configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py); the copy inside
github.com/RainJamesY/DIDA commit 8b9c5bf is the same base.

Symbols: x_s, y_s source crop and labels; x_t target crop; f_theta the student, f_xi the EMA teacher,
f_I a frozen ImageNet copy of the backbone; up(.) bilinear upsampling to the crop size; CE_i the
per-pixel cross-entropy (0 at label 255); N = B H W, every mean below divides by all N pixels
(mmseg's reduction: ignored pixels contribute 0 and stay in the denominator).

    Teacher       xi <- a_t xi + (1 - a_t) theta,  a_t = min(1 - 1/(t+1), --ema-alpha)   (parameters only)
    Pseudo-label  P = softmax(up(f_xi(x_t))),  yhat = argmax_c P,
                  q = #{i : max_c P_i >= --pseudo-threshold} / N  (one scalar per batch),
                  w_i = q, except w_i = 0 in the top --pseudo-ignore-top / bottom --pseudo-ignore-bottom rows
    ClassMix      M_b = [y_s,b in S_b], S_b = ceil(n/2) of the n classes present in the source batch,
                  x_m = M x_s + (1 - M) x_t,  y_m = M y_s + (1 - M) yhat,  w_m = M + (1 - M) w,
                  then colour jitter and Gaussian blur (strong_augment)
    L_src = (1/N) sum_i CE_i(up(f_theta(x_s)), y_s)
    L_fd  = mean over cells j in T of || F_theta(x_s)_j - F_I(x_s)_j ||_2,  F = deepest encoder map,
            T = cells whose ratio-downscaled source label is a thing class (--fd-classes); 0 if T is empty
    L_mix = (1/N) sum_i w_m,i CE_i(up(f_theta(x_m)), y_m)

    L = L_src + lambda_fd L_fd + L_mix          (lambda_fd = --fd-lambda)

Recipe (set as defaults by add_arguments): AdamW lr 6e-5, betas (0.9, 0.999), weight decay 0.01, the
head x10 (--head-lr-mult) and no decay on norm / pos_block (the model's param_groups), linear warmup
1500 iterations then poly power 1, 40k iterations, batch 2 source + 2 target, Rare Class Sampling of the
source (--source-sampler rcs, implemented by the data loader; T = --rcs-temperature 0.01), source crops
re-drawn while one class covers > 75% (--cat-max-ratio 0.75), 512x512 crops of real data (when --crop
is not given), SYNTHIA trained in the 19 Cityscapes classes (--synthia-classes 19; mIoU16/13 reported).
Evaluation uses the STUDENT (DAFormer evaluates the student as well).

Under DDP, train.py does not wrap the model: gradients are averaged explicitly in
common.optimizer_step, so the teacher (derived from identical parameters) stays identical on every
rank. The quality weight q is computed per rank, as DAFormer (single GPU) computes it per batch.

Deviations:
- L_src and L_fd are back-propagated together in one backward (DAFormer: two backward calls, the
  first with retain_graph); the gradient is the same sum.
- The frozen ImageNet model f_I: weights from --fd-pretrained, else a frozen copy of the model as
  train.py built it (its --pretrained weights, e.g. mit_b5.pth). On the toy (no ImageNet weights) this
  is the random initial network: L_fd then only anchors things to their initial features.
- Strong augmentation is re-implemented in torch (DACS calls kornia 0.5 ColorJitter / GaussianBlur2d):
  same operations, ranges, probabilities and border mode; random numbers come from torch's generator.
- --pseudo-ignore-top/--pseudo-ignore-bottom default to DAFormer's 15 / 120 rows only for a Cityscapes
  target (they mask Cityscapes' rectification border and ego-car at 1024x512); 0 for other targets,
  whose crops (e.g. the toy's 64 rows) would otherwise be all masked.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from uda import datasets, models
from uda.common import IGNORE_INDEX, UserError, optimizer_step

# DAFormer configs/_base_/uda/dacs_a999_fdthings.py: the "thing" classes, as Cityscapes trainIds
THING_TRAINIDS = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
# DAFormer gta2cs ..._croppl_... config: rows of a Cityscapes 512 crop whose pseudo-labels get weight 0
CITYSCAPES_IGNORE_TOP, CITYSCAPES_IGNORE_BOTTOM = 15, 120
# DACS dacs_transforms.gaussian_blur: sigma ~ U(0.15, 1.15), kernel = odd rounding of 10% of the side
BLUR_SIGMA_RANGE = (0.15, 1.15)
BLUR_KERNEL_FRACTION = 0.1
ADAMW_BETAS = (0.9, 0.999)  # DAFormer configs/_base_/schedules/adamw.py
DAFORMER_CROP = "512x512"   # DAFormer configs/_base_/datasets/uda_*_to_cityscapes_512x512.py
TWO_PI = 2.0 * math.pi
HSV_EPS = 1e-8  # kornia rgb_to_hsv adds this to V before dividing (saturation of black pixels)


# --------------------------------------------------------------------------------------------------
# Losses and pseudo-labels: pure functions of tensors
# --------------------------------------------------------------------------------------------------
def upsample_to(x, size):
    """Bilinear upsampling (align_corners=False) of (B, C, h, w) to size = (H, W)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def weighted_cross_entropy(logits, labels, weight=None):
    """(1/N) sum_i w_i CE_i over all N = B H W pixels (mmseg's mean: label 255 gives 0, stays in N).

    logits: (B, C, H, W) any float dtype (computed in fp32); labels: (B, H, W) int64, 255 = ignore;
    weight: (B, H, W) float or None (all ones). Returns a scalar.
    """
    assert logits.dim() == 4 and labels.shape == (logits.shape[0],) + logits.shape[2:]
    per_pixel = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")  # (B, H, W)
    if weight is not None:
        assert weight.shape == labels.shape
        per_pixel = per_pixel * weight.float()
    return per_pixel.mean()


def pseudo_labels(probs, threshold, ignore_top, ignore_bottom):
    """DACS/DAFormer pseudo-labels and their weight from class probabilities.

    probs: (B, C, H, W) fp32 probabilities at the crop size. Returns labels (B, H, W) int64 = argmax,
    weight (B, H, W) fp32 = one scalar q (the share of pixels whose max prob >= threshold) everywhere,
    0 in the top `ignore_top` and bottom `ignore_bottom` rows; and q as a 0-dim tensor.
    """
    assert probs.dim() == 4
    confidence, labels = probs.max(dim=1)                                   # (B, H, W) each
    quality = (confidence >= threshold).float().mean()                      # () share over all B H W
    weight = quality.expand_as(confidence).clone()                          # (B, H, W)
    height = weight.shape[1]
    if ignore_top + ignore_bottom >= height:
        raise UserError(f"--pseudo-ignore-top {ignore_top} + --pseudo-ignore-bottom {ignore_bottom} rows "
                        f"cover the whole {height}-row crop: every pseudo-label would get weight 0")
    if ignore_top > 0:
        weight[:, :ignore_top] = 0.0
    if ignore_bottom > 0:
        weight[:, height - ignore_bottom:] = 0.0
    return labels, weight, quality


def downscale_label_ratio(labels, factor, min_ratio, num_classes):
    """DAFormer's label downscaling for the feature distance (mmseg/utils/utils.py).

    labels: (B, H, W) int64 with 255; average-pool the one-hot labels (255 as an extra class C) over
    factor x factor cells, take the winning class, and set 255 where it is 255 or holds a share
    < min_ratio. Returns (B, H // factor, W // factor) int64.
    """
    assert labels.dim() == 3 and factor > 1
    onehot_labels = labels.clone()
    onehot_labels[onehot_labels == IGNORE_INDEX] = num_classes
    onehot = F.one_hot(onehot_labels, num_classes + 1).permute(0, 3, 1, 2).float()  # (B, C+1, H, W)
    shares = F.avg_pool2d(onehot, kernel_size=factor)                              # (B, C+1, H/f, W/f)
    ratio, small = shares.max(dim=1)                                                # (B, H/f, W/f)
    small[small == num_classes] = IGNORE_INDEX
    small[ratio < min_ratio] = IGNORE_INDEX
    return small


def feature_distance(student, frozen, mask):
    """Mean L2 distance over masked cells: (1/|T|) sum_{j in T} ||student_j - frozen_j||_2.

    student, frozen: (B, D, h, w) (fp32 computation); mask: (B, h, w) bool. An empty mask gives 0
    with a graph (DAFormer returns the NaN mean of an empty set, harmless only because it has no
    gradient; a NaN would stop our loop).
    """
    assert student.shape == frozen.shape and mask.shape == (student.shape[0],) + student.shape[2:]
    distance = (student.float() - frozen.float()).norm(p=2, dim=1)          # (B, h, w)
    if not mask.any():
        return distance.sum() * 0.0
    return distance[mask].mean()                                             # mean over |T| cells


def fd_mask(labels, feature_size, thing_indices, min_ratio, num_classes):
    """Cells of the (h, w) feature grid whose downscaled source label is a thing class.

    labels: (B, H, W) int64; feature_size: (h, w); thing_indices: (T,) int64 class indices.
    Returns (B, h, w) bool.
    """
    factor = labels.shape[-1] // feature_size[-1]
    small = downscale_label_ratio(labels, factor, min_ratio, num_classes)   # (B, H/f, W/f)
    if tuple(small.shape[-2:]) != tuple(feature_size):
        raise UserError(f"--crop: the crop {labels.shape[-1]}x{labels.shape[-2]} is not a multiple of the "
                        f"encoder stride {factor}, needed by the feature distance (or pass --fd-lambda 0)")
    return (small[..., None] == thing_indices).any(-1)                      # (B, h, w)


@torch.no_grad()
def ema_update(teacher, student, it, alpha):
    """xi <- a xi + (1 - a) theta over parameters, a = min(1 - 1/(it+1), alpha) (DACS/DAFormer).

    At it = 0, a = 0: the teacher becomes a copy of the student. Buffers (BN statistics) are not
    averaged: the teacher keeps its own, updated by its forward passes in train mode.
    """
    decay = min(1.0 - 1.0 / (it + 1), alpha)
    teacher_params = [p.data for p in teacher.parameters()]
    student_params = [p.data for p in student.parameters()]
    torch._foreach_mul_(teacher_params, decay)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - decay)
    return decay


def class_mix_masks(labels):
    """DACS ClassMix masks: per image, ceil(n/2) of the n values present in the WHOLE source batch
    (including 255 when present: a DACS quirk kept as is), drawn without replacement.

    labels: (B, H, W) int64. Returns (B, H, W) bool, True = paste the source pixel.
    """
    classes = torch.unique(labels)                                          # (n,) sorted values
    n = classes.numel()
    masks = []
    for b in range(labels.shape[0]):  # a few images; pixels are vectorised
        chosen = classes[torch.randperm(n)[: (n + n % 2) // 2].to(classes.device)]  # (ceil(n/2),)
        masks.append(torch.isin(labels[b], chosen))                          # (H, W)
    return torch.stack(masks)                                               # (B, H, W)


def mix(mask, source, target):
    """M * source + (1 - M) * target for images (B, 3, H, W) or maps (B, H, W); mask (B, H, W) bool."""
    return torch.where(mask[:, None] if source.dim() == 4 else mask, source, target)


# --------------------------------------------------------------------------------------------------
# Strong augmentation in torch (DACS: kornia ColorJitter(0.2, 0.2, 0.2, 0.2) and GaussianBlur2d)
# --------------------------------------------------------------------------------------------------
def rgb_to_hsv(images):
    """(B, 3, H, W) RGB in [0, 1] -> HSV with hue in radians [0, 2 pi), as kornia.color.rgb_to_hsv."""
    r, g, b = images.unbind(1)                                              # (B, H, W) each
    maxc, argmax = images.max(dim=1)                                        # (B, H, W)
    minc = images.min(dim=1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    sector = torch.stack([((g - b) / safe) % 6, (b - r) / safe + 2, (r - g) / safe + 4], dim=1)  # (B, 3, H, W)
    hue = sector.gather(1, argmax[:, None]).squeeze(1) * (TWO_PI / 6)
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    saturation = delta / (maxc + HSV_EPS)
    return torch.stack([hue, saturation, maxc], dim=1)


def hsv_to_rgb(hsv):
    """Inverse of rgb_to_hsv: (B, 3, H, W) HSV (hue in radians, any real value) -> RGB."""
    hue, sat, val = hsv.unbind(1)
    h6 = torch.remainder(hue, TWO_PI) / (TWO_PI / 6)                        # (B, H, W) in [0, 6)
    sector = torch.floor(h6)
    frac = h6 - sector
    p, q, t = val * (1 - sat), val * (1 - frac * sat), val * (1 - (1 - frac) * sat)
    candidates = torch.stack([val, p, q, t], dim=1)                        # (B, 4, H, W)
    # (r, g, b) as indices into (v, p, q, t) for the six hue sectors
    table = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], device=hsv.device)
    index = table[sector.long().clamp(0, 5)].permute(0, 3, 1, 2)           # (B, 3, H, W)
    return candidates.gather(1, index)


def adjust_brightness(images, delta):
    """kornia 0.5 brightness: additive, clipped to [0, 1]. delta: (B,)."""
    return (images + delta.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(images, factor):
    """kornia 0.5 contrast: multiplicative, clipped to [0, 1]. factor: (B,)."""
    return (images * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_saturation(images, factor):
    """Scale S in HSV, clip S to [0, 1]. factor: (B,)."""
    hue, sat, val = rgb_to_hsv(images).unbind(1)
    sat = (sat * factor.view(-1, 1, 1)).clamp(0, 1)
    return hsv_to_rgb(torch.stack([hue, sat, val], dim=1))


def adjust_hue(images, shift):
    """Rotate the hue by `shift` radians (B,) modulo 2 pi."""
    hue, sat, val = rgb_to_hsv(images).unbind(1)
    hue = torch.remainder(hue + shift.view(-1, 1, 1), TWO_PI)
    return hsv_to_rgb(torch.stack([hue, sat, val], dim=1))


def color_jitter(images, brightness, contrast, saturation, hue, order):
    """Apply the four adjustments in `order` (a permutation of 0..3) with per-image factors (B,)."""
    ops = [lambda x: adjust_brightness(x, brightness), lambda x: adjust_contrast(x, contrast),
           lambda x: adjust_saturation(x, saturation), lambda x: adjust_hue(x, hue)]
    for index in order:
        images = ops[int(index)](images)
    return images


def blur_kernel_size(side):
    """DACS: ceil(10% of the side), minus one when even (51 for 512, 7 for 64)."""
    size = math.ceil(BLUR_KERNEL_FRACTION * side)
    return size if size % 2 == 1 else size - 1


def gaussian_blur(images, sigma):
    """Separable Gaussian blur with per-image sigma (B,), reflect border, kernel from blur_kernel_size.

    images: (B, 3, H, W). Kernel taps as kornia.filters.get_gaussian_kernel1d, normalised to sum 1.
    """
    batch, channels, height, width = images.shape
    out = images.reshape(1, batch * channels, height, width)               # one depthwise conv
    for dim, side in ((2, height), (3, width)):
        size = blur_kernel_size(side)
        if size < 2:
            continue
        x = torch.arange(size, device=images.device, dtype=images.dtype) - size // 2  # (k,)
        taps = torch.exp(-x[None] ** 2 / (2 * sigma.to(images)[:, None] ** 2))        # (B, k)
        taps = (taps / taps.sum(1, keepdim=True)).repeat_interleave(channels, 0)       # (B*3, k)
        half = size // 2
        if dim == 2:
            out = F.conv2d(F.pad(out, (0, 0, half, half), mode="reflect"), taps[:, None, :, None],
                           groups=batch * channels)
        else:
            out = F.conv2d(F.pad(out, (half, half, 0, 0), mode="reflect"), taps[:, None, None, :],
                           groups=batch * channels)
    return out.reshape(batch, channels, height, width)


def strong_augment(images, jitter_strength, jitter_prob, blur_prob):
    """DACS strong augmentation of a (B, 3, H, W) batch in [0, 1]: colour jitter, then blur.

    Whether jitter / blur happen is drawn once for the batch (DACS draws them once per iteration);
    factors, order and sigma per image (DACS calls kornia once per image). Random numbers: torch CPU.
    """
    batch = images.shape[0]
    if torch.rand(()) < jitter_prob:
        def uniform(low, high):
            return (low + (high - low) * torch.rand(batch)).to(images)
        s = jitter_strength
        brightness, contrast = uniform(-s, s), uniform(1 - s, 1 + s)
        saturation, hue = uniform(1 - s, 1 + s), uniform(-s, s) * TWO_PI
        orders = [torch.randperm(4) for _ in range(batch)]
        images = torch.cat([color_jitter(images[b:b + 1], brightness[b:b + 1], contrast[b:b + 1],
                                         saturation[b:b + 1], hue[b:b + 1], orders[b]) for b in range(batch)])
    if torch.rand(()) < blur_prob:
        low, high = BLUR_SIGMA_RANGE
        images = gaussian_blur(images, low + (high - low) * torch.rand(batch))
    return images


def disable_stochastic_layers(module):
    """Dropout and drop-path off while the module stays in train mode (DAFormer's teacher)."""
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ == "DropPath":
            m.training = False


def adamw(param_groups, lr, weight_decay):
    """AdamW over {'params', 'lr_mult'[, 'weight_decay']} groups, recording each group's base_lr."""
    groups = [dict(g, base_lr=lr * g.get("lr_mult", 1.0), lr=lr * g.get("lr_mult", 1.0)) for g in param_groups]
    return torch.optim.AdamW(groups, lr=lr, betas=ADAMW_BETAS, weight_decay=weight_decay)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
RECIPE = {}


class DAFormer:
    """DACS self-training with DAFormer's EMA teacher, thing-class feature distance and recipe.

    Subclasses (DIDA) extend one iteration through four hooks: after_source, teacher_view,
    refine_teacher_probs and extra_mix_losses.
    """

    needs_target = True

    def __init__(self, model, args, env):
        self.model, self.env, self.args = model, env, args
        if args.crop is None and datasets.default_crop(args.source) is None:
            args.crop = DAFORMER_CROP  # real data: DAFormer's crops (train.py builds the loaders after this)
        space = env.space
        self.num_classes = space.num_classes
        self.teacher = copy.deepcopy(model)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.train()
        disable_stochastic_layers(self.teacher)
        cityscapes_target = (args.target or "").startswith("cityscapes")
        self.ignore_top = args.pseudo_ignore_top if args.pseudo_ignore_top is not None else (
            CITYSCAPES_IGNORE_TOP if cityscapes_target else 0)
        self.ignore_bottom = args.pseudo_ignore_bottom if args.pseudo_ignore_bottom is not None else (
            CITYSCAPES_IGNORE_BOTTOM if cityscapes_target else 0)
        things = [space.trainids.index(t) for t in args.fd_classes if t in space.trainids]
        self.thing_indices = torch.tensor(things, dtype=torch.long, device=env.device)
        self.fd_model = self.build_fd_model(model, args, env) if args.fd_lambda > 0 else None
        self.optimizer = adamw(model.param_groups(args.head_lr_mult), args.lr, args.weight_decay)
        self.optimizers = [self.optimizer]

    @staticmethod
    def build_fd_model(model, args, env):
        """The frozen ImageNet network of the feature distance (see Deviations)."""
        if args.fd_pretrained:
            frozen = models.build_model(args.backbone, env.space.num_classes, bn=getattr(args, "bn", "auto"))
            models.load_pretrained(frozen, args.fd_pretrained, args.backbone)
            frozen.to(env.device)
        else:
            frozen = copy.deepcopy(model)
        for p in frozen.parameters():
            p.requires_grad_(False)
        return frozen.eval()

    # ---- hooks (no-ops here; DIDA overrides them) ----
    def after_source(self, features, labels, it):
        """Called with the student's detached source features (B, D, h, w) and labels (B, H, W)."""

    def teacher_view(self, images):
        """The target view the teacher sees (DAFormer: the crop itself)."""
        return images

    def refine_teacher_probs(self, probs, teacher_features, ctx):
        """Turn the teacher's class probabilities (B, C, H, W) into those pseudo-labels come from."""
        return probs

    def extra_mix_losses(self, features, logits, ctx):
        """Extra weighted loss terms on the mixed batch: dict name -> (weighted loss, logged value)."""
        return {}

    # ---- one iteration ----
    def train_step(self, source, target, it):
        args, env, model = self.args, self.env, self.model
        xs, ys, xt = source["image"], source["label"], target["image"]
        size = tuple(ys.shape[-2:])
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.teacher, model, it, args.ema_alpha)
        terms = {}

        # 1. source: supervised CE (+ feature distance); backward frees the source graph before mixing
        with env.autocast():
            if self.fd_model is None:
                features_s, logits_s = model(xs)
            else:  # the deepest encoder map of the same forward, for the feature distance
                features_s, logits_s, student_enc = model(xs, with_encoder=True)
                with torch.no_grad():
                    frozen_enc = self.fd_model.encoder_features(xs)
        loss_src = weighted_cross_entropy(upsample_to(logits_s, size), ys)
        terms["src"] = loss_src.detach()
        loss = loss_src
        if self.fd_model is not None:
            mask = fd_mask(ys, student_enc.shape[-2:], self.thing_indices, args.fd_min_ratio, self.num_classes)
            loss_fd = feature_distance(student_enc, frozen_enc, mask)
            loss = loss + args.fd_lambda * loss_fd
            terms["fd"] = loss_fd.detach()
        self.after_source(features_s.detach(), ys, it)
        env.scaler.scale(loss).backward()
        del features_s, logits_s, loss

        # 2. teacher pseudo-labels on the target
        ctx = {"size": size}
        with torch.no_grad():
            with env.autocast():
                features_t, logits_t = self.teacher(self.teacher_view(xt))
            probs = torch.softmax(upsample_to(logits_t.float(), size), dim=1)  # (B, C, H, W) fp32
            ctx["teacher_probs"] = probs
            probs = self.refine_teacher_probs(probs, features_t, ctx)
            labels_t, weight_t, quality = pseudo_labels(probs, args.pseudo_threshold, self.ignore_top,
                                                        self.ignore_bottom)
            terms["pl_quality"] = quality

            # 3. ClassMix + strong augmentation
            mask = class_mix_masks(ys)                                          # (B, H, W) bool
            ctx["mix_mask"] = mask
            xm = strong_augment(mix(mask, xs, xt), args.color_jitter_strength, args.color_jitter_prob,
                                args.blur_prob)
            ym = mix(mask, ys, labels_t)
            wm = mix(mask, torch.ones_like(weight_t), weight_t)
        with env.autocast():
            features_m, logits_m = model(xm)
        loss_mix = weighted_cross_entropy(upsample_to(logits_m, size), ym, wm)
        terms["mix"] = loss_mix.detach()
        loss = loss_mix
        for name, (weighted, value) in self.extra_mix_losses(features_m, logits_m, ctx).items():
            loss = loss + weighted
            terms[name] = value
        env.scaler.scale(loss).backward()
        optimizer_step(self.optimizer, env.scaler)
        return terms

    def state_dict(self):
        state = {"optimizer": self.optimizer.state_dict(), "teacher": self.teacher.state_dict()}
        if self.fd_model is not None:
            state["fd_model"] = self.fd_model.state_dict()
        return state

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.teacher.load_state_dict(state["teacher"])
        if self.fd_model is not None:
            self.fd_model.load_state_dict(state["fd_model"])


def add_arguments(parser):
    """DAFormer's flags; also switches the common defaults to DAFormer's recipe."""
    parser.set_defaults(lr=6e-5, head_lr_mult=10.0, weight_decay=0.01, poly_power=1.0, warmup_iters=1500,
                        iters=40000, batch_size=2, source_sampler="rcs", cat_max_ratio=0.75,
                        synthia_classes=19)
    group = parser.add_argument_group("daformer (DACS self-training base)")
    group.add_argument("--ema-alpha", type=float, default=0.999,
                       help="EMA teacher decay cap: a_t = min(1 - 1/(t+1), alpha) (DAFormer 0.999, DACS 0.99)")
    group.add_argument("--pseudo-threshold", type=float, default=0.968,
                       help="confidence for the pseudo-label quality weight q = share of pixels above it")
    group.add_argument("--pseudo-ignore-top", type=int, default=None,
                       help="top rows of the target crop whose pseudo-labels get weight 0 "
                            "(default: 15 for a Cityscapes target, else 0)")
    group.add_argument("--pseudo-ignore-bottom", type=int, default=None,
                       help="bottom rows with weight 0 (ego-car; default: 120 for a Cityscapes target, else 0)")
    group.add_argument("--fd-lambda", type=float, default=0.005,
                       help="weight of the thing-class ImageNet feature distance (0 turns it off)")
    group.add_argument("--fd-classes", type=int, nargs="*", default=list(THING_TRAINIDS),
                       help="Cityscapes trainIds of the classes the feature distance applies to")
    group.add_argument("--fd-min-ratio", type=float, default=0.75,
                       help="a downscaled label cell keeps its class only if it covers this share")
    group.add_argument("--fd-pretrained", default=None, metavar="FILE",
                       help="ImageNet weights of the frozen feature-distance network (default: a frozen "
                            "copy of the initial model, i.e. the --pretrained weights)")
    group.add_argument("--color-jitter-strength", type=float, default=0.2,
                       help="brightness +-s (additive), contrast and saturation x[1-s, 1+s], hue +-s turns")
    group.add_argument("--color-jitter-prob", type=float, default=0.8,
                       help="probability of colour jitter per iteration (DACS: 1 - 0.2)")
    group.add_argument("--blur-prob", type=float, default=0.5, help="probability of Gaussian blur per iteration")


Method = DAFormer
