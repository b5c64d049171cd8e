"""Mix Transformer (MiT) encoder and the DAFormer decoder head, in plain PyTorch.

References:
- "SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers", Xie et al.,
  NeurIPS 2021, arXiv 2105.15203; code github.com/NVlabs/SegFormer (mmseg/models/backbones/mix_transformer.py).
- "DAFormer: Improving Network Architectures and Training Strategies for Domain-Adaptive Semantic
  Segmentation", Hoyer et al., CVPR 2022, arXiv 2111.14887; code github.com/lhoyer/DAFormer, commit
  438603d (mmseg/models/backbones/mix_transformer.py, mmseg/models/decode_heads/daformer_head.py), which
  DIDA (github.com/RainJamesY/DIDA) reuses unchanged.

Parameter names equal the official ones, so SegFormer's ImageNet file `mit_b5.pth` loads into
`MixVisionTransformer` by key name (its 1000-class `head.*` is not part of the encoder) and the head's
names equal DAFormer's `decode_head.*`:

  encoder  patch_embed{1-4}.{proj,norm}  block{1-4}.N.{norm1, attn.{q,kv,proj,sr,norm}, norm2,
           mlp.{fc1, dwconv.dwconv, fc2}}  norm{1-4}
  head     embed_layers.{0-3}.proj  fuse_layer.aspp_modules.0.{conv,bn}
           fuse_layer.aspp_modules.{1-3}.{depthwise_conv,pointwise_conv}.{conv,bn}
           fuse_layer.bottleneck.{conv,bn}  conv_seg

Deviations:
- Attention uses torch's scaled_dot_product_attention (same maths as softmax(q k^T / sqrt(d)) v with
  attention dropout 0, as MiT-B5 is configured; less memory on GPU).
- DropPath is re-implemented here (timm is not a dependency); same per-sample stochastic depth.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# MiT variants (SegFormer's mit_b0 / mit_b5 classes): embed dims, heads, depths, spatial-reduction ratios.
MIT_CONFIGS = {
    "mit-b0": dict(embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8), depths=(2, 2, 2, 2)),
    "mit-b5": dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), depths=(3, 6, 40, 3)),
}
SR_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
BLOCK_NORM_EPS = 1e-6      # SegFormer: partial(nn.LayerNorm, eps=1e-6) for blocks and stage norms
DROP_PATH_RATE = 0.1       # SegFormer/DAFormer mit_b*: drop_path_rate=0.1, spread linearly over all blocks
DAFORMER_CHANNELS = 256    # DAFormer decoder: embed_dims=256, channels=256
DAFORMER_DILATIONS = (1, 6, 12, 18)
DAFORMER_DROPOUT = 0.1     # BaseDecodeHead dropout_ratio
CLS_INIT_STD = 0.01        # mmseg BaseDecodeHead: normal_init(conv_seg, std=0.01)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p (train mode only).

    Exposed so a method can switch it off in an EMA teacher (DAFormer sets DropPath.training = False).
    """

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep


