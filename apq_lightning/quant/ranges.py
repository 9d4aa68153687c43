"""Range calibration: choose the quantization range ``v`` of a tensor (docs/design.md §7.2).

KL method (TensorRT-style, as in APQ)
-------------------------------------
1. Histogram the magnitudes -- ``|x|`` for signed quantizers, ``x`` for unsigned ones -- into
   ``B`` (default 2048) equal bins ``(j w, (j+1) w]`` over ``(0, upper]``. Exact zeros are
   left out: zero is exactly representable, so it adds the same mass to both distributions
   below and cannot change which threshold wins, while a huge zero spike (post-ReLU) would
   otherwise smear into the first quantization cell and bias the search towards tiny ranges.
2. For each candidate clip threshold ``T = i * w`` (``i`` on a geometric grid of ~160 values
   from ``max(qmax + 1, 16)`` to ``B``, i.e. ~3.5 % relative resolution):

   * reference ``P``: bins ``0..i-1``, with all mass beyond ``T`` (the outliers that will be
     clipped) folded into bin ``i-1``;
   * quantized ``Q``: bins ``0..i-1`` *without* the outliers, grouped exactly as the quantizer
     rounds them -- bin ``j`` (centre ``(j + 0.5) w``) goes to level ``round((j + 0.5) w / s)``
     with ``s = T / qmax`` -- and each level's mass spread uniformly back over the bins of that
     level where ``P`` is non-zero ("expanded back");
   * ``KL(P || Q)`` with both normalised to sum 1; ``Q`` gets an epsilon of 1e-12.
3. Smoothing over candidates: ``T*`` minimises the KL *averaged over the 2 neighbouring
   candidates on each side* (a window of 5, about +-7 % in threshold; :data:`KL_SMOOTHING`).
   On histograms made of spikes -- saturated or constant image regions, the ReLU6 cap, the
   constant response of a channel to a uniform background -- the KL of a single candidate
   depends on how the spikes happen to fall onto quantization levels, and isolated deep dips
   of the raw curve picked ranges as small as the *median* of the data. Measured on the
   apq_cifar largest subnet: 8-bit PTQ fell from 97.8 % to 45.7 % top-1 (digits) and from
   52.6 % to 1.3 % (briefly trained on CIFAR-10) with the raw minimum; with the window,
   97.8 % / 50.8 %. ``kl_thresholds(..., smooth=0)`` is the raw procedure.
4. ``v = min(T*, observed max)``: never larger than the data.

Clipping is penalised because P's last bin carries the outliers while Q's does not; coarse
quantization is penalised because Q flattens the shape inside each level.

Speed: Q is constant inside a level, so ``KL(P||Q)`` reduces to per-level sums read off prefix
sums of the histogram -- O(levels) per candidate instead of O(bins) -- and all candidates are
one NumPy expression (level boundaries cached per ``(bins, qmax)``): ~0.5 ms per search at 8
bits, ~3 ms for 8-bit unsigned (256 levels). The tests check it against a direct
one-candidate-at-a-time transcription of the procedure.

Histograms over several batches (:class:`HistogramObserver`) are merged exactly: when a batch
exceeds the current range, the range grows by a power of two and adjacent bins are summed, so no
mass is ever interpolated. ``method="minmax"`` simply uses the largest magnitude.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .bits import CalibrationMethod, check_method, qrange

__all__ = [
    "HistogramObserver",
    "kl_threshold",
    "kl_thresholds",
    "magnitude_histogram",
    "tensor_range",
]

_EPS = 1e-12
# Largest (rows x candidates x levels) working set of one vectorised KL step (~32 MB in float64).
_MAX_WORK = 1 << 22
_PER_CHANNEL_BINS = 256
_PER_CHANNEL_CANDIDATES = 64
KL_SMOOTHING = 2
"""Half-width (in candidates) of the moving average over the KL curve (step 3 above)."""


def _xlogy(x: np.ndarray, y: np.ndarray | float) -> np.ndarray:
    """``x * log(y)`` with 0 where ``x == 0`` (NumPy lacks xlogy)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(np.where(x > 0, y, 1.0)), 0.0)


