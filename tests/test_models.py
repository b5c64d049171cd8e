"""Backbones and weight loading (uda/models.py, uda/mit.py).

The big networks are built once per module and run on tiny 65x65 inputs; weight files are state dicts
written under the public files' key names from our own modules' shapes (no download).
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TOY_FAST, run_script
from uda import mit, models
from uda.common import UserError

SIZE = 65          # 8k + 1: every stride-8 network gives 9x9, the stride-4 MiT 17x17
CLASSES = 5
# torchvision's documented parameter counts (torchvision.models weights tables) minus the 1000-way fc
IMAGENET_FC = 2048 * 1000 + 1000
RESNET101_NO_FC = 44_549_160 - IMAGENET_FC   # 42.5M
RESNET50_NO_FC = 25_557_032 - IMAGENET_FC
VGG16_FEATURES = 14_714_688                  # torchvision vgg16.features (conv1_1 .. conv5_3)
MIT_B5_ENCODER_M = 81.4                      # SegFormer paper, Table 1 (MiT-B5 encoder, millions)


def build(name, bn="auto"):
    torch.manual_seed(0)
    return models.build_model(name, CLASSES, bn=bn)


@pytest.fixture(scope="module")
def nets():
    return {name: build(name) for name in models.BACKBONES}


def backbone_tensor_count(model):
    """Learnable values of the backbone whatever the BN mode (frozen BN keeps its affine as buffers)."""
    return sum(v.numel() for k, v in model.backbone.state_dict().items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def foreign(model, prefix="", extra=None):
    """The backbone's state dict under a public file's names (prefix + torchvision/SegFormer names), each
    value shifted by 1 so a load is visible, plus the file's own head (`extra`)."""
    state = {prefix + k[len("backbone."):]: v + 1 for k, v in model.state_dict().items()
             if k.startswith("backbone.") and not k.endswith("num_batches_tracked")}
    state.update(extra or {})
    return state


# --------------------------------------------------------------------------------------------------
# Shapes, strides, parameter counts
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", models.BACKBONES)
@pytest.mark.slow
def test_shapes_and_output_stride(nets, name):
    model = nets[name].eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        features, logits, encoder = model(images, with_encoder=True)
        alone = model.encoder_features(images)
    side = math.ceil(SIZE / model.output_stride)
    if name == "deeplabv2-vgg16":
        side = SIZE // model.output_stride  # VGG's 2x2 max-pools floor
    assert features.shape == (2, model.feature_dim, side, side)
    assert logits.shape == (2, CLASSES, side, side)
    assert model.num_classes == CLASSES
    assert torch.allclose(encoder, alone)
    assert (features >= 0).all()  # layer4 / fc7 / the DAFormer bottleneck end in a ReLU
    if name.startswith("mit"):
        assert model.output_stride == 4 and features.shape[1] == mit.DAFORMER_CHANNELS
        assert encoder.shape[1:] == (model.backbone.embed_dims[-1], math.ceil(SIZE / 32), math.ceil(SIZE / 32))
    else:
        assert model.output_stride == 8 and torch.equal(encoder, features)


@pytest.mark.slow
def test_caffe_and_torchvision_resnets_differ_where_expected(nets):
    tv, caffe = nets["deeplabv2-r101"].backbone, nets["deeplabv2-r101-caffe"].backbone
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():  # ceil-mode max-pool: 32 -> 17 (Caffe) against 16
        assert caffe.maxpool(caffe.conv1(x)).shape[-1] == 17 and tv.maxpool(tv.conv1(x)).shape[-1] == 16
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer2[0].conv2.stride == (1, 1)
    assert tv.layer2[0].conv1.stride == (1, 1) and tv.layer2[0].conv2.stride == (2, 2)
    assert [b.conv2.dilation[0] for b in caffe.layer3] == [2] * 23
    assert [b.conv2.dilation[0] for b in tv.layer3] == [1] + [2] * 22
    assert [b.conv2.dilation[0] for b in caffe.layer4] == [4, 4, 4]
    assert [b.conv2.dilation[0] for b in tv.layer4] == [2, 4, 4]


