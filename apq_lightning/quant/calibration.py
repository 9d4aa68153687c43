"""Calibration: choosing the quantization ranges of a model that :mod:`.layers` quantized.

Activation ranges need data -- a few batches through the float network, histograms, a KL (or
min-max) search per layer -- weight ranges only the weights. This module runs those passes;
the layers themselves (and swapping them into a model) are :mod:`~apq_lightning.quant.layers`'s.
:func:`observe` is the one data pass, shared with the supernet's calibration
(:func:`~apq_lightning.quant.calibrate_supernet`).

Weight range during QAT
-----------------------
The weight range ``v`` is set by :func:`calibrate` (KL on the weight tensor, like APQ) and then
**kept fixed** during QAT, as is the activation range: re-deriving it every step would cost a
histogram and a KL search per layer per step and would make the quantization grid move under
the optimiser. Weights that drift outside ``[-v, v]`` are clipped and, through the
straight-through estimator's zero gradient outside the range, stop being pushed further. Call
:func:`calibrate_weights` (no data needed) to re-derive the weight ranges after the weights
changed substantially, e.g. after loading other supernet weights or a long finetune.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from .bits import CalibrationMethod, check_method
from .layers import QuantLayerMixin
from .quantizers import LinearQuantizer
from .ranges import release_scratch

__all__ = ["calibrate", "calibrate_weights", "observe"]


def _quant_layers(model: nn.Module) -> list[tuple[str, QuantLayerMixin]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)]


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _default_forward(model: nn.Module, batch: Any, device: torch.device) -> None:
    """Run ``model`` on a batch: a tensor, or a tuple/list whose first item is the input."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("calibrate() got an empty batch")
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(f"calibrate() cannot feed a batch of type {type(batch).__name__}; pass forward_fn=")
    model(batch.to(device, non_blocking=True))


def observe(
    model: nn.Module,
    activations: Sequence[LinearQuantizer],
    weights: Sequence[LinearQuantizer],
    inputs: Iterable[Any],
    feed: Callable[[Any], Any],
    what: str = "calibrate()",
) -> int:
    """The calibration pass shared by :func:`calibrate` and ``calibrate_supernet``.

    Puts ``activations`` in observe mode and turns ``weights`` off (the statistics of the float
    network, as in APQ / TensorRT), runs ``feed(item)`` for every item of ``inputs`` in eval
    mode without gradients, and restores the weight quantizers and the training mode. Returns
    the number of items fed; raises ValueError (naming ``what``) when there were none. On any
    error the activation quantizers leave observe mode; otherwise they are still observing and
    the caller sets the ranges (``stop_observing``).
    """
    enabled = [q.enabled for q in weights]
    was_training = model.training
    seen = 0
    try:
        for q in activations:
            q.start_observing()
        for q in weights:
            q.enabled = False
        model.eval()
        with torch.no_grad():
            for item in inputs:
                feed(item)
                seen += 1
        if seen == 0:
            raise ValueError(f"{what} got no data: the batch iterable was empty")
    except BaseException:
        for q in activations:
            q.observing = False
        raise
    finally:
        release_scratch()
        for q, en in zip(weights, enabled):
            q.enabled = en
        model.train(was_training)
    return seen


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    method: CalibrationMethod | None = None,
    num_batches: int | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> nn.Module:
    """Choose every quantization range of ``model`` and turn quantization on.

    Activation quantizers observe the batches (eval mode, no grad, float weights and
    activations -- the statistics of the float network, as in APQ / TensorRT) and take their
    ranges from the merged histograms; weight ranges come from the weights. ``method``
    overrides each quantizer's configured method; ``num_batches`` caps how many batches are
    drawn (the iterator is not advanced further); ``forward_fn(model, batch)`` replaces the
    default ``model(batch[0])``. The training mode is restored.

    Raises ValueError when no batch is seen (an empty iterable or ``num_batches=0``): a model
    "calibrated" on nothing would silently run in float. Layers that never ran (e.g. in skipped
    blocks) keep float activations and are reported with a warning.
    """
    if method is not None:
        check_method(method)
    if num_batches is not None and num_batches <= 0:
        raise ValueError(f"calibrate() needs at least one batch; got num_batches={num_batches}")
    layers = _quant_layers(model)
    if not layers:
        raise ValueError("calibrate(): the model has no quantized layers; call quantize_modules() first")
    device = _model_device(model)
    # float activations are observed too, so that set_bits() can later quantize them without data
    act = [(n, m.input_quantizer) for n, m in layers]
    feed = (lambda batch: _default_forward(model, batch, device)) if forward_fn is None else (
        lambda batch: forward_fn(model, batch))
    observe(model, [q for _, q in act], [m.weight_quantizer for _, m in layers], islice(batches, num_batches), feed)

    never_ran = [n for n, q in act if not q.stop_observing(method) and q.bits is not None]
    for _, m in layers:
        m.calibrate_weight(method)
    if never_ran:
        warnings.warn(
            f"calibrate(): {len(never_ran)} layer(s) never ran on the calibration data and keep float "
            f"activations: {', '.join(never_ran[:10])}{' ...' if len(never_ran) > 10 else ''}",
            stacklevel=2,
        )
    return model


def calibrate_weights(model: nn.Module, method: CalibrationMethod | None = None) -> nn.Module:
    """Re-derive every weight range from the current weights (no data needed), e.g. after
    loading new weights into a quantized model. Activation ranges are left as they are."""
    for _, m in _quant_layers(model):
        m.calibrate_weight(method)
    return model
