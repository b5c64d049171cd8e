"""Segmentation networks and their weights. Every model:

- takes images as float (B, 3, H, W) RGB in [0, 1] and applies the normalisation its weights expect
  (`normalize` buffers: ImageNet RGB mean/std, or Caffe BGR 0-255 minus a mean), saved in its state dict
  so evaluation normalises exactly as training did;
- returns (features, logits) in one call: features (B, D, H/s, W/s) are what alignment methods use,
  logits (B, C, H/s, W/s) are not upsampled (methods upsample when they need full resolution);
  `model(images, with_encoder=True)` also returns the deepest encoder map from the same forward;
- exposes `feature_dim`, `num_classes`, `output_stride` and `param_groups(head_lr_mult)`, so a method
  never reaches into a model's internals;
- `encoder_features(images)`: the deepest encoder feature map (DeepLab: layer4, VGG: fc7; MiT: stage 4 at
  stride 32), used by DAFormer's feature distance against a frozen ImageNet copy of the same backbone.

Gradient checkpointing (--grad-checkpoint, `build_model(..., grad_checkpoint=True)`): in train mode with
gradients on, the backbone's blocks (ResNet stem and bottlenecks, VGG conv groups and fc6-fc7, MiT
transformer blocks, the tiny network's conv blocks) keep only their inputs and recompute their activations
in backward; the heads are not recomputed. Same losses, gradients and BN running statistics (the
recomputation's second BN update is undone); drop-path masks and autocast dtypes are replayed.

Backbones (--backbone), as the official code builds them: torchvision style as JDAI-CV/FADA @ a1c6403
core/models/resnet.py, vgg.py and classifier.py (also BIT-DA/SDCA @ d00e7ba); Caffe style as
wasidennis/AdaptSegNet model/deeplab.py and kgl-prml/Pixel-Level-Cycle-Association @ e01d77a; MiT and
the DAFormer head as lhoyer/DAFormer @ e6f6e04 mmseg/models/backbones/mix_transformer.py and
mmseg/models/decode_heads/daformer_head.py:
  tiny                  toy/test network (features 64-d, stride 8), trainable BN, random init
  deeplabv2-r101        torchvision-style ResNet-101 (stride in the 3x3, replace_stride_with_dilation:
                        layer3 dilation 1 then 2, layer4 2 then 4) + ASPP-v2 (FADA, SDCA)
  deeplabv2-r101-caffe  Caffe-style ResNet-101 (stride in the first 1x1, ceil-mode max-pool, dilation 2 / 4
                        in every block of layer3 / layer4) + ASPP-v2 (AdaptSegNet, ADVENT, PLCA lineage)
  deeplabv2-r50         torchvision-style ResNet-50, as deeplabv2-r101 (cheap)
  deeplabv2-vgg16       VGG-16 without pool4/pool5, conv5 dilation 2, fc6/fc7 3x3 dilation 4 (1024 ch) + ASPP-v2
  mit-b5, mit-b0        MiT encoder + DAFormer head (uda/mit.py): 256-d fused features at stride 4
DeepLab-v2 models: output stride 8, features = layer4 (fc7 for VGG) after ReLU, ASPP-v2 classifier with
rates 6/12/18/24 (all four summed). BN (--bn): 'frozen' = FrozenBatchNorm2d (fixed statistics AND affine,
no gradient, unchanged by train()), 'train' = ordinary BatchNorm2d (SyncBN under DDP on GPU, see
train.py); 'auto' = frozen for deeplabv2-* (FADA/SDCA), train for tiny and MiT (whose head has BN).

Weights (--pretrained FILE, `load_pretrained`): loaded by key name, no torchvision. Recognised files:
torchvision resnet101/resnet50 (`conv1.weight`, `layer1.0.conv1.weight`, ..., `fc.*` skipped), the
DeepLab COCO init (`Scale.` + torchvision-like names, old head `Scale.layer5.*` skipped), VGG-16
(`features.N.*`, `classifier.*` skipped; fc6/fc7 are new layers), SegFormer `mit_b*.pth`
(`patch_embed1.proj.weight`, ..., ImageNet `head.*` skipped) and our own checkpoints (train.py's last.pt,
or a bare state dict of our names). A missing or wrongly shaped backbone key, or an unknown extra key, is
a UserError naming the first keys; loaded / missing / unexpected counts are printed. The file decides the
normalisation: ImageNet RGB for torchvision and SegFormer files, Caffe BGR for the DeepLab COCO init and
the caffe-converted vgg16-00b39a1b.pth.

    python -m uda.models check --backbone deeplabv2-r101 --pretrained resnet101-5d3b4d8f.pth

Deviations:
- FrozenBatchNorm2d computes w / sqrt(var + 1e-5) (BatchNorm2d's eval formula, torchvision's frozen BN);
  FADA's copy uses w * rsqrt(var) with no eps, which only differs for near-zero variances (and is inf at 0).
"""
import argparse
import contextlib
import os