class DWConv(nn.Module):
    """Mix-FFN's depthwise 3x3 convolution on the token grid."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, H, W)          # (B, C, H, W)
        return self.dwconv(x).flatten(2).transpose(1, 2)   # (B, N, C)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, H, W):
        return self.fc2(self.act(self.dwconv(self.fc1(x), H, W)))


class Attention(nn.Module):
    """Efficient self-attention: keys/values from a grid shrunk by sr_ratio (strided conv + LayerNorm)."""

    def __init__(self, dim, num_heads, sr_ratio):
        super().__init__()
        self.num_heads, self.sr_ratio = num_heads, sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)  # default eps 1e-5 here, as in SegFormer

    def forward(self, x, H, W):
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)                  # (B, h, N, C/h)
        if self.sr_ratio > 1:
            x = x.transpose(1, 2).reshape(B, C, H, W)
            x = self.norm(self.sr(x).flatten(2).transpose(1, 2))                # (B, M, C), M = N / sr^2
        kv = self.kv(x).reshape(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)     # (2, B, h, M, C/h)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])                   # (B, h, N, C/h)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))                  # (B, N, C)


class Block(nn.Module):
    def __init__(self, dim, num_heads, sr_ratio, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = Attention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = Mlp(dim, dim * MLP_RATIO)

    def forward(self, x, H, W):
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: a strided conv (7x7 s4 for stage 1, 3x3 s2 after) + LayerNorm."""

    def __init__(self, in_ch, dim, patch_size, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(x)
        H, W = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W  # (B, H*W, C)


class MixVisionTransformer(nn.Module):
    """The MiT encoder: four stages at strides 4, 8, 16, 32; returns the four maps (B, C_i, H_i, W_i).

    grad_checkpoint: in train mode with gradients on, each transformer block's activations are recomputed
    in backward instead of stored (torch.utils.checkpoint, non-reentrant: the forward's RNG state is
    replayed, so drop-path draws the same masks). The encoder has no BatchNorm (LayerNorm only), so the
    recomputation changes no running statistics.
    """

    def __init__(self, embed_dims, num_heads, depths, drop_path_rate=DROP_PATH_RATE, grad_checkpoint=False):
        super().__init__()
        self.embed_dims, self.grad_checkpoint = tuple(embed_dims), grad_checkpoint
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # stochastic depth decay rule
        in_ch, first = 3, 0
        for i in range(4):
            patch, stride = (7, 4) if i == 0 else (3, 2)
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(in_ch, embed_dims[i], patch, stride))
            setattr(self, f"block{i + 1}", nn.ModuleList(
                Block(embed_dims[i], num_heads[i], SR_RATIOS[i], rates[first + j]) for j in range(depths[i])))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=BLOCK_NORM_EPS))
            in_ch, first = embed_dims[i], first + depths[i]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        """SegFormer's initialisation from scratch (replaced by mit_b*.pth when a file is loaded)."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            nn.init.zeros_(m.bias)

    def stage(self, i, x):
        """Run stage i (1-based) on a (B, C, H, W) map; returns (B, C_i, H', W')."""
        B = x.shape[0]
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        x, H, W = getattr(self, f"patch_embed{i}")(x)
        for block in getattr(self, f"block{i}"):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, H, W, use_reentrant=False)  # (B, H*W, C_i)
            else:
                x = block(x, H, W)
        x = getattr(self, f"norm{i}")(x)
        return x.transpose(1, 2).reshape(B, -1, H, W)  # (B, C_i, H, W)

    def forward(self, x):
        outs = []
        for i in range(1, 5):
            x = self.stage(i, x)
            outs.append(x)
        return outs


class ConvModule(nn.Module):
    """mmcv's ConvModule with BN and ReLU: conv (no bias, BN follows) -> BN -> ReLU."""

    def __init__(self, in_ch, out_ch, kernel_size, dilation=1, groups=1):
        super().__init__()
        padding = 0 if kernel_size == 1 else dilation * (kernel_size // 2)
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, dilation=dilation, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.activate = nn.ReLU(inplace=True)
        # mmcv ConvModule.init_weights: kaiming normal (fan_out, relu) for the conv, BN weight 1 bias 0
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    """Depthwise 3x3 (dilated) conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU."""

    def __init__(self, in_ch, out_ch, dilation):
        super().__init__()
        self.depthwise_conv = ConvModule(in_ch, in_ch, 3, dilation=dilation, groups=in_ch)
        self.pointwise_conv = ConvModule(in_ch, out_ch, 1)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class SepASPP(nn.Module):
    """DAFormer's fusion: depthwise-separable ASPP (no image pooling), concatenated, 3x3 bottleneck."""

    def __init__(self, in_ch, channels, dilations):
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvModule(in_ch, channels, 1) if d == 1 else DepthwiseSeparableConvModule(in_ch, channels, d)
            for d in dilations)
        self.bottleneck = ConvModule(len(dilations) * channels, channels, 3)

    def forward(self, x):
        return self.bottleneck(torch.cat([branch(x) for branch in self.aspp_modules], dim=1))


class MLPEmbed(nn.Module):
    """SegFormer's MLP embedding: a linear layer on each token (no norm, no activation)."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.proj = nn.Linear(in_ch, out_ch)

    def forward(self, x):
        B, _, H, W = x.shape
        x = self.proj(x.flatten(2).transpose(1, 2))   # (B, H*W, D)
        return x.transpose(1, 2).reshape(B, -1, H, W)  # (B, D, H, W)


class DAFormerHead(nn.Module):
    """Each stage -> linear to 256 ch, upsampled to stride 4, concatenated (1024 ch) -> SepASPP -> 256 ch
    (the features) -> Dropout2d(0.1) -> 1x1 conv to the classes (the logits, at stride 4)."""

    def __init__(self, in_channels, num_classes, channels=DAFORMER_CHANNELS, dilations=DAFORMER_DILATIONS):
        super().__init__()
        self.embed_layers = nn.ModuleDict({str(i): MLPEmbed(c, channels) for i, c in enumerate(in_channels)})
        self.fuse_layer = SepASPP(channels * len(in_channels), channels, dilations)
        self.dropout = nn.Dropout2d(DAFORMER_DROPOUT)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0.0, CLS_INIT_STD)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, stages):
        size = stages[0].shape[2:]
        embedded = []
        for i, x in enumerate(stages):
            x = self.embed_layers[str(i)](x)                                               # (B, 256, H_i, W_i)
            if x.shape[2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)      # (B, 256, H/4, W/4)
            embedded.append(x)
        features = self.fuse_layer(torch.cat(embedded, dim=1))  # (B, 256, H/4, W/4), after BN-ReLU
        logits = self.conv_seg(self.dropout(features))          # (B, C, H/4, W/4)
        return features, logits
