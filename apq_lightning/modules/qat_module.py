"""Quantization-aware finetuning of one subnet (stages 4 and 7 of APQ) as a LightningModule.

What one run does, in order (``on_fit_start``; also before ``validate``/``test`` when they are
run without a QAT checkpoint):

1. extract the subnet from the supernet (``supernet_ckpt``, a :class:`SupernetModule`
   checkpoint) and swap its convs / linear layer for quantized twins with the policy's bits
   (in ``__init__``, so checkpoints of this module load into the same structure);
2. re-calibrate BatchNorm on ``bn_calib_batches`` training batches (the statistics a supernet
   holds were accumulated over all subnets) and measure the float accuracy -> ``fp/acc``;
3. calibrate every quantization range (KL, ``calib_batches`` training batches) and measure the
   post-training-quantization accuracy -> ``ptq/acc``;
4. finetune with straight-through gradients (QAT), ranges fixed -> ``val/acc`` every
   validation, ``test/acc`` in ``test``.

``fp/acc`` and ``ptq/acc`` are measured on the validation loader (the held-out training images;
every rank evaluates all of it, so DDP ranks agree), reported on rank zero, and logged once
training starts.

Distillation (``kd_ratio > 0``): the teacher is, by default, **the full-precision subnet
itself** (``teacher="subnet"``: a frozen float copy taken after BatchNorm re-calibration, before
quantization). QAT's job is to recover what quantization lost, so the float version of the same
network is the natural target, and it costs one forward pass of a network of the student's size.
``teacher="largest"`` distils from the supernet's largest subnet instead (OFA / APQ's
supernet teacher; more expensive, and only useful with a trained supernet).

Export: :meth:`QATModule.save_quantized` (and ``export_path``, written when fitting ends) stores
the finetuned quantized model with its subnet JSON and quantization metadata
(:func:`apq_lightning.quant.save_quantized`); :func:`apq_lightning.quant.load_quantized` reads it
back with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from apq_lightning.layers import SubnetModel
from apq_lightning.metrics import top1
from apq_lightning.modules.common import DistilledTraining, calibration_batches, load_checked_supernet
from apq_lightning.quant import calibrate, check_method
from apq_lightning.quant.export import save_quantized
from apq_lightning.quant.subnet import apply_policy, clone_float, resolve_fixed_bits
from apq_lightning.space import Subnet, apply_named_policy, get_space, is_float_policy_name, load_subnet
from apq_lightning.supernet import Supernet, recalibrate_bn

RANDOM_INIT_WARNING = (
    "QATModule: no supernet_ckpt given -- finetuning a subnet of a RANDOMLY INITIALISED supernet; accuracies "
    "will be meaningless. Pass --model.supernet_ckpt runs/<supernet recipe>/checkpoints/last.ckpt"
)


def resolve_subnet(
    subnet: str | dict | Subnet | None, space: str | None, policy: str | None
) -> Subnet:
    """The subnet to finetune: a JSON path, an inline dict, a Subnet, or ``None`` = the space's
    largest; ``policy`` (a name such as ``uniform4``) replaces its bits. Raises ValueError when
    the result has no bit policy (say ``policy: float`` to finetune a float subnet on purpose)."""
    if isinstance(subnet, Subnet):
        sub = subnet
    elif isinstance(subnet, (str, Path, dict)):
        try:  # messages start with the argument's name: the CLI names the recipe key
            sub = load_subnet(subnet, space) if not isinstance(subnet, dict) else Subnet.from_dict(subnet, space)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"subnet: {err}") from None
    elif subnet is None:
        if space is None:
            raise ValueError(
                "QATModule: give `subnet` (a JSON path or dict) or `space` (then its largest subnet is used)"
            )
        sub = get_space(space).largest()
    else:
        raise ValueError(f"subnet must be a path, a dict or null, got {type(subnet).__name__}")
    if policy is not None:
        if sub.bits is not None and not is_float_policy_name(policy):
            rank_zero_warn(f"QATModule: policy={policy!r} replaces the subnet's own bit policy")
        sub = apply_named_policy(sub, policy)
        if is_float_policy_name(policy):
            return sub
    if sub.bits is None:
        raise ValueError(
            "QATModule: the subnet has no bit policy: add \"bits\" to the subnet JSON or set `policy` "
            "(e.g. --model.policy uniform8; `policy: float` finetunes the float subnet)"
        )
    return sub


class QATModule(DistilledTraining):
    """Quantize one subnet of a supernet, calibrate it and finetune it with QAT (see module doc).

    Args:
        supernet_ckpt: a ``SupernetModule`` checkpoint (loaded with ``weights_only=True``);
            ``None`` runs from a randomly initialised supernet, with a loud warning.
        space: the search space; ``None`` takes it from the checkpoint or the subnet JSON.
        num_classes: classifier outputs (linked from the datamodule by the CLI).
        subnet: path to a subnet JSON, an inline dict, or ``None`` (the largest subnet).
        policy: named policy replacing the subnet's bits (``uniform4``/``uniform6``/
            ``uniform8``, ``w4a8``, ``float``); ``None`` keeps the subnet's own bits.
        fixed_bits: stem / first block / head / classifier bits (``"space"`` = the space's, 8;
            ``None`` = float).
        calib_batches, calib_batch_size: quantizer calibration data (training images without
            augmentation; default batch size: the datamodule's).
        bn_calib_batches: BatchNorm re-calibration batches before anything else (0 = keep the
            checkpoint's statistics).
        method: range calibration, ``"kl"`` (APQ) or ``"minmax"``.
        per_channel: per-output-channel weight ranges.
        kd_ratio, kd_temperature, teacher: distillation weight, temperature and teacher
            (``"subnet"``: the float subnet; ``"largest"``: the supernet's largest subnet).
        eval_batches: cap on validation batches for ``fp/acc`` / ``ptq/acc`` (``None`` = all).
        export_path: write the final quantized model here when fitting ends.
    """

    def __init__(
        self,
        supernet_ckpt: str | None = None,
        space: str | None = None,
        num_classes: int = 10,
        subnet: str | dict | None = None,
        policy: str | None = None,
        fixed_bits: int | str | None = "space",
        calib_batches: int = 4,
        calib_batch_size: int | None = None,
        bn_calib_batches: int = 10,
        method: str = "kl",
        per_channel: bool = False,
        kd_ratio: float = 1.0,
        kd_temperature: float = 1.0,
        teacher: Literal["subnet", "largest"] = "subnet",
        label_smoothing: float = 0.0,
        dropout: float = 0.0,
        optimizer: str = "sgd",
        lr: float = 0.005,
        momentum: float = 0.9,
        weight_decay: float = 4e-5,
        warmup_epochs: float = 0.0,
        eval_batches: int | None = None,
        channels_last: bool = True,
        export_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_method(method)
        self.check_shared_hparams()
        if teacher not in ("subnet", "largest"):
            raise ValueError(f"teacher = {teacher!r}; allowed: 'subnet', 'largest'")
        if calib_batches < 1:
            raise ValueError(f"calib_batches must be >= 1 (quantization needs calibration data), got {calib_batches}")
        if bn_calib_batches < 0:
            raise ValueError(f"bn_calib_batches must be >= 0, got {bn_calib_batches}")
        if eval_batches is not None and (isinstance(eval_batches, bool) or not isinstance(eval_batches, int)
                                         or eval_batches < 1):
            raise ValueError(f"eval_batches must be an integer >= 1 or null (every batch), got {eval_batches!r}")

        supernet = self._load_supernet(supernet_ckpt, space, num_classes, dropout)
        self.subnet: Subnet = resolve_subnet(subnet, supernet.space.name, policy)
        supernet.space.check(self.subnet)
        self.fixed_bits = resolve_fixed_bits(supernet.space, fixed_bits)  # type: ignore[arg-type]
        model = supernet.extract(self.subnet)
        model.dropout.p = dropout
        self.model: SubnetModel = apply_policy(model, self.subnet, self.fixed_bits, method, per_channel)  # type: ignore[arg-type]
        if kd_ratio > 0 and teacher == "largest":
            self.set_teacher(supernet.extract(supernet.space.largest()))
        self.prepared = False
        self.prep_metrics: dict[str, float] = {}
        self._prep_logged = False
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    # ---- construction ----------------------------------------------------------------------
    @staticmethod
    def _load_supernet(ckpt: str | None, space: str | None, num_classes: int, dropout: float) -> Supernet:
        if ckpt is None:
            rank_zero_warn(RANDOM_INIT_WARNING)
            return Supernet(space or "apq_cifar", num_classes, dropout)
        return load_checked_supernet(ckpt, space, num_classes)

    def trained_network(self) -> nn.Module:
        return self.model

    # ---- preparation: BN re-calibration, FP accuracy, quantizer calibration, PTQ accuracy ----
    def _limit(self) -> int | None:
        trainer = self._trainer
        if trainer is not None and trainer.fast_dev_run:
            return 1
        return self.hparams.eval_batches

    def _eval_loader(self) -> Iterable | None:
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is None or not hasattr(dm, "val_dataloader"):
            return None
        loader = dm.val_dataloader()
        return loader if loader else None  # type: ignore[truthy-function]

    def evaluate(self, model: nn.Module, loader: Iterable, max_batches: int | None = None) -> float:
        """Top-1 accuracy of ``model`` (eval mode, channels_last as configured) over ``loader``."""
        return top1(model, loader, max_batches, self.device, self.hparams.channels_last)

    def prepare(self) -> dict[str, float]:
        """Steps 2-3 of the module docstring (idempotent; skipped after loading a QAT checkpoint)."""
        if self.prepared:
            return self.prep_metrics
        trainer = self._trainer
        h = self.hparams
        if trainer is not None and trainer.fast_dev_run:
            n_bn, n_cal = min(h.bn_calib_batches, 1), 1
        else:
            n_bn, n_cal = h.bn_calib_batches, h.calib_batches
        loader = self._eval_loader()
        metrics: dict[str, float] = {}
        if n_bn > 0:  # quantizers are still uncalibrated here, i.e. identities: float statistics
            recalibrate_bn(self.model, calibration_batches(trainer, n_bn, h.calib_batch_size))
            if self.teacher is not None:
                recalibrate_bn(self.teacher.to(self.device), calibration_batches(trainer, n_bn, h.calib_batch_size))
        if loader is not None:
            metrics["fp/acc"] = self.evaluate(self.model, loader, self._limit())
        if h.kd_ratio > 0 and h.teacher == "subnet":
            self.set_teacher(clone_float(self.model))
        calibrate(self.model, calibration_batches(trainer, n_cal, h.calib_batch_size), method=h.method,
                  num_batches=n_cal)
        if loader is not None:
            metrics["ptq/acc"] = self.evaluate(self.model, loader, self._limit())
        self.prepared = True
        self.prep_metrics = metrics
        self._report_prep(metrics)
        return metrics

    def _report_prep(self, metrics: dict[str, float]) -> None:
        if self.subnet.bits is None:
            bits = "float"
        else:
            used = {v for values in self.subnet.bits.to_dict().values() for v in values if v}
            bits = f"uniform {used.pop()}" if len(used) == 1 else "mixed"
        lines = [f"QAT of subnet {self.subnet.key()} ({self.subnet.space}, {len(self.subnet.active_blocks)} blocks, "
                 f"bits {bits}, fixed layers {self.fixed_bits or 'float'}):"]
        lines += [f"  {k:8s} {v:.4f}" for k, v in metrics.items()] or [
            "  (no validation data: accuracies not measured)"]
        rank_zero_info("\n".join(lines))

    def _log_prep(self) -> None:
        if self._prep_logged:
            return
        for k, v in self.prep_metrics.items():
            self.log(k, v, on_step=False, on_epoch=True, sync_dist=True)
        self._prep_logged = True

    def on_fit_start(self) -> None:
        self.prepare()
        self.place_teacher()

    def on_train_start(self) -> None:
        self._log_prep()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != "fit":
            self.prepare()

    def on_test_start(self) -> None:
        self.prepare()

    def on_validation_epoch_start(self) -> None:
        if self.trainer.state.fn == "validate":
            self._log_prep()

    def on_test_epoch_start(self) -> None:
        self._log_prep()

    # ---- QAT -------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = self.distilled_loss(logits, y, self.teacher_logits(x))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_acc.update(self.model(x), y)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_acc.update(self.model(x), y)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    # ---- checkpoints and export --------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["apq_qat"] = {
            "prepared": self.prepared,
            "subnet": self.subnet.to_dict(),
            "fixed_bits": self.fixed_bits,
            "metrics": dict(self.prep_metrics),
            # A resumed run skips prepare(), which made the teacher (the float copy after BN
            # re-calibration, or the largest subnet re-calibrated): it comes from here instead.
            "teacher": None if self.teacher is None else self.teacher.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("apq_qat", {})
        if state.get("subnet") is not None and Subnet.from_dict(state["subnet"]) != self.subnet:
            raise ValueError(
                "the checkpoint being resumed was finetuned for another subnet/policy than this module "
                f"was built with (checkpoint key {Subnet.from_dict(state['subnet']).key()}, this run "
                f"{self.subnet.key()}). Recipes with OnExceptionCheckpoint resume from their last.ckpt "
                "automatically: give this subnet its own run directory (the ModelCheckpoint and "
                "OnExceptionCheckpoint dirpath) or remove the old checkpoints."
            )
        self.prepared = bool(state.get("prepared", False))
        self.prep_metrics = dict(state.get("metrics", {}))
        self._prep_logged = True  # already logged by the run that measured them
        if self.prepared and state.get("teacher") is not None:
            teacher = self.teacher if self.teacher is not None else clone_float(self.model)
            teacher.load_state_dict(state["teacher"])
            self.set_teacher(teacher)

    def save_quantized(self, path: str | Path) -> Path:
        """Write the quantized model (state dict + subnet JSON + quantization metadata)."""
        if not self.prepared:
            raise ValueError("save_quantized: the model is not calibrated yet (fit, validate or prepare() first)")
        metrics = dict(self.prep_metrics)
        if self._trainer is not None:
            for k in ("val/acc", "test/acc"):
                v = self.trainer.callback_metrics.get(k)
                if v is not None:
                    metrics[k] = float(v)
        return save_quantized(self.model, path, {"metrics": metrics, "hparams": _plain(dict(self.hparams))})

    def on_fit_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            path = self.save_quantized(self.hparams.export_path)
            rank_zero_info(f"quantized model written to {path}")


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """Only values that ``torch.load(weights_only=True)`` accepts."""
    ok = (str, int, float, bool, type(None), list, dict, tuple)
    return {k: v for k, v in d.items() if isinstance(v, ok)}


__all__ = ["QATModule", "resolve_subnet"]
