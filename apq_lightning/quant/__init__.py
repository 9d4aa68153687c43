"""Quantization primitives: fake quantizers, KL range calibration, quantized layers, counting.

Model-agnostic on purpose: everything addresses Conv2d / Linear layers by qualified module name,
so the supernet's bit policy (DESIGN.md §2) plugs in as a ``{name: (w_bits, a_bits)}`` mapping.

Typical use::

    model = quantize_modules(model, {"features.3.conv.0.0": (4, 6)}, default=(8, 8))
    calibrate(model, loader, num_batches=8)       # KL ranges from 8 batches
    print(quant_summary(model))
    count_bitops(model, (1, 3, 224, 224))

APQ subnets (the per-block policy of DESIGN.md §2 on an extracted subnet or on the supernet)::

    model = quantize_subnet(supernet.extract(subnet), subnet, calib_batches)
    quantize_supernet(supernet); supernet.set_active(subnet); calibrate_supernet(supernet, calib_batches)
"""

from .calibrate import HistogramObserver, kl_threshold, kl_thresholds, magnitude_histogram, tensor_range
from .counting import LayerCost, count_bitops, count_macs, layer_costs, model_size_bytes
from .layers import (
    LayerBits,
    QuantConv2d,
    QuantLayerMixin,
    QuantLinear,
    calibrate,
    calibrate_weights,
    quant_summary,
    quantizable_layers,
    quantize_modules,
)
from .policy import (
    QUANTIZED_FORMAT,
    SupernetQuantizer,
    apply_named_policy,
    apply_policy,
    calibrate_supernet,
    dequantize_supernet,
    layer_bits_for,
    load_quantized,
    named_policy,
    policy_names,
    quantize_subnet,
    quantize_supernet,
    save_quantized,
    supernet_quant_disabled,
)
from .quantizers import SUPPORTED_BITS, CalibrationMethod, LinearQuantizer, QuantSpec, check_method, qrange, validate_bits

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
