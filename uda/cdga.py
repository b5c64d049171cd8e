"""CDGA: cross-domain grouping and alignment -- a RECONSTRUCTION from the paper's description.

Copy with: uda/common.py, uda/source_only.py (the only files of uda/ this one imports).

Minsu Kim, Sunghun Joung, Seungryong Kim, Jungin Park, Ig-Jae Kim, Kwanghoon Sohn, "Cross-Domain
Grouping and Alignment for Domain Adaptive Semantic Segmentation", AAAI 2021, arXiv 2012.08226.

Official code: none exists (the authors' publication page has an empty code link; no third-party
implementation was found), so no commit was checked. The paper's full text (equations, K, loss weights,
tables) was not available either. What this file implements is built from the abstract, the Figure 1
legend and the Figure 2 caption of arXiv 2012.08226, and third-party summaries of the paper. The four parts
the abstract names are all here; every formula below is OUR design choice, listed with its reason and
its alternative. No published number is reproduced. The training protocol around it is that of the
adversarial baselines CDGA builds on, AdaptSegNet (Tsai et al., CVPR 2018,
https://github.com/wasidennis/AdaptSegNet) and ADVENT (Vu et al., CVPR 2019,
https://github.com/valeoai/ADVENT): see RECIPE.

Notation: G the segmentation network, F = G's features (B, D, h, w) at stride 8, Z its logits
(B, C, h, w), P = softmax(Z) per pixel over C classes, y_s source labels (255 ignored), K groups
(--cdga-groups). Sums over p run over the pixels of one domain's batch; up(.) is bilinear upsampling to
the domain's input image size (--align-corners).

  Grouping network (a learnable clustering module):  A(p) = softmax_k(Cnet(stopgrad F)(p)), A in simplex^K
  Group class profile, per domain d in {s, t}:       q_d^k = sum_p A_d^k(p) P_d(p) / (sum_p A_d^k(p) + eps)
      (source: P_s replaced by onehot(y_s) at stride 8, ignored pixels dropped; target: stopgrad P_t)
  Semantic consistency:  L_sc   = (1/K) sum_k ||q_s^k - q_t^k||_1
  Orthogonality:         L_orth = (1/2) sum_d mean_{k != k'} <q_d^k / ||q_d^k||, q_d^k' / ||q_d^k'||>
  Usage balance (ours):  L_bal  = (1/2) sum_d (log K - H(u_d)),   u_d^k = sum_p A_d^k(p) / sum_p 1
  Group-wise adversarial: X_d = [A_d^k * P_d]_k in R^{K*C} per pixel (A detached, P at input size),
      a discriminator Dnet gives one domain logit per group, o_d = up(Dnet(X_d)) in R^K per pixel;
      ell(o, label) = sum_p w_d(p) sum_k A_d^k(p) BCE(o^k(p), label)
      L_D   = (1/2) (ell(o_s, SOURCE) + ell(o_t, TARGET))     (Dnet's step, inputs detached)
      L_adv = ell(o_t, SOURCE)                                (G's step, Dnet frozen)
  Class equivalence (class imbalance): w_d(p) = 1 / (|present classes| * n_{c(p)}), n_c = pixel count of
      class c in the batch (source: y_s; target: pseudo-label argmax P_t), so every present class carries
      the same total weight in the alignment whatever its pixel count; 0 on ignored pixels.
      --cdga-class-weighting uniform gives w = 1 / #valid pixels instead.

Total objective per iteration (the three networks take separate steps, in this order):
  G:    L_ce(up(Z_s), y_s) + lambda_lovasz L_lov + lambda_adv * L_adv   (--lovasz-weight, 0 in RECIPE;
                                                                         --cdga-lambda-adv)
  Cnet: lambda_sc * L_sc + lambda_orth * L_orth + lambda_bal * L_bal  (--cdga-lambda-sc --cdga-lambda-orth
                                                                       --cdga-lambda-balance)
  Dnet: L_D
G and Cnet are stepped after one backward of the sum: their graphs are disjoint (F and P are detached
where Cnet reads them, A is detached where G's adversarial loss reads it), so each gets only its terms.

Design choices (ours; reason; alternative):
 1. Cnet reads the features F, detached. Reason: the abstract motivates grouping by the multi-modal,
    intra-class variation that category-level alignment misses, which P (a class posterior) cannot
    show; detached so that clustering does not distort segmentation ("without forgetting precise
    segmentation ability on the source"). Alternative: group on stopgrad P (--cdga-group-input probs).
 2. Cnet = 3x3 conv D->256, ReLU, 1x1 conv 256->K (--cdga-group-hidden); Adam like the discriminator
    (--cdga-group-lr, --cdga-d-betas). Reason: smallest head that sees local context. Alternative: a 1x1
    head.
 3. Source profiles from the labels. Reason: exact class content; target has no labels, so it uses P_t.
    Alternative: P_s (--cdga-source-profile probs).
 4. L_sc uses L1 between profiles. Reason: bounded, no log of empty classes. Alternative: symmetric KL
    (--cdga-sc-distance skl).
 5. L_orth = mean cosine similarity of profiles of different groups, per domain: 0 when groups hold
    disjoint class sets, 1 (its maximum; profiles are non-negative) when all groups are alike.
 6. L_bal is not in the paper's description: without it, orthogonality is met by near-empty groups
    whose tiny mass is skewed towards one class, i.e. collapse into one used group. It is logged with
    the usage metrics group_max_share_s/t and group_entropy. Alternative: --cdga-lambda-balance 0.
 7. One discriminator on the K*C-channel concatenation with K output channels (AdaptSegNet's
    FCDiscriminator widths), the cheapest reading of "D decides, for each sub-space, source or target".
    Alternative: K independent discriminators, one per group's X^k (--cdga-d-mode separate; grouped
    convs).
 8. Dnet's per-group logits are upsampled to pixels and each pixel's BCE for group k is weighted by
    A^k(p), so group k's output is judged on group k's pixels (pixel-weighted adversarial maps as in
    CLAN, Luo et al. CVPR 2019). sum_k A^k = 1 and sum_p w = 1 keep the scale of AdaptSegNet's loss,
    so its lambda_adv applies; an empty group weighs 0 instead of being renormalised.
 9. Class equivalence as class-balanced pixel weights on both Dnet's and G's adversarial loss. Reason:
    exact with hard counts; every present class gets 1/|present| of the weight, split over groups by
    A. Alternative reading: balance the classes inside each group (needs a presence threshold on soft
    counts n_{k,c}, a number we would have to invent); uniform weights: --cdga-class-weighting uniform.
10. Profiles and class counts are per process: under DDP each rank's loss is its own batch's, and
    gradients of G, Cnet and Dnet are averaged in common.optimizer_step.

Deviations:
- The whole method is a RECONSTRUCTION (above): no official code exists and the paper's equations were
  not available, so nothing here was checked against the authors' work and no published number is
  reproduced.
- From the AdaptSegNet/ADVENT base: Dnet reads group-masked predictions at the input size (their
  output-space Dnet reads the predictions); one Dnet on the final output only (no auxiliary conv4 head and
  Dnet); DeepLab-v2's BatchNorm is frozen (--bn auto: fixed statistics and affine), where their code
  fixes the affine but leaves BN in train mode.
- The target batch passes through G in train mode, so trainable BatchNorm (the toy's tiny backbone)
  also collects target statistics, which the frozen-BN DeepLab-v2 of the recipe does not.
- At `--cdga-lambda-adv 0` (the toy benchmark's recipe-only control) Dnet is neither evaluated nor
  trained: it reaches G only through L_adv, so no weight of G or Cnet changes and the full-size
  group-masked maps and both Dnet passes are saved.
- Compute: Cnet at stride 8 and a Dnet on K*C channels, no N x N matrices; the second (target)
  forward/backward dominates.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from uda import common
from uda.common import (IGNORE_INDEX, UserError, adam, broadcast_parameters, downsample_labels, optimizer_step, sgd,
                        upsample)
from uda.source_only import supervised_loss

EPS = 1e-6
SOURCE_LABEL, TARGET_LABEL = 0.0, 1.0  # domain labels of AdaptSegNet (train_gta2cityscapes_multi.py)
LEAKY_SLOPE = 0.2                      # AdaptSegNet FCDiscriminator's LeakyReLU
D_KERNEL, D_STRIDE, D_PADDING = 4, 2, 1  # AdaptSegNet FCDiscriminator's convolutions
D_WIDTH_MULTS = (1, 2, 4, 8)             # its widths: ndf, 2 ndf, 4 ndf, 8 ndf
# smallest input side: four halvings (floor(n / 2) each) must leave >= 2 pixels for the padded 4x4 last conv
D_MIN_SIZE = 2 * 2 ** len(D_WIDTH_MULTS)


# --------------------------------------------------------------------------------------------------
# Losses: pure functions of tensors
# --------------------------------------------------------------------------------------------------
def group_profiles(assign, probs, valid=None, eps=EPS):
    """Class profile of every group and its soft pixel mass, pooled over the batch (fp32).

    assign: (B, K, h, w) soft assignments (each pixel on the simplex); probs: (B, C, h, w) class
    distributions (softmax or one-hot); valid: (B, h, w) bool or None (pixels to count).
    Returns q (K, C) = sum_p A^k P / (sum_p A^k + eps), all-zero for an empty group, and mass (K,).
    """
    assert assign.dim() == 4 and probs.dim() == 4 and assign.shape[0] == probs.shape[0]
    assert assign.shape[2:] == probs.shape[2:]
    a = assign.float().flatten(2)                                    # (B, K, N)
    p = probs.float().flatten(2)                                     # (B, C, N)
    if valid is not None:
        a = a * valid.flatten(1)[:, None].float()                    # (B, K, N)
    mass_kc = torch.einsum("bkn,bcn->kc", a, p)                      # (K, C)
    mass = a.sum(dim=(0, 2))                                         # (K,)
    return mass_kc / (mass[:, None] + eps), mass


def semantic_consistency_loss(q_s, q_t, distance="l1", eps=EPS):
    """(1/K) sum_k dist(q_s^k, q_t^k): group k holds the same classes in both domains.

    q_s, q_t: (K, C) profiles. distance 'l1' (sum |.|) or 'skl' (symmetric KL,
    mean of KL(a||b) and KL(b||a), entries clamped at eps). Zero iff the profiles are identical.
    """
    assert q_s.shape == q_t.shape and q_s.dim() == 2
    if distance == "l1":
        per_group = (q_s - q_t).abs().sum(dim=1)                     # (K,)
    else:
        a, b = q_s.clamp_min(eps), q_t.clamp_min(eps)
        kl_ab = (a * (a.log() - b.log())).sum(dim=1)                 # (K,)
        kl_ba = (b * (b.log() - a.log())).sum(dim=1)                 # (K,)
        per_group = torch.stack([kl_ab, kl_ba]).mean(dim=0)          # (2, K) -> (K,)
    return per_group.mean()


def orthogonality_loss(q, eps=EPS):
    """Mean cosine similarity between the profiles of different groups; q: (K, C), K >= 2.

    0 when the groups hold disjoint class sets, 1 (maximal for non-negative profiles) when all are
    equal. An all-zero (empty) group has similarity 0 with every other group, not NaN.
    """
    assert q.dim() == 2 and q.shape[0] >= 2
    num_groups = q.shape[0]
    unit = q / (q.norm(dim=1, keepdim=True) + eps)                   # (K, C)
    gram = unit @ unit.t()                                           # (K, K)
    off_diagonal = gram.sum() - gram.diagonal().sum()
    return off_diagonal / (num_groups * (num_groups - 1))


def usage_balance_loss(mass, eps=EPS):
    """log K - H(u), u = mass / sum(mass): 0 for equal group usage, log K when one group takes all.

    mass: (K,) non-negative soft pixel counts. Returns (loss, usage (K,)).
    """
    usage = mass.float() / (mass.float().sum() + eps)                 # (K,)
    entropy = -(usage * usage.clamp_min(eps).log()).sum()
    return math.log(mass.shape[0]) - entropy, usage


def class_equivalence_weights(labels, num_classes, balanced=True):
    """Pixel weights (B, H, W), summing to 1 over the valid pixels (all 0 when none is valid).

    labels: (B, H, W) int64, 255 ignored. balanced: w(p) = 1 / (|present| n_{c(p)}), so every class
    present in the batch has total weight 1/|present|; otherwise w = 1 / #valid.
    """
    assert labels.dim() == 3 and labels.dtype == torch.int64
    valid = labels != IGNORE_INDEX                                   # (B, H, W)
    safe = labels.masked_fill(~valid, 0)                             # (B, H, W), indexable
    if not balanced:
        return valid.float() / valid.sum().clamp_min(1)
    counts = torch.bincount(safe[valid], minlength=num_classes).float()  # (C,) pixels per class
    present = (counts > 0).sum().clamp_min(1)
    per_class = 1 / (counts.clamp_min(1) * present)                  # (C,)
    return per_class[safe] * valid.float()                           # (B, H, W)


def group_masked_predictions(assign, probs):
    """Discriminator input X[:, k*C + c] = A^k * P^c: (B, K, H, W), (B, C, H, W) -> (B, K*C, H, W)."""
    assert assign.shape[0] == probs.shape[0] and assign.shape[2:] == probs.shape[2:]
    return (assign[:, :, None] * probs[:, None]).flatten(1, 2)      # (B, K, C, H, W) -> (B, K*C, H, W)


def groupwise_adversarial_loss(d_logits, assign, weights, domain_label):
    """sum_p w(p) sum_k A^k(p) BCE(d^k(p), domain_label), in fp32.

    d_logits: (B, K, H, W) per-group domain logits at pixel resolution; assign: (B, K, H, W) soft
    assignments (detached by the caller); weights: (B, H, W) pixel weights summing to 1 (or 0).
    """
    assert d_logits.shape == assign.shape and weights.shape == (d_logits.shape[0],) + d_logits.shape[2:]
    d_logits = d_logits.float()
    target = torch.full_like(d_logits, domain_label)
    bce = F.binary_cross_entropy_with_logits(d_logits, target, reduction="none")  # (B, K, H, W)
    return (weights[:, None] * assign.float() * bce).sum()


# --------------------------------------------------------------------------------------------------
# Modules: the grouping network and the group-wise discriminator
# --------------------------------------------------------------------------------------------------
class GroupingNet(nn.Module):
    """Cnet: 3x3 conv in -> hidden, ReLU, 1x1 conv hidden -> K. Returns group logits (B, K, h, w)."""

    def __init__(self, in_channels, hidden, num_groups):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
                                    nn.Conv2d(hidden, num_groups, 1))

    def forward(self, x):
        return self.layers(x)


class GroupDiscriminator(nn.Module):
    """AdaptSegNet's FCDiscriminator with K outputs: one domain logit map per group.

    Four 4x4 stride-2 convs (width x 1, 2, 4, 8) with LeakyReLU 0.2, then a 4x4 stride-2 conv to K
    channels (output stride 32). separate=True: K independent discriminators in one module through
    grouped convolutions, each reading only its own group's C channels (widths x K).
    Input (B, K*C, H, W) from group_masked_predictions; output (B, K, H/32, W/32).
    """

    def __init__(self, num_groups, num_classes, width=64, separate=False):
        super().__init__()
        groups = num_groups if separate else 1
        channels = [num_groups * num_classes] + [width * m * groups for m in D_WIDTH_MULTS]
        layers = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, D_KERNEL, D_STRIDE, D_PADDING, groups=groups),
                       nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]
        layers.append(nn.Conv2d(channels[-1], num_groups, D_KERNEL, D_STRIDE, D_PADDING, groups=groups))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        if min(x.shape[-2:]) < D_MIN_SIZE:  # the last 4x4 conv would find a map smaller than its kernel
            raise UserError(f"cdga: the discriminator reads the crop at full size and needs at least "
                            f"{D_MIN_SIZE}x{D_MIN_SIZE} pixels, got {x.shape[-1]}x{x.shape[-2]}: use a larger "
                            f"--crop / --source-size / --target-size")
        return self.layers(x)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
# The AdaptSegNet / ADVENT protocol (AdaptSegNet pytorch_0.4/train_gta2cityscapes_multi.py, ADVENT
# advent/domain_adaptation/config.py). Not in it: source_size (train.py's per-dataset defaults are the
# protocol's GTA5 1280x720 / SYNTHIA 1280x760) and bn (--bn auto freezes DeepLab-v2's BN).
RECIPE = {
    "lr": 2.5e-4,                          # LEARNING_RATE 2.5e-4 (both)
    "head_lr_mult": 10.0,                  # optim_parameters: the classifier at 10 x LR (both)
    "momentum": 0.9,                       # MOMENTUM (both)
    "weight_decay": 5e-4,                  # WEIGHT_DECAY 0.0005 (both)
    "poly_power": 0.9,                     # POWER (both)
    "iters": 250000,                       # NUM_STEPS / MAX_ITERS: the poly schedule's length (both)
    "stop_iter": 120000,                   # ADVENT EARLY_STOP (AdaptSegNet NUM_STEPS_STOP: 150,000)
    "batch_size": 1,                       # BATCH_SIZE 1 (AdaptSegNet), BATCH_SIZE_SOURCE/TARGET 1 (ADVENT)
    "backbone": "deeplabv2-r101-caffe",    # DeepLab-v2 ResNet-101, COCO init DeepLab_resnet_pretrained_init-f81d91e8
    "target_size": "1024x512",             # INPUT_SIZE_TARGET 1024,512 (both)
    "lovasz_weight": 0.0,                  # CE only (both)
    "align_corners": True,                 # nn.Upsample(..., mode='bilinear', align_corners=True) (both)
}
# Read by the tools through uda/methods.py (the contract in uda/source_only.py):
# the toy benchmark's recipe-only control switches off group-wise adversarial alignment and the grouping losses
CONTROL_FLAGS = ["--cdga-lambda-adv", "0", "--cdga-lambda-sc", "0", "--cdga-lambda-orth", "0",
                 "--cdga-lambda-balance", "0"]


class CDGA:
    """G (SGD), the grouping net Cnet (Adam) and the discriminator Dnet (Adam), stepped G+Cnet, then Dnet."""

    needs_target = True

    def __init__(self, model, args, env):
        self.model, self.env = model, env
        self.num_groups, self.num_classes = args.cdga_groups, model.num_classes
        self.lovasz_weight, self.align_corners = args.lovasz_weight, args.align_corners
        self.group_on_features = args.cdga_group_input == "features"
        self.profile_from_labels = args.cdga_source_profile == "labels"
        self.sc_distance, self.balanced = args.cdga_sc_distance, args.cdga_class_weighting == "balanced"
        self.lambda_adv, self.lambda_sc = args.cdga_lambda_adv, args.cdga_lambda_sc
        self.lambda_orth, self.lambda_balance = args.cdga_lambda_orth, args.cdga_lambda_balance
        device = next(model.parameters()).device
        in_channels = model.feature_dim if self.group_on_features else model.num_classes
        self.grouping = GroupingNet(in_channels, args.cdga_group_hidden, args.cdga_groups).to(device)
        self.discriminator = GroupDiscriminator(args.cdga_groups, model.num_classes, args.cdga_d_width,
                                                separate=args.cdga_d_mode == "separate").to(device)
        broadcast_parameters(self.grouping)
        broadcast_parameters(self.discriminator)
        self.optimizer = sgd(model.param_groups(args.head_lr_mult), args.lr, args.momentum, args.weight_decay)
        self.group_optimizer = adam(self.grouping.parameters(), args.cdga_group_lr, tuple(args.cdga_d_betas))
        self.d_optimizer = adam(self.discriminator.parameters(), args.cdga_d_lr, tuple(args.cdga_d_betas))
        self.optimizers = [self.optimizer, self.group_optimizer, self.d_optimizer]  # LR from the schedule

    def train_step(self, source, target, it):
        """One iteration: G and Cnet step, then Dnet. Returns detached loss terms and usage metrics."""
        terms, cache = self.generator_step(source, target)
        if cache is not None:
            terms.update(self.discriminator_step(cache))
        return terms

    def up(self, x, size):
        return upsample(x, size, self.align_corners)

    def _assign(self, features, logits):
        """Group logits (B, K, h, w) from stopgrad features (or stopgrad class probabilities)."""
        x = features if self.group_on_features else torch.softmax(logits.float(), dim=1)
        with self.env.autocast():
            return self.grouping(x.detach())

    def _source_profile_input(self, logits_s, labels):
        """(probs (B, C, h, w), valid (B, h, w) or None) for the source profiles, at the logits' stride."""
        if not self.profile_from_labels:
            return torch.softmax(logits_s.float(), dim=1).detach(), None
        small = downsample_labels(labels, logits_s.shape[-2:])        # (B, h, w)
        valid = small != IGNORE_INDEX
        onehot = F.one_hot(small.masked_fill(~valid, 0), self.num_classes)  # (B, h, w, C)
        return onehot.permute(0, 3, 1, 2).float(), valid              # (B, C, h, w)

    def generator_step(self, source, target):
        """Step G (source CE + lambda_adv L_adv, Dnet frozen) and Cnet (clustering losses)."""
        env = self.env
        self.optimizer.zero_grad(set_to_none=True)
        self.group_optimizer.zero_grad(set_to_none=True)
        self.discriminator.requires_grad_(False)  # G's backward leaves Dnet's gradients alone
        labels = source["label"]
        size_t = target["image"].shape[-2:]  # the domains may differ in size
        with env.autocast():
            features_s, logits_s = self.model(source["image"])
            # the target reaches G's loss only through L_adv (Cnet reads it detached): no graph at weight 0
            with torch.set_grad_enabled(bool(self.lambda_adv)):
                features_t, logits_t = self.model(target["image"])
        ce, lovasz = supervised_loss(logits_s, labels, self.lovasz_weight, self.align_corners)

        # Grouping and its losses: only Cnet receives these gradients (inputs detached).
        group_logits_s = self._assign(features_s, logits_s)          # (B, K, h, w)
        group_logits_t = self._assign(features_t, logits_t)
        assign_s = torch.softmax(group_logits_s.float(), dim=1)       # fp32: softmax and profiles
        assign_t = torch.softmax(group_logits_t.float(), dim=1)
        probs_s, valid_s = self._source_profile_input(logits_s, labels)
        q_s, mass_s = group_profiles(assign_s, probs_s, valid_s)     # (K, C), (K,)
        q_t, mass_t = group_profiles(assign_t, torch.softmax(logits_t.float(), dim=1).detach())
        sc = semantic_consistency_loss(q_s, q_t, self.sc_distance)
        orth = torch.stack([orthogonality_loss(q_s), orthogonality_loss(q_t)]).mean()  # mean over domains
        bal_s, usage_s = usage_balance_loss(mass_s)
        bal_t, usage_t = usage_balance_loss(mass_t)
        bal = torch.stack([bal_s, bal_t]).mean()

        # Group-wise adversarial loss on the target: G learns to make every group look like source.
        # At --cdga-lambda-adv 0 Dnet cannot reach G, so it is neither evaluated nor trained (cache None).
        adv, cache = (self._adversarial_loss(group_logits_s, group_logits_t, logits_s, logits_t, labels, size_t)
                      if self.lambda_adv else (torch.zeros((), device=ce.device), None))

        loss = (ce + self.lovasz_weight * lovasz + self.lambda_adv * adv + self.lambda_sc * sc
                + self.lambda_orth * orth + self.lambda_balance * bal)
        env.scaler.scale(loss).backward()
        optimizer_step(self.optimizer, env.scaler)
        optimizer_step(self.group_optimizer, env.scaler)
        self.discriminator.requires_grad_(True)

        usage = (mass_s + mass_t) / (mass_s + mass_t).sum()
        entropy = -(usage * usage.clamp_min(EPS).log()).sum() / math.log(self.num_groups)
        weighted = {"lovasz": (self.lovasz_weight, lovasz), "adv": (self.lambda_adv, adv), "sc": (self.lambda_sc, sc),
                    "orth": (self.lambda_orth, orth), "balance": (self.lambda_balance, bal)}
        terms = {"ce": ce, **{name: value for name, (weight, value) in weighted.items() if weight},
                 "group_max_share_s": usage_s.max(), "group_max_share_t": usage_t.max(), "group_entropy": entropy}
        return {k: v.detach() for k, v in terms.items()}, cache

    def _adversarial_loss(self, group_logits_s, group_logits_t, logits_s, logits_t, labels, size_t):
        """L_adv of G on the target (Dnet frozen) and Dnet's detached inputs for discriminator_step."""
        size_s = labels.shape[-2:]
        assign_s_full = torch.softmax(self.up(group_logits_s.float(), size_s), dim=1).detach()  # (B, K, H, W)
        assign_t_full = torch.softmax(self.up(group_logits_t.float(), size_t), dim=1).detach()
        probs_s_full = torch.softmax(self.up(logits_s, size_s).float(), dim=1)                 # (B, C, H, W)
        probs_t_full = torch.softmax(self.up(logits_t, size_t).float(), dim=1)
        x_t = group_masked_predictions(assign_t_full, probs_t_full)   # (B, K*C, H, W)
        weights_s = class_equivalence_weights(labels, self.num_classes, self.balanced)
        weights_t = class_equivalence_weights(probs_t_full.detach().argmax(1), self.num_classes, self.balanced)
        with self.env.autocast():
            d_t = self.discriminator(x_t)
        adv = groupwise_adversarial_loss(self.up(d_t.float(), size_t), assign_t_full, weights_t, SOURCE_LABEL)
        cache = {"x_s": group_masked_predictions(assign_s_full, probs_s_full.detach()), "x_t": x_t.detach(),
                 "assign_s": assign_s_full, "assign_t": assign_t_full, "weights_s": weights_s, "weights_t": weights_t}
        return adv, cache

    def discriminator_step(self, cache):
        """Step Dnet on detached group-masked predictions of both domains (G and Cnet untouched)."""
        self.d_optimizer.zero_grad(set_to_none=True)
        with self.env.autocast():
            d_s = self.discriminator(cache["x_s"])
            d_t = self.discriminator(cache["x_t"])
        loss_s = groupwise_adversarial_loss(self.up(d_s.float(), cache["x_s"].shape[-2:]), cache["assign_s"],
                                            cache["weights_s"], SOURCE_LABEL)
        loss_t = groupwise_adversarial_loss(self.up(d_t.float(), cache["x_t"].shape[-2:]), cache["assign_t"],
                                            cache["weights_t"], TARGET_LABEL)
        loss_d = torch.stack([loss_s, loss_t]).mean()  # AdaptSegNet halves each domain's term
        self.env.scaler.scale(loss_d).backward()
        optimizer_step(self.d_optimizer, self.env.scaler)
        return {"d": loss_d.detach()}

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "grouping": self.grouping.state_dict(),
                "group_optimizer": self.group_optimizer.state_dict(),
                "discriminator": self.discriminator.state_dict(), "d_optimizer": self.d_optimizer.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.grouping.load_state_dict(state["grouping"])
        self.group_optimizer.load_state_dict(state["group_optimizer"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])


