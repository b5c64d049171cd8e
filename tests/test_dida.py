"""DIDA: bank statistics, both instance-loss modes against per-pixel loops, the stride-4 similarity,
cross-level interaction, the method's own random generator, DAFormer's exact step under DIDA's control
flags, a smoke run with exact resume independent of --eval-every, and fp32 similarities under autocast."""
import math

import pytest
import torch

from conftest import TOY_FAST, run_script
from test_daformer import assert_never_writes_args, assert_same_training_state, make_method, shared_toy_stats, toy_batch
from uda import common, daformer, dida
from uda.dida import (InstanceBank, bank_similarity, class_sums, gather_probs, released_instance_loss,
                      simmatch_instance_loss, upsample_adjoint)


@pytest.fixture(scope="session")
def toy_stats(tmp_path_factory):
    return shared_toy_stats(tmp_path_factory)


def random_labels(shape, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.2] = 255
    return labels


# ---------------------------------------------------------------- similarities and statistics
def test_stride4_similarity_equals_full_resolution_similarity():
    torch.manual_seed(0)
    features, bank = torch.rand(2, 8, 4, 6), torch.rand(5, 8)
    full = torch.einsum("bdhw,kd->bhwk", common.upsample(features, (16, 24), False), bank)  # (B, H, W, K)
    assert torch.allclose(bank_similarity(features, bank, (16, 24), False), full, atol=1e-5)
    corners = torch.einsum("bdhw,kd->bhwk", common.upsample(features, (16, 24), True), bank)
    assert torch.allclose(bank_similarity(features, bank, (16, 24), True), corners, atol=1e-5)


def test_similarity_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    features, bank = torch.rand(2, 8, 4, 6) * 30, torch.rand(5, 8) * 30
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim = bank_similarity(features.bfloat16(), bank, (8, 12), False)
    assert sim.dtype == torch.float32
    reference = bank_similarity(features.bfloat16().float(), bank, (8, 12), False)
    assert torch.allclose(sim, reference, rtol=1e-5)


@pytest.mark.parametrize("align_corners", [False, True])
def test_upsample_adjoint_is_the_transpose(align_corners):
    torch.manual_seed(0)
    x, w = torch.rand(2, 3, 4, 5), torch.rand(2, 3, 16, 20)
    lhs = (common.upsample(x, (16, 20), align_corners) * w).sum()
    assert torch.allclose(lhs, (x * upsample_adjoint(w, (4, 5), align_corners)).sum(), rtol=1e-5)


def test_class_sums_against_brute_force_means():
    torch.manual_seed(0)
    features, labels = torch.rand(2, 6, 4, 8), random_labels((2, 16, 32), 5, seed=1)
    sums, counts = class_sums(features, labels, 7, False)
    up = common.upsample(features, (16, 32), False)  # (B, D, H, W)
    for b in range(2):
        for c in range(7):
            where = labels[b] == c
            assert counts[b, c].item() == where.sum().item()
            expected = up[b][:, where].sum(1) if where.any() else torch.zeros(6)
            assert torch.allclose(sums[b, c], expected, atol=1e-4)


def test_bank_fill_and_momentum_update_against_a_loop():
    bank = InstanceBank(size=7, dim=2, num_classes=3)  # labels 0,1,2,0,1,2,0
    assert bank.labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    means = torch.arange(3 * 3 * 2, dtype=torch.float32).view(3, 3, 2)  # (N images, C, D)
    present = torch.tensor([[True, False, True], [True, True, False], [True, False, False]])
    bank.fill(means, present)
    # class 0: images 0,1,2 -> slots 0,3,6; class 1: image 1 -> slot 1; class 2: image 0 -> slot 2
    assert bank.filled.tolist() == [True, True, True, True, False, False, True]
    for slot, (img, cls) in {0: (0, 0), 3: (1, 0), 6: (2, 0), 1: (1, 1), 2: (0, 2)}.items():
        assert torch.equal(bank.features[slot], means[img, cls])
    bank.fill(means[:1] + 100, torch.tensor([[True, True, True]]))  # class 0 full; 1 -> slot 4; 2 -> slot 5
    assert bank.filled.all() and torch.equal(bank.features[4], means[0, 1] + 100)
    before = bank.features.clone()
    mu = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    bank.momentum_update(mu, torch.tensor([True, False, True]), momentum=0.9)
    for k in range(7):
        c = bank.labels[k].item()
        expected = 0.9 * before[k] + 0.1 * mu[c] if c != 1 else before[k]  # absent class 1 unchanged
        assert torch.allclose(bank.features[k], expected)


