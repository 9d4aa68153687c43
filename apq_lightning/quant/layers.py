"""Quantized Conv2d / Linear, swapping them into any model, and a summary table.

Everything here works on an arbitrary ``nn.Module``: layers are addressed by their qualified
module name (``model.named_modules()``), so a bit policy of any origin (APQ's per-block
``pw_w/pw_a/dw_w/dw_a``, a config file, a search result) plugs in as a ``{name: bits}`` mapping.

Choosing the ranges (:func:`~apq_lightning.quant.calibrate`) is
:mod:`~apq_lightning.quant.calibration`'s; a swapped layer stays an identity until then.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bits import SUPPORTED_BITS, CalibrationMethod, check_method, validate_bits
from .quantizers import LinearQuantizer

__all__ = [
    "LayerBits",
    "QuantLayerMixin",
    "QuantConv2d",
    "QuantLinear",
    "quantize_modules",
    "quantizable_layers",
    "quant_summary",
]

LayerBits = tuple[int | None, int | None] | tuple[int | None, int | None, bool | None]
"""``(w_bits, a_bits)`` or ``(w_bits, a_bits, a_signed)``; ``None`` bits = float, ``None``
signedness = decided at calibration (unsigned iff the layer's input was never negative)."""

_FLOAT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


class QuantLayerMixin:
    """Shared part of :class:`QuantConv2d` and :class:`QuantLinear`.

    The layer owns two :class:`LinearQuantizer` submodules: ``weight_quantizer`` (symmetric,
    optionally per output channel) and ``input_quantizer`` (per tensor, signed, unsigned or
    auto). ``w_bits`` / ``a_bits`` / ``a_signed`` read through to them, so there is a single
    source of truth, and :func:`~apq_lightning.quant.counting.count_bitops` reads them too.
    """

    weight: nn.Parameter
    weight_quantizer: LinearQuantizer
    input_quantizer: LinearQuantizer

    def _init_quant(
        self,
        w_bits: int | None,
        a_bits: int | None,
        a_signed: bool | None,
        per_channel: bool,
        method: CalibrationMethod,
        allowed_bits: Sequence[int],
        num_channels: int,
    ) -> None:
        device = self.weight.device if self.weight.device.type != "meta" else None
        self.weight_quantizer = LinearQuantizer(
            w_bits, True, per_channel, 0, method=method, allowed_bits=allowed_bits, num_channels=num_channels
        ).to(device)
        self.input_quantizer = LinearQuantizer(a_bits, a_signed, method=method, allowed_bits=allowed_bits).to(device)

    def _adopt(self, float_module: nn.Module) -> Any:
        """Take over ``float_module``'s Parameter objects (built on "meta", so nothing is copied)
        and materialise the quantizers on its device."""
        self.weight, self.bias = float_module.weight, float_module.bias
        for q in (self.weight_quantizer, self.input_quantizer):
            q.to_empty(device=float_module.weight.device).reset()
        self.train(float_module.training)
        return self

    @property
    def w_bits(self) -> int | None:
        return self.weight_quantizer.bits

    @property
    def a_bits(self) -> int | None:
        return self.input_quantizer.bits

    @property
    def a_signed(self) -> bool | None:
        return self.input_quantizer.signed

    @property
    def is_float(self) -> bool:
        return self.w_bits is None and self.a_bits is None

    def set_bits(self, w_bits: int | None, a_bits: int | None, a_signed: bool | None = None) -> None:
        """Change the bit widths without new calibration data.

        The weight range is re-derived from the current weight; the activation range from the
        histogram kept by the last :func:`~apq_lightning.quant.calibrate` (uncalibrated if there is none). This is
        what makes "one architecture x many bit policies" cheap during MP sample collection.
        ``a_signed=None`` keeps the current signedness (auto, or what calibration decided); an
        explicit bool that differs from it invalidates the activation range.
        """
        iq = self.input_quantizer
        if a_signed is not None and a_signed != iq.signed:
            iq.reset()
            iq.signed = a_signed
        had_range = self.weight_quantizer.is_calibrated or iq.is_calibrated or iq.observer is not None
        self.weight_quantizer.set_bits(w_bits)
        iq.set_bits(a_bits)
        if w_bits is not None and had_range and not self.weight_quantizer.is_calibrated:
            self.calibrate_weight()

    def calibrate_weight(self, method: CalibrationMethod | None = None) -> None:
        """Set the weight range from the current weight tensor (KL or min-max)."""
        with torch.no_grad():
            self.weight_quantizer.calibrate_from_tensor(self.weight, method)

    def _quant_repr(self) -> str:
        sign = {True: "signed", False: "unsigned", None: "auto"}[self.a_signed]
        return f"w_bits={self.w_bits}, a_bits={self.a_bits}, a_signed={sign}"


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` that fake-quantizes its input activation and its weight."""

    def __init__(
        self,
        *args: Any,
        w_bits: int | None = 8,
        a_bits: int | None = 8,
        a_signed: bool | None = None,
        per_channel: bool = False,
        method: CalibrationMethod = "kl",
        allowed_bits: Sequence[int] = SUPPORTED_BITS,
        **kwargs: Any,
    ) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_quant(w_bits, a_bits, a_signed, per_channel, method, allowed_bits, self.out_channels)

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, w_bits: int | None = 8, a_bits: int | None = 8, a_signed: bool | None = None,
        **kwargs: Any,
    ) -> QuantConv2d:
        """Quantized twin of ``conv`` holding the *same* Parameter objects (no copy: device,
        dtype, optimizer references and any other owner of the weights stay in sync)."""
        with torch.device("meta"):  # skip allocating + initialising weights that are replaced
            q = cls(
                conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                padding_mode=conv.padding_mode, w_bits=w_bits, a_bits=a_bits, a_signed=a_signed, **kwargs,
            )
        return q._adopt(conv)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_repr()}"


class QuantLinear(QuantLayerMixin, nn.Linear):
    """``nn.Linear`` that fake-quantizes its input activation and its weight."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        w_bits: int | None = 8,
        a_bits: int | None = 8,
        a_signed: bool | None = None,
        per_channel: bool = False,
        method: CalibrationMethod = "kl",
        allowed_bits: Sequence[int] = SUPPORTED_BITS,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._init_quant(w_bits, a_bits, a_signed, per_channel, method, allowed_bits, self.out_features)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, w_bits: int | None = 8, a_bits: int | None = 8, a_signed: bool | None = None,
        **kwargs: Any,
    ) -> QuantLinear:
        """Quantized twin of ``linear`` holding the same Parameter objects (see QuantConv2d)."""
        with torch.device("meta"):
            q = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    w_bits=w_bits, a_bits=a_bits, a_signed=a_signed, **kwargs)
        return q._adopt(linear)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_repr()}"


# ---------------------------------------------------------------------------- model-level API
def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified names of the Conv2d / Linear layers (float or quantized) of ``model``."""
    return {n: m for n, m in model.named_modules() if type(m) in _FLOAT_TYPES or isinstance(m, QuantLayerMixin)}


def _normalise_bits(name: str, bits: Any, allowed: Sequence[int]) -> tuple[int | None, int | None, bool | None]:
    if not isinstance(bits, (tuple, list)) or len(bits) not in (2, 3):
        raise ValueError(f"layer {name!r}: bits must be (w_bits, a_bits) or (w_bits, a_bits, a_signed), got {bits!r}")
    w = validate_bits(bits[0], allowed, what=f"layer {name!r} w_bits")
    a = validate_bits(bits[1], allowed, what=f"layer {name!r} a_bits")
    signed = bits[2] if len(bits) == 3 else None
    if signed is not None and not isinstance(signed, bool):
        raise ValueError(f"layer {name!r}: a_signed must be True, False or None (auto), got {signed!r}")
    return w, a, signed


def quantize_modules(
    model: nn.Module,
    layer_bits: Mapping[str, LayerBits] | None = None,
    default: LayerBits = (8, 8),
    method: CalibrationMethod = "kl",
    per_channel: bool = False,
    allowed_bits: Sequence[int] = SUPPORTED_BITS,
    inplace: bool = True,
) -> nn.Module:
    """Swap every ``nn.Conv2d`` / ``nn.Linear`` of ``model`` for its quantized twin.

    Args:
        layer_bits: ``{qualified_name: (w_bits, a_bits[, a_signed])}``; layers not named get
            ``default``. ``None`` bits keep that tensor float; ``(None, None)`` still swaps the
            layer (an identity quantizer) so summaries and BitOps count it as 32-bit float.
        method: default range calibration method stored in each quantizer (``"kl"``/``"minmax"``).
        per_channel: per-output-channel weight ranges.
        allowed_bits: the configured bit set; anything else raises ValueError naming the layer.
        inplace: modify ``model`` (default; the new layers share the model's Parameter objects)
            or work on a deep copy.

    Only exact ``nn.Conv2d`` / ``nn.Linear`` are swapped: a subclass has its own forward (e.g. a
    supernet's dynamic conv slicing its weight) that a swap would silently drop; such layers are
    skipped with a warning. Layers that are already quantized get their bits re-configured in
    place (:meth:`QuantLayerMixin.set_bits`; ``per_channel`` / ``method`` apply to new swaps
    only). Returns the model (a new object only for ``inplace=False`` or when ``model`` itself
    is a bare Conv2d / Linear); call :func:`~apq_lightning.quant.calibrate` next.
    """
    check_method(method)
    allowed = tuple(allowed_bits)
    layer_bits = dict(layer_bits or {})
    default_n = _normalise_bits("<default>", default, allowed)
    plan = {name: _normalise_bits(name, bits, allowed) for name, bits in layer_bits.items()}

    if not inplace:
        model = copy.deepcopy(model)
    layers = quantizable_layers(model)
    unknown = sorted(set(plan) - set(layers))
    if unknown:
        raise ValueError(
            f"layer_bits names {len(unknown)} layer(s) that are not nn.Conv2d / nn.Linear modules of the model: "
            f"{', '.join(map(repr, unknown[:10]))}{' ...' if len(unknown) > 10 else ''}"
        )
    skipped = [n for n, m in model.named_modules() if isinstance(m, _FLOAT_TYPES) and n not in layers]
    if skipped:
        warnings.warn(
            f"quantize_modules: not swapping subclasses of Conv2d/Linear: {', '.join(skipped[:10])}", stacklevel=2
        )

    swapped: dict[int, nn.Module] = {}  # id(float module) -> its quantized twin (shared modules)
    for name, mod in layers.items():
        w, a, signed = plan.get(name, default_n)
        if isinstance(mod, QuantLayerMixin):
            mod.set_bits(w, a, signed)
            continue
        cls = QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear
        swapped[id(mod)] = cls.from_float(  # type: ignore[attr-defined]
            mod, w, a, signed, per_channel=per_channel, method=method, allowed_bits=allowed
        )
    if not swapped:
        return model
    if id(model) in swapped:  # the model itself is a bare Conv2d / Linear
        return swapped[id(model)]
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if id(child) in swapped:
                setattr(parent, child_name, swapped[id(child)])
    return model


def _fmt_bits(b: int | None) -> str:
    return "float" if b is None else str(b)


def quant_summary(model: nn.Module, include_float: bool = True) -> str:
    """Table of every Conv2d / Linear: name, type, bits, activation signedness and ranges.

    Float layers -- quantized layers with ``None`` bits, and Conv2d / Linear that were never
    swapped -- are listed explicitly (``include_float=True``) so that a policy that leaves a layer
    in float is visible rather than implied; the footer counts them either way.
    """
    rows: list[tuple[str, ...]] = []
    n_quant = n_float = 0
    float_names: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLayerMixin):
            kind = type(m).__name__
            if m.is_float:
                n_float += 1
                float_names.append(name or "<model>")
                if not include_float:
                    continue
            else:
                n_quant += 1
            sign = "-" if m.a_bits is None else {True: "signed", False: "unsigned", None: "auto"}[m.a_signed]
            rows.append((name or "<model>", kind, _fmt_bits(m.w_bits), _fmt_bits(m.a_bits), sign,
                         m.weight_quantizer.range_str(), m.input_quantizer.range_str()))
        elif isinstance(m, _FLOAT_TYPES):
            n_float += 1
            float_names.append(name or "<model>")
            if include_float:
                rows.append((name or "<model>", f"{type(m).__name__} (not quantized)", "float", "float", "-", "-", "-"))
    header = ("layer", "type", "w_bits", "a_bits", "a_signed", "w_range", "a_range")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    lines.append(f"{n_quant} quantized layer(s), {n_float} float layer(s)")
    if float_names:
        lines.append("float: " + ", ".join(float_names))
    return "\n".join(lines)
