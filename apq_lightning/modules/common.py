"""Pieces shared by the LightningModules: the checked supernet loader, losses, optimisers,
calibration data, and the base class of the two modules that train a network with distillation
(:class:`DistilledTraining`). The short QAT of sample collection is built from the same loss and
optimiser helpers, so a sample's QAT and a finetune follow one recipe."""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import islice
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from apq_lightning.space import get_space
from apq_lightning.supernet import Supernet
from apq_lightning.supernet_io import load_supernet


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Soft-target cross-entropy from a teacher's logits (once-for-all's KD term)."""
    t = temperature
    soft = F.softmax(teacher / t, dim=1)
    return -(soft * F.log_softmax(student / t, dim=1)).sum(dim=1).mean() * (t * t)


def distilled_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    kd_ratio: float,
    kd_temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy (with label smoothing) + ``kd_ratio`` x the distillation term (none without
    teacher logits): the training loss of every module that trains a network."""
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if teacher_logits is not None:
        loss = loss + kd_ratio * distillation_loss(logits, teacher_logits, kd_temperature)
    return loss


def load_checked_supernet(ckpt: str, space: str | None, num_classes: int) -> Supernet:
    """The supernet of a stage-1 checkpoint, checked against the run that loads it.

    Every error is one line starting with ``supernet_ckpt`` (the CLI names the recipe key): an
    unreadable or missing file, a checkpoint of another space than ``space`` (``None``: any),
    or of another number of classes than the data's.
    """
    try:
        net = load_supernet(ckpt)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"supernet_ckpt: {err}") from None
    if space is not None and get_space(space).name != net.space.name:
        raise ValueError(f"supernet_ckpt {ckpt} is for space {net.space.name!r}, but space={space!r}")
    if net.num_classes != num_classes:
        raise ValueError(f"supernet_ckpt {ckpt} has {net.num_classes} classes, but the data has {num_classes}")
    return net


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


def sgd_cosine(
    params: nn.Module,
    optimizer: str,
    lr: float,
    weight_decay: float,
    momentum: float,
    total_steps: int,
    warmup_steps: int = 0,
) -> tuple[torch.optim.Optimizer, CosineLRScheduler]:
    """timm optimiser (no decay on BN/bias) + a cosine over ``total_steps`` optimiser steps down to
    ``lr / 1000``, after a linear warm-up from ``lr / 100`` over ``warmup_steps``; the scheduler
    is stepped with ``step_update(num_updates=step)``."""
    opt = create_optimizer_v2(params, opt=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum)
    sched = CosineLRScheduler(
        opt, t_initial=max(1, total_steps), lr_min=lr * 1e-3, warmup_t=warmup_steps, warmup_lr_init=lr * 0.01,
        t_in_epochs=False,
    )
    return opt, sched


