"""SDCA: statistics estimator, pixel contrastive loss, source augmentation and generator, the method,
its recipe, the init command, resume. (The augmentation functions themselves: tests/test_augment.py.)"""
import copy
import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TOY_FAST, run_script
from uda import augment, common, datasets, flags, models, sdca
from uda.common import IGNORE_INDEX, UserError


def random_labels(n, num_classes, generator, ignore_frac=0.2):
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    return labels.masked_fill(torch.rand(n, generator=generator) < ignore_frac, IGNORE_INDEX)


# --------------------------------------------------------------------------------------------------
# Estimator
# --------------------------------------------------------------------------------------------------
def test_statistics_match_brute_force_over_all_pixels_seen():
    g = torch.Generator().manual_seed(0)
    K, D = 5, 7
    stats = sdca.ClassStatistics(K, D)
    batches = []
    for step in range(6):
        n = 40 + 13 * step
        x = torch.randn(n, D, generator=g) * 2 + 10  # far from 0: E[x^2] - m^2 would lose digits in fp32
        y = random_labels(n, K - 1, g)               # class K-1 never occurs
        if step == 2:
            y = torch.full((n,), IGNORE_INDEX)       # an all-ignore batch changes nothing
        if step == 3:
            y = y.masked_fill(y == 1, 0)             # class 1 absent from this batch
            y[0] = 1                                 # ... except a single pixel (variance 0 in-batch)
        stats.update(x, y)
        batches.append((x, y))
        xs = torch.cat([b[0] for b in batches]).double()
        ys = torch.cat([b[1] for b in batches])
        for k in range(K):
            rows = xs[ys == k]
            assert stats.count[k].item() == rows.shape[0]
            if rows.shape[0] == 0:
                assert torch.all(stats.mean[k] == 0) and torch.all(stats.var[k] == 0)
                continue
            torch.testing.assert_close(stats.mean[k].double(), rows.mean(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(stats.var[k].double(), rows.var(0, unbiased=False), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(stats.mean).all() and torch.isfinite(stats.var).all()


def test_statistics_accumulate_in_fp32_from_bf16_features():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g).bfloat16()
    y = random_labels(64, 3, g)
    a, b = sdca.ClassStatistics(3, 6), sdca.ClassStatistics(3, 6)
    a.update(x, y)
    b.update(x.float(), y)
    assert a.mean.dtype == torch.float32 and a.count.dtype == torch.float64
    assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)


def test_statistics_reject_labels_outside_the_classes():
    with pytest.raises(AssertionError):
        sdca.ClassStatistics(3, 2).update(torch.zeros(2, 2), torch.tensor([0, 3]))


# --------------------------------------------------------------------------------------------------
# Pixel contrastive loss
# --------------------------------------------------------------------------------------------------
def loop_pcl(features, labels, mean, var, tau):
    """The loss written per pixel with Python floats: the obvious reading of the formula."""
    def unit(v):
        norm = math.sqrt(sum(a * a for a in v))
        return [a / norm for a in v] if norm > 0 else [0.0] * len(v)
    mus, sigs = [unit(m) for m in mean.tolist()], [unit(s) for s in var.tolist()]
    total, count = 0.0, 0
    for f, y in zip(features.tolist(), labels.tolist()):
        if y == IGNORE_INDEX:
            continue
        z = unit(f)
        terms = [sum(a * b for a, b in zip(z, mu)) / tau + 0.5 * sum(a * a * s for a, s in zip(z, sig)) / tau ** 2
                 for mu, sig in zip(mus, sigs)]
        positive = sum(a * b for a, b in zip(z, mus[y])) / tau
        total += math.log(sum(math.exp(t) for t in terms)) - positive
        count += 1
    return total / count


@pytest.mark.parametrize("tau", [100.0, 0.5])
def test_pcl_matches_per_pixel_loop(tau):
    g = torch.Generator().manual_seed(2)
    K, D, N = 4, 5, 30
    f, y = torch.randn(N, D, generator=g), random_labels(N, K, g)
    mean, var = torch.randn(K, D, generator=g), torch.rand(K, D, generator=g)
    mean[3] = 0.0  # an empty class: mean 0 stays 0 after normalisation
    loss = sdca.pcl_loss(f, y, mean, var, tau)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(loop_pcl(f, y, mean, var, tau), rel=1e-5, abs=1e-6)


def test_pcl_with_zero_variance_is_ce_over_cosine_similarities():
    g = torch.Generator().manual_seed(3)
    f, y = torch.randn(50, 8, generator=g), random_labels(50, 6, g)
    mean, tau = torch.randn(6, 8, generator=g), 0.3
    cos = F.normalize(f, dim=1) @ F.normalize(mean, dim=1).t()  # (N, K)
    expected = F.cross_entropy(cos / tau, y, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(sdca.pcl_loss(f, y, mean, torch.zeros(6, 8), tau), expected)


def test_pcl_upper_bounds_monte_carlo_contrastive_loss():
    """E over means m_k ~ N(mu_k, diag(sig2_k)) of CE(z.m/tau, y) lies between the loss at the means
    (Jensen, logsumexp convex) and the closed form (Jensen + Gaussian MGF)."""
    g = torch.Generator().manual_seed(4)
    K, D, N, S, tau = 3, 4, 6, 200_000, 0.7
    z = F.normalize(torch.randn(N, D, generator=g), dim=1)
    y = torch.randint(0, K, (N,), generator=g)
    mu = F.normalize(torch.randn(K, D, generator=g), dim=1)
    sig2 = F.normalize(torch.rand(K, D, generator=g) + 0.1, dim=1)  # already unit: the loss's own normalisation
    samples = mu + sig2.sqrt() * torch.randn(S, K, D, generator=g)  # (S, K, D)
    logits = torch.einsum("nd,skd->snk", z, samples) / tau          # (S, N, K)
    per_draw = F.cross_entropy(logits.reshape(-1, K), y.repeat(S), reduction="none").view(S, N).mean(1)  # (S,)
    mc, stderr = per_draw.mean().item(), per_draw.std().item() / math.sqrt(S)
    bound = sdca.pcl_loss(z, y, mu, sig2, tau).item()
    at_means = sdca.pcl_loss(z, y, mu, torch.zeros(K, D), tau).item()
    assert at_means + 5 * stderr < mc < bound - 5 * stderr, (at_means, mc, bound, stderr)


def test_pcl_ignores_255_and_only_labelled_pixels_contribute():
    g = torch.Generator().manual_seed(5)
    f = torch.randn(20, 6, generator=g, requires_grad=True)
    y = torch.randint(0, 2, (20,), generator=g) * 2  # classes 0 and 2 only, out of 5
    y[::3] = IGNORE_INDEX
    mean, var = torch.randn(5, 6, generator=g), torch.rand(5, 6, generator=g)
    loss = sdca.pcl_loss(f, y, mean, var, 1.0)
    loss.backward()
    assert torch.all(f.grad[y == IGNORE_INDEX] == 0) and torch.all(f.grad[y != IGNORE_INDEX].abs().sum(1) > 0)
    keep = y != IGNORE_INDEX
    torch.testing.assert_close(sdca.pcl_loss(f[keep], y[keep], mean, var, 1.0), loss)
    empty = sdca.pcl_loss(f, torch.full((20,), IGNORE_INDEX), mean, var, 1.0)
    assert empty.item() == 0.0 and empty.requires_grad


def test_pcl_gradients_reach_features_not_statistics():
    f = torch.randn(10, 4, requires_grad=True)
    y = torch.randint(0, 3, (10,))
    mean = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(AssertionError):
        sdca.pcl_loss(f, y, mean, torch.rand(3, 4), 1.0)
    sdca.pcl_loss(f, y, mean.detach(), torch.rand(3, 4), 1.0).backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_pcl_bf16_autocast_matches_fp32():
    g = torch.Generator().manual_seed(6)
    f, y = torch.randn(200, 16, generator=g), random_labels(200, 5, g)
    mean, var = torch.randn(5, 16, generator=g), torch.rand(5, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sdca.pcl_loss(f.bfloat16(), y, mean, var, 0.5)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(sdca.pcl_loss(f, y, mean, var, 0.5).item(), rel=1e-2)


def test_confident_pseudo_labels_and_label_downsampling():
    logits = torch.tensor([[10.0, 0.0], [0.1, 0.0]]).t().reshape(1, 2, 1, 2)  # pixel 0 sure, pixel 1 not
    assert sdca.confident_pseudo_labels(logits, 0.9).tolist() == [[[0, IGNORE_INDEX]]]
    labels = torch.arange(16).view(1, 4, 4)
    assert common.downsample_labels(labels, (2, 2)).tolist() == [[[0, 2], [8, 10]]]


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
def make_method(*extra):
    """SDCA on the tiny toy model, built as train.py builds it, from train.py's own parser."""
    args = flags.parse_args(["--method", "sdca", "--out", "-", "--iters", "6", "--stop-iter", "6", "--lr", "0.01",
                             *map(str, extra)])
    torch.manual_seed(0)
    model = models.build_model(args.backbone, datasets.TOY_SPACE.num_classes, bn=args.bn)
    env = common.make_env("cpu", args.amp, datasets.TOY_SPACE)
    return model, sdca.SDCA(model, args, env)


def toy_batch(seed, labeled=True):
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.rand(2, 3, 64, 128, generator=g)}
    if labeled:
        batch["label"] = torch.randint(0, 4, (2, 64, 128), generator=g)
    return batch


def test_feature_loss_reaches_only_the_backbone_output_loss_both():
    model, _ = make_method()
    feats, logits = model(toy_batch(0)["image"])
    y = common.downsample_labels(toy_batch(0)["label"], feats.shape[-2:]).reshape(-1)
    stats = sdca.ClassStatistics(19, model.feature_dim)
    stats.update(sdca.flatten_pixels(feats), y)
    assert not stats.mean.requires_grad and not stats.var.requires_grad
    sdca.pcl_loss(sdca.flatten_pixels(feats), y, stats.mean, stats.var, 1.0).backward(retain_graph=True)
    assert all(p.grad is None for p in model.classifier.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    out = sdca.ClassStatistics(19, 19)
    out.update(sdca.flatten_pixels(logits), y)
    sdca.pcl_loss(sdca.flatten_pixels(logits), y, out.mean, out.var, 1.0).backward()
    assert all(p.grad is not None for p in model.classifier.parameters())


def test_train_step_updates_statistics_from_source_labels_only():
    model, method = make_method()
    losses = method.train_step(toy_batch(0), toy_batch(1, labeled=False), 0)
    assert set(losses) == {"ce", "lovasz", "feat", "out", "target_confident"}
    assert all(torch.isfinite(v) for v in losses.values())
    # one source batch of 2 x 8 x 16 pixels at stride 8, classes 0..3 only
    assert method.feat_stats.count.sum().item() == 2 * 8 * 16 and method.feat_stats.count[4:].sum() == 0
    assert torch.equal(method.feat_stats.count, method.out_stats.count)


def test_init_statistics_file_is_checked(tmp_path):
    stats = sdca.ClassStatistics(19, 32)  # the tiny backbone has D = 64
    torch.save({"feat": stats.state_dict(), "out": sdca.ClassStatistics(19, 19).state_dict()}, tmp_path / "s.pt")
    with pytest.raises(UserError, match="--sdca-init-stats"):
        make_method("--sdca-init-stats", tmp_path / "s.pt")
    torch.save({"other": 1}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="not a file written"):
        make_method("--sdca-init-stats", tmp_path / "bad.pt")
    with pytest.raises(UserError, match="--sdca-tau"):
        make_method("--sdca-tau", "0")


def test_recipe_is_the_official_sdca_stage():
    args = flags.parse_args(["--method", "sdca", "--source", "gta5", "--out", "-"])
    expected = {"lr": 2.5e-4, "head_lr_mult": 10.0, "momentum": 0.9, "weight_decay": 5e-4, "poly_power": 0.9,
                "iters": 62500, "stop_iter": 40000, "batch_size": 4, "bn": "frozen",
                "source_sampler": "class-balanced", "synthia_classes": 16, "lovasz_weight": 0.75,
                "align_corners": True, "backbone": "deeplabv2-r101"}
    assert {key: getattr(args, key) for key in expected} == expected
    assert (args.sdca_jitter, args.sdca_grayscale, args.sdca_blur_kernel, args.sdca_blur_sigma) == (
        [0.5, 0.5, 0.5, 0.2], 0.2, 3, [0.1, 2.0])
    assert flags.parse_args(["--method", "sdca", "--out", "-"]).backbone == "tiny"  # the toy keeps its network


def capture_model_inputs(model):
    """A list that receives a copy of the images of every forward of `model`."""
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    return seen


def test_only_the_source_is_augmented_jitter_then_grayscale_then_blur_from_the_method_generator():
    model, method = make_method()
    seen = capture_model_inputs(model)
    source, target = toy_batch(0), toy_batch(1, labeled=False)
    g = common.method_generator(0, sdca.GENERATOR_STREAM)  # the method's generator, as it starts
    assert torch.equal(method.generator.get_state(), g.get_state())
    expected = augment.color_jitter(source["image"], 0.5, 0.5, 0.5, 0.2, g)
    expected = augment.random_grayscale(expected, 0.2, g)
    expected = augment.random_gaussian_blur(expected, 3, (0.1, 2.0), g)
    method.train_step(source, target, 0)
    assert not torch.equal(expected, source["image"])
    assert torch.equal(seen[0], expected) and torch.equal(seen[1], target["image"])
    assert torch.equal(method.generator.get_state(), g.get_state())  # no other draw from it


def test_augment_off_feeds_both_batches_unchanged_and_draws_nothing():
    model, method = make_method("--sdca-augment", "off")
    seen = capture_model_inputs(model)
    source, target = toy_batch(0), toy_batch(1, labeled=False)
    before = method.generator.get_state()
    method.train_step(source, target, 0)
    assert torch.equal(seen[0], source["image"]) and torch.equal(seen[1], target["image"])
    assert torch.equal(method.generator.get_state(), before)


def test_train_step_leaves_the_global_rng_alone():
    _, method = make_method()
    state = torch.get_rng_state()
    method.train_step(toy_batch(0), toy_batch(1, labeled=False), 0)
    assert torch.equal(torch.get_rng_state(), state)


def test_load_state_dict_restores_generator_and_statistics_so_the_next_step_is_identical():
    model_a, a = make_method()
    a.train_step(toy_batch(0), toy_batch(1, labeled=False), 0)
    weights, state = copy.deepcopy(model_a.state_dict()), copy.deepcopy(a.state_dict())
    model_b, b = make_method()
    assert not torch.equal(b.generator.get_state(), state["generator"])  # a fresh method would augment otherwise
    model_b.load_state_dict(weights)
    b.load_state_dict(state)
    logged_a = a.train_step(toy_batch(2), toy_batch(3, labeled=False), 1)
    logged_b = b.train_step(toy_batch(2), toy_batch(3, labeled=False), 1)
    assert logged_a.keys() == logged_b.keys()
    assert all(torch.equal(logged_a[k], logged_b[k]) for k in logged_a)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    for key, value in model_a.state_dict().items():
        assert torch.equal(model_b.state_dict()[key], value), key


def test_terms_with_weight_zero_are_not_logged():
    _, method = make_method("--lovasz-weight", "0", "--sdca-lambda-feat", "0")
    logged = method.train_step(toy_batch(0), toy_batch(1, labeled=False), 0)
    assert set(logged) == {"ce", "out", "target_confident"}
    assert all(v.dim() == 0 and not v.requires_grad for v in logged.values())


# --------------------------------------------------------------------------------------------------
# The estimator under two processes (gloo): synced updates and the init pass's final reduction
# --------------------------------------------------------------------------------------------------
def _two_rank_worker(rank, init_file, shards, result_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    synced, local = sdca.ClassStatistics(4, 3), sdca.ClassStatistics(4, 3)
    for x, y in shards[rank]:
        synced.update(x, y)               # every rank sums over both ranks' pixels
    for x, y in shards[rank][: 1 + rank]:  # ranks see different numbers of batches
        local.update(x, y, sync=False)
    local.all_reduce_()
    torch.save({"synced": synced.state_dict(), "local": local.state_dict()}, f"{result_file}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_statistics_under_two_processes_equal_one_process():
    g = torch.Generator().manual_seed(9)
    shards = [[(torch.randn(30, 3, generator=g) + 3, random_labels(30, 4, g)) for _ in range(2)] for _ in range(2)]
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_two_rank_worker, args=(os.path.join(tmp, "init"), shards,
                                                            os.path.join(tmp, "out")), nprocs=2)
        results = [torch.load(os.path.join(tmp, f"out.{r}")) for r in range(2)]
    synced = sdca.ClassStatistics(4, 3)
    for step in range(2):  # one process, each step the union of both ranks' batches
        synced.update(torch.cat([shards[0][step][0], shards[1][step][0]]),
                      torch.cat([shards[0][step][1], shards[1][step][1]]))
    local = sdca.ClassStatistics(4, 3)
    local.update(torch.cat([shards[0][0][0], shards[1][0][0], shards[1][1][0]]),
                 torch.cat([shards[0][0][1], shards[1][0][1], shards[1][1][1]]))
    for rank in range(2):
        for name, expected in (("synced", synced), ("local", local)):
            for key, value in expected.state_dict().items():
                torch.testing.assert_close(results[rank][name][key], value, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# End to end: source-only -> init -> SDCA, and resume restores the statistics exactly
# --------------------------------------------------------------------------------------------------
def run_module(module, *args):
    """`python -m module args...` from the repository root, as the README runs it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=600)


def standin_checkpoint(path):
    """A stand-in for a source-only checkpoint: an untrained tiny model in train.py's format."""
    torch.manual_seed(0)
    torch.save({"model": models.build_model("tiny", 19).state_dict(),
                "args": {"method": "source_only", "source": "toy-synth", "backbone": "tiny"}}, path)
    return path


def checkpoint_tensors(obj, path=()):
    """(path, tensor) for every tensor inside the nested dicts / lists / tuples of a checkpoint."""
    if torch.is_tensor(obj):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from checkpoint_tensors(value, path + (key,))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from checkpoint_tensors(value, path + (i,))


@pytest.mark.slow
def test_toy_pipeline_and_exact_resume(tmp_path):
    src, stats = standin_checkpoint(tmp_path / "src.pt"), tmp_path / "stats.pt"
    r = run_module("uda.sdca", "init", "--ckpt", src, "--out", stats, "--max-images", "8",
                   "--workers", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    init = torch.load(stats)
    assert init["out"]["count"].sum().item() == 8 * (128 // 8) * (256 // 8)  # toy images are 256 x 128
    # the recipe's sampler (class-balanced); BN stays trainable on the tiny net; evaluation only where a
    # run stops, so the split at 3 is an evaluation point of the interrupted run only
    common_flags = ["--method", "sdca", "--pretrained", src, "--sdca-init-stats", stats, *TOY_FAST,
                    "--eval-every", "100"]
    r = run_script("train.py", *common_flags, "--stop-iter", "6", "--out", tmp_path / "full")
    assert r.returncode == 0, r.stderr
    assert "loss/feat" in (tmp_path / "full" / "metrics.jsonl").read_text()
    r = run_script("train.py", *common_flags, "--stop-iter", "3", "--out", tmp_path / "part")
    assert r.returncode == 0, r.stderr
    r = run_script("train.py", *common_flags, "--stop-iter", "6", "--out", tmp_path / "part",
                   "--resume", tmp_path / "part" / "last.pt")
    assert r.returncode == 0, r.stderr
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    part = torch.load(tmp_path / "part" / "last.pt", weights_only=False)
    assert full["iter"] == part["iter"] == 6
    # the recipe's BN mode describes its real network: the toy's tiny net keeps "auto" (trainable)
    assert full["args"]["bn"] == "auto" and full["args"]["source_sampler"] == "class-balanced"
    # every tensor: model, optimizer, class statistics, the method's generator; not the global RNG,
    # which only the interrupted run's extra evaluation (its loader's seed) drew from
    full_tensors = {p: t for p, t in checkpoint_tensors(full) if p[0] != "rng"}
    part_tensors = {p: t for p, t in checkpoint_tensors(part) if p[0] != "rng"}
    assert full_tensors.keys() == part_tensors.keys() and ("method", "generator") in full_tensors
    assert any(t.is_floating_point() for t in full_tensors.values())
    for path, value in full_tensors.items():
        assert torch.equal(part_tensors[path], value), path
    # 6 iterations x 2 source images x 8 x 16 pixels pooled on top of the init statistics
    added = full["method"]["out_stats"]["count"].sum() - init["out"]["count"].sum()
    assert added.item() == 6 * 2 * 8 * 16


@pytest.mark.slow
def test_init_refuses_an_existing_out_file(tmp_path):
    src, out = standin_checkpoint(tmp_path / "src.pt"), tmp_path / "stats.pt"
    out.write_bytes(b"the user's own file")
    r = run_module("uda.sdca", "init", "--ckpt", src, "--out", out, "--max-images", "2", "--workers", "0",
                   "--device", "cpu")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--out" in lines[0] and "--overwrite" in lines[0], r.stderr
    assert out.read_bytes() == b"the user's own file"
    with pytest.raises(UserError, match="is a folder"):
        sdca.init_main(["init", "--ckpt", str(src), "--out", str(tmp_path), "--device", "cpu"])
    sdca.init_main(["init", "--ckpt", str(src), "--out", str(out), "--overwrite", "--max-images", "2",
                    "--workers", "0", "--device", "cpu"])
    assert torch.load(out)["images"] == 2


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--workers", "-1"), ("--max-images", "0")])
def test_init_rejects_counts_out_of_range(tmp_path, flag, value):
    with pytest.raises(UserError, match=flag):
        sdca.parse_init_args(["init", "--ckpt", "c.pt", "--out", str(tmp_path / "s.pt"), flag, value])


def test_init_reads_only_the_source_list(tmp_path):
    # the toy is generated: a list reaching its dataset is refused, naming the list (the flag is wired)
    src, listed = standin_checkpoint(tmp_path / "src.pt"), tmp_path / "subset.txt"
    listed.write_text("a.png\n")
    with pytest.raises(UserError, match="subset.txt"):
        sdca.init_main(["init", "--ckpt", str(src), "--out", str(tmp_path / "s.pt"), "--source-list", str(listed),
                        "--workers", "0", "--device", "cpu"])
