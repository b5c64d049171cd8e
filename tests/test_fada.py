"""FADA (uda/fada.py) and the self-training stage (uda/selftrain.py): losses, order of one iteration,
discriminator layout, stop-gradients, AMP, recipes and imports, and train.py runs on the toy (smoke,
exact resume)."""
import ast
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

import train
from conftest import REPO, TOY_FAST, run_script
from uda import augment, common, datasets, fada, flags, selftrain
from uda.common import UserError


# --------------------------------------------------------------------------------------------------
# Pure losses
# --------------------------------------------------------------------------------------------------
def test_soft_cross_entropy_matches_loop():
    torch.manual_seed(0)
    d = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    y = torch.rand(2, 6, 3, 4, dtype=torch.float64)
    total = 0.0
    for b in range(2):
        for i in range(3):
            for j in range(4):
                logits = [d[b, c, i, j].item() for c in range(6)]
                log_z = math.log(sum(math.exp(v) for v in logits))
                total += -sum(y[b, c, i, j].item() * (logits[c] - log_z) for c in range(6))
    assert fada.soft_cross_entropy(d, y).item() == pytest.approx(total / (2 * 3 * 4), rel=1e-6)


@pytest.mark.parametrize("domain", [0, 1])
def test_domain_cross_entropy_equals_concatenated_target(domain):
    torch.manual_seed(1)
    d = torch.randn(2, 8, 5, 5)
    a = torch.rand(2, 4, 5, 5)
    zeros = torch.zeros_like(a)
    joint = torch.cat([a, zeros] if domain == 0 else [zeros, a], dim=1)
    assert torch.allclose(fada.domain_cross_entropy(d, a, domain), fada.soft_cross_entropy(d, joint), atol=1e-6)


def test_soft_cross_entropy_uniform_logits_is_log_channels():
    d = torch.zeros(1, 6, 2, 2)
    y = torch.zeros(1, 6, 2, 2)
    y[:, 0] = 1.0
    assert fada.soft_cross_entropy(d, y).item() == pytest.approx(math.log(6), rel=1e-6)


def test_encoding_temperature_clamp_no_renormalisation():
    temperature = 1.8
    probs = torch.tensor([0.95, 0.04, 0.01])
    logits = (temperature * probs.log()).view(1, 3, 1, 1)  # softmax(logits / T) == probs
    a = fada.domain_encoding(logits, temperature, cap=0.9).view(3)
    assert torch.allclose(a, torch.tensor([0.9, 0.04, 0.01]), atol=1e-6)   # clamped at the cap
    assert a.sum().item() == pytest.approx(0.95, abs=1e-6)                  # and NOT renormalised
    # the temperature divides the logits: [2, 0, 0] at T = 2 is softmax([1, 0, 0])
    a2 = fada.domain_encoding(torch.tensor([2.0, 0.0, 0.0]).view(1, 3, 1, 1), 2.0, cap=1.0).view(3)
    assert torch.allclose(a2, torch.softmax(torch.tensor([1.0, 0.0, 0.0]), 0), atol=1e-6)


def test_no_gradient_reaches_logits_through_encodings():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    features = torch.randn(2, 5, 4, 4, requires_grad=True)
    a = fada.domain_encoding(logits, 1.8, 0.9)
    assert not a.requires_grad
    d = fada.PixelDiscriminator(5, 3, width=8)
    fada.domain_cross_entropy(d(features), a, domain=0).backward()
    assert logits.grad is None and features.grad is not None


def test_segmentation_loss_uses_temperature_and_ignores_255():
    logits = torch.tensor([3.6, 0.0]).view(1, 2, 1, 1).expand(1, 2, 1, 2).clone()
    labels = torch.tensor([[[0, 255]]])
    expected = -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0]  # 3.6 / 1.8 = 2
    assert fada.segmentation_loss(logits, labels, 1.8).item() == pytest.approx(expected.item(), rel=1e-6)
    all_ignored = fada.segmentation_loss(logits, torch.full((1, 1, 2), 255), 1.8)
    assert all_ignored.item() == 0.0


# --------------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------------
def test_discriminator_output_layout_2k_channels():
    d = fada.PixelDiscriminator(4, 3, width=8)
    with torch.no_grad():
        for head, bias in ((d.source_head, [1.0, 2.0, 3.0]), (d.target_head, [10.0, 20.0, 30.0])):
            head.weight.zero_()
            head.bias.copy_(torch.tensor(bias))
    out = d(torch.randn(2, 4, 3, 5))
    assert out.shape == (2, 6, 3, 5)
    assert torch.equal(out[0, :, 1, 2], torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0]))  # source k, then target k
    up = d(torch.randn(2, 4, 3, 5), size=(12, 20))
    assert up.shape == (2, 6, 12, 20) and torch.allclose(up[1, :, 7, 11], out[0, :, 1, 2])


