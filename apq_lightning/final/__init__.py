"""Stage 7 and the paper's comparisons: the final model of a searched subnet, and the baselines.

* :func:`run_final` (``apq final``): QAT-finetune a searched subnet with the long recipe, test it,
  export it (``quantized.pt`` + ONNX, both checked) and write its report row.
* ``apq baselines``: fixed-precision, sequential and random-search baselines under the same budget
  (:mod:`apq_lightning.search.baselines`), optionally each finalised with :func:`run_final`.

See docs/final.md. This package sits beside the CLI: it uses the LightningModules (to finetune)
and the search (for the baselines); nothing below it imports it.
"""

from apq_lightning.final.pipeline import (
    FinalInputError,
    FinalSettings,
    FinalTarget,
    read_search,
    read_subnet,
    run_final,
)
from apq_lightning.final.report import append_row, markdown_table

__all__ = ["FinalInputError", "FinalSettings", "FinalTarget", "append_row", "markdown_table", "read_search",
           "read_subnet", "run_final"]
