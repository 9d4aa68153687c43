"""Predicted-vs-true scatter of an accuracy predictor, written when fitting ends.

Pairwise accuracy, Kendall's τ and RMSE are single numbers; the scatter shows *where* a
predictor fails (a compressed range, a biased tail, one kind of sample off the diagonal), which
decides whether more samples, a ranking loss or a transfer would help.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from apq_lightning.metrics import arch_groups, predictor_metrics


@torch.no_grad()
def predict_split(
    pl_module: L.LightningModule, loader: torch.utils.data.DataLoader
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(preds, targets, architecture groups)`` of a ``(features, acc)`` loader, in eval mode, on
    the module's device (groups: :func:`~apq_lightning.metrics.arch_groups`)."""
    predictor = pl_module.predictor
    was_training = predictor.training
    predictor.eval()
    preds, targets, groups = [], [], []
    try:
        for x, y in loader:
            preds.append(predictor(x.to(pl_module.device)).float().cpu())
            targets.append(y.float().cpu())
            groups.append(arch_groups(x, predictor.encoder.fp_dim).cpu())
    finally:
        predictor.train(was_training)
    if not preds:
        return torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.float64)
    return torch.cat(preds), torch.cat(targets), torch.cat(groups)


def scatter_metrics(preds: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor | None = None) -> dict[str, float]:
    """The plot's numbers: the sample count and :func:`~apq_lightning.metrics.predictor_metrics`
    (with ``groups``: also the same- and different-architecture pairwise accuracy)."""
    return {"n": len(preds), **predictor_metrics(preds, targets, groups)}


class PredictorScatter(L.Callback):
    """At fit end, plot predicted vs true accuracy of one held-out split as a PNG (+ JSON).

    Args:
        out: PNG path; the numbers (metrics, and every ``[true, predicted]`` pair) go beside it
            as ``.json``.
        split: ``val`` or ``test`` (the datamodule's ``val_dataloader`` / ``test_dataloader``).
    """

    def __init__(self, out: str = "predictor_scatter.png", split: Literal["val", "test"] = "val") -> None:
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        self.out = out
        self.split = split

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(pl_module, "predictor"):
            return
        loader = dm.val_dataloader() if self.split == "val" else dm.test_dataloader()
        preds, targets, groups = predict_split(pl_module, loader)
        if len(preds) == 0:
            print(f"predictor scatter: the {self.split} split is empty, nothing to plot", flush=True)
            return
        groups = groups if pl_module.predictor.quantized else None  # FP samples: one policy per architecture
        self.write(preds, targets, title=f"{pl_module.predictor._name()}, {self.split} split", groups=groups)
        for logger in trainer.loggers:  # W&B shows the plot beside the run's curves
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"predictor/scatter_{self.split}", images=[str(self.out)])

    def write(self, preds: torch.Tensor, targets: torch.Tensor, title: str = "",
              groups: torch.Tensor | None = None) -> dict[str, float]:
        """Plot and save; returns the metrics (also usable without a trainer)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        m = scatter_metrics(preds, targets, groups)
        path = Path(self.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        t, p = targets.numpy(), preds.numpy()
        lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
        pad = 0.02 * (hi - lo or 1.0)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(t, p, s=14 if len(t) < 500 else 5, alpha=0.6, edgecolors="none")
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=0.8, ls="--")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("true accuracy")
        ax.set_ylabel("predicted accuracy")
        split = ""
        if "pairwise_acc_same_arch" in m:
            split = (f"\npairwise same arch {m['pairwise_acc_same_arch']:.3f} ({int(m['same_arch_pairs'])} pairs), "
                     f"different arch {m['pairwise_acc_diff_arch']:.3f}")
        ax.set_title(
            f"{title}\npairwise {m['pairwise_acc']:.3f}  τ {m['kendall_tau']:.3f}  RMSE {m['rmse']:.4f}  (n={m['n']})"
            + split, fontsize=9,
        )
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        payload = {"split": self.split, "metrics": m, "true_pred": [[float(a), float(b)] for a, b in zip(t, p)]}
        path.with_suffix(".json").write_text(json.dumps(payload))
        print(f"predictor scatter: {path} (pairwise {m['pairwise_acc']:.3f}, tau {m['kendall_tau']:.3f}, "
              f"rmse {m['rmse']:.4f})", flush=True)
        return m
