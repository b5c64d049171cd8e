"""SDCA: pixel contrastive adaptation guided by per-class Gaussian statistics, with its estimator.

Copy with: uda/common.py, uda/augment.py, uda/source_only.py. The `init` command at the end
(`python -m uda.sdca init`) reads a checkpoint and the source dataset, so it also needs uda/datasets.py,
uda/evaluation.py and the files they import; it imports them inside `init_main` so that the method
itself does not. It stays in this file because it writes the statistics file that --sdca-init-stats
reads back (`ClassStatistics`, `load_init_statistics`): the writer and the reader of one format side by
side, and it is stage 2 of this method's recipe.

Shuang Li, Binhui Xie, Bin Zang, Chi Harold Liu, Xinjing Cheng, Ruigang Yang, Guoren Wang,
"Semantic Distribution-aware Contrastive Adaptation for Semantic Segmentation", arXiv 2105.05013 (2021).
Official code: https://github.com/BIT-DA/SDCA, commit d00e7ba (train_sdca.py, core/utils/loss.py,
core/utils/semantic_dist_estimator.py, core/datasets/build.py, semantic_dist_init.py, configs/) read
for every detail below.

Symbols. F: backbone features at the output stride, one row per pixel, (N, D); O: classifier logits at
the same stride, (N, C), before upsampling; y_s: source labels nearest-downsampled to the feature size;
yhat_t: target pseudo-labels argmax softmax(O_t) with no gradient, 255 where max softmax < delta.
For either level, class c has a mean mu_c and a diagonal variance sig2_c (vectors of D or C entries),
estimated from SOURCE pixels only (ground-truth labels, detached) and never receiving gradients.

Pixel contrastive loss (the closed-form upper bound), for one level, over the pixels with y != 255:
    z = f / ||f||,   mu_hat_c = mu_c / ||mu_c||,   sig2_hat_c = sig2_c / ||sig2_c||_2   (all L2 norms)
    L_pcl(F, y) = mean_i [ -z_i . mu_hat_{y_i} / tau
                           + log sum_c exp( z_i . mu_hat_c / tau + 1/2 sum_d z_id^2 sig2_hat_cd / tau^2 ) ]
It bounds E[ CE(z . m / tau, y) ] for class means m_c ~ N(mu_hat_c, diag(sig2_hat_c)) from above
(Jensen + the Gaussian moment-generating function): contrast against infinitely many sampled
positives/negatives at the cost of one C-way softmax. The official code writes it as CE on
"z.mu/tau + z^2.sig2/(2 tau^2)" plus a term that cancels the true class's variance; the form above is
the same number. Only pixels of classes present in the batch contribute; the sum runs over all C.

Class statistics (exact cumulative pooled mean / biased variance, no momentum), per batch of source
pixels: n_c pixels of class c, batch mean m_c, batch biased variance v_c, accumulated count N_c,
w_c = n_c / (n_c + N_c) (0 when n_c = 0):
    sig2_c <- (1 - w_c) sig2_c + w_c v_c + w_c (1 - w_c) (mu_c - m_c)^2
    mu_c   <- (1 - w_c) mu_c + w_c m_c,        N_c <- N_c + n_c
They start from a distribution-initialisation pass of the source-only model (eval mode) over the whole
source set resized to its training size (GTA5 1280x720), as official semantic_dist_init.py
(`python -m uda.sdca init`, loaded with --sdca-init-stats), or, without it, empty: the first batch that
contains a class sets its statistics (w = 1) and later batches pool in.

Source augmentation (source batch only; the target is not augmented), in the official order of
core/datasets/build.py, with torchvision's semantics (uda/augment.py) and the method's generator:
    x_s <- blur_{k, sigma}( gray_p( jitter(x_s) ) )
jitter: ColorJitter(brightness, contrast, saturation, hue), always applied [--sdca-jitter, official
0.5 0.5 0.5 0.2]; gray_p: RandomGrayscale(p) [--sdca-grayscale, 0.2]; blur: k x k Gaussian, sigma ~
U(MIN, MAX), always applied [--sdca-blur-kernel 3, --sdca-blur-sigma 0.1 2]. --sdca-augment off skips
all three.

Total objective of the SDCA stage (flags in brackets):
    L = CE(up(O_s), y_s) + lambda_lovasz Lovasz(softmax(up(O_s)), y_s)                  [--lovasz-weight]
        + lambda_feat [ L_pcl(F_s, y_s) + L_pcl(F_t, yhat_t) ]                           [--sdca-lambda-feat]
        + lambda_out  [ L_pcl(O_s, y_s) + L_pcl(O_t, yhat_t) ]                           [--sdca-lambda-out]
with tau [--sdca-tau], delta [--sdca-delta]; up(.) bilinear with align_corners [--align-corners, True
as official]. L_feat reaches only the backbone (F comes before the classifier); L_out and the source
losses reach both. A term whose lambda is 0 is neither computed nor logged.

Pipeline (official train_with_ssl.sh): source-only warm-up (`--method source_only --lovasz-weight 0.75
--align-corners`, LR 5e-4, 31,250-iteration schedule stopped at 20,000) -> `python -m uda.sdca init` ->
this stage (RECIPE below) -> class-wise pseudo-labels (evaluate.py --save-pseudo --pseudo-rule
classwise) -> `selftrain` on the pseudo-labels.

Under torchrun the per-class batch sums are all-reduced before every update (the `init` pass reduces
once at the end), so all ranks hold identical statistics; gradients: see common.optimizer_step.

Deviations (from the official code):
- Statistics are all-reduced across ranks (official: one estimator per GPU, its gather left unused).
- Statistics are buffers saved in checkpoints and restored on resume (official: not saved).
- The update uses matrix products onehot^T X and onehot^T (X - m_y)^2: O(N*D + C*D) memory in fp32,
  the same numbers to float rounding (official: several N x C x D tensors). Centred second moments
  instead of E[x^2] - m^2 avoid cancellation in fp32.
- Counts are float64 (official fp32 stops counting exactly after 2^24 pixels of a class).
- Source augmentation runs on the float batch in torch, after the loader, instead of on PIL images in
  the loader: no rounding to 8 bits between the three operations; the draws come from the method's
  checkpointed generator, so a resumed run augments exactly as an uninterrupted one.
- Upsampling: none left. Logits are upsampled with align_corners=True wherever the official code
  upsamples them (the CE/Lovasz of this stage, train.py's evaluation and evaluate.py's pseudo-labels,
  which read it from the checkpoint); the contrastive losses and this stage's target pseudo-labels work
  at the feature stride, as official. The warm-up matches only when run with --align-corners
  (source_only's default is False).
- From the paper's full covariance Sigma_c (as the official code): diagonal only. A full one needs
  C x D x D statistics and N*C*D^2 multiply-adds per L_pcl call (four per iteration), more than the whole
  network step; no --sdca-cov option.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from uda import augment, common
from uda.common import IGNORE_INDEX, UserError, downsample_labels, optimizer_step, sgd
from uda.source_only import supervised_loss

GAUSSIAN_MGF_HALF = 0.5  # E exp(t.m) = exp(t.mu + 1/2 t^T Sigma t) for m ~ N(mu, Sigma): the bound's 1/2
GENERATOR_STREAM = "sdca"  # common.method_generator's stream, named after the method


# --------------------------------------------------------------------------------------------------
# Losses: pure functions of tensors
# --------------------------------------------------------------------------------------------------
def pcl_loss(features, labels, mean, var, tau):
    """Pixel contrastive loss against class Gaussians (closed-form upper bound), fp32, scalar.

    features: (N, D) any float dtype (gradients flow into it); labels: (N,) int64 in [0, C) or 255;
    mean, var: (C, D) class means and diagonal variances, detached. 0 (with a graph) if no valid pixel.
    """
    assert features.dim() == 2 and labels.shape == features.shape[:1], (features.shape, labels.shape)
    assert mean.shape == var.shape and mean.shape[1] == features.shape[1], (mean.shape, var.shape)
    assert not mean.requires_grad and not var.requires_grad, "class statistics must be detached"
    with torch.autocast(device_type=features.device.type, enabled=False):  # similarity maths in fp32
        valid = labels != IGNORE_INDEX                            # (N,)
        if not valid.any():
            return features.float().sum() * 0.0
        z = F.normalize(features[valid].float(), dim=1)           # (M, D) unit pixels
        y = labels[valid]                                         # (M,)
        mu = F.normalize(mean.float(), dim=1)                     # (C, D); an empty class stays 0
        sig2 = F.normalize(var.float(), dim=1)                    # (C, D)
        sim = z @ mu.t() / tau                                    # (M, C)
        logits = sim + GAUSSIAN_MGF_HALF * (z * z) @ sig2.t() / tau ** 2  # (M, C)
        positive = sim.gather(1, y[:, None]).squeeze(1)           # (M,)
        return (torch.logsumexp(logits, dim=1) - positive).mean()


def flatten_pixels(x):
    """(B, D, h, w) -> (N = B*h*w, D), pixel-major, matching labels.reshape(-1)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])        # (N, D)


