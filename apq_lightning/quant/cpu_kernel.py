"""The CPU fast path of fake quantization (docs/quantization.md §3 "CPU fast path" and §6).

Per-tensor float32 tensors on the CPU -- every activation, and the weights unless
``per_channel`` -- go through :func:`fake_quantize_cpu` instead of
``torch.fake_quantize_per_tensor_affine``: the same arithmetic written with vectorised tensor
ops (or, on one torch thread, one numba-compiled loop: each element read and written once
instead of four times). PyTorch's CPU kernel for this op is a scalar loop that made QAT steps
~1.5x as slow as float steps; the vectorised form brings them to ~1.1x. It returns the op's values bit for bit
and its gradients (``tests/test_quant_primitives.py`` compares the two over every bit width, both
signednesses, ties, range edges, out-of-range and infinite values); the only differences: NaN
inputs give NaN instead of ``qmin * s``, and a blocked gradient is +0.0 where the op gives
-0.0 for a negative incoming gradient.

Kept apart from :mod:`~apq_lightning.quant.quantizers` because it is a kernel, not a policy:
it knows float32 rounding and autograd, nothing about ranges, calibration or bit policies.
:class:`~apq_lightning.quant.quantizers.LinearQuantizer` decides when to use it
(``LinearQuantizer.fast_cpu``) and caches :func:`ste_window` and :func:`float32_reciprocal`
per range for :func:`fake_quantize_cpu_prepared`.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import torch
from torch import Tensor

__all__ = ["fake_quantize_cpu", "fake_quantize_cpu_prepared", "float32_reciprocal", "ste_window"]


def ste_window(scale: float, qmin: int, qmax: int) -> tuple[float, float]:
    """Open interval ``(lo, hi)`` of the float32 inputs whose gradient passes.

    PyTorch's op lets the gradient through where ``qmin <= nearbyint(fl32(x * fl32(1/s))) <=
    qmax``. ``x -> fl32(x * inv)`` is monotone, so that set is an interval of floats; its ends
    are found here with the same float32 arithmetic (a few ``nextafter`` steps from the real
    thresholds ``(qmin - 1/2) s`` and ``(qmax + 1/2) s``), exactly, once per range.
    """
    f32 = np.float32
    s = f32(scale)
    inv = f32(1.0) / s

    def level(x: np.float32) -> np.float32:
        return np.rint(f32(x) * inv)  # float32 product, round half to even

    def step(x: np.float32, up: bool) -> np.float32:
        return np.nextafter(x, f32(np.inf) if up else f32(-np.inf))

    def edge(start: float, inside: Any, up: bool) -> np.float32:
        # the last float inside the interval, walking from `start` towards the edge `up`
        x = f32(start)
        for _ in range(10_000):
            if inside(x):
                nxt = step(x, up)
                if not inside(nxt) or nxt == x:
                    return x
                x = nxt
            else:
                x = step(x, not up)
        raise RuntimeError(f"no STE window for scale={scale}, qmin={qmin}, qmax={qmax}")  # pragma: no cover

    with np.errstate(over="ignore", invalid="ignore"):
        first = edge((qmin - 0.5) * float(s), lambda x: level(x) >= qmin, up=False)
        last = edge((qmax + 0.5) * float(s), lambda x: level(x) <= qmax, up=True)
    return float(step(first, False)), float(step(last, True))


@numba.njit(nogil=True, cache=True, inline="always")
def _fq_one(x: np.float32, inv: np.float32, s: np.float32, lo: np.float32,
            hi: np.float32) -> np.float32:  # pragma: no cover - compiled
    v = x * inv  # float32 * float32: fl32(x * inv)
    if v < lo:
        v = lo
    elif v > hi:
        v = hi
    return np.float32(np.rint(v)) * s + np.float32(0.0)  # round half to even; + 0 turns -0.0 into +0.0


@numba.njit(nogil=True, cache=True)
def _fq_loop(src: np.ndarray, dst: np.ndarray, inv: np.float32, s: np.float32, lo: np.float32,
             hi: np.float32) -> None:  # pragma: no cover - compiled
    # the four passes below as one: each element read and written once
    for i in range(src.size):
        dst[i] = _fq_one(src[i], inv, s, lo, hi)


@numba.njit(nogil=True, cache=True)
def _fq_loop_inplace(a: np.ndarray, inv: np.float32, s: np.float32, lo: np.float32,
                     hi: np.float32) -> None:  # pragma: no cover - compiled
    # one array: no aliasing for the compiler to rule out at run time, so the loop vectorises
    for i in range(a.size):
        a[i] = _fq_one(a[i], inv, s, lo, hi)


def _dense(x: Tensor) -> np.ndarray | None:
    """The elements of ``x`` as one flat float32 array over its storage, in memory order (a
    contiguous or channels_last tensor), or None for any other layout."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        return None
    return torch.as_strided(x.detach(), (x.numel(),), (1,)).numpy()  # the same memory, read or written


