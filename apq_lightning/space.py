"""The APQ search space: architectures, fine-grained widths and per-block bit policies.

This module knows nothing of torch modules (DESIGN.md §7): it describes *which* networks
exist (``SearchSpace``), names one of them (``Subnet``), validates and canonicalises it,
converts it to and from JSON / the APQ reference spec format, and codes it as an integer
genome for vectorised search and cost evaluation.

Conventions
-----------
* Blocks are numbered 0..B-1 over all stages; block ``i`` of stage ``s`` runs iff its
  position within the stage is ``< depths[s]``.
* ``widths`` holds the *mid* (expanded) channel count of each block, i.e. the channel-pruning
  decision; the allowed set is ``{4·Cin, 4·Cin+8, …, 6·Cin}``.
* Values of skipped blocks carry no meaning: they are canonicalised to ``0`` so that two
  subnets that differ only in skipped blocks compare and hash equal.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

BIT_FIELDS: tuple[str, ...] = ("pw_w", "pw_a", "dw_w", "dw_a")
"""Per-block quantization fields: both 1x1 convs use the pw pair, the depthwise conv the dw pair."""

APQ_BIT_KEYS: dict[str, str] = {f: f"{f}_bits_setting" for f in BIT_FIELDS}
"""Field name -> key in the APQ reference's spec dicts."""


# --------------------------------------------------------------------------------------
# Space description
# --------------------------------------------------------------------------------------
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
    """A MobileNetV2-style space of elastic MBConv blocks (DESIGN.md §2).

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

    # ---- construction ------------------------------------------------------------------
    def subnet(
        self,
        depths: Sequence[int],
        kernels: Sequence[int],
        widths: Sequence[int],
        bits: BitPolicy | Mapping[str, Sequence[int]] | None = None,
    ) -> Subnet:
        """Validated, canonical subnet of this space."""
        return Subnet(self.name, tuple(depths), tuple(kernels), tuple(widths), _as_policy(bits))

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
        self.check(subnet)
        g = np.zeros(self.genome_length, dtype=np.int64)
        sl = self.genome_slices()
        g[sl["depths"]] = [c.index(d) for c, d in zip(self.stage_depth_choices, subnet.depths)]
        active = subnet.active_mask
        for i, blk in enumerate(self.blocks):
            if not active[i]:
                continue
            g[sl["kernels"]][i] = self.kernel_choices.index(subnet.kernels[i])
            g[sl["widths"]][i] = blk.width_choices.index(subnet.widths[i])
            for f in BIT_FIELDS:
                value = subnet.bits.get(f)[i] if subnet.bits is not None else self.bit_choices[-1]
                g[sl[f]][i] = self.bit_choices.index(value)
        return g

    def from_genome(self, genome: Sequence[int] | np.ndarray, quantized: bool = True) -> Subnet:
        g = np.asarray(genome, dtype=np.int64)
        if g.shape != (self.genome_length,):
            raise ValueError(f"space {self.name!r}: genome must have {self.genome_length} genes, got shape {g.shape}")
        if (g < 0).any() or (g >= self.gene_cardinality).any():
            bad = int(np.flatnonzero((g < 0) | (g >= self.gene_cardinality))[0])
            raise ValueError(f"space {self.name!r}: gene {bad} = {g[bad]} outside [0, {self.gene_cardinality[bad]})")
        vals = [self.gene_choices[j][int(x)] for j, x in enumerate(g)]
        sl = self.genome_slices()
        bits = BitPolicy(*[tuple(vals[sl[f]]) for f in BIT_FIELDS]) if quantized else None
        return self.subnet(vals[sl["depths"]], vals[sl["kernels"]], vals[sl["widths"]], bits)

    # ---- checks ------------------------------------------------------------------------
    def check(self, subnet: Subnet) -> None:
        """Raise ``ValueError`` unless ``subnet`` belongs to this space."""
        if subnet.space != self.name:
            raise ValueError(
                f"subnet belongs to space {subnet.space!r}, but this is space {self.name!r}; "
                f"build the subnet for {self.name!r} (registered spaces: {', '.join(list_spaces())})"
            )


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


@register_space
def apq_imagenet() -> SearchSpace:
    """APQ's ImageNet space at 224px, exactly matching the paper and its BitFusion table."""
    return SearchSpace(
        name="apq_imagenet",
        image_size=224,
        stem_channels=32,
        stem_stride=2,
        first_block_channels=16,
        stage_channels=(24, 40, 80, 96, 192, 320),
        stage_strides=(2, 2, 2, 1, 2, 1),
        stage_blocks=(4, 4, 4, 4, 4, 1),
        head_channels=1280,
        description="APQ / ProxylessNAS ImageNet space (CVPR 2020)",
    )