@torch.no_grad()
def confident_pseudo_labels(logits, delta):
    """argmax of softmax(logits) (B, C, h, w) -> (B, h, w); 255 where the max probability < delta."""
    confidence, labels = torch.softmax(logits.float(), dim=1).max(dim=1)  # (B, h, w) each
    return labels.masked_fill(confidence < delta, IGNORE_INDEX)


# --------------------------------------------------------------------------------------------------
# Class statistics: exact pooled mean / diagonal variance, buffers, all-reduced under DDP
# --------------------------------------------------------------------------------------------------
class ClassStatistics(nn.Module):
    """Per-class mean (C, D), biased diagonal variance (C, D) in fp32 and pixel count (C,) in fp64.

    Features of any dtype are accumulated in the buffers' dtype (fp32; fp64 after `.double()`).
    """

    def __init__(self, num_classes, dim):
        super().__init__()
        self.num_classes, self.dim = num_classes, dim
        self.register_buffer("mean", torch.zeros(num_classes, dim))
        self.register_buffer("var", torch.zeros(num_classes, dim))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.float64))

    @torch.no_grad()
    def batch_moments(self, features, labels, sync=True):
        """Count (C,), mean (C, D), biased variance (C, D) of this batch's pixels per class.

        features: (N, D); labels: (N,) in [0, C) or 255. With sync, the sums run over all ranks.
        Memory O(N*D + N*C + C*D): one-hot matrix products, never an N x C x D tensor.
        """
        assert features.dim() == 2 and features.shape[1] == self.dim and labels.shape == features.shape[:1]
        assert bool(((labels >= 0) & (labels < self.num_classes) | (labels == IGNORE_INDEX)).all()), \
            "labels must be class indices or 255"
        x = features.detach().to(self.mean.dtype)                              # (N, D), fp32 under AMP too
        valid = labels != IGNORE_INDEX                                          # (N,)
        index = labels.masked_fill(~valid, 0)                                   # (N,)
        onehot = F.one_hot(index, self.num_classes).to(x.dtype) * valid[:, None]  # (N, C), ignored rows 0
        count = onehot.sum(0).double()                                          # (C,)
        sums = onehot.t() @ x                                                   # (C, D)
        if sync:
            common.all_reduce_sum(count)
            common.all_reduce_sum(sums)
        divisor = count.clamp(min=1).to(x.dtype)[:, None]                       # (C, 1)
        mean = sums / divisor                                                   # (C, D); 0 if absent
        centred = mean[index].sub_(x).square_()                                 # (N, D), the one N x D buffer
        squares = onehot.t() @ centred                                          # (C, D)
        if sync:
            common.all_reduce_sum(squares)
        return count, mean, squares / divisor

    @torch.no_grad()
    def merge(self, count, mean, var):
        """Pool a batch's (count, mean, biased variance) into the running statistics, exactly."""
        total = self.count + count                                              # (C,)
        w = torch.where(total > 0, count / total.clamp(min=1), torch.zeros_like(total))
        w = w.to(self.mean.dtype)[:, None]                                      # (C, 1)
        self.var.mul_(1 - w).add_(w * var + w * (1 - w) * (self.mean - mean).square())
        self.mean.mul_(1 - w).add_(w * mean)
        self.count.copy_(total)

    def update(self, features, labels, sync=True):
        """Add a batch of pixels (N, D) with labels (N,) (255 ignored) to the statistics."""
        self.merge(*self.batch_moments(features, labels, sync=sync))

    @torch.no_grad()
    def all_reduce_(self):
        """Pool statistics gathered separately on each rank (the init pass) into the global ones."""
        if not common.is_distributed():
            return
        weight = self.count.to(self.mean.dtype)[:, None]                        # (C, 1)
        total = common.all_reduce_sum(self.count.clone())                       # (C,)
        divisor = total.clamp(min=1).to(self.mean.dtype)[:, None]               # (C, 1)
        mean = common.all_reduce_sum(self.mean * weight) / divisor              # (C, D)
        spread = common.all_reduce_sum(weight * (self.var + (self.mean - mean).square()))  # (C, D)
        self.var.copy_(spread / divisor)
        self.mean.copy_(mean)
        self.count.copy_(total)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