def _fq_values(x: Tensor, scale: float, inv_scale: float, qmin: int, qmax: int, inplace: bool = False) -> Tensor:
    # fl32(x * inv) -> clamp -> round half to even -> 0 + q * s. Clamping before rounding gives the
    # same integers (the bounds are integers); `0 + q*s` is one rounding of the exact product (what
    # the op computes in double and rounds once) and turns -0.0 into +0.0, as the op does.
    # inplace: the result is written into x itself (the same values; no new tensor).
    # A dense float32 tensor goes through one compiled loop (numba): one read and one write per
    # element instead of four of each, faster on one thread (docs/collection.md §5.1), bit for bit the same.
    src = _dense(x) if x.numel() >= _LOOP_MIN and torch.get_num_threads() == 1 else None
    if src is not None:
        f32 = np.float32
        if inplace:
            _fq_loop_inplace(src, f32(inv_scale), f32(scale), f32(qmin), f32(qmax))
            return x
        out = torch.empty_like(x)
        _fq_loop(src, _dense(out), f32(inv_scale), f32(scale), f32(qmin), f32(qmax))
        return out
    q = (x.mul_(inv_scale) if inplace else torch.mul(x, inv_scale)).clamp_(qmin, qmax).round_()
    return torch.add(_ZERO, q, alpha=scale, out=q)


_LOOP_MIN = 4096
"""Below this many elements the torch passes are as fast (the call overhead dominates)."""


_ZERO = torch.zeros((), dtype=torch.float32)


class _FakeQuantizeCPU(torch.autograd.Function):
    """Forward: :func:`_fq_values`; backward: the op's straight-through mask, applied as one
    vectorised ``hardtanh_backward`` pass over the saved input (``lo < x < hi``) instead of a
    saved bool mask (which the op converts to float and multiplies: two passes)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float, inv_scale: float, qmin: int, qmax: int,  # type: ignore[override]
                lo: float, hi: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.window = (lo, hi)
        return _fq_values(x, scale, inv_scale, qmin, qmax)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        lo, hi = ctx.window
        return torch.ops.aten.hardtanh_backward(grad, x, lo, hi), None, None, None, None, None, None


def fake_quantize_cpu(
    x: Tensor, scale: float, qmin: int, qmax: int, window: tuple[float, float] | None = None
) -> Tensor:
    """``torch.fake_quantize_per_tensor_affine(x, scale, 0, qmin, qmax)`` for float32 CPU tensors,
    vectorised: the same values and gradients (NaN inputs excepted: NaN out, not ``qmin * s``).

    ``scale`` must be a float32 value (``float(torch.tensor(s, dtype=torch.float32))``); its
    reciprocal is taken in float32, as the op does. ``window`` is :func:`ste_window`'s result
    (pass it when calling repeatedly; :class:`LinearQuantizer` caches it with the range).
    The input is saved for the backward pass (rather than a mask), so it must not be modified
    in place before ``backward`` (autograd raises if it is). Memory format is preserved.
    """
    lo, hi = window if window is not None else ste_window(scale, qmin, qmax)
    return fake_quantize_cpu_prepared(x, scale, float32_reciprocal(scale), qmin, qmax, lo, hi)


def float32_reciprocal(scale: float) -> float:
    """``1/s`` rounded to float32, the reciprocal PyTorch's op multiplies by."""
    return float(np.float32(1.0) / np.float32(scale))  # float32 division, as the op's `1.0f / sc`


def fake_quantize_cpu_prepared(
    x: Tensor, scale: float, inv_scale: float, qmin: int, qmax: int, lo: float, hi: float, overwrite: bool = False
) -> Tensor:
    """:func:`fake_quantize_cpu` with the reciprocal and the STE window ``(lo, hi)`` given, for
    callers that cache them per range; autograd is set up only when a gradient can flow.

    ``overwrite=True``: when autograd is off (evaluation, BN re-estimation), the result is
    written into ``x`` itself, for a caller that knows nothing else reads ``x``. On a CPU this
    pass is memory-bound and a fresh output tensor costs as much again (page faults on new
    memory for a large activation): in place saves that (docs/collection.md §5.1). With autograd on, ``x`` is
    left alone whatever ``overwrite`` says."""
    if torch.is_grad_enabled():
        if x.requires_grad:
            return _FakeQuantizeCPU.apply(x, scale, inv_scale, qmin, qmax, lo, hi)
        overwrite = False  # x may be saved for another op's backward
    return _fq_values(x, scale, inv_scale, qmin, qmax, inplace=overwrite)
