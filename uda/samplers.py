"""Source samplers that favour rare classes, and the per-image class statistics they need.

Both samplers follow train.InfiniteSampler's contract: an endless stream whose element number g (the
global draw, g = draw * world_size + rank) is a pure function of (seed, g). A resumed run that starts at
draw `start_draw` therefore sees exactly the items the uninterrupted run would have seen, and the ranks
of a DDP run draw disjoint positions of one common stream.

Class-balanced sampling (FADA / SDCA; official code: github.com/JDAI-CV/FADA core/datasets/gta5.py,
commit a1c6403 read). Draws are grouped in sub-epochs of CB_SUB_EPOCH = 3000. Within a sub-epoch, with
n_c = how many drawn images contained class c so far and p_c = n_c / sum_k n_k (0 before the first draw):

    P(c) = w_c / sum_k w_k,   w_c = 1 / ln(1 + CB_EPS + p_c),   CB_EPS = 0.01

then the next image containing c is taken from a shuffled per-class order (round robin, reshuffled when
exhausted), and n_k += 1 for every class k of that image. Yields (index, draw).

Rare Class Sampling (DAFormer, Hoyer et al., CVPR 2022, arXiv 2111.14887; github.com/lhoyer/DAFormer
mmseg/datasets/uda_dataset.py). With f_c = class c's share of all labelled source pixels:

    P(c) = softmax_c((1 - f_c) / T),   T = --rcs-temperature (0.01)

then an image with more than --rcs-min-pixels (3000) pixels of c, uniformly. The dataset re-crops (up to
10 times) until the crop holds more than rcs_min_pixels * --rcs-min-crop-ratio (0.5) pixels of c, so
the sampler yields (index, draw, c).

Class statistics: per image, the pixel count of every class of the model's label space (255 excluded),
at the label file's resolution (as DAFormer's sample_class_stats). Computed once, sharded over ranks and
summed (identical on every rank), and cached in a JSON file next to the run folder (default
OUT/../class_stats_<dataset>_<key>.json, or --stats-cache FILE), never inside the dataset folder. The
cache records the size and modification time of every label file (label_fingerprint): a label edited,
replaced or re-converted since makes it stale, and the statistics are computed again.

Deviations (from the official code):
- FADA carries its per-class round-robin pointers across sub-epochs and builds each rank's list with an
  unseeded RNG; here each sub-epoch is generated from (seed, sub-epoch) alone, identically on every
  rank, so any draw is reproducible with at most one sub-epoch of replay. Classes without any image
  get probability 0 (FADA would fail on them).
- RCS: classes with pixels but no image above --rcs-min-pixels are dropped before the softmax
  (DAFormer asserts that none exist).

Any label space works, a folder dataset's own classes included: the counts have one column per class of
the model's space (space.num_classes), and neither sampler assumes Cityscapes classes (DAFormer's thing
classes belong to its feature distance, uda/daformer.py, not to RCS). An empty source dataset is
refused with one line instead of a ZeroDivisionError deep inside a sub-epoch.
"""
import hashlib
import json
import os

import numpy as np
import torch

from uda import common
from uda.common import UserError

CB_SUB_EPOCH = 3000  # FADA gta5.py SUB_EPOCH_SIZE
CB_EPS = 0.01  # FADA gta5.py: w = 1 / log(1 + 1e-2 + p)


# --------------------------------------------------------------------------------------------------
# Per-image class statistics
# --------------------------------------------------------------------------------------------------
class _ClassCounts(torch.utils.data.Dataset):
    """Item i: the (C,) int64 pixel counts of image indices[i] of `dataset` (255 excluded)."""

    def __init__(self, dataset, indices, num_classes):
        self.dataset, self.indices, self.num_classes = dataset, indices, num_classes

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        label = np.asarray(self.dataset.label_array(self.indices[i]))
        counts = np.bincount(label.ravel(), minlength=256)[:self.num_classes]  # (C,); 255 and above dropped
        return torch.from_numpy(counts.astype(np.int64))


