"""Training an accuracy predictor (stages 3 and 5 of APQ) as a LightningModule.

Stage 3 trains the FP predictor on FP samples; stage 5 trains the MP predictor on MP samples,
starting from the FP one (``transfer_from``), which is what lets APQ get away with a few
thousand expensive quantization-aware samples. Data come from
:class:`~apq_lightning.data.SubnetSampleDataModule`.

Loss: mean squared error on accuracies in [0, 1] (APQ's), optionally with a pairwise ranking
term, since the search only uses the *order* of predictions: a logistic loss on every pair of
the batch with different true accuracies, ``softplus(-sign(t_i - t_j)·(p_i - p_j)/τ)``, whose
temperature ``τ`` (``ranking_temperature``, in accuracy units) sets which differences count as
confidently ordered.

Metrics on the held-out splits: ``val/pairwise_acc`` (APQ's), ``val/kendall_tau``, ``val/rmse``
(:func:`~apq_lightning.metrics.predictor_metrics` over the whole split, all ranks) and
``val/loss`` (``test/*`` likewise). Checkpoints hold plain hyper-parameters only and load
with ``torch.load(..., weights_only=True)``; :meth:`AccuracyPredictor.load` reads the predictor
out of them.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from apq_lightning.metrics import PredictorMetrics, arch_groups
from apq_lightning.predictor import AccuracyPredictor

LossName = Literal["mse", "ranking", "mse+ranking"]


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
        lr, weight_decay: Adam (docs/design.md §6.3: 1e-3, 1e-4).
        loss: ``mse`` (APQ), ``ranking`` or ``mse+ranking``.
        ranking_weight: weight of the ranking term in ``mse+ranking``.
        ranking_temperature: ``τ`` of the logistic ranking loss, in accuracy units.
        cosine: anneal the learning rate to 0 over ``max_epochs`` (per epoch); off = constant.
        base_acc: initial regressor bias; ``None`` = the datamodule's mean training accuracy
            (set in ``setup`` unless the predictor is transferred or the run resumes).
        transfer_from: FP predictor to start an MP predictor from (a ``.pt`` from
            :meth:`AccuracyPredictor.save` or a ``PredictorModule`` Lightning checkpoint); its
            weights are copied when fitting starts (``setup``, before Lightning restores a
            resumed run), ``quantize_fc`` starts at zero. Loading a finished module from its
            checkpoint never reads this file again.
    """

    def __init__(
        self,
        space: str = "apq_cifar",
        quantized: bool = False,
        hidden: int = 400,
        num_layers: int = 3,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        loss: LossName = "mse",
        ranking_weight: float = 1.0,
        ranking_temperature: float = 0.01,
        cosine: bool = True,
        base_acc: float | None = None,
        transfer_from: str | None = None,
    ) -> None:
        super().__init__()
        if loss not in ("mse", "ranking", "mse+ranking"):
            raise ValueError(f"loss={loss!r} is not allowed; allowed: 'mse', 'ranking', 'mse+ranking'")
        if ranking_temperature <= 0:
            raise ValueError(f"ranking_temperature must be > 0, got {ranking_temperature}")
        if transfer_from is not None and not quantized:
            raise ValueError("transfer_from starts an MP predictor: set quantized=true (or transfer_from=null)")
        self.save_hyperparameters()
        self.predictor = AccuracyPredictor(space, quantized, hidden, num_layers, base_acc or 0.0)
        self._transfer_pending = transfer_from is not None
        self._bias_fixed = base_acc is not None or transfer_from is not None
        self.val_metrics = PredictorMetrics()
        self.test_metrics = PredictorMetrics()

    # ---- setup -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        self._check_data(dm)
        # A resumed run needs no check here: Lightning restores the checkpoint after ``setup``.
        if stage == "fit" and self._transfer_pending:
            self.predictor.transfer_from(self.hparams.transfer_from)
            self._transfer_pending = False
            rank_zero_info(f"MP predictor starts from the FP predictor {self.hparams.transfer_from} (quantize_fc = 0)")
        if stage != "fit" or self._bias_fixed:
            return
        mean = getattr(dm, "train_mean", None)
        if mean is not None:
            with torch.no_grad():
                self.predictor.regressor.bias.fill_(float(mean))
            rank_zero_info(f"predictor regressor bias = mean training accuracy {float(mean):.4f}")
        self._bias_fixed = True

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
        mse = F.mse_loss(pred, target) if "mse" in name else None
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

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        epochs = self.trainer.max_epochs if self.trainer is not None else None
        if not self.hparams.cosine or not epochs or epochs < 1:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
