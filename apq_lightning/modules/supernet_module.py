"""Progressive shrinking (stage 1) as a LightningModule.

Training runs through *phases* given in the recipe (:mod:`apq_lightning.modules.phases`), each
making one more dimension elastic: full network → elastic kernel → elastic depth (e.g. {3,4}
then {2,3,4}) → elastic width (coarse then fine). Every step samples ``subnets_per_step``
subnets from the current phase's choices, runs each on the batch and distils from the full
network (CE + λ·KD).

Under DDP every rank must activate the same subnet at a given step (otherwise gradients of
different architectures would be averaged): the sampler is seeded from ``(seed, global_step)``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from apq_lightning.layers import SubnetModel
from apq_lightning.modules.common import (
    DistilledTraining,
    calibration_batches,
    check_training_args,
    configure_sgd_phases,
)
from apq_lightning.modules.phases import Phase, as_phases, resolve_phase, sample_from
from apq_lightning.quant.supernet import QFA_RANGES, quantize_supernet, reestimate_supernet
from apq_lightning.space import Subnet, get_space
from apq_lightning.space.policy_sampling import sample_policy
from apq_lightning.supernet import Supernet, bn_param, recalibrate_bn, set_bn_param
from apq_lightning.supernet_io import load_supernet


class SupernetModule(DistilledTraining):
    """Trains a :class:`Supernet` with progressive shrinking + in-place distillation."""

    def __init__(
        self,
        space: str = "apq_cifar",
        num_classes: int = 10,
        phases: list[Phase] | None = None,
        subnets_per_step: int = 2,
        kd_ratio: float = 1.0,
        kd_temperature: float = 1.0,
        label_smoothing: float = 0.1,
        dropout: float = 0.0,
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 4e-5,
        warmup_epochs: float = 0.0,
        num_random_eval: int = 2,
        bn_calib_batches: int = 10,
        seed: int = 0,
        channels_last: bool = True,
        lr_schedule: Literal["run", "phase"] = "run",
        start_phase: int = 0,
        init_weights: str | None = None,
        quant_ranges: Literal["batch", "running"] = "batch",
    ) -> None:
        super().__init__()
        try:
            self.space = get_space(space)
        except ValueError as err:
            raise ValueError(f"space: {err}") from None
        all_phases = as_phases(phases)
        # Plain dicts in the checkpoint so that it loads with weights_only=True.
        self.save_hyperparameters(ignore=["phases"])
        self.hparams["phases"] = [asdict(p) for p in all_phases]
        if quant_ranges not in QFA_RANGES:
            raise ValueError(f"quant_ranges must be one of {', '.join(QFA_RANGES)} (the activation ranges the "
                             f"quant phase trains with), got {quant_ranges!r}")
        if lr_schedule not in ("run", "phase"):
            raise ValueError(f"lr_schedule must be 'run' (one cosine over the run) or 'phase' (one per phase), "
                             f"got {lr_schedule!r}")
        if isinstance(start_phase, bool) or not isinstance(start_phase, int) or not 0 <= start_phase < len(all_phases):
            raise ValueError(f"start_phase must be an integer in [0, {len(all_phases) - 1}] (an index into "
                             f"phases), got {start_phase!r}")
        if start_phase > 0 and init_weights is None:
            raise ValueError(f"start_phase={start_phase} skips phases {[p.name for p in all_phases[:start_phase]]}, "
                             f"whose result must come from init_weights (a supernet weights file or checkpoint)")
        # The phases this run trains: a run may continue another one at a phase boundary from
        # its exported weights, so that only a small weights file has to survive between machines.
        self.phases = all_phases[start_phase:]
        check_training_args(subnets_per_step=subnets_per_step, num_random_eval=num_random_eval,
                            bn_calib_batches=bn_calib_batches)
        self.check_shared_hparams()
        try:
            self._choices = [resolve_phase(p, self.space) for p in self.phases]
        except ValueError as err:
            raise ValueError(f"phases: {err}") from None
        self.supernet = Supernet(self.space, num_classes, dropout)
        if init_weights is not None:
            self._load_init_weights(init_weights)
        rng = np.random.default_rng([seed, 7919])
        self.eval_subnets: dict[str, Subnet] = {"largest": self.space.largest(), "smallest": self.space.smallest()}
        for j in range(num_random_eval):
            self.eval_subnets[f"random_{j}"] = self.space.sample(rng)
        self.val_acc = nn.ModuleDict({k: MulticlassAccuracy(num_classes, average="micro") for k in self.eval_subnets})
        self._phase_seen = -1
        self._eval_models: dict[str, nn.Module] = {}

    def trained_network(self) -> nn.Module:
        return self.supernet

    def _load_init_weights(self, path: str) -> None:
        """Start from a trained supernet (weights file or stage-1 checkpoint) of the same space."""
        try:
            net = load_supernet(path)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"init_weights: {err}") from None
        if net.space.name != self.space.name or net.num_classes != self.hparams.num_classes:
            raise ValueError(f"init_weights: {path} holds a {net.space.name} supernet with {net.num_classes} "
                             f"classes; this run trains {self.space.name} with {self.hparams.num_classes}")
        self.supernet.load_state_dict(net.state_dict())
        set_bn_param(self.supernet, **bn_param(net))  # e.g. the APQ reference's eps 1e-3, kept by every checkpoint

    def configure_optimizers(self) -> dict[str, Any]:
        if self.hparams.lr_schedule == "run":
            return super().configure_optimizers()
        h = self.hparams
        peaks = [p.lr if p.lr is not None else h.lr for p in self.phases]
        return configure_sgd_phases(self, self.supernet, h.optimizer, h.lr, h.weight_decay, h.momentum,
                                    h.warmup_epochs, [p.epochs for p in self.phases], peaks)

    # ---- phases --------------------------------------------------------------------------
    @property
    def total_phase_epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    def phase_index(self, epoch: int | None = None) -> int:
        """Phase of an epoch; the last phase continues if training runs longer."""
        epoch = self.current_epoch if epoch is None else epoch
        end = 0
        for i, p in enumerate(self.phases):
            end += p.epochs
            if epoch < end:
                return i
        return len(self.phases) - 1

    def on_fit_start(self) -> None:
        self.place_teacher()  # a teacher restored from a checkpoint was built on the CPU
        max_epochs = self.trainer.max_epochs
        total = self.total_phase_epochs
        if max_epochs is None or max_epochs < 0 or max_epochs == total or self.trainer.fast_dev_run:
            return
        if max_epochs < total:
            rank_zero_warn(
                f"trainer.max_epochs={max_epochs} ends before the phases' {total} epochs; phases from epoch "
                f"{max_epochs} on will not run (leave trainer.max_epochs unset to train them all)"
            )
        else:
            rank_zero_warn(
                f"trainer.max_epochs={max_epochs} is longer than the phases' {total} epochs; the last phase "
                f"({self.phases[-1].name!r}) continues for {max_epochs - total} more"
            )

    def on_train_epoch_start(self) -> None:
        idx = self.phase_index()
        if idx != self._phase_seen:
            self._enter_phase(idx)

    def _enter_phase(self, idx: int) -> None:
        phase = self.phases[idx]
        if phase.name == "width":
            # Put the most important channels first before slicing widths; momentum buffers
            # would no longer match the permuted weights, so the optimiser state is reset.
            self.supernet.sort_channels()
            for opt in self.trainer.optimizers:
                opt.state.clear()
        if self._choices[idx].elastic and self.hparams.kd_ratio > 0 and self.teacher is None:
            # One fixed teacher: the full network as trained so far (normally by the 'full'
            # phase). Its BN statistics are re-estimated first: the supernet's running stats
            # will be mixed over many subnets from here on.
            teacher = self.supernet.extract(self.space.largest())
            recalibrate_bn(teacher, calibration_batches(self.trainer, self.hparams.bn_calib_batches))
            self.set_teacher(teacher)
        if phase.name == "quant":
            self.quantize_for_all()
        self._phase_seen = idx
        rank_zero_info(f"progressive shrinking: phase {idx} ({phase.name}) from epoch {self.current_epoch}")

    # ---- training ------------------------------------------------------------------------
    def step_rng(self, j: int = 0) -> np.random.Generator:
        """Same generator on every rank for a given (seed, global step, sub-step)."""
        return np.random.default_rng([self.hparams.seed, self.global_step, j])

    def sample_training_subnet(self, j: int = 0) -> Subnet:
        phase = self.phases[self.phase_index()]
        rng = self.step_rng(j)
        if phase.name == "quant" and phase.sandwich and j == 0:
            subnet = self.space.largest()
        else:
            subnet = sample_from(self._choices[self.phase_index()], self.space, rng)
        if phase.name == "quant":
            subnet = subnet.with_bits(sample_policy(self.space, rng, phase.sampler))
        return subnet

    # ---- quantized-for-all -----------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        return getattr(self.supernet, "_apq_quant", None) is not None

    def quantize_for_all(self) -> None:
        """Put batch-range quantizers into the supernet (once; the quant phase trains through them)."""
        if not self.quantized:
            quantize_supernet(self.supernet, ranges=self.hparams.quant_ranges)
            if self.hparams.channels_last:
                self.supernet.to(memory_format=torch.channels_last)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        idx = self.phase_index()
        elastic = self._choices[idx].elastic
        teacher_logits = self.teacher_logits(x) if elastic else None  # the full network needs no teacher
        n = self.hparams.subnets_per_step if elastic else 1
        total = 0.0
        for j in range(n):
            self.supernet.set_active(self.sample_training_subnet(j))
            total = total + self.distilled_loss(self.supernet(x), y, teacher_logits) / n
        self.log("train/loss", total, prog_bar=True)
        self.log("train/phase", float(idx))
        return total

    # ---- validation: largest, smallest and fixed random subnets, BN re-calibrated ----------
    def on_validation_epoch_start(self) -> None:
        self._eval_models = {}
        if self.quantized:  # quant phase: the subnets at uniform low bits, scored as qfa samples are
            self._quantized_eval_models()
            return
        for name, subnet in self.eval_subnets.items():
            model = self.supernet.extract(subnet)
            if self.hparams.channels_last:
                model.to(memory_format=torch.channels_last)
            recalibrate_bn(model, calibration_batches(self.trainer, self.hparams.bn_calib_batches))
            self._eval_models[name] = model.eval()

    def _quantized_eval_models(self) -> None:
        low = min(self.space.bit_choices)
        for name, subnet in self.eval_subnets.items():
            model = copy.deepcopy(self.supernet)
            model.set_active(subnet.with_bits(self.space.uniform_policy(low)))
            reestimate_supernet(model, calibration_batches(self.trainer, self.hparams.bn_calib_batches))
            self._eval_models[name] = model.eval()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for name, model in self._eval_models.items():
            self.val_acc[name].update(model(x), y)

    def on_validation_epoch_end(self) -> None:
        accs = {}
        for name, metric in self.val_acc.items():
            accs[name] = metric.compute()
            metric.reset()
            self.log(f"val/acc_{name}", accs[name], prog_bar=name in ("largest", "smallest"))
        self.log("val/acc_mean", torch.stack(list(accs.values())).mean())
        self._eval_models = {}

    # ---- checkpoints ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["apq_phase_seen"] = self._phase_seen
        checkpoint["apq_quantized"] = self.quantized
        checkpoint["apq_batchnorm"] = bn_param(self.supernet)  # not in the state dict; load_supernet reads it
        if self.teacher is not None:
            checkpoint["apq_teacher"] = {
                "subnet": self.teacher.subnet.to_dict(),
                "state_dict": self.teacher.state_dict(),
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._phase_seen = int(checkpoint.get("apq_phase_seen", -1))
        if checkpoint.get("apq_quantized"):  # before Lightning loads the state dict: it holds the ranges
            self.quantize_for_all()
        if checkpoint.get("apq_batchnorm") is not None:
            set_bn_param(self.supernet, **checkpoint["apq_batchnorm"])
        teacher = checkpoint.get("apq_teacher")
        if teacher is not None:
            model = SubnetModel(Subnet.from_dict(teacher["subnet"]), self.hparams.num_classes)
            model.load_state_dict(teacher["state_dict"])
            self.set_teacher(model)


__all__ = ["SupernetModule"]
