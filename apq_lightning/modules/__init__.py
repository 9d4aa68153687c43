"""LightningModules of the APQ pipeline (one concern each)."""

from apq_lightning.modules.collection import FPCollectionModule, MPCollectionModule  # noqa: F401
from apq_lightning.modules.phases import Phase, default_phases
from apq_lightning.modules.predictor_module import PredictorModule
from apq_lightning.modules.qat_module import QATModule
from apq_lightning.modules.supernet_module import SupernetModule
from apq_lightning.supernet_io import load_supernet

__all__ = ["Phase", "PredictorModule", "QATModule", "SupernetModule", "default_phases", "load_supernet"]
