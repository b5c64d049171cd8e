"""PLCA: cycle association and masks against plain Python loops, sigma, aggregation, the blocked autograd
functions (gradcheck, against the plain definitions), LSR, AMP, the recipe, smoke run, resume."""
import json
import math
import os
import statistics

import pytest
import torch

from conftest import TOY_FAST, run_script
from uda import common, datasets, flags, plca
from uda.models import TinyDeepLab

EPS = 1e-10


# --------------------------------------------------------------------------------------------------
# Plain-Python references (lists of floats), written from the spec, not from the vectorised code
# --------------------------------------------------------------------------------------------------
def loop_softmax(z):
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


def loop_sigma(row):
    mean, std = sum(row) / len(row), statistics.stdev(row)
    return loop_softmax([(r - mean) / (std + EPS) for r in row])


def loop_cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def loop_neg_kl(p, q):
    return -sum(pc * (math.log(pc + EPS) - math.log(qc + EPS)) for pc, qc in zip(p, q))


def loop_aggregate(v, weights, alpha):
    return [[(1 - alpha) * v[j][d] + alpha * sum(weights[j][k] * v[k][d] for k in range(len(v)))
             for d in range(len(v[0]))] for j in range(len(v))]


def argmax(row):
    return max(range(len(row)), key=lambda k: row[k])


def loop_cycle(src, tgt, labels, sim):
    """(per-pixel loss list, keep list) of the source -> target -> source cycle."""
    a = [loop_sigma([sim(s, t) for t in tgt]) for s in src]
    a_back = [loop_sigma([sim(t, s) for s in src]) for t in tgt]
    losses, keep = [], []
    for i in range(len(src)):
        j = argmax(a[i])
        i_back = argmax(a_back[j])
        keep.append(labels[i] != 255 and labels[i_back] == labels[i])
        losses.append(-math.log(a[i][j] * a_back[j][i_back]))
    return losses, keep


def loop_feature_level(u, v, labels, alpha):
    weights = [loop_sigma([loop_cos(v[j], v[k]) for k in range(len(v))]) for j in range(len(v))]
    return loop_cycle(u, loop_aggregate(v, weights, alpha), labels, loop_cos)


def loop_classifier_level(p, q, labels, alpha):
    weights = [loop_softmax([loop_neg_kl(q[j], q[k]) for k in range(len(q))]) for j in range(len(q))]
    return loop_cycle(p, loop_aggregate(q, weights, alpha), labels, loop_neg_kl)


def mean_kept(losses, keep):
    kept = [l for l, k in zip(losses, keep) if k]
    return sum(kept) / len(kept) if kept else 0.0


def pair_data(seed, n_s=7, n_t=6, dim=5, classes=3):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n_s, dim, generator=g, dtype=torch.float64)
    v = torch.rand(n_t, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n_s,), generator=g)
    labels[0] = 255
    return u, v, labels


# --------------------------------------------------------------------------------------------------
# sigma and aggregation
# --------------------------------------------------------------------------------------------------
def test_sigma_rows_sum_to_one_and_statistics_carry_no_gradient():
    scores = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 9, dtype=torch.float64)
    out = plca.sigma(scores)
    assert torch.allclose(out.sum(1), torch.ones(4, dtype=torch.float64))
    (grad,) = torch.autograd.grad((weights * out).sum(), scores)
    # the same softmax with mean and std frozen as constants has the same gradient ...
    mean, std = scores.detach().mean(1, keepdim=True), scores.detach().std(1, keepdim=True)
    frozen = torch.softmax((scores - mean) / (std + EPS), 1)
    (grad_frozen,) = torch.autograd.grad((weights * frozen).sum(), scores)
    assert torch.allclose(grad, grad_frozen)
    # ... and differs from the one with live statistics (so this test can fail)
    live = torch.softmax((scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + EPS), 1)
    (grad_live,) = torch.autograd.grad((weights * live).sum(), scores)
    assert not torch.allclose(grad, grad_live)
    # and it matches the loop definition row by row
    for r in range(4):
        assert torch.allclose(out[r], torch.tensor(loop_sigma(scores[r].tolist()), dtype=torch.float64))