@lru_cache(maxsize=64)
def _kl_grid(bins: int, qmax: int, num_candidates: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate stop bins and the bin boundaries of every quantization level per candidate.

    Returns ``(cand (C,), bounds (C, L+1), last_level (C,))``: for candidate ``i = cand[c]``,
    the bins quantized to level ``k`` are ``bounds[c, k] <= j < bounds[c, k+1]``, where bin ``j``
    (centre ``(j + 0.5) * w``) goes to level ``round((j + 0.5) * qmax / i)`` -- exactly how the
    quantizer with ``s = T / qmax`` rounds it. ``last_level`` is the level of bin ``i - 1``.
    """
    lo = min(max(qmax + 1, 16), bins)
    grid = np.geomspace(lo, bins, num_candidates)
    cand = np.unique(np.clip(np.round(grid).astype(np.int64), lo, bins))
    L = qmax + 1
    j = np.arange(bins, dtype=np.int64)
    bounds = np.empty((cand.size, L + 1), dtype=np.int64)
    last_level = np.empty(cand.size, dtype=np.int64)
    for c, i in enumerate(cand):  # cached, so a small loop over candidates is fine
        # level(j) = floor((j + 0.5) * qmax / i + 0.5) in exact integer arithmetic (ties go up)
        level = np.minimum(((2 * j[:i] + 1) * qmax + i) // (2 * i), qmax)
        bounds[c] = np.searchsorted(level, np.arange(L + 1), side="left")
        last_level[c] = level[-1]
    for arr in (cand, bounds, last_level):
        arr.setflags(write=False)
    return cand, bounds, last_level


def kl_thresholds(hist: Tensor | np.ndarray, qmax: int, num_candidates: int = 160, smooth: int = 0) -> np.ndarray:
    """Best clip threshold, in bins, for each row of ``hist`` (``(N, B)`` magnitude counts).

    Returns an array ``(N,)`` of thresholds in units of bin width (multiply by ``upper / B``).
    Rows without mass return 0. Candidates beyond a row's last non-empty bin are skipped (they
    only add empty range), except the first one that covers all the data.

    Vectorised with prefix sums: because ``Q`` is constant inside a level, ``KL(P||Q)`` reduces
    to per-level sums, so one candidate costs O(levels), not O(bins), and all candidates of all
    rows are one array expression (chunked over rows to bound memory). NumPy rather than torch:
    the arrays are small, and torch's intra-op threads cost more than they save at this size.
    """
    h_all = hist.detach().cpu().double().numpy() if isinstance(hist, Tensor) else np.asarray(hist, np.float64)
    if h_all.ndim == 1:
        h_all = h_all[None]
    N, B = h_all.shape
    cand, bounds, last_level = _kl_grid(B, qmax, num_candidates)
    C, L = cand.size, qmax + 1
    out = np.zeros(N, dtype=np.float64)
    nonempty = h_all > 0
    has_mass = nonempty.any(1)
    need = B - np.argmax(nonempty[:, ::-1], axis=1)  # bins needed to hold all data
    first_cover = np.searchsorted(cand, need)  # first candidate covering all data
    valid = np.arange(C)[None, :] <= first_cover[:, None]  # (N, C)

    zero = np.zeros((N, 1))
    csum = np.concatenate([zero, h_all.cumsum(1)], 1)  # (N, B+1): mass in bins [0, j)
    cnz = np.concatenate([zero, nonempty.cumsum(1, dtype=np.float64)], 1)  # non-empty bins in [0, j)
    chlogh = np.concatenate([zero, _xlogy(h_all, h_all).cumsum(1)], 1)  # sum h log h over [0, j)
    c_idx = np.arange(C)
    rows = max(1, _MAX_WORK // (C * (L + 1)))
    for s in range(0, N, rows):
        e = min(N, s + rows)
        cs, cz = csum[s:e], cnz[s:e]
        total = cs[:, B : B + 1]  # (n, 1)
        kept = cs[:, cand]  # (n, C) mass inside [0, T)
        outl = total - kept  # clipped mass, folded into bin i-1 of P
        h_last = h_all[s:e, cand - 1]  # (n, C)
        mass = np.diff(cs[:, bounds], axis=2)  # (n, C, L) mass per level: Q before expansion
        cnt = np.diff(cz[:, bounds], axis=2)  # non-empty bins per level
        p_mass = mass.copy()  # P per level: Q's mass plus the outliers in the last level
        p_mass[:, c_idx, last_level] += outl
        cnt[:, c_idx, last_level] += (h_last == 0) & (outl > 0)  # the folded bin became non-empty
        # sum_j P_j log P_j: bins below i-1 unchanged, bin i-1 carries the outliers
        p_last = h_last + outl
        plogp = chlogh[s:e, cand - 1] + _xlogy(p_last, p_last)
        # sum_j P_j log Q_j, Q_j = level mass / non-empty bins of the level / kept (sums to 1)
        q_level = mass / np.maximum(cnt, 1.0) / np.maximum(kept, _EPS)[:, :, None]
        plogq = _xlogy(p_mass, q_level + _EPS).sum(2)
        tot = np.maximum(total, _EPS)
        kl = plogp / tot - np.log(tot) - plogq / tot
        kl = np.where(valid[s:e], kl, np.inf)
        if smooth > 0:
            kl = _window_mean(kl, smooth)
        out[s:e] = np.where(has_mass[s:e], cand[kl.argmin(1)], 0.0)
    return out


def _window_mean(kl: np.ndarray, w: int) -> np.ndarray:
    """Mean of the finite entries of each row within ``[c - w, c + w]``; inf stays inf."""
    n, C = kl.shape
    fin = np.isfinite(kl)
    zero = np.zeros((n, 1))
    cs = np.concatenate([zero, np.where(fin, kl, 0.0).cumsum(1)], 1)
    cn = np.concatenate([zero, fin.cumsum(1, dtype=np.float64)], 1)
    idx = np.arange(C)
    lo, hi = np.clip(idx - w, 0, C), np.clip(idx + w + 1, 0, C)
    mean = (cs[:, hi] - cs[:, lo]) / np.maximum(cn[:, hi] - cn[:, lo], 1.0)
    return np.where(fin, mean, np.inf)


def kl_threshold(
    hist: Tensor, upper: float, qmax: int, num_candidates: int = 160, smooth: int = KL_SMOOTHING
) -> float:
    """KL-optimal clip threshold of one magnitude histogram spanning ``(0, upper]``."""
    B = hist.shape[-1]
    return float(kl_thresholds(hist.reshape(1, B), qmax, num_candidates, smooth)[0]) * upper / B


def magnitude_histogram(x: Tensor, upper: Tensor, bins: int, signed: bool) -> Tensor:
    """Batched histogram of non-zero magnitudes: ``x`` is ``(N, M)``, ``upper`` is ``(N,)``.

    Used for per-channel weights (one row per channel); same bins as the observer's,
    ``(j w, (j+1) w]`` per row. Magnitude is ``|x|`` when signed, else the positive part of
    ``x`` (negative values quantize to 0 and, like zeros, are left out).
    """
    mag = x.abs() if signed else x.clamp_min(0.0)
    N = mag.shape[0]
    scale = bins / upper.to(mag.dtype).clamp_min(_EPS)[:, None]
    idx = torch.mul(mag, scale).ceil_().long().clamp_(0, bins)
    idx += torch.arange(N, device=x.device)[:, None] * (bins + 1)
    counts = torch.bincount(idx.reshape(-1), minlength=N * (bins + 1)).reshape(N, bins + 1)
    return counts[:, 1:].to(torch.float64)


def tensor_range(
    x: Tensor,
    bits: int,
    signed: bool,
    method: CalibrationMethod = "kl",
    bins: int = 2048,
    ch_axis: int | None = None,
) -> Tensor:
    """Range ``v`` of a whole tensor (weights): a scalar, or one per slice along ``ch_axis``.

    Per-channel KL uses at most 256 bins and 64 candidate thresholds: a channel rarely has more
    than a few thousand weights (a sparser histogram makes every threshold look alike), and a
    layer has hundreds of channels, each its own search.
    """
    check_method(method)
    _, qmax = qrange(bits, signed)
    x = x.detach().float()
    if ch_axis is None:
        rows = x.reshape(1, -1)
    else:
        rows = x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)
    vmax = rows.abs().amax(1) if signed else rows.amax(1).clamp_min(0.0)
    if method == "minmax":
        return vmax if ch_axis is not None else vmax[0]
    if ch_axis is None:
        bins_eff = bins
        up = float(vmax[0])
        if up <= 0:
            return vmax[0]
        mag = rows[0].abs() if signed else rows[0].clamp_min(0.0)
        hist = _fast_histogram(mag, bins_eff, up)[None]
    else:
        bins_eff = min(bins, _PER_CHANNEL_BINS)
        hist = magnitude_histogram(rows, vmax, bins_eff, signed)
    n_cand = 160 if ch_axis is None else _PER_CHANNEL_CANDIDATES
    t = torch.from_numpy(kl_thresholds(hist, qmax, n_cand, KL_SMOOTHING)).to(vmax.device) * vmax.double() / bins_eff
    v = torch.minimum(t.float(), vmax)
    return v if ch_axis is not None else v[0]


def _fast_histogram(mag: Tensor, bins: int, upper: float) -> Tensor:
    """Histogram (float64) of the non-zero values of a non-negative tensor: ``bins`` bins
    ``(j w, (j+1) w]`` with ``w = upper / bins``.

    ``ceil(mag / w)`` is 0 exactly for zeros, which are thereby dropped (they are exactly
    representable and left out of the KL search on purpose) -- one fused pass plus ``bincount``,
    several times faster than ``torch.histc`` on CPU.
    """
    return _ceil_bincount(torch.mul(mag, bins / upper), bins)


def _ceil_bincount(scaled: Tensor, bins: int) -> Tensor:
    """``_fast_histogram`` of values already multiplied by ``bins / upper`` (consumed in place).

    No clamp pass: values are at most ``upper``, so an index above ``bins`` can only come from
    float rounding at the very top, and such counts are folded into the last bin afterwards.
    The indices are int16 when that holds them (the float -> int pass is several times faster
    on CPU than to int32) and are written into a reused scratch buffer.
    """
    dtype = torch.int16 if bins < 32000 else torch.int32
    idx = _scratch(scaled.numel(), dtype, scaled.device, slot=1)
    idx.copy_(scaled.ceil_())
    counts = torch.bincount(idx, minlength=bins + 1)
    if counts.numel() > bins + 1:
        counts = torch.cat([counts[:bins], counts[bins:].sum(0, keepdim=True)])
    return counts[1:].to(torch.float64)


_SCRATCH: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def _scratch(n: int, dtype: torch.dtype, device: torch.device, slot: int = 0) -> Tensor:
    """A reused 1-d buffer of ``n`` elements. Calibration histograms every activation of every
    layer; a fresh multi-megabyte tensor per step costs page faults (the CPU allocator does
    not cache large blocks) comparable to the arithmetic itself. Not thread-safe, like the
    observers that use it; freed by :func:`release_scratch`."""
    key = (slot, dtype, device)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.empty(max(n, 1 << 16), dtype=dtype, device=device)
        _SCRATCH[key] = buf
    return buf[:n]


def release_scratch() -> None:
    """Free the calibration scratch buffers (called at the end of every calibration)."""
    _SCRATCH.clear()


def _flat_view(x: Tensor) -> Tensor:
    """All elements of ``x`` as a 1-d tensor, in memory order, without a copy when possible
    (a channels_last activation would otherwise be copied by ``reshape``: the order of the
    elements does not matter to a histogram)."""
    if x.is_contiguous():
        return x.view(-1)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)  # a view
    return x.reshape(-1)


class HistogramObserver:
    """Accumulates a magnitude histogram of everything a quantizer sees during calibration.

    ``signed=None`` decides the signedness from the data (unsigned iff no value was negative).
    The histogram covers ``(0, upper]`` with ``bins`` equal bins; when a batch exceeds ``upper``
    the range is multiplied by the smallest power of two that covers it and groups of adjacent
    bins are summed, an exact re-binning. Plain Python object (not a module): it is calibration
    scratch, never part of a checkpoint.

    Every element is histogrammed (one fused pass + ``bincount``, ~2-3 ns per element on one CPU
    core, far below the convolution that produced it). Random subsampling was tried and
    rejected: the KL optimum is decided by the sparse tail, and sampling noise there moved the
    chosen range by up to ~17 % between runs.
    """

    def __init__(self, bins: int = 2048, signed: bool | None = None) -> None:
        self.bins = bins
        self.signed = signed
        self.hist: Tensor | None = None
        self.upper = 0.0
        self.min_val = math.inf
        self.max_val = -math.inf
        self.count = 0  # elements seen (zeros included)

    @property
    def max_abs(self) -> float:
        return max(abs(self.min_val), abs(self.max_val)) if self.count else 0.0

    def _grow(self, m: float) -> None:
        assert self.hist is not None
        if m <= self.upper:
            return
        if self.upper <= 0.0 or not bool(self.hist.any()):
            self.upper = m
            return
        factor = 2 ** max(1, math.ceil(math.log2(m / self.upper)))
        while self.upper * factor < m:
            factor *= 2
        B = self.bins
        new = torch.zeros_like(self.hist)
        if factor >= B:
            new[0] = self.hist.sum()
        else:
            n_new = -(-B // factor)
            padded = torch.cat([self.hist, self.hist.new_zeros(n_new * factor - B)])
            new[:n_new] = padded.reshape(n_new, factor).sum(1)
        self.hist = new
        self.upper *= factor

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        if not x.is_floating_point() or x.dtype == torch.float64:
            x = x.float()
        flat = _flat_view(x)
        mn_t, mx_t = torch.aminmax(flat)  # on the 1-d view: a channels_last reduction is slower
        mn, mx = float(mn_t), float(mx_t)
        if not (math.isfinite(mn) and math.isfinite(mx)):
            raise ValueError("calibration saw a non-finite activation (inf/nan); check the model and data")
        self.count += x.numel()
        self.min_val, self.max_val = min(self.min_val, mn), max(self.max_val, mx)
        if self.hist is None:
            self.hist = torch.zeros(self.bins, dtype=torch.float64, device=x.device)
        # unsigned: negatives quantize to 0 and are histogrammed like zeros (left out)
        m = max(mx, 0.0) if self.signed is False else max(mx, -mn)
        self._grow(m)
        if self.upper <= 0.0:
            return  # only zeros so far: nothing to histogram (zeros are left out on purpose)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # bin indices up to 2048 need float32 precision
        # one new tensor, then in place: x * (bins / upper) -> |.| or max(., 0) -> ceil -> index
        scaled = torch.mul(flat, self.bins / self.upper, out=_scratch(flat.numel(), flat.dtype, flat.device))
        if mn < 0:  # |x| for signed / undecided; unsigned: negatives quantize to 0, like zeros
            scaled = scaled.abs_() if self.signed is not False else scaled.clamp_min_(0.0)
        self.hist += _ceil_bincount(scaled, self.bins)

    def resolved_signed(self) -> bool:
        return self.signed if self.signed is not None else self.min_val < 0

    def compute_range(self, bits: int, method: CalibrationMethod = "kl") -> tuple[float, bool]:
        """``(v, signed)`` for a ``bits``-bit quantizer from what has been observed."""
        check_method(method)
        if self.count == 0 or self.hist is None:
            raise ValueError("no data observed; cannot compute a range")
        signed = self.resolved_signed()
        vmax = self.max_abs if signed else max(self.max_val, 0.0)
        if method == "minmax" or vmax <= 0.0:
            return vmax, signed
        _, qmax = qrange(bits, signed)
        return min(kl_threshold(self.hist, self.upper, qmax), vmax), signed
