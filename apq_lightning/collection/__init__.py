"""Sample collection for APQ's predictors (stages 2 and 4) and the sample store.

* :mod:`~apq_lightning.collection.store` -- append-only JSONL records of measured subnets,
  crash-safe, with readers that refuse to mix supernets or spaces (``read_samples``,
  ``merge_stores``, ``checkpoint_hash``);
* :mod:`~apq_lightning.collection.sampling` -- index -> subnet (and policy), a pure function of
  ``(seed, index)``;
* :mod:`~apq_lightning.collection.measure` -- cached images, top-1, the FP measurement;
* :class:`SampleIndexDataModule` / :class:`SampleWriter` -- ``trainer.predict`` over sample
  indices, resumable and sharded under DDP, writing each record as soon as it is measured.

The LightningModules that measure (``FPCollectionModule``, ``MPCollectionModule``) live in
:mod:`apq_lightning.modules` (they reuse QAT's loss); see ``docs/collection.md``.
"""

from apq_lightning.collection.datamodule import IndexDataset, SampleIndexDataModule, store_path
from apq_lightning.collection.measure import FP_MODES, cache_batches, measure_fp, top1
from apq_lightning.collection.sampling import MPSampling, fp_subnet, index_rng, mp_kind, mp_subnet, qat_seed
from apq_lightning.collection.store import (
    KINDS,
    MP_KINDS,
    SampleRecord,
    SampleStore,
    TornLineWarning,
    checkpoint_hash,
    merge_stores,
    read_samples,
    store_files,
)
from apq_lightning.collection.writer import SampleWriter, summarize

__all__ = [
    "FP_MODES",
    "KINDS",
    "MP_KINDS",
    "IndexDataset",
    "MPSampling",
    "SampleIndexDataModule",
    "SampleRecord",
    "SampleStore",
    "SampleWriter",
    "TornLineWarning",
    "cache_batches",
    "checkpoint_hash",
    "fp_subnet",
    "index_rng",
    "measure_fp",
    "merge_stores",
    "mp_kind",
    "mp_subnet",
    "qat_seed",
    "read_samples",
    "store_files",
    "store_path",
    "summarize",
    "top1",
]