@pytest.mark.slow
def test_parameter_counts(nets):
    assert backbone_tensor_count(nets["deeplabv2-r101"]) == RESNET101_NO_FC
    assert backbone_tensor_count(nets["deeplabv2-r101-caffe"]) == RESNET101_NO_FC
    assert backbone_tensor_count(nets["deeplabv2-r50"]) == RESNET50_NO_FC
    assert models.count_parameters(nets["deeplabv2-vgg16"].backbone.features) == VGG16_FEATURES
    assert round(models.count_parameters(nets["mit-b5"].backbone) / 1e6, 1) == MIT_B5_ENCODER_M
    aspp = nets["deeplabv2-r101"].classifier
    assert len(aspp.branches) == 4 and [b.dilation[0] for b in aspp.branches] == [6, 12, 18, 24]


def test_mit_attention_matches_the_explicit_formula():
    torch.manual_seed(0)
    attn = mit.Attention(dim=8, num_heads=2, sr_ratio=2)
    x = torch.randn(3, 16, 8)  # (B, N = 4x4, C)
    B, N, C, h, d = 3, 16, 8, 2, 4
    q = attn.q(x).reshape(B, N, h, d)
    reduced = attn.norm(attn.sr(x.transpose(1, 2).reshape(B, C, 4, 4)).flatten(2).transpose(1, 2))  # (B, 4, C)
    k, v = attn.kv(reduced).reshape(B, 4, 2, h, d).unbind(2)  # SegFormer's layout: [k | v], heads inside
    out = torch.empty(B, N, h, d)
    for head in range(h):
        weights = torch.softmax(q[:, :, head] @ k[:, :, head].transpose(1, 2) / math.sqrt(d), dim=-1)
        out[:, :, head] = weights @ v[:, :, head]
    assert torch.allclose(attn(x, 4, 4), attn.proj(out.reshape(B, N, C)), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# BatchNorm modes, parameter groups, training
# --------------------------------------------------------------------------------------------------
def test_frozen_bn_matches_eval_batchnorm_and_keeps_dtype():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(6)
    bn.running_mean.normal_(); bn.running_var.uniform_(0.5, 2); bn.weight.data.normal_(); bn.bias.data.normal_()
    frozen = models.freeze_batchnorm(torch.nn.Sequential(bn))[0]
    x = torch.randn(2, 6, 3, 3)
    assert torch.allclose(frozen(x), bn.eval()(x), atol=1e-6)
    assert frozen(x.bfloat16()).dtype == torch.bfloat16
    assert list(frozen.parameters()) == []


@pytest.mark.slow
def test_frozen_bn_stays_frozen_after_a_training_step(nets):
    model = nets["deeplabv2-r50"].train()
    assert model.bn_mode == "frozen" and not models.has_trainable_bn(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    stats = {k: v.clone() for k, v in model.state_dict().items() if "bn" in k or "downsample.1" in k}
    conv = model.backbone.layer1[0].conv1.weight.detach().clone()
    opt = torch.optim.SGD([dict(g, lr=0.1 * g["lr_mult"]) for g in model.param_groups(10.0)], lr=0.1)
    _, logits = model(torch.rand(2, 3, SIZE, SIZE))
    F.cross_entropy(logits, torch.randint(0, CLASSES, logits.shape[:1] + logits.shape[2:])).backward()
    opt.step()
    after = model.state_dict()
    assert stats and all(torch.equal(v, after[k]) for k, v in stats.items())
    assert not torch.equal(conv, model.backbone.layer1[0].conv1.weight)
    model.train()
    assert all(not m.training or not isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_bn_modes():
    assert models.build_model("tiny", 3).bn_mode == "train"
    assert models.has_trainable_bn(models.build_model("tiny", 3))
    assert not models.has_trainable_bn(models.build_model("tiny", 3, bn="frozen"))
    assert models.resolve_bn("deeplabv2-vgg16", "auto") == "frozen"
    assert models.resolve_bn("mit-b5", "auto") == "train"
    with pytest.raises(UserError, match="--bn"):
        models.build_model("tiny", 3, bn="sync")


@pytest.mark.slow
def test_param_groups_cover_every_parameter_once(nets):
    for name in ("deeplabv2-vgg16", "mit-b0", "tiny"):
        model = nets[name]
        groups = model.param_groups(10.0)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)) == len([p for p in model.parameters() if p.requires_grad])
        head = model.decode_head if name.startswith("mit") else model.classifier
        head_ids = {id(p) for p in head.parameters()}
        for g in groups:
            assert all((id(p) in head_ids) == (g["lr_mult"] == 10.0) for p in g["params"])
    mit_groups = nets["mit-b0"].param_groups(10.0)
    no_decay = [g for g in mit_groups if g.get("weight_decay") == 0.0]
    norms = [p for n, p in nets["mit-b0"].backbone.named_parameters() if "norm" in n]
    assert len(no_decay) == 1 and {id(p) for p in no_decay[0]["params"]} == {id(p) for p in norms}
    layer_norms = [m for m in nets["mit-b0"].backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * len(layer_norms)


def test_mit_b0_forward_backward():
    model = build("mit-b0").train()
    images = torch.rand(2, 3, SIZE, SIZE)
    features, logits, encoder = model(images, with_encoder=True)
    up = F.interpolate(logits, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    loss = F.cross_entropy(up, torch.randint(0, CLASSES, (2, SIZE, SIZE))) + encoder.pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert models.has_trainable_bn(model)  # the DAFormer head's BN
    assert any(isinstance(m, mit.DropPath) and m.p > 0 for m in model.modules())


@pytest.mark.parametrize("name", ["deeplabv2-r50", "mit-b0"])
@pytest.mark.slow
def test_bf16_autocast_close_to_fp32(nets, name):
    model = nets[name].eval()
    images = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        reference = model(images)[1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(images)[1]
    assert half.dtype == torch.bfloat16
    assert F.cosine_similarity(half.float().flatten(), reference.flatten(), dim=0) > 0.99


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchvision_resnet_file_loads(nets):
    model = nets["deeplabv2-r101"]
    state = foreign(model, extra={"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000),
                                  "bn1.num_batches_tracked": torch.tensor(0)})
    report = models.load_weights(model, state, "resnet101-5d3b4d8f.pth", "deeplabv2-r101")
    assert all(k.startswith("classifier.") for k in report["missing"]) and len(report["missing"]) == 8
    assert sorted(report["unexpected"]) == ["fc.bias", "fc.weight"]
    assert torch.equal(model.backbone.layer4[2].bn3.running_var, state["layer4.2.bn3.running_var"])
    assert report["convention"] == "imagenet-rgb"


@pytest.mark.slow
def test_deeplab_coco_init_loads_and_sets_caffe_normalisation(nets):
    model = nets["deeplabv2-r101-caffe"]
    old_head = {f"Scale.layer5.conv2d_list.{i}.{p}": torch.zeros(21, 2048, 3, 3) if p == "weight" else torch.zeros(21)
                for i in range(4) for p in ("weight", "bias")}
    state = foreign(model, prefix="Scale.", extra=old_head)
    report = models.load_weights(model, state, "DeepLab_resnet_pretrained_init-f81d91e8.pth", "deeplabv2-r101-caffe")
    assert len(report["missing"]) == 8 and len(report["unexpected"]) == 8
    assert torch.equal(model.backbone.conv1.weight, state["Scale.conv1.weight"])
    assert report["convention"] == "caffe-bgr-deeplab"
    x = torch.rand(1, 3, 4, 4)
    expected = x[:, [2, 1, 0]] * 255 - torch.tensor(models.DEEPLAB_CAFFE_MEAN_BGR).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize(x), expected, atol=1e-3)


@pytest.mark.slow
def test_mit_b5_file_loads(nets):
    model = nets["mit-b5"]
    state = foreign(model, extra={"head.weight": torch.zeros(1000, 512), "head.bias": torch.zeros(1000)})
    report = models.load_weights(model, state, "mit_b5.pth", "mit-b5")
    assert report["missing"] and all(k.startswith("decode_head.") for k in report["missing"])
    assert sorted(report["unexpected"]) == ["head.bias", "head.weight"]
    assert torch.equal(model.backbone.block3[39].attn.kv.weight, state["block3.39.attn.kv.weight"])
    assert report["convention"] == "imagenet-rgb"


@pytest.mark.slow
def test_vgg16_file_loads_with_caffe_or_rgb_by_file(nets):
    model = nets["deeplabv2-vgg16"]
    state = foreign(model, extra={"classifier.0.weight": torch.zeros(4, 4)})
    state = {k: v for k, v in state.items() if not k.startswith(("fc6", "fc7"))}  # new layers, not in the file
    report = models.load_weights(model, state, "vgg16-00b39a1b.pth", "deeplabv2-vgg16")
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in report["missing"]} == \
        {"backbone.fc6", "backbone.fc7", "classifier.branches"}
    assert report["convention"] == "caffe-bgr-vgg"
    assert models.load_weights(model, state, "vgg16-397923af.pth", "deeplabv2-vgg16")["convention"] == "imagenet-rgb"


@pytest.mark.slow
def test_wrong_files_fail_with_one_line_errors(nets):
    r50 = nets["deeplabv2-r50"]
    cases = [
        (foreign(nets["deeplabv2-vgg16"]), "backbone keys missing"),   # VGG file into a ResNet
        (foreign(nets["deeplabv2-r101"]), "unexpected keys"),         # ResNet-101 file into ResNet-50
        ({"foo.weight": torch.zeros(1)}, "unrecognised weights"),
        ([1, 2, 3], "not a state dict"),
    ]
    for state, message in cases:
        with pytest.raises(UserError, match=message) as err:
            models.load_weights(r50, state, "wrong.pth", "deeplabv2-r50")
        assert "\n" not in str(err.value) and "wrong.pth" in str(err.value)
    with pytest.raises(UserError, match="backbone.conv1.weight"):
        models.load_weights(r50, foreign(nets["deeplabv2-vgg16"]), "wrong.pth", "deeplabv2-r50")
    with pytest.raises(UserError, match="keys of another shape"):  # MiT-B0 file into MiT-B5
        models.load_weights(nets["mit-b5"], foreign(nets["mit-b0"]), "mit_b0.pth", "mit-b5")


def test_own_checkpoint_restores_weights_and_normalisation():
    source, fresh = build("mit-b0"), build("mit-b0", bn="frozen")
    with torch.no_grad():
        source.decode_head.conv_seg.bias.add_(1.0)
    source.normalize.set_convention("caffe-bgr-vgg")
    ckpt = {"model": source.state_dict(), "args": {"backbone": "mit-b0"}}
    report = models.load_weights(fresh, ckpt, "last.pt", "mit-b0")  # trainable BN counters are tolerated
    assert report["convention"] == "caffe-bgr-vgg" and not report["missing"]
    x = torch.rand(1, 3, 33, 33)
    with torch.no_grad():
        assert torch.allclose(source.eval()(x)[1], fresh.eval()(x)[1], atol=1e-5)
    with pytest.raises(UserError, match="--backbone mit-b0, not mit-b5"):
        models.load_weights(fresh, ckpt, "last.pt", "mit-b5")


@pytest.mark.slow
def test_check_cli(tmp_path):
    good, bad = tmp_path / "mit_b0.pth", tmp_path / "wrong.pth"
    torch.save(foreign(build("mit-b0"), extra={"head.weight": torch.zeros(1000, 256)}), good)
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, bad)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def check(*args):
        return subprocess.run([sys.executable, "-m", "uda.models", "check", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)

    ok = check("--backbone", "mit-b0", "--pretrained", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "loaded" in ok.stdout and "unexpected 1 skipped (head.weight)" in ok.stdout
    fail = check("--backbone", "mit-b0", "--pretrained", str(bad))
    assert fail.returncode == 2
    assert fail.stderr.count("\n") == 1 and fail.stderr.startswith("error: --pretrained")


@pytest.mark.slow
def test_train_and_evaluate_keep_the_bn_mode(tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", "--method", "source_only", "--source", "toy-synth", "--out", out,
                        "--bn", "frozen", *TOY_FAST)
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["args"]["bn"] == "frozen" and not any("num_batches_tracked" in k for k in ckpt["model"])
    import evaluate  # the evaluation side rebuilds the model with the saved BN mode
    model, saved, _ = evaluate.model_from_checkpoint(str(out / "last.pt"), torch.device("cpu"))
    assert saved.bn == "frozen" and isinstance(model.backbone[0][1], models.FrozenBatchNorm2d)


# --------------------------------------------------------------------------------------------------
# Gradient checkpointing (build_model(..., grad_checkpoint=True), train.py --grad-checkpoint)
# --------------------------------------------------------------------------------------------------
# checkpointed segments per forward: ResNet stem + 16 bottlenecks, VGG conv1_x..conv5_x + fc6-fc7,
# MiT-B0's 8 transformer blocks, the tiny network's 5 conv blocks
SEGMENTS = {"tiny": 5, "deeplabv2-r50": 17, "deeplabv2-vgg16": 6, "mit-b0": 8}
DROP_PATH_TEST = 0.5  # MiT's drop-path raised so that most blocks drop a sample the recomputation must replay


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """Counts torch.utils.checkpoint.checkpoint calls (both model files look it up at call time)."""
    calls, real = [], torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    return calls


def plain_and_checkpointed(name, bn):
    """The same network twice, the second built with grad_checkpoint, both in train mode."""
    plain = build(name, bn)
    recomputed = models.build_model(name, CLASSES, bn=bn, grad_checkpoint=True)
    recomputed.load_state_dict(plain.state_dict())  # strict: checkpointing adds no state
    for m in (*plain.modules(), *recomputed.modules()):
        if isinstance(m, mit.DropPath):
            m.p = DROP_PATH_TEST
    return plain.train(), recomputed.train()


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # fp16 on CPU is slow: tiny only


def seeded_loss(model, images, labels, seed, amp):
    torch.manual_seed(seed)  # the same drop-path / dropout draws for both copies
    dtype = AUTOCAST[amp]
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        features, logits, encoder = model(images, with_encoder=True)
    return F.cross_entropy(logits.float(), labels) + encoder.float().mean() + features.float().mean()


def close(value, reference):
    return torch.allclose(value, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


@pytest.mark.parametrize("name, bn, amp", [
    ("tiny", "train", "fp32"), ("tiny", "train", "fp16"), ("deeplabv2-r50", "train", "fp32"),
    ("deeplabv2-r50", "frozen", "bf16"), ("deeplabv2-vgg16", "frozen", "fp32"), ("mit-b0", "auto", "fp32"),
    ("mit-b0", "auto", "bf16")])
@pytest.mark.slow
def test_grad_checkpoint_keeps_loss_gradients_and_bn_statistics(checkpoint_calls, name, bn, amp):
    plain, recomputed = plain_and_checkpointed(name, bn)
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        side = plain.eval()(images)[1].shape[-1]
    labels = torch.randint(0, CLASSES, (2, side, side), generator=torch.Generator().manual_seed(1))
    losses = {}
    for key, model in (("plain", plain.train()), ("recomputed", recomputed)):
        losses[key] = seeded_loss(model, images, labels, seed=2, amp=amp)
        losses[key].backward()
        assert len(checkpoint_calls) == (SEGMENTS[name] if key == "recomputed" else 0)
    assert close(losses["recomputed"].detach(), losses["plain"].detach())
    grads = {n: p.grad for n, p in recomputed.named_parameters()}
    for n, p in plain.named_parameters():
        assert p.grad is not None and grads[n] is not None and close(grads[n], p.grad), n
    # trainable BN: the recomputation's second update of the running statistics is undone
    after = recomputed.state_dict()
    assert all(torch.equal(after[k], v) for k, v in plain.state_dict().items())
    counters = [v.item() for k, v in after.items() if k.endswith("num_batches_tracked")]
    assert counters == [1] * len(counters) and (counters or bn == "frozen")
    if name.startswith("mit"):  # drop-path is live, so equal gradients mean the masks were replayed
        with torch.no_grad():
            assert not torch.allclose(seeded_loss(plain, images, labels, seed=3, amp=amp), losses["plain"])


def test_grad_checkpoint_only_when_training_with_gradients(checkpoint_calls):
    model = models.build_model("mit-b0", CLASSES, grad_checkpoint=True)
    images = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        model.train()(images)
    model.eval()(images)
    assert checkpoint_calls == []
    model.train()(images)
    assert len(checkpoint_calls) == SEGMENTS["mit-b0"]


def test_grad_checkpoint_survives_a_second_backward_of_the_same_graph():
    """retain_graph: every backward recomputes; the BN statistics still hold one forward's update."""
    plain, recomputed = plain_and_checkpointed("tiny", "train")
    images = torch.rand(2, 3, SIZE, SIZE)
    for model in (plain, recomputed):
        loss = model(images)[1].square().mean()
        loss.backward(retain_graph=True)
        loss.backward()
    assert all(close(p.grad, q.grad) for p, q in zip(recomputed.parameters(), plain.parameters()))
    after = recomputed.state_dict()
    assert all(torch.equal(after[k], v) for k, v in plain.state_dict().items())
