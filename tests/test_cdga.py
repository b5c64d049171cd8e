"""CDGA (reconstruction): each loss on hand cases and against plain loops, the discriminator's per-group
outputs, which network each step changes, stop-gradients, group usage after a short toy run, resume."""
import copy
import json
import math
import os

import pytest
import torch

import train
from conftest import TOY_FAST
from uda import cdga, common, datasets, models
from uda.source_only import cross_entropy

SMALL = ["--cdga-d-width", "8", "--cdga-group-hidden", "16"]  # cheap modules for the in-process tests


# --------------------------------------------------------------------------------------------------
# Pure losses
# --------------------------------------------------------------------------------------------------
def random_assign(b, k, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, k, h, w, generator=g), dim=1)


def test_group_profiles_against_loop():
    assign, probs = random_assign(2, 3, 4, 5), random_assign(2, 6, 4, 5, seed=1)
    valid = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(2)) > 0.3
    q, mass = cdga.group_profiles(assign, probs, valid)
    for k in range(3):
        num, den = torch.zeros(6), 0.0
        for b in range(2):
            for i in range(4):
                for j in range(5):
                    if valid[b, i, j]:
                        num += assign[b, k, i, j] * probs[b, :, i, j]
                        den += assign[b, k, i, j].item()
        assert torch.allclose(q[k], num / (den + cdga.EPS), atol=1e-6)
        assert math.isclose(mass[k].item(), den, rel_tol=1e-5)
    assert torch.allclose(q.sum(1), torch.ones(3), atol=1e-4)  # profiles are class distributions


def test_semantic_consistency_zero_for_identical_profiles_only():
    probs = random_assign(2, 5, 4, 4, seed=3)
    q_s, _ = cdga.group_profiles(random_assign(2, 3, 4, 4), probs)
    for distance in ("l1", "skl"):
        assert cdga.semantic_consistency_loss(q_s, q_s.clone(), distance).item() == pytest.approx(0.0, abs=1e-7)
        q_t = q_s.roll(1, dims=0)  # groups swapped between the domains
        assert cdga.semantic_consistency_loss(q_s, q_t, distance).item() > 1e-3
    # L1 by hand: one group, profiles (1, 0) and (0, 1) differ by 2
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert cdga.semantic_consistency_loss(a, b, "l1").item() == pytest.approx(2.0)


def test_orthogonality_disjoint_zero_identical_maximal():
    disjoint = torch.eye(4, 7)[:, torch.randperm(7)]  # one-hot profiles on distinct classes
    assert cdga.orthogonality_loss(disjoint).item() == pytest.approx(0.0, abs=1e-7)
    same = torch.softmax(torch.randn(1, 7), dim=1).expand(4, 7)
    assert cdga.orthogonality_loss(same).item() == pytest.approx(1.0, abs=1e-5)
    random = torch.rand(4, 7)
    assert 0.0 < cdga.orthogonality_loss(random).item() < 1.0


def test_empty_group_gives_no_nan():
    assign = random_assign(2, 3, 4, 4)
    assign = torch.cat([assign, torch.zeros(2, 1, 4, 4)], dim=1).requires_grad_(True)  # group 3 is empty
    probs = random_assign(2, 5, 4, 4, seed=1)
    q, mass = cdga.group_profiles(assign, probs, torch.ones(2, 4, 4, dtype=torch.bool))
    assert mass[3] == 0 and (q[3] == 0).all()
    total = (cdga.semantic_consistency_loss(q, q.flip(0), "skl") + cdga.orthogonality_loss(q)
             + cdga.usage_balance_loss(mass)[0] + cdga.semantic_consistency_loss(q, q.flip(0), "l1"))
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(assign.grad).all()
    # nothing valid at all: still finite
    q0, m0 = cdga.group_profiles(assign.detach(), probs, torch.zeros(2, 4, 4, dtype=torch.bool))
    assert torch.isfinite(cdga.orthogonality_loss(q0)) and torch.isfinite(cdga.usage_balance_loss(m0)[0])


def test_usage_balance_hand_cases():
    assert cdga.usage_balance_loss(torch.full((4,), 3.0))[0].item() == pytest.approx(0.0, abs=1e-6)
    assert cdga.usage_balance_loss(torch.tensor([5.0, 0, 0, 0]))[0].item() == pytest.approx(math.log(4), abs=1e-5)


