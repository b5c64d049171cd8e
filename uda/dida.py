"""DIDA: dual-level interaction on the DAFormer self-training base (`--method dida`).

Copy with: uda/common.py, uda/augment.py, uda/models.py, uda/mit.py, uda/daformer.py (DIDA's base).

Paper: Yao, Li, et al., "Dual-level Interaction for Domain Adaptive Semantic Segmentation", ICCV 2023
workshops, arXiv 2307.07972. Official code checked: github.com/RainJamesY/DIDA commit 8b9c5bf
(mmseg/models/uda/dacs.py, the DAFormer repository with a modified UDA module). The paper body could not
be read: the maths below is what the released code computes, plus the SimMatch form it ports (Zheng et
al., "SimMatch: Semi-supervised Learning with Similarity Matching", CVPR 2022, arXiv 2203.06915; USB's
simmatch.py). The base (EMA teacher, pseudo-labels, ClassMix, feature distance, recipe) is DAFormer's:
its pure functions come from uda/daformer.py, its objective L_daformer = L_src + lambda_fd L_fd +
lambda_mix L_mix (the --daformer-... flags) is kept unchanged, and `DIDA.train_step` writes the whole
iteration out, steps 1-5 in order (step 1, the teacher part of step 2 and L_ins are named methods). With
`--dida-lambda-ins 0 --dida-gather-alpha 1 --dida-weak-view clean` it takes exactly DAFormer's step
(tests/test_dida.py checks it).

Symbols: e(.) the model's features (DAFormer head: fused 256-d map at stride 4, >= 0 after BN-ReLU);
U(.) bilinear upsampling to the H x W crop (--align-corners, False as mmseg); bank entries f_k in R^D with
class labels l_k, k = 1..K; x_t^w the teacher's (weak) target view, x_m the strong ClassMix view, M the
pasted-source mask; P the teacher's class probabilities on x_t^w, z the student's logits on x_m
(upsampled, detached).

  similarities  s_k(i) = <U(e_teacher(x_t^w))_i, f_k>,  r_k(i) = <U(e_student(x_m))_i, f_k>,
                computed as U(<e, f_k>) at the feature stride (exact: U is linear).
  --dida-mode released (as the official code computes):
      student   p_k(i) = r_k(i) / sum_j r_j(i)                     (L1-normalised raw dot products)
      scatter   q_k(i) = s_k(i) z_{l_k}(i) / sum_j s_j(i) z_{l_j}(i)   (calibration by the student's logits)
      gather    P~_c = P_c + (1 - alpha) sum_{k: l_k = c} s_k / sum_j s_j   (alpha = 1: off, as released)
      L_ins = (1/N) sum_i sum_k -q_k(i) log(p_k(i) + 1e-10) over all N = B H W pixels
  --dida-mode simmatch (default; the form DIDA's code ports):
      features and bank entries L2-normalised (the features at their own stride, before U),
      student   p_k = softmax_k(r_k / T),  teacher q^w_k = softmax_k(s_k / T)   (T = --dida-temperature)
      scatter   q_k = q^w_k P_{l_k} / sum_j q^w_j P_{l_j}           (calibration by the teacher's P)
      gather    P~_c = alpha P_c + (1 - alpha) sum_{k: l_k = c} q^w_k
      L_ins = mean over non-pasted pixels (M = 0) of sum_k -q_k log p_k
  In both modes the semantic pseudo-labels of DAFormer's L_mix come from P~ (argmax, quality weight on
  max P~); alpha = --dida-gather-alpha. Without --dida-calibrate, q = s / sum s (released) or q = q^w
  (simmatch).

  L = L_daformer + lambda_ins L_ins                              (lambda_ins = --dida-lambda-ins, 0.5)

  --daformer-lambda-mix 0 drops L_mix (not computed, not logged); with --dida-lambda-ins 0 as well the
  iteration is the supervised part alone (no teacher forward, no ClassMix), as in uda/daformer.py.

Bank: K = --dida-bank-size entries, labels l_k = k mod C (K/C per class, the first K mod C classes one
more). Filled with per-image class means of U(e_student(x_s)) over labelled source pixels: while a class
has empty slots, every source image containing it fills the next one (all ranks' images, in rank order).
Every --dida-bank-interval iterations (from iteration 0) the class means mu_c over the whole source batch
(sums and counts all-reduced across ranks, so every rank keeps the same bank) update
f_k <- m f_k + (1 - m) mu_{l_k} for filled entries of classes present in the batch
(m = --dida-bank-momentum). Only filled entries enter the similarities. Class means of U(e) are computed
without upsampling the features: sum_{i: y_i = c} U(e)_i = sum_j (U^T 1_c)_j e_j, with U^T the adjoint
of bilinear upsampling (autograd of the same common.upsample).

Default mode: simmatch. The released form gives an almost uniform instance distribution (mean entropy
5.64 vs log 300 = 5.70 with the shipped bank: a weak signal), lets raw logits make the targets negative
or unbounded, and applies a target computed on the unmixed target image to pasted source pixels; the
SimMatch form DIDA cites has none of these problems. Which one produced the paper's numbers is unknown.

Recipe: DAFormer's (RECIPE = daformer.RECIPE; DIDA's configs are DAFormer's). Multi-GPU: see
common.optimizer_step; the bank statistics are all-reduced as said above.

Deviations (besides DAFormer's, listed in uda/daformer.py):
- Bank initialisation: the official code loads shipped .npz banks of undocumented origin (and the
  SYNTHIA bank even for GTA5). They cannot be regenerated, so the bank is filled online from the
  student's source features at the start of training (above); with a random-init head these first
  entries are weak, so starting from a source-only checkpoint (--pretrained) gives a better bank.
- Bank update: class means over the whole source batch, vectorised, all-reduced (official: image 0
  only, through a bug, with per-pixel Python loops); absent classes are left unchanged (official:
  their entries decay toward 0 because their mean is taken as 0).
- released mode guards its targets: features and bank entries are clamped at 0 (so s, r >= 0; a no-op
  for the head's ReLU features), s_k z_{l_k} is clamped at 0 (raw logits can be negative: q stays in
  [0, 1], never negative or unbounded), and a pixel whose target sums to 0 contributes 0.
- simmatch mode: a real weak view (--dida-weak-view photometric: DACS colour jitter + blur of the
  target crop, what the official code intends; its call is a no-op there because a shape check never
  fires) and pasted pixels excluded from L_ins; the mixed image uses the clean target crop (DAFormer).
- Random numbers: the weak view, the ClassMix class choice and the strong augmentation draw from the
  method's own generator (common.method_generator, saved in the checkpoint; official: the global
  RNGs), so a resumed run is exact and evaluation can never shift them.
- Batch, crop, D, C and K are not hard-coded; nothing is written to disk during training.
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from uda import common, daformer
from uda.augment import dacs_strong_augment
from uda.common import IGNORE_INDEX, optimizer_step, upsample
from uda.daformer import add_arguments as add_daformer_arguments

GENERATOR_STREAM = "dida"  # common.method_generator's stream, named after the method
LOG_EPS = 1e-10        # official instance_similarity_loss: log(p + 1e-10)
DIV_EPS = 1e-12        # denominators of the released-mode normalisations (guards a zero sum)
SIMMATCH_ALPHA = 0.9   # SimMatch smoothing_alpha (USB default); the released DIDA uses 1 (gather off)


# --------------------------------------------------------------------------------------------------
# Losses: pure functions of tensors
# --------------------------------------------------------------------------------------------------
def bank_similarity(features, bank, size, align_corners):
    """U(<e, f_k>): features (B, D, h, w), bank (K, D) -> (B, H, W, K) fp32, size = (H, W).

    Computed at the feature stride then upsampled: equal to <U(e)_i, f_k> by linearity of U, at
    1/stride^2 of the cost. fp32 even under autocast (dot products ~1e3, fp16 loses them). Layout
    (B, H, W, K), entries last: upsampling channels-last and reducing over the last dim are several
    times faster than over dim 1 of (B, K, H, W).
    """
    assert features.dim() == 4 and bank.dim() == 2 and features.shape[1] == bank.shape[1]
    with torch.autocast(device_type=features.device.type, enabled=False):
        sim = torch.einsum("bdhw,kd->bhwk", features.float(), bank.float())      # (B, h, w, K)
        sim = upsample(sim.permute(0, 3, 1, 2), size, align_corners)            # (B, K, H, W) channels-last memory
        return sim.permute(0, 2, 3, 1).contiguous()                              # (B, H, W, K), a view here


def per_entry(class_map, bank_labels):
    """(B, C, H, W) class values -> (B, H, W, K): entry k gets its class l_k's value.

    A product with the (C, K) one-hot matrix of the labels: a BLAS call, far faster than indexing
    the last dimension of a large tensor.
    """
    onehot = F.one_hot(bank_labels, class_map.shape[1]).t().to(class_map)    # (C, K)
    return class_map.permute(0, 2, 3, 1) @ onehot                            # (B, H, W, K)


def released_instance_loss(sim_teacher, sim_student, calib_logits, bank_labels):
    """Official L_ins: CE over bank entries between L1-normalised similarity distributions.

    sim_teacher, sim_student: (B, H, W, K) fp32 raw dot products, >= 0 (DIDA.similarity clamps the
    features and entries at 0, which keeps every dot product >= 0 at no full-resolution cost; teacher:
    no grad); calib_logits: (B, C, H, W) the student's detached mixed-view logits, or None (no
    calibration); bank_labels (K,).
    Returns (1/(B H W)) sum_i sum_k -q_k(i) log(p_k(i) + 1e-10), with s_k z_{l_k} clamped at 0 (the
    guard against negative or exploding targets). Few full-resolution passes: the target is built in
    place, and log(r_k/S + e) = log(r_k + e S) - log S with S = sum_j r_j saves the division.
    """
    assert sim_teacher.shape == sim_student.shape and sim_teacher.shape[-1] == bank_labels.shape[0]
    with torch.no_grad():
        if calib_logits is not None:
            target = (sim_teacher * per_entry(calib_logits, bank_labels)).clamp_(min=0)  # s_k z_{l_k}, guarded
        else:
            target = sim_teacher.clone()                                     # (B, H, W, K)
        target.div_(target.sum(-1, keepdim=True).clamp_min(DIV_EPS))         # q: sums to 1 (or 0)
        target_mass = target.sum(-1)                                         # (B, H, W): 1 or 0
    student = sim_student                                                    # (B, H, W, K)
    total = student.sum(-1, keepdim=True).clamp_min(DIV_EPS)                 # (B, H, W, 1) S
    cross = (target * torch.log(student + LOG_EPS * total)).sum(-1)          # (B, H, W)
    return (target_mass * torch.log(total[..., 0]) - cross).mean()           # mean over B H W


def simmatch_instance_loss(teacher_dist, logits_student, teacher_probs, bank_labels, valid):
    """SimMatch L_ins: CE between the calibrated teacher distribution and the student's softmax over
    bank entries, averaged over valid pixels.

    teacher_dist: (B, H, W, K) q^w = softmax of the teacher's cosine similarities / T (no grad);
    logits_student: (B, H, W, K) the student's cosine similarities / T; teacher_probs: (B, C, H, W) or
    None (no calibration); bank_labels (K,); valid: (B, H, W) bool (False: pasted source pixels).
    """
    assert teacher_dist.shape == logits_student.shape and valid.shape == teacher_dist.shape[:3]
    with torch.no_grad():
        target = teacher_dist
        if teacher_probs is not None:
            target = teacher_dist * per_entry(teacher_probs, bank_labels)    # (B, H, W, K) q^w_k P_{l_k}
            target.div_(target.sum(-1, keepdim=True).clamp_min(DIV_EPS))
    per_pixel = -(target * torch.log_softmax(logits_student, dim=-1)).sum(-1)  # (B, H, W)
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1)


def gather_probs(probs, instance_dist, bank_labels, alpha, released):
    """Instance -> semantic: P~ = alpha P + (1 - alpha) A (simmatch) or P + (1 - alpha) A (released),
    A_c = sum_{k: l_k = c} instance_dist_k.

    probs: (B, C, H, W); instance_dist: (B, H, W, K) (sums to 1 over K); bank_labels (K,).
    Returns (B, C, H, W).
    """
    onehot = F.one_hot(bank_labels, probs.shape[1]).to(instance_dist)         # (K, C)
    aggregated = instance_dist @ onehot                                      # (B, H, W, C), sum per class
    base = probs if released else alpha * probs
    return base + (1 - alpha) * aggregated.permute(0, 3, 1, 2)               # (B, C, H, W)


def upsample_adjoint(weights, size, align_corners):
    """U^T w for the bilinear upsampling U = common.upsample(., (H, W), align_corners) from size (h, w).

    weights: (B, C, H, W) -> (B, C, h, w), size = (h, w); <U x, w> = <x, U^T w> for every x.
    """
    if tuple(weights.shape[-2:]) == tuple(size):
        return weights
    with torch.enable_grad():
        x = torch.zeros(weights.shape[:2] + tuple(size), dtype=weights.dtype, device=weights.device,
                        requires_grad=True)
        (adjoint,) = torch.autograd.grad(upsample(x, weights.shape[-2:], align_corners), x, grad_outputs=weights)
    return adjoint


def class_sums(features, labels, num_classes, align_corners):
    """Per-image class sums of U(features) over labelled pixels, and the pixel counts.

    features: (B, D, h, w); labels: (B, H, W) int64, 255 ignored. Returns sums (B, C, D) fp32 and
    counts (B, C) fp32, computed at the feature stride through U^T (exact, no upsampled features).
    """
    valid = labels != IGNORE_INDEX                                          # (B, H, W)
    onehot = F.one_hot(labels.masked_fill(~valid, 0), num_classes)          # (B, H, W, C)
    onehot = (onehot * valid[..., None]).permute(0, 3, 1, 2).float()         # (B, C, H, W)
    weights = upsample_adjoint(onehot, features.shape[-2:], align_corners)   # (B, C, h, w)
    sums = torch.einsum("bchw,bdhw->bcd", weights, features.float())        # (B, C, D)
    return sums, onehot.sum((2, 3))                                          # (B, C, D), (B, C)


# --------------------------------------------------------------------------------------------------
# The labelled instance bank
# --------------------------------------------------------------------------------------------------
class InstanceBank(nn.Module):
    """K feature entries with fixed class labels l_k = k mod C; buffers, so checkpoints hold them."""

    def __init__(self, size, dim, num_classes):
        super().__init__()
        labels = torch.arange(size) % num_classes                           # (K,)
        rank = torch.div(torch.arange(size), num_classes, rounding_mode="floor")  # position within its class
        per_class = torch.bincount(labels, minlength=num_classes)            # (C,)
        slots = torch.full((num_classes, max(int(per_class.max()), 1)), -1, dtype=torch.long)
        slots[labels, rank] = torch.arange(size)                             # (C, S): slot of (class, rank)
        self.num_classes = num_classes
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("labels", labels)
        self.register_buffer("filled", torch.zeros(size, dtype=torch.bool))
        self.register_buffer("slots", slots, persistent=False)
        self.register_buffer("per_class", per_class, persistent=False)

    def entries(self):
        """The filled entries: features (K', D), labels (K',)."""
        return self.features[self.filled], self.labels[self.filled]

    def is_full(self):
        return bool(self.filled.all())

    @torch.no_grad()
    def fill(self, means, present):
        """Write per-image class means into the next empty slots of their classes.

        means: (N, C, D) per-image class means; present: (N, C) bool. Images fill in order.
        """
        filled_per_class = torch.bincount(self.labels[self.filled], minlength=self.num_classes)  # (C,)
        order = present.long().cumsum(0) - 1                                 # (N, C) rank among images with c
        position = filled_per_class[None] + order                            # (N, C) slot rank to write
        write = present & (position < self.per_class[None])                  # (N, C)
        image, cls = write.nonzero(as_tuple=True)                            # (W,), (W,)
        slot = self.slots[cls, position[image, cls]]                         # (W,)
        self.features[slot] = means[image, cls].to(self.features)
        self.filled[slot] = True

    @torch.no_grad()
    def momentum_update(self, means, present, momentum):
        """f_k <- m f_k + (1 - m) mu_{l_k} for filled entries whose class is present.

        means: (C, D) class means; present: (C,) bool.
        """
        update = self.filled & present[self.labels]                          # (K,)
        mixed = momentum * self.features + (1 - momentum) * means[self.labels].to(self.features)  # (K, D)
        self.features.copy_(torch.where(update[:, None], mixed, self.features))


def gather_from_ranks(tensor):
    """Concatenate `tensor` (N, ...) from every rank along dim 0, in rank order (all_reduce of a
    zero-padded stack: no extra collective needed in common)."""
    world = common.world_size()
    if world == 1:
        return tensor
    stacked = torch.zeros((world,) + tuple(tensor.shape), dtype=tensor.dtype, device=tensor.device)
    stacked[common.rank()] = tensor
    return common.all_reduce_sum(stacked).flatten(0, 1)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
# DIDA's repository is DAFormer's with a new UDA module; its GTA->Cityscapes config is DAFormer's
# (RainJamesY/DIDA @ 8b9c5bf configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py)
RECIPE = dict(daformer.RECIPE)
# Read by the tools through uda/methods.py (the contract in uda/source_only.py):
# the control: the instance loss, the bank's evidence gathered into the pseudo-labels and the teacher's
# photometric weak view (there for the weak/strong instance consistency; DAFormer's teacher sees the clean
# crop) off: what remains is DAFormer's iteration (with DIDA's random stream)
CONTROL_FLAGS = ["--dida-lambda-ins", "0", "--dida-gather-alpha", "1", "--dida-weak-view", "clean"]
CONTROL_NOTE = "DAFormer's iteration, with DIDA's random stream"
RESIZE_VIA_INPUT = True  # evaluation as mmseg's, which DIDA's code is built on (see daformer.py)
SIZE_FLAGS = daformer.SIZE_FLAGS  # DAFormer's pixel-size flags, scaled by uda/bench/scale.py


class DIDA:
    """DAFormer's self-training + the labelled instance bank, instance-level consistency and
    cross-level interaction, in one iteration written out (`train_step`)."""

    needs_target = True

    def __init__(self, model, args, env):
        self.model, self.env, self.args = model, env, args  # args: read, never written
        self.num_classes = env.space.num_classes
        self.generator = common.method_generator(args.seed, GENERATOR_STREAM)  # weak view, ClassMix, jitter, blur
        # DAFormer's parts
        self.teacher = daformer.build_teacher(model)
        self.fd_model = daformer.build_fd_model(model, args, env)
        self.thing_indices = daformer.thing_indices(args.daformer_fd_classes, env.space, env.device)
        self.ignore_top, self.ignore_bottom = daformer.ignored_rows(args)
        self.optimizer = daformer.adamw(model.param_groups(args.head_lr_mult), args.lr, args.weight_decay)
        self.optimizers = [self.optimizer]
        # DIDA's
        self.released = args.dida_mode == "released"
        self.alpha = args.dida_gather_alpha if args.dida_gather_alpha is not None else (
            1.0 if self.released else SIMMATCH_ALPHA)
        weak = args.dida_weak_view or ("clean" if self.released else "photometric")
        self.photometric_weak_view = weak == "photometric"
        self.bank = InstanceBank(args.dida_bank_size, model.feature_dim, self.num_classes).to(env.device)

    def update_bank(self, features, labels, it):
        """Fill empty bank slots, and every --dida-bank-interval iterations momentum-update the bank.

        features: (B, D, h, w) the student's detached source features; labels: (B, H, W).
        """
        sums, counts = class_sums(features, labels, self.num_classes, self.args.align_corners)  # (B, C, D), (B, C)
        if not self.bank.is_full():
            all_sums, all_counts = gather_from_ranks(sums), gather_from_ranks(counts)
            self.bank.fill(all_sums / all_counts.clamp_min(1)[..., None], all_counts > 0)
        if it % self.args.dida_bank_interval == 0:
            total = common.all_reduce_sum(torch.cat([sums.sum(0), counts.sum(0)[:, None]], dim=1))  # (C, D+1)
            means = total[:, :-1] / total[:, -1:].clamp_min(1)                 # (C, D)
            self.bank.momentum_update(means, total[:, -1] > 0, self.args.dida_bank_momentum)

    def similarity(self, features, bank, size):
        """(B, H, W, K') similarities of features (B, D, h, w) to the bank entries (K', D).

        released: raw dot products of features and entries clamped at 0 (a no-op for ReLU features;
        keeps r, s >= 0). simmatch: cosine similarities / T, the 1/T folded into the unit entries."""
        if self.released:
            return bank_similarity(features.float().clamp_min(0), bank.clamp_min(0), size, self.args.align_corners)
        features = F.normalize(features.float(), dim=1)  # unit features at their own stride
        return bank_similarity(features, F.normalize(bank, dim=1) / self.args.dida_temperature, size,
                               self.args.align_corners)

    def train_step(self, source, target, it):
        args, env, model = self.args, self.env, self.model
        xs, ys, xt = source["image"], source["label"], target["image"]
        size, align_corners = tuple(ys.shape[-2:]), args.align_corners
        self.optimizer.zero_grad(set_to_none=True)
        daformer.ema_update(self.teacher, model, it, args.daformer_ema_alpha)

        # 1. source: DAFormer's CE (+ feature distance), backward; its detached features fill / update the bank
        logged = self.source_step(xs, ys, size, it)
        if args.daformer_lambda_mix == 0 and args.dida_lambda_ins == 0:  # no target term: steps 2-5 skipped
            optimizer_step(self.optimizer, env.scaler)
            logged["bank_filled"] = self.bank.filled.float().mean()
            return logged

        bank, bank_labels = self.bank.entries()                              # (K', D), (K',)
        use_bank = bank_labels.numel() > 0 and (args.dida_lambda_ins > 0 or self.alpha < 1)
        with torch.no_grad():
            # 2. teacher on the weak view: class probabilities P and bank similarities s (or q^w; None: no bank)
            probs, sim_teacher = self.teacher_predictions(xt, bank if use_bank else None, size)

            # 3. gather K -> C: DAFormer's pseudo-labels from P~
            refined = probs
            if use_bank and self.alpha < 1:
                dist = sim_teacher / sim_teacher.sum(-1, keepdim=True).clamp_min(DIV_EPS) if self.released \
                    else sim_teacher                                         # (B, H, W, K')
                refined = gather_probs(probs, dist, bank_labels, self.alpha, self.released)
            labels_t, weight_t, quality = daformer.pseudo_labels(refined, args.daformer_pseudo_threshold,
                                                                 self.ignore_top, self.ignore_bottom)
            logged["pl_quality"] = quality

            # 4. DAFormer's ClassMix + strong augmentation (of the clean target crop)
            mask = daformer.class_mix_masks(ys, self.generator)              # (B, H, W) bool
            xm = dacs_strong_augment(daformer.mix(mask, xs, xt), args.daformer_jitter_strength,
                                     args.daformer_jitter_prob, args.daformer_blur_prob, self.generator)
            ym = daformer.mix(mask, ys, labels_t)
            wm = daformer.mix(mask, torch.ones_like(weight_t), weight_t)

        # 5. the student on the mixed image: DAFormer's L_mix and, scattering C -> K, L_ins
        with env.autocast():
            features_m, logits_m = model(xm)
        loss = None
        if args.daformer_lambda_mix > 0:
            loss_mix = daformer.weighted_cross_entropy(upsample(logits_m, size, align_corners), ym, wm)
            logged["mix"] = loss_mix.detach()
            loss = args.daformer_lambda_mix * loss_mix
        if args.dida_lambda_ins > 0:
            if sim_teacher is None:  # nothing labelled yet (an all-ignore first batch): no instance term
                logged["ins"] = torch.zeros((), device=env.device)
            else:
                loss_ins = self.instance_loss(sim_teacher, features_m, logits_m, probs, bank, bank_labels, ~mask)
                weighted_ins = args.dida_lambda_ins * loss_ins
                loss = weighted_ins if loss is None else loss + weighted_ins
                logged["ins"] = loss_ins.detach()
        if loss is not None:  # None: L_mix off and no bank entry yet
            env.scaler.scale(loss).backward()
        optimizer_step(self.optimizer, env.scaler)
        logged["bank_filled"] = self.bank.filled.float().mean()
        return logged

    def source_step(self, xs, ys, size, it):
        """Step 1: DAFormer's supervised loss on the source batch (+ the thing-class feature distance),
        backward now (frees the source graph before mixing); the student's detached source features fill
        and update the bank. Returns the logged terms."""
        args, env, model = self.args, self.env, self.model
        with env.autocast():
            if self.fd_model is None:
                features_s, logits_s = model(xs)
            else:  # the deepest encoder map of the same forward, for the feature distance
                features_s, logits_s, encoder_s = model(xs, with_encoder=True)
                with torch.no_grad():
                    encoder_frozen = self.fd_model.encoder_features(xs)
        loss_src = daformer.weighted_cross_entropy(upsample(logits_s, size, args.align_corners), ys)
        logged = {"src": loss_src.detach()}
        loss = loss_src
        if self.fd_model is not None:
            things = daformer.fd_mask(ys, encoder_s.shape[-2:], self.thing_indices, args.daformer_fd_min_ratio,
                                      self.num_classes)                      # (B, h, w)
            loss_fd = daformer.feature_distance(encoder_s, encoder_frozen, things)
            loss = loss + args.daformer_lambda_fd * loss_fd
            logged["fd"] = loss_fd.detach()
        self.update_bank(features_s.detach(), ys, it)
        env.scaler.scale(loss).backward()
        return logged

    def teacher_predictions(self, xt, bank, size):
        """Step 2 (no grad): the teacher on the weak target view. Returns its upsampled class probabilities
        P (B, C, H, W) fp32 and its bank similarities (B, H, W, K'): raw s (released) or q^w = softmax(s / T)
        (simmatch), or None when `bank` is None."""
        weak = xt
        if self.photometric_weak_view:
            weak = dacs_strong_augment(xt, self.args.daformer_jitter_strength, self.args.daformer_jitter_prob,
                                       self.args.daformer_blur_prob, self.generator)
        with self.env.autocast():
            features_t, logits_t = self.teacher(weak)
        probs = torch.softmax(upsample(logits_t.float(), size, self.args.align_corners), dim=1)  # (B, C, H, W)
        if bank is None:
            return probs, None
        sim_teacher = self.similarity(features_t, bank, size)                # (B, H, W, K')
        return probs, sim_teacher if self.released else torch.softmax(sim_teacher, dim=-1)

    def instance_loss(self, sim_teacher, features_m, logits_m, probs, bank, bank_labels, not_pasted):
        """Step 5's L_ins: scatter the teacher's instance evidence (calibrated by class evidence) onto the
        student's similarities on the mixed image. not_pasted: (B, H, W) bool, False on pasted source pixels."""
        sim_student = self.similarity(features_m, bank, probs.shape[-2:])    # (B, H, W, K')
        if self.released:
            calib = upsample(logits_m.detach().float(), probs.shape[-2:], self.args.align_corners) \
                if self.args.dida_calibrate else None
            return released_instance_loss(sim_teacher, sim_student, calib, bank_labels)
        calib = probs if self.args.dida_calibrate else None
        return simmatch_instance_loss(sim_teacher, sim_student, calib, bank_labels, not_pasted)

    def state_dict(self):
        state = {"optimizer": self.optimizer.state_dict(), "teacher": self.teacher.state_dict(),
                 "bank": self.bank.state_dict(), "generator": self.generator.get_state()}
        if self.fd_model is not None:
            state["fd_model"] = self.fd_model.state_dict()
        return state

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.teacher.load_state_dict(state["teacher"])
        self.bank.load_state_dict(state["bank"])
        self.generator.set_state(state["generator"])
        if self.fd_model is not None:
            self.fd_model.load_state_dict(state["fd_model"])


def add_arguments(parser):
    """DAFormer's --daformer-... flags (DIDA's base) and DIDA's own."""
    add_daformer_arguments(parser)
    group = parser.add_argument_group("dida (dual-level interaction)")
    group.add_argument("--dida-mode", choices=["simmatch", "released"], default="simmatch",
                       help="simmatch: L2-normalised features, softmax/T, calibration by the teacher's "
                            "probabilities, pasted pixels masked; released: as the official code computes")
    group.add_argument("--dida-lambda-ins", type=common.nonnegative_float, default=0.5,
                       help="weight of the instance-level loss L_ins (0 turns it off)")
    group.add_argument("--dida-bank-size", type=common.positive_int, default=300,
                       help="number K of bank entries (K/C per class)")
    group.add_argument("--dida-bank-interval", type=common.positive_int, default=50,
                       help="momentum-update the bank every N iterations")
    group.add_argument("--dida-bank-momentum", type=common.fraction_below_one, default=0.999, help="bank momentum m")
    group.add_argument("--dida-temperature", type=common.positive_float, default=0.1,
                       help="softmax temperature T over bank entries (simmatch mode only; SimMatch 0.1)")
    group.add_argument("--dida-gather-alpha", type=common.fraction, default=None,
                       help="weight of the semantic probabilities when gathering instance evidence into "
                            "pseudo-labels (1 = off; default: 1 released, 0.9 simmatch)")
    group.add_argument("--dida-calibrate", action=argparse.BooleanOptionalAction, default=True,
                       help="scatter step: calibrate the instance target by class evidence (--no-dida-calibrate: off)")
    group.add_argument("--dida-weak-view", choices=["clean", "photometric"], default=None,
                       help="teacher's target view: clean crop, or DACS jitter + blur "
                            "(default: clean released, photometric simmatch)")


Method = DIDA