# The SDCA stage of the official code (configs/deeplabv2_r101_sdca.yaml; the SYNTHIA and VGG-16 configs
# differ only in dataset, classes and backbone). Sizes need no entry: the datasets' defaults are the
# official SOURCE_INPUT_SIZE_TRAIN (1280x720 / 1280x760) and TARGET_INPUT_SIZE_TRAIN (1024x512), no crop.
RECIPE = {
    "lr": 2.5e-4,              # SOLVER.BASE_LR 2.5e-4 (deeplabv2_r101_sdca.yaml)
    "head_lr_mult": 10.0,      # train_sdca.py: classifier optimizer at BASE_LR * 10
    "momentum": 0.9,           # SOLVER.MOMENTUM (core/configs/defaults.py)
    "weight_decay": 5e-4,      # SOLVER.WEIGHT_DECAY (defaults.py)
    "poly_power": 0.9,         # SOLVER.LR_METHOD 'poly', LR_POWER 0.9 (defaults.py)
    "iters": 62500,            # SOLVER.MAX_ITER: the poly schedule's length
    "stop_iter": 40000,        # SOLVER.STOP_ITER: training stops here
    # SOLVER.BATCH_SIZE 8 = 4 source + 4 target images on the official 4 GPUs (1 + 1 each); one process
    # here reproduces that global batch; under torchrun --nproc_per_node=4 pass --batch-size 1
    "batch_size": 4,
    "bn": "frozen",            # MODEL.FREEZE_BN True (deeplabv2_r101_sdca.yaml)
    "source_sampler": "class-balanced",  # the dataset classes build FADA's list (core/datasets/synthia.py)
    "synthia_classes": 16,     # MODEL.NUM_CLASSES 16 (deeplabv2_r101_sdca_synthia.yaml)
    "lovasz_weight": 0.75,     # SOLVER.LAMBDA_LOV 0.75 (deeplabv2_r101_sdca.yaml)
    "align_corners": True,     # train_sdca.py: F.interpolate(..., align_corners=True), training and test
    "backbone": "deeplabv2-r101",  # MODEL.NAME deeplab_resnet101, torchvision ImageNet weights
}
# Read by the tools through uda/methods.py (the contract in uda/source_only.py):
# the toy benchmark's recipe-only control switches off both pixel contrastive levels
CONTROL_FLAGS = ["--sdca-lambda-feat", "0", "--sdca-lambda-out", "0"]
CONTROL_NOTE = "without the `python -m uda.sdca init` pass: its statistics feed only the contrastive terms"
# the toy benchmark samples the source uniformly, as its README table was made (see fada.py)
TOY_FLAGS = ["--source-sampler", "uniform"]


