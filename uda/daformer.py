"""DAFormer: the DACS self-training base with DAFormer's training strategies (`--method daformer`).

Copy with: uda/common.py, uda/augment.py, uda/models.py, uda/mit.py (models.py builds the frozen network of
--daformer-fd-pretrained; mit.py is its MiT backbone).

Papers:
- Hoyer, Dai, Van Gool, "DAFormer: Improving Network Architectures and Training Strategies for
  Domain-Adaptive Semantic Segmentation", CVPR 2022, arXiv 2111.14887.
- Tranheden, Olsson, Pinto, Svensson, "DACS: Domain Adaptation via Cross-domain Mixed Sampling",
  WACV 2021, arXiv 2007.08702 (ClassMix across domains, the strong augmentation).
Official code checked: github.com/lhoyer/DAFormer commit e6f6e04 (mmseg/models/uda/dacs.py,
mmseg/models/utils/dacs_transforms.py, mmseg/utils/utils.py, configs/_base_/uda/dacs*.py and
configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py; the configs behind
RECIPE re-read at 438603d); the copy inside github.com/RainJamesY/DIDA commit 8b9c5bf is the same base.

Symbols: x_s, y_s source crop and labels; x_t target crop; f_theta the student, f_xi the EMA teacher,
f_I a frozen ImageNet copy of the backbone; up(.) bilinear upsampling to the crop size (--align-corners,
False as mmseg); CE_i the per-pixel cross-entropy (0 at label 255); N = B H W, every mean below divides
by all N pixels (mmseg's reduction: ignored pixels contribute 0 and stay in the denominator).

    Teacher       xi <- a_t xi + (1 - a_t) theta,  a_t = min(1 - 1/(t+1), --daformer-ema-alpha)  (parameters only)
    Pseudo-label  P = softmax(up(f_xi(x_t))),  yhat = argmax_c P,
                  q = #{i : max_c P_i >= --daformer-pseudo-threshold} / N  (one scalar per batch),
                  w_i = q, except w_i = 0 in the top --daformer-pseudo-ignore-top and bottom
                  --daformer-pseudo-ignore-bottom rows
    ClassMix      M_b = [y_s,b in S_b], S_b = ceil(n/2) of the n classes present in the source batch,
                  x_m = M x_s + (1 - M) x_t,  y_m = M y_s + (1 - M) yhat,  w_m = M + (1 - M) w,
                  then DACS colour jitter (strength --daformer-jitter-strength, probability
                  --daformer-jitter-prob) and Gaussian blur (--daformer-blur-prob): augment.dacs_strong_augment
    L_src = (1/N) sum_i CE_i(up(f_theta(x_s)), y_s)
    L_fd  = mean over cells j in T of || F_theta(x_s)_j - F_I(x_s)_j ||_2,  F = deepest encoder map,
            T = cells whose ratio-downscaled source label (share >= --daformer-fd-min-ratio) is a thing
            class (--daformer-fd-classes)
    L_mix = (1/N) sum_i w_m,i CE_i(up(f_theta(x_m)), y_m)

    L = L_src + lambda_fd L_fd + lambda_mix L_mix   (lambda_fd = --daformer-lambda-fd; 0 turns f_I off;
                                                    lambda_mix = --daformer-lambda-mix, 1 as DAFormer)

lambda_mix 0 leaves the supervised part L_src + lambda_fd L_fd with DAFormer's recipe (the ablation of its
self-training): no teacher forward, no ClassMix, no mixed forward (the EMA update stays: it is cheap and
draws no random numbers).

Recipe (RECIPE below): AdamW lr 6e-5, betas (0.9, 0.999), weight decay 0.01, the head x10 and no decay
on norm / pos_block (the model's param_groups), linear warmup 1500 iterations then poly power 1, 40k
iterations, batch 2 source + 2 target, Rare Class Sampling of the source (implemented by the data
loader), source crops re-drawn while one class covers > 75%, 512x512 crops of real data, SYNTHIA in the
19 Cityscapes classes (mIoU16/13 reported). Evaluation uses the STUDENT, as DAFormer's.

Multi-GPU: gradients are averaged in common.optimizer_step, so the teacher stays identical on every rank;
q is computed per rank, as DAFormer (single GPU) computes it per batch.

Deviations:
- L_src and L_fd are back-propagated together in one backward (DAFormer: two backward calls, the
  first with retain_graph); the gradient is the same sum.
- L_fd over an empty T is 0 (DAFormer: the NaN mean of an empty set, harmless there only because it has
  no gradient; a NaN would stop our loop).
- The frozen ImageNet model f_I: weights from --daformer-fd-pretrained, else a frozen copy of the model
  as train.py built it (its --pretrained weights, e.g. mit_b5.pth). On the toy (no ImageNet weights)
  this is the random initial network: L_fd then only anchors things to their initial features.
- Strong augmentation in torch with kornia 0.5's maths (uda/augment.py; DACS calls kornia ColorJitter /
  GaussianBlur2d): same operations, ranges, probabilities and border mode.
- Random numbers: the ClassMix class choice, jitter and blur draw from the method's own generator
  (common.method_generator, saved in the checkpoint; DACS draws from the global numpy / torch RNGs), so
  a resumed run is exact and evaluation can never shift them.
- --daformer-pseudo-ignore-top/-bottom default to DAFormer's 15 / 120 rows only for a Cityscapes
  target (they mask Cityscapes' rectification border and ego-car at 1024x512); 0 for other targets,
  whose crops (e.g. the toy's 64 rows) would otherwise be all masked.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from uda import common, models  # models: only to build the frozen network of --daformer-fd-pretrained
from uda.augment import dacs_strong_augment
from uda.common import IGNORE_INDEX, UserError, optimizer_step, upsample

GENERATOR_STREAM = "daformer"  # common.method_generator's stream, named after the method
# DAFormer configs/_base_/uda/dacs_a999_fdthings.py: the "thing" classes, as Cityscapes trainIds
THING_TRAINIDS = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
# DAFormer gta2cs ..._croppl_... config: rows of a Cityscapes 512 crop whose pseudo-labels get weight 0
CITYSCAPES_IGNORE_TOP, CITYSCAPES_IGNORE_BOTTOM = 15, 120
ADAMW_BETAS = (0.9, 0.999)  # DAFormer configs/_base_/schedules/adamw.py


# --------------------------------------------------------------------------------------------------
# Losses, pseudo-labels, mixing: pure functions of tensors
# --------------------------------------------------------------------------------------------------
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
        raise UserError(f"--daformer-pseudo-ignore-top {ignore_top} + --daformer-pseudo-ignore-bottom "
                        f"{ignore_bottom} rows cover the whole {height}-row crop: every pseudo-label would "
                        f"get weight 0")
    if ignore_top > 0:
        weight[:, :ignore_top] = 0.0
    if ignore_bottom > 0:
        weight[:, height - ignore_bottom:] = 0.0
    return labels, weight, quality


def downscale_label_ratio(labels, factor, min_ratio, num_classes):
    """DAFormer's label downscaling for the feature distance (mmseg/utils/utils.py).

    labels: (B, H, W) int64 with 255; average-pool the one-hot labels (255 as an extra class C) over
    factor x factor cells, take the winning class, and set 255 where it is 255 or holds a share
    < min_ratio. Returns (B, H // factor, W // factor) int64. (Not common.downsample_labels: DAFormer
    needs the share of the winning class, not the nearest pixel.)
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


