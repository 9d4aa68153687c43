"""Pieces shared by the LightningModules: losses, optimisers, calibration data, evaluation."""

from __future__ import annotations

import math
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


_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    # name: (low, high, low included, high included)
    "lr": (0.0, math.inf, False, False),
    "momentum": (0.0, 1.0, True, True),
    "weight_decay": (0.0, math.inf, True, False),
    "warmup_epochs": (0.0, math.inf, True, False),
    "kd_ratio": (0.0, math.inf, True, False),
    "kd_temperature": (0.0, math.inf, False, False),
    "label_smoothing": (0.0, 1.0, True, False),
    "dropout": (0.0, 1.0, True, False),
}
_MIN_INTS: dict[str, int] = {"subnets_per_step": 1, "num_random_eval": 0, "bn_calib_batches": 1}


def _check_number(name: str, value: Any) -> None:
    low, high, low_in, high_in = _RANGES[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if low_in else value > low) and (value <= high if high_in else value < high)
    if not ok:
        lo, hi = ("[" if low_in else "("), ("]" if high_in else ")")
        raise ValueError(f"{name} must be a number in {lo}{low:g}, {high:g}{hi}, got {value!r}")


def check_optimizer_args(**values: Any) -> None:
    """Refuse optimiser settings at construction (``lr: -0.1`` would otherwise fail only when
    fitting starts, inside torch). Messages start with the argument's name, which the CLI
    turns into the recipe key (``model.init_args.lr``)."""
    for name, value in values.items():
        _check_number(name, value)


def check_training_args(**values: Any) -> None:
    """Like :func:`check_optimizer_args` for loss / sampling settings and integer counts."""
    for name, value in values.items():
        if name in _MIN_INTS:
            low = _MIN_INTS[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        else:
            _check_number(name, value)


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
