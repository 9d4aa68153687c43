"""Lightning callbacks of apq-lightning (they import ``apq_lightning``, never the reverse)."""

from callbacks.plots import ValidationCurves
from callbacks.summary import MetricsSummary

__all__ = ["MetricsSummary", "ValidationCurves"]