def fd_mask(labels, feature_size, thing_indices, min_ratio, num_classes):
    """Cells of the (h, w) feature grid whose downscaled source label is a thing class.

    labels: (B, H, W) int64; feature_size: (h, w); thing_indices: (T,) int64 class indices.
    Returns (B, h, w) bool.
    """
    factor = labels.shape[-1] // feature_size[-1]
    small = downscale_label_ratio(labels, factor, min_ratio, num_classes)   # (B, H/f, W/f)
    if tuple(small.shape[-2:]) != tuple(feature_size):
        raise UserError(f"--crop: the crop {labels.shape[-1]}x{labels.shape[-2]} is not a multiple of the "
                        f"encoder stride {factor}, needed by the feature distance (or pass --daformer-lambda-fd 0)")
    return (small[..., None] == thing_indices).any(-1)                      # (B, h, w)


def feature_distance(student, frozen, mask):
    """Mean L2 distance over masked cells: (1/|T|) sum_{j in T} ||student_j - frozen_j||_2.

    student, frozen: (B, D, h, w) (fp32 computation); mask: (B, h, w) bool. An empty mask gives 0
    with a graph (see Deviations).
    """
    assert student.shape == frozen.shape and mask.shape == (student.shape[0],) + student.shape[2:]
    distance = (student.float() - frozen.float()).norm(p=2, dim=1)          # (B, h, w)
    if not mask.any():
        return distance.sum() * 0.0
    return distance[mask].mean()                                             # mean over |T| cells


