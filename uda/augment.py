"""Photometric augmentation on a batch, in torch: one module for every method (no torchvision, no kornia).

Images are (B, 3, H, W) RGB in [0, 1] as the datasets deliver them (the model normalises later).
Every random draw comes from the CPU `torch.Generator` the caller passes: each method owns one
(`common.method_generator`, seeded per rank) and saves its state in the checkpoint, so a resumed run
sees exactly the augmentation an uninterrupted one would, and evaluation or logging can never shift it.
Each paper's parameters are passed in by its method; nothing here has a paper-specific default.

Two colour jitters exist because the papers' code uses two libraries with different maths:
- `color_jitter`: torchvision's ColorJitter (FADA, SDCA, the self-training stage): brightness
  x U(max(0, 1-b), 1+b); contrast: blend with the mean luma; saturation: blend with the luma image;
  hue: rotate by U(-h, h) turns; the four in a random order drawn per image.
- `dacs_strong_augment`: DACS/DAFormer's kornia 0.5 ColorJitter + GaussianBlur2d: brightness additive
  U(-s, s), contrast multiplicative, saturation scales HSV's S, hue rotates by U(-s, s) turns.

Luma: ITU-R 601-2 (0.299, 0.587, 0.114), what PIL's convert("L") computes. The official codes jitter
PIL images, so this is what they ran (torchvision's tensor path rounds the red weight to 0.2989).
"""
import math

import torch
import torch.nn.functional as F

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's convert("L")
DACS_BLUR_KERNEL_FRACTION = 0.1       # DACS: kernel side = ceil(10% of the image side), made odd
DACS_BLUR_SIGMA = (0.15, 1.15)        # DACS: sigma ~ U(0.15, 1.15)


def uniform(low, high, count, generator):
    """count draws of U(low, high) from the CPU generator, as a (count,) float32 tensor."""
    return low + (high - low) * torch.rand(count, generator=generator)


# --------------------------------------------------------------------------------------------------
# Colour space helpers
# --------------------------------------------------------------------------------------------------
def grayscale(images):
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma."""
    weights = images.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def rgb_to_hsv(images):
    """(B, 3, H, W) RGB in [0, 1] -> (B, 3, H, W) HSV, hue in turns [0, 1); hue 0 and saturation 0 for gray."""
    r, g, b = images.unbind(dim=1)                                         # (B, H, W) each
    maxc, minc = images.max(dim=1).values, images.min(dim=1).values        # (B, H, W)
    delta = maxc - minc
    gray = delta <= 0
    sat = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    safe = torch.where(gray, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(gray, torch.zeros_like(hue), torch.remainder(hue / 6.0, 1.0))
    return torch.stack([hue, sat, maxc], dim=1)


def hsv_to_rgb(hsv):
    """Inverse of rgb_to_hsv: (B, 3, H, W) HSV (hue in turns, any real value) -> RGB."""
    hue, sat, val = hsv.unbind(dim=1)                                      # (B, H, W) each
    h6 = torch.remainder(hue, 1.0) * 6.0
    sector = torch.floor(h6)
    frac = h6 - sector
    # remainder of a tiny negative hue rounds up to 1.0 in fp32 (h6 = 6, frac 0): that is sector 0 at
    # frac 0, so wrap (clamping to sector 5 would turn red into magenta)
    sector = sector.long() % 6
    p, q, t = val * (1.0 - sat), val * (1.0 - sat * frac), val * (1.0 - sat * (1.0 - frac))
    candidates = torch.stack([val, p, q, t], dim=1)                        # (B, 4, H, W)
    # (r, g, b) as indices into (v, p, q, t) for each of the six hue sectors
    table = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], device=hsv.device)
    index = table[sector].permute(0, 3, 1, 2)                              # (B, 3, H, W)
    return candidates.gather(1, index)


def rotate_hue(images, shift):
    """Rotate the hue of (B, 3, H, W) images by shift (B,) turns."""
    hue, sat, val = rgb_to_hsv(images).unbind(dim=1)
    return hsv_to_rgb(torch.stack([hue + shift.view(-1, 1, 1), sat, val], dim=1))


# --------------------------------------------------------------------------------------------------
# torchvision semantics (FADA, SDCA, self-training)
# --------------------------------------------------------------------------------------------------
def blend(images, other, factor):
    """factor * images + (1 - factor) * other, clipped to [0, 1]; factor (B,) (torchvision _blend)."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * images + (1.0 - factor) * other).clamp(0.0, 1.0)


def color_jitter(images, brightness, contrast, saturation, hue, generator):
    """torchvision ColorJitter(brightness, contrast, saturation, hue) on each image of a batch.

    images: (B, 3, H, W) in [0, 1]; an amount of 0 disables that operation. Per image: factors drawn
    as torchvision draws them, and the four operations applied in a random order of their own.
    Returns a new (B, 3, H, W) tensor of the input's dtype.
    """
    assert images.dim() == 4 and images.shape[1] == 3, images.shape
    batch, device = images.shape[0], images.device
    factors = [uniform(max(0.0, 1.0 - a), 1.0 + a, batch, generator).to(device)
               for a in (brightness, contrast, saturation)]
    shifts = uniform(-hue, hue, batch, generator).to(device)
    orders = [torch.randperm(4, generator=generator).tolist() for _ in range(batch)]
    out = []
    for b in range(batch):  # a handful of images per process: per-image order, pixel work vectorised
        image = images[b:b + 1].float()
        for op in orders[b]:
            if op == 0 and brightness > 0:
                image = blend(image, torch.zeros_like(image), factors[0][b:b + 1])
            elif op == 1 and contrast > 0:
                image = blend(image, grayscale(image).mean(), factors[1][b:b + 1])
            elif op == 2 and saturation > 0:
                image = blend(image, grayscale(image), factors[2][b:b + 1])
            elif op == 3 and hue > 0:
                image = rotate_hue(image, shifts[b:b + 1])
        out.append(image)
    return torch.cat(out).to(images.dtype)


