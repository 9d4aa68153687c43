"""A subnet's bit policy inside the supernet itself (no extraction).

``quantize_supernet(net)`` plugs a :class:`SupernetQuantizer` into every dynamic conv's
``quantizer`` slot (bits come from the active subnet's policy at each call) and quantizes the
fixed layers; ``calibrate_supernet(net, batches)`` calibrates the active architecture.
Afterwards any policy on that architecture runs without new data (weight ranges are re-derived
from the weights, activation ranges from the histograms kept by the calibration, which are
statistics of the float network and so do not depend on the bits). Running another
architecture needs ``calibrate_supernet`` again; forgetting it raises instead of silently
running with stale ranges. The numbers are those of ``quantize_subnet`` on the extracted
subnet (:mod:`apq_lightning.quant.subnet`): the same quantizers, the same layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from apq_lightning.batches import iter_images
from apq_lightning.layout import BLOCK_CONVS, FIXED_LAYERS, BlockConvSpec
from apq_lightning.space import Subnet
from apq_lightning.supernet import recalibrate_bn

from .bits import SUPPORTED_BITS, CalibrationMethod, check_method, validate_bits
from .calibration import observe
from .layers import QuantLayerMixin, quantize_modules
from .quantizers import LinearQuantizer
from .subnet import FixedBits, allowed_bits, fixed_layer_plan, resolve_fixed_bits, same_arch

if TYPE_CHECKING:
    from apq_lightning.supernet import DynamicConv, Supernet

__all__ = [
    "SupernetQuantizer",
    "quantize_supernet",
    "calibrate_supernet",
    "supernet_quant_disabled",
    "dequantize_supernet",
    "reestimate_supernet",
    "is_batch_quantized",
]


class SupernetQuantizer(nn.Module):
    """Fake-quantizes a dynamic conv's input and active weight with the active subnet's bits.

    Sits in ``DynamicConv.quantizer`` and is called as ``x, w = q(x, w, (w_bits, a_bits))``.
    It owns the same two :class:`LinearQuantizer` a :class:`~apq_lightning.quant.QuantConv2d`
    owns, so an extracted subnet and the supernet quantize identically. Ranges are fixed
    between calibrations: the weight range is derived once per (active weight shape, bits) and
    the activation range comes from :func:`calibrate_supernet` (re-derived from its histogram
    when only the bits change).
    """

    def __init__(
        self,
        a_signed: bool,
        per_channel: bool = False,
        method: CalibrationMethod = "kl",
        allowed_bits: Sequence[int] = SUPPORTED_BITS,
        name: str = "",
    ) -> None:
        super().__init__()
        self.name = name
        self.weight_quantizer = LinearQuantizer(None, True, per_channel, 0, method=method, allowed_bits=allowed_bits)
        self.input_quantizer = LinearQuantizer(None, a_signed, method=method, allowed_bits=allowed_bits)
        self._weight_key: tuple[Any, ...] | None = None
        self._weight_out: tuple[Any, ...] | None = None  # see _quantized_weight

    @property
    def w_bits(self) -> int | None:
        return self.weight_quantizer.bits

    @property
    def a_bits(self) -> int | None:
        return self.input_quantizer.bits

    def reset(self) -> None:
        """Forget every range and histogram (a new architecture is about to be calibrated)."""
        self.weight_quantizer.reset()
        self.input_quantizer.reset()
        self._weight_key = self._weight_out = None

    def _sync_weight(self, weight: Tensor, w_bits: int | None) -> None:
        key = (tuple(weight.shape), w_bits)
        if key == self._weight_key:
            return
        wq = self.weight_quantizer
        wq.bits = validate_bits(w_bits, wq.allowed_bits, what=f"{self.name or 'conv'} w_bits")
        if w_bits is not None:
            with torch.no_grad():
                wq.calibrate_from_tensor(weight)
        self._weight_key = key

    def _quantized_weight(self, weight: Tensor) -> Tensor:
        """The weight quantizer's output, kept between calls while no gradient flows.

        Scoring a subnet calls every conv once per batch with the same active weight; on a CPU,
        re-quantizing it each time (range, four elementwise passes, a dozen small ops) cost about
        a tenth of a ``qfa`` label. The kept result is reused while the weight is the same
        tensor -- the same view of the same parameter storage, or the same transformed kernel
        object (:meth:`~apq_lightning.supernet.DynamicDepthwiseConv.active_weight` keeps it
        without autograd) -- unchanged since (its version counter), at the same bits, and while
        the quantizer's range ``v`` is the one that call left (a reset, as
        :func:`reestimate_supernet` does, quantizes afresh, so ``v`` is always the weight's).
        """
        wq = self.weight_quantizer
        if torch.is_grad_enabled() and weight.requires_grad:  # training: the gradient flows through
            self._weight_out = None
            return wq(weight)
        src = weight if weight._base is None else weight._base
        version = -1 if src.is_inference() else src._version  # an inference tensor is never changed
        key = (src.data_ptr(), version, tuple(weight.shape), weight.stride(), weight.storage_offset(), wq.bits,
               wq.signed, wq.enabled)
        kept = self._weight_out
        if kept is not None and kept[0] is src and kept[1] == key and kept[2] is wq.v and kept[3] == wq.v._version:
            return kept[4]
        out = wq(weight)
        self._weight_out = (src, key, wq.v, wq.v._version, out)
        return out

    def forward(self, x: Tensor, weight: Tensor, bits: tuple[int | None, int | None]) -> tuple[Tensor, Tensor]:
        w_bits, a_bits = bits
        iq = self.input_quantizer
        if iq.range_source != "calibrated":  # batch ranges (quantized-for-all): nothing to calibrate
            wq = self.weight_quantizer
            if iq.bits != a_bits:
                iq.bits = validate_bits(a_bits, iq.allowed_bits, what=f"{self.name or 'conv'} a_bits")
            if wq.bits != w_bits:
                wq.bits = validate_bits(w_bits, wq.allowed_bits, what=f"{self.name or 'conv'} w_bits")
            return iq(x), self._quantized_weight(weight)
        if iq.observing:  # calibration: record the float input, derive the weight range once
            iq(x)
            self._sync_weight(weight, w_bits)
            return x, weight
        if not (iq.enabled and self.weight_quantizer.enabled):
            return x, weight
        if a_bits != iq.bits:
            iq.set_bits(a_bits)  # from the kept histogram; uncalibrated if there is none
        if a_bits is not None and not iq.is_calibrated:
            raise RuntimeError(
                f"{self.name or 'a supernet conv'}: no activation range for the active subnet; "
                "call calibrate_supernet(supernet, batches) after set_active()"
            )
        self._sync_weight(weight, w_bits)
        return iq(x), self.weight_quantizer(weight)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


SupernetRanges = Literal["calibrated", "batch", "running"]
SUPERNET_RANGES: tuple[str, ...] = ("calibrated", "batch", "running")
QFA_RANGES: tuple[str, ...] = ("batch", "running")
"""Range sources of a quantized-for-all supernet (any subnet and policy runs at once)."""


@dataclass
class _SupernetQuantState:
    fixed_bits: int | None
    method: CalibrationMethod
    per_channel: bool
    ranges: SupernetRanges = "calibrated"
    calibrated_arch: Subnet | None = None
    enabled: bool = True
    calibrating: bool = False
    hook: Any = field(default=None, repr=False)


def _state(supernet: nn.Module) -> _SupernetQuantState:
    st = getattr(supernet, "_apq_quant", None)
    if st is None:
        raise ValueError("the supernet is not quantized: call quantize_supernet(supernet) first")
    return st


def _dynamic_convs(supernet: Supernet) -> Iterator[tuple[int, str, DynamicConv, BlockConvSpec]]:
    """``(block index, attribute, conv, its layout entry)`` of every conv of every elastic block."""
    for i, blk in enumerate(supernet.blocks):
        for conv in BLOCK_CONVS:
            yield i, conv.supernet_attr, getattr(blk, conv.supernet_attr), conv


def _check_arch(supernet: Supernet, args: Any) -> None:
    st = supernet._apq_quant  # type: ignore[attr-defined]
    if not st.enabled or st.calibrating or st.ranges in QFA_RANGES:
        return
    if st.calibrated_arch is None or not same_arch(st.calibrated_arch, supernet.active_subnet):
        raise RuntimeError(
            "the quantized supernet is calibrated for "
            f"{'no subnet yet' if st.calibrated_arch is None else st.calibrated_arch.to_json()}, but the active "
            f"subnet is {supernet.active_subnet.to_json()}: call calibrate_supernet(supernet, batches) "
            "(or run it float inside `with supernet_quant_disabled(supernet):`)"
        )


def quantize_supernet(
    supernet: Supernet,
    fixed_bits: FixedBits = "space",
    method: CalibrationMethod = "kl",
    per_channel: bool = False,
    ranges: SupernetRanges = "calibrated",
) -> Supernet:
    """Attach quantizers to a supernet in place (see the module docstring). Idempotent: a second
    call only changes ``fixed_bits`` and ``ranges``.

    ``ranges="calibrated"`` (APQ's way): call :func:`calibrate_supernet` next, for each
    architecture. ``ranges="batch"`` (quantized-for-all training and its samples): weight ranges
    follow the weights at every call and activation ranges come from the batch in training mode
    (a running range in eval mode), so any subnet and policy runs at once; before evaluating one,
    :func:`reestimate_supernet` re-estimates its BatchNorm statistics and running ranges.
    ``ranges="running"``: as ``batch``, but training quantizes each batch with the running range
    shared by every subnet and policy (the alternative the quant phase's ``quant_ranges`` measures)."""
    if ranges not in SUPERNET_RANGES:
        raise ValueError(f"ranges {ranges!r} unknown; allowed: {', '.join(SUPERNET_RANGES)}")
    check_method(method)
    space = supernet.space
    fixed = resolve_fixed_bits(space, fixed_bits)
    allowed = allowed_bits(space, fixed)
    quantize_modules(supernet, fixed_layer_plan(fixed), default=(None, None), method=method,
                     per_channel=per_channel, allowed_bits=allowed)
    st = getattr(supernet, "_apq_quant", None)
    if st is not None:
        st.fixed_bits = fixed
        st.calibrated_arch = None  # the fixed layers' ranges are gone with their bits
        _set_range_source(supernet, ranges)
        _mark_private_inputs(supernet)
        return supernet
    for i, attr, conv, spec in _dynamic_convs(supernet):
        conv.quantizer = SupernetQuantizer(
            spec.a_signed, per_channel, method, allowed_bits=allowed, name=f"blocks.{i}.{attr}"
        ).to(conv.weight.device)
    st = _SupernetQuantState(fixed, method, per_channel)
    st.hook = supernet.register_forward_pre_hook(_check_arch)
    supernet._apq_quant = st  # type: ignore[attr-defined]
    _set_range_source(supernet, ranges)
    _mark_private_inputs(supernet)
    return supernet


def is_batch_quantized(supernet: nn.Module) -> bool:
    """Whether ``supernet`` carries batch-range quantizers (a quantized-for-all supernet)."""
    st = getattr(supernet, "_apq_quant", None)
    return st is not None and st.ranges in QFA_RANGES


def _all_quantizers(supernet: Supernet) -> Iterator[tuple[LinearQuantizer, LinearQuantizer]]:
    """``(weight quantizer, input quantizer)`` of every block conv and every fixed layer."""
    for _, _, conv, _ in _dynamic_convs(supernet):
        q = conv.quantizer
        if isinstance(q, SupernetQuantizer):
            yield q.weight_quantizer, q.input_quantizer
    for m in _fixed_quant_layers(supernet):
        yield m.weight_quantizer, m.input_quantizer


def _set_range_source(supernet: Supernet, ranges: SupernetRanges, momentum: float | None = 0.1,
                      reset: bool = True) -> None:
    st = _state(supernet)
    st.ranges = ranges
    for wq, iq in _all_quantizers(supernet):
        wq.set_range_source("tensor" if ranges in QFA_RANGES else "calibrated")
        iq.set_range_source(ranges, momentum)
        if ranges in QFA_RANGES and reset:
            wq.reset(), iq.reset()
    st.calibrated_arch = None


@torch.no_grad()
def reestimate_supernet(supernet: Supernet, batches: Iterable[Any], num_batches: int | None = None) -> Supernet:
    """BatchNorm statistics and running activation ranges of the *active* subnet and policy,
    re-estimated on fixed images (a supernet quantized with ``ranges="batch"`` or ``"running"``).

    Why: the supernet's running statistics are a mix over every subnet and policy trained; a
    subnet is scored with its own, measured with quantization on, as it will run. Both are
    cumulative averages over the batches (not running averages), so the result does not depend
    on earlier subnets. Leaves the supernet in eval mode.
    """
    st = _state(supernet)
    trained = st.ranges
    if trained not in QFA_RANGES:
        raise ValueError("reestimate_supernet needs a supernet quantized with ranges='batch' or 'running' "
                         "(quantize_supernet(net, ranges='batch')); calibrated ranges use calibrate_supernet")
    # each batch's own range, averaged cumulatively, like BatchNorm's statistics below
    _set_range_source(supernet, "batch", momentum=None)
    try:
        recalibrate_bn(supernet, batches, num_batches)  # train-mode passes: BN and ranges together
    except ValueError:
        raise ValueError("reestimate_supernet got no batches") from None
    finally:
        _set_range_source(supernet, trained, momentum=0.1, reset=False)  # the re-estimated ranges stay
        supernet.eval()
    return supernet


_FIXED_SPECS = {spec.name: spec for spec in FIXED_LAYERS}


def _fixed_quant_layers(supernet: nn.Module) -> list[QuantLayerMixin]:
    return [m for n, m in supernet.named_modules() if n in _FIXED_SPECS and isinstance(m, QuantLayerMixin)]


def _mark_private_inputs(supernet: Supernet) -> None:
    """Let the quantizers of inputs nothing else reads quantize them in place (without autograd;
    layout's ``input_private``)."""
    for _, _, conv, spec in _dynamic_convs(supernet):
        conv.quantizer.input_quantizer.overwrite_input = spec.input_private
    for name, m in supernet.named_modules():
        if name in _FIXED_SPECS and isinstance(m, QuantLayerMixin):
            m.input_quantizer.overwrite_input = _FIXED_SPECS[name].input_private


@torch.no_grad()
def calibrate_supernet(
    supernet: Supernet,
    batches: Iterable[Any],
    method: CalibrationMethod | None = None,
    num_batches: int | None = None,
) -> Supernet:
    """Calibrate the quantizers of the *active* architecture (float statistics, eval mode).

    Every block quantizer is reset first, so a quantizer of another architecture can never be
    used by mistake. Re-calibrate BatchNorm before (:func:`~apq_lightning.supernet.recalibrate_bn`
    inside ``with supernet_quant_disabled(supernet):``). Raises ValueError without data.
    """
    st = _state(supernet)
    if method is not None:
        check_method(method)
    if num_batches is not None and num_batches <= 0:
        raise ValueError(f"calibrate_supernet needs at least one batch; got num_batches={num_batches}")
    subnet = supernet.active_subnet
    active = set(subnet.active_blocks)
    block_q: list[SupernetQuantizer] = []
    for i, _, conv, _ in _dynamic_convs(supernet):
        q = conv.quantizer
        assert isinstance(q, SupernetQuantizer)
        q.reset()
        if method is not None:
            q.weight_quantizer.method = q.input_quantizer.method = method
        if i in active:
            q.input_quantizer.bits = conv.active_bits[1]
            block_q.append(q)
    fixed = _fixed_quant_layers(supernet)
    act = [q.input_quantizer for q in block_q] + [m.input_quantizer for m in fixed]
    for q in act:
        q.enabled = True
    for m in fixed:  # on again after the observation, even if quantization was disabled before
        m.weight_quantizer.enabled = True
    device = next(supernet.parameters()).device
    st.calibrating = True
    try:
        observe(supernet, act, [m.weight_quantizer for m in fixed], iter_images(batches, num_batches, device),
                supernet, what="calibrate_supernet")
    finally:
        st.calibrating = False
    for q in act:
        q.stop_observing(method)
    for m in fixed:
        m.calibrate_weight(method)
    st.calibrated_arch = subnet.with_bits(None)
    st.enabled = True
    return supernet


def _set_supernet_enabled(supernet: Supernet, flag: bool) -> None:
    st = _state(supernet)
    st.enabled = flag
    for _, _, conv, _ in _dynamic_convs(supernet):
        q = conv.quantizer
        if isinstance(q, SupernetQuantizer):
            q.weight_quantizer.enabled = q.input_quantizer.enabled = flag
    for m in _fixed_quant_layers(supernet):
        m.weight_quantizer.enabled = m.input_quantizer.enabled = flag


@contextmanager
def supernet_quant_disabled(supernet: Supernet) -> Iterator[Supernet]:
    """Run a quantized supernet in float for a while (e.g. BatchNorm re-calibration, a float
    evaluation of another subnet); quantization comes back on exit."""
    _set_supernet_enabled(supernet, False)
    try:
        yield supernet
    finally:
        _set_supernet_enabled(supernet, True)


def dequantize_supernet(supernet: Supernet) -> Supernet:
    """Remove every quantizer (block slots emptied, fixed layers back to plain Conv2d/Linear)."""
    _state(supernet)
    for key, fn in list(supernet._forward_pre_hooks.items()):  # by function, not by handle: a
        if fn is _check_arch:                                   # deep copy shares its handle
            del supernet._forward_pre_hooks[key]
    for _, _, conv, _ in _dynamic_convs(supernet):
        conv.quantizer = None
    for parent in supernet.modules():
        for child_name, child in list(parent.named_children()):
            if isinstance(child, QuantLayerMixin):
                plain = _to_float(child)
                setattr(parent, child_name, plain)
    del supernet._apq_quant  # type: ignore[attr-defined]
    return supernet


def _to_float(q: QuantLayerMixin) -> nn.Module:
    if isinstance(q, nn.Conv2d):
        with torch.device("meta"):
            plain: nn.Module = nn.Conv2d(q.in_channels, q.out_channels, q.kernel_size, q.stride, q.padding,
                                         q.dilation, q.groups, q.bias is not None, q.padding_mode)
    else:
        assert isinstance(q, nn.Linear)
        with torch.device("meta"):
            plain = nn.Linear(q.in_features, q.out_features, q.bias is not None)
    plain.weight, plain.bias = q.weight, q.bias  # type: ignore[assignment]
    plain.train(q.training)  # type: ignore[attr-defined]
    return plain