def add_arguments(parser):
    group = parser.add_argument_group("cdga (reconstruction; see uda/cdga.py)")
    group.add_argument("--cdga-groups", type=common.int_at_least(2), default=4,
                       help="K, number of cross-domain groups, >= 2 since orthogonality compares groups "
                            "(unknown in the paper; sweep 2, 4, 8)")
    group.add_argument("--cdga-group-input", choices=["features", "probs"], default="features",
                       help="what the grouping net reads (detached): G's features or its class probabilities")
    group.add_argument("--cdga-group-hidden", type=common.positive_int, default=256,
                       help="hidden channels of the grouping net")
    group.add_argument("--cdga-group-lr", type=common.positive_float, default=1e-4,
                       help="Adam learning rate of the grouping net")
    group.add_argument("--cdga-source-profile", choices=["labels", "probs"], default="labels",
                       help="source group profiles from one-hot labels or from predicted probabilities")
    group.add_argument("--cdga-sc-distance", choices=["l1", "skl"], default="l1",
                       help="distance of the semantic consistency loss: L1 or symmetric KL")
    group.add_argument("--cdga-lambda-sc", type=common.nonnegative_float, default=1.0,
                       help="weight of the semantic consistency loss")
    group.add_argument("--cdga-lambda-orth", type=common.nonnegative_float, default=1.0,
                       help="weight of the orthogonality loss")
    group.add_argument("--cdga-lambda-balance", type=common.nonnegative_float, default=1.0,
                       help="weight of the group-usage balance loss (ours, against collapse; 0 disables)")
    group.add_argument("--cdga-lambda-adv", type=common.nonnegative_float, default=1e-3,
                       help="weight of G's group-wise adversarial loss (AdaptSegNet/ADVENT's 1e-3 on the output)")
    group.add_argument("--cdga-class-weighting", choices=["balanced", "uniform"], default="balanced",
                       help="class equivalence: every present class weighs the same in the alignment "
                            "(balanced) or every pixel does (uniform)")
    group.add_argument("--cdga-d-mode", choices=["shared", "separate"], default="shared",
                       help="one discriminator with K outputs, or K independent ones (grouped convs)")
    group.add_argument("--cdga-d-width", type=common.positive_int, default=64,
                       help="width of the discriminator's first conv (AdaptSegNet's ndf)")
    group.add_argument("--cdga-d-lr", type=common.positive_float, default=1e-4,
                       help="Adam learning rate of the discriminator (AdaptSegNet/ADVENT LEARNING_RATE_D)")
    group.add_argument("--cdga-d-betas", type=common.fraction_below_one, nargs=2, default=[0.9, 0.99],
                       help="Adam betas of the discriminator (AdaptSegNet/ADVENT) and the grouping net")


Method = CDGA