def load_init_statistics(path, feat_stats, out_stats):
    """Load the file written by `python -m uda.sdca init` into the two estimators (UserError on mismatch)."""
    state = common.load_checkpoint(path)
    if not isinstance(state, dict) or not {"feat", "out"} <= set(state):
        raise UserError(f"--sdca-init-stats {path}: not a file written by `python -m uda.sdca init`")
    for key, stats in (("feat", feat_stats), ("out", out_stats)):
        shape = tuple(state[key]["mean"].shape)
        if shape != (stats.num_classes, stats.dim):
            raise UserError(f"--sdca-init-stats {path}: {key} statistics are {shape[0]} classes x {shape[1]} dims, "
                            f"but this model needs {stats.num_classes} x {stats.dim} (another backbone or source?)")
        stats.load_state_dict(state[key])


class SDCA:
    """Source CE + Lovasz + pixel contrastive losses at feature and output level, one SGD optimizer."""

    needs_target = True

    def __init__(self, model, args, env):
        check_arguments(args)
        self.model, self.env, self.args = model, env, args
        self.optimizer = sgd(model.param_groups(args.head_lr_mult), args.lr, args.momentum, args.weight_decay)
        self.optimizers = [self.optimizer]
        num_classes = model.num_classes
        self.feat_stats = ClassStatistics(num_classes, model.feature_dim).to(env.device)
        self.out_stats = ClassStatistics(num_classes, num_classes).to(env.device)
        if args.sdca_init_stats:
            load_init_statistics(args.sdca_init_stats, self.feat_stats, self.out_stats)
        # every augmentation draw comes from here (distinct per rank, checkpointed), never the global RNG
        self.generator = common.method_generator(args.seed, GENERATOR_STREAM)

    def augment_source(self, images):
        """The official source transform on (B, 3, H, W) in [0, 1]: jitter, then grayscale, then blur."""
        a = self.args
        images = augment.color_jitter(images, *a.sdca_jitter, generator=self.generator)
        images = augment.random_grayscale(images, a.sdca_grayscale, self.generator)
        if a.sdca_blur_kernel:
            images = augment.random_gaussian_blur(images, a.sdca_blur_kernel, a.sdca_blur_sigma, self.generator)
        return images

    def contrastive(self, stats, x_s, y_s, x_t, y_t):
        """L_pcl(X_s, y_s) + L_pcl(X_t, yhat_t) against one level's class statistics (feat or out)."""
        tau = self.args.sdca_tau
        return pcl_loss(x_s, y_s, stats.mean, stats.var, tau) + pcl_loss(x_t, y_t, stats.mean, stats.var, tau)

    def train_step(self, source, target, it):
        """One iteration on a source batch (image, label) and a target batch (image). Returns logged values."""
        args = self.args
        self.optimizer.zero_grad(set_to_none=True)
        images_s = self.augment_source(source["image"]) if args.sdca_augment == "on" else source["image"]
        with self.env.autocast():  # separate forwards: each domain normalises with its own batch statistics
            feat_s, out_s = self.model(images_s)                                # (B, D, h, w), (B, C, h, w)
            feat_t, out_t = self.model(target["image"])
        ce, lovasz = supervised_loss(out_s, source["label"], args.lovasz_weight, args.align_corners)
        y_s = downsample_labels(source["label"], feat_s.shape[-2:]).reshape(-1)  # (N,)
        y_t = confident_pseudo_labels(out_t.detach(), args.sdca_delta).reshape(-1)  # (N,)
        f_s, f_t = flatten_pixels(feat_s), flatten_pixels(feat_t)               # (N, D)
        o_s, o_t = flatten_pixels(out_s), flatten_pixels(out_t)                 # (N, C)
        # the statistics include the current source batch before the losses use them, as official
        self.feat_stats.update(f_s, y_s)
        self.out_stats.update(o_s, y_s)
        logged = {"ce": ce.detach()}
        loss = ce
        if args.lovasz_weight:
            loss = loss + args.lovasz_weight * lovasz
            logged["lovasz"] = lovasz.detach()
        if args.sdca_lambda_feat:
            loss_feat = self.contrastive(self.feat_stats, f_s, y_s, f_t, y_t)
            loss = loss + args.sdca_lambda_feat * loss_feat
            logged["feat"] = loss_feat.detach()
        if args.sdca_lambda_out:
            loss_out = self.contrastive(self.out_stats, o_s, y_s, o_t, y_t)
            loss = loss + args.sdca_lambda_out * loss_out
            logged["out"] = loss_out.detach()
        self.env.scaler.scale(loss).backward()
        optimizer_step(self.optimizer, self.env.scaler)
        logged["target_confident"] = (y_t != IGNORE_INDEX).float().mean()
        return logged

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "feat_stats": self.feat_stats.state_dict(),
                "out_stats": self.out_stats.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.feat_stats.load_state_dict(state["feat_stats"])
        self.out_stats.load_state_dict(state["out_stats"])
        self.generator.set_state(state["generator"])


