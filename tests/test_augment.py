"""uda/augment.py on hand cases: identities, the formulas of each operation, PIL's ImageEnhance on uint8
images, Python's colorsys, determinism from the caller's generator, and the global RNG left alone."""
import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from uda import augment


def images(seed=0, batch=2, height=6, width=5):
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def uint8_image(seed=0, height=8, width=7):
    """A random (H, W, 3) uint8 image and the same pixels as a (1, 3, H, W) float tensor in [0, 1]."""
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return array, torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255.0


def jitter_factors(generator, amounts, batch):
    """The (brightness, contrast, saturation) factors color_jitter draws first, from a copy of its generator."""
    copy = torch.Generator().set_state(generator.get_state())
    return [augment.uniform(max(0.0, 1.0 - a), 1.0 + a, batch, copy) for a in amounts]


# --------------------------------------------------------------------------------------------------
# Colour space
# --------------------------------------------------------------------------------------------------
def test_grayscale_weights_on_a_hand_pixel():
    pixel = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)
    expected = 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6
    assert augment.grayscale(pixel).shape == (1, 1, 1, 1)
    assert augment.grayscale(pixel).item() == pytest.approx(expected, abs=1e-7)


def test_grayscale_matches_pil_convert_l():
    array, x = uint8_image(1)
    pil = np.asarray(Image.fromarray(array).convert("L"), dtype=np.float32) / 255.0
    assert np.abs(augment.grayscale(x)[0, 0].numpy() - pil).max() <= 1.0 / 255 + 1e-6  # PIL rounds to uint8


def test_hsv_round_trip_and_colorsys():
    x = images(2)
    hsv = augment.rgb_to_hsv(x)
    assert torch.allclose(augment.hsv_to_rgb(hsv), x, atol=1e-5)
    for b, i, j in ((0, 0, 0), (1, 3, 2), (0, 5, 4)):
        expected = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
        assert hsv[b, :, i, j].tolist() == pytest.approx(expected, abs=1e-5)


def test_hsv_of_gray_has_hue_and_saturation_zero():
    gray = torch.full((1, 3, 2, 2), 0.4)
    assert torch.equal(augment.rgb_to_hsv(gray)[:, :2], torch.zeros(1, 2, 2, 2))
    assert torch.allclose(augment.rgb_to_hsv(gray)[:, 2], torch.full((1, 2, 2), 0.4))


def test_hue_rotation_by_a_full_turn_is_the_identity():
    x = images(3)
    assert torch.allclose(augment.rotate_hue(x, torch.ones(2)), x, atol=1e-5)
    assert torch.allclose(augment.rotate_hue(x, -torch.ones(2)), x, atol=1e-5)