@torch.no_grad()
def ema_update(teacher, student, it, alpha):
    """xi <- a xi + (1 - a) theta over parameters, a = min(1 - 1/(it+1), alpha) (DACS/DAFormer).

    At it = 0, a = 0: the teacher becomes a copy of the student. Buffers (BN statistics) are not
    averaged: the teacher keeps its own, updated by its forward passes in train mode. Returns a.
    """
    decay = min(1.0 - 1.0 / (it + 1), alpha)
    teacher_params = [p.data for p in teacher.parameters()]
    student_params = [p.data for p in student.parameters()]
    torch._foreach_mul_(teacher_params, decay)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - decay)
    return decay


def class_mix_masks(labels, generator):
    """DACS ClassMix masks: per image, ceil(n/2) of the n values present in the WHOLE source batch
    (including 255 when present: a DACS quirk kept as is), drawn without replacement.

    labels: (B, H, W) int64; generator: the CPU torch.Generator of the method.
    Returns (B, H, W) bool, True = paste the source pixel.
    """
    classes = torch.unique(labels)                                          # (n,) sorted values
    n = classes.numel()
    masks = []
    for b in range(labels.shape[0]):  # a few images; pixels are vectorised
        chosen = classes[torch.randperm(n, generator=generator)[: (n + n % 2) // 2].to(classes.device)]
        masks.append(torch.isin(labels[b], chosen))                          # (H, W)
    return torch.stack(masks)                                               # (B, H, W)


def mix(mask, source, target):
    """M * source + (1 - M) * target for images (B, 3, H, W) or maps (B, H, W); mask (B, H, W) bool."""
    return torch.where(mask[:, None] if source.dim() == 4 else mask, source, target)


# --------------------------------------------------------------------------------------------------
# Building blocks of the method (DIDA builds the same ones)
# --------------------------------------------------------------------------------------------------
def disable_stochastic_layers(module):
    """Dropout and drop-path off while the module stays in train mode (DAFormer's teacher)."""
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ == "DropPath":
            m.training = False


def build_teacher(model):
    """The EMA teacher: a copy of the student without gradients, in train mode (BN uses batch
    statistics, as DAFormer's) with dropout and drop-path off."""
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.train()
    disable_stochastic_layers(teacher)
    return teacher


def build_fd_model(model, args, env):
    """The frozen ImageNet network f_I of the feature distance (see Deviations); None when
    --daformer-lambda-fd is 0."""
    if args.daformer_lambda_fd == 0:
        return None
    if args.daformer_fd_pretrained:
        frozen = models.build_model(args.backbone, env.space.num_classes, bn=args.bn)
        models.load_pretrained(frozen, args.daformer_fd_pretrained, args.backbone)
        frozen.to(env.device)
    else:
        frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen.eval()


def ignored_rows(args):
    """(top, bottom) rows of the target crop whose pseudo-labels get weight 0: the flags, or by default
    DAFormer's Cityscapes rows for a Cityscapes target and none for any other (see Deviations)."""
    cityscapes = args.target.startswith("cityscapes")
    top, bottom = args.daformer_pseudo_ignore_top, args.daformer_pseudo_ignore_bottom
    return (top if top is not None else (CITYSCAPES_IGNORE_TOP if cityscapes else 0),
            bottom if bottom is not None else (CITYSCAPES_IGNORE_BOTTOM if cityscapes else 0))


def thing_indices(trainids, space, device):
    """(T,) int64 class indices of the given Cityscapes trainIds that the label space has.

    A folder dataset's own classes are not Cityscapes trainIds (`space.has_trainids` False): the default
    Cityscapes thing ids would pick arbitrary classes there, so they select none (L_fd is 0); ids given
    with --daformer-fd-classes are then read as that dataset's class indices."""
    if not space.has_trainids:
        chosen = [] if tuple(trainids) == THING_TRAINIDS else [t for t in trainids if 0 <= t < space.num_classes]
        return torch.tensor(chosen, dtype=torch.long, device=device)
    return torch.tensor([space.trainids.index(t) for t in trainids if t in space.trainids],
                        dtype=torch.long, device=device)


def adamw(param_groups, lr, weight_decay):
    """AdamW over {'params', 'lr_mult'[, 'weight_decay']} groups, recording each group's base_lr."""
    groups = [dict(g, base_lr=lr * g.get("lr_mult", 1.0), lr=lr * g.get("lr_mult", 1.0)) for g in param_groups]
    return torch.optim.AdamW(groups, lr=lr, betas=ADAMW_BETAS, weight_decay=weight_decay)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
RECIPE = {  # DAFormer configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py ("gta2cs")
    "lr": 6e-5,                 # gta2cs optimizer lr (configs/_base_/schedules/adamw.py: AdamW, the same 6e-5)
    "head_lr_mult": 10.0,       # gta2cs paramwise_cfg custom_keys: head lr_mult 10
    "weight_decay": 0.01,       # configs/_base_/schedules/adamw.py
    "poly_power": 1.0,          # configs/_base_/schedules/poly10warm.py: power 1.0, min_lr 0
    "warmup_iters": 1500,       # poly10warm.py: linear warmup 1500 iterations, warmup_ratio 1e-6
    "iters": 40000,             # gta2cs runner max_iters 40000
    "batch_size": 2,            # configs/_base_/datasets/uda_gta_to_cityscapes_512x512.py: samples_per_gpu 2
    "source_sampler": "rcs",    # gta2cs rare_class_sampling (class_temp 0.01, min_pixels 3000: common flags)
    "cat_max_ratio": 0.75,      # uda_gta_to_cityscapes_512x512.py: RandomCrop cat_max_ratio 0.75
    "synthia_classes": 19,      # DAFormer trains SYNTHIA in Cityscapes' 19 trainIds (mIoU16 = mIoU19 x 19/16)
    "crop": "512x512",          # uda_gta_to_cityscapes_512x512.py: crop_size (512, 512)
    "backbone": "mit-b5",       # configs/_base_/models/daformer_conv1_mitb5.py: mit_b5, pretrained mit_b5.pth
    "align_corners": False,     # daformer_conv1_mitb5.py decode_head align_corners False (losses and test)
}
# Read by the tools through uda/methods.py (the contract in uda/source_only.py):
# the control switches off the mixed pseudo-label term (EMA teacher + ClassMix)
CONTROL_FLAGS = ["--daformer-lambda-mix", "0"]
# evaluation as mmseg's: logits resized to the input size, then to the label size (uda/evaluation.py;
# lhoyer/DAFormer @ e6f6e04 mmseg/models/segmentors/encoder_decoder.py:77-81 and :221-232)
RESIZE_VIA_INPUT = True
# uda/bench/scale.py scales these own flags with its --size-factor: rows of a Cityscapes target crop
SIZE_FLAGS = {"--daformer-pseudo-ignore-top": CITYSCAPES_IGNORE_TOP,
              "--daformer-pseudo-ignore-bottom": CITYSCAPES_IGNORE_BOTTOM}


class DAFormer:
    """DACS self-training with DAFormer's EMA teacher, thing-class feature distance and recipe."""

    needs_target = True

    def __init__(self, model, args, env):
        self.model, self.env, self.args = model, env, args  # args: read, never written
        self.num_classes = env.space.num_classes
        self.generator = common.method_generator(args.seed, GENERATOR_STREAM)  # ClassMix, jitter, blur
        self.teacher = build_teacher(model)
        self.fd_model = build_fd_model(model, args, env)
        self.thing_indices = thing_indices(args.daformer_fd_classes, env.space, env.device)
        self.ignore_top, self.ignore_bottom = ignored_rows(args)
        self.optimizer = adamw(model.param_groups(args.head_lr_mult), args.lr, args.weight_decay)
        self.optimizers = [self.optimizer]

    def train_step(self, source, target, it):
        args, env, model = self.args, self.env, self.model
        xs, ys, xt = source["image"], source["label"], target["image"]
        size, align_corners = tuple(ys.shape[-2:]), args.align_corners
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.teacher, model, it, args.daformer_ema_alpha)
        logged = {}

        # 1. source: supervised CE (+ feature distance); backward frees the source graph before mixing
        with env.autocast():
            if self.fd_model is None:
                _, logits_s = model(xs)
            else:  # the deepest encoder map of the same forward, for the feature distance
                _, logits_s, encoder_s = model(xs, with_encoder=True)
                with torch.no_grad():
                    encoder_frozen = self.fd_model.encoder_features(xs)
        loss_src = weighted_cross_entropy(upsample(logits_s, size, align_corners), ys)
        logged["src"] = loss_src.detach()
        loss = loss_src
        if self.fd_model is not None:
            things = fd_mask(ys, encoder_s.shape[-2:], self.thing_indices, args.daformer_fd_min_ratio,
                             self.num_classes)                               # (B, h, w)
            loss_fd = feature_distance(encoder_s, encoder_frozen, things)
            loss = loss + args.daformer_lambda_fd * loss_fd
            logged["fd"] = loss_fd.detach()
        env.scaler.scale(loss).backward()
        del logits_s, loss
        if args.daformer_lambda_mix == 0:  # the supervised part alone: nothing of steps 2-4 is computed
            optimizer_step(self.optimizer, env.scaler)
            return logged

        with torch.no_grad():
            # 2. teacher pseudo-labels on the target crop
            with env.autocast():
                _, logits_t = self.teacher(xt)
            probs = torch.softmax(upsample(logits_t.float(), size, align_corners), dim=1)  # (B, C, H, W) fp32
            labels_t, weight_t, quality = pseudo_labels(probs, args.daformer_pseudo_threshold,
                                                        self.ignore_top, self.ignore_bottom)
            logged["pl_quality"] = quality

            # 3. ClassMix + strong augmentation
            mask = class_mix_masks(ys, self.generator)                      # (B, H, W) bool
            xm = dacs_strong_augment(mix(mask, xs, xt), args.daformer_jitter_strength, args.daformer_jitter_prob,
                                     args.daformer_blur_prob, self.generator)
            ym = mix(mask, ys, labels_t)
            wm = mix(mask, torch.ones_like(weight_t), weight_t)

        # 4. the student on the mixed image, then one optimizer step for the whole iteration
        with env.autocast():
            _, logits_m = model(xm)
        loss_mix = weighted_cross_entropy(upsample(logits_m, size, align_corners), ym, wm)
        logged["mix"] = loss_mix.detach()
        env.scaler.scale(args.daformer_lambda_mix * loss_mix).backward()
        optimizer_step(self.optimizer, env.scaler)
        return logged

    def state_dict(self):
        state = {"optimizer": self.optimizer.state_dict(), "teacher": self.teacher.state_dict(),
                 "generator": self.generator.get_state()}
        if self.fd_model is not None:
            state["fd_model"] = self.fd_model.state_dict()
        return state

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.teacher.load_state_dict(state["teacher"])
        self.generator.set_state(state["generator"])
        if self.fd_model is not None:
            self.fd_model.load_state_dict(state["fd_model"])


def add_arguments(parser):
    """DAFormer's flags (DIDA reads them too)."""
    group = parser.add_argument_group("daformer (DACS self-training base)")
    group.add_argument("--daformer-ema-alpha", type=common.fraction, default=0.999,
                       help="EMA teacher decay cap: a_t = min(1 - 1/(t+1), alpha) (DAFormer 0.999, DACS 0.99)")
    group.add_argument("--daformer-pseudo-threshold", type=common.fraction, default=0.968,
                       help="confidence for the pseudo-label quality weight q = share of pixels above it")
    group.add_argument("--daformer-pseudo-ignore-top", type=common.nonnegative_int, default=None,
                       help="top rows of the target crop whose pseudo-labels get weight 0 "
                            "(default: 15 for a Cityscapes target, else 0)")
    group.add_argument("--daformer-pseudo-ignore-bottom", type=common.nonnegative_int, default=None,
                       help="bottom rows with weight 0 (ego-car; default: 120 for a Cityscapes target, else 0)")
    group.add_argument("--daformer-lambda-fd", type=common.nonnegative_float, default=0.005,
                       help="weight of the thing-class ImageNet feature distance (0 turns it off)")
    group.add_argument("--daformer-lambda-mix", type=common.nonnegative_float, default=1.0,
                       help="weight of the mixed pseudo-label loss L_mix (0: the supervised part alone, no "
                            "teacher forward or ClassMix)")
    group.add_argument("--daformer-fd-classes", type=common.nonnegative_int, nargs="*", default=list(THING_TRAINIDS),
                       help="Cityscapes trainIds of the classes the feature distance applies to")
    group.add_argument("--daformer-fd-min-ratio", type=common.fraction, default=0.75,
                       help="a downscaled label cell keeps its class only if it covers this share")
    group.add_argument("--daformer-fd-pretrained", default=None, metavar="FILE",
                       help="ImageNet weights of the frozen feature-distance network (default: a frozen "
                            "copy of the initial model, i.e. the --pretrained weights)")
    group.add_argument("--daformer-jitter-strength", type=common.nonnegative_float, default=0.2,
                       help="brightness +-s (additive), contrast and saturation x[1-s, 1+s], hue +-s turns")
    group.add_argument("--daformer-jitter-prob", type=common.fraction, default=0.8,
                       help="probability of colour jitter per iteration (DACS: 1 - 0.2)")
    group.add_argument("--daformer-blur-prob", type=common.fraction, default=0.5,
                       help="probability of Gaussian blur per iteration")


Method = DAFormer
