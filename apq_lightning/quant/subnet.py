"""A subnet's bit policy on an extracted subnet (:class:`~apq_lightning.layers.SubnetModel`).

docs/design.md §3.1: every active block carries ``(pw_w, pw_a, dw_w, dw_a)``; both 1x1 convs of a
block take the pw pair, the depthwise conv the dw pair; the stem, the fixed first block, the
head conv and the classifier stay at ``space.fixed_bits`` (8) unless configured. Which layer
takes which bits, and whether its input is signed, comes from :mod:`apq_lightning.layout`
(activation signedness follows from where a layer's input comes from, not from data):

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

``quantize_subnet(supernet.extract(subnet), subnet, batches)`` swaps every conv / linear of the
static model for its quantized twin and calibrates it -- the model that QAT finetunes and that
is exported. The same numbers inside the supernet: :mod:`apq_lightning.quant.supernet`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from torch import nn

from apq_lightning.layers import SubnetModel
from apq_lightning.layout import BLOCK_CONVS, FIXED_LAYERS, block_policy
from apq_lightning.space import SearchSpace, Subnet, get_space

from .bits import SUPPORTED_BITS, CalibrationMethod, check_method, validate_bits
from .calibration import calibrate
from .layers import quantizable_layers, quantize_modules
from .quantizers import LinearQuantizer

__all__ = [
    "FixedBits",
    "resolve_fixed_bits",
    "layer_bits_for",
    "apply_policy",
    "quantize_subnet",
    "clone_float",
]

FixedBits = int | None | Literal["space"]
"""Bits of the stem / first block / head / classifier: an int, ``None`` (float) or ``"space"``
(the space's ``fixed_bits``, 8 for every preset)."""


def resolve_fixed_bits(space: str | SearchSpace, fixed_bits: FixedBits) -> int | None:
    """The bit width of the fixed layers (``"space"`` -> ``space.fixed_bits``), validated."""
    sp = get_space(space)
    if isinstance(fixed_bits, str):
        if fixed_bits != "space":
            raise ValueError(f"fixed_bits = {fixed_bits!r}: give an int, None (float) or 'space'")
        fixed_bits = sp.fixed_bits
    return validate_bits(fixed_bits, SUPPORTED_BITS, what="fixed_bits")


def same_arch(a: Subnet, b: Subnet) -> bool:
    """Same space and architecture (the bit policies may differ)."""
    return (a.space, a.depths, a.kernels, a.widths) == (b.space, b.depths, b.kernels, b.widths)


def allowed_bits(space: SearchSpace, fixed: int | None) -> tuple[int, ...]:
    """The bit set a quantizer of ``space`` accepts: the space's choices and the fixed layers' bits."""
    return tuple(sorted(set(space.bit_choices) | ({fixed} if fixed is not None else set())))


def fixed_layer_plan(fixed: int | None) -> dict[str, tuple[int | None, int | None, bool]]:
    """``{name: (bits, bits, a_signed)}`` of the fixed layers (same names in a SubnetModel and
    in the Supernet)."""
    return {spec.name: (fixed, fixed, spec.a_signed) for spec in FIXED_LAYERS}


def layer_bits_for(
    model: SubnetModel, subnet: Subnet | None = None, fixed_bits: FixedBits = "space"
) -> dict[str, tuple[int | None, int | None, bool]]:
    """``{layer name: (w_bits, a_bits, a_signed)}`` of every conv / linear of an extracted subnet.

    ``subnet`` defaults to ``model.subnet``; it must have the model's architecture (only the
    policy may differ). A subnet without bits leaves the blocks in float (``None``); the fixed
    layers take ``fixed_bits``. Raises ValueError for a model whose layers are not exactly the
    ones of a :class:`SubnetModel` (nothing may stay float unnoticed).
    """
    subnet = _policy_subnet(model, subnet)
    return _layer_plan(model, subnet, resolve_fixed_bits(subnet.search_space, fixed_bits))


def _policy_subnet(model: SubnetModel, subnet: Subnet | None) -> Subnet:
    """``subnet`` (default ``model.subnet``), checked to have the model's architecture."""
    if not isinstance(model, SubnetModel):
        raise ValueError(f"layer_bits_for needs a SubnetModel (Supernet.extract), got {type(model).__name__}")
    subnet = model.subnet if subnet is None else subnet
    if not same_arch(subnet, model.subnet):
        raise ValueError(
            "the policy's subnet has another architecture than the model: "
            f"model {model.subnet.to_json()} vs policy {subnet.to_json()}"
        )
    return subnet


def _layer_plan(
    model: SubnetModel, subnet: Subnet, fixed: int | None
) -> dict[str, tuple[int | None, int | None, bool]]:
    """:func:`layer_bits_for` with the fixed layers' bits already resolved."""
    plan = fixed_layer_plan(fixed)
    for j, blk in enumerate(model.blocks):
        policy = block_policy(subnet.bits.block(blk.block_index) if subnet.bits is not None else None)
        for conv in BLOCK_CONVS:
            plan[f"blocks.{j}.{conv.name}"] = (*conv.layer_bits(policy), conv.a_signed)
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
    subnet = _policy_subnet(model, subnet)
    space = subnet.search_space  # looked up once, passed on as an object
    fixed = resolve_fixed_bits(space, fixed_bits)
    plan = _layer_plan(model, subnet, fixed)
    quantize_modules(model, plan, default=(None, None), method=method, per_channel=per_channel,
                     allowed_bits=allowed_bits(space, fixed))
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
        raise ValueError(
            "quantize_subnet needs calibration data: pass calib_batches (training images, no augmentation)"
        )
    if isinstance(calib_batches, Sequence) and len(calib_batches) == 0:
        raise ValueError("quantize_subnet got no calibration data: calib_batches is empty")
    check_method(method)
    apply_policy(model, subnet, fixed_bits, method, per_channel)
    return calibrate(model, calib_batches, method=method, num_batches=num_batches)  # type: ignore[return-value]


def clone_float(model: nn.Module) -> nn.Module:
    """A deep copy of a (quantized) model that always runs in float: the FP teacher of QAT."""
    teacher = copy.deepcopy(model)
    for m in teacher.modules():
        if isinstance(m, LinearQuantizer):
            m.enabled = False
    return teacher