import torch
import torch.nn as nn
import torch.utils.checkpoint

from uda import common, mit
from uda.common import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEEPLAB_CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)  # AdaptSegNet / ADVENT IMG_MEAN
VGG_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)                      # caffe VGG-16 (vgg16-00b39a1b.pth)
PIXEL_MAX = 255.0                                                    # Caffe models take 0-255 inputs
# name -> (channel order taken from RGB input, mean, std), all in units of the [0, 1] input
CONVENTIONS = {
    "imagenet-rgb": ((0, 1, 2), IMAGENET_MEAN, IMAGENET_STD),
    "caffe-bgr-deeplab": ((2, 1, 0), tuple(m / PIXEL_MAX for m in DEEPLAB_CAFFE_MEAN_BGR), (1 / PIXEL_MAX,) * 3),
    "caffe-bgr-vgg": ((2, 1, 0), tuple(m / PIXEL_MAX for m in VGG_CAFFE_MEAN_BGR), (1 / PIXEL_MAX,) * 3),
}
ASPP_RATES = (6, 12, 18, 24)        # DeepLab-v2
BN_EPS = 1e-5                       # BatchNorm2d default, used by the frozen BN too
TORCHVISION_VGG16_TAG = "397923af"  # torchvision's own ImageNet vgg16 file (RGB); other VGG files: caffe


class InputNorm(nn.Module):
    """(x[:, order] - mean) / std on [0, 1] RGB input. Caffe: order BGR, mean = m / 255, std = 1 / 255,
    i.e. 255 x - m. Buffers, so checkpoints carry the convention their weights were trained with."""

    def __init__(self, convention):
        super().__init__()
        self.register_buffer("channel_order", torch.zeros(3, dtype=torch.long))
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))
        self.register_buffer("std", torch.ones(1, 3, 1, 1))
        self.set_convention(convention)

    def set_convention(self, name):
        order, mean, std = CONVENTIONS[name]
        self.channel_order.copy_(torch.tensor(order))
        self.mean.copy_(torch.tensor(mean).view(1, 3, 1, 1))
        self.std.copy_(torch.tensor(std).view(1, 3, 1, 1))

    def convention(self):
        for name, (order, mean, std) in CONVENTIONS.items():
            if (self.channel_order.tolist() == list(order) and
                    torch.allclose(self.mean.flatten().cpu(), torch.tensor(mean)) and
                    torch.allclose(self.std.flatten().cpu(), torch.tensor(std))):
                return name
        return "custom"

    def forward(self, images):
        return (images[:, self.channel_order] - self.mean) / self.std


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine (buffers, no gradient); train() changes nothing."""

    def __init__(self, num_features, eps=BN_EPS):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        # cast to the activation dtype so bf16/fp16 autocast activations stay half precision
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


def freeze_batchnorm(module):
    """Replace every BatchNorm2d in `module` (recursively) by a FrozenBatchNorm2d with its values."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


