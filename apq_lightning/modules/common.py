"""Pieces shared by the LightningModules: losses, optimisers, calibration data, evaluation."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Soft-target cross-entropy from a teacher's logits (once-for-all's KD term)."""
    t = temperature
    soft = F.softmax(teacher / t, dim=1)
    return -(soft * F.log_softmax(student / t, dim=1)).sum(dim=1).mean() * (t * t)


def configure_sgd_cosine(
    module: L.LightningModule,
    params: nn.Module,
    optimizer: str,
    lr: float,
    weight_decay: float,
    momentum: float,
    warmup_epochs: float,
) -> dict[str, Any]:
    """timm optimiser (no decay on BN/bias) + per-step cosine schedule with linear warm-up."""
    opt = create_optimizer_v2(params, opt=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    max_epochs = module.trainer.max_epochs or 1
    steps_per_epoch = max(1, total // max(1, max_epochs))
    warmup = min(int(warmup_epochs * steps_per_epoch), total - 1) if max_epochs > 0 else 0
    sched = CosineLRScheduler(
        opt, t_initial=total, lr_min=lr * 1e-3, warmup_t=warmup, warmup_lr_init=lr * 0.01, t_in_epochs=False
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def calibration_batches(trainer: L.Trainer | None, num_batches: int, batch_size: int | None = None) -> Iterator:
    """Training images without augmentation, identical on every rank (seeded subset).

    Uses the datamodule's ``calib_dataloader`` when it has one (our ``ImageDataModule``),
    else the first batches of the training loader.
    """
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    if dm is not None and hasattr(dm, "calib_dataloader"):
        return iter(dm.calib_dataloader(num_batches, batch_size=batch_size))
    if trainer is None:
        raise ValueError("no calibration data: pass batches explicitly or attach the module to a Trainer")
    return islice(iter(trainer.train_dataloader), num_batches)


def to_channels_last(batch: Any) -> Any:
    """``(images, labels)`` with the images in NHWC memory layout (a no-op for other tensors)."""
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor) and batch[0].dim() == 4:
        return type(batch)([batch[0].contiguous(memory_format=torch.channels_last), *batch[1:]])
    return batch