def test_hue_rotation_hand_cases():
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    green = augment.rotate_hue(red, torch.tensor([1.0 / 3.0]))  # +120 degrees
    assert torch.allclose(green.view(3), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    # a tiny negative turn: remainder rounds the hue up to 1.0 in fp32; red must stay red
    assert torch.allclose(augment.rotate_hue(red, torch.tensor([-1e-9])).view(3), red.view(3), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# torchvision ColorJitter semantics
# --------------------------------------------------------------------------------------------------
def test_color_jitter_with_all_amounts_zero_is_the_identity():
    x = images(4)
    assert torch.equal(augment.color_jitter(x, 0, 0, 0, 0, torch.Generator().manual_seed(0)), x)


def test_color_jitter_stays_in_range_and_changes_the_images():
    x = images(5)
    out = augment.color_jitter(x, 0.5, 0.5, 0.5, 0.2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x)


def test_brightness_is_the_drawn_factor_times_the_image_clipped():
    x = images(6)
    g = torch.Generator().manual_seed(1)
    factor = jitter_factors(g, (0.5, 0, 0), 2)[0]                        # (B,) in [0.5, 1.5]
    assert ((0.5 <= factor) & (factor <= 1.5)).all()
    expected = (x * factor.view(2, 1, 1, 1)).clamp(0, 1)
    assert torch.allclose(augment.color_jitter(x, 0.5, 0, 0, 0, g), expected, atol=1e-6)


@pytest.mark.parametrize("op, enhancer", [(0, ImageEnhance.Brightness), (1, ImageEnhance.Contrast),
                                          (2, ImageEnhance.Color)])
def test_single_jitter_operations_match_pil_imageenhance(op, enhancer):
    """torchvision's ColorJitter on PIL images is ImageEnhance with the drawn factor (rounded to uint8)."""
    array, x = uint8_image(op + 10)
    amounts = [0.0, 0.0, 0.0]
    amounts[op] = 0.5
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        factor = jitter_factors(g, amounts, 1)[op].item()
        ours = augment.color_jitter(x, *amounts, 0, g)[0].permute(1, 2, 0).numpy()
        pil = np.asarray(enhancer(Image.fromarray(array)).enhance(factor), dtype=np.float32) / 255.0
        assert np.abs(ours - pil).max() <= 2.0 / 255, (op, factor)


def test_jitter_order_is_drawn_per_image():
    """Brightness then contrast differs from contrast then brightness; over a batch, both orders occur."""
    x = images(7, batch=1).expand(16, 3, 6, 5).contiguous()
    out = augment.color_jitter(x, 0.5, 0.5, 0, 0, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    bright, contrast, _ = jitter_factors(g, (0.5, 0.5, 0), 16)
    results = set()
    for b in range(16):
        image, fb, fc = x[b:b + 1], bright[b:b + 1], contrast[b:b + 1]
        brighter = (image * fb.view(1, 1, 1, 1)).clamp(0, 1)
        b_then_c = augment.blend(brighter, augment.grayscale(brighter).mean(), fc)
        c_then_b = (augment.blend(image, augment.grayscale(image).mean(), fc) * fb.view(1, 1, 1, 1)).clamp(0, 1)
        if torch.allclose(out[b:b + 1], b_then_c, atol=1e-6):
            results.add("bc")
        elif torch.allclose(out[b:b + 1], c_then_b, atol=1e-6):
            results.add("cb")
        else:
            raise AssertionError(f"image {b}: neither order")
    assert results == {"bc", "cb"}


# --------------------------------------------------------------------------------------------------
# Grayscale and blur
# --------------------------------------------------------------------------------------------------
def test_random_grayscale_p0_identity_p1_luma_everywhere():
    x = images(8)
    assert torch.equal(augment.random_grayscale(x, 0.0, torch.Generator().manual_seed(0)), x)
    gray = augment.random_grayscale(x, 1.0, torch.Generator().manual_seed(0))
    luma = augment.grayscale(x)
    assert all(torch.allclose(gray[:, c:c + 1], luma) for c in range(3))


def test_gaussian_blur_of_a_constant_image_is_the_constant():
    x = torch.full((2, 3, 9, 11), 0.3)
    out = augment.gaussian_blur(x, (5, 7), torch.tensor([0.8, 2.0]))
    assert torch.allclose(out, x, atol=1e-6)


def test_gaussian_blur_taps_against_a_hand_computation():
    """An impulse in the middle of a column: the blurred column is the normalised 1-D kernel."""
    sigma, size = 1.3, 5
    taps = [math.exp(-(k - 2) ** 2 / (2 * sigma ** 2)) for k in range(size)]
    taps = [t / sum(taps) for t in taps]
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    vertical = augment.gaussian_blur(x, (size, 1), torch.tensor([sigma]))
    assert vertical[0, 0, 2:7, 4].tolist() == pytest.approx(taps, abs=1e-6)
    assert vertical[0, 0, :, :4].abs().max() == 0 and vertical[0, 0, :2].abs().max() == 0
    both = augment.gaussian_blur(x, (size, size), torch.tensor([sigma]))
    expected = torch.tensor(taps)[:, None] * torch.tensor(taps)[None, :]  # separable: outer product
    assert torch.allclose(both[0, 0, 2:7, 2:7], expected, atol=1e-6)
    assert both.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_dacs_blur_kernel_size():
    assert augment.dacs_blur_kernel_size(512) == 51 and augment.dacs_blur_kernel_size(64) == 7


def test_dacs_strong_augment_with_probabilities_zero_is_the_identity():
    x = images(9)
    assert torch.equal(augment.dacs_strong_augment(x, 0.2, 0.0, 0.0, torch.Generator().manual_seed(0)), x)


# --------------------------------------------------------------------------------------------------
# Randomness: only the caller's generator
# --------------------------------------------------------------------------------------------------
AUGMENTATIONS = {
    "color_jitter": lambda x, g: augment.color_jitter(x, 0.5, 0.5, 0.5, 0.2, g),
    "random_grayscale": lambda x, g: augment.random_grayscale(x, 0.5, g),
    "random_gaussian_blur": lambda x, g: augment.random_gaussian_blur(x, 3, (0.1, 2.0), g),
    "dacs_strong_augment": lambda x, g: augment.dacs_strong_augment(x, 0.2, 1.0, 1.0, g),
}


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_same_generator_state_same_output_and_global_rng_untouched(name):
    x = images(10, batch=4, height=16, width=16)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    rng_before = torch.get_rng_state()
    first = AUGMENTATIONS[name](x, g)
    assert torch.equal(torch.get_rng_state(), rng_before)
    again = AUGMENTATIONS[name](x, torch.Generator().set_state(state))
    assert torch.equal(first, again)
    other = AUGMENTATIONS[name](x, g)  # the generator moved on: a different draw
    assert not torch.equal(first, other)
