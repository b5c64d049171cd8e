"""Source-only training: the baseline every adaptation method is compared with, and its warm-up stage.

Copy with: uda/common.py (the only file of uda/ this one imports).

Supervised on labelled source images only (the target is not read):

    L = CE(up(z_s), y_s) + lambda_lovasz * Lovasz-softmax(softmax(up(z_s)), y_s)

z_s: logits of the source batch at the model's output stride; up(.): bilinear upsampling to the label
size (`--align-corners`: True for the FADA and SDCA warm-ups, as their train_src.py; default False, as
mmseg); y_s: labels, 255 ignored in both terms. lambda_lovasz = 0 is the FADA warm-up (CE only); SDCA's
source-only stage uses 0.75 (`--lovasz-weight 0.75`).

Lovasz-softmax: Berman, Rannen Triki, Blaschko, "The Lovasz-Softmax loss: A tractable surrogate for the
optimization of the intersection-over-union measure in neural networks", CVPR 2018, arXiv 1705.08790;
the variant used by SDCA and PLCA: classes='present' (only classes in the labels), per_image=False (one
loss over all pixels of the batch).

The contract between train.py and a method file (every uda/<method>.py follows it; this file is the
template, in the order every method file uses: docstring, imports, pure loss functions, small modules,
RECIPE and the optional attributes below, the method class, `add_arguments`, `Method = ...`). A new
method is this one file plus one line in uda/methods.py (`"name": module`): train.py, evaluate.py and the
tools (uda/bench/) read everything else from the module through METHODS, and test no method's name.

- `RECIPE = {flag_dest: value}`: the paper's values of COMMON flags (lr, head_lr_mult, momentum,
  weight_decay, poly_power, warmup_iters, iters, stop_iter, batch_size, bn, crop, source_size,
  target_size, random_scale, cat_max_ratio, source_sampler, synthia_classes, lovasz_weight,
  align_corners, backbone, ...). uda/flags.py applies it as the parser's defaults in one place
  (`flags.build_parser`), so `python train.py --method X --help` shows the effective defaults, an explicit
  flag wins, and each run prints the recipe and what the command line overrode. Size and backbone
  entries describe real data: for the built-in toy they apply only when given explicitly.
- `add_arguments(parser)`: the method's own flags, each named `--<method>-...` (DIDA also reads the
  `--daformer-...` flags of its base), defaults = the official code's. It adds flags and nothing else.
- `Method(model, args, env)`: `model` is built and on its device; `args` the parsed flags, read-only
  (a method never assigns to it); `env` a `common.Env` from `common.make_env(device, amp, space)`:
  `env.device`, `env.autocast()` (the context every forward runs under), `env.scaler` (one GradScaler
  for all optimizers), `env.space` (the label space). A method that draws random numbers owns a
  `common.method_generator(args.seed, GENERATOR_STREAM)`, GENERATOR_STREAM = its name (the stream is a
  stable hash of it), and saves the generator's state under the key 'generator' of its state_dict:
  train.py keeps that entry per rank (each rank's generator is seeded apart), so a torchrun resume is exact.
- `Method.needs_target`: False when the target loader is not needed (train.py then builds none).
- `method.optimizers`: a list; train.py sets every group's LR from the poly schedule each iteration.
- `method.train_step(source, target, it) -> {name: 0-d tensor}`: one whole iteration (forwards,
  backwards, `common.optimizer_step` of each optimizer, which averages gradients across ranks). source
  and target are batches on env.device ('image' (B, 3, H, W) in [0, 1], 'label' (B, H, W) with 255 =
  ignore; target without labels); `it` is 0-based. The returned values are what gets logged (averaged
  over ranks by train.py); train.py calls `env.scaler.update()` once afterwards.
- `method.state_dict()` / `load_state_dict(state)`: everything besides the model that resume needs
  (optimizers, discriminators, teachers, banks, statistics, generator states).
- Evaluation uses `model` (train.py and evaluate.py); a method never evaluates. How its official code
  predicts at test time is told by two optional attributes, which uda/evaluation.py applies:
  `test_time_predict(model, images, autocast) -> (B, C, h, w)` fp32 probabilities of one whole-image
  view at any resolution (PLCA: its test-time aggregation; evaluate.py uses it for the method's
  checkpoints unless `--tta-aggregate off`; train.py's periodic evaluation does not), and
  `RESIZE_VIA_INPUT = True`: logits are resized to the network's input size first, then to the label
  size (mmseg's inference: DAFormer, DIDA), instead of once to the label size.

Optional attributes for the tools (absent: the default said here):
- `CONTROL_FLAGS = [flag, value, ...]`: the command-line flags that switch the method's own idea off,
  everything else (augmentation, optimiser, schedule, target batches) kept: the toy benchmark's
  recipe-only control (`python -m uda.bench.toy --controls on`; absent: the method has no control row).
  `CONTROL_EVALUATE_FLAGS` (evaluate.py flags of the control, e.g. PLCA's `--tta-aggregate off`) and
  `CONTROL_NOTE` (a line for the table's notes) go with it.
- `TOY_FLAGS = [flag, value, ...]`: recipe values the toy benchmark changes for this method (FADA and
  SDCA: uniform source sampling). Absent: the toy keeps the whole RECIPE (its real-data entries aside),
  with the toy's own scaling of the schedule (uda/bench/toy.py `toy_flags`).
- `BENCHMARK_ROW = False`: not a row of its own in uda/bench/toy.py and uda/bench/scale.py (selftrain:
  a stage on another method's pseudo-labels). Absent: every method is measured.

Recipe: the common defaults (DeepLab-v2: SGD 2.5e-4, head x10, momentum 0.9, wd 5e-4, poly 0.9); the
README's warm-up commands give each paper's stage-1 values (FADA: --lr 5e-4, 31,250 / 20,000 iterations).

Deviations: none (the standard supervised step). The default --align-corners is False; the FADA and
SDCA warm-up commands in the README pass --align-corners, as their official train_src.py.
"""
import torch
import torch.nn.functional as F