@register_space
def apq_cifar() -> SearchSpace:
    """32x32 images on CPU: same structure, narrower channels, stride-1 stem.

    Sized so that the largest subnet trains at >= 250 img/s on 2 CPU cores (see README).
    """
    return SearchSpace(
        name="apq_cifar",
        image_size=32,
        stem_channels=16,
        stem_stride=1,
        first_block_channels=8,
        stage_channels=(16, 24, 32, 48, 64, 96),
        stage_strides=(2, 2, 2, 1, 2, 1),
        stage_blocks=(4, 4, 4, 4, 4, 1),
        head_channels=512,
        description="CIFAR-sized APQ space for CPU work",
    )


@register_space
def tiny() -> SearchSpace:
    """A few-hundred-KFLOP space for tests and the offline digits demo (16x16 inputs)."""
    return SearchSpace(
        name="tiny",
        image_size=16,
        stem_channels=8,
        stem_stride=1,
        first_block_channels=8,
        stage_channels=(8, 16, 16, 24, 24, 32),
        stage_strides=(1, 2, 1, 2, 1, 1),
        stage_blocks=(4, 4, 4, 4, 4, 1),
        head_channels=96,
        description="tiny space for tests and the digits demo",
    )


# --------------------------------------------------------------------------------------
# Subnets
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BitPolicy:
    """Bits per block for the four quantized tensors of an MBConv block."""

    pw_w: tuple[int, ...]
    pw_a: tuple[int, ...]
    dw_w: tuple[int, ...]
    dw_a: tuple[int, ...]

    def get(self, name: str) -> tuple[int, ...]:
        return getattr(self, name)

    def block(self, i: int) -> tuple[int, int, int, int]:
        return (self.pw_w[i], self.pw_a[i], self.dw_w[i], self.dw_a[i])

    def to_dict(self) -> dict[str, list[int]]:
        return {f: list(self.get(f)) for f in BIT_FIELDS}


def _as_policy(bits: BitPolicy | Mapping[str, Sequence[int]] | None) -> BitPolicy | None:
    if bits is None or isinstance(bits, BitPolicy):
        return bits
    if not isinstance(bits, Mapping):
        raise ValueError(f"bits must be a mapping with keys {list(BIT_FIELDS)}, got {type(bits).__name__}")
    unknown = set(bits) - set(BIT_FIELDS)
    missing = set(BIT_FIELDS) - set(bits)
    if unknown or missing:
        raise ValueError(
            f"bits: unknown keys {sorted(unknown)} / missing keys {sorted(missing)}; required: {list(BIT_FIELDS)}"
        )
    return BitPolicy(*[_int_tuple(bits[f], f"bits.{f}") for f in BIT_FIELDS])


# --------------------------------------------------------------------------------------
# Named bit policies
# --------------------------------------------------------------------------------------
FLOAT_POLICY_NAMES: tuple[str, ...] = ("float", "fp", "fp32", "none")
"""Names of the float "policy" (no bits: the blocks stay full precision)."""


def is_float_policy_name(name: str) -> bool:
    return str(name).strip().lower() in FLOAT_POLICY_NAMES


def policy_names(space: str | SearchSpace) -> list[str]:
    """Names :func:`named_policy` accepts for ``space``."""
    bits = get_space(space).bit_choices
    return ["float"] + [f"uniform{b}" for b in bits] + [f"w{w}a{a}" for w in bits for a in bits]


def named_policy(space: str | SearchSpace, name: str) -> BitPolicy | None:
    """Named baseline policies: ``uniform4`` / ``uniform6`` / ``uniform8`` (every active block at
    those bits), ``w4a8``-style (weights / activations of every conv), ``float`` (``None``: no
    policy, the blocks stay full precision)."""
    sp = get_space(space)
    key = str(name).strip().lower()
    if key in FLOAT_POLICY_NAMES:
        return None
    m = re.fullmatch(r"uniform(\d+)", key) or re.fullmatch(r"w(\d+)a(\d+)", key)
    if m is not None:
        w = int(m.group(1))
        a = int(m.group(2)) if m.lastindex == 2 else w
        bad = [b for b in (w, a) if b not in sp.bit_choices]
        if not bad:
            return sp.uniform_policy((w, a, w, a))
        raise ValueError(
            f"policy {name!r}: {bad[0]} bits is not a bit choice of space {sp.name!r} "
            f"(allowed: {list(sp.bit_choices)})"
        )
    raise ValueError(f"unknown policy {name!r}; named policies of space {sp.name!r}: {', '.join(policy_names(sp))}")


