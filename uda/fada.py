"""FADA: fine-grained (class-level) adversarial feature alignment.

Copy with: uda/common.py, uda/augment.py, uda/source_only.py

Paper: Haoran Wang, Tong Shen, Wei Zhang, Ling-Yu Duan, Tao Mei, "Classes Matter: A Fine-grained
Adversarial Approach to Cross-domain Semantic Segmentation", ECCV 2020, arXiv 2007.09222.
Official code: https://github.com/JDAI-CV/FADA, commit a1c6403 (train_adv.py, core/models/
discriminator.py, core/models/classifier.py, core/datasets/build.py, core/datasets/gta5.py,
configs/deeplabv2_*_adv*.yaml read and followed). The later stages (pseudo-labels, self-distillation)
are uda/pseudo_labels.py and uda/selftrain.py.

Symbols: F = model features at stride 8 (layer4; B x D x h x w), z = logits (B x C x h x w), C classes,
up(.) = bilinear upsampling to the input size with align_corners = --align-corners (True in RECIPE, as
the official classifier), T = --fada-temperature, Dnet(.) = the pixel discriminator with 2C outputs per
pixel (channels 0..C-1 "source, class c", C..2C-1 "target, class c"), its output upsampled to the input
size with align_corners=True always (hard-coded in the official PixelDiscriminator).

Domain encodings (the discriminator's class-aware labels), from the model's OWN predictions in both
domains (source ground truth is not used for them), detached, clamped, NOT renormalised:
    a = min(softmax(up(z) / T), cap)                      cap = --fada-encoding-cap

Soft cross-entropy, softmax jointly over the 2C channels, mean over pixels, no ignore mask:
    softCE(d, y) = mean_pixels( -sum_{j<2C} y_j * log softmax_j(d) )

One iteration, in the official order:
0. x_s = ColorJitter(x_s) with (brightness, contrast, saturation, hue) = --fada-color-jitter
   (0.5 0.5 0.5 0.2; uda.augment.color_jitter: torchvision semantics, an order per image); the target
   images are only resized (by the loader).
1. L_seg = CE(up(z_s) / T, y_s)  (the temperature is applied to the supervised loss too); backward.
2. L_adv = lambda_adv * softCE(up(Dnet(F_t)), [a_t ; 0]): target features are pushed towards "source,
   same class"; backward reaches the segmentation network only (Dnet's weights take no gradient here).
3. Step the segmentation network (SGD; backbone --lr, head x --head-lr-mult).
4. L_D = lambda_d * softCE(up(Dnet(F_s.detach())), [a_s ; 0]) + lambda_d * softCE(up(Dnet(F_t.detach())), [0 ; a_t])
   with the features from before step 3; step Dnet (Adam --fada-d-lr, betas --fada-d-betas, no weight
   decay, on the same poly schedule as the network).
Total objective of the segmentation network: L_seg + L_adv, lambda_adv = --fada-lambda-adv (0.001);
of the discriminator: L_D, lambda_d = --fada-lambda-d (0.5).

Recipe (RECIPE below; each value's source beside it): starts from the source-only warm-up
(`--pretrained`, the official stage 1 at 20,000 iterations), Dnet from scratch. Backbones: deeplabv2-r101
(torchvision style, frozen BN), deeplabv2-vgg16 (1024-ch features), tiny (the toy); Dnet reads
model.feature_dim channels.

DDP: Dnet's gradients are averaged over ranks like the network's, in common.optimizer_step (Dnet starts from
rank 0's weights). AMP: the networks run under autocast; upsampling, softmaxes, encodings and soft CE
run in fp32.

Deviations (from the official code):
- The magic numbers of train_adv.py (1.8, 0.9, 0.001, 0.5) and the discriminator's settings are flags
  with those defaults.
- Dnet's gradients from step 2 are not computed at all (its parameters are frozen during that backward)
  instead of computed and then zeroed: same result, less work.
- At `--fada-lambda-adv 0` (the toy benchmark's recipe-only control) the discriminator is neither
  evaluated nor trained: it reaches the network only through that term, so this changes no weight of
  the network and saves its forward and backward passes (the official code would still train it).
- The source colour jitter runs on the batch in torch after the loader's resize (official: torchvision
  ColorJitter on the PIL image before the resize, rounding to uint8 after each operation); same
  operations and factor distributions. Its random numbers come from the method's own random generator
  `self.rng` (seeded by --seed and the rank, saved in the checkpoint), not from the global RNG.
- train.py's loader flips the source batch horizontally with probability 0.5 (the official adversarial
  stage does not flip).
- Class-balanced source sampling (`--source-sampler class-balanced`) is reproducible per (seed, draw);
  see uda/samplers.py for how it differs from gta5.py's unseeded per-rank list.
- The official code leaves autograd anomaly detection on and restarts the LR schedule on resume; we
  do neither (resume restores Dnet, both optimizers, the random generator and the iteration).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from uda import common
from uda.augment import color_jitter
from uda.common import UserError, adam, optimizer_step, sgd
from uda.source_only import cross_entropy

LEAKY_SLOPE = 0.2  # official PixelDiscriminator: LeakyReLU(negative_slope=0.2)
DISCRIMINATOR_ALIGN_CORNERS = True  # official PixelDiscriminator.forward: F.interpolate(..., align_corners=True)
GENERATOR_STREAM = "fada"  # common.method_generator's stream, named after the method (source colour jitter)


# --------------------------------------------------------------------------------------------------
# Losses: pure functions of tensors
# --------------------------------------------------------------------------------------------------
def domain_encoding(logits, temperature, cap):
    """a = min(softmax(logits / T), cap), detached and NOT renormalised.

    logits: (B, C, H, W) at the resolution the encodings are wanted. Returns (B, C, H, W) fp32 without
    a graph: the encodings are labels for the discriminator, no gradient may flow through them.
    """
    assert logits.dim() == 4 and temperature > 0 and 0 < cap <= 1
    with torch.no_grad():
        return torch.softmax(logits.detach().float() / temperature, dim=1).clamp_(max=cap)  # (B, C, H, W)


def soft_cross_entropy(d_logits, soft_labels):
    """mean over pixels of -sum_j y_j log softmax_j(d), softmax over all channels, fp32, no ignore mask.

    d_logits, soft_labels: (B, J, H, W) (J = 2C for FADA). Returns a scalar.
    """
    assert d_logits.shape == soft_labels.shape and d_logits.dim() == 4
    log_probs = F.log_softmax(d_logits.float(), dim=1)                     # (B, J, H, W)
    return -(soft_labels.float() * log_probs).sum(dim=1).mean()            # sum over J, mean over B, H, W


def domain_cross_entropy(d_logits, encoding, domain):
    """softCE(d, [a ; 0]) for domain 0 (source) or softCE(d, [0 ; a]) for domain 1 (target).

    d_logits: (B, 2C, H, W); encoding: (B, C, H, W). Same value as soft_cross_entropy against the
    concatenated 2C target, without materialising the zero half.
    """
    num_classes = encoding.shape[1]
    assert d_logits.shape[1] == 2 * num_classes and d_logits.shape[2:] == encoding.shape[2:] and domain in (0, 1)
    log_probs = F.log_softmax(d_logits.float(), dim=1)                     # (B, 2C, H, W), joint over 2C
    half = log_probs[:, domain * num_classes:(domain + 1) * num_classes]   # (B, C, H, W)
    return -(encoding.float() * half).sum(dim=1).mean()                    # sum over C, mean over pixels


def segmentation_loss(logits, labels, temperature):
    """CE(z / T, y), 255 ignored, fp32; 0 (with a graph) when every pixel is ignored.

    logits: (B, C, H, W) already at the label size; labels: (B, H, W) int64.
    """
    return cross_entropy(logits.float() / temperature, labels)


# --------------------------------------------------------------------------------------------------
# The discriminator
# --------------------------------------------------------------------------------------------------
class PixelDiscriminator(nn.Module):
    """Fully convolutional, no downsampling: 3x3 conv D -> width, LeakyReLU, 3x3 -> width/2, LeakyReLU,
    then two 3x3 heads width/2 -> C ("source, class c" and "target, class c"), concatenated to 2C.

    ~5.06M parameters for D = 2048, width = 256, C = 19 (official ndf = 256). Default PyTorch init.
    """

    def __init__(self, in_channels, num_classes, width=256):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv2d(width, width // 2, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
        self.source_head = nn.Conv2d(width // 2, num_classes, 3, padding=1)
        self.target_head = nn.Conv2d(width // 2, num_classes, 3, padding=1)

    def forward(self, features, size=None):
        """features (B, D, h, w) -> (B, 2C, h, w), or (B, 2C, *size) in fp32 when size is given."""
        hidden = self.body(features)                                                       # (B, width/2, h, w)
        out = torch.cat([self.source_head(hidden), self.target_head(hidden)], dim=1)       # (B, 2C, h, w)
        if size is None:
            return out
        return common.upsample(out.float(), size, DISCRIMINATOR_ALIGN_CORNERS)             # (B, 2C, H, W)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
RECIPE = {
    "lr": 2.5e-4,                        # configs/deeplabv2_r101_adv.yaml (and _vgg16_adv): SOLVER.BASE_LR
    "head_lr_mult": 10.0,                # train_adv.py: optimizer_cls at BASE_LR * 10
    "momentum": 0.9,                     # core/configs/defaults.py: SOLVER.MOMENTUM
    "weight_decay": 5e-4,                # defaults.py: SOLVER.WEIGHT_DECAY
    "poly_power": 0.9,                   # defaults.py: SOLVER.LR_METHOD 'poly', LR_POWER 0.9
    "iters": 62500,                      # deeplabv2_r101_adv.yaml: SOLVER.MAX_ITER (the poly horizon)
    "stop_iter": 40000,                  # deeplabv2_r101_adv.yaml: SOLVER.STOP_ITER
    # BATCH_SIZE 8, halved by train_adv.py into 4 source + 4 target, over 4 GPUs (1 + 1 each): this is
    # the one-process value; under torchrun pass --batch-size 4 / (number of processes)
    "batch_size": 4,
    "bn": "frozen",                      # deeplabv2_r101_adv.yaml: FREEZE_BN True (VGG-16 has no BN)
    "source_sampler": "class-balanced",  # gta5.py / synthia.py build their train lists class-balanced
    "align_corners": True,               # classifier.py ASPP_Classifier_V2: F.interpolate(align_corners=True)
}
# Read by the tools through uda/methods.py (the contract in uda/source_only.py):
# the toy benchmark's recipe-only control switches off FADA's idea, the adversarial term on target features
CONTROL_FLAGS = ["--fada-lambda-adv", "0"]
# the toy benchmark samples the source uniformly, as in the README's toy table (class-balanced sampling is
# this recipe's real-data choice)
TOY_FLAGS = ["--source-sampler", "uniform"]


class FADA:
    """Class-level adversarial alignment. Optimizers: SGD (segmentation network), Adam (discriminator)."""

    needs_target = True

    def __init__(self, model, args, env):
        check_args(args)
        self.model, self.env = model, env
        self.temperature, self.cap = args.fada_temperature, args.fada_encoding_cap
        self.lambda_adv, self.lambda_d = args.fada_lambda_adv, args.fada_lambda_d
        self.jitter, self.align_corners = tuple(args.fada_color_jitter), args.align_corners
        # `rng`, not `generator`: in this file the generator is the segmentation network (generator_step)
        self.rng = common.method_generator(args.seed, GENERATOR_STREAM)
        self.discriminator = PixelDiscriminator(model.feature_dim, model.num_classes, args.fada_d_width).to(env.device)
        common.broadcast_parameters(self.discriminator)  # every rank starts from rank 0's Dnet
        self.optimizer = sgd(model.param_groups(args.head_lr_mult), args.lr, args.momentum, args.weight_decay)
        self.d_optimizer = adam(self.discriminator.parameters(), args.fada_d_lr, tuple(args.fada_d_betas))
        self.optimizers = [self.optimizer, self.d_optimizer]  # train.py drives both with the poly schedule

    def generator_step(self, source, target):
        """Steps 0-3. Returns (detached source/target features, encodings, logged terms) for step 4."""
        scaler = self.env.scaler
        self.optimizer.zero_grad(set_to_none=True)
        images_s, labels_s = source["image"], source["label"]
        if any(amount > 0 for amount in self.jitter):
            images_s = color_jitter(images_s, *self.jitter, self.rng)
        size_s, size_t = tuple(images_s.shape[-2:]), tuple(target["image"].shape[-2:])

        # 1. supervised source loss on logits / T; backward now frees the source graph early
        with self.env.autocast():
            features_s, logits_s = self.model(images_s)                           # (B, D, h, w), (B, C, h, w)
        logits_s = common.upsample(logits_s.float(), size_s, self.align_corners)  # (B, C, H, W) fp32
        seg = segmentation_loss(logits_s, labels_s, self.temperature)
        scaler.scale(seg).backward()
        logged = {"seg": seg.detach()}
        encoding_s = encoding_t = None  # Dnet's soft labels: not needed at --fada-lambda-adv 0 (Dnet is skipped)

        # 2. adversarial loss: target features should look like "source, same class" to Dnet. At weight 0
        # the target pass only refreshes trainable BN statistics, so it builds no graph
        with self.env.autocast(), torch.set_grad_enabled(bool(self.lambda_adv)):
            features_t, logits_t = self.model(target["image"])
        if self.lambda_adv:
            encoding_s = domain_encoding(logits_s, self.temperature, self.cap)
            encoding_t = domain_encoding(common.upsample(logits_t.float(), size_t, self.align_corners),
                                         self.temperature, self.cap)
            self.discriminator.requires_grad_(False)  # no Dnet gradients from the network's loss
            with self.env.autocast():
                d_t = self.discriminator(features_t, size_t)                      # (B, 2C, H, W) fp32
            adv = self.lambda_adv * domain_cross_entropy(d_t, encoding_t, domain=0)
            scaler.scale(adv).backward()
            self.discriminator.requires_grad_(True)
            logged["adv"] = adv.detach()

        # 3. step the segmentation network
        optimizer_step(self.optimizer, scaler)
        return features_s.detach(), features_t.detach(), encoding_s, encoding_t, logged

    def discriminator_step(self, features_s, features_t, encoding_s, encoding_t):
        """Step 4 on features from before the network's step; the segmentation network is not touched."""
        scaler = self.env.scaler
        self.d_optimizer.zero_grad(set_to_none=True)
        with self.env.autocast():
            d_s = self.discriminator(features_s, encoding_s.shape[-2:])
        d_src = self.lambda_d * domain_cross_entropy(d_s, encoding_s, domain=0)
        scaler.scale(d_src).backward()  # two backwards, as the official code: lower peak memory
        with self.env.autocast():
            d_t = self.discriminator(features_t, encoding_t.shape[-2:])
        d_tgt = self.lambda_d * domain_cross_entropy(d_t, encoding_t, domain=1)
        scaler.scale(d_tgt).backward()
        optimizer_step(self.d_optimizer, scaler)
        return {"d_src": d_src.detach(), "d_tgt": d_tgt.detach()}

    def train_step(self, source, target, it):
        features_s, features_t, encoding_s, encoding_t, logged = self.generator_step(source, target)
        if self.lambda_adv:  # at --fada-lambda-adv 0 the discriminator cannot reach the network: not trained
            logged.update(self.discriminator_step(features_s, features_t, encoding_s, encoding_t))
        return logged

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "discriminator": self.discriminator.state_dict(),
                "d_optimizer": self.d_optimizer.state_dict(),
                "generator": self.rng.get_state()}  # the contract's key for a method's random generator

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.rng.set_state(state["generator"])


