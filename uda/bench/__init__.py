"""Tools that measure the library; the library never imports them.

    python -m uda.bench.toy --out runs/bench      # every method on the toy, 3 seeds (uda/bench/toy.py)
    python -m uda.bench.scale --out runs/scale    # every method at its paper's sizes (uda/bench/scale.py)
    python -m uda.bench.cost --what fada          # time and memory of one thing (uda/bench/cost.py)

They run train.py / evaluate.py as subprocesses or build methods through the contract of
uda/source_only.py. The methods are train.py's own (uda/methods.py), and so are the flags' defaults
(uda/flags.py): nothing here restates them, so a method added to METHODS is measured with no edit here.
"""
from uda.methods import METHODS  # noqa: F401 (re-exported for the tools)