def test_aggregation_weights_rows_sum_to_one_and_probabilities_stay_normalised():
    v = torch.rand(10, 4, dtype=torch.float64)
    weights = plca.sigma(plca.cosine_matrix(v, v))
    assert torch.allclose(weights.sum(1), torch.ones(10, dtype=torch.float64))
    p = torch.softmax(torch.randn(10, 5, dtype=torch.float64), 1)
    kl_weights = torch.softmax(plca.neg_kl_matrix(p, p), 1)
    assert torch.allclose(kl_weights.sum(1), torch.ones(10, dtype=torch.float64))
    assert torch.allclose(plca.aggregate_probs(p, 0.5).sum(1), torch.ones(10, dtype=torch.float64))
    expected = loop_aggregate(v.tolist(), [loop_sigma([loop_cos(a, b) for b in v.tolist()]) for a in v.tolist()], 0.5)
    assert torch.allclose(plca.aggregate_features(v, 0.5), torch.tensor(expected, dtype=torch.float64))


def test_neg_kl_matrix_matches_loop():
    p = torch.softmax(torch.randn(4, 6, dtype=torch.float64), 1)
    q = torch.softmax(torch.randn(3, 6, dtype=torch.float64), 1)
    expected = [[loop_neg_kl(a, b) for b in q.tolist()] for a in p.tolist()]
    assert torch.allclose(plca.neg_kl_matrix(p, q), torch.tensor(expected, dtype=torch.float64))
    assert plca.neg_kl_matrix(p, p).diagonal().abs().max() < 1e-12   # KL(p || p) = 0


