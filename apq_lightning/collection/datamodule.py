"""The DataModule of sample collection: sample *indices* to predict, plus the images to measure on.

``trainer.predict`` iterates over sample indices ``0 … num_samples-1``; the collection module
turns each into a subnet (``(seed, index)``, :mod:`~apq_lightning.collection.sampling`) and
measures it. The images -- training batches for BatchNorm re-calibration, quantizer calibration
and QAT; the held-out split of the training images for evaluation -- come from the
:class:`~apq_lightning.data.ImageDataModule` this class extends, so a recipe configures them with
the same keys as every other stage (``data.init_args.root``, ``dataset``, ``batch_size`` ...).

Resuming: indices whose records already sit in ``output_dir`` (any ``samples.rank*.jsonl``,
from any earlier world size) are left out, so rerunning the same command after a crash or
``kill -9`` measures exactly the missing ones. The records must be of the same measurement
(space, supernet checkpoint, seed, protocol); an ``output_dir`` holding samples of another one
is refused instead of silently mixed.

Sharding: under DDP, rank ``r`` of ``W`` gets every ``W``-th remaining index, without padding,
so no index is measured twice and ``W`` processes collect ``W`` times faster. The shard is cut
here (set ``trainer.use_distributed_sampler: false``, as the recipes do); with Lightning's
distributed sampler left on, the full list is handed over and Lightning's unpadded predict
sampler cuts the very same shards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from torch.utils.data import DataLoader, Dataset

from apq_lightning.collection.store import SampleRecord, read_samples
from apq_lightning.data.datamodule import ImageDataModule  # the submodule: apq_lightning.data imports the store

__all__ = ["IndexDataset", "SampleIndexDataModule", "SampleIdentity", "store_path"]


def store_path(output_dir: str | Path, rank: int) -> Path:
    """The store file of one process: ``<output_dir>/samples.rank{rank}.jsonl``."""
    return Path(output_dir) / f"samples.rank{rank}.jsonl"


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
        output_dir: where the store files ``samples.rank{r}.jsonl`` are written (by
            :class:`~apq_lightning.collection.SampleWriter`) and read back for resuming.
        resume: skip indices already in ``output_dir`` (``False``: refuse a non-empty one).
        **image_kwargs: everything :class:`ImageDataModule` takes (dataset, root, batch_size, ...).
    """

    def __init__(
        self,
        num_samples: int = 100,
        output_dir: str = "runs/collect",
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
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.done: set[int] = set()
        self.todo: list[int] = []
        # Near the end of a resumed run some ranks may have nothing left to measure.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    # ---- which indices ----------------------------------------------------------------------
    def existing_records(self) -> list[SampleRecord]:
        files = sorted(self.output_dir.glob("samples.rank*.jsonl")) if self.output_dir.is_dir() else []
        files = [f for f in files if f.stat().st_size > 0]
        return read_samples(files) if files else []

    def plan(self, identity: dict[str, Any] | None) -> list[int]:
        """All indices still to collect (not yet in ``output_dir``), ascending."""
        records = self.existing_records()
        if records and not self.resume:
            raise ValueError(
                f"output_dir {str(self.output_dir)!r} already holds {len(records)} samples and resume=false; "
                "choose another output_dir or remove its samples.rank*.jsonl"
            )
        if identity is not None:
            for r in records:
                _check_same_measurement(r, identity, self.output_dir)
        self.done = {r.index for r in records}
        self.todo = [i for i in range(self.num_samples) if i not in self.done]
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
            print(
                f"sample collection: {len(self.done)} of {self.num_samples} samples already in "
                f"{self.output_dir}, {len(todo)} to collect" + (f" on {world} processes" if world > 1 else ""),
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


def _check_same_measurement(r: SampleRecord, identity: dict[str, Any], output_dir: Path) -> None:
    """Raise unless record ``r`` was measured exactly as this run measures (same store)."""

    def refuse(what: str, theirs: Any, ours: Any) -> None:
        raise ValueError(
            f"{output_dir} already holds samples measured with another {what} (index {r.index}: "
            f"{theirs}; this run: {ours}); use another output_dir, or rerun with the settings of "
            "the stored samples"
        )

    if r.space != identity["space"]:
        refuse("space", r.space, identity["space"])
    if r.supernet_hash != identity["supernet_hash"]:
        refuse("supernet checkpoint (supernet_hash)", r.supernet_hash, identity["supernet_hash"])
    if r.seed != identity["seed"]:
        refuse("seed", r.seed, identity["seed"])
    if r.kind not in identity["kinds"]:
        refuse("stage (kind)", r.kind, "/".join(identity["kinds"]))
    ours = identity["protocol"]
    if r.protocol != ours:
        diff = sorted(k for k in set(r.protocol) | set(ours) if r.protocol.get(k) != ours.get(k))
        theirs_txt = json.dumps({k: r.protocol.get(k) for k in diff})
        ours_txt = json.dumps({k: ours.get(k) for k in diff})
        refuse("protocol", theirs_txt, ours_txt)