def label_fingerprint(dataset):
    """A hash of (path, size, mtime_ns) of every label file the dataset reads (None for labels that are
    generated, not read: the toy): it changes whenever a label file is edited or replaced, even when its
    name does not. A missing file counts as (path, -1, -1): it fails later, with its own message."""
    files = getattr(dataset, "label_files", lambda: [])()
    if not files:
        return None
    digest = hashlib.sha1()
    for path in files:
        try:
            stat = os.stat(path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        digest.update(f"{path}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def _load_cache(path, names, num_classes, fingerprint):
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        counts = np.asarray(record["counts"], dtype=np.int64)
    except (ValueError, KeyError, TypeError):
        return None
    if record.get("names") != names or counts.shape != (len(names), num_classes):
        return None
    if record.get("label_files") != fingerprint:  # a label changed since (or a cache of an older version)
        return None
    return counts


def compute_class_counts(dataset, num_classes, workers=0, log=None):
    """(N, C) int64 pixel counts per image and class; this rank's share, summed over ranks."""
    rank, world = common.rank(), common.world_size()
    indices = list(range(rank, len(dataset), world))
    # its own generator: creating the loader must not draw from the global RNG, or a run would depend
    # on whether the statistics were cached
    loader = torch.utils.data.DataLoader(_ClassCounts(dataset, indices, num_classes), batch_size=16,
                                         num_workers=workers, generator=torch.Generator())
    counts = torch.zeros(len(dataset), num_classes, dtype=torch.int64)
    done = 0
    for batch in loader:  # (b, C)
        counts[indices[done:done + len(batch)]] = batch
        done += len(batch)
        if log and (done // 16) % 100 == 0:
            log(f"class statistics: {done}/{len(indices)} images on this rank")
    return common.all_reduce_sum(counts.to(common.comm_device())).cpu().numpy()


def class_statistics(dataset, num_classes, cache_path=None, workers=0):
    """Per-image class pixel counts (N, C), from the cache file or computed (then cached by rank 0).

    Rank 0 alone reads and writes the cache; the other ranks receive its array (or their share of the
    computation is summed), so every rank holds the same statistics even without a shared filesystem.
    """
    names = [dataset.item_name(i) for i in range(len(dataset))]
    device = common.comm_device()
    fingerprint = label_fingerprint(dataset) if common.is_main_process() else None
    counts = _load_cache(cache_path, names, num_classes, fingerprint) if common.is_main_process() else None
    found = common.all_reduce_sum(torch.tensor([counts is not None], dtype=torch.int64, device=device))
    if found.item():
        shared = torch.from_numpy(counts) if counts is not None else \
            torch.zeros(len(names), num_classes, dtype=torch.int64)
        return common.all_reduce_sum(shared.to(device)).cpu().numpy()  # only rank 0 contributes
    log = print if common.is_main_process() else None
    if log:
        log(f"computing per-image class statistics of {len(names)} images (once; cached in {cache_path})",
            flush=True)
    counts = compute_class_counts(dataset, num_classes, workers, log)
    if cache_path and common.is_main_process():
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        tmp = f"{cache_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"names": names, "num_classes": num_classes, "label_files": fingerprint,
                       "counts": counts.tolist()}, f)
        os.replace(tmp, cache_path)
    return counts


def default_cache_path(args, dataset, space):
    """--stats-cache, else OUT/../class_stats_<dataset>_<key>.json, the key hashing what the statistics
    depend on: the label files (root or pseudo-label folder; their sizes and modification times), the item
    names and the label space."""
    if getattr(args, "stats_cache", None):
        return args.stats_cache
    items = getattr(dataset, "items", None)
    origin = os.path.abspath(items[0][1]) if items else f"toy seed {dataset.seed} {dataset.pseudo_dir}"
    names = [dataset.item_name(i) for i in range(len(dataset))]
    key_parts = [args.source, origin, space.trainids, names]
    # a folder dataset's label values also depend on its classes.json (class names, label_map): part of
    # the key, so editing it recomputes the statistics; absent for the benchmarks (their keys unchanged)
    label_key = getattr(dataset, "label_key", None)
    if label_key is not None:
        key_parts.append(label_key)
    # edited label files get a file of their own: a run on the old labels keeps reading its cache
    fingerprint = label_fingerprint(dataset)
    if fingerprint is not None:
        key_parts.append(fingerprint)
    identity = json.dumps(key_parts)
    key = hashlib.sha1(identity.encode()).hexdigest()[:10]
    return os.path.join(os.path.dirname(os.path.abspath(args.out)), f"class_stats_{args.source}_{key}.json")


# --------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------
def refuse_empty(counts, kind):
    """Both samplers draw images by class: without an image (N = 0) or a class column there is nothing
    to draw (the draws would divide by zero); say so in one line."""
    shape = np.shape(counts)
    if len(shape) != 2 or shape[0] == 0:
        raise UserError(f"--source-sampler {kind}: the source dataset holds no images")
    if shape[1] == 0:
        raise UserError(f"--source-sampler {kind}: the label space has no classes")


class ClassBalancedSampler(torch.utils.data.Sampler):
    """FADA's class-balanced source sampler; yields (index, draw). counts: (N, C) per-image class pixels."""

    def __init__(self, counts, seed, start_draw=0, sub_epoch=CB_SUB_EPOCH):
        refuse_empty(counts, "class-balanced")
        self.present = np.asarray(counts) > 0  # (N, C)
        self.files_of = [np.flatnonzero(self.present[:, c]) for c in range(self.present.shape[1])]
        self.usable = np.array([len(f) > 0 for f in self.files_of])  # (C,)
        if not self.usable.any():
            raise UserError("--source-sampler class-balanced: no labelled pixel in the source images")
        self.seed, self.start_draw, self.sub_epoch_size = seed, start_draw, sub_epoch
        self.rank, self.world = common.rank(), common.world_size()
        self._cache = (None, None)

    def class_probabilities(self, drawn):
        """P(c) given n_c = drawn (C,) images with class c drawn so far in this sub-epoch."""
        total = drawn.sum()
        share = drawn / total if total > 0 else np.zeros_like(drawn, dtype=np.float64)  # p_c
        weights = np.where(self.usable, 1.0 / np.log(1.0 + CB_EPS + share), 0.0)  # w_c
        return weights / weights.sum()

    def sub_epoch(self, number):
        """The image indices of sub-epoch `number`: a pure function of (seed, number)."""
        if self._cache[0] == number:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, number])
        drawn = np.zeros(self.present.shape[1], dtype=np.float64)  # n_c
        order, position = {}, {}
        out = np.empty(self.sub_epoch_size, dtype=np.int64)
        for i in range(self.sub_epoch_size):
            probs = self.class_probabilities(drawn)
            c = int(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right"))
            c = min(c, len(probs) - 1)
            if c not in order or position[c] == len(order[c]):  # round robin, reshuffled when exhausted
                order[c], position[c] = rng.permutation(self.files_of[c]), 0
            out[i] = order[c][position[c]]
            position[c] += 1
            drawn += self.present[out[i]]
        self._cache = (number, out)
        return out

    def __iter__(self):
        draw = self.start_draw  # this rank's draw counter
        while True:
            g = draw * self.world + self.rank  # global draw number
            number, offset = divmod(g, self.sub_epoch_size)
            yield int(self.sub_epoch(number)[offset]), g
            draw += 1


def rcs_probabilities(counts, temperature, min_pixels):
    """DAFormer's RCS: (classes, probabilities, files_of) from (N, C) per-image class pixel counts.

    classes: the classes that can be sampled (pixels in the data and an image with > min_pixels of
    them); probabilities: softmax((1 - f_c) / T) over them (float64); files_of[c]: those images.
    """
    refuse_empty(counts, "rcs")
    counts = np.asarray(counts, dtype=np.int64)
    totals = counts.sum(0).astype(np.float64)  # (C,)
    freq = totals / max(totals.sum(), 1.0)  # f_c
    files_of = {c: np.flatnonzero(counts[:, c] > min_pixels) for c in range(counts.shape[1])}
    classes = [c for c in range(counts.shape[1]) if totals[c] > 0 and len(files_of[c])]
    if not classes:
        raise UserError(f"--source-sampler rcs: no source image has more than --rcs-min-pixels {min_pixels} "
                        f"pixels of any class (lower --rcs-min-pixels)")
    logits = (1.0 - freq[classes]) / temperature  # (number of candidate classes,)
    probs = np.exp(logits - logits.max())
    return classes, probs / probs.sum(), files_of


class RareClassSampler(torch.utils.data.Sampler):
    """DAFormer's Rare Class Sampling; yields (index, draw, cls)."""

    def __init__(self, counts, temperature, min_pixels, seed, start_draw=0):
        self.classes, self.probs, self.files_of = rcs_probabilities(counts, temperature, min_pixels)
        self.seed, self.start_draw = seed, start_draw
        self.rank, self.world = common.rank(), common.world_size()

    def __iter__(self):
        draw = self.start_draw
        while True:
            g = draw * self.world + self.rank
            rng = np.random.default_rng([self.seed, g])
            c = self.classes[int(rng.choice(len(self.classes), p=self.probs))]
            yield int(rng.choice(self.files_of[c])), g, c
            draw += 1


def build_source_sampler(args, dataset, space, start_draw):
    """The sampler of train.py's source stream for --source-sampler; None = uniform (InfiniteSampler)."""
    kind = getattr(args, "source_sampler", "uniform")
    if kind == "uniform":
        return None
    if len(dataset) == 0:  # before computing (and caching) statistics of nothing
        raise UserError(f"--source-sampler {kind}: the source dataset {args.source} holds no images")
    if kind == "rcs" and args.rcs_temperature <= 0:
        raise UserError(f"--rcs-temperature {args.rcs_temperature}: expected a positive number")
    counts = class_statistics(dataset, space.num_classes, default_cache_path(args, dataset, space), args.workers)
    if kind == "class-balanced":
        return ClassBalancedSampler(counts, args.seed, start_draw)
    return RareClassSampler(counts, args.rcs_temperature, args.rcs_min_pixels, args.seed, start_draw)