def test_bank_update_inside_the_method_uses_batch_class_means():
    method, model = make_method("dida", ["--dida-bank-size", "38", "--dida-bank-interval", "1",
                                         "--dida-bank-momentum", "0.5"])
    torch.manual_seed(0)
    features, labels = torch.rand(2, 64, 8, 16), random_labels((2, 64, 128), 19, seed=3)
    method.update_bank(features, labels, it=0)  # fills 2 entries per class, then one momentum update
    up = common.upsample(features, (64, 128), False)
    for k in range(38):
        c, slot_rank = k % 19, k // 19  # image slot_rank filled this slot
        where_img = labels[slot_rank] == c
        where_all = labels == c
        per_image = up[slot_rank][:, where_img].mean(1)
        batch_mean = up.permute(1, 0, 2, 3)[:, where_all].mean(1)
        assert torch.allclose(method.bank.features[k], 0.5 * per_image + 0.5 * batch_mean, atol=1e-4)


# ---------------------------------------------------------------- instance losses against loops
def loop_released(sim_t, sim_s, logits, bank_labels):
    B, H, W, K = sim_t.shape
    total = 0.0
    for b in range(B):
        for i in range(H):
            for j in range(W):
                t = [sim_t[b, i, j, k].item() for k in range(K)]
                if logits is not None:
                    t = [max(t[k] * logits[b, bank_labels[k], i, j].item(), 0) for k in range(K)]
                zt = sum(t)
                q = [v / zt if zt > 0 else 0.0 for v in t]
                r = [sim_s[b, i, j, k].item() for k in range(K)]
                p = [v / sum(r) for v in r]
                total += sum(-q[k] * math.log(p[k] + 1e-10) for k in range(K))
    return total / (B * H * W)


@pytest.mark.parametrize("calibrate", [True, False])
def test_released_instance_loss_against_a_per_pixel_loop(calibrate):
    torch.manual_seed(0)
    sim_t, sim_s = torch.rand(2, 3, 4, 5) * 10, torch.rand(2, 3, 4, 5) * 10  # (B, H, W, K)
    bank_labels = torch.tensor([0, 1, 2, 0, 1])
    logits = torch.randn(2, 3, 3, 4) * 3 if calibrate else None  # negative logits: guarded targets
    got = released_instance_loss(sim_t, sim_s, logits, bank_labels)
    assert got.item() == pytest.approx(loop_released(sim_t, sim_s, logits, bank_labels), rel=1e-5)


def test_released_targets_stay_finite_with_negative_or_cancelling_logits():
    sim_t = torch.ones(1, 1, 1, 2)
    sim_s = torch.ones(1, 1, 1, 2, requires_grad=True)
    logits = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)  # official: q = (1, -1) / 0 -> inf
    loss = released_instance_loss(sim_t, sim_s, logits, torch.tensor([0, 1]))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(math.log(2), rel=1e-6)  # q = (1, 0)
    loss.backward()
    assert torch.isfinite(sim_s.grad).all()
    all_negative = released_instance_loss(sim_t, sim_s, -logits.abs(), torch.tensor([0, 1]))
    assert all_negative.item() == 0.0  # no positive evidence: the pixel contributes nothing


