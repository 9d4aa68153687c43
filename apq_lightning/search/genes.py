"""Which genes the search may change, and the vectorised variation operators.

Everything works on ``(N, L)`` int64 genome arrays (``SearchSpace.gene_choices`` layout): no
Python loop over candidates. Genes of skipped blocks are kept (not zeroed) while searching, so a
depth mutation that re-activates a block gives it a random choice rather than the smallest one;
they are ignored by costs, encodings and de-duplication.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from apq_lightning.space import BIT_FIELDS, SearchSpace, Subnet, get_space

BitsMode = str | int | None
"""``"search"`` (bits are genes), an ``int`` (a fixed uniform policy) or ``None`` (float subnets)."""


@dataclass(frozen=True, eq=False)
class GeneSpec:
    """A space plus the genes held fixed (bit genes of FP searches, restrictions in tests).

    ``bits``: ``"search"`` searches the policy; an int fixes every block to that many bits
    (the subnets carry that uniform policy); ``None`` searches float subnets, which the cost
    models price at the largest bit choice (8/8), like ``SearchSpace.to_genome``.
    """

    space: SearchSpace
    bits: BitsMode = "search"
    fixed: tuple[tuple[int, int], ...] = ()  # extra (gene, choice index) pairs held fixed

    def __post_init__(self) -> None:
        sp = get_space(self.space)
        object.__setattr__(self, "space", sp)
        if self.bits != "search" and self.bits is not None:
            if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)) or \
                    int(self.bits) not in sp.bit_choices:
                raise ValueError(f"bits={self.bits!r}: expected 'search', None (float) or one of "
                                 f"{list(sp.bit_choices)} (space {sp.name!r})")
        for gene, value in self.fixed:
            if not (0 <= gene < sp.genome_length) or not (0 <= value < sp.gene_cardinality[gene]):
                raise ValueError(f"fixed gene {gene}={value} outside space {sp.name!r} "
                                 f"({sp.genome_length} genes)")

    # ---- layout ------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """Whether subnets carry a bit policy (searched or fixed)."""
        return self.bits is not None

    @cached_property
    def free(self) -> np.ndarray:
        """(L,) bool: genes the operators may change."""
        sp = self.space
        free = np.ones(sp.genome_length, dtype=bool)
        if self.bits != "search":
            for f in BIT_FIELDS:
                free[sp.genome_slices()[f]] = False
        for gene, _ in self.fixed:
            free[gene] = False
        return free

    @cached_property
    def values(self) -> np.ndarray:
        """(L,) int64: the value of every held gene (0 where free)."""
        sp = self.space
        out = np.zeros(sp.genome_length, dtype=np.int64)
        if self.bits != "search":
            index = len(sp.bit_choices) - 1 if self.bits is None else sp.bit_choices.index(int(self.bits))
            for f in BIT_FIELDS:
                out[sp.genome_slices()[f]] = index
        for gene, value in self.fixed:
            out[gene] = value
        return out

    @cached_property
    def block_of_gene(self) -> np.ndarray:
        """(L,) int64: the block a gene belongs to, or ``B + stage`` for a stage's depth gene."""
        sp = self.space
        out = np.empty(sp.genome_length, dtype=np.int64)
        out[: sp.num_stages] = sp.num_blocks + np.arange(sp.num_stages)
        out[sp.num_stages:] = np.tile(np.arange(sp.num_blocks), (sp.genome_length - sp.num_stages) // sp.num_blocks)
        return out

    @cached_property
    def _depth_values(self) -> np.ndarray:
        """(S, max choices) depth value of each stage's depth gene (padded with 0)."""
        sp = self.space
        out = np.zeros((sp.num_stages, max(len(c) for c in sp.stage_depth_choices)), dtype=np.int64)
        for s, choices in enumerate(sp.stage_depth_choices):
            out[s, : len(choices)] = choices
        return out

    def active(self, genomes: np.ndarray) -> np.ndarray:
        """(N, B) running blocks: ``SearchSpace.genome_active`` in three array operations (it runs
        several times per generation)."""
        sp = self.space
        depth = self._depth_values[np.arange(sp.num_stages), genomes[:, : sp.num_stages]]
        return sp.position_of_block < depth[:, sp.stage_of_block]

    @cached_property
    def _hash_weights(self) -> np.ndarray:
        return np.random.default_rng(0x5EA4C4).integers(1, 2**62, self.space.genome_length, dtype=np.int64)

    # ---- genomes -----------------------------------------------------------------------
    def hold(self, genomes: np.ndarray) -> np.ndarray:
        """Write the held genes into ``genomes`` (in place) and return it."""
        held = ~self.free
        if held.any():
            genomes[:, held] = self.values[held]
        return genomes

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Uniform random genomes (held genes fixed)."""
        return self.hold(self.space.sample_genomes(rng, n))

    def canonical(self, genomes: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        """Genomes with skipped blocks' genes zeroed: equal iff the subnets are equal."""
        active = self.active(genomes) if active is None else active
        keep = np.concatenate([active, np.ones((len(genomes), self.space.num_stages), bool)], axis=1)
        return np.where(keep[:, self.block_of_gene], genomes, 0)

    def hashes(self, genomes: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        """(N,) int64 keys of the canonical subnets (a random linear hash mod 2**64: collisions
        between different subnets have probability ~1e-19 per pair)."""
        with np.errstate(over="ignore"):
            return self.canonical(genomes, active) @ self._hash_weights

    def to_subnet(self, genome: np.ndarray) -> Subnet:
        return self.space.from_genome(genome, quantized=self.quantized)

    # ---- variation -----------------------------------------------------------------------
    def mutate(self, rng: np.random.Generator, parents: np.ndarray, prob: float) -> np.ndarray:
        """Re-draw each block's genes (kernel, width, its four bits) with probability ``prob``,
        and each stage's depth gene with the same probability (the paper's mutation)."""
        sp = self.space
        unit = rng.random((len(parents), sp.num_blocks + sp.num_stages)) < prob  # blocks, then stages
        rows, cols = np.nonzero(unit[:, self.block_of_gene])  # only ~prob of the genes: draw just those
        out = parents.copy()
        out[rows, cols] = (rng.random(len(rows)) * sp.gene_cardinality[cols]).astype(np.int64)
        return self.hold(out)

    def crossover(self, rng: np.random.Generator, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Each gene from either parent with probability 1/2 (uniform crossover)."""
        return self.hold(np.where(rng.integers(0, 2, a.shape, dtype=np.bool_), a, b))

    def blend(self, rng: np.random.Generator, genomes: np.ndarray, anchor: np.ndarray, share: float) -> np.ndarray:
        """Copy a random ``share`` of genes from ``anchor`` (repair: repeated blends reach the
        admissible anchor, so repair always ends)."""
        take = rng.random(genomes.shape) < share
        return self.hold(np.where(take, anchor, genomes))