def apply_named_policy(subnet: Subnet, policy: str | BitPolicy | Mapping[str, Sequence[int]] | int | None) -> Subnet:
    """``subnet`` under ``policy`` (a name of :func:`named_policy`, a policy, or a uniform int)."""
    if isinstance(policy, str):
        return subnet.with_bits(named_policy(subnet.space, policy))
    return subnet.with_bits(policy)


@dataclass(frozen=True)
class Subnet:
    """One architecture (+ optional bit policy) of a registered space, validated and canonical.

    Construction validates every entry against the space and zeroes the values of skipped
    blocks, so equality and hashing ignore them.
    """

    space: str
    depths: tuple[int, ...]
    kernels: tuple[int, ...]
    widths: tuple[int, ...]
    bits: BitPolicy | None = None

    def __post_init__(self) -> None:
        sp = get_space(self.space)
        depths = _int_tuple(self.depths, "depths")
        _check_len("depths", depths, sp.num_stages, "one per stage", sp.name)
        for s, (d, allowed) in enumerate(zip(depths, sp.stage_depth_choices)):
            if d not in allowed:
                raise ValueError(
                    f"space {sp.name!r}, stage {s}: depths={d} is not allowed; allowed: {list(allowed)}"
                )
        active = sp.active(depths)
        kernels = _int_tuple(self.kernels, "kernels")
        widths = _int_tuple(self.widths, "widths")
        _check_len("kernels", kernels, sp.num_blocks, "one per block", sp.name)
        _check_len("widths", widths, sp.num_blocks, "one per block", sp.name)
        bits = _as_policy(self.bits)
        for blk in sp.blocks:
            if not active[blk.index]:
                continue
            _check_value(sp, blk.index, "kernels", kernels[blk.index], sp.kernel_choices)
            _check_value(sp, blk.index, "widths", widths[blk.index], blk.width_choices)
        canon_bits = None
        if bits is not None:
            fields = {}
            for f in BIT_FIELDS:
                vals = _int_tuple(bits.get(f), f"bits.{f}")
                _check_len(f"bits.{f}", vals, sp.num_blocks, "one per block", sp.name)
                for blk in sp.blocks:
                    if active[blk.index]:
                        _check_value(sp, blk.index, f"bits.{f}", vals[blk.index], sp.bit_choices)
                fields[f] = tuple(v if a else 0 for v, a in zip(vals, active))
            canon_bits = BitPolicy(**fields)
        object.__setattr__(self, "depths", depths)
        object.__setattr__(self, "kernels", tuple(k if a else 0 for k, a in zip(kernels, active)))
        object.__setattr__(self, "widths", tuple(w if a else 0 for w, a in zip(widths, active)))
        object.__setattr__(self, "bits", canon_bits)

    # ---- views -------------------------------------------------------------------------
    @property
    def search_space(self) -> SearchSpace:
        return get_space(self.space)

    @property
    def active_mask(self) -> list[bool]:
        return self.search_space.active(self.depths)

    @property
    def active_blocks(self) -> list[int]:
        return [i for i, a in enumerate(self.active_mask) if a]

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def with_bits(self, bits: BitPolicy | Mapping[str, Sequence[int]] | int | None) -> Subnet:
        """Same architecture under another policy (an int means a uniform policy)."""
        if isinstance(bits, int):
            bits = self.search_space.uniform_policy(bits)
        return Subnet(self.space, self.depths, self.kernels, self.widths, _as_policy(bits))

    def key(self) -> str:
        """Short stable identifier (hex digest of the canonical JSON)."""
        import hashlib

        return hashlib.sha1(self.to_json(indent=None).encode()).hexdigest()[:12]

    # ---- JSON --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "space": self.space,
            "depths": list(self.depths),
            "kernels": list(self.kernels),
            "widths": list(self.widths),
        }
        if self.bits is not None:
            d["bits"] = self.bits.to_dict()
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], space: str | SearchSpace | None = None) -> Subnet:
        """Parse the project's subnet JSON, or the APQ reference spec (keys ``ks``, ``e``, ``d``)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a subnet must be a JSON object, got {type(d).__name__}")
        if "ks" in d or "e" in d:
            return cls.from_apq(d, space or d.get("space", "apq_imagenet"))
        allowed = {"space", "depths", "kernels", "widths", "bits"}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"subnet JSON: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        missing = {"depths", "kernels", "widths"} - set(d)
        if missing:
            raise ValueError(f"subnet JSON: missing keys {sorted(missing)}")
        name = d.get("space")
        if space is not None:
            want = get_space(space).name
            if name is not None and name != want:
                raise ValueError(f"subnet JSON is for space {name!r}, expected space {want!r}")
            name = want
        if name is None:
            raise ValueError("subnet JSON: missing key 'space' (e.g. \"apq_cifar\")")
        if "bits" in d and d["bits"] is None:
            raise ValueError(
                f"subnet JSON: bits is null; omit 'bits' for a full-precision subnet, or give an object "
                f"with keys {list(BIT_FIELDS)}"
            )
        return cls(get_space(name).name, d["depths"], d["kernels"], d["widths"], _as_policy(d.get("bits")))

    @classmethod
    def from_json(cls, text: str, space: str | SearchSpace | None = None) -> Subnet:
        return cls.from_dict(_parse_json(text), space)

    # ---- APQ reference format ------------------------------------------------------------
    @classmethod
    def from_apq(cls, spec: Mapping[str, Any], space: str | SearchSpace = "apq_imagenet") -> Subnet:
        """Import an APQ reference spec: ``ks``, ``e`` (expand ratios), ``d``, ``*_bits_setting``.

        ``mid = make_divisible(e · Cin, 8)`` with the MobileNet rounding rule;
        a stage whose blocks cannot be skipped takes its fixed depth whatever ``d`` says,
        as the reference network does. ``ks``, ``d`` and the bits follow the integer rule of
        every other field (3.9 or "3" is refused, never truncated); ``e`` is a ratio, so any
        finite positive number.
        """
        sp = get_space(space)
        for key in ("ks", "e", "d"):
            if key not in spec:
                raise ValueError(f"APQ spec: missing key {key!r} (have {sorted(spec)})")
        d = _int_tuple(spec["d"], "APQ spec: d")
        if len(d) not in (sp.num_stages, sp.num_stages - 1):
            raise ValueError(f"APQ spec: 'd' has {len(d)} entries, space {sp.name!r} needs {sp.num_stages}")
        depths = []
        for s, allowed in enumerate(sp.stage_depth_choices):
            depths.append(allowed[0] if len(allowed) == 1 else d[s])
        e = _ratio_tuple(spec["e"], "APQ spec: e")
        _check_len("e", e, sp.num_blocks, "one per block", sp.name)
        widths = [make_divisible(r * b.in_channels, sp.width_step) for r, b in zip(e, sp.blocks)]
        kernels = _int_tuple(spec["ks"], "APQ spec: ks")
        return cls(sp.name, tuple(depths), kernels, tuple(widths), _apq_policy(spec))

    def to_apq(self) -> dict[str, Any]:
        """Export in the APQ reference's spec format (skipped blocks: ks 3, e 4, 8 bits, as it does)."""
        sp = self.search_space
        active = self.active_mask
        spec: dict[str, Any] = {
            "wid": None,
            "ks": [k if a else 3 for k, a in zip(self.kernels, active)],
            "e": [w / b.in_channels if a else 4 for w, b, a in zip(self.widths, sp.blocks, active)],
            "d": list(self.depths),
        }
        if self.bits is not None:
            for f, key in APQ_BIT_KEYS.items():
                spec[key] = [v if a else 8 for v, a in zip(self.bits.get(f), active)]
        return spec


