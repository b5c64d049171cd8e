"""Tools that measure the library; the library never imports them.

    python -m uda.bench.toy --out runs/bench      # every method on the toy, 3 seeds (uda/bench/toy.py)
    python -m uda.bench.cost --what fada          # time and memory of one thing (uda/bench/cost.py)

Both run train.py / evaluate.py as subprocesses or build methods through the contract of
uda/source_only.py; neither imports train.py, so TRAIN_DEFAULTS below restates the defaults they need
from it (tests/test_cost.py checks them against train.py). METHODS is train.py's own (uda/methods.py).
"""
from uda.methods import METHODS  # noqa: F401 (re-exported for the tools)

# The values `train.parse_args` gives the common flags a method reads, for a toy run without a RECIPE
# (stop_iter None = --iters, as train.py resolves it).
TRAIN_DEFAULTS = {
    "source": "toy-synth",
    "target": "toy-real",
    "backbone": "tiny",
    "pretrained": None,
    "bn": "auto",
    "iters": 2000,
    "stop_iter": None,
    "batch_size": 4,
    "lr": 2.5e-4,
    "crop": None,
    "head_lr_mult": 10.0,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "poly_power": 0.9,
    "warmup_iters": 0,
    "lovasz_weight": 0.0,
    "align_corners": False,
    "amp": "off",
    "seed": 0,
    "synthia_classes": 16,
    "cat_max_ratio": 1.0,
    "source_sampler": "uniform",
    "pseudo_dir": None,
}