def test_discriminator_size_matches_official():
    d = fada.PixelDiscriminator(2048, 19, width=256)
    assert sum(p.numel() for p in d.parameters()) == 5_057_702  # ~5.06M, the official R101 / K=19 count


# --------------------------------------------------------------------------------------------------
# One iteration
# --------------------------------------------------------------------------------------------------
def make_fada(tmp_path, *extra):
    """FADA on the toy network with trainable BN (not RECIPE's frozen BN), so BN buffers can be checked too."""
    args = flags.parse_args(["--method", "fada", "--out", str(tmp_path), "--lr", "0.01", "--bn", "train",
                             "--fada-color-jitter", "0", "0", "0", "0", *extra])
    space = datasets.label_space(args.source, args)
    torch.manual_seed(0)
    model = train.build_model(args, space, torch.device("cpu"))
    return fada.FADA(model, args, common.make_env("cpu", args.amp, space)), args


def toy_batches(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    source = {"image": torch.rand(batch, 3, 32, 64, generator=g),
              "label": torch.randint(0, 19, (batch, 32, 64), generator=g)}
    source["label"][:, :4] = 255
    target = {"image": torch.rand(batch, 3, 32, 64, generator=g)}
    return source, target


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_generator_step_leaves_discriminator_and_discriminator_step_leaves_network(tmp_path):
    method, _ = make_fada(tmp_path)
    source, target = toy_batches()
    d_before, net_before = snapshot(method.discriminator), snapshot(method.model)
    out = method.generator_step(source, target)
    assert same(d_before, snapshot(method.discriminator))
    assert all(p.grad is None for p in method.discriminator.parameters())  # not even computed
    assert not same(net_before, snapshot(method.model))
    net_after_g = snapshot(method.model)
    method.discriminator_step(*out[:4])
    assert same(net_after_g, snapshot(method.model))  # parameters AND BN buffers untouched
    assert not same(d_before, snapshot(method.discriminator))


def official_iteration(model, disc, opt, d_opt, source, target, temperature=1.8, cap=0.9):
    """FADA's train_adv.py loop body, transcribed literally (two softmaxes, in-place clamp, concatenated targets)."""
    def soft_ce(pred, soft):
        return torch.mean(torch.sum(-soft.float() * F.log_softmax(pred, dim=1), dim=1))

    opt.zero_grad()
    d_opt.zero_grad()
    size_s, size_t = source["image"].shape[-2:], target["image"].shape[-2:]
    src_fea, src_pred = model(source["image"])
    src_pred = F.interpolate(src_pred, size=size_s, mode="bilinear", align_corners=True).div(temperature)
    F.cross_entropy(src_pred, source["label"], ignore_index=255).backward()
    src_soft = F.softmax(src_pred, dim=1).detach()
    src_soft[src_soft > cap] = cap
    tgt_fea, tgt_pred = model(target["image"])
    tgt_pred = F.interpolate(tgt_pred, size=size_t, mode="bilinear", align_corners=True).div(temperature)
    tgt_soft = F.softmax(tgt_pred, dim=1).detach()
    tgt_soft[tgt_soft > cap] = cap
    (0.001 * soft_ce(disc(tgt_fea, size_t), torch.cat((tgt_soft, torch.zeros_like(tgt_soft)), 1))).backward()
    opt.step()
    d_opt.zero_grad()
    (0.5 * soft_ce(disc(src_fea.detach(), size_s), torch.cat((src_soft, torch.zeros_like(src_soft)), 1))).backward()
    (0.5 * soft_ce(disc(tgt_fea.detach(), size_t), torch.cat((torch.zeros_like(tgt_soft), tgt_soft), 1))).backward()
    d_opt.step()


@pytest.mark.parametrize("jitter", [("0", "0", "0", "0"), ("0.5", "0.5", "0.5", "0.2")])
def test_train_step_matches_official_loop(tmp_path, jitter):
    """The official loop gets the source images our jitter produced (the official jitter is in its loader)."""
    method, args = make_fada(tmp_path, "--fada-color-jitter", *jitter)
    assert args.align_corners  # the official classifier's upsampling, from RECIPE
    model, disc = copy.deepcopy(method.model), copy.deepcopy(method.discriminator)
    opt = common.sgd(model.param_groups(args.head_lr_mult), args.lr, args.momentum, args.weight_decay)
    d_opt = common.adam(disc.parameters(), args.fada_d_lr, tuple(args.fada_d_betas))
    amounts = [float(a) for a in jitter]
    for it in range(2):
        source, target = toy_batches(seed=it)
        generator = torch.Generator().set_state(method.rng.get_state())
        jittered = dict(source, image=augment.color_jitter(source["image"], *amounts, generator))
        method.train_step(source, target, it)
        official_iteration(model, disc, opt, d_opt, jittered if any(amounts) else source, target)
    for ours, ref in ((method.model, model), (method.discriminator, disc)):
        a, b = snapshot(ours), snapshot(ref)
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a), "parameters diverged"


