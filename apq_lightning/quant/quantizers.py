"""Linear fake quantizers (docs/design.md §7.1).

The quantizer formula
---------------------
A tensor ``x`` is fake-quantized with range ``v > 0`` and bit width ``b`` as::

    qmax  = 2**(b-1) - 1   (signed:   levels -qmax .. qmax, symmetric, -2**(b-1) unused)
    qmax  = 2**b - 1       (unsigned: levels 0 .. qmax)
    qmin  = -qmax          (signed)   or 0 (unsigned)
    s     = v / qmax       (scale; zero point is always 0)
    x_q   = clamp(round(x / s), qmin, qmax) * s

``round`` is round-half-to-even (``torch.round`` / ``nearbyint``). Signed quantizers represent
``[-v, v]``, unsigned ones ``[0, v]`` (negative inputs collapse to 0).  Zero is always exactly
representable, which matters for post-ReLU activations and for padding.

The reference is PyTorch's own ``torch.fake_quantize_per_tensor_affine`` /
``torch.fake_quantize_per_channel_affine``: fused, on every device and dtype, with the
straight-through estimator with clipping as backward -- gradient 1 where ``round(x * (1/s))``
lies inside ``[qmin, qmax]`` and 0 outside. (PyTorch computes ``x * (1/s)`` rather than
``x / s``; the two differ only on exact ties.)

One exception, for speed: per-tensor float32 tensors on the CPU go through the vectorised
kernel of :mod:`~apq_lightning.quant.cpu_kernel` (the op's values and gradients, ~1.1x a float
step instead of ~1.5x); ``LinearQuantizer.fast_cpu = False`` uses PyTorch's op everywhere.

The range ``v`` is a buffer, not a parameter: APQ chooses it once by KL calibration
(:mod:`apq_lightning.quant.ranges`) and keeps it fixed during QAT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .bits import SUPPORTED_BITS, CalibrationMethod, QuantSpec, check_method, qrange, validate_bits
from .cpu_kernel import fake_quantize_cpu_prepared, float32_reciprocal, ste_window
from .ranges import HistogramObserver, tensor_range

__all__ = [
    "SUPPORTED_BITS",
    "CalibrationMethod",
    "QuantSpec",
    "LinearQuantizer",
    "qrange",
    "check_method",
    "validate_bits",
]

# Smallest range used to build a scale: an all-zero tensor (a dead channel) must not produce a
# zero scale, which the fake-quant kernels reject (and 1/s would overflow).
_MIN_RANGE = 1e-8


def tensor_amax(x: Tensor, signed: bool, ch_axis: int | None = None) -> Tensor:
    """The range ``v`` that covers ``x`` exactly: ``max |x|`` (signed) or ``max(x, 0)``
    (unsigned), per tensor or per slice along ``ch_axis``; detached, float32."""
    x = x.detach()
    if ch_axis is not None:
        x = x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)
        return (x.abs().amax(1) if signed else x.amax(1).clamp_min(0.0)).float()
    return (x.abs().amax() if signed else x.amax().clamp_min(0.0)).float()


def fake_quantize_range(x: Tensor, v: Tensor, bits: int, signed: bool, ch_axis: int | None = None,
                        covers: bool = False, overwrite: bool = False) -> Tensor:
    """Fake-quantize with a range that changes from call to call (batch or tensor ranges).

    Unlike :class:`LinearQuantizer`'s calibrated path, nothing is cached per range and, off the
    CPU, the scale stays a device tensor (no host sync per quantizer per step). ``covers=True``
    says ``v`` covers every value of ``x`` (``v`` was measured on ``x``): nothing is clipped, so
    the straight-through gradient passes everywhere and no STE window is computed.
    ``overwrite``: see :func:`~apq_lightning.quant.cpu_kernel.fake_quantize_cpu_prepared`.
    """
    qmin, qmax = qrange(bits, signed)
    scale = v.float().clamp_min(_MIN_RANGE) / qmax
    if ch_axis is None and x.device.type == "cpu" and x.dtype == torch.float32 and LinearQuantizer.fast_cpu:
        s = float(scale)
        # the straight-through window matters only to a gradient (none in evaluation: skip its search)
        grad = torch.is_grad_enabled() and x.requires_grad
        window = (-math.inf, math.inf) if covers or not grad else ste_window(s, qmin, qmax)
        return fake_quantize_cpu_prepared(x, s, float32_reciprocal(s), qmin, qmax, *window, overwrite=overwrite)
    if ch_axis is not None:
        zp = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
        return torch.fake_quantize_per_channel_affine(x, scale, zp, ch_axis, qmin, qmax)
    zp = torch.zeros((1,), dtype=torch.int32, device=scale.device)
    return torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), zp, qmin, qmax)


RangeSource = Literal["calibrated", "batch", "running", "tensor"]
RANGE_SOURCES: tuple[str, ...] = ("calibrated", "batch", "running", "tensor")


class LinearQuantizer(nn.Module):
    """Fake quantizer with a fixed range ``v`` (see the module docstring for the formula).

    Modes, checked in this order by :meth:`forward`:

    * ``observing`` -- the input passes through unchanged and is recorded by :attr:`observer`
      (a :class:`~apq_lightning.quant.ranges.HistogramObserver`) for range calibration;
    * disabled (``enabled=False``), float (``bits is None``) or not yet calibrated -- identity;
    * otherwise fake-quantized with the stored range.

    An uncalibrated quantizer is an identity on purpose: a freshly quantized model still runs
    (e.g. for counting BitOps) and :func:`~apq_lightning.quant.quant_summary` shows the state.

    State dict: ``v`` and ``calibrated`` are buffers; ``bits``, ``signed``, ``per_channel`` and
    ``ch_axis`` travel as extra state, so a checkpoint restores exactly the quantizer that
    produced it (whatever policy the receiving model was built with).
    """

    v: Tensor
    calibrated: Tensor

    fast_cpu: ClassVar[bool] = True
    """Per-tensor float32 CPU inputs use :func:`~apq_lightning.quant.cpu_kernel.fake_quantize_cpu`
    (same values and gradients as PyTorch's op; a QAT step ~1.1x a float step instead of ~1.5x);
    ``False`` (on the class or on one instance) uses ``torch.fake_quantize_per_tensor_affine``
    everywhere."""

    overwrite_input: bool = False
    """Set (per instance) by an owner whose input is read by nothing else -- e.g. a ReLU6 output
    inside an elastic block (:attr:`~apq_lightning.layout.LayerSpec.input_private`): without
    autograd, the CPU fast path then quantizes that input in place (no new tensor; the same
    values). Never saved: the owner decides when it builds the quantizer."""

    def __init__(
        self,
        bits: int | None = 8,
        signed: bool | None = True,
        per_channel: bool = False,
        ch_axis: int = 0,
        *,
        method: CalibrationMethod = "kl",
        bins: int = 2048,
        allowed_bits: Sequence[int] = SUPPORTED_BITS,
        num_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.allowed_bits = tuple(allowed_bits)
        self.bits = validate_bits(bits, self.allowed_bits)
        self.signed = signed
        self.per_channel = per_channel
        self.ch_axis = ch_axis
        self.method = check_method(method)
        self.bins = bins
        self.enabled = True
        self.observing = False
        self.observer: HistogramObserver | None = None
        if bins < 16:
            raise ValueError(f"bins = {bins} is too small for a KL search (need >= 16)")
        self._v_shape = (num_channels,) if (per_channel and num_channels) else ()
        self.register_buffer("v", torch.zeros(self._v_shape))
        self.register_buffer("calibrated", torch.tensor(False))
        # Python mirror of the `calibrated` buffer: forward() must not read a device tensor
        # (a GPU sync per quantizer per step, and a graph break under torch.compile).
        self.is_calibrated = False
        # Quantization parameters derived from (v, bits, signed), rebuilt when one of them
        # changes (see _qparams); never saved.
        self._qcache: tuple[Any, ...] | None = None
        # Where the range comes from (see set_range_source): a calibrated, fixed ``v`` (APQ's
        # way), or the tensor itself (quantized-for-all training, where bits and architecture
        # change every step and weights move under a fixed range).
        self.range_source: RangeSource = "calibrated"
        self.range_momentum: float | None = 0.1
        self._range_updates = 0

    def reset(self) -> LinearQuantizer:
        """Forget the range (uncalibrated, ``v = 0``) and any observed histogram."""
        with torch.no_grad():
            if self.v.shape != self._v_shape:
                self.v = torch.zeros(self._v_shape, device=self.v.device)
            self.v.zero_()
        self._set_calibrated(False)
        self.observer = None
        self.observing = False
        self._range_updates = 0
        return self

    def set_range_source(self, source: RangeSource, momentum: float | None = 0.1) -> LinearQuantizer:
        """Where ``v`` comes from.

        * ``calibrated`` -- set by calibration (KL / min-max) and kept fixed (the default);
        * ``tensor`` -- ``v`` covers the tensor at every call (weights under training: the range
          follows the weights, whatever subnet and bits are active);
        * ``batch`` -- in training mode the batch's own range quantizes the batch (stable when the
          policy changes every step) and updates a running ``v`` with ``momentum`` (``None``: a
          cumulative average, for re-estimation on fixed images, as BatchNorm does); in eval mode
          the running ``v`` is used;
        * ``running`` -- as ``batch``, but in training mode too the running ``v`` (shared by every
          subnet and policy trained, like OQAT's shared ranges, though averaged rather than
          learned) quantizes the batch, clipping what lies beyond it.
        """
        if source not in RANGE_SOURCES:
            raise ValueError(f"range source {source!r} unknown; allowed: {list(RANGE_SOURCES)}")
        if momentum is not None and not 0.0 < momentum <= 1.0:
            raise ValueError(f"range momentum must be in (0, 1] or None (cumulative), got {momentum!r}")
        self.range_source, self.range_momentum = source, momentum
        return self

    def _track(self, x: Tensor) -> Tensor:
        """The range of ``x`` (this call's), folded into the running ``v``."""
        if self.signed is None:  # decided once, from the first batch (one host sync)
            self.signed = bool((x.detach() < 0).any())
        vb = tensor_amax(x, self.signed is not False, self.ch_axis if self.per_channel else None)
        with torch.no_grad():
            if self.v.shape != vb.shape or self._range_updates == 0:
                self.v = vb.clone().to(self.v.dtype) if self.v.shape != vb.shape else self.v.copy_(vb)
            elif self.range_momentum is None:
                self.v.add_((vb - self.v) / (self._range_updates + 1))
            else:
                self.v.lerp_(vb, self.range_momentum)
        self._range_updates += 1
        if not self.is_calibrated:
            self._set_calibrated(True)
        return vb

    def _forward_tracked(self, x: Tensor) -> Tensor:
        if not self.enabled or self.bits is None:
            return x
        signed_axis = self.ch_axis if self.per_channel else None
        if self.range_source == "tensor" or (self.training and self.range_source == "batch"):
            v = self._track(x)
            return fake_quantize_range(x, v, self.bits, self.signed is not False, signed_axis, covers=True,
                                       overwrite=self.overwrite_input)
        if self.training:  # running: the batch moves the shared range, which quantizes it
            self._track(x)
        if not self.is_calibrated:
            raise RuntimeError("a batch-range quantizer has no running range yet: run training batches, or "
                               "re-estimate the ranges on a few batches (reestimate_supernet) before evaluating")
        if not self.training and not self.per_channel and not torch.compiler.is_compiling():
            # evaluation: the running range is fixed from batch to batch, so its scale, reciprocal
            # and STE window are cached as a calibrated range's are (a dozen small ops less per call)
            _, qmin, qmax, _, _, cpu = self._qparams()
            if self._cpu_path_applies(x, cpu):
                return self._fake_quantize_cached(x, cpu, qmin, qmax)
        return fake_quantize_range(x, self.v, self.bits, self.signed is not False, signed_axis,
                                   overwrite=self.overwrite_input)

    # ------------------------------------------------------------------ construction / config
    @classmethod
    def from_spec(cls, spec: QuantSpec, **kwargs: Any) -> LinearQuantizer:
        return cls(spec.bits, spec.signed, spec.per_channel, spec.ch_axis, method=spec.method, bins=spec.bins, **kwargs)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.signed, self.per_channel, self.ch_axis, self.method, self.bins)

    @property
    def is_quantizing(self) -> bool:
        """True when :meth:`forward` actually fake-quantizes."""
        return (not self.observing) and self.enabled and self.bits is not None and self.is_calibrated

    def _set_calibrated(self, flag: bool) -> None:
        with torch.no_grad():
            self.calibrated.fill_(flag)
        self.is_calibrated = flag

    def qrange(self) -> tuple[int, int]:
        """``(qmin, qmax)``; an undecided signedness counts as signed."""
        if self.bits is None:
            raise ValueError("a float quantizer (bits=None) has no integer range")
        return qrange(self.bits, self.signed is not False)

    def scale(self) -> Tensor:
        """``s = v / qmax`` as float32 (the dtype the fake-quant kernels want)."""
        _, qmax = self.qrange()
        return self.v.float().clamp_min(_MIN_RANGE) / qmax

    def _qparams(self) -> tuple[Any, ...]:
        """``(key, qmin, qmax, scale, zero_point, cpu)`` for :meth:`forward`, cached.

        ``cpu`` is ``(s, 1/s, lo, hi)`` -- the float32 scale and its float32 reciprocal as Python
        floats, and the STE window of :func:`~apq_lightning.quant.cpu_kernel.ste_window` -- for a
        per-tensor quantizer whose range lives on the CPU, else None.
        The key is the ``v`` tensor object itself, its version counter (bumped by every in-place
        write: ``set_range``, ``reset``, ``load_state_dict``, ``v.fill_(...)``), the bits and the
        signedness; replacing ``v`` (``.to(device)``, a new shape) changes the object. Reading a
        float from ``v`` happens here only, once per range, not once per step.
        """
        v = self.v
        key = (v, v._version, self.bits, self.signed)
        c = self._qcache
        if c is not None and c[0][0] is v and c[0][1:] == key[1:]:
            return c
        qmin, qmax = self.qrange()
        with torch.no_grad():
            scale = self.scale().reshape(-1 if self.per_channel else 1)
        zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
        cpu = None
        if not self.per_channel and scale.device.type == "cpu":
            s = float(scale)
            cpu = (s, float32_reciprocal(s), *ste_window(s, qmin, qmax))
        self._qcache = (key, qmin, qmax, scale, zero_point, cpu)
        return self._qcache

    def set_bits(self, bits: int | None) -> None:
        """Change the bit width. The range depends on the bits under KL, so it is re-derived
        from the retained calibration histogram when there is one and invalidated otherwise
        (weight quantizers are re-derived by their layer, which owns the weight)."""
        bits = validate_bits(bits, self.allowed_bits)
        if bits == self.bits:
            return
        self.bits = bits
        if bits is None:
            return
        if self.observer is not None and self.observer.count > 0 and not self.observing:
            self.set_range(*self.observer.compute_range(bits, self.method))
        else:
            self._set_calibrated(False)

    def set_range(self, v: Tensor | float, signed: bool | None = None) -> None:
        """Store the range ``v`` (scalar, or one per channel) and mark the quantizer calibrated."""
        v_t = torch.as_tensor(v, dtype=torch.float32).detach().to(self.v.device)
        if not self.per_channel and v_t.numel() != 1:
            raise ValueError(f"per-tensor quantizer got {v_t.numel()} ranges")
        v_t = v_t.reshape(()) if not self.per_channel else v_t.reshape(-1)
        if v_t.shape == self.v.shape:
            self.v.copy_(v_t)
        else:
            self.v = v_t.clone()
        if signed is not None:
            self.signed = signed
        self._set_calibrated(True)

    # ------------------------------------------------------------------ observing
    def start_observing(self) -> None:
        """Reset and attach a histogram observer; forward passes now record instead of quantize."""
        if self.per_channel:
            raise ValueError(
                "per_channel=True is for weight quantizers only; activation ranges are observed per tensor"
            )
        self.observer = HistogramObserver(bins=self.bins, signed=self.signed)
        self.observing = True

    def stop_observing(self, method: CalibrationMethod | None = None) -> bool:
        """Leave observe mode and set the range from what was seen.

        Returns False (and leaves the quantizer uncalibrated) when nothing was observed, e.g. a
        layer of a skipped block. The histogram is kept so :meth:`set_bits` can re-derive ``v``.
        """
        self.observing = False
        if method is not None:
            self.method = check_method(method)
        if self.observer is None or self.observer.count == 0:
            return False
        if self.bits is not None:  # a float quantizer keeps its histogram for a later set_bits()
            v, signed = self.observer.compute_range(self.bits, self.method)
            self.set_range(v, signed)
        return True

    def calibrate_from_tensor(self, x: Tensor, method: CalibrationMethod | None = None) -> None:
        """Set ``v`` directly from a tensor (weights: no data needed)."""
        if method is not None:
            self.method = check_method(method)
        if self.bits is None:
            return
        method = self.method
        signed = self.signed if self.signed is not None else bool((x < 0).any())
        v = tensor_range(
            x.detach(), self.bits, signed, method=method, bins=self.bins,
            ch_axis=self.ch_axis if self.per_channel else None,
        )
        self.set_range(v, signed)

    # ------------------------------------------------------------------ forward
    def _cpu_path_applies(self, x: Tensor, cpu: tuple[float, float, float, float] | None) -> bool:
        """Whether the cached range's CPU fast path takes ``x`` (per tensor, float32, on the CPU)."""
        return cpu is not None and self.fast_cpu and x.dtype == torch.float32 and x.device.type == "cpu"

    def _fake_quantize_cached(self, x: Tensor, cpu: tuple[float, float, float, float], qmin: int, qmax: int) -> Tensor:
        """The CPU fast path with the cached scale, reciprocal and STE window of :meth:`_qparams`
        (used by the calibrated path and by a running range in evaluation)."""
        return fake_quantize_cpu_prepared(x, cpu[0], cpu[1], qmin, qmax, cpu[2], cpu[3], overwrite=self.overwrite_input)

    def forward(self, x: Tensor) -> Tensor:
        if self.range_source != "calibrated" and not self.observing:
            return self._forward_tracked(x)
        if self.observing:
            if self.observer is not None:
                self.observer.update(x)
            return x
        if not self.is_quantizing:
            return x
        if torch.compiler.is_compiling():  # traceable: no cache, no Python floats read from v
            qmin, qmax = self.qrange()
            scale = self.scale().reshape(-1 if self.per_channel else 1)
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        else:
            _, qmin, qmax, scale, zero_point, cpu = self._qparams()
            if self._cpu_path_applies(x, cpu):
                return self._fake_quantize_cached(x, cpu, qmin, qmax)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, scale, zero_point, self.ch_axis, qmin, qmax)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {"bits": self.bits, "signed": self.signed, "per_channel": self.per_channel, "ch_axis": self.ch_axis}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.bits = validate_bits(state.get("bits", self.bits), self.allowed_bits)
        self.signed = state.get("signed", self.signed)
        self.per_channel = bool(state.get("per_channel", self.per_channel))
        self.ch_axis = int(state.get("ch_axis", self.ch_axis))
        self.observer = None  # a histogram of other data/bits would mislead set_bits()

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Per-channel ranges are shaped lazily (number of channels unknown until calibration):
        # adopt the checkpoint's shape instead of failing on a size mismatch.
        key = prefix + "v"
        if key in state_dict and state_dict[key].shape != self.v.shape:
            self.v = torch.zeros_like(state_dict[key], device=self.v.device, dtype=self.v.dtype)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self.is_calibrated = bool(self.calibrated)

    def range_str(self) -> str:
        """Range for tables: ``0.8123``, ``[0.1..0.9]`` (per channel), ``uncalibrated`` or ``float``."""
        if self.bits is None:
            return "float"
        if not self.is_calibrated:
            return "uncalibrated"
        if self.v.numel() == 1:
            return f"{float(self.v):.4g}"
        return f"[{float(self.v.min()):.3g}..{float(self.v.max()):.3g}]"

    def extra_repr(self) -> str:
        sign = {True: "signed", False: "unsigned", None: "auto-signed"}[self.signed]
        parts = [f"bits={self.bits}", sign, self.method]
        if self.per_channel:
            parts.append(f"per_channel(axis={self.ch_axis})")
        parts.append(f"range={self.range_str()}")
        if not self.enabled:
            parts.append("disabled")
        if self.observing:
            parts.append("observing")
        return ", ".join(parts)
