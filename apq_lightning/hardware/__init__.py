"""Hardware cost models (docs/design.md §8): lookup tables, a fit beyond the table, BitOps / size.

Quick use::

    from apq_lightning.hardware import get_cost_model
    model = get_cost_model("bitfusion", "apq_imagenet")
    model.costs(subnet)                 # one subnet -> dict
    model.evaluate(genomes)             # (N, L) int genomes -> dict of (N,) arrays

Hardware names: ``bitfusion`` (table where it has the layer, fit elsewhere),
``bitfusion_table`` (exact table, ``apq_imagenet`` only), ``bitfusion_fit`` (fit only),
``bitops`` (BitOps and size, no latency) and ``lut:PATH`` (a table measured with
``python -m apq_lightning.cli lut build``). See docs/hardware.md.

Torch is imported only by :mod:`apq_lightning.hardware.measure` (building tables).
"""

from apq_lightning.hardware.cost import (
    METRICS,
    BitFusionCost,
    BitOpsCost,
    CostModel,
    FittedBitFusionCost,
    HybridBitFusionCost,
    LayerwiseCost,
    MeasuredCost,
    get_cost_model,
    json_ready,
    list_cost_models,
    register_cost_model,
)
from apq_lightning.hardware.fit import BitFusionFit, FitReport, bitfusion_fit, cross_validate, fit_table
from apq_lightning.hardware.geometry import block_convs, default_num_classes, fixed_layers
from apq_lightning.hardware.table import (
    ConvShape,
    Cost,
    CostTable,
    bitfusion_table,
    bitfusion_table_path,
    format_key,
    load_table,
    parse_key,
)

__all__ = [
    "METRICS", "BitFusionCost", "BitOpsCost", "CostModel", "FittedBitFusionCost", "HybridBitFusionCost",
    "LayerwiseCost", "MeasuredCost", "get_cost_model", "json_ready", "list_cost_models", "register_cost_model",
    "BitFusionFit", "FitReport", "bitfusion_fit", "cross_validate", "fit_table",
    "block_convs", "default_num_classes", "fixed_layers",
    "ConvShape", "Cost", "CostTable", "bitfusion_table", "bitfusion_table_path", "format_key", "load_table",
    "parse_key",
]
