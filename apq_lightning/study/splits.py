"""What each run of the transfer study trains and is tested on.

* **Splits.** Both stores are split by the same ``split_seed``; the split is a hash of the
  architecture, so the FP predictor never saw an architecture of the MP test split (transfer
  would otherwise leak test architectures), and the test split is the same for every run, so
  runs differ only in what they were trained on.
* **Subsets.** The datamodule's ``max_train`` ties its subset to ``split_seed`` (which would
  move the test split), so the subsets are drawn here: seed ``s`` takes the first ``size``
  samples of a fixed permutation of the MP training split (``numpy`` ``default_rng(s)``):
  nested in the size for one seed (a larger set only adds samples), different across seeds.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from apq_lightning.study.config import Size, StudyError, TransferStudyConfig

if TYPE_CHECKING:  # torch is imported when the study runs, so ``--help`` is quick
    import torch

Split = tuple["torch.Tensor", "torch.Tensor"]
"""``(features, accuracies)`` of one split, pre-encoded."""


def load_split(
    stores: list[str], space: str | None, quantized: bool, config: TransferStudyConfig, option: str
) -> tuple[str, dict[str, Split], np.ndarray]:
    """``(space, {train, test: (features, accs)}, test genomes)`` of the stores.

    No validation split: the study trains for a fixed budget and never selects on held-out
    data, so every sample outside the test split is training data. Store problems (nothing
    matched, another space, too few samples for a training split) become a :class:`StudyError`
    naming ``option``.
    """
    import torch

    from apq_lightning.data import SubnetSampleDataModule

    try:
        dm = SubnetSampleDataModule(
            stores,
            quantized=quantized,
            space=space,
            val_fraction=0.0,
            test_fraction=config.test_fraction,
            split_seed=config.split_seed,
        )
        dm.setup("fit")
    except ValueError as err:
        raise StudyError(f"{option}: {err}") from None
    out = {}
    for split in ("train", "test"):
        ds = dm.dataset(split)
        x, y = ds.__getitems__(range(len(ds))) if len(ds) else (torch.zeros(0, dm.feature_dim), ds.accs)
        out[split] = (x.float(), y.float())
    return dm.space, out, dm.dataset("test").genomes


def split_id(genomes: np.ndarray, accs: torch.Tensor) -> str:
    """Identity of a test split (its genomes and accuracies), to show that it never changes."""
    h = hashlib.sha1(np.ascontiguousarray(genomes, dtype="<i2").tobytes())
    h.update(accs.numpy().astype("<f4").tobytes())
    return h.hexdigest()[:12]


def resolve_sizes(sizes: Sequence[Size], pool: int) -> tuple[list[tuple[Size, int]], list[str]]:
    """``([(label, n_train)], notes)``: the runs' training-set sizes on a pool of ``pool`` samples.

    A size at or above the pool is the whole pool, i.e. ``all``: demo stores are small, and a
    study recipe written for a larger store should still run there, saying what it did. Sizes
    that end up equal are run once; the result is ordered by ``n_train``.
    """
    runs: list[tuple[Size, int]] = []
    notes: list[str] = []
    for size in sizes:
        if size != "all" and int(size) > pool:
            notes.append(f"--sizes {size} exceeds the MP training split ({pool} samples): run as 'all'")
        label, n = ("all", pool) if size == "all" or int(size) >= pool else (int(size), int(size))
        if all(n != m for _, m in runs):
            runs.append((label, n))
    return sorted(runs, key=lambda r: r[1]), notes


def subset_order(seed: int, pool: int) -> np.ndarray:
    """The seed's permutation of the training pool: a run of size ``n`` takes its first ``n``."""
    return np.random.default_rng(seed).permutation(pool)


def subset_id(idx: np.ndarray) -> str:
    """Identity of a training subset (its sorted indices into the pool)."""
    return hashlib.sha1(np.sort(idx).astype("<i8").tobytes()).hexdigest()[:12]


def epochs_for(n: int, config: TransferStudyConfig) -> int:
    """``epochs``, raised so that a run on ``n`` samples takes at least ``min_steps`` steps."""
    if not config.min_steps:
        return config.epochs
    return max(config.epochs, math.ceil(config.min_steps / math.ceil(n / config.batch_size)))
