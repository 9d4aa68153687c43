"""Sample collection for APQ's predictors (stages 2 and 4) and the sample store.

* the sample store, one job per module: :mod:`~apq_lightning.collection.record` (the record
  format, its validation, parsing one line), :mod:`~apq_lightning.collection.store` (file naming
  ``samples.rank{r}.jsonl``, durable appends, repair of a torn last line, merging) and
  :mod:`~apq_lightning.collection.reading` ((incremental) reading, the checks that refuse mixing
  supernets, spaces or measurements);
* :mod:`~apq_lightning.collection.sampling` -- index -> subnet (and policy), a pure function of
  ``(seed, index)``;
* :mod:`~apq_lightning.collection.measure` -- cached images and the FP measurement (top-1 is
  :func:`apq_lightning.metrics.top1`);
* :class:`SampleWriter` -- the prediction writer: each record goes to disk as soon as it is
  measured.

Imports point one way: :mod:`apq_lightning.data` reads stores through these modules
(``SubnetSampleDataModule``) and holds the collection's DataModule
(:class:`~apq_lightning.data.SampleIndexDataModule`: sample indices, resuming, DDP shards, the
output-directory lock); nothing here imports :mod:`apq_lightning.data`. The LightningModules that
measure (``FPCollectionModule``, ``MPCollectionModule``) live in :mod:`apq_lightning.modules`
(they reuse QAT's loss); see ``docs/collection.md``.
"""

from apq_lightning.collection.measure import FP_MODES, cache_batches, measure_fp
from apq_lightning.collection.reading import (
    SameOrigin,
    StoreCursor,
    StoreRead,
    check_same_measurement,
    read_from,
    read_samples,
    store_files,
)
from apq_lightning.collection.record import KINDS, MP_KINDS, SampleRecord, TornLineWarning
from apq_lightning.collection.sampling import MPSampling, fp_subnet, index_rng, mp_kind, mp_subnet, qat_seed
from apq_lightning.collection.store import (
    STORE_GLOB,
    SampleStore,
    checkpoint_hash,
    merge_stores,
    rank_files,
    read_store_dir,
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
]