def check_args(args):
    """One UserError per flag out of range that its argparse type lets through, before anything is built."""
    if args.fada_encoding_cap > 1:
        raise UserError(f"--fada-encoding-cap {args.fada_encoding_cap}: expected a probability in (0, 1]")
    if args.fada_color_jitter[3] > 0.5:
        raise UserError(f"--fada-color-jitter {' '.join(map(str, args.fada_color_jitter))}: expected the hue "
                        f"amount in [0, 0.5] (torchvision ColorJitter)")


def add_arguments(parser):
    group = parser.add_argument_group("fada")
    group.add_argument("--fada-temperature", type=common.positive_float, default=1.8,
                       help="T: source CE on logits / T and encodings softmax(logits / T) (official train_adv.py: 1.8)")
    group.add_argument("--fada-encoding-cap", type=common.positive_float, default=0.9,
                       help="clamp of the domain encodings, not renormalised (official: 0.9; paper sweep 0.7-1.0)")
    group.add_argument("--fada-lambda-adv", type=common.nonnegative_float, default=0.001,
                       help="weight of the adversarial loss on target features (official: 0.001)")
    group.add_argument("--fada-lambda-d", type=common.positive_float, default=0.5,
                       help="weight of each domain's half of the discriminator loss (official: 0.5)")
    group.add_argument("--fada-d-lr", type=common.positive_float, default=1e-4,
                       help="discriminator Adam LR, poly-decayed (official BASE_LR_D: 1e-4)")
    group.add_argument("--fada-d-betas", type=common.fraction_below_one, nargs=2, default=(0.9, 0.99),
                       metavar=("B1", "B2"),
                       help="discriminator Adam betas (official: 0.9 0.99)")
    group.add_argument("--fada-d-width", type=common.int_at_least(2), default=256,
                       help="channels of the discriminator's first conv, the second has half (official ndf: 256)")
    group.add_argument("--fada-color-jitter", type=common.nonnegative_float, nargs=4,
                       default=(0.5, 0.5, 0.5, 0.2), metavar=("B", "C", "S", "H"),
                       help="source brightness, contrast, saturation, hue jitter (official: 0.5 0.5 0.5 0.2; "
                            "0 0 0 0 disables)")


Method = FADA