@pytest.mark.parametrize("calibrate", [True, False])
def test_simmatch_instance_loss_against_a_per_pixel_loop(calibrate):
    torch.manual_seed(0)
    sim_t, sim_s = torch.rand(2, 3, 4, 5) * 2 - 1, torch.rand(2, 3, 4, 5) * 2 - 1  # (B, H, W, K)
    bank_labels = torch.tensor([0, 1, 2, 0, 1])
    probs = torch.softmax(torch.randn(2, 3, 3, 4), 1) if calibrate else None
    valid = torch.rand(2, 3, 4) > 0.3
    T = 0.1
    got = simmatch_instance_loss(torch.softmax(sim_t / T, -1), sim_s / T, probs, bank_labels, valid)
    total, count = 0.0, 0
    for b in range(2):
        for i in range(3):
            for j in range(4):
                if not valid[b, i, j]:
                    continue
                qw = [math.exp(sim_t[b, i, j, k].item() / T) for k in range(5)]
                qw = [v / sum(qw) for v in qw]
                if probs is not None:
                    qw = [qw[k] * probs[b, bank_labels[k], i, j].item() for k in range(5)]
                    qw = [v / sum(qw) for v in qw]
                ps = [math.exp(sim_s[b, i, j, k].item() / T) for k in range(5)]
                total += sum(-qw[k] * math.log(ps[k] / sum(ps)) for k in range(5))
                count += 1
    assert got.item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("released", [True, False])
def test_gather_probs_against_a_loop(released):
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(1, 3, 2, 2), 1)
    dist = torch.softmax(torch.randn(1, 2, 2, 4), -1)  # (B, H, W, K)
    bank_labels = torch.tensor([2, 0, 2, 1])
    got = gather_probs(probs, dist, bank_labels, 0.9, released)
    for c in range(3):
        agg = sum(dist[0, :, :, k] for k in range(4) if bank_labels[k] == c)
        base = probs[0, c] if released else 0.9 * probs[0, c]
        assert torch.allclose(got[0, c], base + 0.1 * agg, atol=1e-6)
    assert torch.equal(gather_probs(probs, dist, bank_labels, 1.0, released), probs)


# ---------------------------------------------------------------- the method
@pytest.mark.parametrize("mode", ["simmatch", "released"])
def test_dida_step_gradients_and_no_teacher_gradient(mode):
    method, model = make_method("dida", ["--dida-mode", mode, "--dida-gather-alpha", "0.5"])
    source, target = toy_batch()
    terms = method.train_step(source, target, 0)
    assert set(terms) == {"src", "fd", "pl_quality", "mix", "ins", "bank_filled"}
    assert terms["ins"] > 0 and all(torch.isfinite(v) for v in terms.values())
    assert method.bank.filled.any() and not method.bank.filled.all()  # 9 toy classes of 19
    assert terms["bank_filled"] == method.bank.filled.float().mean()  # a logged value, not a loss
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    # the instance loss reaches the student: the same step without it (same draws) leaves other gradients
    without, _ = make_method("dida", ["--dida-mode", mode, "--dida-gather-alpha", "0.5", "--dida-lambda-ins", "0"])
    assert "ins" not in without.train_step(source, target, 0)  # weight 0: not computed, not logged
    with_ins = dict(method.model.backbone.named_parameters())
    assert any((p.grad - with_ins[name].grad).abs().sum() > 0
               for name, p in without.model.backbone.named_parameters())


# The flags that switch DIDA's ideas off: no instance loss, no gathering, DAFormer's clean teacher view
CONTROLS = ["--dida-lambda-ins", "0", "--dida-gather-alpha", "1", "--dida-weak-view", "clean"]