# --------------------------------------------------------------------------------------------------
# Cycle association against the loops
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_feature_association_and_mask_match_loops(seed):
    u, v, labels = pair_data(seed)
    nll, keep = plca.feature_association(u, v, labels, alpha=0.5)
    losses, keep_loop = loop_feature_level(u.tolist(), v.tolist(), labels.tolist(), 0.5)
    assert keep.tolist() == keep_loop
    assert torch.allclose(nll, torch.tensor(losses, dtype=torch.float64))
    # the batch loss: source maps (1, D, 7, 1), target maps (1, D, 2, 3)
    loss = plca.association_loss(lambda a, b, y: plca.feature_association(a, b, y, 0.5),
                                 u.t().reshape(1, 5, 7, 1), v.t().reshape(1, 5, 2, 3), labels.reshape(1, 7, 1))
    assert loss.item() == pytest.approx(mean_kept(losses, keep_loop), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classifier_association_and_mask_match_loops(seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(3 * torch.randn(7, 4, generator=g, dtype=torch.float64), 1)
    q = torch.softmax(3 * torch.randn(6, 4, generator=g, dtype=torch.float64), 1)
    labels = torch.randint(0, 3, (7,), generator=g)
    nll, keep = plca.classifier_association(p, q, labels, alpha=0.5)
    losses, keep_loop = loop_classifier_level(p.tolist(), q.tolist(), labels.tolist(), 0.5)
    assert keep.tolist() == keep_loop
    assert torch.allclose(nll, torch.tensor(losses, dtype=torch.float64))


def test_keep_mask_can_reject_and_batch_mean_spans_pairs():
    """Two pairs: the loss is the mean over kept pixels of both, not the mean of per-pair means."""
    pairs = [pair_data(s) for s in (3, 4)]
    terms = [loop_feature_level(u.tolist(), v.tolist(), y.tolist(), 0.5) for u, v, y in pairs]
    assert any(not k for _, keep in terms for k in keep[1:])  # some labelled pixel is rejected
    all_losses = [l for losses, _ in terms for l in losses]
    all_keep = [k for _, keep in terms for k in keep]
    src = torch.stack([u.t().reshape(5, 7, 1) for u, _, _ in pairs])   # (2, D, 7, 1)
    tgt = torch.stack([v.t().reshape(5, 2, 3) for _, v, _ in pairs])   # (2, D, 2, 3)
    lab = torch.stack([y.reshape(7, 1) for _, _, y in pairs])          # (2, 7, 1)
    loss = plca.association_loss(lambda a, b, y: plca.feature_association(a, b, y, 0.5), src, tgt, lab)
    assert loss.item() == pytest.approx(mean_kept(all_losses, all_keep), rel=1e-9)


def test_cycle_indices_carry_no_gradient_but_aggregation_does():
    u, v, labels = pair_data(5)
    labels[:] = 1   # every cycle is consistent
    u.requires_grad_(True)
    v.requires_grad_(True)
    nll, keep = plca.feature_association(u, v, labels, alpha=0.5)
    assert keep.all()
    gu, gv = torch.autograd.grad(nll.mean(), (u, v))
    assert gu.abs().sum() > 0 and gv.abs().sum() > 0
    # with the aggregation the gradient reaches target pixels never selected as j* (through W v)
    _, j_star = plca.log_sigma(plca.cosine_matrix(u, plca.aggregate_features(v, 0.5))).max(1)
    unselected = [j for j in range(v.shape[0]) if j not in set(j_star.tolist())]
    if unselected:
        assert gv[unselected].abs().sum() > 0


def test_no_nan_when_nothing_is_kept_or_rows_are_constant():
    u, v, labels = pair_data(6)
    u.requires_grad_(True)
    loss = plca.association_loss(lambda a, b, y: plca.feature_association(a, b, y, 0.5),
                                 u.t().reshape(1, 5, 7, 1), v.t().reshape(1, 5, 2, 3),
                                 torch.full((1, 7, 1), 255))
    (grad,) = torch.autograd.grad(loss, u)
    assert loss.item() == 0.0 and torch.isfinite(grad).all() and grad.abs().sum() == 0
    # constant rows: identical feature vectors (cos = 1 everywhere), all-zero features, uniform probs
    for src, tgt in [(torch.ones(6, 4), torch.ones(5, 4)), (torch.zeros(6, 4), torch.zeros(5, 4))]:
        src.requires_grad_(True)
        nll, _ = plca.feature_association(src, tgt, torch.zeros(6, dtype=torch.long), 0.5)
        (grad,) = torch.autograd.grad(nll.sum(), src)
        assert torch.isfinite(nll).all() and torch.isfinite(grad).all()
    flat = torch.full((6, 3), 1 / 3, requires_grad=True)
    nll, keep = plca.classifier_association(flat, torch.full((5, 3), 1 / 3), torch.zeros(6, dtype=torch.long), 0.5)
    (grad,) = torch.autograd.grad(nll.sum(), flat)
    assert torch.isfinite(nll).all() and torch.isfinite(grad).all() and keep.all()


def test_chunked_association_equals_full_values_and_gradients():
    g = torch.Generator().manual_seed(7)
    feat_s = torch.rand(2, 8, 4, 5, generator=g, requires_grad=True)
    feat_t = torch.rand(2, 8, 4, 5, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 5), generator=g)
    results = []
    for chunk in (0, 3):
        loss = plca.association_loss(lambda a, b, y: plca.feature_association(a, b, y, 0.5, chunk),
                                     feat_s, feat_t, labels)
        results.append((loss.detach(), *torch.autograd.grad(loss, (feat_s, feat_t))))
    for full, chunked in zip(*results):
        assert torch.allclose(full, chunked, atol=1e-6)


def test_max_pixels_subsamples_each_image_from_the_given_generator():
    feats = torch.rand(1, 4, 5, 6)
    seen = []

    def spy(src, tgt, y):
        seen.append((src.shape[0], tgt.shape[0]))
        return plca.feature_association(src, tgt, y, 0.5)

    def loss(generator):
        return plca.association_loss(spy, feats, feats, torch.zeros(1, 5, 6, dtype=torch.long), max_pixels=11,
                                     generator=generator)

    global_state = torch.get_rng_state()
    first, second = loss(torch.Generator().manual_seed(3)), loss(torch.Generator().manual_seed(3))
    assert seen == [(11, 11), (11, 11)] and torch.isfinite(first)
    assert first == second                                   # the subsets come from the generator alone ...
    assert torch.equal(torch.get_rng_state(), global_state)  # ... and the global RNG is never drawn from
    assert loss(torch.Generator().manual_seed(4)) != first


# --------------------------------------------------------------------------------------------------
# The blocked autograd functions against the plain N x M definitions (values and gradients, float64)
# --------------------------------------------------------------------------------------------------
def grads_of(outputs, inputs, seed):
    """Gradients of a random weighting of the float outputs: compares whole backward passes."""
    g = torch.Generator().manual_seed(seed)
    total = sum((out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() for out in outputs)
    return torch.autograd.grad(total, inputs)


@pytest.mark.parametrize("chunk,store", [(0, True), (0, False), (3, False)])
def test_best_links_match_the_definition_both_ways(chunk, store):
    g = torch.Generator().manual_seed(11)
    a = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    best, index, best_col, index_col = plca.BestLinks.apply(a, b, chunk, store, True)
    rows, cols = plca.log_sigma(a @ b.t()).max(1), plca.log_sigma(b @ a.t()).max(1)   # S and S' = S^T
    assert torch.allclose(best, rows.values) and torch.equal(index, rows.indices)
    assert torch.allclose(best_col, cols.values) and torch.equal(index_col, cols.indices)
    for got, expected in zip(grads_of([best, best_col], (a, b), 0), grads_of([rows.values, cols.values], (a, b), 0)):
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)
    best_rows, index_rows = plca.BestLinks.apply(a, b, chunk, store, False)
    assert torch.equal(best_rows, best) and torch.equal(index_rows, index)
    rows = plca.log_sigma(a @ b.t()).max(1)   # a fresh graph: the one above was used
    for got, expected in zip(grads_of([best_rows], (a, b), 1), grads_of([rows.values], (a, b), 1)):
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk,store", [(0, True), (0, False), (3, False)])
def test_aggregate_matches_the_definition_and_gradcheck(chunk, store):
    g = torch.Generator().manual_seed(13)
    a = torch.randn(9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    # z-scored (sigma, statistics detached, so no finite-difference check): against autograd of the definition,
    # also with one tensor as both factors (the cosine aggregation; the kept path's symmetric backward)
    for args in [(a, b, c), (x, x, y)]:
        got = plca.Aggregate.apply(*args, chunk, store, True)
        expected = plca.sigma(args[0] @ args[1].t()) @ args[2]
        assert torch.allclose(got, expected)
        inputs = tuple(dict.fromkeys(args))
        for grad, grad_expected in zip(grads_of([got], inputs, 2), grads_of([expected], inputs, 2)):
            assert torch.allclose(grad, grad_expected, rtol=1e-9, atol=1e-12)
    # plain softmax (the KL aggregation): a true derivative, so gradcheck
    assert torch.allclose(plca.Aggregate.apply(a, b, c, chunk, store, False), torch.softmax(a @ b.t(), 1) @ c)
    assert torch.autograd.gradcheck(lambda p, q, r: plca.Aggregate.apply(p, q, r, chunk, store, False), (a, b, c))
    assert torch.autograd.gradcheck(lambda p, q: plca.Aggregate.apply(p, p, q, chunk, store, False), (x, y))


# --------------------------------------------------------------------------------------------------
# LSR
# --------------------------------------------------------------------------------------------------
def test_lsr_gradient_is_l_minus_tau_over_tau_times_dl():
    tau = 10.0
    logits = (5 * torch.randn(2, 6, 3, 4, dtype=torch.float64)).requires_grad_(True)
    (grad,) = torch.autograd.grad(plca.lsr_loss(logits, tau), logits)
    # l = logsumexp(z) - mean_c z, so dl/dz_c = softmax_c - 1/C
    l = torch.logsumexp(logits, 1) - logits.mean(1)                   # (B, h, w)
    dl = torch.softmax(logits, 1) - 1.0 / logits.shape[1]             # (B, C, h, w)
    expected = ((l - tau) / tau)[:, None] * dl / l.numel()
    assert torch.allclose(grad, expected.detach())
    # the same gradient as (l - tau)^2 / (2 tau)
    (grad_sq,) = torch.autograd.grad(((l - tau) ** 2 / (2 * tau)).mean(), logits)
    assert torch.allclose(grad, grad_sq)
    # uniform logits: l = log C
    zero = torch.zeros(1, 4, 2, 2)
    assert plca.lsr_loss(zero, tau).item() == pytest.approx((math.log(4) / tau - 1) * math.log(4))


# --------------------------------------------------------------------------------------------------
# AMP, the method step, test-time aggregation
# --------------------------------------------------------------------------------------------------
def make_method(model, *extra, amp="off"):
    args = flags.parse_args(["--method", "plca", "--out", "unused", "--batch-size", "2", "--lr", "1e-3", *extra])
    env = common.make_env("cpu", amp, datasets.label_space(args.source, args))
    return plca.PLCA(model, args, env)


def test_bf16_autocast_matches_fp32():
    g = torch.Generator().manual_seed(8)
    feat_s, feat_t = torch.rand(2, 16, 6, 5, generator=g), torch.rand(2, 16, 6, 5, generator=g)
    labels = torch.randint(0, 3, (2, 6, 5), generator=g)

    def loss():
        return plca.association_loss(lambda a, b, y: plca.feature_association(a, b, y, 0.5), feat_s, feat_t, labels)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp_value = loss()
    assert amp_value.dtype == torch.float32 and torch.allclose(amp_value, loss())  # maths kept in fp32
    # the whole objective with the forward in bf16 stays close to fp32
    torch.manual_seed(0)
    model = TinyDeepLab(num_classes=5)
    images_s, images_t = torch.rand(2, 3, 64, 48), torch.rand(2, 3, 64, 48)
    label = torch.randint(0, 5, (2, 64, 48))
    totals = []
    for amp in ("off", "bf16"):
        method = make_method(model, amp=amp)
        terms, total = method.losses(images_s, label, images_t)
        assert all(torch.isfinite(t) for t in terms.values())
        totals.append(total.item())
    assert totals[1] == pytest.approx(totals[0], rel=0.05)


def test_aggregate_predict_is_a_distribution_and_reduces_to_the_model_at_alpha_zero():
    torch.manual_seed(0)
    model = TinyDeepLab(num_classes=5).eval()
    with torch.no_grad():
        for conv in model.classifier.branches:
            conv.weight.mul_(100.0)   # the N(0, 0.01) init predicts nearly uniform probabilities
    images = torch.rand(2, 3, 64, 48)
    probs = plca.aggregate_predict(model, images)
    assert probs.shape == (2, 5, 8, 6)
    assert torch.allclose(probs.sum(1), torch.ones(2, 8, 6), atol=1e-5)
    with torch.no_grad():
        plain = torch.softmax(model(images)[1], 1)
    assert torch.allclose(plca.aggregate_predict(model, images, alpha=0.0), plain, atol=1e-6)
    assert not torch.allclose(probs, plain, atol=1e-3)
    assert torch.allclose(plca.aggregate_predict(model, images, chunk=7), probs, atol=1e-6)


def test_iter_size_accumulates_to_the_mean_over_micro_batches():
    """--plca-iter-size 2 on 2 pairs gives the gradient of the mean of the two single-pair objectives."""
    torch.manual_seed(0)
    model = TinyDeepLab(num_classes=5)
    source = {"image": torch.rand(2, 3, 64, 48), "label": torch.randint(0, 5, (2, 64, 48))}
    target = {"image": torch.rand(2, 3, 64, 48)}
    method = make_method(model, "--plca-iter-size", "2")
    common.set_lr(method.optimizer, 0.0)   # the step leaves the model as it is, as the loop's schedule would
    method.train_step(source, target, 0)
    accumulated = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for b in range(2):
        _, total = method.losses(source["image"][b:b + 1], source["label"][b:b + 1], target["image"][b:b + 1])
        (total / 2).backward()
    for got, expected in zip(accumulated, (p.grad for p in model.parameters())):
        assert torch.allclose(got, expected, atol=1e-6)


def test_recipe_and_logged_terms():
    args = flags.parse_args(["--method", "plca", "--source", "gta5", "--out", "unused"])
    assert (args.lr, args.head_lr_mult, args.bn, args.lovasz_weight, args.align_corners) == (2.5e-4, 1.0, "train", 1.5,
                                                                                              False)
    assert (args.crop, args.source_size, args.target_size, args.random_scale) == ("730x730", "1383x760", "1520x760",
                                                                                  [1.0, 1.3])
    assert (args.iters, args.batch_size, args.backbone) == (11160, 4, "deeplabv2-r101-caffe")
    # a term whose weight is 0 is not logged
    torch.manual_seed(0)
    method = make_method(TinyDeepLab(num_classes=5), "--lovasz-weight", "0", "--plca-lambda-cass", "0")
    terms, _ = method.losses(torch.rand(2, 3, 64, 48), torch.randint(0, 5, (2, 64, 48)), torch.rand(2, 3, 64, 48))
    assert set(terms) == {"ce", "fass", "lsr_s", "lsr_t"}


# --------------------------------------------------------------------------------------------------
# Smoke run through train.py and evaluate.py, resume
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_train_and_evaluate_with_aggregation(tmp_path):
    out = tmp_path / "run"
    res = run_script("train.py", "--method", "plca", "--out", out, *TOY_FAST)
    assert res.returncode == 0, res.stderr[-2000:]
    for term in ("ce", "lovasz", "fass", "cass", "lsr_s", "lsr_t"):
        assert f" {term} " in res.stdout
    ckpt = out / "last.pt"
    res = run_script("evaluate.py", "--ckpt", ckpt, "--workers", "0", "--device", "cpu",
                     "--json", tmp_path / "eval.json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "test-time aggregation on" in res.stdout
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["tta_aggregate"] is True and math.isfinite(record["miou"])
    res = run_script("evaluate.py", "--ckpt", ckpt, "--workers", "0", "--device", "cpu", "--tta-aggregate", "off")
    assert res.returncode == 0 and "test-time aggregation off" in res.stdout
    # bad input: one line, exit 2
    res = run_script("train.py", "--method", "plca", "--out", tmp_path / "bad", *TOY_FAST, "--plca-iter-size", "3")
    assert res.returncode == 2 and "--plca-iter-size" in res.stderr and "Traceback" not in res.stderr
    assert os.path.exists(ckpt)


def float_tensors(obj, prefix=""):
    """{path: tensor} of every floating-point tensor in a nested checkpoint."""
    if torch.is_tensor(obj):
        return {prefix: obj} if obj.is_floating_point() else {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {path: t for key, value in items for path, t in float_tensors(value, f"{prefix}/{key}").items()}


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    """Stopped at iteration 3 (not an evaluation iteration of the straight run) and resumed: every float
    tensor of last.pt equals the straight run's. --plca-max-pixels draws subsets from the method's generator."""
    flags = ["--method", "plca", *TOY_FAST, "--plca-max-pixels", "64", "--plca-iter-size", "2"]
    straight = run_script("train.py", "--out", tmp_path / "a", *flags)
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = run_script("train.py", "--out", tmp_path / "b", *flags, "--stop-iter", "3")
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_script("train.py", "--out", tmp_path / "b", *flags, "--resume", tmp_path / "b" / "last.pt")
    assert second.returncode == 0, second.stderr[-2000:]
    a = common.load_checkpoint(str(tmp_path / "a" / "last.pt"))
    b = common.load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert a["iter"] == b["iter"] == 6 and torch.equal(a["method"]["generator"], b["method"]["generator"])
    tensors_a, tensors_b = float_tensors({k: a[k] for k in ("model", "method")}), float_tensors(
        {k: b[k] for k in ("model", "method")})
    assert tensors_a.keys() == tensors_b.keys() and len(tensors_a) > 10
    for path, tensor in tensors_a.items():
        assert torch.equal(tensor, tensors_b[path]), path
