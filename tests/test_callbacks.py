"""Checkpoint callbacks: last.ckpt after every epoch, exception checkpoints only after progress."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from apq_lightning.callbacks import LastCheckpoint, ProgressExceptionCheckpoint


class _Worsening(L.LightningModule):
    """Its validation metric gets worse every epoch, so 'best' and 'last' differ."""

    def __init__(self, fail_at_step: int | None = None, fail_on_start: bool = False) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.fail_at_step = fail_at_step
        self.fail_on_start = fail_on_start

    def on_train_start(self) -> None:
        if self.fail_on_start:
            raise RuntimeError("broken before the first step")

    def training_step(self, batch, batch_idx):
        if self.fail_at_step is not None and self.global_step == self.fail_at_step:
            raise RuntimeError("broken mid-epoch")
        return self.net(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", 1.0 / (self.current_epoch + 1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)


def _trainer(tmp_path, epochs: int = 3) -> L.Trainer:
    ckpt = tmp_path / "ckpt"
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[
            ModelCheckpoint(dirpath=ckpt, monitor="val/acc", mode="max", filename="best"),
            LastCheckpoint(dirpath=str(ckpt)),
            ProgressExceptionCheckpoint(dirpath=str(ckpt)),
        ],
    )


def test_last_checkpoint_follows_every_epoch_while_best_stays(tmp_path):
    _trainer(tmp_path).fit(_Worsening(), _loader(), _loader())
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    best = torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 6)
    assert best["epoch"] == 0  # the metric only got worse
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_no_exception_checkpoint_before_progress(tmp_path):
    _trainer(tmp_path, epochs=1).fit(_Worsening(), _loader(), _loader())
    stamp = (tmp_path / "ckpt" / "last.ckpt").stat().st_mtime_ns
    with pytest.raises(RuntimeError, match="before the first step"):
        _trainer(tmp_path, epochs=2).fit(_Worsening(fail_on_start=True), _loader(), _loader(),
                                         ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert not (tmp_path / "ckpt" / "on_exception.ckpt").exists()
    assert (tmp_path / "ckpt" / "last.ckpt").stat().st_mtime_ns == stamp


def test_exception_checkpoint_after_progress(tmp_path):
    with pytest.raises(RuntimeError, match="mid-epoch"):
        _trainer(tmp_path).fit(_Worsening(fail_at_step=3), _loader(), _loader())
    saved = torch.load(tmp_path / "ckpt" / "on_exception.ckpt", weights_only=True)
    assert saved["global_step"] == 3
