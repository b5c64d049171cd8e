"""PLCA: pixel-level cycle association between a source and a target image, at two levels.

Paper: G. Kang, Y. Wei, Y. Yang, Y. Zhuang, A. Hauptmann, "Pixel-Level Cycle Association: A New
Perspective for Domain Adaptive Semantic Segmentation", NeurIPS 2020, arXiv 2011.00147.
Official code: https://github.com/kgl-prml/Pixel-Level-Cycle-Association, commit e01d77a (read:
solver/loss.py AssociationLoss, solver/solver.py association(), solver/utils.py LSR, tools/test.py,
config/config.py and experiments/config/*.yaml).

Notation, per source/target image pair: u_i (i < N_s) source features, v_j (j < N_t) target features
(layer4, stride 8, D channels); p^s_i, p^t_j softmax probabilities of the stride-8 logits (C classes);
y_i the source label nearest-downsampled to the feature size (255 = ignore).

Score normalisation sigma (official `scoring`), for a row r of similarities to the other pixel set:
    sigma(r)_j = softmax_j( (r_j - mean(r)) / (std(r) + eps) ),  mean, unbiased std DETACHED.

Spatial aggregation of the target (official `spatial_agg`), alpha = --agg-alpha:
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
LSR (official `LSR`, on log_softmax of the stride-8 logits of each domain), tau = --lsr-tau:
    l = -(1/C) sum_c log p_c,  L_lsr = mean_pixels[ stopgrad(l / tau - 1) * l ]
    (same gradient as (l - tau)^2 / (2 tau): pulls the mean log-probability towards -tau).
Source supervision (uda/source_only.py): CE + Lovasz-softmax on the bilinearly upsampled logits.

Total, per micro-batch (1 / --iter-size of the per-process batch), one SGD optimizer for all:
    L = L_ce + lambda_lovasz L_lov + lambda_fass L_fass + lambda_cass L_cass + lambda_lsr (L_lsr^S + L_lsr^T)
    --lovasz-weight 1.5, --fass-weight 0.1, --cass-weight 0.1, --lsr-weight 0.01.

Test-time aggregation (official tools/test.py, TEST.WITH_AGGREGATION=True in the test configs):
F~ = (1 - a) F + a agg_cos(F); p = softmax(classifier(F~)); p~ = (1 - a) p + a agg_KL(p); argmax of
p~ upsampled, a = 0.5. `aggregate_predict` computes it; evaluate.py --tta-aggregate turns it on
(default: on for PLCA checkpoints). In-training validation does not aggregate (as official).

Cost: every association builds N x N matrices (N = 92 x 92 = 8,464 for 730 crops: 273 MiB each in
fp32). The maths runs in fp32 under any autocast. --plca-chunk R computes them R rows at a time with
activation checkpointing (exact, less memory, ~1 extra forward of the association); --plca-max-pixels K
associates a random subset of K pixels per image (approximate; the official USE_CROP trick is similar).
Under DDP each rank associates its own pairs; gradients are averaged explicitly in
common.optimizer_step (train.py does not use DistributedDataParallel); trainable BN becomes SyncBN
on GPU (train.py).

Deviations:
- lambda_lovasz default 1.5: the official code multiplies Lovasz by 0.75 x world_size x ITER_SIZE
  but, on several GPUs, each rank's Lovasz is only its slice of the loss over the gathered batch
  (solver/lov_softmax_multigpu.py), so x world_size just undoes DDP's averaging: the effective weight
  relative to CE is 0.75 x ITER_SIZE = 1.5 on 1 or 2 GPUs. We compute Lovasz per process (no gather):
  with one image set per process the gradients differ slightly from the gathered loss.
- Loss in log space (log_softmax, then the clamp at 100) instead of BCE on the product of softmax values:
  the same value and gradient. Both factors are row maxima (>= 1/N), so the loss is <= 2 log N and the
  clamp never binds; log space only avoids forming the product.
- --iter-size splits the per-process batch into micro-batches (official ITER_SIZE, separate BN
  statistics per micro-batch); `torchrun --nproc_per_node=2 ... --batch-size 4 --iter-size 2` is the
  released setup (2 pairs per GPU per forward, 8 + 8 images per step).
- Class order: trainIds (the official code uses its own order); no effect on the losses.
- Target labels are never loaded (official loads them for logging diagnostics only).
"""
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from uda.common import IGNORE_INDEX, UserError, optimizer_step, sgd
from uda.source_only import supervised_loss