def configure_sgd_cosine(
    module: L.LightningModule,
    params: nn.Module,
    optimizer: str,
    lr: float,
    weight_decay: float,
    momentum: float,
    warmup_epochs: float,
) -> dict[str, Any]:
    """:func:`sgd_cosine` over the Trainer's optimiser steps, with ``warmup_epochs`` of warm-up."""
    total = max(1, int(module.trainer.estimated_stepping_batches))
    max_epochs = module.trainer.max_epochs or 1
    steps_per_epoch = max(1, total // max(1, max_epochs))
    warmup = min(int(warmup_epochs * steps_per_epoch), total - 1) if max_epochs > 0 else 0
    opt, sched = sgd_cosine(params, optimizer, lr, weight_decay, momentum, total, warmup)
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


SHARED_HPARAMS: tuple[str, ...] = (
    "space", "num_classes", "kd_ratio", "kd_temperature", "label_smoothing", "dropout", "optimizer", "lr",
    "momentum", "weight_decay", "warmup_epochs", "bn_calib_batches", "channels_last",
)
"""Constructor arguments (and hparams) that every :class:`DistilledTraining` module has."""


class DistilledTraining(L.LightningModule):
    """Base of :class:`~apq_lightning.modules.SupernetModule` and
    :class:`~apq_lightning.modules.QATModule`: one network trained with CE + KD from a frozen
    teacher, SGD with a per-step cosine schedule, NHWC memory layout.

    Each subclass keeps its own explicit constructor (recipes and checkpoints depend on its
    exact arguments), calls ``save_hyperparameters`` and then :meth:`check_shared_hparams`;
    the arguments of :data:`SHARED_HPARAMS` are read from ``self.hparams`` here. A subclass
    names the trained network in :meth:`trained_network`.

    The teacher is kept in a list, outside the module tree: it is not in the state dict, not
    wrapped by DDP and not moved by Lightning, so :meth:`place_teacher` puts it beside the model.
    """

    def __init__(self) -> None:
        super().__init__()
        self._teacher: list[nn.Module] = []

    def trained_network(self) -> nn.Module:
        """The network that is optimised (and converted to channels_last)."""
        raise NotImplementedError(f"{type(self).__name__} must say which network it trains (trained_network)")

    def check_shared_hparams(self) -> None:
        """Refuse bad shared settings at construction (messages name the argument)."""
        h = self.hparams
        check_training_args(kd_ratio=h.kd_ratio, kd_temperature=h.kd_temperature,
                            label_smoothing=h.label_smoothing, dropout=h.dropout)
        check_optimizer_args(lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay,
                             warmup_epochs=h.warmup_epochs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trained_network()(x)

    # ---- memory format -------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Before DDP wraps the model. NHWC makes depthwise convs (the bulk of an MBConv net's
        # time on CPU) ~3x faster to train; it is also the fast layout for mixed precision.
        if self.hparams.channels_last:
            self.trained_network().to(memory_format=torch.channels_last)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return to_channels_last(batch) if self.hparams.channels_last else batch

    # ---- teacher ---------------------------------------------------------------------------
    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def set_teacher(self, model: nn.Module | None) -> None:
        """Freeze ``model`` and make it the teacher (``None``: no teacher)."""
        if model is None:
            self._teacher.clear()
            return
        model.eval().requires_grad_(False)
        self._teacher[:] = [model]
        self.place_teacher()

    def place_teacher(self) -> None:
        """Put the teacher on the model's device, in the model's memory format."""
        if self.teacher is not None:
            self.teacher.to(self.device)
            if self.hparams.channels_last:
                self.teacher.to(memory_format=torch.channels_last)

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """The teacher's logits when distillation is on (``kd_ratio > 0`` and a teacher), else None."""
        if self.teacher is None or self.hparams.kd_ratio <= 0:
            return None
        with torch.no_grad():
            return self.teacher(x)

    def distilled_loss(self, logits: torch.Tensor, y: torch.Tensor,
                       teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy (with label smoothing) + ``kd_ratio`` x the distillation term."""
        h = self.hparams
        return distilled_loss(logits, y, teacher_logits, h.kd_ratio, h.kd_temperature, h.label_smoothing)

    # ---- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        return configure_sgd_cosine(self, self.trained_network(), h.optimizer, h.lr, h.weight_decay, h.momentum,
                                    h.warmup_epochs)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        scheduler.step_update(num_updates=self.global_step)


class PhaseCosineScheduler(Scheduler):
    """A cosine per progressive-shrinking phase, stepped per optimiser step.

    Why: each phase changes the task (new dimensions become elastic), and once-for-all trains
    each one as a run of its own, with its own peak rate. A schedule that restarts at phase
    boundaries also makes a run split at a boundary (continued from exported weights with
    ``start_phase``) train exactly like one run. ``bounds`` are the phases' last steps
    (exclusive), ``peaks`` their peak rates as multiples of each param group's base rate.
    A linear warm-up of ``warmup_steps`` starts the first phase only.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, bounds: list[int], peaks: list[float],
                 warmup_steps: int = 0, min_ratio: float = 1e-3) -> None:
        self.bounds, self.peaks = list(bounds), list(peaks)
        self.warmup_steps, self.min_ratio = int(warmup_steps), float(min_ratio)
        super().__init__(optimizer, "lr", t_in_epochs=False)

    def multiplier(self, t: int) -> float:
        """The factor on the base rate at optimiser step ``t``."""
        i = next((j for j, end in enumerate(self.bounds) if t < end), len(self.bounds) - 1)
        start, end, peak = (self.bounds[i - 1] if i else 0), self.bounds[i], self.peaks[i]
        length = max(1, end - start)
        pos = min(max(t - start, 0), length)
        low = peak * self.min_ratio
        if start == 0 and pos < self.warmup_steps:
            return peak * (0.01 + 0.99 * pos / self.warmup_steps)
        return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * pos / length))

    def _get_lr(self, t: int) -> list[float]:
        m = self.multiplier(t)
        return [v * m for v in self.base_values]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state but keep this run's schedule: the phase boundaries, peaks and warm-up
        come from the recipe (a resumed run whose recipe changed its phases follows the new ones)."""
        keep = {k: getattr(self, k) for k in ("bounds", "peaks", "warmup_steps", "min_ratio")}
        super().load_state_dict(state_dict)
        self.__dict__.update(keep)


def configure_sgd_phases(
    module: L.LightningModule,
    params: nn.Module,
    optimizer: str,
    lr: float,
    weight_decay: float,
    momentum: float,
    warmup_epochs: float,
    phase_epochs: list[int],
    phase_lrs: list[float],
) -> dict[str, Any]:
    """Like :func:`configure_sgd_cosine`, with one cosine per phase (:class:`PhaseCosineScheduler`)."""
    opt = create_optimizer_v2(params, opt=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    max_epochs = module.trainer.max_epochs or 1
    steps_per_epoch = max(1, total // max(1, max_epochs))
    bounds = list(np.cumsum([e * steps_per_epoch for e in phase_epochs]))
    warmup = min(int(warmup_epochs * steps_per_epoch), max(0, bounds[0] - 1))
    sched = PhaseCosineScheduler(opt, [int(b) for b in bounds], [p / lr for p in phase_lrs], warmup)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