# --------------------------------------------------------------------------------------------------
# Gradient checkpointing (--grad-checkpoint): backbone activations recomputed in backward
# --------------------------------------------------------------------------------------------------
class RestoreBatchNormStatistics:
    """Context that puts back the running statistics of the BatchNorms in `module` as they were on entry.

    Entered around a checkpointed segment's recomputation: trainable BN in train mode normalises with
    the batch's statistics (so the recomputed output is the forward's), but it would also update
    running_mean / running_var / num_batches_tracked a second time. A class, not a generator, so the
    same context can be entered again when a graph is back-propagated twice (retain_graph)."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.saved = [(buf, buf.clone()) for m in self.module.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm)
                      for buf in (m.running_mean, m.running_var, m.num_batches_tracked) if buf is not None]

    def __exit__(self, *exc):
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)
        self.saved = []
        return False


def recomputing(module):
    """Checkpoint now? Only when asked for, in train mode and while autograd records a graph (an eval or
    no_grad forward stores no activations anyway)."""
    return module.grad_checkpoint and module.training and torch.is_grad_enabled()


def segment(fn, x, recompute, bn=None):
    """fn(x); with `recompute`, through torch.utils.checkpoint: fn's activations are freed after the
    forward and recomputed in backward. Non-reentrant checkpointing replays the forward's RNG state
    (same dropout / drop-path masks) and autocast state (same dtypes). `bn`: the module holding fn's
    BatchNorms (None: fn has none), whose running statistics the recomputation must not update again."""
    if not recompute:
        return fn(x)
    recompute_context = contextlib.nullcontext() if bn is None else RestoreBatchNormStatistics(bn)
    return torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False,
                                             context_fn=lambda: (contextlib.nullcontext(), recompute_context))


class ASPPClassifier(nn.Module):
    """DeepLab-v2 classifier: parallel 3x3 convs with dilation = padding = rate, outputs SUMMED.

    All branches are summed (AdaptSegNet's copy returns inside its loop and sums only two: a known bug
    we do not reproduce). Weights N(0, 0.01), as in DeepLab-v2.
    """

    def __init__(self, in_channels, num_classes, rates=ASPP_RATES, bias=True):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=bias) for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            if bias:
                nn.init.zeros_(conv.bias)

    def forward(self, x):
        return sum(branch(x) for branch in self.branches)


# --------------------------------------------------------------------------------------------------
# tiny: the toy and the tests
# --------------------------------------------------------------------------------------------------
def conv_bn_relu(in_ch, out_ch, stride=1, dilation=1):
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class TinyDeepLab(nn.Module):
    """A DeepLab-v2 in miniature for the toy and the tests: output stride 8, dilated last stage,
    ASPP-v2 head with small rates (the feature maps are 16x32), trainable BatchNorm, random init.

    About 0.2M parameters; a training step at batch 4 on 128x64 crops takes a few ms per core.
    """

    output_stride = 8
    new_layers = ("classifier.",)

    def __init__(self, num_classes, width=32, feature_dim=64, grad_checkpoint=False):
        super().__init__()
        self.num_classes, self.feature_dim = num_classes, feature_dim
        self.grad_checkpoint = grad_checkpoint
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.backbone = nn.Sequential(
            conv_bn_relu(3, width // 2, stride=2),                    # stride 2
            conv_bn_relu(width // 2, width, stride=2),                # stride 4
            conv_bn_relu(width, width),
            conv_bn_relu(width, feature_dim, stride=2),               # stride 8
            conv_bn_relu(feature_dim, feature_dim, dilation=2),       # dilated, as DeepLab's layer4
        )
        self.classifier = ASPPClassifier(feature_dim, num_classes, rates=(1, 2, 3, 4))

    def forward(self, images, with_encoder=False):
        features = self.encoder_features(images)  # (B, D, H/8, W/8), >= 0 after ReLU like layer4
        logits = self.classifier(features)        # (B, C, H/8, W/8)
        return (features, logits, features) if with_encoder else (features, logits)

    def encoder_features(self, images):
        x, recompute = (images - self.mean) / self.std, recomputing(self)
        for block in self.backbone:  # conv-BN-ReLU blocks, each recomputed in backward under --grad-checkpoint
            x = segment(block, x, recompute, bn=block)
        return x

    def param_groups(self, head_lr_mult):
        return [{"params": list(self.backbone.parameters()), "lr_mult": 1.0},
                {"params": list(self.classifier.parameters()), "lr_mult": head_lr_mult}]


# --------------------------------------------------------------------------------------------------
# DeepLab-v2 backbones: ResNet (two conventions) and VGG-16, with torchvision parameter names
# --------------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, dilation, stride_in_1x1):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)  # Caffe: stride in the 1x1; v1.5: in the 3x3
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=s1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=s3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class DilatedResNet(nn.Module):
    """ResNet at output stride 8 (layer3/layer4 dilated instead of strided); torchvision parameter names.

    style 'torchvision': stride in the 3x3, floor max-pool, layer3 dilations 1,2,2,.. and layer4 2,4,4
    (replace_stride_with_dilation=[False, True, True]). style 'caffe': stride in the first 1x1, ceil-mode
    max-pool, dilation 2 in every block of layer3 and 4 in every block of layer4 (DeepLab-v2 / AdaptSegNet).
    """

    def __init__(self, depths, style, grad_checkpoint=False):
        super().__init__()
        self.grad_checkpoint = grad_checkpoint
        caffe = style == "caffe"
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=caffe)
        self.inplanes = 64
        first_dilation = (1, 1, 2, 4) if caffe else (1, 1, 1, 2)
        for i, (planes, blocks, stride, dilation) in enumerate(zip((64, 128, 256, 512), depths, (1, 2, 1, 1),
                                                                   (1, 1, 2, 4))):
            layer = [Bottleneck(self.inplanes, planes, stride, first_dilation[i], caffe)]
            self.inplanes = planes * 4
            layer += [Bottleneck(self.inplanes, planes, 1, dilation, caffe) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        for m in self.modules():  # torchvision's ResNet init (replaced when weights are loaded)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stem(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)

    def forward(self, x):
        # --grad-checkpoint: the stem and each bottleneck are recomputed in backward, one at a time (per
        # block rather than per layer: layer3 alone holds most of the activations of a ResNet-101)
        recompute = recomputing(self)
        x = segment(self.stem, x, recompute, bn=self.bn1)         # (B, 64, H/4, W/4)
        for block in (*self.layer1, *self.layer2, *self.layer3, *self.layer4):
            x = segment(block, x, recompute, bn=block)
        return x                                                  # (B, 2048, H/8, W/8), after ReLU


# torchvision vgg16.features layout: 'C' = 3x3 conv + ReLU, 'M' = 2x2 max-pool
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG_FC_DILATION = 4
VGG_FC_CHANNELS = 1024


class DilatedVGG16(nn.Module):
    """VGG-16 for DeepLab-v2 at output stride 8: pool4 and pool5 become identities (so `features.N`
    keeps torchvision's numbering), conv5_x dilation = padding = 2, then fc6 / fc7: 3x3 convs with
    dilation 4 to 1024 channels + ReLU (new layers, no dropout), as FADA / AdaptSegNet."""

    def __init__(self, grad_checkpoint=False):
        super().__init__()
        self.grad_checkpoint = grad_checkpoint
        layers, in_ch, pools, self.block_ends = [], 3, 0, []
        for v in VGG16_LAYOUT:
            if v == "M":
                pools += 1
                layers.append(nn.MaxPool2d(2, 2) if pools <= 3 else nn.Identity())  # drop pool4, pool5
                self.block_ends.append(len(layers))                                  # conv{pools}_x ends
            else:
                dilation = 2 if pools == 4 else 1                                     # conv5_x
                layers += [nn.Conv2d(in_ch, v, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.fc6 = nn.Conv2d(512, VGG_FC_CHANNELS, 3, padding=VGG_FC_DILATION, dilation=VGG_FC_DILATION)
        self.fc7 = nn.Conv2d(VGG_FC_CHANNELS, VGG_FC_CHANNELS, 3, padding=VGG_FC_DILATION,
                             dilation=VGG_FC_DILATION)
        self.relu = nn.ReLU(inplace=True)

    def fc(self, x):
        return self.relu(self.fc7(self.relu(self.fc6(x))))   # (B, 1024, H/8, W/8)

    def forward(self, x):
        # --grad-checkpoint: conv1_x .. conv5_x (each with its pool) and fc6-fc7 recomputed in backward
        recompute, start = recomputing(self), 0
        for end in self.block_ends:
            x = segment(self.features[start:end], x, recompute)  # ends (B, 512, H/8, W/8) after conv5_x
            start = end
        return segment(self.fc, x, recompute)                    # (B, 1024, H/8, W/8)


class DeepLabV2(nn.Module):
    """normalize -> backbone (ResNet layer4 or VGG fc7, stride 8) -> ASPP-v2 classifier (not upsampled)."""

    output_stride = 8

    def __init__(self, backbone, feature_dim, num_classes, convention, new_layers=("classifier.",)):
        super().__init__()
        self.num_classes, self.feature_dim = num_classes, feature_dim
        self.new_layers = new_layers  # keys a pretrained (ImageNet / COCO) file does not hold
        self.normalize = InputNorm(convention)
        self.backbone = backbone
        self.classifier = ASPPClassifier(feature_dim, num_classes)

    def forward(self, images, with_encoder=False):
        features = self.backbone(self.normalize(images))  # (B, D, H/8, W/8)
        logits = self.classifier(features)                # (B, C, H/8, W/8)
        return (features, logits, features) if with_encoder else (features, logits)

    def encoder_features(self, images):
        return self.backbone(self.normalize(images))

    def param_groups(self, head_lr_mult):
        return [{"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr_mult": 1.0},
                {"params": [p for p in self.classifier.parameters() if p.requires_grad], "lr_mult": head_lr_mult}]


class MiTDAFormer(nn.Module):
    """normalize -> MiT encoder (4 stages) -> DAFormer head: features (B, 256, H/4, W/4), logits at stride 4."""

    output_stride = 4
    new_layers = ("decode_head.",)

    def __init__(self, variant, num_classes, grad_checkpoint=False):
        super().__init__()
        self.num_classes, self.feature_dim = num_classes, mit.DAFORMER_CHANNELS
        self.normalize = InputNorm("imagenet-rgb")
        self.backbone = mit.MixVisionTransformer(**mit.MIT_CONFIGS[variant], grad_checkpoint=grad_checkpoint)
        self.decode_head = mit.DAFormerHead(self.backbone.embed_dims, num_classes)

    def forward(self, images, with_encoder=False):
        stages = self.backbone(self.normalize(images))     # 4 maps (B, C_i, H/2^(i+1), W/2^(i+1))
        features, logits = self.decode_head(stages)        # (B, 256, H/4, W/4), (B, C, H/4, W/4)
        return (features, logits, stages[-1]) if with_encoder else (features, logits)

    def encoder_features(self, images):
        return self.backbone(self.normalize(images))[-1]   # (B, 512, H/32, W/32) for MiT-B5

    def param_groups(self, head_lr_mult):
        """DAFormer's AdamW custom_keys: 'head' lr x10 (decay kept: mmcv matches 'head' before 'norm'),
        'norm' and 'pos_block' (none in MiT) without weight decay, everything else plain."""
        plain, no_decay = [], []
        for name, p in self.backbone.named_parameters():
            if p.requires_grad:
                (no_decay if "norm" in name or "pos_block" in name else plain).append(p)
        head = [p for p in self.decode_head.parameters() if p.requires_grad]
        return [{"params": plain, "lr_mult": 1.0},
                {"params": no_decay, "lr_mult": 1.0, "weight_decay": 0.0},
                {"params": head, "lr_mult": head_lr_mult}]


BACKBONES = ["tiny", "deeplabv2-r101", "deeplabv2-r101-caffe", "deeplabv2-r50", "deeplabv2-vgg16", "mit-b5",
             "mit-b0"]
BN_MODES = ("auto", "frozen", "train")


def resolve_bn(backbone, bn):
    """'auto' -> 'frozen' for deeplabv2-* (FADA/SDCA), 'train' for tiny and MiT."""
    if bn not in BN_MODES:
        raise UserError(f"--bn {bn!r}: expected one of {', '.join(BN_MODES)}")
    if bn == "auto":
        return "frozen" if backbone.startswith("deeplabv2-") else "train"
    return bn


def build_model(backbone, num_classes, bn="auto", grad_checkpoint=False):
    """Construct `backbone` with a `num_classes` head, randomly initialised (weights: see load_pretrained).

    grad_checkpoint: the backbone's blocks recompute their activations in backward instead of storing
    them (training memory for time; same losses and gradients). Not saved: it only matters when training.
    """
    if backbone == "tiny":
        model = TinyDeepLab(num_classes, grad_checkpoint=grad_checkpoint)
    elif backbone in ("deeplabv2-r101", "deeplabv2-r101-caffe", "deeplabv2-r50"):
        depths = (3, 4, 6, 3) if backbone == "deeplabv2-r50" else (3, 4, 23, 3)
        caffe = backbone.endswith("-caffe")
        model = DeepLabV2(DilatedResNet(depths, "caffe" if caffe else "torchvision", grad_checkpoint), 2048,
                          num_classes, "caffe-bgr-deeplab" if caffe else "imagenet-rgb")
    elif backbone == "deeplabv2-vgg16":
        model = DeepLabV2(DilatedVGG16(grad_checkpoint), VGG_FC_CHANNELS, num_classes, "caffe-bgr-vgg",
                          new_layers=("classifier.", "backbone.fc6.", "backbone.fc7."))
    elif backbone in mit.MIT_CONFIGS:
        model = MiTDAFormer(backbone, num_classes, grad_checkpoint)
    else:
        raise UserError(f"--backbone {backbone!r}: unknown (expected one of {', '.join(BACKBONES)})")
    model.bn_mode = resolve_bn(backbone, bn)
    if model.bn_mode == "frozen":
        freeze_batchnorm(model)
    return model


def has_trainable_bn(model):
    """True when some BatchNorm updates its statistics (then DDP on GPU converts it to SyncBN)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and
               any(p.requires_grad for p in m.parameters()) for m in model.modules())


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------
def _is_counter(key):
    return key.endswith("num_batches_tracked")  # BN step counters: absent in frozen BN and in old files


