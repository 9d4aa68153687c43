"""Predictor-transfer study (APQ, CVPR 2020, Figure 7) on our own sample stores: ``apq transfer-study``.

    apq transfer-study --fp-stores 'runs/collect_fp_cifar/samples*.jsonl' \\
        --mp-stores 'runs/collect_mp_cifar/samples*.jsonl' --space apq_cifar \\
        --sizes 50,100,200,400,all --seeds 0,1,2 --losses mse,ranking --epochs 150 --out runs/transfer_study

APQ's claim is that an MP predictor started from the FP predictor needs far fewer expensive
quantization-aware samples than one trained from scratch. This study measures that claim on our
stores: one FP predictor is trained on the FP stores (once). Then, for every MP training-set
size, seed, loss and initialisation (``transfer``: from the FP predictor, ``quantize_fc = 0``;
``scratch``: random init, regressor bias = mean training accuracy), an MP predictor is trained
on a subset of the MP training split and evaluated on **one fixed held-out MP test split**:
pairwise accuracy (APQ's), Kendall τ-b and RMSE.

* :mod:`.config` -- the settings (:class:`TransferStudyConfig`), checked;
* :mod:`.splits` -- the fixed test split, the nested per-seed training subsets, the sizes
  (``all`` is the whole split; a size at or above it runs as ``all``, with a note; sizes that
  end up equal run once);
* :mod:`.run` -- every predictor a :class:`~apq_lightning.modules.PredictorModule` fitted by a
  Trainer of its own, scored by :func:`~apq_lightning.metrics.predictor_metrics`;
* :mod:`.report` -- per-cell mean ± std over seeds, the Markdown table, the plot;
* :mod:`.command` -- the command line.

Outputs in ``out``: ``transfer_study.json`` (config, FP predictor, every run, per-cell
mean/std), ``transfer_study.md`` (mean ± std pairwise accuracy over seeds), ``transfer_study.png``
(pairwise accuracy vs. MP training samples) and ``fp_predictor.pt``.

Bad input (a size that is neither a positive integer nor ``all``, an unknown loss, stores that
match no file, a store too small to split, ...) is one line on stderr and exit code 2, before
any training. Nothing in the package imports this one but the command line (docs/design.md §14.2: the
study sits above data, modules and predictor); torch and Lightning are imported only when a
study runs, so ``--help`` is quick.
"""

from apq_lightning.study.command import build_parser, main
from apq_lightning.study.config import (
    INITS,
    LOSSES,
    OUTPUTS,
    StudyError,
    TransferStudyConfig,
    parse_losses,
    parse_seeds,
    parse_sizes,
)
from apq_lightning.study.splits import epochs_for, resolve_sizes, split_id

__all__ = [
    "INITS",
    "LOSSES",
    "OUTPUTS",
    "StudyError",
    "TransferStudyConfig",
    "build_parser",
    "epochs_for",
    "main",
    "parse_losses",
    "parse_seeds",
    "parse_sizes",
    "resolve_sizes",
    "split_id",
]
