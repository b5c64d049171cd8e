"""The flags of a training run, parsed in one place: train.py and the tools (uda/bench/) import this module.

    args, run = flags.parse(["--method", "daformer", "--source", "gta5", "--out", "runs/x"])

Defaults, in the order they are layered (each layer wins over the one before):
1. the common flags' own defaults (`add_common_arguments`);
2. the method's RECIPE (its paper's values of common flags, uda/<method>.py), the entries that apply to
   the data: size, network and BN entries (REAL_DATA_KEYS) describe the papers' real datasets, so on the
   built-in toy they do not apply, and a RECIPE's --stop-iter belongs to its --iters (a shorter --iters
   given on the command line stops at its own end);
3. the defaults that go with --source: --target (`datasets.default_target`), --backbone (tiny for the toy,
   else the recipe's, else deeplabv2-r101) and --stop-iter (the recipe's, else --iters);
4. the command line.
A first pass reads --method, --source and --iters; the full parser is then built with the defaults that
apply, so `--help` shows each flag's one effective default, marked where it comes from the recipe, and
the parsed flags are final: nothing assigns to `args` afterwards. What parsing derives besides the flags
(the recipe as it applies, the recipe flags the command line overrode) is returned in a `Run`.
"""
import argparse
import functools
from dataclasses import dataclass

from uda import common, datasets, models, toy
from uda.common import UserError
from uda.methods import METHODS

# Recipe values that describe the papers' real datasets and networks (sizes, backbone, its BN mode):
# the built-in toy has its own sizes and tiny network, so there they apply only when given explicitly.
REAL_DATA_KEYS = ("backbone", "bn", "crop", "source_size", "target_size", "random_scale")
DEFAULT_METHOD, DEFAULT_SOURCE = "source_only", "toy-synth"
TOY_BACKBONE, REAL_BACKBONE = "tiny", "deeplabv2-r101"  # --backbone when no recipe names one
_UNSET = object()
# What a flag left unset (None) means, shown by --help as its default when no recipe value applies
UNSET_MEANS = {
    "source_root": "DATA_ROOT/<source>",
    "target_root": "DATA_ROOT/<target>",
    "crop": "the toy's 128x64; real data: the whole resized image",
    "source_size": "GTA5 1280x720, SYNTHIA 1280x760, Cityscapes 1024x512; native with --pseudo-dir",
    "target_size": "Cityscapes 1024x512",
    "stats_cache": "OUT/../class_stats_<source>_<key>.json",
}


@dataclass(frozen=True)
class Run:
    """What parsing derives besides the flags (never a flag itself; train.py prints it)."""
    recipe: dict      # the method's RECIPE entries that apply to this run's data, {flag dest: recipe value}
    overridden: list  # the names of recipe flags given on the command line, sorted
    folder_classes: dict = None  # a folder source's classes.json record: train.py reads it, checkpoints keep it


