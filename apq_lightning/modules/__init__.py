"""LightningModules of the APQ pipeline (one concern each)."""

from apq_lightning.modules.qat_module import QATModule
from apq_lightning.modules.supernet_module import Phase, SupernetModule, default_phases, load_supernet

__all__ = ["Phase", "QATModule", "SupernetModule", "default_phases", "load_supernet"]
