"""A subnet's bit policy on real networks: the extracted subnet and the supernet itself.

DESIGN.md §2/§5: every active block carries ``(pw_w, pw_a, dw_w, dw_a)``; both 1x1 convs of a
block take the pw pair, the depthwise conv the dw pair; the stem, the fixed first block, the
head conv and the classifier stay at ``space.fixed_bits`` (8) unless configured.

Activation signedness follows from where a layer's input comes from, not from data:

=======================  ==============================  ========
layer                    input                           signed
=======================  ==============================  ========
``stem.conv``            the normalised image            yes
``first.depthwise.conv`` stem output (after ReLU6)       no
``first.project.conv``   after ReLU6                     no
``blocks.j.expand.conv`` the block input (BN, no ReLU)   yes
``blocks.j.depthwise``   after ReLU6                     no
``blocks.j.project``     after ReLU6                     no
``head.conv``            the last block's output         yes
``classifier``           pooled head output (ReLU6)      no
=======================  ==============================  ========

Two ways to run a quantized subnet, with the same numbers:

* **extracted**: ``quantize_subnet(supernet.extract(subnet), subnet, batches)`` swaps every conv /
  linear of the static :class:`~apq_lightning.layers.SubnetModel` for its quantized twin and
  calibrates it -- the model that QAT finetunes and that is exported;
* **in the supernet**: ``quantize_supernet(net)`` plugs a :class:`SupernetQuantizer` into every
  dynamic conv's ``quantizer`` slot (bits come from the active subnet's policy at each call) and
  quantizes the fixed layers; ``calibrate_supernet(net, batches)`` calibrates the active
  architecture. Afterwards any policy on that architecture runs without new data (weight
  ranges are re-derived from the weights, activation ranges from the histograms kept by the
  calibration, which are statistics of the float network and so do not depend on the bits).
  Running another architecture needs ``calibrate_supernet`` again; forgetting it raises instead
  of silently running with stale ranges.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import torch
from torch import Tensor, nn

from apq_lightning.batches import iter_images
from apq_lightning.layers import SubnetModel
from apq_lightning.space import BIT_FIELDS, BitPolicy, SearchSpace, Subnet, get_space
from apq_lightning.torch_io import read_torch_file

from .calibrate import release_scratch
from .layers import QuantLayerMixin, calibrate, quantizable_layers, quantize_modules
from .quantizers import SUPPORTED_BITS, CalibrationMethod, LinearQuantizer, check_method, validate_bits

if TYPE_CHECKING:
    from apq_lightning.supernet import DynamicConv, Supernet

__all__ = [
    "FixedBits",
    "named_policy",
    "policy_names",
    "apply_named_policy",
    "resolve_fixed_bits",
    "layer_bits_for",
    "apply_policy",
    "quantize_subnet",
    "SupernetQuantizer",
    "quantize_supernet",
    "calibrate_supernet",
    "supernet_quant_disabled",
    "dequantize_supernet",
    "save_quantized",
    "load_quantized",
    "QUANTIZED_FORMAT",
]

FixedBits = Union[int, None, Literal["space"]]
"""Bits of the stem / first block / head / classifier: an int, ``None`` (float) or ``"space"``
(the space's ``fixed_bits``, 8 for every preset)."""

QUANTIZED_FORMAT = "apq-lightning/quantized-subnet"

# Fixed (non-elastic) layers of SubnetModel and of the Supernet: qualified name -> input signed.
_FIXED_LAYERS: dict[str, bool] = {
    "stem.conv": True,
    "first.depthwise.conv": False,
    "first.project.conv": False,
    "head.conv": True,
    "classifier": False,
}
# Convs of an elastic block: (SubnetModel name, Supernet attribute, policy fields, input signed)
_BLOCK_CONVS: tuple[tuple[str, str, tuple[str, str], bool], ...] = (
    ("expand.conv", "expand_conv", ("pw_w", "pw_a"), True),
    ("depthwise.conv", "dw_conv", ("dw_w", "dw_a"), False),
    ("project.conv", "project_conv", ("pw_w", "pw_a"), False),
)


# ----------------------------------------------------------------------------------- policies
def policy_names(space: str | SearchSpace) -> list[str]:
    """Names :func:`named_policy` accepts for ``space``."""
    sp = get_space(space)
    return ["float"] + [f"uniform{b}" for b in sp.bit_choices] + [f"w{w}a{a}" for w in sp.bit_choices for a in sp.bit_choices]


def named_policy(space: str | SearchSpace, name: str) -> BitPolicy | None:
    """Named baseline policies: ``uniform4`` / ``uniform6`` / ``uniform8`` (every active block at
    those bits), ``w4a8``-style (weights / activations of every conv), ``float`` (``None``: no
    policy, the blocks stay full precision)."""
    sp = get_space(space)
    key = str(name).strip().lower()
    if key in ("float", "fp", "fp32", "none"):
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


def resolve_fixed_bits(space: str | SearchSpace, fixed_bits: FixedBits) -> int | None:
    """The bit width of the fixed layers (``"space"`` -> ``space.fixed_bits``), validated."""
    sp = get_space(space)
    if isinstance(fixed_bits, str):
        if fixed_bits != "space":
            raise ValueError(f"fixed_bits = {fixed_bits!r}: give an int, None (float) or 'space'")
        fixed_bits = sp.fixed_bits
    return validate_bits(fixed_bits, SUPPORTED_BITS, what="fixed_bits")


def _block_bits(subnet: Subnet, block: int) -> dict[str, int | None]:
    if subnet.bits is None:
        return dict.fromkeys(BIT_FIELDS)
    return dict(zip(BIT_FIELDS, subnet.bits.block(block)))


def _same_arch(a: Subnet, b: Subnet) -> bool:
    return (a.space, a.depths, a.kernels, a.widths) == (b.space, b.depths, b.kernels, b.widths)


def _allowed_bits(space: SearchSpace, fixed: int | None) -> tuple[int, ...]:
    return tuple(sorted(set(space.bit_choices) | ({fixed} if fixed is not None else set())))


def layer_bits_for(
    model: SubnetModel, subnet: Subnet | None = None, fixed_bits: FixedBits = "space"
) -> dict[str, tuple[int | None, int | None, bool]]:
    """``{layer name: (w_bits, a_bits, a_signed)}`` of every conv / linear of an extracted subnet.

    ``subnet`` defaults to ``model.subnet``; it must have the model's architecture (only the
    policy may differ). A subnet without bits leaves the blocks in float (``None``); the fixed
    layers take ``fixed_bits``. Raises ValueError for a model whose layers are not exactly the
    ones of a :class:`SubnetModel` (nothing may stay float unnoticed).
    """
    if not isinstance(model, SubnetModel):
        raise ValueError(f"layer_bits_for needs a SubnetModel (Supernet.extract), got {type(model).__name__}")
    subnet = model.subnet if subnet is None else subnet
    space = get_space(subnet.space)
    if not _same_arch(subnet, model.subnet):
        raise ValueError(
            "the policy's subnet has another architecture than the model: "
            f"model {model.subnet.to_json()} vs policy {subnet.to_json()}"
        )
    fixed = resolve_fixed_bits(space, fixed_bits)
    plan: dict[str, tuple[int | None, int | None, bool]] = {
        name: (fixed, fixed, signed) for name, signed in _FIXED_LAYERS.items()
    }
    for j, blk in enumerate(model.blocks):
        bits = _block_bits(subnet, blk.block_index)
        for local, _, (wf, af), signed in _BLOCK_CONVS:
            plan[f"blocks.{j}.{local}"] = (bits[wf], bits[af], signed)
    layers = set(quantizable_layers(model))
    if layers != set(plan):
        raise ValueError(
            f"model layers do not match the SubnetModel layout: unexpected {sorted(layers - set(plan))[:5]}, "
            f"missing {sorted(set(plan) - layers)[:5]}"
        )
    return {name: plan[name] for name in quantizable_layers(model)}  # model order


def apply_policy(
    model: SubnetModel,
    subnet: Subnet | None = None,
    fixed_bits: FixedBits = "space",
    method: CalibrationMethod = "kl",
    per_channel: bool = False,
) -> SubnetModel:
    """Swap in quantized layers with the policy's bits, without calibration data.

    On a model that is already quantized and calibrated, only the bits change: weight ranges
    are re-derived from the weights and activation ranges from the calibration histograms, so
    trying many policies on one architecture needs one calibration (see ``set_bits``).
    """
    subnet = model.subnet if subnet is None else subnet
    plan = layer_bits_for(model, subnet, fixed_bits)
    fixed = resolve_fixed_bits(subnet.space, fixed_bits)
    allowed = _allowed_bits(get_space(subnet.space), fixed)
    quantize_modules(model, plan, default=(None, None), method=method, per_channel=per_channel, allowed_bits=allowed)
    model.subnet = subnet
    model.quant_config = {"fixed_bits": fixed, "method": method, "per_channel": per_channel}
    return model


def quantize_subnet(
    model: SubnetModel,
    subnet: Subnet | None = None,
    calib_batches: Iterable[Any] | None = None,
    method: CalibrationMethod = "kl",
    fixed_bits: FixedBits = "space",
    per_channel: bool = False,
    num_batches: int | None = None,
) -> SubnetModel:
    """Quantize an extracted subnet with ``subnet``'s policy and calibrate every range (in place).

    ``calib_batches``: images (or ``(images, labels)`` batches) of the training split without
    augmentation; ``num_batches`` caps how many are drawn. BatchNorm statistics are not touched:
    re-calibrate them first (:func:`~apq_lightning.supernet.recalibrate_bn`) for a subnet
    sliced out of a supernet. Raises ValueError without data.
    """
    if calib_batches is None:
        raise ValueError("quantize_subnet needs calibration data: pass calib_batches (training images, no augmentation)")
    if isinstance(calib_batches, Sequence) and len(calib_batches) == 0:
        raise ValueError("quantize_subnet got no calibration data: calib_batches is empty")
    check_method(method)
    apply_policy(model, subnet, fixed_bits, method, per_channel)
    return calibrate(model, calib_batches, method=method, num_batches=num_batches)  # type: ignore[return-value]


# -------------------------------------------------------------------------- supernet quantizer
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
        self._weight_key = None

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

    def forward(self, x: Tensor, weight: Tensor, bits: tuple[int | None, int | None]) -> tuple[Tensor, Tensor]:
        w_bits, a_bits = bits
        iq = self.input_quantizer
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


@dataclass
class _SupernetQuantState:
    fixed_bits: int | None
    method: CalibrationMethod
    per_channel: bool
    calibrated_arch: Subnet | None = None
    enabled: bool = True
    calibrating: bool = False
    hook: Any = field(default=None, repr=False)


def _state(supernet: nn.Module) -> _SupernetQuantState:
    st = getattr(supernet, "_apq_quant", None)
    if st is None:
        raise ValueError("the supernet is not quantized: call quantize_supernet(supernet) first")
    return st


def _dynamic_convs(supernet: Supernet) -> Iterator[tuple[int, str, DynamicConv, bool]]:
    for i, blk in enumerate(supernet.blocks):
        for _, attr, _, signed in _BLOCK_CONVS:
            yield i, attr, getattr(blk, attr), signed


def _arch(subnet: Subnet) -> Subnet:
    return subnet.with_bits(None)


def _check_arch(supernet: Supernet, args: Any) -> None:
    st = supernet._apq_quant  # type: ignore[attr-defined]
    if not st.enabled or st.calibrating:
        return
    if st.calibrated_arch is None or not _same_arch(st.calibrated_arch, supernet.active_subnet):
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
) -> Supernet:
    """Attach quantizers to a supernet in place (see the module docstring). Call
    :func:`calibrate_supernet` next. Idempotent: a second call only changes ``fixed_bits``."""
    check_method(method)
    space = supernet.space
    fixed = resolve_fixed_bits(space, fixed_bits)
    allowed = _allowed_bits(space, fixed)
    plan = {name: (fixed, fixed, signed) for name, signed in _FIXED_LAYERS.items()}
    quantize_modules(supernet, plan, default=(None, None), method=method, per_channel=per_channel, allowed_bits=allowed)
    st = getattr(supernet, "_apq_quant", None)
    if st is not None:
        st.fixed_bits = fixed
        st.calibrated_arch = None  # the fixed layers' ranges are gone with their bits
        return supernet
    for i, attr, conv, signed in _dynamic_convs(supernet):
        conv.quantizer = SupernetQuantizer(
            signed, per_channel, method, allowed_bits=allowed, name=f"blocks.{i}.{attr}"
        ).to(conv.weight.device)
    st = _SupernetQuantState(fixed, method, per_channel)
    st.hook = supernet.register_forward_pre_hook(_check_arch)
    supernet._apq_quant = st  # type: ignore[attr-defined]
    return supernet