from uda.common import IGNORE_INDEX, optimizer_step, sgd, upsample


# --------------------------------------------------------------------------------------------------
# Losses: pure functions of tensors
# --------------------------------------------------------------------------------------------------
def cross_entropy(logits, labels):
    """Mean CE over non-ignored pixels, computed in fp32 even under autocast.

    logits: (B, C, H, W) any float dtype; labels: (B, H, W) int64 with 255 = ignore.
    Returns 0 (with a graph) when every pixel is ignored, instead of NaN.
    """
    assert logits.dim() == 4 and labels.shape == (logits.shape[0],) + logits.shape[2:]
    if not (labels != IGNORE_INDEX).any():
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def lovasz_softmax(probs, labels):
    """Lovasz-softmax loss over the whole batch, averaged over the classes present in `labels`.

    probs: (B, C, H, W) softmax probabilities; labels: (B, H, W) int64, 255 ignored.
    For each present class c: errors e_i = |[y_i = c] - p_ic| sorted in decreasing order, loss_c =
    <e_sorted, grad of the Jaccard loss along the sorted order> (Berman et al., Alg. 1).
    Vectorised over classes; 0 when no pixel is labelled.
    """
    num_classes = probs.shape[1]
    probs = probs.float().permute(0, 2, 3, 1).reshape(-1, num_classes)  # (N, C)
    labels = labels.reshape(-1)                                          # (N,)
    valid = labels != IGNORE_INDEX
    probs, labels = probs[valid], labels[valid]
    if labels.numel() == 0:
        return probs.sum() * 0.0
    present = torch.unique(labels)                                       # (P,) classes in the batch
    fg = (labels[:, None] == present[None, :]).float()                   # (N, P)
    errors = (fg - probs[:, present]).abs()                              # (N, P)
    errors_sorted, order = torch.sort(errors, dim=0, descending=True)    # (N, P)
    fg_sorted = torch.gather(fg, 0, order)                               # (N, P)
    return (errors_sorted * lovasz_grad(fg_sorted)).sum(0).mean()


def lovasz_grad(fg_sorted):
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors, per column.

    fg_sorted: (N, P) 0/1 ground truth in the order of decreasing error. Returns (N, P).
    """
    gts = fg_sorted.sum(0, keepdim=True)                     # (1, P)
    intersection = gts - fg_sorted.cumsum(0)                 # (N, P)
    union = gts + (1.0 - fg_sorted).cumsum(0)                # (N, P), >= 1 everywhere
    jaccard = 1.0 - intersection / union                     # (N, P)
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]], dim=0)


def supervised_loss(logits, labels, lovasz_weight, align_corners=False):
    """(CE, Lovasz) of stride-s logits against full-resolution labels; Lovasz is 0 when its weight is 0."""
    logits = upsample(logits, labels.shape[-2:], align_corners)
    ce = cross_entropy(logits, labels)
    if lovasz_weight == 0:
        return ce, ce.new_zeros(())
    return ce, lovasz_softmax(torch.softmax(logits.float(), dim=1), labels)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------
RECIPE = {}  # the common defaults are this method's recipe; no optional attribute either


class SourceOnly:
    """Supervised training on the source. One SGD optimizer, head LR x --head-lr-mult."""

    needs_target = False  # train.py builds no target loader

    def __init__(self, model, args, env):
        self.model, self.env = model, env
        self.lovasz_weight, self.align_corners = args.lovasz_weight, args.align_corners
        self.optimizer = sgd(model.param_groups(args.head_lr_mult), args.lr, args.momentum, args.weight_decay)
        self.optimizers = [self.optimizer]  # train.py sets their LR from the schedule

    def train_step(self, source, target, it):
        """One iteration. source: dict with 'image' (B, 3, H, W), 'label' (B, H, W). Returns loss terms."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.env.autocast():
            _, logits = self.model(source["image"])
        ce, lovasz = supervised_loss(logits, source["label"], self.lovasz_weight, self.align_corners)
        loss = ce + self.lovasz_weight * lovasz
        self.env.scaler.scale(loss).backward()
        optimizer_step(self.optimizer, self.env.scaler)
        logged = {"ce": ce.detach()}
        if self.lovasz_weight:
            logged["lovasz"] = lovasz.detach()
        return logged

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])


def add_arguments(parser):
    """Source-only has no flags of its own: --lovasz-weight and --align-corners are common flags."""


Method = SourceOnly