def test_zero_adversarial_weight_skips_the_discriminator_and_changes_no_network_weight(tmp_path):
    results = {}
    for weight in ("0", "1e-30"):
        method, _ = make_fada(tmp_path, "--fada-lambda-adv", weight)
        initial_d = snapshot(method.discriminator)
        source, target = toy_batches()
        logged = method.train_step(source, target, 0)
        results[weight] = (logged, snapshot(method.model), initial_d, snapshot(method.discriminator))
    off, on = results["0"], results["1e-30"]
    assert set(off[0]) == {"seg"} and {"seg", "adv", "d_src", "d_tgt"} <= set(on[0])
    assert off[0]["seg"] == on[0]["seg"]
    assert all(torch.allclose(off[1][k].float(), v.float(), atol=1e-6) for k, v in on[1].items())
    assert all(torch.equal(off[2][k], v) for k, v in off[3].items()), "D trained at weight 0"
    assert not all(torch.equal(on[2][k], v) for k, v in on[3].items()), "D not trained at weight 1e-30"


def test_bad_method_flags_are_one_line_errors(tmp_path):
    for flags, name in ((("--fada-color-jitter", "0", "0", "0", "0.6"), "--fada-color-jitter"),
                        (("--fada-encoding-cap", "1.5"), "--fada-encoding-cap"),
                        (("--fada-d-width", "1"), "--fada-d-width")):
        with pytest.raises(UserError) as err:
            make_fada(tmp_path, *flags)
        assert name in str(err.value) and "\n" not in str(err.value)


def test_bf16_step_on_cpu_close_to_fp32(tmp_path):
    results = {}
    for amp in ("off", "bf16"):
        method, _ = make_fada(tmp_path, "--amp", amp)
        source, target = toy_batches()
        results[amp] = method.train_step(source, target, 0)
    for name, value in results["bf16"].items():
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert value.item() == pytest.approx(results["off"][name].item(), rel=0.05), name


# --------------------------------------------------------------------------------------------------
# Self-training augmentation (colour jitter: tests/test_augment.py)
# --------------------------------------------------------------------------------------------------
def test_scale_crop_flip_keeps_pairs_aligned():
    labels = torch.arange(4 * 8).view(1, 4, 8) % 19  # distinct values per column
    images = (labels.float() / 18.0).view(1, 1, 4, 8).expand(1, 3, 4, 8).contiguous()
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        img, lab = selftrain.scale_crop_flip(images, labels, (1.0, 1.0), (4, 2), 0.5, g)
        assert img.shape == (1, 3, 2, 4) and lab.shape == (1, 2, 4)
        assert torch.allclose(img[0, 0], lab[0].float() / 18.0, atol=1e-5)  # image follows the label
    small, small_lab = selftrain.scale_crop_flip(images, labels, (0.5, 0.5), (8, 4), 0.0, g)
    assert small.shape == (1, 3, 4, 8) and (small_lab[0, 2:, :] == 255).all()  # padded with ignore


# --------------------------------------------------------------------------------------------------
# Recipes and imports
# --------------------------------------------------------------------------------------------------
def test_recipes_are_the_official_values_and_apply_as_defaults():
    args = flags.parse_args(["--method", "fada", "--out", "-", "--source", "gta5"])
    assert (args.lr, args.head_lr_mult, args.iters, args.stop_iter, args.batch_size) == (2.5e-4, 10.0, 62500, 40000, 4)
    assert args.align_corners and args.source_sampler == "class-balanced" and args.bn == "frozen"
    args = flags.parse_args(["--method", "selftrain", "--out", "-", "--source", "cityscapes"])
    assert (args.lr, args.iters, args.stop_iter, args.batch_size, args.bn) == (5e-4, 31250, 20000, 8, "train")
    assert args.align_corners and args.crop == "2048x1024"
    toy, toy_run = flags.parse(["--method", "selftrain", "--out", "-"])
    assert toy.crop is None and "crop" not in toy_run.recipe  # real-data sizes do not apply to the toy
    explicit, run = flags.parse(["--method", "fada", "--out", "-", "--lr", "0.01", "--no-align-corners"])
    assert explicit.lr == 0.01 and not explicit.align_corners and run.overridden == ["align_corners", "lr"]


