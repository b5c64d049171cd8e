"""PLCA: pixel-level cycle association between a source and a target image, at two levels.

Copy with: uda/common.py, uda/source_only.py (the only files of uda/ this one imports).

Paper: G. Kang, Y. Wei, Y. Yang, Y. Zhuang, A. Hauptmann, "Pixel-Level Cycle Association: A New
Perspective for Domain Adaptive Semantic Segmentation", NeurIPS 2020, arXiv 2011.00147.
Official code: https://github.com/kgl-prml/Pixel-Level-Cycle-Association, commit e01d77a (read:
solver/loss.py AssociationLoss, solver/solver.py association(), solver/utils.py LSR, tools/train.py
get_transform, tools/test.py, config/config.py and experiments/config/*.yaml).

Notation, per source/target image pair: u_i (i < N_s) source features, v_j (j < N_t) target features
(layer4, stride 8, D channels); p^s_i, p^t_j softmax probabilities of the stride-8 logits (C classes);
y_i the source label nearest-downsampled to the feature size (255 = ignore).

Score normalisation sigma (official `scoring`), for a row r of similarities to the other pixel set:
    sigma(r)_j = softmax_j( (r_j - mean(r)) / (std(r) + eps) ),  mean, unbiased std DETACHED.

Spatial aggregation of the target (official `spatial_agg`), alpha = --plca-agg-alpha:
    features:       W_jj' = sigma_j'(cos(v_j, v_j'))          v~ = (1 - alpha) v + alpha W v
    probabilities:  W_jj' = softmax_j'(-KL(p_j || p_j'))      p~ = (1 - alpha) p + alpha W p
(diagonal included, gradient through W and the aggregated vectors.)

Cycle association (official `cycle_associate`) given similarities S (N_s x N_t) and S' (N_t x N_s):
    A = sigma_rows(S), A' = sigma_rows(S');  j*(i) = argmax_j A_ij, i*(i) = argmax_i' A'_{j*(i) i'}
    (indices carry no gradient); keep i iff y_i != 255 and y_{i*(i)} == y_i;
    L_ass = mean over kept i (of every pair in the batch) of min(-log(A_{i j*} A'_{j* i*}), 100)
(official: BCE of the product against 1, whose log is clamped at -100); L_ass = 0 when none is kept.
    L_fass: S_ij = cos(u_i, v~_j), S' = S^T.
    L_cass: S_ij = -KL(p^s_i || p~^t_j), S'_ji = -KL(p~^t_j || p^s_i), KL with log(x + eps).
LSR (official `LSR`, on log_softmax of the stride-8 logits of each domain), tau = --plca-lsr-tau:
    l = -(1/C) sum_c log p_c,  L_lsr = mean_pixels[ stopgrad(l / tau - 1) * l ]
    (same gradient as (l - tau)^2 / (2 tau): pulls the mean log-probability towards -tau).
Source supervision (uda/source_only.py): CE + Lovasz-softmax on the bilinearly upsampled logits.

Total, per micro-batch (1 / --plca-iter-size of the per-process batch), one SGD optimizer for all:
    L = L_ce + lambda_lovasz L_lov + lambda_fass L_fass + lambda_cass L_cass + lambda_lsr (L_lsr^S + L_lsr^T)
    (--lovasz-weight 1.5 in RECIPE; --plca-lambda-fass 0.1, --plca-lambda-cass 0.1, --plca-lambda-lsr 0.01).

How the N x N maths is computed (exact, in fp32 under any autocast). A softmax ignores a constant
added to its row and so does the std, so the mean in sigma drops out and
    max_j log sigma(r)_j = -log sum_j exp((r_j - max(r)) / (std(r) + eps)),
and -KL(p_i || q_j) = p_i . log(q_j + eps) + (a constant of row i). Every similarity is therefore a
product S = a b^T of two thin factors of E columns (cosine: E = D; -KL: E = C). `BestLinks` reads S in
row blocks and returns the best log sigma and its index per row and, for the cosine level, per column
(S' = S^T: one product serves both directions); `Aggregate` computes W c the same way. Their backward
passes rebuild each block's softmax from saved row (and column) statistics: nothing of size N x N x E is
formed. --plca-chunk 0 keeps the cosine level's S and W for the backward, so no product of D columns is
computed twice; --plca-chunk R keeps no N x N matrix and recomputes R-row blocks instead (exact, less
memory, slower). --plca-max-pixels n associates a random subset of n pixels per image, drawn from the
method's generator (approximate; the official USE_CROP trick is similar). The file reads as the
iteration: the losses, the test-time aggregation and the method first, then the custom autograd
functions `BestLinks` and `Aggregate` in the last section.

Test-time aggregation (official tools/test.py, TEST.WITH_AGGREGATION=True in the test configs):
F~ = (1 - a) F + a agg_cos(F); p = softmax(classifier(F~)); p~ = (1 - a) p + a agg_KL(p); argmax of
p~ upsampled, a = 0.5. `aggregate_predict` computes it; evaluate.py --tta-aggregate turns it on
(default: on for PLCA checkpoints). In-training validation does not aggregate (as official).

Under DDP each rank associates its own pairs; gradients are averaged in common.optimizer_step.

Deviations:
- lambda_lovasz 1.5: the official code multiplies Lovasz by 0.75 x world_size x ITER_SIZE but, on
  several GPUs, each rank's Lovasz is only its slice of the loss over the gathered batch
  (solver/lov_softmax_multigpu.py), so x world_size just undoes DDP's averaging: the effective weight
  relative to CE is 0.75 x ITER_SIZE = 1.5 on 1 or 2 GPUs. We compute Lovasz per process (no gather):
  with one image set per process the gradients differ slightly from the gathered loss.
- Loss in log space (the best log sigma of each direction, then the clamp at 100) instead of BCE on
  the product of softmax values: the same value and gradient. Both factors are row maxima (>= 1/N), so
  the loss is <= 2 log N and the clamp never binds; log space only avoids forming the product.
- --plca-iter-size splits the per-process batch into micro-batches (official ITER_SIZE, separate BN
  statistics per micro-batch); its default is 1, the released setup is `torchrun --nproc_per_node=2
  ... --plca-iter-size 2` with the recipe's batch of 4 (2 pairs per GPU per forward, 8 + 8 images per
  step).
- The random resize draws a continuous scale in [1.0, 1.3] of a fixed 760-short-side size
  (--random-scale, --source-size, --target-size) where the official code draws an integer short side in
  760..988; SYNTHIA (1280x760) needs --source-size native instead of the recipe's GTA5 size.
- Class order: trainIds (the official code uses its own order); no effect on the losses.
- Target labels are never loaded (official loads them for logging diagnostics only).
"""
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from uda import common
from uda.common import IGNORE_INDEX, UserError, downsample_labels, method_generator, optimizer_step, sgd
from uda.source_only import supervised_loss

