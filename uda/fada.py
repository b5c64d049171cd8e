"""FADA: fine-grained (class-level) adversarial feature alignment.

Paper: Haoran Wang, Tong Shen, Wei Zhang, Ling-Yu Duan, Tao Mei, "Classes Matter: A Fine-grained
Adversarial Approach to Cross-domain Semantic Segmentation", ECCV 2020, arXiv 2007.09222.
Official code: https://github.com/JDAI-CV/FADA, commit a1c6403 (train_adv.py, core/models/
discriminator.py, core/models/classifier.py, configs/*.yaml read and followed).

Symbols: F = model features at stride 8 (layer4; B x D x h x w), z = logits (B x K x h x w), up(.) =
bilinear upsampling to the input size (align_corners=True, as the official classifier and
discriminator), T = --temperature, K classes, D(.) = the pixel discriminator with 2K outputs per pixel
(channels 0..K-1 "source, class k", K..2K-1 "target, class k").

Domain encodings (the discriminator's class-aware labels), from the model's OWN predictions in both
domains (source ground truth is not used for them), detached, clamped, NOT renormalised:
    a = min(softmax(up(z) / T), cap)                      cap = --encoding-cap

Soft cross-entropy, softmax jointly over the 2K channels, mean over pixels, no ignore mask:
    softCE(d, y) = mean_pixels( -sum_{j<2K} y_j * log softmax_j(d) )

One iteration, in the official order:
1. L_seg = CE(up(z_s) / T, y_s)  (the temperature is applied to the supervised loss too); backward.
2. L_adv = lambda_adv * softCE(up(D(F_t)), [a_t ; 0]): target features are pushed towards "source,
   same class"; backward reaches the segmentation network only (D's weights take no gradient here).
3. Step the segmentation network (backbone and classifier, head LR x --head-lr-mult).
4. L_D = lambda_d * softCE(up(D(F_s.detach())), [a_s ; 0]) + lambda_d * softCE(up(D(F_t.detach())), [0 ; a_t])
   with the features from before step 3; step D (Adam).
Total generator objective: L_seg + lambda_adv * softCE(...) with lambda_adv = --lambda-adv (0.001);
discriminator objective: L_D with lambda_d = --lambda-d (0.5).

Recipe (configs/deeplabv2_r101_adv.yaml): starts from the source-only warm-up (`--pretrained`), D from
scratch; backbone LR 2.5e-4 (head x10), SGD momentum 0.9, wd 5e-4; D Adam 1e-4, betas (0.9, 0.99), no
wd, on the same poly schedule (62,500 iterations stopping at 40,000); 1 source + 1 target image per GPU
on 4 GPUs; source ColorJitter(0.5, 0.5, 0.5, 0.2); target resize only. Backbones: deeplabv2-r101
(torchvision style, frozen BN), deeplabv2-vgg16 (1024-ch features), tiny (toy); D reads
model.feature_dim channels.

DDP: train.py does not wrap modules in DistributedDataParallel; common.optimizer_step all-reduces (averages)
each optimizer's gradients before stepping, so the discriminator is averaged across ranks exactly as a
separate DDP module would be (the official code wraps it in its own DDP), and starts from rank 0's
weights. AMP: the networks run under autocast; upsampling, softmaxes, encodings and soft CE run in fp32.

Deviations:
- The magic numbers of train_adv.py (1.8, 0.9, 0.001, 0.5) are flags with those defaults.
- D's gradients from step 2 are not computed at all (its parameters are frozen during that backward)
  instead of computed and then zeroed: same result, less work.
- Source colour jitter runs on the batch in torch (uda/selftrain.color_jitter) after the loader's
  resize, instead of on the PIL image; same operations.
- The official code leaves autograd anomaly detection on and restarts the LR schedule on resume; we
  do neither (resume restores D, both optimizers and the iteration).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from uda import common
from uda.common import IGNORE_INDEX, UserError, adam, optimizer_step, sgd
from uda.selftrain import color_jitter, step_generator

LEAKY_SLOPE = 0.2  # official PixelDiscriminator: LeakyReLU(negative_slope=0.2)


# --------------------------------------------------------------------------------------------------
# Losses: pure functions of tensors
# --------------------------------------------------------------------------------------------------
def upsample(x, size):
    """Bilinear, align_corners=True (the official classifier and discriminator), in fp32. (B, C, h, w) -> (B, C, *size)."""
    x = x.float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def domain_encoding(logits, temperature, cap):
    """a = min(softmax(logits / T), cap), detached and NOT renormalised.

    logits: (B, K, H, W) at the resolution the encodings are wanted. Returns (B, K, H, W) fp32 without
    a graph: the encodings are labels for the discriminator, no gradient may flow through them.
    """
    assert logits.dim() == 4 and temperature > 0 and 0 < cap <= 1
    with torch.no_grad():
        return torch.softmax(logits.detach().float() / temperature, dim=1).clamp_(max=cap)  # (B, K, H, W)


def soft_cross_entropy(d_logits, soft_labels):
    """mean over pixels of -sum_j y_j log softmax_j(d), softmax over all channels, fp32, no ignore mask.

    d_logits, soft_labels: (B, J, H, W) (J = 2K for FADA). Returns a scalar.
    """
    assert d_logits.shape == soft_labels.shape and d_logits.dim() == 4
    log_probs = F.log_softmax(d_logits.float(), dim=1)                     # (B, J, H, W)
    return -(soft_labels.float() * log_probs).sum(dim=1).mean()            # sum over J, mean over B, H, W


def domain_cross_entropy(d_logits, encoding, domain):
    """softCE(d, [a ; 0]) for domain 0 (source) or softCE(d, [0 ; a]) for domain 1 (target).

    d_logits: (B, 2K, H, W); encoding: (B, K, H, W). Same value as soft_cross_entropy against the
    concatenated 2K target, without materialising the zero half.
    """
    num_classes = encoding.shape[1]
    assert d_logits.shape[1] == 2 * num_classes and d_logits.shape[2:] == encoding.shape[2:] and domain in (0, 1)
    log_probs = F.log_softmax(d_logits.float(), dim=1)                     # (B, 2K, H, W), joint over 2K
    half = log_probs[:, domain * num_classes:(domain + 1) * num_classes]   # (B, K, H, W)
    return -(encoding.float() * half).sum(dim=1).mean()                    # sum over K, mean over pixels


def segmentation_loss(logits, labels, temperature):
    """CE(up(z) / T, y), 255 ignored, fp32; 0 (with a graph) when every pixel is ignored.

    logits: (B, K, H, W) already at the label size; labels: (B, H, W) int64.
    """
    assert logits.dim() == 4 and labels.shape == (logits.shape[0],) + logits.shape[2:]
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float() / temperature, labels, ignore_index=IGNORE_INDEX)


# --------------------------------------------------------------------------------------------------
# The discriminator
# --------------------------------------------------------------------------------------------------
RECIPE = {}


class PixelDiscriminator(nn.Module):
    """Fully convolutional, no downsampling: 3x3 conv D -> width, LeakyReLU, 3x3 -> width/2, LeakyReLU,
    then two 3x3 heads width/2 -> K ("source, class k" and "target, class k"), concatenated to 2K.

    ~5.06M parameters for D = 2048, width = 256, K = 19 (official ndf = 256). Default PyTorch init.
    """

    def __init__(self, in_channels, num_classes, width=256):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv2d(width, width // 2, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
        self.source_head = nn.Conv2d(width // 2, num_classes, 3, padding=1)
        self.target_head = nn.Conv2d(width // 2, num_classes, 3, padding=1)

    def forward(self, features, size=None):
        """features (B, D, h, w) -> (B, 2K, h, w), or (B, 2K, *size) upsampled (fp32) when size is given."""
        hidden = self.body(features)                                                       # (B, width/2, h, w)
        out = torch.cat([self.source_head(hidden), self.target_head(hidden)], dim=1)       # (B, 2K, h, w)
        return upsample(out, size) if size is not None else out


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
class FADA:
    """Class-level adversarial alignment. Optimizers: SGD (segmentation network), Adam (discriminator)."""

    needs_target = True

    def __init__(self, model, args, env):
        if args.temperature <= 0:
            raise UserError(f"--temperature {args.temperature}: expected a positive number")
        if not 0 < args.encoding_cap <= 1:
            raise UserError(f"--encoding-cap {args.encoding_cap}: expected a probability in (0, 1]")
        if args.lambda_adv < 0 or args.lambda_d <= 0 or args.d_width < 2:
            raise UserError("--lambda-adv must be >= 0, --lambda-d > 0 and --d-width >= 2")
        self.model, self.env = model, env
        self.temperature, self.cap = args.temperature, args.encoding_cap
        self.lambda_adv, self.lambda_d = args.lambda_adv, args.lambda_d
        self.jitter, self.seed = tuple(args.color_jitter), args.seed
        self.discriminator = PixelDiscriminator(model.feature_dim, model.num_classes, args.d_width).to(env.device)
        common.broadcast_parameters(self.discriminator)  # every rank starts from rank 0's D
        self.optimizer = sgd(model.param_groups(args.head_lr_mult), args.lr, args.momentum, args.weight_decay)
        self.d_optimizer = adam(self.discriminator.parameters(), args.d_lr, tuple(args.d_betas))
        self.optimizers = [self.optimizer, self.d_optimizer]  # train.py drives both with the poly schedule

    def generator_step(self, source, target, it):
        """Steps 1-3. Returns (detached source/target features, encodings, loss terms) for step 4."""
        scaler = self.env.scaler
        self.optimizer.zero_grad(set_to_none=True)
        images_s, labels_s = source["image"], source["label"]
        if any(x > 0 for x in self.jitter):
            images_s = color_jitter(images_s, self.jitter, step_generator(self.seed, it))
        size_s, size_t = tuple(images_s.shape[-2:]), tuple(target["image"].shape[-2:])

        # 1. supervised source loss on logits / T; backward now frees the source graph early
        with self.env.autocast():
            features_s, logits_s = self.model(images_s)          # (B, D, h, w), (B, K, h, w)
        logits_s = upsample(logits_s, size_s)                     # (B, K, H, W) fp32
        seg = segmentation_loss(logits_s, labels_s, self.temperature)
        scaler.scale(seg).backward()
        encoding_s = domain_encoding(logits_s, self.temperature, self.cap)

        # 2. adversarial loss: target features should look like "source, same class" to D
        with self.env.autocast():
            features_t, logits_t = self.model(target["image"])
        encoding_t = domain_encoding(upsample(logits_t, size_t), self.temperature, self.cap)
        self.discriminator.requires_grad_(False)  # no D gradients from the generator's loss
        with self.env.autocast():
            d_t = self.discriminator(features_t, size_t)          # (B, 2K, H, W) fp32
        adv = self.lambda_adv * domain_cross_entropy(d_t, encoding_t, domain=0)
        scaler.scale(adv).backward()
        self.discriminator.requires_grad_(True)

        # 3. step the segmentation network
        optimizer_step(self.optimizer, scaler)
        losses = {"seg": seg.detach(), "adv": adv.detach()}
        return features_s.detach(), features_t.detach(), encoding_s, encoding_t, losses

    def discriminator_step(self, features_s, features_t, encoding_s, encoding_t):
        """Step 4 on features from before the generator step; the segmentation network is not touched."""
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
        features_s, features_t, encoding_s, encoding_t, losses = self.generator_step(source, target, it)
        losses.update(self.discriminator_step(features_s, features_t, encoding_s, encoding_t))
        return losses

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "discriminator": self.discriminator.state_dict(),
                "d_optimizer": self.d_optimizer.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])


def add_arguments(parser):
    group = parser.add_argument_group("fada")
    group.add_argument("--temperature", type=float, default=1.8,
                       help="T: source CE on logits / T and encodings softmax(logits / T) (official train_adv.py: 1.8)")
    group.add_argument("--encoding-cap", type=float, default=0.9,
                       help="clamp of the domain encodings, not renormalised (official: 0.9; paper sweep 0.7-1.0)")
    group.add_argument("--lambda-adv", type=float, default=0.001,
                       help="weight of the adversarial loss on target features (official: 0.001)")
    group.add_argument("--lambda-d", type=float, default=0.5,
                       help="weight of each domain's half of the discriminator loss (official: 0.5)")
    group.add_argument("--d-lr", type=float, default=1e-4, help="discriminator Adam LR, poly-decayed (official: 1e-4)")
    group.add_argument("--d-betas", type=float, nargs=2, default=(0.9, 0.99), metavar=("B1", "B2"),
                       help="discriminator Adam betas (official: 0.9 0.99)")
    group.add_argument("--d-width", type=int, default=256,
                       help="channels of the discriminator's first conv, the second has half (official ndf: 256)")
    group.add_argument("--color-jitter", type=float, nargs=4, default=(0.5, 0.5, 0.5, 0.2),
                       metavar=("B", "C", "S", "H"),
                       help="source brightness, contrast, saturation, hue jitter (official: 0.5 0.5 0.5 0.2; "
                            "0 0 0 0 disables)")


Method = FADA
