"""Data modules: images (CIFAR-10 as cached arrays, ImageFolder trees, digits) and predictor samples."""

from apq_lightning.data.datamodule import (
    DATASET_STATS,
    DATASETS,
    ArrayDataset,
    ImageDataModule,
    default_cache_dir,
)
from apq_lightning.data.samples import SampleDataset, SubnetSampleDataModule, arch_key

__all__ = [
    "DATASET_STATS", "DATASETS", "ArrayDataset", "ImageDataModule", "SampleDataset", "SubnetSampleDataModule",
    "arch_key", "default_cache_dir",
]