@pytest.mark.parametrize("name", ["fada", "selftrain"])
def test_method_files_import_only_torch_common_augment_source_only(name):
    with open(os.path.join(REPO, "uda", f"{name}.py")) as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {node.module} if node.module != "uda" else {f"uda.{a.name}" for a in node.names}
    allowed = {"torch", "torch.nn", "torch.nn.functional", "uda.common", "uda.augment", "uda.source_only"}
    assert imported <= allowed, imported - allowed


# --------------------------------------------------------------------------------------------------
# train.py runs on the toy
# --------------------------------------------------------------------------------------------------
def tensors(obj, prefix=""):
    """Every tensor of a nested checkpoint (dicts, lists, tuples), by path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    found = {}
    for key, value in items:
        found.update(tensors(value, f"{prefix}/{key}"))
    return found


@pytest.mark.slow
def test_train_fada_smoke_and_resume_is_exact(tmp_path):
    """Split at iteration 3, between the evaluations at 2 and 4, and with loader workers in the split run
    only: every tensor of last.pt (trainable BN buffers included) must agree with the straight run's."""
    flags = [*TOY_FAST, "--iters", "5", "--stop-iter", "5", "--eval-every", "2", "--bn", "train"]
    straight = run_script("train.py", "--method", "fada", "--out", tmp_path / "a", *flags)
    assert straight.returncode == 0, straight.stderr
    assert all(term in straight.stdout for term in ("seg", "adv", "d_src", "d_tgt", "mIoU"))
    assert "recipe of fada" in straight.stdout
    split = [*flags, "--workers", "2"]
    first = run_script("train.py", "--method", "fada", "--out", tmp_path / "b", *split, "--stop-iter", "3")
    assert first.returncode == 0, first.stderr
    resumed = run_script("train.py", "--method", "fada", "--out", tmp_path / "b", *split,
                         "--resume", tmp_path / "b" / "last.pt")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert a["iter"] == b["iter"] == 5
    ta, tb = tensors({k: a[k] for k in a if k != "args"}), tensors({k: b[k] for k in b if k != "args"})
    assert ta.keys() == tb.keys()
    floats = [k for k in ta if ta[k].is_floating_point()]
    assert any(k.endswith("running_mean") for k in floats) and any(k.startswith("/method/discriminator/") for k in floats)
    assert any(k.startswith("/method/d_optimizer/state/") for k in floats) and "/method/generator" in ta
    assert not [k for k in ta if not torch.equal(ta[k], tb[k])]


@pytest.mark.slow
def test_selftrain_needs_pseudo_dir(tmp_path):
    result = run_script("train.py", "--method", "selftrain", "--out", tmp_path / "run", *TOY_FAST,
                        "--stop-iter", "6", "--selftrain-crop", "64x32")
    assert result.returncode == 2 and "--pseudo-dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_selftrain_step_trains_on_augmented_crops(tmp_path):
    args = flags.parse_args(["--method", "selftrain", "--out", str(tmp_path), "--lr", "0.01",
                             "--selftrain-crop", "64x32", "--pseudo-dir", str(tmp_path)])
    space = datasets.label_space("toy-synth")
    torch.manual_seed(0)
    model = train.build_model(args, space, torch.device("cpu"))
    method = selftrain.SelfTrain(model, args, common.make_env("cpu", "off", space))
    source, _ = toy_batches()
    state = method.state_dict()
    images, labels = method.augment(source["image"], source["label"])
    assert images.shape == (2, 3, 32, 64) and labels.shape == (2, 32, 64)
    method.load_state_dict(state)
    again, _ = method.augment(source["image"], source["label"])
    assert torch.equal(images, again)  # the generator is in the checkpoint: a resumed run sees the same crops
    moved_on, _ = method.augment(source["image"], source["label"])
    assert not torch.equal(images, moved_on)
    before = snapshot(model)
    losses = method.train_step(source, None, 0)
    assert list(losses) == ["ce"] and torch.isfinite(losses["ce"]) and not same(before, snapshot(model))