def check_arguments(args):
    """The checks that relate values (ranges are the flags' argparse types)."""
    if args.sdca_jitter[3] > 0.5:
        raise UserError(f"--sdca-jitter {' '.join(map(str, args.sdca_jitter))}: expected the hue amount in [0, 0.5] "
                        "(torchvision ColorJitter)")
    if args.sdca_blur_kernel % 2 == 0 and args.sdca_blur_kernel:
        raise UserError(f"--sdca-blur-kernel {args.sdca_blur_kernel}: expected an odd size, or 0 for no blur")
    if args.sdca_blur_sigma[0] > args.sdca_blur_sigma[1]:
        raise UserError(f"--sdca-blur-sigma {' '.join(map(str, args.sdca_blur_sigma))}: expected MIN <= MAX")


def add_arguments(parser):
    group = parser.add_argument_group("sdca")
    group.add_argument("--sdca-lambda-feat", type=common.nonnegative_float, default=1.0,
                       help="weight of the feature-level pixel contrastive loss (source + target; SOLVER.LAMBDA_FEAT)")
    group.add_argument("--sdca-lambda-out", type=common.nonnegative_float, default=1.0,
                       help="weight of the output-level (logit) pixel contrastive loss (source + target; "
                            "SOLVER.LAMBDA_OUT)")
    group.add_argument("--sdca-tau", type=common.positive_float, default=100.0,
                       help="temperature tau of the contrastive loss (official SOLVER.TAU = 100: a weak pull)")
    group.add_argument("--sdca-delta", type=common.fraction, default=0.9,
                       help="target pixels whose max softmax probability is below this are ignored (SOLVER.DELTA)")
    group.add_argument("--sdca-init-stats", default=None, metavar="FILE",
                       help="class statistics from `python -m uda.sdca init` (default: start empty and "
                            "fill from the first source batches)")
    group.add_argument("--sdca-augment", choices=["on", "off"], default="on",
                       help="colour jitter / grayscale / blur of the source batch (official: on)")
    group.add_argument("--sdca-jitter", type=common.nonnegative_float, nargs=4, default=[0.5, 0.5, 0.5, 0.2],
                       metavar=("B", "C", "S", "H"), help="colour jitter brightness, contrast, saturation, hue")
    group.add_argument("--sdca-grayscale", type=common.fraction, default=0.2, help="probability of grayscale")
    group.add_argument("--sdca-blur-kernel", type=common.nonnegative_int, default=3,
                       help="Gaussian blur kernel size (0: no blur)")
    group.add_argument("--sdca-blur-sigma", type=common.positive_float, nargs=2, default=[0.1, 2.0],
                       metavar=("MIN", "MAX"),
                       help="blur sigma drawn uniformly from [MIN, MAX]")


