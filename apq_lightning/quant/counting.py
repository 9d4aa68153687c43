"""MACs, BitOps and model size of any ``nn.Module`` (docs/design.md §7.6).

Counting rules
--------------
* **What is counted**: every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` call (quantized twins
  included) during one forward pass on a zero input of ``input_shape``; BN, activations,
  pooling, additions and the fake-quant ops themselves are free, as in the APQ / BitFusion
  convention. A module called twice is counted twice.
* **MACs** of a call: ``output elements x (weight elements per output channel)``, i.e.
  ``out_elems x Cin/groups x kh x kw`` for a conv and ``out_elems x in_features`` for a linear
  layer. Reported **per sample**: the total is divided by the batch size ``input_shape[0]``.
  A module may override its count by defining ``macs_per_call(inputs, output) -> int``
  (total over the batch), e.g. a supernet layer that computes with a slice of its weight.
* **BitOps** of a call: ``MACs x w_bits x a_bits``. A layer that carries ``w_bits`` /
  ``a_bits`` attributes (:class:`~apq_lightning.quant.QuantConv2d` and friends) uses its own;
  a value of ``None`` there means the tensor stays float and counts as **32 bits**. Layers that
  carry no such attributes (plain float models) use the function's ``w_bits`` / ``a_bits``
  arguments (``None`` = 32). torchvision's MobileNetV2 at 224 x 224: 300.8 M MACs, 19.25 G
  BitOps at 8/8.
* **Model size** (:func:`model_size_bytes`): weights of conv / linear layers at their
  ``w_bits`` (the same rule: own bits, ``None`` -> 32, else the argument), every other
  parameter -- biases, BN scale and shift, embeddings -- at 32 bits; buffers (BN running
  statistics, quantizer ranges) are not counted since they fold into the stored scale and bias
  at deployment. Shared parameters count once. The result is ``sum(numel x bits) / 8`` bytes
  (fractional for odd bit widths).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LayerCost", "layer_costs", "count_macs", "count_bitops", "model_size_bytes"]

_COUNTED: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_FLOAT_BITS = 32
_MISSING = object()


@dataclass(frozen=True)
class LayerCost:
    """Cost of one call of one layer, per sample."""

    name: str
    kind: str
    macs: int
    w_bits: int
    a_bits: int

    @property
    def bitops(self) -> int:
        return self.macs * self.w_bits * self.a_bits


def _resolve(module: nn.Module, attr: str, default: int | None) -> int:
    """The layer's own bits if it carries the attribute (None -> 32), else the default."""
    own = getattr(module, attr, _MISSING)
    bits = default if own is _MISSING else own
    return _FLOAT_BITS if bits is None else int(bits)  # type: ignore[arg-type]


def _call_macs(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> int:
    custom = getattr(module, "macs_per_call", None)
    if callable(custom):
        return int(custom(inputs, output))
    weight = module.weight  # type: ignore[union-attr]
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return output.numel() * weight[0].numel()  # Cin/groups * prod(kernel)


def _is_counted(module: nn.Module) -> bool:
    return isinstance(module, _COUNTED) or callable(getattr(module, "macs_per_call", None))


def _example_input(model: nn.Module, input_shape: Sequence[int]) -> Tensor:
    ref = next(model.parameters(), None)
    if ref is None:
        ref = next(model.buffers(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if (ref is not None and ref.is_floating_point()) else torch.float32
    return torch.zeros(tuple(input_shape), device=device, dtype=dtype)


def layer_costs(
    model: nn.Module, input_shape: Sequence[int], w_bits: int | None = 8, a_bits: int | None = 8
) -> list[LayerCost]:
    """Per-call costs of every counted layer, in call order (see the module docstring).

    Runs one forward pass under ``no_grad`` in eval mode (so BN uses running statistics and
    nothing is updated) on the model's device and dtype, then restores the training mode.
    """
    if len(input_shape) < 2:
        raise ValueError(f"input_shape must include the batch dimension, got {tuple(input_shape)}")
    batch = int(input_shape[0])
    if batch <= 0:
        raise ValueError(f"batch size must be positive, got {batch}")
    names = {id(m): n for n, m in model.named_modules()}
    costs: list[LayerCost] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        costs.append(LayerCost(
            name=names.get(id(module), "?") or "<model>",
            kind=type(module).__name__,
            macs=_call_macs(module, inputs, output) // batch,
            w_bits=_resolve(module, "w_bits", w_bits),
            a_bits=_resolve(module, "a_bits", a_bits),
        ))

    handles = [m.register_forward_hook(hook) for m in model.modules() if _is_counted(m)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(_example_input(model, input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return costs


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of conv and linear layers per sample."""
    return sum(c.macs for c in layer_costs(model, input_shape))


def count_bitops(model: nn.Module, input_shape: Sequence[int], w_bits: int | None = 8, a_bits: int | None = 8) -> int:
    """BitOps per sample: sum of MACs x w_bits x a_bits over conv and linear layers, with each
    layer's own bits where it carries them (``None`` = float = 32 bits)."""
    return sum(c.bitops for c in layer_costs(model, input_shape, w_bits, a_bits))


def model_size_bytes(model: nn.Module, w_bits: int | None = 8) -> float:
    """Storage of the parameters in bytes: conv / linear weights at their bits, everything else
    at 32 bits (see the module docstring for the exact rule)."""
    bits_of: dict[int, int] = {}
    for m in model.modules():
        if _is_counted(m) and isinstance(getattr(m, "weight", None), Tensor):
            bits_of.setdefault(id(m.weight), _resolve(m, "w_bits", w_bits))
    total_bits = 0
    for p in model.parameters():  # parameters() already yields shared tensors once
        total_bits += p.numel() * bits_of.get(id(p), _FLOAT_BITS)
    return total_bits / 8
