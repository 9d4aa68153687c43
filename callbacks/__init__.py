"""Lightning callbacks of apq-lightning, installed as ``apq_lightning.callbacks``.

They import ``apq_lightning``; the library never imports them (docs/design.md §14).
"""

from apq_lightning.callbacks.checkpoint import LastCheckpoint, ProgressExceptionCheckpoint
from apq_lightning.callbacks.plots import ValidationCurves
from apq_lightning.callbacks.predictor_plots import PredictorScatter
from apq_lightning.callbacks.search import EvolutionSearch
from apq_lightning.callbacks.summary import MetricsSummary

__all__ = [
    "EvolutionSearch", "LastCheckpoint", "MetricsSummary", "PredictorScatter", "ProgressExceptionCheckpoint",
    "ValidationCurves",
]
