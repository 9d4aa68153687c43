"""Image data: one LightningDataModule over CIFAR-10 (cached arrays), ImageFolder trees and digits."""

from apq_lightning.data.datamodule import (
    DATASET_STATS,
    DATASETS,
    ArrayDataset,
    ImageDataModule,
    default_cache_dir,
)

__all__ = ["DATASET_STATS", "DATASETS", "ArrayDataset", "ImageDataModule", "default_cache_dir"]