Method = SDCA


# --------------------------------------------------------------------------------------------------
# Distribution initialisation: python -m uda.sdca init --ckpt SRC.pt --out stats.pt
# --------------------------------------------------------------------------------------------------
def parse_init_args(argv=None):
    p = common.ArgumentParser(prog="python -m uda.sdca", description="SDCA tools")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("init", help="class statistics of a source-only model over the source train set")
    q.add_argument("--ckpt", required=True, help="source-only checkpoint (train.py OUT/last.pt)")
    q.add_argument("--source", default=None, help="source dataset (default: the checkpoint's --source)")
    q.add_argument("--data-root", default=None, help="folder holding one sub-folder per dataset")
    q.add_argument("--source-root", default=None, metavar="DIR", help="the source dataset's folder (default: "
                   "DATA_ROOT/<source>)")
    q.add_argument("--source-list", default=None, metavar="FILE",
                   help="the listed source items only (one relative path per line, as data_lists/ and "
                        "train.py --source-list; default: the dataset's shipped train list)")
    q.add_argument("--out", required=True, help="file to write the statistics to (for --sdca-init-stats)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    q.add_argument("--input-size", default=None,
                   help="resize images (bicubic) and labels (nearest) to WxH, or 'native' (default: the source's "
                        "training size, GTA5 1280x720, SYNTHIA 1280x760, as the official pass; the toy: native)")
    q.add_argument("--max-images", type=common.positive_int, default=None,
                   help="stop after this many images (quick checks)")
    q.add_argument("--batch-size", type=common.positive_int, default=1, help="images per forward pass (official 1)")
    q.add_argument("--workers", type=common.nonnegative_int, default=2, help="data loader worker processes")
    q.add_argument("--amp", choices=list(common.AMP_DTYPES), default="off", help="autocast dtype")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun: one GPU per process)")
    return p.parse_args(argv)