def _listlike(values: Any, name: str, what: str) -> list[Any]:
    """The entries of a JSON list; a string, mapping or scalar is refused whole (never split)."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a list of {what}, got {type(values).__name__} {_short(values)}")
    return list(values)


def _int_tuple(values: Iterable[Any], name: str) -> tuple[int, ...]:
    """Integers only: 4.7 or "4" is an error naming ``name``, never silently 4 (4.0 is 4)."""
    out = []
    for i, v in enumerate(_listlike(values, name, "integers")):
        is_int = isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
        if not (is_int or isinstance(v, float) and v.is_integer()):
            raise ValueError(f"{name}[{i}] must be an integer, got {type(v).__name__} {_short(v)}")
        out.append(int(v))
    return tuple(out)


def _ratio_tuple(values: Iterable[Any], name: str) -> tuple[float, ...]:
    """Finite positive numbers (APQ's expand ratios); strings, null, inf and NaN are errors."""
    out = []
    for i, v in enumerate(_listlike(values, name, "numbers")):
        number = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
        if not number or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name}[{i}] must be a finite number > 0, got {type(v).__name__} {_short(v)}")
        out.append(float(v))
    return tuple(out)


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` cut to one readable line (a 100k-character value must not flood the terminal)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


def _apq_policy(spec: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """The four ``*_bits_setting`` lists of an APQ spec: all four (quantized) or none (float)."""
    present = [k for k in APQ_BIT_KEYS.values() if k in spec]
    if not present:
        return None
    if len(present) != len(APQ_BIT_KEYS):
        missing = [k for k in APQ_BIT_KEYS.values() if k not in spec]
        raise ValueError(
            f"APQ spec: has {present} but not {missing}; give all four *_bits_setting keys, or none for "
            f"a full-precision subnet"
        )
    return {f: _int_tuple(spec[k], f"APQ spec: {k}") for f, k in APQ_BIT_KEYS.items()}


def make_divisible(value: float, divisor: int = 8) -> int:
    """The MobileNet channel rounding rule that APQ uses for ``mid = e · Cin``.

    Nearest multiple of ``divisor`` (halves round up), at least ``divisor``, and one step up
    where rounding down lost more than 10 % of the value. Written here rather than imported
    from ``timm.layers.make_divisible`` (DESIGN §2 names it) because timm imports torch and
    this module must stay torch-free (the ``cost`` command parses APQ specs); a test checks
    that both agree on many values.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _check_len(name: str, values: Sequence[Any], n: int, what: str, space: str) -> None:
    if len(values) != n:
        raise ValueError(f"space {space!r}: {name} has {len(values)} entries, expected {n} ({what})")


def _check_value(sp: SearchSpace, block: int, name: str, value: int, allowed: Sequence[int]) -> None:
    if value not in allowed:
        raise ValueError(
            f"space {sp.name!r}, block {block} (stage {sp.blocks[block].stage}): {name}={value} "
            f"is not allowed; allowed: {list(allowed)}"
        )


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------
def load_subnets(path: str | Path, space: str | SearchSpace | None = None) -> list[Subnet]:
    """Read one subnet (``.json``) or many (``.jsonl``, one per line; or a JSON list).

    Every failure is a ``ValueError`` (``FileNotFoundError`` for a missing file) whose message
    names the file (and the line of a ``.jsonl``): a directory, a binary file, JSON nested too
    deeply to parse, or a subnet that does not validate.
    """
    p = Path(path)
    text = _read_text(p, "subnet file")
    if p.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(Subnet.from_dict(_parse_json(line), space))
                except ValueError as err:
                    raise ValueError(f"{p}:{n}: {err}") from None
        return out
    try:
        data = _parse_json(text)
        if isinstance(data, list):
            return [Subnet.from_dict(x, space) for x in data]
        return [Subnet.from_dict(data, space)]
    except ValueError as err:
        raise ValueError(f"{p}: {err}") from None


def _read_text(p: Path, what: str) -> str:
    """A UTF-8 text file; a missing path, a directory or binary content named in one line."""
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if p.is_dir():
        raise ValueError(f"{p} is a directory; expected a {what} (.json or .jsonl)")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{p}: not a text (UTF-8 JSON) {what}: {err.reason} at byte {err.start}") from None
    except OSError as err:
        raise ValueError(f"{p}: cannot read the {what}: {err.strerror or err}") from None


def _parse_json(text: str) -> Any:
    """``json.loads`` with its two failure modes turned into one-line ``ValueError``s."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON: {err}") from None
    except RecursionError:
        raise ValueError("not a subnet: JSON nested too deeply to parse") from None


def load_subnet(path: str | Path, space: str | SearchSpace | None = None) -> Subnet:
    subnets = load_subnets(path, space)
    if len(subnets) != 1:
        raise ValueError(f"{path}: expected exactly one subnet, found {len(subnets)}")
    return subnets[0]


def save_subnets(path: str | Path, subnets: Sequence[Subnet]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".jsonl":
        p.write_text("".join(s.to_json() + "\n" for s in subnets))
    elif len(subnets) == 1:
        p.write_text(subnets[0].to_json(indent=2) + "\n")
    else:
        p.write_text(json.dumps([s.to_dict() for s in subnets], indent=2) + "\n")
