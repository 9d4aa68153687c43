"""Former home of the policy code, kept so that existing imports keep working.

The code now lives where its concern is:

* named policies (``uniform4``, ``w4a8``, ``float``) are facts of the space:
  :mod:`apq_lightning.space` (``named_policy``, ``policy_names``, ``apply_named_policy``);
* a policy on an extracted subnet: :mod:`apq_lightning.quant.subnet`;
* a policy inside the supernet: :mod:`apq_lightning.quant.supernet`;
* writing / reading quantized models: :mod:`apq_lightning.quant.export`.
"""

from apq_lightning.space import apply_named_policy, named_policy, policy_names

from .export import QUANTIZED_FORMAT, load_quantized, save_quantized
from .subnet import FixedBits, apply_policy, clone_float, layer_bits_for, quantize_subnet, resolve_fixed_bits
from .supernet import (
    SupernetQuantizer,
    calibrate_supernet,
    dequantize_supernet,
    quantize_supernet,
    supernet_quant_disabled,
)

__all__ = [
    "FixedBits",
    "named_policy",
    "policy_names",
    "apply_named_policy",
    "resolve_fixed_bits",
    "layer_bits_for",
    "apply_policy",
    "quantize_subnet",
    "clone_float",
    "SupernetQuantizer",
    "quantize_supernet",
    "calibrate_supernet",
    "supernet_quant_disabled",
    "dequantize_supernet",
    "save_quantized",
    "load_quantized",
    "QUANTIZED_FORMAT",
]
