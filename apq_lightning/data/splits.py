"""Which samples go where: architecture keys and the architecture-grouped train / val / test split.

Split by architecture, never by sample: two policies of one architecture in training and
validation would let a predictor look good by remembering the architecture (docs/design.md §6.3).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from apq_lightning.space import SearchSpace, Subnet


class SmallValidationSplitWarning(UserWarning):
    """The validation split misses ``min_val_samples`` / ``min_val_archs`` (a small store)."""


def arch_keys(space: SearchSpace, genomes: np.ndarray) -> list[str]:
    """Identity of each genome's *architecture* (depth, kernel and width genes; not the bits):
    what the split is made on. Skipped blocks are canonical zeros in a genome, so equal
    architectures hash alike whatever their bits or the store they come from."""
    n_arch = space.num_stages + 2 * space.num_blocks
    arch = np.ascontiguousarray(np.atleast_2d(genomes)[:, :n_arch], dtype="<i2")
    return [hashlib.sha1(row.tobytes()).hexdigest()[:12] for row in arch]


def arch_key(subnet: Subnet) -> str:
    """:func:`arch_keys` of one subnet."""
    return arch_keys(subnet.search_space, subnet.search_space.to_genome(subnet))[0]


def _unit_hash(*parts: Any) -> float:
    """A deterministic number in [0, 1) from its arguments (stable across runs and machines)."""
    digest = hashlib.sha1(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass(frozen=True)
class SplitRule:
    """How samples are split by architecture (see the module docstring): the hash share of
    ``test_fraction`` / ``val_fraction``, then architectures moved, in hash order, from training
    to validation until it holds ``max(val_fraction·N, min_val_samples)`` samples of
    ``min_val_archs`` architectures, never past half of the non-test samples. Used by the
    datamodule and by anything that needs the same split of its own samples (benchmarks)."""

    val_fraction: float = 0.1
    test_fraction: float = 0.1
    min_val_samples: int = 20
    min_val_archs: int = 8
    seed: int = 0

    def hash_split(self, arch: str) -> str:
        """The split of an architecture by the hash share alone."""
        u = _unit_hash(self.seed, arch)
        if u < self.test_fraction:
            return "test"
        return "val" if u < self.test_fraction + self.val_fraction else "train"

    def val_needed(self, n: int) -> int:
        """Samples the validation split should hold, of ``n`` in all."""
        return max(math.ceil(self.val_fraction * n), self.min_val_samples) if self.val_fraction > 0 else 0

    def assign(self, archs: Sequence[str]) -> dict[str, str]:
        """The split of every architecture, given each sample's architecture key."""
        counts = Counter(archs)
        split = {a: self.hash_split(a) for a in counts}
        if self.val_fraction == 0:
            return split
        n_val = sum(n for a, n in counts.items() if split[a] == "val")
        val_archs = sum(1 for a in counts if split[a] == "val")
        held = n_val + sum(n for a, n in counts.items() if split[a] == "train")
        need = self.val_needed(len(archs))
        for a in sorted((a for a in counts if split[a] == "train"), key=lambda a: _unit_hash(self.seed, a)):
            if n_val >= need and val_archs >= self.min_val_archs:
                break
            if 2 * (n_val + counts[a]) <= held:
                split[a] = "val"
                n_val += counts[a]
                val_archs += 1
        return split

    def shortfall(self, archs: Sequence[str], split: dict[str, str]) -> str | None:
        """What the validation split of :meth:`assign` misses of its minimums, or ``None``."""
        val = [a for a in archs if split[a] == "val"]
        n_archs, need = len(set(val)), self.val_needed(len(archs))
        if self.val_fraction == 0 or (len(val) >= need and n_archs >= self.min_val_archs):
            return None
        return (f"holds {len(val)} sample(s) of {n_archs} architecture(s), fewer than the {need} samples of "
                f"{self.min_val_archs} architectures asked (val_fraction, min_val_samples, min_val_archs), and may "
                "not take more than half of the non-test samples")


__all__ = ["SmallValidationSplitWarning", "SplitRule", "arch_key", "arch_keys"]
