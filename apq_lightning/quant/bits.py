"""Bit widths, integer ranges, calibration methods and a quantizer's spec: the vocabulary every
quantization module shares (a leaf: no torch, no other module of the package)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = ["SUPPORTED_BITS", "CalibrationMethod", "QuantSpec", "check_method", "qrange", "validate_bits"]

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
"""Bit widths the fake-quant ops are exercised with; anything else is rejected."""

CalibrationMethod = Literal["kl", "minmax"]
_METHODS = ("kl", "minmax")


def check_method(method: str) -> CalibrationMethod:
    """Return ``method`` if it is a known calibration method, else raise ValueError."""
    if method not in _METHODS:
        raise ValueError(f"method = {method!r} is not supported; allowed values: {', '.join(_METHODS)}")
    return method  # type: ignore[return-value]


def validate_bits(
    bits: Any, allowed: Sequence[int] = SUPPORTED_BITS, *, what: str = "bits", allow_none: bool = True
) -> int | None:
    """Return ``bits`` if it is an allowed bit width (or ``None`` = float), else raise ValueError.

    The message names ``what`` (e.g. ``"layer 'features.3.conv' w_bits"``), the value and the
    allowed set, because a bad policy usually comes from a config file far away from this code.
    """
    if bits is None and allow_none:
        return None
    ok = isinstance(bits, int) and not isinstance(bits, bool) and bits in tuple(allowed)
    if not ok:
        allowed_txt = ", ".join(str(b) for b in allowed) + (" or None (float)" if allow_none else "")
        raise ValueError(f"{what} = {bits!r} is not supported; allowed values: {allowed_txt}")
    return int(bits)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-bit quantizer (symmetric when signed)."""
    if signed:
        qmax = 2 ** (bits - 1) - 1
        return -qmax, qmax
    return 0, 2**bits - 1


@dataclass(frozen=True)
class QuantSpec:
    """Configuration of one quantizer (a value type, so policies can be hashed and compared).

    Attributes:
        bits: bit width in ``SUPPORTED_BITS``; ``None`` keeps the tensor in float.
        signed: ``True`` -> ``[-v, v]``, ``False`` -> ``[0, v]``, ``None`` -> decided at
            calibration time (unsigned iff no negative value was observed). ``None`` is how
            activations are configured on arbitrary models, where we cannot know statically
            whether a layer's input comes out of a ReLU.
        per_channel: one range per slice along ``ch_axis`` (weights only).
        ch_axis: channel axis for per-channel ranges (0 = output channels of Conv2d/Linear).
        method: how :func:`~apq_lightning.quant.calibrate` picks ``v``: ``"kl"`` or ``"minmax"``.
        bins: histogram bins for the KL search.
    """

    bits: int | None = 8
    signed: bool | None = True
    per_channel: bool = False
    ch_axis: int = 0
    method: CalibrationMethod = "kl"
    bins: int = 2048

    def __post_init__(self) -> None:
        validate_bits(self.bits)
        check_method(self.method)
        if self.bins < 16:
            raise ValueError(f"bins = {self.bins} is too small for a KL search (need >= 16)")

    def with_bits(self, bits: int | None) -> QuantSpec:
        return replace(self, bits=bits)
