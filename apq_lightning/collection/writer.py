"""The prediction writer of sample collection: every measured sample goes to disk at once.

``write_interval="batch"``: each predict step (one sample) is appended to this process's
store ``samples.rank{r}.jsonl`` and fsync'ed before the next sample starts, so killing the run
at any moment loses at most the sample being measured. At the end a summary is printed (count,
mean accuracy, seconds per sample) for this run and for the whole store.

The writer trusts its datamodule to hold the output directory (the
:class:`~apq_lightning.data.SampleIndexDataModule` locks it, so no second run appends the same
indices); it only reads the datamodule's ``output_dir`` attribute and imports nothing from
:mod:`apq_lightning.data`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException

from apq_lightning.collection.record import SampleRecord
from apq_lightning.collection.store import SampleStore, read_store_dir, store_path

__all__ = ["SampleWriter", "summarize"]


class SampleWriter(BasePredictionWriter):
    """Appends the :class:`SampleRecord` list each ``predict_step`` returns to the store.

    Args:
        output_dir: the store directory; ``None`` (the recipes) takes the datamodule's
            ``output_dir``, which is also where resuming looks, so the two cannot disagree.
        summary: print a summary when predicting ends.
    """

    def __init__(self, output_dir: str | None = None, summary: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.summary = summary
        self.store: SampleStore | None = None
        self.written: list[SampleRecord] = []
        self._t0 = 0.0

    def _resolve_dir(self, trainer: L.Trainer) -> Path:
        dm_dir = getattr(trainer.datamodule, "output_dir", None)
        if self.output_dir is None:
            if dm_dir is None:
                raise ValueError(
                    "SampleWriter: set output_dir, or use a datamodule with an output_dir "
                    "(apq_lightning.data.SampleIndexDataModule)"
                )
            return Path(dm_dir)
        if dm_dir is not None and Path(dm_dir).resolve() != self.output_dir.resolve():
            raise ValueError(
                f"SampleWriter output_dir {str(self.output_dir)!r} differs from the datamodule's output_dir "
                f"{str(dm_dir)!r}, where resuming looks for finished samples; leave the writer's output_dir null"
            )
        return self.output_dir

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        path = store_path(self._resolve_dir(trainer), trainer.global_rank)
        self.store = SampleStore(path)
        self.store.repair()  # a torn line from a killed run: moved aside before appending
        self.written = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        assert self.store is not None, "SampleWriter.setup did not run"
        records = prediction if isinstance(prediction, (list, tuple)) else [prediction]
        for rec in records:
            if not isinstance(rec, SampleRecord):
                raise ValueError(
                    f"predict_step must return SampleRecord objects for SampleWriter, got {type(rec).__name__}"
                )
            self.store.append(rec)
            self.written.append(rec)
        if trainer.received_sigterm:
            # Lightning's fit and evaluation loops stop on SIGTERM, its predict loop does not: a
            # collection would run on after `kill PID` for hours. Stop after the record just
            # written (rerunning the command resumes from the next index).
            raise SIGTERMException

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wall = time.perf_counter() - self._t0
        if self.store is not None:
            self.store.close()
        if not self.summary:
            return
        mine = summarize(self.written)
        per = f", {wall / len(self.written):.2f} s/sample wall" if self.written else ""
        who = f"[rank {trainer.global_rank}] " if trainer.world_size > 1 else ""
        print(f"{who}sample collection, this run: {mine}{per}", flush=True)
        # No barrier here: a rank whose shard was empty never enters the predict loop, so under
        # DDP rank 0 summarises the store as it stands (other ranks may still be finishing).
        if trainer.is_global_zero:
            out = self._resolve_dir(trainer)
            print(f"sample store {out}: {summarize(read_store_dir(out))}", flush=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.store is not None:
            self.store.close()


def summarize(records: Sequence[SampleRecord]) -> str:
    """``"120 samples (fp 120), mean acc 0.8312, 1.93 s/sample measured"``."""
    if not records:
        return "0 samples"
    kinds: dict[str, int] = {}
    for r in records:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    acc = sum(r.acc for r in records) / len(records)
    secs = [r.timing.get("total_s") for r in records if r.timing.get("total_s") is not None]
    kind_txt = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
    sec_txt = f", {sum(secs) / len(secs):.2f} s/sample measured" if secs else ""
    return f"{len(records)} samples ({kind_txt}), mean acc {acc:.4f}{sec_txt}"
