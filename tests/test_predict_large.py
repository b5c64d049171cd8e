"""evaluate.py --images on large photos: the upsampling, softmax, average and argmax taken a block of rows
at a time (predict_labels) give the labels of the whole-image path (uda/evaluation.predict_probs)."""
import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
from uda import common, models
from uda import evaluation as ev

CPU = torch.device("cpu")


def protocol(**flags):
    """The flags predict_labels reads, as evaluate.parse_args leaves them."""
    defaults = {"amp": "off", "scales": [1.0], "flip": False, "slide": None, "slide_stride": None}
    return argparse.Namespace(**{**defaults, **flags})


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size_in,size_out", [(24, 177), (96, 6000), (30, 31), (7, 50), (40, 40), (50, 21), (1, 9)])
def test_linear_taps_are_pytorchs_weights(size_in, size_out, align_corners):
    # resizing the identity (size_in x size_in) to (size_out x size_in) writes, in row y, the weight of
    # every input row for output row y: the kernel's own taps, compared bit for bit
    eye = torch.eye(size_in)[None, None]                                                   # (1, 1, n, n)
    weights = F.interpolate(eye, size=(size_out, size_in), mode="bilinear", align_corners=align_corners)[0, 0]
    i0, i1, w0, w1 = evaluate.linear_taps(size_in, size_out, align_corners)
    rebuilt = torch.zeros(size_out, size_in)
    rebuilt[torch.arange(size_out), i0] += w0
    rebuilt[torch.arange(size_out), i1] += w1
    assert torch.equal(rebuilt, weights)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("small,big", [((24, 40), (177, 333)), ((45, 84), (250, 420)), ((20, 20), (61, 19))])
def test_blocked_upsampling_equals_the_one_shot_upsampling(small, big, align_corners):
    torch.manual_seed(0)
    logits = 4.0 * torch.randn(1, 19, *small)                                              # (B, C, h, w)
    whole = common.upsample(logits, big, align_corners)                                    # (B, C, H, W)
    taps = evaluate.linear_taps(small[0], big[0], align_corners)
    bounds = sorted({0, 16, 17, 48, 64, big[0] // 2, big[0] - 1, big[0]} & set(range(big[0] + 1)))  # ragged blocks
    blocks = [evaluate.upsample_rows(logits, (r0, r1), taps, big[1], align_corners)
              for r0, r1 in zip(bounds[:-1], bounds[1:])]
    assert len(blocks) >= 5
    blocked = torch.cat(blocks, dim=2)
    assert blocked.shape == whole.shape
    assert torch.allclose(blocked, whole, rtol=0, atol=1e-5)  # bit-equal on the CPU it was written on
    assert torch.equal(blocked.argmax(1), whole.argmax(1))
    assert torch.equal(torch.softmax(blocked, 1).argmax(1), torch.softmax(whole, 1).argmax(1))


@pytest.mark.parametrize("resize_via_input", [False, True])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("flags", [{}, {"scales": [0.5, 1.25], "flip": True}, {"slide": (40, 24), "slide_stride": (24, 16)}])
def test_predict_labels_gives_the_labels_of_predict_probs(monkeypatch, flags, align_corners, resize_via_input):
    monkeypatch.setattr(evaluate, "BLOCK_VALUES", 1)  # the fewest rows per block: many blocks per image
    torch.manual_seed(0)
    model = models.build_model("tiny", 19).eval()
    images = torch.rand(2, 3, 75, 130)                                                     # (B, 3, H, W)
    args = protocol(**flags)

    def autocast():
        return common.autocast(CPU, "off")
    with torch.no_grad():
        expected = ev.predict_probs(model, images, (75, 130), (64, 40), autocast, None, align_corners, args.scales,
                                    args.flip, args.slide, args.slide_stride, resize_via_input).argmax(1)  # (B, H, W)
    calls = []
    upsample_rows = evaluate.upsample_rows
    monkeypatch.setattr(evaluate, "upsample_rows", lambda *a: calls.append(a[1]) or upsample_rows(*a))
    record = evaluate.protocol_record(args, (64, 40), False, align_corners, resize_via_input)
    got = evaluate.predict_labels(model, images, args, (64, 40), None, record, CPU)
    assert got.dtype == torch.uint8 and torch.equal(got.long(), expected)
    views = len(args.scales) * (2 if args.flip else 1)
    assert len(calls) == views * 5 and max(r1 - r0 for r0, r1 in calls) == evaluate.BLOCK_ROW_MULTIPLE


def test_overlay_by_blocks_is_the_whole_image_blend(monkeypatch):
    monkeypatch.setattr(evaluate, "BLOCK_VALUES", 3 * 50 * 7)  # 7 rows per block
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 19, (33, 50), dtype=np.uint8)
    image = torch.from_numpy(rng.integers(0, 256, (3, 33, 50), dtype=np.uint8))
    palette = evaluate.palette_table(argparse.Namespace(palette=None, trainids=list(range(19))))
    # the blend as evaluate.py wrote it before blocks: the float image in [0, 1] times 255, 50/50
    rgb = image.float().div(255.0).permute(1, 2, 0).numpy() * 255.0
    whole = np.clip(np.rint(0.5 * palette[pred] + 0.5 * rgb), 0, 255).astype(np.uint8)
    assert np.array_equal(evaluate.overlay_image(pred, image, palette), whole)
