"""DAFormer self-training base: EMA teacher, pseudo-labels, ClassMix, DACS strong augmentation, feature
distance, the recipe, the method's own random generator, a toy smoke run, exact resume and independence
from --eval-every."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from conftest import TOY_FAST, run_script
from uda import augment, common, daformer, datasets, flags, models, samplers
from uda.daformer import (class_mix_masks, downscale_label_ratio, ema_update, fd_mask, feature_distance, mix,
                          pseudo_labels, weighted_cross_entropy)


def shared_toy_stats(tmp_path_factory):
    """toy-synth's per-image class statistics for RCS, computed once per session in-process and shared
    by the subprocess runs (--stats-cache), so no run spends time (or random draws) computing them."""
    path = tmp_path_factory.getbasetemp() / "class_stats_toy-synth_seed0.json"
    if not path.exists():
        dataset = datasets.build_dataset("toy-synth", "train", datasets.TOY_SPACE, crop=(128, 64), augment=True,
                                         seed=0)
        samplers.class_statistics(dataset, datasets.TOY_SPACE.num_classes, str(path))
    return str(path)


@pytest.fixture(scope="session")
def toy_stats(tmp_path_factory):
    return shared_toy_stats(tmp_path_factory)


def make_method(method="daformer", extra=()):
    """The method on the tiny toy network, built as train.py builds it (parse_args, make_env)."""
    args = flags.parse_args(["--method", method, "--source", "toy-synth", "--out", "/tmp/unused", "--lr", "1e-3",
                             "--iters", "100", *extra])
    torch.manual_seed(0)
    space = datasets.TOY_SPACE
    model = models.build_model("tiny", space.num_classes).train()
    env = common.make_env("cpu", "off", space)
    return train.METHODS[method].Method(model, args, env), model


def toy_batch(seed=0, batch=2):
    source = datasets.build_dataset("toy-synth", "train", datasets.TOY_SPACE, crop=(128, 64), augment=True, seed=seed)
    target = datasets.build_dataset("toy-real", "train", datasets.TOY_SPACE, labeled=False, crop=(128, 64),
                                    augment=True, seed=seed)
    src = [source[(i, i)] for i in range(batch)]
    tgt = [target[(i, i)] for i in range(batch)]
    return ({"image": torch.stack([s["image"] for s in src]), "label": torch.stack([s["label"] for s in src])},
            {"image": torch.stack([t["image"] for t in tgt])})


def checkpoint_leaves(ckpt):
    """{path: value} of everything training produced in a last.pt (model, method state, scaler, iter);
    'args' (paths differ) and 'rng' (the global RNG, not a training stream) are left out."""
    leaves = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(f"{prefix}/{i}", item)
        else:
            leaves[prefix] = value

    for part in ("model", "method", "scaler", "iter"):
        walk(part, ckpt[part])
    return leaves


def assert_same_training_state(path_a, path_b):
    """Every tensor (weights, teacher, optimizer moments, bank, generator state) and every other value of
    two last.pt files is bit-identical."""
    a = checkpoint_leaves(common.load_checkpoint(str(path_a)))
    b = checkpoint_leaves(common.load_checkpoint(str(path_b)))
    assert a.keys() == b.keys()
    for key, value in a.items():
        if torch.is_tensor(value):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key
    assert any(k.startswith("method/generator") for k in a)


# ---------------------------------------------------------------- EMA teacher
def test_ema_update_hand_case():
    student, teacher = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, 2.0]])), student.bias.fill_(3.0)
        teacher.weight.copy_(torch.tensor([[5.0, 6.0]])), teacher.bias.fill_(7.0)
    assert ema_update(teacher, student, it=3, alpha=0.999) == pytest.approx(0.75)  # min(1 - 1/4, 0.999)
    assert torch.allclose(teacher.weight, torch.tensor([[0.75 * 5 + 0.25 * 1, 0.75 * 6 + 0.25 * 2]]))
    assert torch.allclose(teacher.bias, torch.tensor([0.75 * 7 + 0.25 * 3]))
    assert ema_update(teacher, student, it=100000, alpha=0.999) == pytest.approx(0.999)  # capped
    ema_update(teacher, student, it=0, alpha=0.999)  # a_0 = 0: the teacher becomes the student
    assert torch.equal(teacher.weight, student.weight) and torch.equal(teacher.bias, student.bias)


def test_teacher_gets_no_gradient_and_is_the_pre_step_student_at_iteration_0():
    method, model = make_method()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source, target = toy_batch()
    terms = method.train_step(source, target, 0)
    assert set(terms) == {"src", "fd", "mix", "pl_quality"} and all(torch.isfinite(v) for v in terms.values())
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert all(p.grad is None for p in method.fd_model.parameters())
    for name, p in method.teacher.named_parameters():  # a_0 = 0: the student before this step
        assert torch.equal(p, before[name]), name
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # the student moved
    assert method.teacher.training and not method.fd_model.training


def test_teacher_has_dropout_and_drop_path_off_but_stays_in_train_mode():
    model = models.build_model("mit-b0", 19).train()
    teacher = daformer.build_teacher(model)  # the method's teacher: a copy with them off
    daformer.disable_stochastic_layers(model)  # the helper, in place
    for module in (model, teacher):
        stochastic = [m for m in module.modules()
                      if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ == "DropPath"]
        assert len(stochastic) > 8 and not any(m.training for m in stochastic)
        assert module.training and all(m.training for m in module.modules() if isinstance(m, nn.BatchNorm2d))


def test_zero_fd_weight_builds_no_frozen_network_and_logs_no_fd_term():
    method, _ = make_method(extra=["--daformer-lambda-fd", "0"])
    assert method.fd_model is None
    terms = method.train_step(*toy_batch(), 0)
    assert set(terms) == {"src", "mix", "pl_quality"}


@pytest.mark.parametrize("method_name, extra", [("daformer", []), ("dida", ["--dida-lambda-ins", "0"])])
def test_zero_mix_weight_is_the_supervised_update_alone(method_name, extra):
    """--daformer-lambda-mix 0 (DIDA: with --dida-lambda-ins 0): no teacher forward, no ClassMix or
    augmentation draw, no mix term logged, and the student's gradient is that of L_src + lambda_fd L_fd."""
    method, model = make_method(method_name, ["--daformer-lambda-mix", "0", *extra])
    start = copy.deepcopy(model)  # the student before the step, for the gradient by hand
    teacher_buffers = {k: v.clone() for k, v in method.teacher.named_buffers()}
    generator = method.generator.get_state().clone()
    source, target = toy_batch()
    terms = method.train_step(source, target, 0)
    assert set(terms) == {"src", "fd"} | ({"bank_filled"} if method_name == "dida" else set())
    assert torch.equal(method.generator.get_state(), generator)
    for name, value in method.teacher.named_buffers():  # BN statistics move only in a teacher forward
        assert torch.equal(value, teacher_buffers[name]), name
    xs, ys, args = source["image"], source["label"], method.args
    _, logits, encoder = start(xs, with_encoder=True)
    things = fd_mask(ys, encoder.shape[-2:], method.thing_indices, args.daformer_fd_min_ratio, method.num_classes)
    supervised = (weighted_cross_entropy(common.upsample(logits, ys.shape[-2:], args.align_corners), ys)
                  + args.daformer_lambda_fd * feature_distance(encoder, method.fd_model.encoder_features(xs), things))
    supervised.backward()
    for (name, p), q in zip(model.named_parameters(), start.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-9), name


