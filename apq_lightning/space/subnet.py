"""One network of a space: the :class:`Subnet` value type and its project JSON format.

Construction validates every entry against the space and zeroes the values of skipped blocks,
so two subnets that differ only in skipped blocks compare and hash equal. The APQ reference's
spec format is parsed and written by :mod:`~apq_lightning.space.apq_format`; genomes by
:mod:`~apq_lightning.space.genome`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .apq_format import ApqRounding, apq_fields, apq_spec
from .bits import BIT_FIELDS, BitPolicy, as_policy
from .spec import SearchSpace, get_space
from .values import check_len, int_tuple, parse_json


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
        depths = int_tuple(self.depths, "depths")
        check_len("depths", depths, sp.num_stages, "one per stage", sp.name)
        for s, (d, allowed) in enumerate(zip(depths, sp.stage_depth_choices)):
            if d not in allowed:
                raise ValueError(
                    f"space {sp.name!r}, stage {s}: depths={d} is not allowed; allowed: {list(allowed)}"
                )
        active = sp.active(depths)
        kernels = int_tuple(self.kernels, "kernels")
        widths = int_tuple(self.widths, "widths")
        check_len("kernels", kernels, sp.num_blocks, "one per block", sp.name)
        check_len("widths", widths, sp.num_blocks, "one per block", sp.name)
        bits = as_policy(self.bits)
        for blk in sp.blocks:
            if not active[blk.index]:
                continue
            _check_value(sp, blk.index, "kernels", kernels[blk.index], sp.kernel_choices)
            _check_value(sp, blk.index, "widths", widths[blk.index], blk.width_choices)
        canon_bits = None
        if bits is not None:
            fields = {}
            for f in BIT_FIELDS:
                vals = int_tuple(bits.get(f), f"bits.{f}")
                check_len(f"bits.{f}", vals, sp.num_blocks, "one per block", sp.name)
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
        return Subnet(self.space, self.depths, self.kernels, self.widths, as_policy(bits))

    def key(self) -> str:
        """Short stable identifier (hex digest of the canonical JSON)."""
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
    def from_dict(
        cls, d: Mapping[str, Any], space: str | SearchSpace | None = None, apq_rounding: ApqRounding = "network"
    ) -> Subnet:
        """Parse the project's subnet JSON, or the APQ reference spec (keys ``ks``, ``e``, ``d``;
        its ratios become channels by ``apq_rounding``, see :meth:`from_apq`)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a subnet must be a JSON object, got {type(d).__name__}")
        if "ks" in d or "e" in d:
            return cls.from_apq(d, space or d.get("space", "apq_imagenet"), apq_rounding)
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
        return cls(get_space(name).name, d["depths"], d["kernels"], d["widths"], as_policy(d.get("bits")))

    @classmethod
    def from_json(cls, text: str, space: str | SearchSpace | None = None) -> Subnet:
        return cls.from_dict(parse_json(text), space)

    # ---- APQ reference format ------------------------------------------------------------
    @classmethod
    def from_apq(
        cls, spec: Mapping[str, Any], space: str | SearchSpace = "apq_imagenet", rounding: ApqRounding = "network"
    ) -> Subnet:
        """Import an APQ reference spec: ``ks``, ``e`` (expand ratios), ``d``, ``*_bits_setting``.

        ``rounding="network"`` (the default: the network APQ runs): ``mid = make_divisible(round(e ·
        Cin), 8)`` with the MobileNet rule, as the reference's dynamic MBConv layer computes it;
        ``"cost"``: ``make_divisible(e · Cin, 8)``, as its latency converter and predictor price it
        (reproduces its published latencies; the two differ for about one block in twenty of
        arbitrary ratios). A stage whose blocks cannot be skipped takes its fixed depth whatever ``d`` says,
        as the reference network does. ``ks``, ``d`` and the bits follow the integer rule of
        every other field (3.9 or "3" is refused, never truncated); ``e`` is a ratio, so any
        finite positive number. The parsing rules: :func:`~apq_lightning.space.apq_format.apq_fields`.
        """
        sp = get_space(space)
        return cls(sp.name, *apq_fields(spec, sp, rounding))

    def to_apq(self) -> dict[str, Any]:
        """Export in the APQ reference's spec format (skipped blocks: ks 3, e 4, 8 bits, as it does)."""
        return apq_spec(self)


def _check_value(sp: SearchSpace, block: int, name: str, value: int, allowed: Sequence[int]) -> None:
    if value not in allowed:
        raise ValueError(
            f"space {sp.name!r}, block {block} (stage {sp.blocks[block].stage}): {name}={value} "
            f"is not allowed; allowed: {list(allowed)}"
        )
