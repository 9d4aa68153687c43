"""The DataModule of sample collection: sample *indices* to predict, plus the images to measure on.

``trainer.predict`` iterates over sample indices ``0 … num_samples-1``; the collection module
turns each into a subnet (``(seed, index)``, :mod:`~apq_lightning.collection.sampling`) and
measures it. The images -- training batches for BatchNorm re-calibration, quantizer calibration
and QAT; the held-out split of the training images for evaluation -- come from the
:class:`~apq_lightning.data.ImageDataModule` this class extends, so a recipe configures them with
the same keys as every other stage (``data.init_args.root``, ``dataset``, ``batch_size`` ...).
The store itself (naming, reading, checks) is :mod:`apq_lightning.collection`'s (``record``,
``store``, ``reading``); this module only uses it (``data`` -> ``collection``, never the other way).

One run per directory: the launching process (rank 0) locks ``output_dir``
(:class:`~apq_lightning.locks.RunLock`, ``.collection.lock``) when the datamodule is built,
before any index is planned, and holds it until predicting ends; a second ``apq predict`` on the
same directory is refused with one line naming the holder (pid, host, command). The kernel drops
the lock of a killed process, so a ``kill -9`` never blocks the rerun. Other DDP ranks write
their own rank files under rank 0's lock.

Resuming: indices whose records already sit in ``output_dir`` (any ``samples.rank*.jsonl``,
from any earlier world size) are left out, so rerunning the same command after a crash or
``kill -9`` measures exactly the missing ones. The records must be of the same measurement
(space, supernet checkpoint, seed, protocol); an ``output_dir`` holding samples of another one
is refused instead of silently mixed, and so is a rank file that is not a sample store.

Sharding: under DDP, rank ``r`` of ``W`` gets every ``W``-th remaining index, without padding,
so no index is measured twice and ``W`` processes collect ``W`` times faster. The shard is cut
here (set ``trainer.use_distributed_sampler: false``, as the recipes do); with Lightning's
distributed sampler left on, the full list is handed over and Lightning's unpadded predict
sampler cuts the very same shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from apq_lightning.collection.reading import check_same_measurement
from apq_lightning.collection.record import SampleRecord
from apq_lightning.collection.store import SampleStore, rank_files, read_store_dir, store_path
from apq_lightning.data.datamodule import ImageDataModule
from apq_lightning.locks import RunLock

__all__ = ["IndexDataset", "SampleIdentity", "SampleIndexDataModule"]


class SampleIdentity(Protocol):
    """What a collection module tells the datamodule about the samples it produces."""

    def sample_identity(self) -> dict[str, Any]:
        """``{"space", "supernet_hash", "seed", "protocol", "kinds"}`` of this run's records."""
        ...


class IndexDataset(Dataset):
    """A fixed list of sample indices."""

    def __init__(self, indices: list[int]) -> None:
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> int:
        return self.indices[i]


def _collate_indices(batch: list[int]) -> list[int]:
    return [int(i) for i in batch]