# ---------------------------------------------------------------- losses and pseudo-labels
def test_weighted_cross_entropy_divides_by_all_pixels():
    logits = torch.zeros(1, 4, 2, 2)  # CE = log 4 everywhere
    labels = torch.tensor([[[0, 1], [255, 255]]])
    assert weighted_cross_entropy(logits, labels).item() == pytest.approx(math.log(4) * 2 / 4)
    weight = torch.tensor([[[0.5, 0.0], [1.0, 1.0]]])
    assert weighted_cross_entropy(logits, labels, weight).item() == pytest.approx(math.log(4) * 0.5 / 4)


def test_pseudo_labels_quality_and_ignored_rows():
    probs = torch.full((2, 3, 6, 4), 0.1)
    probs[:, 2] = 0.8
    probs[0, :, 0, 0] = torch.tensor([0.98, 0.01, 0.01])  # one confident pixel of 48
    labels, weight, quality = pseudo_labels(probs, 0.968, ignore_top=1, ignore_bottom=2)
    assert labels[0, 0, 0] == 0 and (labels.flatten()[1:] == 2).all()
    assert quality.item() == pytest.approx(1 / 48)
    assert (weight[:, :1] == 0).all() and (weight[:, -2:] == 0).all()
    assert torch.allclose(weight[:, 1:4], torch.full_like(weight[:, 1:4], 1 / 48))
    with pytest.raises(common.UserError):
        pseudo_labels(probs, 0.968, ignore_top=3, ignore_bottom=3)