def test_dida_with_its_controls_takes_exactly_daformers_step():
    """DIDA copies DAFormer's iteration; with its ideas switched off it must be DAFormer, bit for bit
    (the toy benchmark's "DIDA's control = DAFormer" relies on it): same init, batches and draws ->
    the same logged values, student, teacher and AdamW state after each of two steps."""
    base, _ = make_method("daformer")
    control, _ = make_method("dida", CONTROLS)
    control.generator.set_state(base.generator.get_state())  # the two methods own different streams
    for it in range(2):
        batch = toy_batch(seed=it)
        torch.manual_seed(it)
        logged_base = base.train_step(*batch, it)
        torch.manual_seed(it)
        logged_control = control.train_step(*batch, it)
        assert logged_control.pop("bank_filled") > 0  # DIDA's bank is still built, only nothing reads it
        assert logged_base.keys() == logged_control.keys() == {"src", "fd", "pl_quality", "mix"}
        assert all(torch.equal(logged_base[k], logged_control[k]) for k in logged_base), (logged_base, logged_control)
        for name, module in (("student", "model"), ("teacher", "teacher")):
            a, b = getattr(base, module).state_dict(), getattr(control, module).state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after step {it}"
        opt_a, opt_b = base.optimizer.state_dict()["state"], control.optimizer.state_dict()["state"]
        assert opt_a.keys() == opt_b.keys()
        assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i]), f"AdamW state, step {it}"
        assert torch.equal(base.generator.get_state(), control.generator.get_state())
    # the comparison can fail: one DIDA idea on (the instance loss) and the first step already differs
    fresh, _ = make_method("daformer")
    other, _ = make_method("dida", ["--dida-lambda-ins", "0.5", *CONTROLS[2:]])
    other.generator.set_state(fresh.generator.get_state())
    for method in (fresh, other):
        torch.manual_seed(0)
        method.train_step(*toy_batch(seed=0), 0)
    a, b = fresh.model.state_dict(), other.model.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_dida_draws_only_from_its_generator_and_restores_it():
    method, _ = make_method("dida")  # simmatch: the photometric weak view draws too
    state = method.state_dict()["generator"].clone()
    rng_before = torch.get_rng_state()
    method.train_step(*toy_batch(), 0)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert not torch.equal(method.generator.get_state(), state)
    other, _ = make_method("dida")
    other.load_state_dict(method.state_dict())
    assert torch.equal(other.generator.get_state(), method.generator.get_state())
    assert torch.equal(other.bank.features, method.bank.features)


def test_dida_recipe_is_daformers_and_it_never_writes_args():
    assert dida.RECIPE == daformer.RECIPE
    assert_never_writes_args("dida")


@pytest.mark.slow
def test_smoke_run_exact_resume_and_independence_from_eval_every(tmp_path, toy_stats):
    """The uninterrupted run is the smoke run (simmatch mode, RCS source sampling, the DAFormer recipe),
    evaluating at the end only. The other run evaluates every 2 iterations and stops at 3 (no evaluation
    point of its schedule) and resumes: both must end with bit-identical weights, teacher, optimizer,
    bank and generator."""
    common_args = ["--method", "dida", "--source", "toy-synth", *TOY_FAST, "--dida-bank-interval", "2",
                   "--warmup-iters", "2", "--stats-cache", toy_stats]
    straight = run_script("train.py", *common_args, "--out", tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert " ins " in straight.stdout and "bank_filled" in straight.stdout and "eval iter 6" in straight.stdout
    assert "eval iter 3" not in straight.stdout
    split = [*common_args, "--eval-every", "2", "--out", tmp_path / "b"]
    first = run_script("train.py", *split, "--stop-iter", "3")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "eval iter 2" in first.stdout
    resumed = run_script("train.py", *split, "--resume", tmp_path / "b" / "last.pt")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "eval iter 4" in resumed.stdout and "eval iter 6" in resumed.stdout
    assert_same_training_state(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    assert common.load_checkpoint(str(tmp_path / "a" / "last.pt"))["method"]["bank"]["filled"].any()
