"""Bit widths, integer ranges and calibration methods: the vocabulary every quantization module
shares (a leaf: no torch, no other module of the package)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

__all__ = ["SUPPORTED_BITS", "CalibrationMethod", "check_method", "qrange", "validate_bits"]

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
