"""Data modules: images (CIFAR-10 as cached arrays, ImageFolder trees, digits), sample indices
for collection, and predictor samples.

Every LightningDataModule of the project lives here: :class:`ImageDataModule` (supernet, QAT),
:class:`SampleIndexDataModule` (stages 2 and 4: indices to measure, resuming, DDP shards, the
output-directory lock) and :class:`SubnetSampleDataModule` (stages 3 and 5: features and
accuracies read from sample stores). The sample store itself is :mod:`apq_lightning.collection`'s
(``record``, ``store``, ``reading``); this package imports it, and nothing under
:mod:`apq_lightning.collection` imports this package.
"""

from apq_lightning.data.datamodule import ImageDataModule
from apq_lightning.data.datasets import DATASET_STATS, DATASETS, ArrayDataset
from apq_lightning.data.imagetree import default_cache_dir
from apq_lightning.data.sample_indices import IndexDataset, SampleIndexDataModule
from apq_lightning.data.samples import SampleDataset, SubnetSampleDataModule
from apq_lightning.data.splits import arch_key

__all__ = [
    "DATASET_STATS", "DATASETS", "ArrayDataset", "ImageDataModule", "IndexDataset", "SampleDataset",
    "SampleIndexDataModule", "SubnetSampleDataModule", "arch_key", "default_cache_dir",
]
