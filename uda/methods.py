"""The methods, by name: one place for train.py and uda/bench/ (plain imports, no registry).

Each value is a method module following the contract written in uda/source_only.py.
"""
from uda import cdga, daformer, dida, fada, plca, sdca, selftrain, source_only

METHODS = {
    "source_only": source_only,
    "fada": fada,
    "selftrain": selftrain,
    "daformer": daformer,
    "dida": dida,
    "cdga": cdga,
    "sdca": sdca,
    "plca": plca,
}