def test_class_equivalence_rare_class_counts_as_much_as_frequent():
    labels = torch.zeros(2, 6, 8, dtype=torch.long)  # class 0: frequent
    labels[0, 0, :3] = 5                             # class 5: 3 pixels
    labels[1, 5, :] = 255                            # ignored
    weights = cdga.class_equivalence_weights(labels, 19)
    w0, w5 = weights[labels == 0].sum().item(), weights[labels == 5].sum().item()
    assert w0 == pytest.approx(0.5) and w5 == pytest.approx(0.5)
    assert (weights[labels == 255] == 0).all() and weights.sum().item() == pytest.approx(1.0)
    # against a loop over pixels
    valid = [(b, i, j) for b in range(2) for i in range(6) for j in range(8) if labels[b, i, j] != 255]
    present = {labels[p].item() for p in valid}
    for p in valid:
        count = sum(labels[q] == labels[p] for q in valid)
        assert weights[p].item() == pytest.approx(1.0 / (len(present) * count))
    uniform = cdga.class_equivalence_weights(labels, 19, balanced=False)
    assert torch.allclose(uniform[labels != 255], torch.full((len(valid),), 1.0 / len(valid)))
    nothing = cdga.class_equivalence_weights(torch.full((1, 3, 3), 255), 19)
    assert (nothing == 0).all()


def test_groupwise_adversarial_loss_against_loop():
    g = torch.Generator().manual_seed(4)
    d_logits = torch.randn(2, 3, 4, 5, generator=g)
    assign = random_assign(2, 3, 4, 5, seed=5)
    labels = torch.randint(0, 4, (2, 4, 5), generator=g)
    weights = cdga.class_equivalence_weights(labels, 4)
    for domain in (cdga.SOURCE_LABEL, cdga.TARGET_LABEL):
        expected = 0.0
        for b in range(2):
            for k in range(3):
                for i in range(4):
                    for j in range(5):
                        prob = torch.sigmoid(d_logits[b, k, i, j]).item()
                        bce = -math.log(prob) if domain == 1 else -math.log(1 - prob)
                        expected += weights[b, i, j].item() * assign[b, k, i, j].item() * bce
        got = cdga.groupwise_adversarial_loss(d_logits, assign, weights, domain).item()
        assert got == pytest.approx(expected, rel=1e-5)


def test_group_masked_predictions_layout():
    assign, probs = random_assign(2, 3, 4, 5), random_assign(2, 6, 4, 5, seed=1)
    x = cdga.group_masked_predictions(assign, probs)
    assert x.shape == (2, 18, 4, 5)
    assert torch.allclose(x[:, 2 * 6 + 4], assign[:, 2] * probs[:, 4])
    assert torch.allclose(x.view(2, 3, 6, 4, 5).sum(2), assign)  # each group's block sums to A^k


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_discriminator_per_group_outputs(mode):
    torch.manual_seed(0)
    k, c = 3, 5
    d = cdga.GroupDiscriminator(k, c, width=4, separate=mode == "separate")
    x = cdga.group_masked_predictions(random_assign(2, k, 64, 96), random_assign(2, c, 64, 96, seed=1))
    out = d(x)
    assert out.shape == (2, k, 2, 3)  # one domain logit map per group, output stride 32
    x2 = x.clone()
    x2[:, 1 * c:2 * c] = torch.rand_like(x2[:, 1 * c:2 * c])  # change group 1's data only
    changed = (d(x2) - out).abs().amax(dim=(0, 2, 3)) > 1e-6  # (K,) which group outputs moved
    if mode == "separate":
        assert changed.tolist() == [False, True, False]
    else:
        assert changed.all()  # the shared D reads every group to judge each group


# --------------------------------------------------------------------------------------------------
# The method, in process
# --------------------------------------------------------------------------------------------------
def make_method(*extra, seed=0, amp="off"):
    args = train.parse_args(["--method", "cdga", "--out", "unused", "--lr", "0.01", *SMALL, *extra])
    torch.manual_seed(seed)
    space = datasets.label_space(args.source, args)
    model = models.build_model("tiny", space.num_classes).train()
    return cdga.CDGA(model, args, common.make_env("cpu", amp, space))


def toy_batches(seed=0):
    space = datasets.TOY_SPACE
    src = datasets.build_dataset("toy-synth", "train", space, crop=(128, 64), augment=True, seed=seed)
    tgt = datasets.build_dataset("toy-real", "train", space, labeled=False, crop=(128, 64), augment=True, seed=seed)
    stack = lambda ds, key: torch.stack([ds[(i, i)][key] for i in range(2)])  # noqa: E731
    return ({"image": stack(src, "image"), "label": stack(src, "label")}, {"image": stack(tgt, "image")})


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def unchanged(module, before):
    return all(torch.equal(p, q) for p, q in zip(module.parameters(), before))