def _foreign_format(keys, source):
    """Identify a public weights file by its key names: (kind, key -> our key or None to skip, convention)."""
    def prefixed(strip, skip):
        return lambda k: None if k.startswith(skip) else "backbone." + k[len(strip):]

    if any(k.startswith("Scale.") for k in keys):
        return "DeepLab COCO init", prefixed("Scale.", ("Scale.layer5.",)), "caffe-bgr-deeplab"
    if "layer1.0.conv1.weight" in keys:
        return "torchvision ResNet", prefixed("", ("fc.",)), "imagenet-rgb"
    if "features.0.weight" in keys:
        rgb = TORCHVISION_VGG16_TAG in os.path.basename(str(source))
        return "VGG-16", prefixed("", ("classifier.",)), "imagenet-rgb" if rgb else "caffe-bgr-vgg"
    if "patch_embed1.proj.weight" in keys:
        return "SegFormer MiT", prefixed("", ("head.",)), "imagenet-rgb"
    return None


def _as_state_dict(obj, source):
    """Unwrap {'state_dict': ...} / {'model': ...} containers and a DataParallel 'module.' prefix."""
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"--pretrained {source}: not a state dict of tensors")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _first(keys, n=3):
    return ", ".join(list(keys)[:n])


def load_weights(model, obj, source, backbone):
    """Load a loaded file `obj` (see the module docstring) into `model`; returns a report dict."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj.get("args"), dict):  # train.py checkpoint
        saved = obj["args"].get("backbone")
        if saved != backbone:
            raise UserError(f"--pretrained {source}: a checkpoint of --backbone {saved}, not {backbone}")
        load_state_strict(model, obj["model"], source, backbone)
        return _report(model, source, backbone, "our checkpoint", len(obj["model"]), [], [])
    state = _as_state_dict(obj, source)
    own = model.state_dict()
    if any(k.startswith("normalize.") for k in state) or all(k in own for k in state):  # our own names
        load_state_strict(model, state, source, backbone)
        return _report(model, source, backbone, "our state dict", len(state), [], [])
    found = _foreign_format(state.keys(), source)
    if found is None:
        raise UserError(f"--pretrained {source}: unrecognised weights (first keys: {_first(state)}); expected "
                        f"torchvision ResNet, DeepLab COCO init, VGG-16, SegFormer MiT or a train.py checkpoint")
    kind, to_ours, convention = found
    mapped, skipped = {}, []
    for key, value in state.items():
        ours = to_ours(key)
        if ours is None:
            skipped.append(key)
        elif not (_is_counter(ours) and ours not in own):
            mapped[ours] = value
    unexpected = [k for k in mapped if k not in own]
    wrong_shape = [k for k in mapped if k in own and tuple(mapped[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in mapped and not k.startswith("normalize.") and not _is_counter(k)]
    missing_backbone = [k for k in missing if not k.startswith(model.new_layers)]
    problems = [f"{len(keys)} {what} ({_first(keys)})" for keys, what in (
        (missing_backbone, "backbone keys missing"), (unexpected, "unexpected keys"),
        (wrong_shape, "keys of another shape")) if keys]
    if problems:
        raise UserError(f"--pretrained {source}: {kind} weights do not fit {backbone}: {'; '.join(problems)}")
    model.load_state_dict(mapped, strict=False)
    model.normalize.set_convention(convention)
    return _report(model, source, backbone, kind, len(mapped), missing, skipped)


def _report(model, source, backbone, kind, loaded, missing, skipped):
    convention = model.normalize.convention() if hasattr(model, "normalize") else "imagenet-rgb"
    report = {"kind": kind, "loaded": loaded, "missing": missing, "unexpected": skipped, "convention": convention}
    if common.is_main_process():
        print(f"weights {source} ({kind}) -> {backbone}: loaded {loaded} tensors, missing {len(missing)} "
              f"(new layers: {_first(sorted({k.rsplit('.', 2)[0] for k in missing}), 4) or 'none'}), "
              f"unexpected {len(skipped)} skipped ({_first(skipped, 4) or 'none'}); input normalisation "
              f"{convention}", flush=True)
    return report


def load_pretrained(model, path, backbone):
    """Load the file at `path` into `model` by key name (see the module docstring); returns a report."""
    return load_weights(model, common.load_checkpoint(path), path, backbone)


def load_state_strict(model, state, source, backbone):
    """Load a state dict whose architecture must match exactly; a mismatch is a one-line UserError.

    BN step counters (num_batches_tracked) may differ: frozen BN has none, trainable BN keeps its own.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not _is_counter(k)]
    unexpected = [k for k in state if k not in own and not _is_counter(k)]
    wrong_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        detail = (f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                  f"(e.g. {unexpected[:3]}), {len(wrong_shape)} of another shape (e.g. {wrong_shape[:3]})")
        raise UserError(f"{source}: not a {backbone} model with {model.num_classes} classes: {detail}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


# --------------------------------------------------------------------------------------------------
# python -m uda.models check --backbone B [--pretrained FILE]
# --------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m uda.models", description="Inspect a backbone and its weights.")
    sub = p.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="build a backbone, load --pretrained, report keys and parameters")
    check.add_argument("--backbone", required=True, help=f"one of {', '.join(BACKBONES)}")
    check.add_argument("--pretrained", default=None, metavar="FILE", help="weights file to load by key name")
    check.add_argument("--num-classes", type=common.positive_int, default=19, help="classifier outputs")
    check.add_argument("--bn", default="auto", choices=BN_MODES, help="BatchNorm mode")
    args = p.parse_args(argv)
    model = build_model(args.backbone, args.num_classes, bn=args.bn)
    if args.pretrained:
        load_pretrained(model, args.pretrained, args.backbone)
    head = count_parameters(model.decode_head if hasattr(model, "decode_head") else model.classifier)
    frozen = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, FrozenBatchNorm2d))
    print(f"{args.backbone}: bn {model.bn_mode}, output stride {model.output_stride}, feature dim "
          f"{model.feature_dim}; trainable parameters {count_parameters(model) / 1e6:.2f}M (head {head / 1e6:.2f}M)"
          + (f", plus {frozen / 1e6:.2f}M frozen BN affine values" if frozen else ""))


if __name__ == "__main__":
    common.run_cli(main)
