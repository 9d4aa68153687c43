"""A bit policy: the bits of the four quantized tensors of every block (docs/design.md §3.1).

A leaf of the package (only the value rules below it): the space builds uniform policies and the
subnet validates policies against the space, so both import this module and it imports neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .values import int_tuple

BIT_FIELDS: tuple[str, ...] = ("pw_w", "pw_a", "dw_w", "dw_a")
"""Per-block quantization fields: both 1x1 convs use the pw pair, the depthwise conv the dw pair."""


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


def as_policy(bits: BitPolicy | Mapping[str, Sequence[int]] | None) -> BitPolicy | None:
    """A policy from its JSON object (keys :data:`BIT_FIELDS`, integer lists); ``None`` stays float."""
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
    return BitPolicy(*[int_tuple(bits[f], f"bits.{f}") for f in BIT_FIELDS])