def test_generator_step_leaves_discriminator_and_vice_versa():
    method = make_method()
    source, target = toy_batches()
    d0, g0, c0 = snapshot(method.discriminator), snapshot(method.model), snapshot(method.grouping)
    terms, cache = method.generator_step(source, target)
    assert unchanged(method.discriminator, d0)
    assert all(p.grad is None for p in method.discriminator.parameters())
    assert not unchanged(method.model, g0) and not unchanged(method.grouping, c0)
    g1, c1 = snapshot(method.model), snapshot(method.grouping)
    method.discriminator_step(cache)
    assert unchanged(method.model, g1) and unchanged(method.grouping, c1)
    assert not unchanged(method.discriminator, d0)
    assert all(torch.isfinite(v) for v in terms.values())


def test_clustering_losses_do_not_reach_G_and_adversarial_loss_does_not_reach_grouping():
    source, target = toy_batches()
    # lambda_adv = 0: G's gradient is exactly the source CE gradient (features/probs detached for Cnet)
    method = make_method("--cdga-lambda-adv", "0")
    reference = copy.deepcopy(method.model)
    method.generator_step(source, target)
    _, logits = reference(source["image"])
    logits = common.upsample(logits, source["label"].shape[-2:], method.align_corners)
    cross_entropy(logits, source["label"]).backward()
    for p, q in zip(method.model.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-7)
    # clustering weights 0, lambda_adv large: Cnet gets no gradient (assignments detached for D)
    method = make_method("--cdga-lambda-adv", "1", "--cdga-lambda-sc", "0", "--cdga-lambda-orth", "0",
                         "--cdga-lambda-balance", "0")
    method.generator_step(source, target)
    assert all((p.grad == 0).all() for p in method.grouping.parameters())
    assert any((p.grad != 0).any() for p in method.model.classifier.parameters())


def test_zero_adversarial_weight_skips_the_discriminator_and_changes_no_other_weight():
    source, target = toy_batches()
    methods = {w: make_method("--cdga-lambda-adv", w) for w in ("0", "1e-30")}
    d0 = snapshot(methods["0"].discriminator)
    logged = {w: m.train_step(source, target, 0) for w, m in methods.items()}
    assert "adv" not in logged["0"] and "d" not in logged["0"] and {"adv", "d"} <= set(logged["1e-30"])
    assert logged["0"]["ce"] == logged["1e-30"]["ce"]
    assert unchanged(methods["0"].discriminator, d0), "Dnet trained at weight 0"
    for part in ("model", "grouping"):
        ours, ref = snapshot(getattr(methods["0"], part)), snapshot(getattr(methods["1e-30"], part))
        assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(ours, ref)), part


def test_bf16_autocast_close_to_fp32():
    source, target = toy_batches()
    fp32, _ = make_method().generator_step(source, target)
    bf16, cache = make_method(amp="bf16").generator_step(source, target)
    assert cache["x_t"].dtype == torch.float32  # D input and every loss stay fp32 under autocast
    for key in ("ce", "adv", "sc", "orth", "balance", "group_entropy"):
        assert bf16[key].dtype == torch.float32
        assert bf16[key].item() == pytest.approx(fp32[key].item(), rel=0.05, abs=0.01), key


def test_domains_of_different_sizes():
    """Real recipes resize GTA5 to 1280x720 and Cityscapes to 1024x512: each domain keeps its own size."""
    method = make_method()
    source, target = toy_batches()
    target = {"image": target["image"][:, :, :, :96]}  # (B, 3, 64, 96) against a (B, 3, 64, 128) source
    terms, cache = method.generator_step(source, target)
    assert cache["x_t"].shape[-2:] == (64, 96) and cache["weights_t"].shape[-2:] == (64, 96)
    terms.update(method.discriminator_step(cache))
    assert all(torch.isfinite(v) for v in terms.values())


def test_state_dict_round_trip_restores_grouping_discriminator_and_optimizers():
    method = make_method()
    source, target = toy_batches()
    method.train_step(source, target, 0)
    state = copy.deepcopy(method.state_dict())
    fresh = make_method(seed=1)
    fresh.load_state_dict(state)
    for a, b in [(method.grouping, fresh.grouping), (method.discriminator, fresh.discriminator)]:
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert fresh.d_optimizer.state_dict()["state"][0]["step"] == 1
    assert fresh.group_optimizer.state_dict()["state"][0]["step"] == 1


