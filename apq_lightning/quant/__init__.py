"""Quantization: fake quantizers, KL range calibration, quantized layers, counting, and applying
a subnet's bit policy to modules.

Modules: ``bits`` (bit widths, methods), ``ranges`` (KL / min-max range search, histogram
observer), ``quantizers`` (:class:`LinearQuantizer`), ``cpu_kernel`` (the vectorised CPU
fake-quant kernel it uses), ``layers`` (quantized Conv2d / Linear, ``quantize_modules``),
``calibration`` (``calibrate``: choosing the ranges), ``counting`` (MACs, BitOps, size),
``subnet`` (a policy on an extracted subnet), ``supernet`` (a policy inside the supernet),
``export`` (save / load).
Named policies (``uniform4``, ``w4a8``, ``float``) belong to the space
(:func:`apq_lightning.space.named_policy`) and are re-exported here.

Model-agnostic on purpose: everything addresses Conv2d / Linear layers by qualified module name,
so the supernet's bit policy (docs/design.md §3.1) plugs in as a ``{name: (w_bits, a_bits)}`` mapping.

Typical use::

    model = quantize_modules(model, {"features.3.conv.0.0": (4, 6)}, default=(8, 8))
    calibrate(model, loader, num_batches=8)       # KL ranges from 8 batches
    print(quant_summary(model))
    count_bitops(model, (1, 3, 224, 224))

APQ subnets (the per-block policy of docs/design.md §3.1 on an extracted subnet or on the supernet)::

    model = quantize_subnet(supernet.extract(subnet), subnet, calib_batches)
    quantize_supernet(supernet); supernet.set_active(subnet); calibrate_supernet(supernet, calib_batches)
"""

from apq_lightning.space import apply_named_policy, named_policy, policy_names  # named policies: a fact of the space

from .bits import SUPPORTED_BITS, CalibrationMethod, check_method, qrange, validate_bits
from .calibration import calibrate, calibrate_weights
from .counting import LayerCost, count_bitops, count_macs, layer_costs, model_size_bytes
from .export import QUANTIZED_FORMAT, load_quantized, save_quantized
from .layers import (
    LayerBits,
    QuantConv2d,
    QuantLayerMixin,
    QuantLinear,
    quant_summary,
    quantizable_layers,
    quantize_modules,
)
from .quantizers import LinearQuantizer, QuantSpec
from .ranges import HistogramObserver, kl_threshold, kl_thresholds, magnitude_histogram, tensor_range
from .subnet import apply_policy, layer_bits_for, quantize_subnet
from .supernet import (
    SupernetQuantizer,
    calibrate_supernet,
    dequantize_supernet,
    quantize_supernet,
    supernet_quant_disabled,
)

__all__ = [
    "SUPPORTED_BITS",
    "CalibrationMethod",
    "QuantSpec",
    "LinearQuantizer",
    "qrange",
    "validate_bits",
    "check_method",
    "HistogramObserver",
    "kl_threshold",
    "kl_thresholds",
    "magnitude_histogram",
    "tensor_range",
    "LayerBits",
    "QuantLayerMixin",
    "QuantConv2d",
    "QuantLinear",
    "quantize_modules",
    "quantizable_layers",
    "calibrate",
    "calibrate_weights",
    "quant_summary",
    "LayerCost",
    "layer_costs",
    "count_macs",
    "count_bitops",
    "model_size_bytes",
    "named_policy",
    "policy_names",
    "apply_named_policy",
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