SIGMA_EPS = 1e-10       # official scoring(): (x - mean) / (std + 1e-10)
KL_EPS = 1e-10          # official compute_sim_mat_kl(): log(x + 1e-10)
NLL_CLAMP = 100.0       # torch.nn.BCELoss clamps log(x) at -100; the official loss is BCE(A A', 1)
TTA_ALPHA = 0.5         # official tools/test.py: alpha = 0.5 for both test-time aggregations
BLOCK_ELEMENTS = 1 << 22  # entries of one row block when --plca-chunk is 0 (16 MiB in fp32): temporaries
                          # that fit the CPU's last-level cache, and blocks large enough for full-speed matmuls
GENERATOR_STREAM = "plca"  # common.method_generator's stream, named after the method


# --------------------------------------------------------------------------------------------------
# Precision helpers
# --------------------------------------------------------------------------------------------------
def fp32(x):
    """Half-precision tensors to fp32 (statistics, softmaxes over ~8k columns and logs need it);
    fp32/fp64 pass through unchanged (float64 for the tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def no_autocast(device):
    """Disable autocast for the association maths, so matmuls stay in fp32 under --amp."""
    return torch.autocast(device_type=device.type, enabled=False)


# --------------------------------------------------------------------------------------------------
# Losses: pure functions of tensors
# --------------------------------------------------------------------------------------------------
def aggregate_features(v, alpha, chunk=0):
    """v~ = (1 - alpha) v + alpha sigma_rows(cos(v, v)) v.  v: (N, D) -> (N, D) fp32."""
    v = fp32(v)
    if alpha == 0:
        return v
    unit = F.normalize(v, dim=1)                                              # (N, D)
    return (1.0 - alpha) * v + alpha * Aggregate.apply(unit, unit, v, chunk, chunk <= 0, True)


def aggregate_probs(p, alpha, chunk=0):
    """p~ = (1 - alpha) p + alpha softmax_rows(-KL(p_j || p_j')) p (no z-scoring, as official).

    p: (N, C) probabilities -> (N, C); rows of the result still sum to one. -KL(p_j || p_j') enters as
    p_j . log(p_j' + eps): the entropy term is a constant of row j. W is cheap to recompute (C columns
    per product), so it is never kept.
    """
    p = fp32(p)
    if alpha == 0:
        return p
    return (1.0 - alpha) * p + alpha * Aggregate.apply(p, torch.log(p + KL_EPS), p, chunk, False, False)


def cycle_terms(log_a, j_star, log_a_back, i_back, labels):
    """Per-source-pixel loss and keep mask of the source -> target -> source cycle of one pair.

    log_a, j_star (N_s,): best log A_ij and its j; log_a_back, i_back (N_t,): best log A'_ji' and its i';
    labels (N_s,) int64, 255 = ignore. Returns nll (N_s,) = min(-log A_{i j*} - log A'_{j* i*}, 100)
    and keep (N_s,) bool.
    """
    i_star = i_back[j_star]                                               # (N_s,)
    keep = (labels != IGNORE_INDEX) & (labels[i_star] == labels)          # (N_s,)
    nll = (-(log_a + log_a_back[j_star])).clamp(max=NLL_CLAMP)            # (N_s,)
    return nll, keep


def check_pair(src, tgt, labels):
    assert src.dim() == 2 and tgt.dim() == 2 and src.shape[1] == tgt.shape[1], (src.shape, tgt.shape)
    assert labels.shape == (src.shape[0],), (labels.shape, src.shape)


def feature_association(u, v, labels, alpha, chunk=0):
    """L_fass terms of one pair. u: (N_s, D) source, v: (N_t, D) target, labels: (N_s,) -> (nll, keep).

    One product S = cos(u, v~) gives both directions: A from its rows, A' (rows of S^T) from its columns.
    """
    check_pair(u, v, labels)
    target = aggregate_features(v, alpha, chunk)                              # (N_t, D)
    links = BestLinks.apply(F.normalize(fp32(u), dim=1), F.normalize(target, dim=1), chunk, chunk <= 0, True)
    return cycle_terms(*links, labels)


def classifier_association(p_s, p_t, labels, alpha, chunk=0):
    """L_cass terms of one pair. p_s: (N_s, C), p_t: (N_t, C) probabilities, labels: (N_s,) -> (nll, keep).

    S_ij = -KL(p_i || q_j) and S'_ji = -KL(q_j || p_i) are different matrices, each a C-column product
    up to a constant per row (which sigma ignores); cheap to recompute, so never kept.
    """
    check_pair(p_s, p_t, labels)
    p_s = fp32(p_s)
    q = aggregate_probs(p_t, alpha, chunk)                                    # (N_t, C)
    log_a, j_star = BestLinks.apply(p_s, torch.log(q + KL_EPS), chunk, False, False)        # rows of S
    log_a_back, i_back = BestLinks.apply(q, torch.log(p_s + KL_EPS), chunk, False, False)   # rows of S'
    return cycle_terms(log_a, j_star, log_a_back, i_back, labels)


def subsample(n, k, generator, device):
    """k random indices out of n drawn from `generator` (all n, in order, when k <= 0 or k >= n)."""
    if k <= 0 or k >= n:
        return torch.arange(n, device=device)
    assert generator is not None, "subsampling draws from the method's generator, never the global RNG"
    return torch.randperm(n, generator=generator)[:k].to(device)


def association_loss(pair_terms, source_maps, target_maps, labels, max_pixels=0, generator=None, **options):
    """Mean of the kept per-pixel losses over every pair of the batch (official: one BCE over all).

    source_maps: (B, E, h, w), target_maps: (B, E, h', w'), labels: (B, h, w) int64 at the map size;
    pair_terms(src (N_s, E), tgt (N_t, E), labels (N_s,), **options) -> (nll, keep): feature_association
    or classifier_association, options their alpha and chunk. Associations are per pair b (source b with
    target b), computed in fp32 even under autocast. 0 (with a graph) if none kept.
    max_pixels > 0 associates that many random pixels per image, drawn from the CPU `generator`.
    """
    assert source_maps.dim() == 4 and target_maps.shape[:2] == source_maps.shape[:2]
    assert labels.shape == (source_maps.shape[0],) + source_maps.shape[2:], (labels.shape, source_maps.shape)
    nlls, keeps = [], []
    with no_autocast(source_maps.device):
        for b in range(source_maps.shape[0]):  # one pair at a time: the N x N matrices are per pair
            src = fp32(source_maps[b]).flatten(1).t()         # (N_s, E)
            tgt = fp32(target_maps[b]).flatten(1).t()         # (N_t, E)
            lab = labels[b].reshape(-1)                       # (N_s,)
            s_idx = subsample(src.shape[0], max_pixels, generator, src.device)
            t_idx = subsample(tgt.shape[0], max_pixels, generator, tgt.device)
            nll, keep = pair_terms(src[s_idx], tgt[t_idx], lab[s_idx], **options)
            nlls.append(nll)
            keeps.append(keep)
        nll, keep = torch.cat(nlls), torch.cat(keeps)         # (sum N_s,)
        if not keep.any():
            return nll.sum() * 0.0
        return nll[keep].mean()


def lsr_loss(logits, tau):
    """LSR: mean over pixels of stopgrad(l / tau - 1) * l, l = -(1/C) sum_c log_softmax(logits)_c.

    logits: (B, C, h, w) -> scalar fp32. d/dlogits = mean_pixels[(l - tau) / tau * dl].
    """
    assert logits.dim() == 4
    with no_autocast(logits.device):
        l = -torch.log_softmax(fp32(logits), dim=1).mean(1)   # (B, h, w): CE to the uniform distribution
        return ((l / tau - 1.0).detach() * l).mean()


# --------------------------------------------------------------------------------------------------
# Test-time aggregation (called by uda/evaluation.py)
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def aggregate_predict(model, images, autocast=nullcontext, alpha=TTA_ALPHA, chunk=0):
    """PLCA's test-time prediction: (B, C, h, w) fp32 probabilities at the model's output stride.

    F~ = (1 - alpha) F + alpha agg_cos(F) over all positions of each image; p = softmax(classifier(F~));
    p~ = (1 - alpha) p + alpha agg_KL(p). Needs `model.classifier` (the head mapping features to
    logits; DeepLab and tiny have it). images: (B, 3, H, W) as the model takes them.
    """
    classifier = getattr(model, "classifier", None)
    if classifier is None:
        raise UserError(f"--tta-aggregate: {type(model).__name__} has no .classifier head to re-apply "
                        f"to aggregated features (use --tta-aggregate off)")
    with autocast():
        features, _ = model(images)                                    # (B, D, h, w)
    batch, dim, h, w = features.shape
    out = []
    for b in range(batch):
        with no_autocast(features.device):
            feats = aggregate_features(features[b].flatten(1).t(), alpha, chunk)  # (N, D)
        feats = feats.t().reshape(1, dim, h, w)                                   # (1, D, h, w)
        with autocast():
            logits = classifier(feats)                                            # (1, C, h, w)
        with no_autocast(features.device):
            probs = torch.softmax(fp32(logits), 1)[0].flatten(1).t()             # (N, C)
            probs = aggregate_probs(probs, alpha, chunk)                          # (N, C)
        out.append(probs.t().reshape(-1, h, w))                                  # (C, h, w)
    return torch.stack(out)                                                       # (B, C, h, w)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
RECIPE = {
    "lr": 2.5e-4,                         # experiments/config/g2c_train.yaml, s2c_train.yaml: BASE_LR
    "head_lr_mult": 1.0,                  # LR_MULT 1.0: the classifier at the backbone's LR (config.py: 10)
    "momentum": 0.9,                      # config.py TRAIN.MOMENTUM
    "weight_decay": 5e-4,                 # WEIGHT_DECAY 0.0005, on every parameter
    "poly_power": 0.9,                    # POLY.POWER
    "iters": 11160,                       # GTA5: POLY.MAX_EPOCHS 30 x 372 steps (2975 targets / (2 x 2 x 2))
    "stop_iter": 10416,                   # GTA5: TRAIN.MAX_EPOCHS 28 (SYNTHIA: --iters 3720 --stop-iter 2976)
    "batch_size": 4,                      # per GPU: TRAIN_BATCH_SIZE 4 / 2 GPUs = 2 pairs x ITER_SIZE 2
    "bn": "train",                        # plain BatchNorm, SyncBN under DDP (tools/train.py), FREEZE_BN False
    "backbone": "deeplabv2-r101-caffe",   # model/segmentation/deeplabv2.py: Caffe-style ResNet-101
    "crop": "730x730",                    # DATA_TRANSFORM.CROPSIZE 730 (RandomCrop, label padded with 255)
    "source_size": "1383x760",            # LOADSIZE 760: GTA5's 1914x1052 at a 760 short side
    "target_size": "1520x760",            # LOADSIZE 760: Cityscapes' 2048x1024 at a 760 short side
    "random_scale": [1.0, 1.3],           # tools/train.py RandomResize(760, int(1.3 x 760) = 988)
    "lovasz_weight": 1.5,                 # LOV_W 0.75 x ITER_SIZE 2 (see Deviations)
    "align_corners": False,               # solver/solver.py: F.interpolate(..., align_corners=False)
}
# Read by the tools through uda/methods.py (the contract in uda/source_only.py):
# the toy benchmark's recipe-only control switches off both association levels, and LSR (the official
# code applies it only with the association); the test-time aggregation is PLCA's spatial aggregation,
# part of its idea, so the control is evaluated without it
CONTROL_FLAGS = ["--plca-lambda-fass", "0", "--plca-lambda-cass", "0", "--plca-lambda-lsr", "0"]
CONTROL_EVALUATE_FLAGS = ["--tta-aggregate", "off"]
CONTROL_NOTE = "evaluated with `--tta-aggregate off`, as source_only: the test-time aggregation counts as PLCA's idea"
# evaluate.py's prediction of a PLCA checkpoint (--tta-aggregate auto), as the official test configs
test_time_predict = aggregate_predict


class PLCA:
    """Source supervision + feature- and classifier-level cycle association + LSR, one SGD optimizer."""

    needs_target = True

    def __init__(self, model, args, env):
        if args.batch_size % args.plca_iter_size:
            raise UserError(f"--plca-iter-size {args.plca_iter_size}: must divide --batch-size {args.batch_size}")
        if args.plca_max_pixels == 1:
            raise UserError("--plca-max-pixels 1: need at least 2 pixels per image (or 0 for all)")
        self.model, self.env = model, env
        self.lovasz_weight, self.align_corners = args.lovasz_weight, args.align_corners
        self.lambda_fass, self.lambda_cass, self.lambda_lsr = (args.plca_lambda_fass, args.plca_lambda_cass,
                                                                args.plca_lambda_lsr)
        self.lsr_tau, self.agg_alpha, self.iter_size = args.plca_lsr_tau, args.plca_agg_alpha, args.plca_iter_size
        self.chunk, self.max_pixels = args.plca_chunk, args.plca_max_pixels
        self.generator = method_generator(args.seed, GENERATOR_STREAM)  # --plca-max-pixels subsets
        self.optimizer = sgd(model.param_groups(args.head_lr_mult), args.lr, args.momentum, args.weight_decay)
        self.optimizers = [self.optimizer]

    def losses(self, source_image, source_label, target_image):
        """Every logged loss term of one micro-batch (dict of scalars) and the weighted total."""
        with self.env.autocast():
            # target first, then source, each its own forward (separate BN batch statistics, as official)
            feat_t, logits_t = self.model(target_image)   # (B, D, h, w), (B, C, h, w)
            feat_s, logits_s = self.model(source_image)
        ce, lovasz = supervised_loss(logits_s, source_label, self.lovasz_weight, self.align_corners)
        small_label = downsample_labels(source_label, feat_s.shape[-2:])   # (B, h, w)
        terms = {"ce": ce, "lovasz": lovasz} if self.lovasz_weight else {"ce": ce}
        if self.lambda_fass:
            terms["fass"] = association_loss(feature_association, feat_s, feat_t, small_label, self.max_pixels,
                                             self.generator, alpha=self.agg_alpha, chunk=self.chunk)
        if self.lambda_cass:
            probs_s, probs_t = torch.softmax(fp32(logits_s), 1), torch.softmax(fp32(logits_t), 1)  # (B, C, h, w)
            terms["cass"] = association_loss(classifier_association, probs_s, probs_t, small_label, self.max_pixels,
                                             self.generator, alpha=self.agg_alpha, chunk=self.chunk)
        if self.lambda_lsr:
            terms["lsr_s"], terms["lsr_t"] = lsr_loss(logits_s, self.lsr_tau), lsr_loss(logits_t, self.lsr_tau)
        total = (ce + self.lovasz_weight * lovasz + self.lambda_fass * terms.get("fass", 0.0)
                 + self.lambda_cass * terms.get("cass", 0.0)
                 + self.lambda_lsr * (terms.get("lsr_s", 0.0) + terms.get("lsr_t", 0.0)))
        return terms, total

    def train_step(self, source, target, it):
        """One optimizer step over --plca-iter-size micro-batches; returns the loss terms averaged over them."""
        self.optimizer.zero_grad(set_to_none=True)
        n = self.iter_size
        parts = zip(source["image"].chunk(n), source["label"].chunk(n), target["image"].chunk(n))
        logged = {}
        for source_image, source_label, target_image in parts:
            terms, total = self.losses(source_image, source_label, target_image)
            self.env.scaler.scale(total / n).backward()   # gradients of the mean over micro-batches
            for name, value in terms.items():
                logged[name] = logged.get(name, 0.0) + value.detach() / n
        optimizer_step(self.optimizer, self.env.scaler)
        return logged

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])


def add_arguments(parser):
    group = parser.add_argument_group("plca")
    group.add_argument("--plca-lambda-fass", type=common.nonnegative_float, default=0.1,
                       help="lambda_fass: feature-level (layer4, cosine) association loss (official ASSO_W)")
    group.add_argument("--plca-lambda-cass", type=common.nonnegative_float, default=0.1,
                       help="lambda_cass: classifier-level (probabilities, -KL) association loss (official "
                            "ASSO_W; 0 = feature level only)")
    group.add_argument("--plca-lambda-lsr", type=common.nonnegative_float, default=0.01,
                       help="lambda_lsr: weight of LSR on each domain (official LSR_W)")
    group.add_argument("--plca-lsr-tau", type=common.nonnegative_float, default=10.0,
                       help="tau of LSR: the mean -log p it pulls towards (official LSR_THRES)")
    group.add_argument("--plca-agg-alpha", type=common.fraction_below_one, default=0.5,
                       help="alpha of the target spatial aggregation in training, in [0, 1) (official "
                            "SPAGG_ALPHA; 0 = no aggregation)")
    group.add_argument("--plca-chunk", type=common.nonnegative_int, default=0,
                       help="keep no N x N matrix for the backward: recompute the association this many rows "
                            "at a time (exact, less memory, slower); 0 = keep the feature level's two")
    group.add_argument("--plca-max-pixels", type=common.nonnegative_int, default=0,
                       help="associate a random subset of this many pixels per image (approximate, less "
                            "memory); 0 = every pixel (faithful)")
    group.add_argument("--plca-iter-size", type=common.positive_int, default=1,
                       help="micro-batches per optimizer step, each forwarded separately (official "
                            "ITER_SIZE = 2 with 2 pairs per GPU); must divide --batch-size")


Method = PLCA


# ==================================================================================================
# Custom autograd functions: the N x N association maths in row blocks, with hand-written backward
# passes. The losses above call only BestLinks.apply and Aggregate.apply; this section makes them
# exact in fp32 without keeping N x N x E tensors. First the plain definitions (N x M at once) that
# the blocked functions compute (the tests compare the two), then the blocks.
# ==================================================================================================
def zscore_rows(scores):
    """(r - mean(r)) / (std(r) + eps) per row with DETACHED mean and unbiased std: an adaptive per-row
    temperature, not part of the objective (official `scoring`). scores: (N, M), M >= 2 -> (N, M) fp32."""
    assert scores.dim() == 2 and scores.shape[1] >= 2, scores.shape
    scores = fp32(scores)
    mean = scores.mean(1, keepdim=True).detach()   # (N, 1)
    std = scores.std(1, keepdim=True).detach()     # (N, 1), unbiased like torch.std in the official code
    return (scores - mean) / (std + SIGMA_EPS)


def log_sigma(scores):
    """log sigma(scores): row-wise log_softmax of the z-scored rows. (N, M) -> (N, M)."""
    return torch.log_softmax(zscore_rows(scores), dim=1)


def sigma(scores):
    """sigma(scores): row-wise softmax of the z-scored rows. (N, M) -> (N, M), rows sum to one."""
    return torch.softmax(zscore_rows(scores), dim=1)


def cosine_matrix(x, y):
    """cos(x_i, y_j): x (N, D), y (M, D) -> (N, M). Zero vectors give cosine 0 (F.normalize eps)."""
    return F.normalize(fp32(x), dim=1) @ F.normalize(fp32(y), dim=1).t()   # (N, D) @ (D, M)


def neg_kl_matrix(p, q):
    """-KL(p_i || q_j) = sum_c p_ic log(q_jc + eps) - sum_c p_ic log(p_ic + eps).

    p: (N, C), q: (M, C) probabilities -> (N, M).
    """
    p, q = fp32(p), fp32(q)
    neg_entropy = (p * torch.log(p + KL_EPS)).sum(1, keepdim=True)   # (N, 1)
    return p @ torch.log(q + KL_EPS).t() - neg_entropy                # (N, C) @ (C, M) - (N, 1)


# --------------------------------------------------------------------------------------------------
# The same maths in row blocks of S = a b^T, with hand-written backward passes
# --------------------------------------------------------------------------------------------------
def row_blocks(n, m, chunk):
    """(start, end) of the row blocks of an (n, m) matrix: `chunk` rows each, or about BLOCK_ELEMENTS
    entries each when chunk <= 0."""
    rows = chunk if chunk > 0 else max(1, BLOCK_ELEMENTS // max(m, 1))
    return [(s, min(s + rows, n)) for s in range(0, n, rows)]


def product_rows(a, b, full):
    """Rows [s, e) of S = a b^T: a slice of `full` when it is kept, else recomputed. -> fn(s, e)."""
    if full is not None:
        return lambda s, e: full[s:e]
    return lambda s, e: a[s:e] @ b.t()          # (R, E) @ (E, M)


def exp_scaled(block, top, scale, shift=None):
    """exp((block - top) / scale + shift) into a new tensor; the arguments broadcast against block."""
    scaled = (block - top).div_(scale)
    return (scaled if shift is None else scaled.add_(shift)).exp_()


class BestLinks(torch.autograd.Function):
    """Best links under sigma of S = a b^T (a (N, E), b (M, E)), per row and optionally per column.

    forward(a, b, chunk, store, columns) -> (best (N,), index (N,)[, best_col (M,), index_col (M,)]):
    best_i = max_j log sigma(S_i.)_j = -log sum_j exp((S_ij - max_j S_ij) / s_i), s_i = std_j S_ij + eps,
    index_i its argmax; the column outputs are the same for the rows of S^T. store keeps S for the
    backward (one N x M matrix); otherwise every block is recomputed (one product more, and the column
    statistics need a second pass over S in the forward). Indices carry no gradient.
    """

    @staticmethod
    def forward(ctx, a, b, chunk, store, columns):
        assert a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1], (a.shape, b.shape)
        assert a.shape[0] >= 2 and b.shape[0] >= 2, "sigma needs two pixels per set (unbiased std)"
        store = store and any(ctx.needs_input_grad[:2])
        full = a @ b.t() if store else None                                  # (N, M)
        block = product_rows(a, b, full)
        blocks = row_blocks(a.shape[0], b.shape[0], chunk)
        row_stats, col_stats = [], ColumnStats() if columns else None
        for s, e in blocks:
            rows = block(s, e)                                               # (R, M)
            row_stats.append(row_best(rows))
            if columns:
                col_stats.add(rows, s)
        top, scale, best, index = (torch.cat(parts) for parts in zip(*row_stats))  # (N,) each
        ctx.mark_non_differentiable(index)
        saved, outputs = [a, b, top, scale, best, index], [best, index]
        if columns:
            col = col_stats.finish(block, blocks)                            # (M,) each
            ctx.mark_non_differentiable(col[3])
            saved, outputs = saved + list(col), outputs + [col[2], col[3]]
        ctx.save_for_backward(*saved, *([full] if store else []))
        ctx.chunk, ctx.store, ctx.columns = chunk, store, columns
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_best, _grad_index, grad_best_col=None, _grad_index_col=None):
        a, b, top, scale, best, index, *rest = ctx.saved_tensors
        block = product_rows(a, b, rest[-1] if ctx.store else None)
        rows_coef = grad_best / scale                        # (N,): d best_i / d S_ij = (onehot - p_ij) / s_i
        if ctx.columns:
            col_top, col_scale, col_best, col_index = rest[:4]
            cols_coef = grad_best_col / col_scale            # (M,)
        grad_a, grad_b = torch.empty_like(a), torch.zeros_like(b)
        for s, e in row_blocks(a.shape[0], b.shape[0], ctx.chunk):
            rows = block(s, e)                                                   # (R, M)
            grad = exp_scaled(rows, top[s:e, None], scale[s:e, None], best[s:e, None])  # row softmax p_ij
            grad.mul_(-rows_coef[s:e, None])
            grad.index_put_((torch.arange(e - s, device=a.device), index[s:e]), rows_coef[s:e], accumulate=True)
            if ctx.columns:
                grad.sub_(exp_scaled(rows, col_top, col_scale, col_best).mul_(cols_coef))  # column softmax
                hit = ((col_index >= s) & (col_index < e)).nonzero().squeeze(1)   # columns whose best row is here
                grad.index_put_((col_index[hit] - s, hit), cols_coef[hit], accumulate=True)
            grad_a[s:e] = grad @ b                           # (R, M) @ (M, E)
            grad_b.addmm_(grad.t(), a[s:e])                  # (M, R) @ (R, E)
        return grad_a, grad_b, None, None, None


def row_best(rows):
    """Per row of a block (R, M): max, std + eps, best log sigma and its index, each (R,)."""
    top, index = rows.max(1)
    scale = rows.std(1) + SIGMA_EPS                          # unbiased, as torch.std in the official code
    best = -exp_scaled(rows, top[:, None], scale[:, None]).sum(1).log_()  # the sum is >= 1
    return top, scale, best, index


class ColumnStats:
    """Per column of S, read in row blocks: max, its row, and mean / variance merged block by block
    (Chan et al.'s pairwise update, stable); `finish` makes the second pass the sum of exponentials
    needs (it divides by the final std)."""

    def __init__(self):
        self.seen = 0

    def add(self, rows, start):
        """rows: (R, M), rows start.. start + R of S."""
        top, index = rows.max(0)                             # (M,)
        mean = rows.mean(0)
        m2 = (rows - mean).square_().sum(0)
        count = rows.shape[0]
        if self.seen == 0:
            self.top, self.index, self.mean, self.m2 = top, index + start, mean, m2
        else:
            better = top > self.top
            self.top, self.index = torch.where(better, top, self.top), torch.where(better, index + start, self.index)
            delta, total = mean - self.mean, self.seen + count
            self.mean = self.mean + delta * (count / total)
            self.m2 = self.m2 + m2 + delta.square() * (self.seen * count / total)
        self.seen += count

    def finish(self, block, blocks):
        """(max, std + eps, best log sigma, index) per column, each (M,)."""
        scale = (self.m2 / (self.seen - 1)).sqrt() + SIGMA_EPS   # unbiased std + eps
        total = sum(exp_scaled(block(s, e), self.top, scale).sum(0) for s, e in blocks)
        return self.top, scale, -total.log(), self.index


class Aggregate(torch.autograd.Function):
    """out = W c, W = softmax_rows(S / t), S = a b^T (a (N, E), b (M, E), c (M, Dc)); t_i = std_j S_ij + eps
    with zscore (= sigma_rows(S), the mean drops out of a softmax), else 1. -> (N, Dc).

    store keeps W for the backward (one N x M matrix); otherwise each block of W is recomputed from S.
    """

    @staticmethod
    def forward(ctx, a, b, c, chunk, store, zscore):
        n, m = a.shape[0], b.shape[0]
        store = store and any(ctx.needs_input_grad[:3])
        weights = a.new_empty(n, m) if store else None       # (N, M)
        out, top, log_total = a.new_empty(n, c.shape[1]), a.new_empty(n), a.new_empty(n)
        scale = a.new_ones(n)
        for s, e in row_blocks(n, m, chunk):
            w = a[s:e] @ b.t() if weights is None else torch.matmul(a[s:e], b.t(), out=weights[s:e])  # (R, M)
            top[s:e] = w.max(1).values
            if zscore:
                scale[s:e] = w.std(1) + SIGMA_EPS
            w.sub_(top[s:e, None]).div_(scale[s:e, None]).exp_()
            total = w.sum(1)                                 # (R,), >= 1
            log_total[s:e] = total.log()
            out[s:e] = w.div_(total[:, None]) @ c            # (R, M) @ (M, Dc)
        ctx.save_for_backward(a, b, c, out, top, scale, log_total, *([weights] if store else []))
        ctx.chunk, ctx.store, ctx.symmetric = chunk, store, a is b
        return out

    @staticmethod
    def backward(ctx, grad_out):
        a, b, c, out, top, scale, log_total, *rest = ctx.saved_tensors
        weights = rest[0] if ctx.store else None
        # a is b (the cosine aggregation) and W kept: dS is kept too (the cycle's S is freed by then, so two
        # N x N matrices at most) and dL/da = (dS + dS^T) b, one product instead of dS b + dS^T a
        grad_full = torch.empty_like(weights) if weights is not None and ctx.symmetric else None
        grad_a, grad_b, grad_c = torch.empty_like(a), torch.zeros_like(b), torch.zeros_like(c)
        # softmax backward: dS_ij = W_ij (g_i . c_j - sum_j' W_ij' g_i . c_j') / t_i, and the sum is g_i . out_i
        dot = (grad_out * out).sum(1, keepdim=True)          # (N, 1)
        blocks = row_blocks(a.shape[0], b.shape[0], ctx.chunk)
        for s, e in blocks:
            if weights is None:
                w = exp_scaled(a[s:e] @ b.t(), top[s:e, None], scale[s:e, None], -log_total[s:e, None])
            else:
                w = weights[s:e]                             # (R, M)
            grad_c.addmm_(w.t(), grad_out[s:e])              # (M, R) @ (R, Dc)
            if grad_full is None:
                grad_s = grad_out[s:e] @ c.t()               # (R, Dc) @ (Dc, M)
            else:
                grad_s = torch.matmul(grad_out[s:e], c.t(), out=grad_full[s:e])
            grad_s.sub_(dot[s:e]).mul_(w).div_(scale[s:e, None])   # (R, M)
            if grad_full is None:
                grad_a[s:e] = grad_s @ b                     # (R, M) @ (M, E)
                grad_b.addmm_(grad_s.t(), a[s:e])            # (M, R) @ (R, E)
        if grad_full is not None:
            for s, e in blocks:
                grad_a[s:e] = (grad_full[s:e] + grad_full[:, s:e].t()) @ b   # (R, N) @ (N, E)
            grad_b = None
        return grad_a, grad_b, grad_c, None, None, None