# --------------------------------------------------------------------------------------------------
# Subprocess runs: group usage after a short toy run, smoke, resume, bad flags
# --------------------------------------------------------------------------------------------------
def read_log(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_group_usage_stays_spread_after_short_toy_run(run, tmp_path):
    out = tmp_path / "usage"
    result = run("train.py", "--method", "cdga", "--out", out, *TOY_FAST, "--iters", "80", "--log-every", "20",
                 "--cdga-d-width", "16", "--cdga-group-hidden", "64")
    assert result.returncode == 0, result.stderr
    records = [r for r in read_log(out) if "loss/group_max_share_s" in r]
    assert [r["iter"] for r in records if r["iter"] % 20 == 0] == [20, 40, 60, 80]  # (train.py also logs early)
    for r in records:  # no group takes more than 95% of either domain's pixels at any logged point
        assert r["loss/group_max_share_s"] < 0.95 and r["loss/group_max_share_t"] < 0.95, r
    assert "eval/mIoU9" in read_log(out)[-1]


def test_recipe_and_logged_terms():
    args = train.parse_args(["--method", "cdga", "--source", "gta5", "--out", "unused"])
    assert (args.lr, args.head_lr_mult, args.batch_size, args.iters, args.align_corners) == (2.5e-4, 10.0, 1, 250000,
                                                                                             True)
    assert (args.backbone, args.target_size, args.lovasz_weight) == ("deeplabv2-r101-caffe", "1024x512", 0.0)
    # a term whose weight is 0 is not logged; usage diagnostics always are
    terms, _ = make_method("--cdga-lambda-balance", "0", "--cdga-lambda-adv", "0").generator_step(*toy_batches())
    assert set(terms) == {"ce", "sc", "orth", "group_max_share_s", "group_max_share_t", "group_entropy"}
    terms, _ = make_method("--lovasz-weight", "0.5").generator_step(*toy_batches())
    assert {"lovasz", "adv", "balance"} <= set(terms)


def float_tensors(obj, prefix=""):
    """{path: tensor} of every floating-point tensor in a nested checkpoint."""
    if torch.is_tensor(obj):
        return {prefix: obj} if obj.is_floating_point() else {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {path: t for key, value in items for path, t in float_tensors(value, f"{prefix}/{key}").items()}


@pytest.mark.slow
def test_smoke_and_resume_exact(run, tmp_path):
    """Stopped at iteration 3 (not an evaluation iteration of the straight run: --eval-every 0) and resumed:
    every float tensor of last.pt (G, Cnet, Dnet, their optimizers) equals the straight run's."""
    common_args = ["--method", "cdga", *TOY_FAST, *SMALL, "--cdga-lambda-adv", "0.1"]
    straight = run("train.py", "--out", tmp_path / "a", *common_args)
    assert straight.returncode == 0, straight.stderr
    first = run("train.py", "--out", tmp_path / "b", *common_args, "--stop-iter", "3")
    assert first.returncode == 0, first.stderr
    second = run("train.py", "--out", tmp_path / "b", *common_args, "--resume", tmp_path / "b" / "last.pt")
    assert second.returncode == 0, second.stderr
    last_a = [r for r in read_log(tmp_path / "a") if r["iter"] == 6 and "loss/d" in r][0]
    last_b = [r for r in read_log(tmp_path / "b") if r["iter"] == 6 and "loss/d" in r][0]
    for key in ("loss/d", "loss/adv", "loss/sc", "loss/orth", "loss/group_entropy"):
        assert last_a[key] == last_b[key], key  # Dnet, Cnet and their Adam states resumed exactly
    a = common.load_checkpoint(str(tmp_path / "a" / "last.pt"))
    b = common.load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert a["iter"] == b["iter"] == 6
    tensors_a = float_tensors({k: a[k] for k in ("model", "method")})
    tensors_b = float_tensors({k: b[k] for k in ("model", "method")})
    assert tensors_a.keys() == tensors_b.keys()
    assert any("/discriminator/" in p for p in tensors_a) and any("/group_optimizer/" in p for p in tensors_a)
    for path, tensor in tensors_a.items():
        assert torch.equal(tensor, tensors_b[path]), path


@pytest.mark.slow
def test_bad_group_count_is_one_line_error(run, tmp_path):
    result = run("train.py", "--method", "cdga", "--out", tmp_path / "x", *TOY_FAST, "--cdga-groups", "1")
    assert result.returncode == 2 and "--cdga-groups" in result.stderr and "Traceback" not in result.stderr


def test_discriminator_input_below_its_minimum_size_is_a_user_error():
    disc = cdga.GroupDiscriminator(2, 3, width=4)
    assert disc(torch.zeros(1, 6, cdga.D_MIN_SIZE, 40)).shape == (1, 2, 1, 1)
    with pytest.raises(common.UserError, match="--crop"):
        disc(torch.zeros(1, 6, cdga.D_MIN_SIZE - 1, 40))