def check_out_file(path, overwrite):
    """Refuse to replace a file the user already has (or to write onto a folder)."""
    if os.path.isdir(path):
        raise UserError(f"--out {path}: is a folder; expected a file name such as {os.path.join(path, 'stats.pt')}")
    if os.path.exists(path) and not overwrite:
        raise UserError(f"--out {path}: already exists; choose another file or pass --overwrite to replace it")


@torch.no_grad()
def init_main(argv=None):
    # dataset-level imports stay here, so the method above needs only common, augment and source_only
    from uda import datasets, evaluation
    args = parse_init_args(argv)
    check_out_file(args.out, args.overwrite)
    explicit = None if args.input_size in (None, "native") else common.parse_size(args.input_size, "--input-size")
    device = common.setup_distributed(args.device)
    model, saved, space = evaluation.model_from_checkpoint(args.ckpt, device)
    model.eval()
    source = args.source or saved.source
    size = datasets.default_train_size(source) if args.input_size is None else explicit
    dataset = datasets.build_dataset(source, "train", space, labeled=True, list_file=args.source_list,
                                     root=datasets.dataset_root(source, args.data_root, args.source_root))
    total = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    loader = torch.utils.data.DataLoader(common.shard(dataset, args.max_images), batch_size=args.batch_size,
                                         num_workers=args.workers)
    feat_stats = ClassStatistics(model.num_classes, model.feature_dim).to(device)
    out_stats = ClassStatistics(model.num_classes, model.num_classes).to(device)
    for batch in loader:
        images, labels = batch["image"].to(device), batch["label"].to(device)
        if size is not None:
            images = evaluation.resize_images(images, size)
            labels = downsample_labels(labels, (size[1], size[0]))
        with common.autocast(device, args.amp):
            feats, logits = model(images)                                       # (B, D, h, w), (B, C, h, w)
        y = downsample_labels(labels, feats.shape[-2:]).reshape(-1)             # (N,)
        # ranks see different numbers of images: pool locally, reduce once at the end
        feat_stats.update(flatten_pixels(feats), y, sync=False)
        out_stats.update(flatten_pixels(logits), y, sync=False)
    feat_stats.all_reduce_()
    out_stats.all_reduce_()
    if common.is_main_process():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        common.atomic_save({"feat": feat_stats.cpu().state_dict(), "out": out_stats.cpu().state_dict(),
                            "ckpt": args.ckpt, "source": source, "backbone": saved.backbone,
                            "images": total}, args.out)
        seen = int((out_stats.count > 0).sum())
        print(f"class statistics of {args.ckpt} over {total} {source} images: {seen} classes seen, "
              f"{int(out_stats.count.sum())} pixels at stride {model.output_stride} -> {args.out}", flush=True)
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_cli(init_main)
