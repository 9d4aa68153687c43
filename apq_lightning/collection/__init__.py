"""Sample collection for APQ's predictors (stages 2 and 4) and the sample store.

* :mod:`~apq_lightning.collection.store` -- the sample store, in one place: the record format,
  file naming (``samples.rank{r}.jsonl``), durable appends, repair of a torn last line,
  (incremental) reading, the checks that refuse mixing supernets, spaces or measurements, merging;
* :mod:`~apq_lightning.collection.sampling` -- index -> subnet (and policy), a pure function of
  ``(seed, index)``;
* :mod:`~apq_lightning.collection.measure` -- cached images, top-1, the FP measurement;
* :class:`SampleWriter` -- the prediction writer: each record goes to disk as soon as it is
  measured.

Imports point one way: :mod:`apq_lightning.data` reads stores through this package's ``store``
(``SubnetSampleDataModule``) and holds the collection's DataModule
(:class:`~apq_lightning.data.SampleIndexDataModule`: sample indices, resuming, DDP shards, the
output-directory lock); nothing here imports :mod:`apq_lightning.data`. The LightningModules that
measure (``FPCollectionModule``, ``MPCollectionModule``) live in :mod:`apq_lightning.modules`
(they reuse QAT's loss); see ``docs/collection.md``.
"""

from apq_lightning.collection.measure import FP_MODES, cache_batches, measure_fp, top1
from apq_lightning.collection.sampling import MPSampling, fp_subnet, index_rng, mp_kind, mp_subnet, qat_seed
from apq_lightning.collection.store import (
    KINDS,
    MP_KINDS,
    STORE_GLOB,
    SameOrigin,
    SampleRecord,
    SampleStore,
    StoreCursor,
    StoreRead,
    TornLineWarning,
    check_same_measurement,
    checkpoint_hash,
    merge_stores,
    rank_files,
    read_from,
    read_samples,
    read_store_dir,
    store_files,
    store_path,
)
from apq_lightning.collection.writer import SampleWriter, summarize

__all__ = [
    "FP_MODES",
    "KINDS",
    "MP_KINDS",
    "STORE_GLOB",
    "MPSampling",
    "SameOrigin",
    "SampleRecord",
    "SampleStore",
    "SampleWriter",
    "StoreCursor",
    "StoreRead",
    "TornLineWarning",
    "cache_batches",
    "check_same_measurement",
    "checkpoint_hash",
    "fp_subnet",
    "index_rng",
    "measure_fp",
    "merge_stores",
    "mp_kind",
    "mp_subnet",
    "qat_seed",
    "rank_files",
    "read_from",
    "read_samples",
    "read_store_dir",
    "store_files",
    "store_path",
    "summarize",
    "top1",
]