SIGMA_EPS = 1e-10    # official scoring(): (x - mean) / (std + 1e-10)
KL_EPS = 1e-10       # official compute_sim_mat_kl(): log(x + 1e-10)
NLL_CLAMP = 100.0    # torch.nn.BCELoss clamps log(x) at -100; the official loss is BCE(A A', 1)
TTA_ALPHA = 0.5      # official tools/test.py: alpha = 0.5 for both test-time aggregations


# --------------------------------------------------------------------------------------------------
# Losses: pure functions of tensors
# --------------------------------------------------------------------------------------------------
def fp32(x):
    """Half-precision tensors to fp32 (statistics, softmaxes over ~8k columns and logs need it);
    fp32/fp64 pass through unchanged (float64 for the tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def no_autocast(device):
    """Disable autocast for the association maths, so matmuls stay in fp32 under --amp."""
    return torch.autocast(device_type=device.type, enabled=False)


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


def in_row_blocks(fn, x, y, chunk):
    """fn(x, y) computed on blocks of `chunk` rows of x and concatenated (fn is row-wise in x).

    With gradients enabled each block is checkpointed: its (chunk, M) intermediates are freed after
    the forward and recomputed in the backward, so peak memory is one block instead of N x M.
    chunk <= 0: one call. fn returns a tensor or a tuple of tensors with rows first.
    """
    if chunk <= 0 or chunk >= x.shape[0]:
        return fn(x, y)
    needs_graph = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    outputs = [checkpoint(fn, x[s:s + chunk], y, use_reentrant=False) if needs_graph else fn(x[s:s + chunk], y)
               for s in range(0, x.shape[0], chunk)]
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)


def aggregate_features(v, alpha, chunk=0):
    """v~ = (1 - alpha) v + alpha sigma_rows(cos(v, v)) v.  v: (N, D) -> (N, D) fp32."""
    v = fp32(v)
    if alpha == 0:
        return v
    agg = in_row_blocks(lambda rows, full: sigma(cosine_matrix(rows, full)) @ full, v, v, chunk)  # (N, N) @ (N, D)
    return (1.0 - alpha) * v + alpha * agg


def aggregate_probs(p, alpha, chunk=0):
    """p~ = (1 - alpha) p + alpha softmax_rows(-KL(p_j || p_j')) p (no z-scoring, as official).

    p: (N, C) probabilities -> (N, C); rows of the result still sum to one.
    """
    p = fp32(p)
    if alpha == 0:
        return p
    agg = in_row_blocks(lambda rows, full: torch.softmax(neg_kl_matrix(rows, full), 1) @ full, p, p, chunk)
    return (1.0 - alpha) * p + alpha * agg


def best_log_sigma(similarity):
    """For x (n, K) against y (M, K): (max_j log sigma(sim(x, y))_j, argmax_j) per row, each (n,)."""
    return lambda rows, full: log_sigma(similarity(rows, full)).max(1)


def cycle_association(src, tgt, labels, similarity, chunk=0):
    """Source -> target -> source cycle of one pair: per-source-pixel loss and keep mask.

    src: (N_s, K), tgt: (N_t, K) (target already aggregated); labels: (N_s,) int64, 255 = ignore;
    similarity(x (n, K), y (M, K)) -> (n, M), used as S = sim(src, tgt) and S' = sim(tgt, src).
    Returns nll (N_s,) = min(-log A_{i j*} - log A'_{j* i*}, 100) and keep (N_s,) bool.
    Only argmax indices are taken from the cycle, so they carry no gradient.
    """
    assert src.dim() == 2 and tgt.dim() == 2 and src.shape[1] == tgt.shape[1], (src.shape, tgt.shape)
    assert labels.shape == (src.shape[0],), (labels.shape, src.shape)
    log_a, j_star = in_row_blocks(best_log_sigma(similarity), src, tgt, chunk)        # (N_s,), (N_s,)
    log_a_back, i_back = in_row_blocks(best_log_sigma(similarity), tgt, src, chunk)   # (N_t,), (N_t,)
    i_star = i_back[j_star]                                                           # (N_s,)
    keep = (labels != IGNORE_INDEX) & (labels[i_star] == labels)                      # (N_s,)
    nll = (-(log_a + log_a_back[j_star])).clamp(max=NLL_CLAMP)                        # (N_s,)
    return nll, keep


def feature_association(u, v, labels, alpha, chunk=0):
    """L_fass terms of one pair. u: (N_s, D) source, v: (N_t, D) target, labels: (N_s,)."""
    return cycle_association(u, aggregate_features(v, alpha, chunk), labels, cosine_matrix, chunk)


def classifier_association(p_s, p_t, labels, alpha, chunk=0):
    """L_cass terms of one pair. p_s: (N_s, C), p_t: (N_t, C) probabilities, labels: (N_s,)."""
    return cycle_association(p_s, aggregate_probs(p_t, alpha, chunk), labels, neg_kl_matrix, chunk)


def subsample(n, k, device):
    """k random indices out of n (all n, in order, when k <= 0 or k >= n)."""
    if k <= 0 or k >= n:
        return torch.arange(n, device=device)
    return torch.randperm(n, device=device)[:k]


def association_loss(pair_terms, source_maps, target_maps, labels, max_pixels=0):
    """Mean of the kept per-pixel losses over every pair of the batch (official: one BCE over all).

    source_maps: (B, K, h, w), target_maps: (B, K, h', w'), labels: (B, h, w) int64 at the map size;
    pair_terms(src (N_s, K), tgt (N_t, K), labels (N_s,)) -> (nll, keep). Associations are per pair
    b (source b with target b), computed in fp32 even under autocast. 0 (with a graph) if none kept.
    """
    assert source_maps.dim() == 4 and target_maps.shape[:2] == source_maps.shape[:2]
    assert labels.shape == (source_maps.shape[0],) + source_maps.shape[2:], (labels.shape, source_maps.shape)
    nlls, keeps = [], []
    with no_autocast(source_maps.device):
        for b in range(source_maps.shape[0]):  # one pair at a time: the N x N matrices are per pair
            src = fp32(source_maps[b]).flatten(1).t()         # (N_s, K)
            tgt = fp32(target_maps[b]).flatten(1).t()         # (N_t, K)
            lab = labels[b].reshape(-1)                       # (N_s,)
            s_idx = subsample(src.shape[0], max_pixels, src.device)
            t_idx = subsample(tgt.shape[0], max_pixels, tgt.device)
            nll, keep = pair_terms(src[s_idx], tgt[t_idx], lab[s_idx])
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


def downsample_labels(labels, size):
    """Nearest downsampling of (B, H, W) int64 labels to size = (h, w), as the official
    F.interpolate(mode='nearest'); 255 stays 255."""
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


# --------------------------------------------------------------------------------------------------
# Test-time aggregation (called by evaluate.py)
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
RECIPE = {}


class PLCA:
    """Source supervision + feature- and classifier-level cycle association + LSR, one SGD optimizer."""

    needs_target = True

    def __init__(self, model, args, env):
        self.model, self.env, self.args = model, env, args
        if args.iter_size < 1 or args.batch_size % args.iter_size:
            raise UserError(f"--iter-size {args.iter_size}: must be >= 1 and divide --batch-size {args.batch_size}")
        if not 0 <= args.agg_alpha < 1:
            raise UserError(f"--agg-alpha {args.agg_alpha}: expected a value in [0, 1)")
        if args.plca_max_pixels == 1:
            raise UserError("--plca-max-pixels 1: need at least 2 pixels per image (or 0 for all)")
        self.optimizer = sgd(model.param_groups(args.head_lr_mult), args.lr, args.momentum, args.weight_decay)
        self.optimizers = [self.optimizer]

    def losses(self, source_image, source_label, target_image):
        """Every loss term of one micro-batch (dict of scalars) and the weighted total."""
        a = self.args
        with self.env.autocast():
            # target first, then source, each its own forward (separate BN batch statistics, as official)
            feat_t, logits_t = self.model(target_image)   # (B, D, h, w), (B, C, h, w)
            feat_s, logits_s = self.model(source_image)
        ce, lovasz = supervised_loss(logits_s, source_label, a.lovasz_weight)
        small_label = downsample_labels(source_label, feat_s.shape[-2:])   # (B, h, w)
        terms = {"ce": ce, "lovasz": lovasz}
        if a.fass_weight:
            terms["fass"] = association_loss(
                lambda u, v, y: feature_association(u, v, y, a.agg_alpha, a.plca_chunk),
                feat_s, feat_t, small_label, a.plca_max_pixels)
        if a.cass_weight:
            probs_s, probs_t = torch.softmax(fp32(logits_s), 1), torch.softmax(fp32(logits_t), 1)  # (B, C, h, w)
            terms["cass"] = association_loss(
                lambda p, q, y: classifier_association(p, q, y, a.agg_alpha, a.plca_chunk),
                probs_s, probs_t, small_label, a.plca_max_pixels)
        if a.lsr_weight:
            terms["lsr_s"], terms["lsr_t"] = lsr_loss(logits_s, a.lsr_tau), lsr_loss(logits_t, a.lsr_tau)
        total = (ce + a.lovasz_weight * lovasz + a.fass_weight * terms.get("fass", 0.0)
                 + a.cass_weight * terms.get("cass", 0.0)
                 + a.lsr_weight * (terms.get("lsr_s", 0.0) + terms.get("lsr_t", 0.0)))
        return terms, total

    def train_step(self, source, target, it):
        """One optimizer step over --iter-size micro-batches; returns the loss terms averaged over them."""
        self.optimizer.zero_grad(set_to_none=True)
        n = self.args.iter_size
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
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])


def add_arguments(parser):
    group = parser.add_argument_group("plca")
    group.add_argument("--lovasz-weight", type=float, default=1.5,
                       help="lambda_lovasz: Lovasz-softmax weight relative to source CE (official effective "
                            "value 0.75 x ITER_SIZE = 1.5; see the module docstring)")
    group.add_argument("--fass-weight", type=float, default=0.1,
                       help="lambda_fass: feature-level (layer4, cosine) association loss (official ASSO_W)")
    group.add_argument("--cass-weight", type=float, default=0.1,
                       help="lambda_cass: classifier-level (probabilities, -KL) association loss (official "
                            "ASSO_W; 0 = feature level only)")
    group.add_argument("--lsr-weight", type=float, default=0.01,
                       help="lambda_lsr: weight of LSR on each domain (official LSR_W)")
    group.add_argument("--lsr-tau", type=float, default=10.0,
                       help="tau of LSR: the mean -log p it pulls towards (official LSR_THRES)")
    group.add_argument("--agg-alpha", type=float, default=0.5,
                       help="alpha of the target spatial aggregation in training, in [0, 1) (official "
                            "SPAGG_ALPHA; 0 = no aggregation)")
    group.add_argument("--plca-chunk", type=int, default=0,
                       help="compute the N x N association matrices this many rows at a time with "
                            "checkpointing (exact, less memory, slower); 0 = all at once")
    group.add_argument("--plca-max-pixels", type=int, default=0,
                       help="associate a random subset of this many pixels per image (approximate, less "
                            "memory); 0 = every pixel (faithful)")
    group.add_argument("--iter-size", type=int, default=1,
                       help="micro-batches per optimizer step, each forwarded separately (official "
                            "ITER_SIZE = 2 with 2 pairs per GPU); must divide --batch-size")
    # The official recipe: LR 2.5e-4 for backbone AND head, trainable BN (when the backbone offers it).
    parser.set_defaults(head_lr_mult=1.0)
    if "--bn" in parser._option_string_actions:
        parser.set_defaults(bn="train")


Method = PLCA