def test_ignored_rows_default_to_cityscapes_rows_only_for_a_cityscapes_target():
    toy = flags.parse_args(["--method", "daformer", "--out", "/tmp/unused"])
    real = flags.parse_args(["--method", "daformer", "--source", "gta5", "--out", "/tmp/unused"])
    given = flags.parse_args(["--method", "daformer", "--source", "gta5", "--out", "/tmp/unused",
                              "--daformer-pseudo-ignore-top", "3", "--daformer-pseudo-ignore-bottom", "0"])
    assert daformer.ignored_rows(toy) == (0, 0)
    assert daformer.ignored_rows(real) == (15, 120)
    assert daformer.ignored_rows(given) == (3, 0)


def test_class_mix_masks_labels_and_weights_against_a_loop():
    torch.manual_seed(1)
    ys = torch.randint(0, 5, (3, 6, 7))
    ys[0, 0, :3] = 255  # DACS counts 255 among the batch's classes
    yhat = torch.randint(0, 5, (3, 6, 7))
    w = torch.rand(3, 6, 7)
    rng_before = torch.get_rng_state()
    mask = class_mix_masks(ys, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's generator only
    ym, wm = mix(mask, ys, yhat), mix(mask, torch.ones_like(w), w)
    generator = torch.Generator().manual_seed(7)  # the same draws, per pixel
    classes = sorted(set(ys.flatten().tolist()))
    n = len(classes)
    for b in range(3):
        chosen = {classes[i] for i in torch.randperm(n, generator=generator)[: math.ceil(n / 2)].tolist()}
        for i in range(6):
            for j in range(7):
                pasted = ys[b, i, j].item() in chosen
                assert mask[b, i, j].item() == pasted
                assert ym[b, i, j].item() == (ys[b, i, j].item() if pasted else yhat[b, i, j].item())
                assert wm[b, i, j].item() == pytest.approx(1.0 if pasted else w[b, i, j].item())
    images = mix(mask, torch.ones(3, 3, 6, 7), torch.zeros(3, 3, 6, 7))
    assert torch.equal(images, mask[:, None].expand(3, 3, 6, 7).float())


def test_downscale_label_ratio_and_fd_mask_on_a_hand_label():
    # 4x4 label, factor 2: cells [[car 4/4, mixed 2 car + 2 road], [255 x3 + person, person 3/4]]
    label = torch.tensor([[[13, 13, 13, 0],
                           [13, 13, 13, 0],
                           [255, 255, 11, 11],
                           [255, 11, 11, 0]]])
    small = downscale_label_ratio(label, 2, 0.75, 19)
    assert small.tolist() == [[[13, 255], [255, 11]]]  # 2/4 < 0.75 -> 255; 255 wins 3/4 -> 255
    things = torch.tensor([11, 13])
    assert fd_mask(label, (2, 2), things, 0.75, 19).tolist() == [[[True, False], [False, True]]]
    assert fd_mask(label, (2, 2), torch.tensor([11]), 0.75, 19).tolist() == [[[False, False], [False, True]]]


def test_feature_distance_mean_over_mask_and_empty_mask_is_zero_not_nan():
    student = torch.zeros(1, 2, 2, 2, requires_grad=True)
    frozen = torch.zeros(1, 2, 2, 2)
    frozen[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # distance 5 at (0, 0), 0 elsewhere
    mask = torch.tensor([[[True, True], [False, False]]])
    assert feature_distance(student, frozen, mask).item() == pytest.approx(2.5)
    empty = feature_distance(student, frozen, torch.zeros_like(mask))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


# ---------------------------------------------------------------- DACS strong augmentation (uda/augment.py)
def test_dacs_color_jitter_identity_factors_and_full_turn_hue():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8)
    one, zero = torch.ones(2), torch.zeros(2)
    for order in ([0, 1, 2, 3], [3, 2, 1, 0]):
        same = augment.dacs_color_jitter(images, zero, one, one, zero, [order, order])
        assert torch.allclose(same, images, atol=1e-5)
    turned = augment.dacs_color_jitter(images, zero, one, one, one, [[3], [3]])  # hue +1 turn
    assert torch.allclose(turned, images, atol=1e-5)
    half = augment.dacs_color_jitter(images, zero, one, one, torch.full((2,), 0.5), [[3], [3]])
    assert not torch.allclose(half, images, atol=1e-2)  # the hue path does act
    bright = augment.dacs_color_jitter(images, torch.full((2,), 2.0), one, one, zero, [[0], [0]])
    assert torch.equal(bright, torch.ones_like(images))  # additive brightness, clipped


def test_dacs_blur_preserves_constants_matches_a_2d_convolution_and_kernel_sizes():
    assert augment.dacs_blur_kernel_size(512) == 51 and augment.dacs_blur_kernel_size(64) == 7
    constant = torch.full((2, 3, 64, 128), 0.37)
    kernel = (augment.dacs_blur_kernel_size(64), augment.dacs_blur_kernel_size(128))
    assert torch.allclose(augment.gaussian_blur(constant, kernel, torch.tensor([0.3, 1.1])), constant, atol=1e-6)
    torch.manual_seed(0)
    image = torch.rand(1, 3, 20, 30)
    sigma = 0.9
    ky, kx = augment.dacs_blur_kernel_size(20), augment.dacs_blur_kernel_size(30)
    blurred = augment.gaussian_blur(image, (ky, kx), torch.tensor([sigma]))
    gy = torch.exp(-(torch.arange(ky) - ky // 2).float() ** 2 / (2 * sigma ** 2))
    gx = torch.exp(-(torch.arange(kx) - kx // 2).float() ** 2 / (2 * sigma ** 2))
    full = torch.outer(gy / gy.sum(), gx / gx.sum())  # (ky, kx), the full 2-D kernel
    padded = F.pad(image, (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect")
    reference = F.conv2d(padded, full.expand(3, 1, ky, kx), groups=3)
    assert torch.allclose(blurred, reference, atol=1e-5)


def test_dacs_strong_augment_keeps_range_and_shape():
    torch.manual_seed(3)
    images = torch.rand(2, 3, 16, 32)
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        out = augment.dacs_strong_augment(images, 0.2, 1.0, 0.0, generator)  # jitter clips to [0, 1] exactly
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
        out = augment.dacs_strong_augment(images, 0.2, 1.0, 1.0, generator)
        # the blur's taps sum to 1 up to fp32 rounding: a pixel at 1 may come out one ulp above
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1 + 1e-6


# ---------------------------------------------------------------- randomness
def test_train_step_draws_only_from_the_method_generator_which_state_dict_restores():
    method, _ = make_method()
    source, target = toy_batch()
    state = method.state_dict()["generator"].clone()
    rng_before = torch.get_rng_state()
    method.train_step(source, target, 0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the tiny network has no dropout: nothing global
    assert not torch.equal(method.generator.get_state(), state)
    other, _ = make_method()
    other.load_state_dict(method.state_dict())
    assert torch.equal(other.generator.get_state(), method.generator.get_state())
    assert torch.equal(make_method()[0].generator.get_state(), state)  # seeded from --seed alone


# ---------------------------------------------------------------- recipe and flags
def test_adamw_groups_and_daformer_recipe():
    method, model = make_method()
    args = method.args
    assert (args.weight_decay, args.poly_power, args.warmup_iters, args.batch_size) == (0.01, 1.0, 1500, 2)
    assert isinstance(method.optimizer, torch.optim.AdamW)
    base = [g["base_lr"] for g in method.optimizer.param_groups]
    assert base == [1e-3, 1e-2]  # backbone, head x10
    assert daformer.RECIPE == {"lr": 6e-5, "head_lr_mult": 10.0, "weight_decay": 0.01, "poly_power": 1.0,
                               "warmup_iters": 1500, "iters": 40000, "batch_size": 2, "source_sampler": "rcs",
                               "cat_max_ratio": 0.75, "synthia_classes": 19, "crop": "512x512",
                               "backbone": "mit-b5", "align_corners": False}
    default = flags.parse_args(["--method", "daformer", "--out", "/tmp/unused"])
    assert default.lr == 6e-5 and default.head_lr_mult == 10 and default.iters == 40000
    assert default.crop is None and default.backbone == "tiny"  # real-data entries skip the toy
    assert method.ignore_top == 0 and method.ignore_bottom == 0  # toy target: no Cityscapes rows
    real = flags.parse_args(["--method", "dida", "--source", "synthia", "--out", "/tmp/unused"])
    assert (real.synthia_classes, real.cat_max_ratio, real.source_sampler) == (19, 0.75, "rcs")
    assert (real.crop, real.backbone, real.align_corners) == ("512x512", "mit-b5", False)


def assert_never_writes_args(method):
    """Building the method and one step leave every flag as parsed (real data: DAFormer once set --crop)."""
    args = flags.parse_args(["--method", method, "--source", "gta5", "--out", "/tmp/unused", "--iters", "100",
                             "--daformer-pseudo-ignore-top", "0", "--daformer-pseudo-ignore-bottom", "0"])
    before = copy.deepcopy(vars(args))
    torch.manual_seed(0)
    model = models.build_model("tiny", datasets.TOY_SPACE.num_classes).train()
    instance = train.METHODS[method].Method(model, args, common.make_env("cpu", "off", datasets.TOY_SPACE))
    instance.train_step(*toy_batch(), 0)
    assert vars(args) == before


def test_daformer_never_writes_args():
    assert_never_writes_args("daformer")


def test_rcs_probabilities_against_the_formula():
    """RCS is the data loader's sampler (uda/samplers.py); DAFormer switches it on by default."""
    counts = torch.tensor([[5000, 100, 0, 4000], [3000, 3500, 0, 0], [9000, 0, 0, 200]])  # (N images, C)
    classes, probs, files_of = samplers.rcs_probabilities(counts.numpy(), 0.01, 3000)
    freq = counts.sum(0).double() / counts.sum()
    expected = torch.softmax((1 - freq[[0, 1, 3]]) / 0.01, 0)  # class 2 has no pixels at all
    assert classes == [0, 1, 3]
    assert torch.allclose(torch.as_tensor(probs), expected, atol=1e-12)
    assert files_of[0].tolist() == [0, 2] and files_of[1].tolist() == [1] and files_of[3].tolist() == [0]
    assert flags.parse_args(["--method", "daformer", "--out", "/tmp/unused"]).source_sampler == "rcs"


# ---------------------------------------------------------------- end to end
@pytest.mark.slow
def test_smoke_run_exact_resume_and_independence_from_eval_every(tmp_path, toy_stats):
    """The uninterrupted run is the smoke run. 3 + 3 iterations through a checkpoint (iteration 3 is no
    evaluation point of the uninterrupted run) and a run evaluating every 2 iterations must end with
    bit-identical weights, teacher, optimizer and generator."""
    common_args = ["--method", "daformer", "--source", "toy-synth", *TOY_FAST, "--warmup-iters", "2",
                   "--stats-cache", toy_stats]
    straight = run_script("train.py", *common_args, "--out", tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert "loss" not in straight.stderr
    assert "mix" in straight.stdout and "fd" in straight.stdout and "eval iter 6" in straight.stdout
    assert "eval iter 3" not in straight.stdout
    first = run_script("train.py", *common_args, "--out", tmp_path / "b", "--stop-iter", "3")
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_script("train.py", *common_args, "--out", tmp_path / "b", "--resume", tmp_path / "b" / "last.pt")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    evaluating = run_script("train.py", *common_args, "--out", tmp_path / "c", "--eval-every", "2")
    assert evaluating.returncode == 0, evaluating.stderr[-2000:]
    assert "eval iter 2" in evaluating.stdout and "eval iter 4" in evaluating.stdout
    assert_same_training_state(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    assert_same_training_state(tmp_path / "a" / "last.pt", tmp_path / "c" / "last.pt")