def _fixed_quant_layers(supernet: nn.Module) -> list[QuantLayerMixin]:
    return [m for n, m in supernet.named_modules() if n in _FIXED_LAYERS and isinstance(m, QuantLayerMixin)]


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
    device = next(supernet.parameters()).device
    was_training = supernet.training
    seen = 0
    st.calibrating = True
    try:
        for q in act:
            q.enabled = True
            q.start_observing()
        for m in fixed:
            m.weight_quantizer.enabled = False
        supernet.eval()
        for x in iter_images(batches, num_batches, device):
            supernet(x)
            seen += 1
        if seen == 0:
            raise ValueError("calibrate_supernet got no data: the batch iterable was empty")
    except BaseException:
        for q in act:
            q.observing = False
        raise
    finally:
        release_scratch()
        st.calibrating = False
        for m in fixed:
            m.weight_quantizer.enabled = True
        supernet.train(was_training)
    for q in act:
        q.stop_observing(method)
    for m in fixed:
        m.calibrate_weight(method)
    st.calibrated_arch = _arch(subnet)
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


# ----------------------------------------------------------------------------------- export
def save_quantized(model: SubnetModel, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a quantized (calibrated) subnet model: state dict + subnet JSON + quantization
    metadata, plain tensors and Python values only, so it loads with ``weights_only=True``."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}
    if not layers:
        raise ValueError("save_quantized: the model is not quantized (call quantize_subnet first)")
    cfg = dict(getattr(model, "quant_config", {}))
    first = next(iter(layers.values()))
    payload = {
        "format": QUANTIZED_FORMAT,
        "version": 1,
        "subnet": model.subnet.to_dict(),
        "num_classes": int(model.classifier.out_features),
        "dropout": float(model.dropout.p),
        "quant": {
            "fixed_bits": cfg.get("fixed_bits"),
            "method": cfg.get("method", first.weight_quantizer.method),
            "per_channel": bool(cfg.get("per_channel", first.weight_quantizer.per_channel)),
            "layers": {n: [m.w_bits, m.a_bits, m.a_signed] for n, m in layers.items()},
        },
        "state_dict": {k: v.detach().cpu().contiguous() if isinstance(v, Tensor) else v for k, v in model.state_dict().items()},
        "metadata": dict(metadata or {}),
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, p)
    return p


def load_quantized(path: str | Path, map_location: str | torch.device = "cpu") -> SubnetModel:
    """A model written by :func:`save_quantized` (loaded with ``weights_only=True``), in eval
    mode; ``model.metadata`` holds what was stored beside it (e.g. accuracies).

    Any file that is not one (truncated, empty, text, a bare tensor, pickled code, a damaged
    payload) is a one-line ``ValueError`` naming it (``FileNotFoundError`` when missing).
    """
    payload = read_torch_file(path, "quantized model file", map_location=map_location)
    if payload.get("format") != QUANTIZED_FORMAT:
        raise ValueError(f"{path}: not a quantized subnet file (format {QUANTIZED_FORMAT!r})")
    try:
        model = _quantized_from_payload(payload)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        detail = f"missing key {err}" if isinstance(err, KeyError) else str(err).strip().splitlines()[0]
        raise ValueError(f"{path}: damaged quantized model file ({detail})") from None
    model.to(map_location)
    return model.eval()


def _quantized_from_payload(payload: Mapping[str, Any]) -> SubnetModel:
    """Rebuild the quantized model of a :func:`save_quantized` payload (KeyError etc. if damaged)."""
    subnet = Subnet.from_dict(payload["subnet"])
    q = payload["quant"]
    model = SubnetModel(subnet, int(payload["num_classes"]), float(payload.get("dropout", 0.0)))
    plan = {n: (w, a, s) for n, (w, a, s) in q["layers"].items()}
    quantize_modules(model, plan, default=(None, None), method=q["method"], per_channel=bool(q["per_channel"]))
    model.load_state_dict(payload["state_dict"])
    model.quant_config = {"fixed_bits": q["fixed_bits"], "method": q["method"], "per_channel": bool(q["per_channel"])}
    model.metadata = dict(payload.get("metadata", {}))
    return model


def clone_float(model: nn.Module) -> nn.Module:
    """A deep copy of a (quantized) model that always runs in float: the FP teacher of QAT."""
    teacher = copy.deepcopy(model)
    for m in teacher.modules():
        if isinstance(m, LinearQuantizer):
            m.enabled = False
    return teacher
