"""The predictor's input: one-hot features of a subnet in the APQ layout (docs/design.md §5).

Layout, choices in ascending order::

    [kernel one-hot of block 0..B-1] [width one-hot of block 0..B-1]          <- FP part
    [pw_w one-hot of 0..B-1] [pw_a …] [dw_w …] [dw_a …]                        <- quantization part

A skipped block is all zeros in every part. On ``apq_imagenet`` the FP part has 63 + 457 = 520
dims and the quantization part 252 (772 in all), so predictors trained by the APQ reference
load unchanged.

Torch-free like :mod:`apq_lightning.space`: the search encodes whole populations as integer
genomes, and the cost of a Python loop per subnet would dominate it. Every encoder here is a
handful of array operations on ``(N, genome_length)`` integer arrays. Because the input is
one-hot, ``feature_indices`` also returns the *positions* of the ones (``encode_genomes`` sets
them); a first layer on them is a sum of selected weight rows, which
:mod:`apq_lightning.mlp_scorer` pre-sums per block choice. Subnets and dicts become genomes
through :func:`apq_lightning.space.to_genomes`, like everywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from apq_lightning.space import BIT_FIELDS, Population, SearchSpace, Subnet, check_genomes, get_space, to_genomes

PARTS: tuple[str, ...] = ("kernels", "widths", *BIT_FIELDS)
"""Encoded genes per block, in layout order."""


@dataclass(frozen=True)
class Encoder:
    """Feature layout of one space: where each block's one-hot group starts.

    ``offsets[p][i]`` is the first column of part ``p`` (0 = kernels … 5 = dw_a) of block ``i``.
    """

    space: SearchSpace
    offsets: np.ndarray  # (len(PARTS), B) int64
    fp_dim: int
    dim: int

    @property
    def quant_dim(self) -> int:
        return self.dim - self.fp_dim

    def dims(self, quantized: bool = True) -> int:
        return self.dim if quantized else self.fp_dim

    def bit_deficits(self) -> np.ndarray:
        """``(quant_dim, 4·B)`` float32 map from the bit one-hots to each tensor's bit *deficit*
        ``(max - bits) / (max - min)``: 0 at the largest choice (and for a skipped block), 1 at
        the smallest; column ``p·B + b`` is part ``p`` (pw_w, pw_a, dw_w, dw_a) of block ``b``.

        Numeric bit features a linear layer can *order* (one-hots leave 4 < 6 < 8 to be learnt
        from data), kept a matrix so that they stay a linear function of the encoding: the
        search's pre-summed rows fold them in (:mod:`apq_lightning.mlp_scorer`).
        """
        sp = self.space
        sl = sp.genome_slices()
        out = np.zeros((self.quant_dim, len(BIT_FIELDS) * sp.num_blocks), dtype=np.float32)
        for p, name in enumerate(BIT_FIELDS):
            for b in range(sp.num_blocks):
                choices = np.asarray(sp.gene_choices[sl[name].start + b], dtype=np.float64)
                span = choices.max() - choices.min()
                start = self.offsets[2 + p, b] - self.fp_dim
                out[start: start + len(choices), p * sp.num_blocks + b] = (choices.max() - choices) / (span or 1.0)
        return out

    # ---- genomes -----------------------------------------------------------------------
    def feature_indices(self, genomes: np.ndarray, quantized: bool = True) -> np.ndarray:
        """Columns of the ones, ``(N, P·B)`` int64; a skipped block's entries are ``dims()``.

        ``dims()`` is one past the last feature: callers pad their weight matrix with a zero row
        there (or drop those entries), so every row has the same number of indices.
        """
        sp = self.space
        g = check_genomes(sp, genomes)
        active = sp.genome_active(g)  # (N, B)
        sl = sp.genome_slices()
        parts = PARTS if quantized else PARTS[:2]
        cols = [np.where(active, self.offsets[p] + g[:, sl[name]], self.dims(quantized))
                for p, name in enumerate(parts)]
        return np.concatenate(cols, axis=1)

    def encode_genomes(self, genomes: np.ndarray, quantized: bool = True) -> np.ndarray:
        """Dense ``(N, dims)`` float32 features of a batch of genomes, without a Python loop."""
        idx = self.feature_indices(genomes, quantized)
        n, d = idx.shape[0], self.dims(quantized)
        out = np.zeros((n, d + 1), dtype=np.float32)  # the extra column absorbs skipped blocks
        np.put_along_axis(out, idx, 1.0, axis=1)
        return out[:, :d]

    # ---- subnets -----------------------------------------------------------------------
    def encode(self, subnets: Population, quantized: bool = True) -> np.ndarray:
        """Features of a population in any form of :func:`~apq_lightning.space.to_genomes` (subnets,
        subnet JSON dicts of either format, genomes); a float subnet's bits count as the largest
        choice, as an 8-bit policy would (``quantized=False`` drops the part)."""
        return self.encode_genomes(to_genomes(self.space, subnets), quantized)

    def decode(self, features: np.ndarray) -> list[Subnet]:
        """Subnets back from features (round trip of :meth:`encode`; depths from active blocks)."""
        x = np.atleast_2d(np.asarray(features))
        quantized = x.shape[1] == self.dim
        if x.shape[1] not in (self.dim, self.fp_dim):
            raise ValueError(
                f"space {self.space.name!r}: features must have {self.fp_dim} or {self.dim} columns, got {x.shape[1]}"
            )
        return [self.space.from_genome(self._genome_of(row), quantized=quantized) for row in x]

    def _genome_of(self, row: np.ndarray) -> np.ndarray:
        sp = self.space
        sl = sp.genome_slices()
        g = np.zeros(sp.genome_length, dtype=np.int64)
        parts = PARTS if row.shape[0] == self.dim else PARTS[:2]
        active = np.zeros(sp.num_blocks, dtype=bool)
        for p, name in enumerate(parts):
            for i in range(sp.num_blocks):
                n = len(sp.gene_choices[sl[name].start + i])
                hot = np.flatnonzero(row[self.offsets[p, i]: self.offsets[p, i] + n])
                if len(hot) > 1:
                    raise ValueError(f"block {i}, {name}: {len(hot)} ones in a one-hot group")
                if len(hot):
                    g[sl[name].start + i] = hot[0]
                    active[i] = True
        for s, allowed in enumerate(sp.stage_depth_choices):
            ran = int(active[sp.stage_of_block == s].sum())
            depth = max(ran, min(allowed))
            g[sl["depths"].start + s] = allowed.index(depth)
        return g


@cache
def _encoder(name: str) -> Encoder:
    sp = get_space(name)
    sl = sp.genome_slices()
    card = sp.gene_cardinality
    offsets = []
    start = 0
    for name_ in PARTS:
        sizes = card[sl[name_]]
        offsets.append(start + np.concatenate([[0], np.cumsum(sizes)[:-1]]))
        start += int(sizes.sum())
        if name_ == "widths":
            fp_dim = start
    return Encoder(sp, np.stack(offsets).astype(np.int64), fp_dim, start)


def get_encoder(space: str | SearchSpace) -> Encoder:
    """The (cached) encoder of a registered space."""
    return _encoder(get_space(space).name)


def encode(subnets: Sequence[Subnet] | Subnet, quantized: bool = True) -> np.ndarray:
    """Convenience: features of subnets of one space (the space of the first)."""
    first = subnets if isinstance(subnets, Subnet) else subnets[0]
    return get_encoder(first.space).encode(subnets, quantized)