# --------------------------------------------------------------------------------------------------
# The common flags
# --------------------------------------------------------------------------------------------------
def add_common_arguments(p):
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), help="training method")
    p.add_argument("--source", default=DEFAULT_SOURCE, choices=datasets.DATASET_NAMES, help="labelled source dataset")
    p.add_argument("--target", default=None, choices=datasets.DATASET_NAMES,
                   help="unlabelled target dataset (goes with --source: cityscapes for gta5/synthia, toy-real for "
                        "the toy)")
    p.add_argument("--data-root", default=None, help="folder holding one sub-folder per dataset (DIR/gta5, ...)")
    p.add_argument("--backbone", default=None, choices=list(models.BACKBONES),
                   help="network (tiny for the toy; for real data the recipe's, else deeplabv2-r101)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute backbone activations in the backward pass (less memory, ~1 extra forward)")
    p.add_argument("--pretrained", default=None, metavar="FILE", help="initial weights, loaded by key name")
    p.add_argument("--bn", choices=list(models.BN_MODES), default="auto",
               help="BatchNorm: frozen (fixed statistics and affine), train (SyncBN under DDP on GPU), "
                    "auto = frozen for deeplabv2-*, train for tiny and mit-*")
    p.add_argument("--iters", type=common.positive_int, default=2000, help="length of the poly LR schedule (MAX_ITER)")
    p.add_argument("--stop-iter", type=common.positive_int, default=None,
                   help="stop training at this iteration although the schedule runs to --iters "
                        "(the FADA/ADVENT convention)")
    p.add_argument("--batch-size", type=common.positive_int, default=4, help="images per domain per process")
    p.add_argument("--lr", type=common.positive_float, default=2.5e-4, help="backbone learning rate (the head's is x --head-lr-mult)")
    p.add_argument("--crop", default=None,
                   help="training crop WxH")
    p.add_argument("--head-lr-mult", type=common.positive_float, default=10.0, help="LR multiplier of the classifier head")
    p.add_argument("--momentum", type=common.nonnegative_float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=common.nonnegative_float, default=5e-4, help="weight decay")
    p.add_argument("--poly-power", type=common.nonnegative_float, default=0.9, help="power of the poly LR decay")
    p.add_argument("--warmup-iters", type=common.nonnegative_int, default=0, help="linear LR warmup length (DAFormer: 1500)")
    p.add_argument("--lovasz-weight", type=common.nonnegative_float, default=0.0,
                   help="weight of the Lovasz-softmax term added to the source CE (0 = CE only)")
    p.add_argument("--align-corners", action=argparse.BooleanOptionalAction, default=False,
                   help="align_corners of the bilinear logit upsampling in losses, pseudo-labels and evaluation "
                        "(the method's official code decides; saved in the checkpoint, used by evaluate.py)")
    p.add_argument("--amp", choices=list(common.AMP_DTYPES), default="off",
                   help="autocast dtype: off (fp32), bf16, or fp16 (with a GradScaler)")
    p.add_argument("--seed", type=common.seed, default=0, help="random seed (data order, augmentation, init)")
    p.add_argument("--out", required=True, help="output folder for last.pt and metrics.jsonl")
    p.add_argument("--resume", default=None, metavar="FILE",
                   help="continue exactly from this checkpoint; 'auto': from OUT/last.pt when it exists, else "
                        "start fresh (a preemptible job can be resubmitted unchanged)")
    p.add_argument("--eval-every", type=common.nonnegative_int, default=1000,
                   help="evaluate on the target val split and save OUT/last.pt every N iterations (0: at the end only)")
    p.add_argument("--save-every", type=common.nonnegative_int, default=0,
                   help="also save OUT/last.pt every N iterations, without evaluating (0: on the --eval-every "
                        "schedule only); a preempted or restarted job then loses at most N iterations")
    p.add_argument("--no-eval", action="store_true",
                   help="save checkpoints on the --eval-every schedule but never evaluate (evaluate.py runs later)")
    p.add_argument("--log-every", type=common.positive_int, default=50, help="print and log losses every N iterations")
    p.add_argument("--workers", type=common.nonnegative_int, default=2, help="data loader worker processes per domain")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun: one GPU per process)")
    # data (uda/datasets.py, uda/samplers.py)
    p.add_argument("--source-root", default=None, metavar="DIR", help="the source dataset's folder")
    p.add_argument("--target-root", default=None, metavar="DIR", help="the target dataset's folder")
    p.add_argument("--synthia-classes", type=int, choices=[16, 19], default=16,
                   help="SYNTHIA label space: 16 classes (FADA/SDCA) or 19 trainIds (DAFormer/DIDA); mIoU16 and mIoU13 either way")
    p.add_argument("--source-size", default=None,
                   help="training resize WxH of source images before the crop, or 'native'")
    p.add_argument("--target-size", default=None, help="training resize WxH of target images")
    p.add_argument("--random-scale", type=common.positive_float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="real datasets: multiply the --source-size/--target-size resize by s ~ U(MIN, MAX) before the "
                        "crop, both domains (PLCA: short side 760-988 = --random-scale 1.0 1.3 on a 760 short side)")
    p.add_argument("--cat-max-ratio", type=common.positive_float, default=1.0,
                   help="re-draw a source crop (up to 10 times) while one class covers this share of it (DAFormer: 0.75; 1: off)")
    p.add_argument("--source-sampler", choices=["uniform", "class-balanced", "rcs"], default="uniform",
                   help="source images: uniform, class-balanced (FADA/SDCA) or rcs (DAFormer rare class sampling)")
    p.add_argument("--rcs-temperature", type=common.positive_float, default=0.01, help="RCS: P(c) = softmax((1 - f_c) / T) (DAFormer 0.01)")
    p.add_argument("--rcs-min-pixels", type=common.nonnegative_int, default=3000, help="RCS: images with more pixels of c than this (DAFormer 3000)")
    p.add_argument("--rcs-min-crop-ratio", type=common.nonnegative_float, default=0.5,
                   help="RCS: re-crop until the crop holds more than ratio x min-pixels of c (DAFormer 0.5)")
    p.add_argument("--stats-cache", default=None, metavar="FILE",
                   help="per-image class statistics for the samplers")
    p.add_argument("--source-list", default=None, metavar="FILE",
                   help="train on the listed source items only (one relative path per line, as data_lists/)")
    p.add_argument("--target-list", default=None, metavar="FILE",
                   help="train on the listed target items only (one relative path per line, as data_lists/)")
    p.add_argument("--pseudo-dir", default=None, metavar="DIR",
                   help="train on pseudo-labels: DIR/<item>.png replace the source train labels (evaluate.py --save-pseudo)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and after each flag's help its one effective default, marked when it
    is the method's recipe value: "(default: 6e-05, daformer recipe)"; for a flag left unset (None), what
    that means (UNSET_MEANS), else nothing."""

    def __init__(self, prog, recipe=(), method=""):
        super().__init__(prog)
        self.recipe, self.method = recipe, method

    def _get_help_string(self, action):
        if action.default is None and action.dest in UNSET_MEANS:
            return f"{action.help} (default: {UNSET_MEANS[action.dest]})"
        if action.default in (None, argparse.SUPPRESS) or not action.option_strings or action.help is None:
            return action.help
        origin = f", {self.method} recipe" if action.dest in self.recipe else ""
        return f"{action.help} (default: %(default)s{origin})"


# --------------------------------------------------------------------------------------------------
# Defaults and parsing
# --------------------------------------------------------------------------------------------------
def common_defaults():
    """The common flags' own defaults, before any recipe (--out has none: it is required)."""
    p = common.ArgumentParser()
    add_common_arguments(p)
    values = vars(p.parse_args(["--out", "-"]))
    del values["out"]
    return values


def applicable_recipe(method, source, iters=None):
    """The method's RECIPE entries that apply to a run on `source`; iters: an --iters given on the command
    line (None: not given), which ends a RECIPE's --stop-iter (a shorter schedule stops at its own end)."""
    recipe = dict(METHODS[method].RECIPE)
    if source in toy.DOMAINS:
        recipe = {k: v for k, v in recipe.items() if k not in REAL_DATA_KEYS}
    if iters is not None:
        recipe.pop("stop_iter", None)
    return recipe


def defaults(method, source=DEFAULT_SOURCE, iters=None):
    """The default of every common flag for `--method method --source source` (iters: an --iters given on
    the command line, else None): what train.py's parser uses, and what the tools build methods with."""
    values = {**common_defaults(), **applicable_recipe(method, source, iters), "method": method, "source": source}
    if iters is not None:
        values["iters"] = iters
    values["target"] = datasets.default_target(source)
    values["backbone"] = TOY_BACKBONE if source in toy.DOMAINS else values["backbone"] or REAL_BACKBONE
    values["stop_iter"] = values["stop_iter"] or values["iters"]
    return values


def build_parser(method, source=DEFAULT_SOURCE, iters=None, description=None):
    """The full parser of a run with --method `method` on --source `source` (iters: an --iters given on
    the command line): common flags, the method's flags, every default that applies (`defaults`)."""
    module = METHODS[method]
    recipe = applicable_recipe(method, source, iters)
    formatter = functools.partial(HelpFormatter, recipe=recipe, method=method)
    p = common.ArgumentParser(description=description, formatter_class=formatter)
    add_common_arguments(p)
    module.add_arguments(p)
    unknown = set(module.RECIPE) - set(vars(p.parse_args(["--out", "-"])))
    assert not unknown, f"uda/{method}.py RECIPE names no flag: {sorted(unknown)}"
    p.set_defaults(**defaults(method, source, iters))  # the one place a method's recipe enters the run
    return p


def first_pass(argv):
    """--method, --source and --iters: what decides which flags exist and which defaults apply."""
    first = common.ArgumentParser(add_help=False)
    first.add_argument("--method", default=DEFAULT_METHOD)
    first.add_argument("--source", default=DEFAULT_SOURCE, choices=datasets.DATASET_NAMES)
    first.add_argument("--iters", type=common.positive_int, default=None)
    known, _ = first.parse_known_args(argv)
    if known.method not in METHODS:
        raise UserError(f"--method {known.method!r}: unknown (expected one of {', '.join(METHODS)})")
    return known


def parse(argv=None, description=None):
    """(args, Run): the flags, final as parsed, and what parsing derived (the recipe as it applies)."""
    known = first_pass(argv)
    args = build_parser(known.method, known.source, known.iters, description).parse_args(argv)
    if args.stop_iter > args.iters:
        raise UserError(f"--stop-iter {args.stop_iter}: must not exceed --iters {args.iters}")
    explicit = explicit_flags(known.method, argv)
    # with both --iters and --stop-iter given, the recipe's stop_iter is reported as overridden
    recipe = applicable_recipe(known.method, known.source, None if "stop_iter" in explicit else known.iters)
    return args, Run(recipe=recipe, overridden=sorted(k for k in recipe if k in explicit))


def parse_args(argv=None):
    """The parsed flags alone (tests and tools that need no Run)."""
    return parse(argv)[0]


def explicit_flags(method, argv):
    """Names of the flags given on the command line: parse again with every default set to a marker."""
    p = build_parser(method)
    p.set_defaults(**{name: _UNSET for name in vars(p.parse_args(["--out", "-"]))})
    return {name for name, value in vars(p.parse_args(argv)).items() if value is not _UNSET}


def describe_recipe(args, run):
    """One line: the method's recipe as this run uses it, and what the command line changed."""
    values = ", ".join(f"{k} {getattr(args, k)}" for k in run.recipe) or "the common defaults"
    line = f"recipe of {args.method}: {values}"
    if run.overridden:
        line += "; overridden on the command line: " + ", ".join(
            f"{k} {getattr(args, k)} (recipe {run.recipe[k]})" for k in run.overridden)
    return line
