"""The short QAT of one MP sample (stage 4): a few straight-through steps after calibration.

It is QATModule's recipe in miniature, built from the same pieces
(:mod:`apq_lightning.modules.common`): the loss is :func:`~apq_lightning.modules.common.distilled_loss`
(CE + ``kd_ratio`` × KD from the float subnet), the optimiser and schedule are
:func:`~apq_lightning.modules.common.sgd_cosine` (timm Nesterov SGD, no decay on BN/bias, a cosine
per step), and the settings are checked by the same functions. It runs as a plain loop inside
``predict_step``, not through a Trainer: thousands of samples of a few dozen steps each would
spend more time in a Trainer's set-up than in training.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from apq_lightning.modules.collection.base import check_count
from apq_lightning.modules.common import check_optimizer_args, check_training_args, distilled_loss, sgd_cosine


@dataclass(frozen=True)
class ShortQAT:
    """The settings of a sample's short QAT (MPCollectionModule's ``qat_*``, ``lr``, ... arguments);
    checked on construction, with messages naming those arguments."""

    steps: int = 60
    batch_size: int = 64
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 4e-5
    kd_ratio: float = 1.0
    kd_temperature: float = 1.0
    label_smoothing: float = 0.0

    OPTIMIZER = "sgd"  # timm's: Nesterov momentum
    """Not a setting: every sample of every store was trained with it."""

    def __post_init__(self) -> None:
        check_count("qat_steps", self.steps, 0)
        check_count("qat_batch_size", self.batch_size, 1)
        check_optimizer_args(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        check_training_args(kd_ratio=self.kd_ratio, kd_temperature=self.kd_temperature,
                            label_smoothing=self.label_smoothing)

    def protocol(self) -> dict[str, Any]:
        """The settings as a record's protocol stores them."""
        return {
            "qat_steps": self.steps,
            "qat_batch_size": self.batch_size,
            "optimizer": "sgd-nesterov, cosine per step",
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "kd_ratio": self.kd_ratio,
            "kd_temperature": self.kd_temperature,
            "label_smoothing": self.label_smoothing,
        }


def short_qat(
    model: nn.Module, teacher: nn.Module | None, batches: Iterable[Any], qat: ShortQAT, channels_last: bool = True
) -> int:
    """``qat.steps`` QAT steps on a calibrated quantized model; returns the number of steps run.

    Ranges stay fixed; gradients pass the fake quantizers straight through. ``teacher`` (the
    frozen float subnet) is used when ``qat.kd_ratio > 0``. The model is left in eval mode.
    """
    device = next(model.parameters()).device
    opt, sched = sgd_cosine(model, ShortQAT.OPTIMIZER, qat.lr, qat.weight_decay, qat.momentum, qat.steps)
    use_teacher = teacher is not None and qat.kd_ratio > 0
    model.train()
    done = 0
    with torch.enable_grad():
        for x, y in batches:
            if done >= qat.steps:
                break
            x, y = x.to(device), y.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x)
            with torch.no_grad():
                teacher_logits = teacher(x) if use_teacher else None
            loss = distilled_loss(logits, y, teacher_logits, qat.kd_ratio, qat.kd_temperature, qat.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            sched.step_update(num_updates=done)
    model.eval()
    return done
