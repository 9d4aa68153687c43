"""Training an accuracy predictor (stages 3 and 5 of APQ) as a LightningModule.

Stage 3 trains the FP predictor on FP samples; stage 5 trains the MP predictor on MP samples,
starting from the FP one (``transfer_from``), which is what lets APQ get away with a few
thousand expensive quantization-aware samples. Data come from
:class:`~apq_lightning.data.SubnetSampleDataModule`.

Loss: mean squared error (APQ's), optionally with a pairwise ranking term, since the search
only uses the *order* of predictions: a logistic loss on every pair of the batch with different
true accuracies, ``softplus(-sign(t_i - t_j)·(p_i - p_j)/τ)``, whose temperature ``τ``
(``ranking_temperature``, in accuracy units) sets which differences count as confidently ordered.

Why the training is what it is (docs/predictor.md §5 has the measurements): a 300k-weight MLP
fitted for 150 full-batch epochs to ~100 MP samples memorises their label noise (training RMSE
0.0009 against 0.0105 of noise on the CIFAR store) and forgets the FP ranking it was transferred
from. So, by default:

* **Standardised targets.** The MSE is on z-scores, ``((p - y)/σ)²`` with ``σ`` the training
  accuracies' standard deviation, and the output layers (the regressor, a bit head) are
  parametrised in z units: their initial weights are scaled by ``σ`` and AdamW steps them with
  ``lr·σ`` (``eps/σ``, weight decay ``wd/σ``, none on their biases). That is *exactly* training a
  network on ``(y - μ)/σ`` and reading ``μ + σ·z`` (Adam is invariant to the loss scale;
  tested), while the weights stay in accuracy units, so checkpoints, the APQ layout and the
  search's scorer are unchanged. Without it, one Adam step moves a prediction by about ``lr``
  in accuracy units -- a fixed share of a 0.016 spread, whatever the store.
* **AdamW** (decoupled weight decay) instead of Adam's L2 term.
* **Training length in steps** (the trainer's ``max_steps``), validation every few steps on
  an architecture-grouped split of sensible size (the datamodule's minimums), **early
  stopping** by Lightning's ``EarlyStopping`` on ``val/loss``, and the **best weights
  restored** when fitting ends (``best_monitor``), before the last checkpoint is written.
* **Transfer keeps the FP ranking.** With ``transfer_from`` only the bit part learns
  (``train_transferred=False``); with ``bit_features="head"`` that is ``4·B + 1`` numbers.

Metrics on the held-out splits: ``val/pairwise_acc`` (APQ's), ``val/kendall_tau``, ``val/rmse``
(:func:`~apq_lightning.metrics.predictor_metrics` over the whole split, all ranks) and
``val/loss`` (``test/*`` likewise). Checkpoints hold plain hyper-parameters only and load
with ``torch.load(..., weights_only=True)``; :meth:`AccuracyPredictor.load` reads the predictor
out of them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from apq_lightning.metrics import PredictorMetrics, arch_groups
from apq_lightning.predictor import BIT_FEATURES, AccuracyPredictor

LossName = Literal["mse", "ranking", "mse+ranking"]
OptimizerName = Literal["adamw", "adam"]

APQ_TRAINING: dict[str, Any] = {"bit_features": "onehot", "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4,
                                 "standardize": False, "train_transferred": True, "best_monitor": None}
"""The arguments that train as the APQ reference (and this project's recipes before issue 15):
one-hot bits, Adam with L2 weight decay on accuracies, the whole transferred network trained,
the last weights kept; with 150 epochs of batch 256 and per-epoch cosine decay in the trainer."""

MONITOR_MODES: dict[str, str] = {"val/loss": "min", "val/rmse": "min", "val/pairwise_acc": "max",
                                 "val/kendall_tau": "max"}
"""What ``best_monitor`` may watch, and whether lower or higher is better."""


def pairwise_ranking_loss(preds: torch.Tensor, target: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Logistic loss over all pairs with different targets: mean ``softplus(-s_ij·(p_i - p_j)/τ)``
    with ``s_ij = sign(t_i - t_j)``; zero when the batch has no such pair."""
    dp = (preds[:, None] - preds[None, :]) / temperature
    sign = torch.sign(target[:, None] - target[None, :])
    mask = torch.triu(sign != 0, diagonal=1)
    if not mask.any():
        return preds.sum() * 0.0
    return F.softplus(-sign[mask] * dp[mask]).mean()


class PredictorModule(L.LightningModule):
    """Fit an :class:`AccuracyPredictor` to measured samples (see the module docstring).

    Args:
        space: search space of the samples (must match the datamodule's).
        quantized: ``False`` = FP predictor (stage 3), ``True`` = MP predictor (stage 5).
        hidden, num_layers: MLP size (APQ: 400, 3).
        bit_features: how the MP predictor reads the bits (:data:`~apq_lightning.predictor.BIT_FEATURES`).
        optimizer: ``adamw`` (decoupled weight decay) or ``adam`` (L2 in the gradient, the
            recipes' choice before issue 15; with ``standardize=False`` it reproduces them).
        lr, weight_decay: learning rate and weight decay of the optimizer.
        loss: ``mse`` (APQ), ``ranking`` or ``mse+ranking``.
        ranking_weight: weight of the ranking term in ``mse+ranking``.
        ranking_temperature: ``τ`` of the logistic ranking loss, in accuracy units.
        cosine: anneal the learning rate to 0 over the trainer's ``max_steps`` (per step) or,
            without it, ``max_epochs`` (per epoch); off = constant.
        standardize: train on standardised targets (module docstring); ``False`` = on accuracies.
        target_std: the ``σ`` of the standardisation; ``None`` = the datamodule's ``train_std``.
        base_acc: initial regressor bias; ``None`` = the datamodule's mean training accuracy
            (set in ``setup`` unless the predictor is transferred or the run resumes).
        transfer_from: FP predictor to start an MP predictor from (a ``.pt`` from
            :meth:`AccuracyPredictor.save` or a ``PredictorModule`` Lightning checkpoint); its
            weights are copied when fitting starts (``setup``, before Lightning restores a
            resumed run), the bit part starts at zero. Loading a finished module from its
            checkpoint never reads this file again.
        train_transferred: with ``transfer_from``, also train the transferred FP weights;
            ``False`` = only the bit part learns from the MP samples and the FP ranking is kept.
        best_monitor: a validation metric of :data:`MONITOR_MODES`; the predictor's weights at
            its best validation are restored when fitting ends (with early stopping, or at
            ``max_steps``). ``None`` = keep the last weights.
    """

    def __init__(
        self,
        space: str = "apq_cifar",
        quantized: bool = False,
        hidden: int = 400,
        num_layers: int = 3,
        bit_features: str = "head",
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        loss: LossName = "mse",
        ranking_weight: float = 1.0,
        ranking_temperature: float = 0.01,
        cosine: bool = True,
        standardize: bool = True,
        target_std: float | None = None,
        base_acc: float | None = None,
        transfer_from: str | None = None,
        train_transferred: bool = False,
        best_monitor: str | None = "val/loss",
    ) -> None:
        super().__init__()
        if loss not in ("mse", "ranking", "mse+ranking"):
            raise ValueError(f"loss={loss!r} is not allowed; allowed: 'mse', 'ranking', 'mse+ranking'")
        if optimizer not in ("adamw", "adam"):
            raise ValueError(f"optimizer={optimizer!r} is not allowed; allowed: 'adamw', 'adam'")
        if ranking_temperature <= 0:
            raise ValueError(f"ranking_temperature must be > 0, got {ranking_temperature}")
        if target_std is not None and not target_std > 0:
            raise ValueError(f"target_std must be > 0 or null (the training accuracies' std), got {target_std}")
        if best_monitor is not None and best_monitor not in MONITOR_MODES:
            raise ValueError(
                f"best_monitor={best_monitor!r} is not allowed; allowed: {', '.join(MONITOR_MODES)} or null"
            )
        if bit_features not in BIT_FEATURES:
            raise ValueError(f"bit_features={bit_features!r} is not allowed; allowed: {', '.join(BIT_FEATURES)}")
        if transfer_from is not None and not quantized:
            raise ValueError("transfer_from starts an MP predictor: set quantized=true (or transfer_from=null)")
        self.save_hyperparameters()
        self.predictor = AccuracyPredictor(space, quantized, hidden, num_layers, base_acc or 0.0, bit_features)
        self._transfer_pending = transfer_from is not None
        self._transferred = False
        self._bias_fixed = base_acc is not None or transfer_from is not None
        self._scale_fixed = not standardize  # output layers start in z units (scaled by σ) once, in setup
        self._sigma = float(target_std) if standardize and target_std is not None else 1.0
        self._best: dict[str, Any] | None = None  # value, step and predictor weights of the best validation
        self.val_metrics = PredictorMetrics()
        self.test_metrics = PredictorMetrics()

    # ---- setup -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        self._check_data(dm)
        # A resumed run needs no check here: Lightning restores the checkpoint after ``setup``.
        if stage == "fit" and self._transfer_pending:
            self.transfer(self.hparams.transfer_from)
            rank_zero_info(f"MP predictor starts from the FP predictor {self.hparams.transfer_from} (bit part = 0)")
        if stage != "fit":
            return
        self._standardize(dm)
        if self._bias_fixed:
            return
        mean = getattr(dm, "train_mean", None)
        if mean is not None:
            with torch.no_grad():
                self.predictor.regressor.bias.fill_(float(mean))
            rank_zero_info(f"predictor regressor bias = mean training accuracy {float(mean):.4f}")
        self._bias_fixed = True

    def transfer(self, fp: AccuracyPredictor | str | Path) -> PredictorModule:
        """Start the MP predictor from an FP predictor (object or file), as ``transfer_from`` does
        when fitting starts: shared weights copied, the bit part at zero, and (unless
        ``train_transferred``) only the bit part trained. Returns ``self``."""
        self.predictor.transfer_from(fp)
        self._transfer_pending = False
        self._transferred = True
        self._bias_fixed = True  # the FP predictor's bias (and output scale) are kept
        self._scale_fixed = True
        return self

    def _standardize(self, dm: Any) -> None:
        """``σ`` from the datamodule (unless given) and, once, the output layers' initial weights
        in z units (scaled by ``σ``); a transferred predictor keeps the FP predictor's."""
        if not self.hparams.standardize:
            return
        if self.hparams.target_std is None:
            std = getattr(dm, "train_std", None)
            if std is None:
                raise ValueError("standardize=true needs target_std or a datamodule with train_std")
            if not std > 0:
                raise ValueError(f"the training accuracies have standard deviation {std}: nothing to standardise by; "
                                 "set target_std, or standardize=false")
            self._sigma = float(std)
        if not self._scale_fixed:
            with torch.no_grad():
                for layer in self.predictor.output_layers():
                    layer.weight.mul_(self._sigma)
            self._scale_fixed = True
            rank_zero_info(f"standardised targets: sigma = {self._sigma:.4f} (output layers in z units)")

    def _check_data(self, dm: Any) -> None:
        """Fail before training when the datamodule serves another space or encoding."""
        if dm is None:
            return
        space, quantized = getattr(dm, "space", None), getattr(dm, "quantized", None)
        if space is not None and space != self.predictor.space:
            raise ValueError(f"the samples are of space {space!r}, the predictor is for space {self.predictor.space!r}")
        if quantized is not None and bool(quantized) != self.predictor.quantized:
            want = "true" if self.predictor.quantized else "false"
            raise ValueError(
                f"data.quantized={quantized} but model.quantized={self.predictor.quantized}: the "
                f"{'MP' if self.predictor.quantized else 'FP'} predictor needs data.quantized={want}"
            )

    # ---- steps -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(x)

    def _loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        name = self.hparams.loss
        mse = F.mse_loss(pred, target) / self._sigma**2 if "mse" in name else None  # of z-scores
        if name == "mse":
            return mse
        rank = pairwise_ranking_loss(pred, target, self.hparams.ranking_temperature)
        return rank if mse is None else mse + self.hparams.ranking_weight * rank

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self._loss(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metrics: PredictorMetrics) -> None:
        x, y = batch
        pred = self(x)
        self.log(f"{stage}/loss", self._loss(pred, y), on_epoch=True, prog_bar=stage == "val", batch_size=len(y),
                 sync_dist=True)
        metrics.update(pred, y, arch_groups(x, self.predictor.encoder.fp_dim))

    def _log_metrics(self, stage: str, metrics: PredictorMetrics) -> None:
        """The epoch's ranking metrics: pairs span the whole split, so they are computed once at its end."""
        if not metrics.update_called:
            return
        values = metrics.compute()  # synchronised across ranks: every rank logs the same numbers
        metrics.reset()
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    # ---- the best weights ----------------------------------------------------------------
    def on_validation_end(self) -> None:
        """Keep the predictor's weights of the best validation so far; restore them when an
        ``EarlyStopping`` callback (whose hook ran just before this one) stops the fit."""
        monitor = self.hparams.best_monitor
        if monitor is None or self.trainer.sanity_checking or self.trainer.state.fn != "fit":
            return
        value = self.trainer.callback_metrics.get(monitor)
        if value is None or not math.isfinite(float(value)):
            return
        value = float(value)
        best = self._best["value"] if self._best is not None else None
        if best is None or (value < best if MONITOR_MODES[monitor] == "min" else value > best):
            state = {k: v.detach().clone() for k, v in self.predictor.state_dict().items()}
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                       if k.startswith("val/") and getattr(v, "numel", lambda: 1)() == 1}
            self._best = {"value": value, "step": int(self.trainer.global_step), "state": state, "metrics": metrics}
        if self.trainer.should_stop:
            self._restore_best()

    def on_train_epoch_end(self) -> None:
        # Runs before the checkpoint callbacks' hooks: the last checkpoint holds the restored weights.
        t = self.trainer
        ends = t.should_stop or 0 < t.max_steps <= t.global_step or (
            t.max_epochs is not None and 0 <= t.max_epochs <= t.current_epoch + 1)
        if ends:
            self._restore_best()

    def on_train_end(self) -> None:
        self._restore_best()  # any other way out of the loop (a callback's stop after the checkpoints)

    def _restore_best(self) -> None:
        if self._best is None or self._best.get("restored"):
            return
        self.predictor.load_state_dict(self._best["state"])
        self._best["restored"] = True
        if self._trainer is not None:  # what a summary reads at fit end then describes these weights
            self.trainer.callback_metrics.update({k: torch.tensor(v) for k, v in self._best.get("metrics", {}).items()})
        rank_zero_info(f"predictor: restored the weights of step {self._best['step']} "
                       f"({self.hparams.best_monitor} {self._best['value']:.4f})")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["predictor_sigma"] = self._sigma  # the loss's scale, for test/loss of a loaded module
        if self._best is not None:  # a resumed run goes on comparing with (and can restore) the best so far
            checkpoint["predictor_best"] = dict(self._best)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hp = checkpoint.get("hyper_parameters", {})
        if self.predictor.quantized and "bit_features" not in hp and self.predictor.bit_features != "onehot":
            # a checkpoint of before bit_features holds APQ's one-hot layout: build that one to load it into
            p = self.predictor
            self.predictor = AccuracyPredictor(p.space, True, p.hidden, p.num_layers, bit_features="onehot")
            self.hparams.bit_features = "onehot"
        self._sigma = float(checkpoint.get("predictor_sigma", self._sigma))
        self._best = checkpoint.get("predictor_best")

    # ---- optimiser -----------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        opt = self._optimizer()
        trainer = self.trainer
        steps = trainer.max_steps if trainer is not None and trainer.max_steps > 0 else None
        epochs = trainer.max_epochs if trainer is not None else None
        if not self.hparams.cosine or not (steps or (epochs and epochs >= 1)):
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps or epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step" if steps else "epoch"}}

    def _optimizer(self) -> torch.optim.Optimizer:
        """Adam(W) over the trained parameters; the output layers in z units (module docstring):
        ``lr·σ``, ``eps/σ``, weight decay ``wd/σ`` on their weights and none on their biases."""
        hp, sigma = self.hparams, self._sigma
        params = [p for m in self._trained_modules() for p in m.parameters()]
        trained = {id(p) for p in params}
        for p in self.predictor.parameters():  # frozen weights: no gradients to compute
            p.requires_grad_(id(p) in trained)
        if hp.optimizer == "adam" and not hp.standardize:  # the recipes before issue 15, exactly
            return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        out = {id(p) for m in self.predictor.output_layers() for p in m.parameters()}
        base = [p for p in params if id(p) not in out]
        groups = [{"params": base, "lr": hp.lr, "weight_decay": hp.weight_decay}] if base else []
        for layer in self.predictor.output_layers():
            if id(layer.weight) in trained:
                z_units = {"lr": hp.lr * sigma, "eps": 1e-8 / sigma}
                groups.append({"params": [layer.weight], "weight_decay": hp.weight_decay / sigma, **z_units})
                groups.append({"params": [layer.bias], "weight_decay": 0.0, **z_units})
        cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
        return cls(groups, lr=hp.lr)

    def _trained_modules(self) -> list[nn.Module]:
        """The whole predictor, or after a transfer without ``train_transferred`` its bit part."""
        if self._transferred and not self.hparams.train_transferred:
            return self.predictor.bit_layers()
        return [self.predictor]
