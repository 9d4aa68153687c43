"""Which networks exist: the space's macro layout, its blocks and gene layout, and the registry.

A :class:`SearchSpace` is pure geometry and counting; it names its subnets by building
:class:`~apq_lightning.space.subnet.Subnet` values and codes them through
:mod:`~apq_lightning.space.genome`. Those two modules validate against the registry kept here,
so the few methods that build subnets import them when called: that keeps the import graph of
the package one-way (``spec`` <- ``subnet`` <- ``genome``) while ``sp.subnet(...)``,
``sp.to_genome(...)`` and ``sp.sample()`` stay methods of the space.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from .bits import BIT_FIELDS, BitPolicy, as_policy

if TYPE_CHECKING:
    from .subnet import Subnet


@dataclass(frozen=True)
class BlockSpec:
    """Static facts about one elastic MBConv block of a space."""

    index: int
    stage: int
    position: int
    in_channels: int
    out_channels: int
    stride: int
    input_size: int
    width_choices: tuple[int, ...]

    @property
    def output_size(self) -> int:
        return conv_out_size(self.input_size, self.stride)

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def conv_out_size(size: int, stride: int) -> int:
    """Spatial size after a 'same'-padded odd-kernel conv (the APQ table's ``(s+1)//2`` rule)."""
    return (size - 1) // stride + 1


@dataclass(frozen=True)
class SearchSpace:
    """A MobileNetV2-style space of elastic MBConv blocks (docs/design.md §2).

    The defaults of the elastic dimensions are APQ's; presets only change the macro layout.
    """

    name: str
    image_size: int
    stem_channels: int
    stem_stride: int
    first_block_channels: int
    stage_channels: tuple[int, ...]
    stage_strides: tuple[int, ...]
    stage_blocks: tuple[int, ...]
    head_channels: int
    kernel_choices: tuple[int, ...] = (3, 5, 7)
    depth_choices: tuple[int, ...] = (2, 3, 4)
    expand_range: tuple[int, int] = (4, 6)
    width_step: int = 8
    bit_choices: tuple[int, ...] = (4, 6, 8)
    fixed_bits: int = 8
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        n = len(self.stage_channels)
        if not (len(self.stage_strides) == len(self.stage_blocks) == n):
            raise ValueError(
                f"space {self.name!r}: stage_channels, stage_strides and stage_blocks must have "
                f"the same length, got {len(self.stage_channels)}, {len(self.stage_strides)}, "
                f"{len(self.stage_blocks)}"
            )
        for name in ("kernel_choices", "depth_choices", "bit_choices"):
            values = getattr(self, name)
            if list(values) != sorted(set(values)) or not values:
                raise ValueError(f"space {self.name!r}: {name} must be non-empty, ascending, unique: {values}")
        if any(k % 2 == 0 for k in self.kernel_choices):
            raise ValueError(f"space {self.name!r}: kernels must be odd, got {self.kernel_choices}")

    # ---- derived structure ------------------------------------------------------------
    @cached_property
    def blocks(self) -> tuple[BlockSpec, ...]:
        lo, hi = self.expand_range
        size = conv_out_size(self.image_size, self.stem_stride)
        cin = self.first_block_channels
        out: list[BlockSpec] = []
        for stage, (cout, stride, n) in enumerate(
            zip(self.stage_channels, self.stage_strides, self.stage_blocks)
        ):
            for pos in range(n):
                s = stride if pos == 0 else 1
                widths = tuple(range(lo * cin, hi * cin + 1, self.width_step))
                out.append(BlockSpec(len(out), stage, pos, cin, cout, s, size, widths))
                size = conv_out_size(size, s)
                cin = cout
        return tuple(out)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_stages(self) -> int:
        return len(self.stage_channels)

    @cached_property
    def stage_depth_choices(self) -> tuple[tuple[int, ...], ...]:
        """Allowed depths per stage; a stage with fewer blocks than the smallest depth is fixed."""
        out = []
        for n in self.stage_blocks:
            ds = tuple(d for d in self.depth_choices if d <= n)
            out.append(ds if n >= min(self.depth_choices) else (n,))
        return tuple(out)

    @cached_property
    def stage_of_block(self) -> np.ndarray:
        return np.array([b.stage for b in self.blocks], dtype=np.int64)

    @cached_property
    def position_of_block(self) -> np.ndarray:
        return np.array([b.position for b in self.blocks], dtype=np.int64)

    @property
    def final_size(self) -> int:
        return self.blocks[-1].output_size

    # ---- counting ---------------------------------------------------------------------
    def num_architectures(self, quantized: bool = False) -> int:
        """Exact count of distinct (canonical) subnets; with ``quantized`` bit policies multiply in."""
        per_block_bits = len(self.bit_choices) ** len(BIT_FIELDS) if quantized else 1
        total = 1
        for stage, depths in enumerate(self.stage_depth_choices):
            stage_blocks = [b for b in self.blocks if b.stage == stage]
            stage_total = 0
            for d in depths:
                stage_total += math.prod(
                    len(self.kernel_choices) * len(b.width_choices) * per_block_bits for b in stage_blocks[:d]
                )
            total *= stage_total
        return total

    # ---- subnets -----------------------------------------------------------------------
    def subnet(
        self,
        depths: Sequence[int],
        kernels: Sequence[int],
        widths: Sequence[int],
        bits: BitPolicy | Mapping[str, Sequence[int]] | None = None,
    ) -> Subnet:
        """Validated, canonical subnet of this space."""
        from .subnet import Subnet  # see the module docstring

        return Subnet(self.name, tuple(depths), tuple(kernels), tuple(widths), as_policy(bits))

    def active(self, depths: Sequence[int]) -> list[bool]:
        return [b.position < depths[b.stage] for b in self.blocks]

    def uniform_policy(self, bits: int | tuple[int, int, int, int]) -> BitPolicy:
        """Named baseline policies: every active block at the same bits (or the same 4-tuple)."""
        quad = (bits,) * 4 if isinstance(bits, int) else tuple(bits)
        return BitPolicy(*[(q,) * self.num_blocks for q in quad])

    def largest(self, bits: int | None = None) -> Subnet:
        return self.subnet(
            [max(c) for c in self.stage_depth_choices],
            [max(self.kernel_choices)] * self.num_blocks,
            [b.width_choices[-1] for b in self.blocks],
            None if bits is None else self.uniform_policy(bits),
        )

    def smallest(self, bits: int | None = None) -> Subnet:
        return self.subnet(
            [min(c) for c in self.stage_depth_choices],
            [min(self.kernel_choices)] * self.num_blocks,
            [b.width_choices[0] for b in self.blocks],
            None if bits is None else self.uniform_policy(bits),
        )

    def sample(self, rng: np.random.Generator | int | None = None, quantized: bool = False) -> Subnet:
        """Uniform random subnet: each depth, kernel, width (and bit) choice independently uniform."""
        return self.from_genome(self.sample_genomes(rng, 1)[0], quantized=quantized)

    def check(self, subnet: Subnet) -> None:
        """Raise ``ValueError`` unless ``subnet`` belongs to this space."""
        if subnet.space != self.name:
            raise ValueError(
                f"subnet belongs to space {subnet.space!r}, but this is space {self.name!r}; "
                f"build the subnet for {self.name!r} (registered spaces: {', '.join(list_spaces())})"
            )

    # ---- integer genomes (vectorised search / cost) -------------------------------------
    @cached_property
    def gene_choices(self) -> tuple[tuple[int, ...], ...]:
        """Allowed values of every gene, in genome order.

        Genome layout: ``[depth of stage 0..S-1][kernel of block 0..B-1][width of block 0..B-1]
        [pw_w of 0..B-1][pw_a …][dw_w …][dw_a …]``; a gene holds the *index* of its choice.
        """
        genes: list[tuple[int, ...]] = list(self.stage_depth_choices)
        genes += [self.kernel_choices] * self.num_blocks
        genes += [b.width_choices for b in self.blocks]
        genes += [self.bit_choices] * (len(BIT_FIELDS) * self.num_blocks)
        return tuple(genes)

    @cached_property
    def gene_cardinality(self) -> np.ndarray:
        return np.array([len(c) for c in self.gene_choices], dtype=np.int64)

    @property
    def genome_length(self) -> int:
        return len(self.gene_choices)

    def genome_slices(self) -> dict[str, slice]:
        s, b = self.num_stages, self.num_blocks
        out = {"depths": slice(0, s), "kernels": slice(s, s + b), "widths": slice(s + b, s + 2 * b)}
        for i, f in enumerate(BIT_FIELDS):
            out[f] = slice(s + (2 + i) * b, s + (3 + i) * b)
        return out

    def sample_genomes(self, rng: np.random.Generator | int | None, n: int) -> np.ndarray:
        rng = np.random.default_rng(rng)
        return (rng.random((n, self.genome_length)) * self.gene_cardinality).astype(np.int64)

    def genome_active(self, genomes: np.ndarray) -> np.ndarray:
        """(N, B) bool mask of running blocks for a batch of genomes."""
        genomes = np.atleast_2d(genomes)
        depth_idx = genomes[:, : self.num_stages]
        depth_vals = np.stack(
            [np.asarray(c)[depth_idx[:, s]] for s, c in enumerate(self.stage_depth_choices)], axis=1
        )
        return self.position_of_block[None, :] < depth_vals[:, self.stage_of_block]

    def to_genome(self, subnet: Subnet) -> np.ndarray:
        """Genome of a subnet; skipped blocks get index 0, a float subnet the largest bit index."""
        from .genome import subnet_genome  # see the module docstring

        return subnet_genome(self, subnet)

    def from_genome(self, genome: Sequence[int] | np.ndarray, quantized: bool = True) -> Subnet:
        """The subnet of one genome (``quantized=False``: without its bit genes)."""
        from .genome import genome_subnet  # see the module docstring

        return genome_subnet(self, genome, quantized)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------
_SPACES: dict[str, SearchSpace] = {}


def register_space(fn: Callable[[], SearchSpace]) -> Callable[[], SearchSpace]:
    """Decorator: register a preset factory under the name of the space it returns (timm-style)."""
    space = fn()
    if space.name in _SPACES:
        raise ValueError(f"space {space.name!r} is already registered")
    _SPACES[space.name] = space
    return fn


def add_space(space: SearchSpace) -> SearchSpace:
    """Register a custom space object (e.g. one built from a recipe)."""
    if space.name in _SPACES and _SPACES[space.name] != space:
        raise ValueError(f"a different space named {space.name!r} is already registered")
    _SPACES[space.name] = space
    return space


def list_spaces() -> list[str]:
    return sorted(_SPACES)


def get_space(space: str | SearchSpace) -> SearchSpace:
    """The registered space of that name; a :class:`SearchSpace` passes through unchanged."""
    if isinstance(space, SearchSpace):
        return space
    if not isinstance(space, str):
        raise ValueError(
            f"space must be the name of a search space ({', '.join(list_spaces())}), got "
            f"{type(space).__name__} {space!r}"
        )
    try:
        return _SPACES[space]
    except KeyError:
        raise ValueError(f"unknown search space {space!r}; registered spaces: {', '.join(list_spaces())}") from None