def random_grayscale(images, p, generator):
    """torchvision RandomGrayscale(p): each image becomes its luma (3 equal channels) with probability p."""
    chosen = (torch.rand(images.shape[0], generator=generator) < p).to(images.device).view(-1, 1, 1, 1)
    return torch.where(chosen, grayscale(images).expand_as(images), images)


def gaussian_blur(images, kernel_size, sigma):
    """Separable Gaussian blur with reflect padding, one sigma per image.

    images: (B, C, H, W); kernel_size: (kh, kw) odd sizes (a side of 1 is not blurred); sigma: (B,).
    Taps exp(-x^2 / (2 sigma^2)) at x = -k//2 .. k//2, normalised to sum 1 (torchvision and kornia alike).
    """
    batch, channels, height, width = images.shape
    sigma = sigma.to(device=images.device, dtype=images.dtype)
    out = images.reshape(1, batch * channels, height, width)               # one depthwise conv for the batch
    for size, vertical in ((kernel_size[0], True), (kernel_size[1], False)):
        if size < 2:
            continue
        half = size // 2
        x = torch.arange(size, device=images.device, dtype=images.dtype) - half  # (k,)
        taps = torch.exp(-x[None] ** 2 / (2 * sigma[:, None] ** 2))               # (B, k)
        taps = (taps / taps.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # (B*C, k)
        if vertical:
            out = F.conv2d(F.pad(out, (0, 0, half, half), mode="reflect"), taps[:, None, :, None],
                           groups=batch * channels)
        else:
            out = F.conv2d(F.pad(out, (half, half, 0, 0), mode="reflect"), taps[:, None, None, :],
                           groups=batch * channels)
    # the taps sum to 1 only up to rounding: keep a [0, 1] image in [0, 1]
    return out.reshape(batch, channels, height, width).clamp(0.0, 1.0)


def random_gaussian_blur(images, kernel_size, sigma_range, generator):
    """torchvision GaussianBlur(kernel_size, sigma=(low, high)): every image, sigma ~ U(low, high)."""
    sigma = uniform(sigma_range[0], sigma_range[1], images.shape[0], generator)
    return gaussian_blur(images, (kernel_size, kernel_size), sigma)


# --------------------------------------------------------------------------------------------------
# DACS / DAFormer strong augmentation (kornia 0.5 semantics)
# --------------------------------------------------------------------------------------------------
def dacs_color_jitter(images, brightness, contrast, saturation, hue, orders):
    """kornia 0.5 ColorJitter maths with per-image parameters (B,) and per-image orders (lists of 0..3):
    brightness additive, contrast multiplicative, saturation scales S in HSV, hue rotates by turns;
    each result clipped to [0, 1]."""
    out = []
    for b, order in enumerate(orders):
        image = images[b:b + 1]
        for op in order:
            if op == 0:
                image = (image + brightness[b]).clamp(0.0, 1.0)
            elif op == 1:
                image = (image * contrast[b]).clamp(0.0, 1.0)
            elif op == 2:
                h, s, v = rgb_to_hsv(image).unbind(dim=1)
                image = hsv_to_rgb(torch.stack([h, (s * saturation[b]).clamp(0.0, 1.0), v], dim=1))
            else:
                image = rotate_hue(image, hue[b:b + 1])
        out.append(image)
    return torch.cat(out)


def dacs_blur_kernel_size(side):
    """DACS: ceil(10% of the side), minus one when even (51 for 512, 7 for 64)."""
    size = math.ceil(DACS_BLUR_KERNEL_FRACTION * side)
    return size if size % 2 == 1 else size - 1


def dacs_strong_augment(images, jitter_strength, jitter_prob, blur_prob, generator):
    """DACS strong augmentation of a (B, 3, H, W) batch in [0, 1]: colour jitter, then Gaussian blur.

    Whether jitter / blur happen is drawn once for the batch (DACS draws them once per iteration);
    factors, order and sigma per image (DACS calls kornia once per image).
    """
    batch, device = images.shape[0], images.device
    s = jitter_strength
    if torch.rand((), generator=generator).item() < jitter_prob:
        brightness = uniform(-s, s, batch, generator).to(device)
        contrast = uniform(1 - s, 1 + s, batch, generator).to(device)
        saturation = uniform(1 - s, 1 + s, batch, generator).to(device)
        hue = uniform(-s, s, batch, generator).to(device)   # kornia: U(-s, s) x 2 pi radians = U(-s, s) turns
        orders = [torch.randperm(4, generator=generator).tolist() for _ in range(batch)]
        images = dacs_color_jitter(images, brightness, contrast, saturation, hue, orders)
    if torch.rand((), generator=generator).item() < blur_prob:
        kernel = (dacs_blur_kernel_size(images.shape[2]), dacs_blur_kernel_size(images.shape[3]))
        images = gaussian_blur(images, kernel, uniform(*DACS_BLUR_SIGMA, batch, generator))
    return images