class SampleIndexDataModule(ImageDataModule):
    """Sample indices for ``trainer.predict`` + the images of :class:`ImageDataModule`.

    Args:
        num_samples: collect indices ``0 … num_samples-1`` (raising it later and rerunning
            collects only the new ones).
        indices: collect exactly these indices instead (e.g. re-measure chosen samples of one
            store under another protocol: the same seed and sampling give the same subnets).
        output_dir: where the store files ``samples.rank{r}.jsonl`` are written (by
            :class:`~apq_lightning.collection.SampleWriter`) and read back for resuming; locked
            for this run (see the module docstring).
        resume: skip indices already in ``output_dir`` (``False``: refuse a non-empty one).
        **image_kwargs: everything :class:`ImageDataModule` takes (dataset, root, batch_size, ...).
    """

    def __init__(
        self,
        num_samples: int = 100,
        output_dir: str = "runs/collect",
        indices: list[int] | None = None,
        resume: bool = True,
        dataset: str = "digits",
        root: str | None = None,
        image_size: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        heldout_size: int | float | None = None,
        seed: int = 0,
        augment: bool = True,
        cache_dir: str | None = None,
        download: bool = False,
        train_subset: int | None = None,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if indices is not None:
            bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or i < 0]
            if not indices or bad:
                raise ValueError(f"indices must be a non-empty list of integers >= 0, got {indices!r}")
        if not output_dir:
            raise ValueError("output_dir must name a directory for the sample store (e.g. runs/collect_fp_tiny)")
        if dataset == "cifar10" and root is None and not download:
            raise ValueError(
                "data.init_args.root is not set: give the CIFAR-10 ImageFolder tree or its .tar.gz "
                "(--data.init_args.root PATH/cifar10-jpeg.tar.gz), or set data.init_args.download: true"
            )
        super().__init__(
            dataset=dataset,
            root=root,
            image_size=image_size,
            batch_size=batch_size,  # type: ignore[arg-type]
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            heldout_size=heldout_size,
            seed=seed,
            augment=augment,
            cache_dir=cache_dir,
            download=download,
            train_subset=train_subset,
        )
        self.num_samples = num_samples
        self.indices = None if indices is None else sorted(set(indices))
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.done: set[int] = set()
        self.todo: list[int] = []
        # Near the end of a resumed run some ranks may have nothing left to measure.
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self._lock = RunLock(self.output_dir, "collection")
        # Built by the CLI, before the trainer exists: the launching process claims the directory
        # now, so a refusal is one line and DDP workers are only started once it holds it. The
        # workers (LOCAL_RANK / RANK > 0 in their environment) write under its lock.
        if rank_zero_only.rank == 0:
            self.claim()

    # ---- the output directory ---------------------------------------------------------------
    def claim(self) -> None:
        """Lock ``output_dir`` for this run and check that its rank files are sample stores.

        Idempotent; raises ``ValueError`` naming the holder of the lock or the file that is not
        a store. Released when predicting ends (``teardown`` / ``on_exception``) or by
        :meth:`release`.
        """
        if self._lock.held:
            return
        self._lock.acquire()
        try:
            for path in rank_files(self.output_dir):
                SampleStore(path).check()
        except BaseException:
            self._lock.release()
            raise

    def release(self) -> None:
        self._lock.release()

    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        if stage == "predict" and trainer is not None and trainer.global_rank == 0:
            self.claim()  # a datamodule predicting again after a teardown
        super().setup(stage)

    def teardown(self, stage: str | None = None) -> None:
        if stage in (None, "predict"):
            self.release()

    def on_exception(self, exception: BaseException) -> None:
        self.release()

    # ---- which indices ----------------------------------------------------------------------
    def existing_records(self) -> list[SampleRecord]:
        return read_store_dir(self.output_dir)

    def plan(self, identity: dict[str, Any] | None) -> list[int]:
        """The indices still to collect, ascending: ``indices`` (else ``0 … num_samples-1``) not yet in
        ``output_dir``."""
        records = self.existing_records()
        if records and not self.resume:
            raise ValueError(
                f"output_dir {str(self.output_dir)!r} already holds {len(records)} samples and resume=false; "
                "choose another output_dir or remove its samples.rank*.jsonl"
            )
        if identity is not None:
            for r in records:
                check_same_measurement(r, identity, self.output_dir)
        self.done = {r.index for r in records}
        wanted = self.indices if self.indices is not None else range(self.num_samples)
        self.todo = [i for i in wanted if i not in self.done]
        return self.todo

    def predict_dataloader(self) -> DataLoader:
        """This process's share of the indices still to collect, one index per step."""
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        identity = module.sample_identity() if hasattr(module, "sample_identity") else None
        todo = self.plan(identity)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        lightning_shards = trainer is not None and world > 1 and trainer._accelerator_connector.use_distributed_sampler
        mine = todo if (world == 1 or lightning_shards) else todo[rank::world]
        if trainer is not None and trainer.is_global_zero:
            wanted = len(self.indices) if self.indices is not None else self.num_samples
            print(
                f"sample collection: {len(self.done)} samples already in "
                f"{self.output_dir}, {len(todo)} of the {wanted} wanted to collect"
                + (f" on {world} processes" if world > 1 else ""),
                flush=True,
            )
        return DataLoader(IndexDataset(mine), batch_size=1, shuffle=False, num_workers=0, collate_fn=_collate_indices)

    def store_path(self, rank: int) -> Path:
        return store_path(self.output_dir, rank)

    def __repr__(self) -> str:
        return (
            f"SampleIndexDataModule(num_samples={self.num_samples}, output_dir={str(self.output_dir)!r}, "
            f"images={super().__repr__()})"
        )

    __str__ = __repr__
