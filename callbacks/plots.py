"""Plot validation curves as a PNG when fitting ends (people would rather look than read)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class ValidationCurves(L.Callback):
    """Record every ``prefix*`` metric after each validation and plot them against the epoch.

    For progressive shrinking this shows how the largest, smallest and random subnets move as
    each phase opens a new elastic dimension; phase boundaries are drawn when the module has
    ``phases``. The numbers are written beside the plot as JSON.
    """

    def __init__(self, out: str = "validation_curves.png", prefix: str = "val/") -> None:
        self.out = out
        self.prefix = prefix
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_validation_epoch_end: callbacks run before the module's hook that logs them.
        if trainer.sanity_checking:
            return
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(self.prefix)}
        if row:
            self.history.append({"epoch": trainer.current_epoch, **row})

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(self.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted({k for row in self.history for k in row if k != "epoch"})
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            pts = [(r["epoch"], r[key]) for r in self.history if key in r]
            ax.plot(*zip(*pts), marker="o", ms=3, label=key[len(self.prefix):])
        start = 0
        for phase in getattr(pl_module, "phases", []):
            if start:
                ax.axvline(start - 0.5, color="grey", lw=0.8, ls="--")
            label = phase.name + "".join(
                f" {k}={v}" for k, v in (("depths", phase.depths), ("widths", phase.widths)) if v is not None
            )
            ax.annotate(label, (start - 0.45, 0.01), xycoords=("data", "axes fraction"), fontsize=7,
                        color="grey", rotation=90, va="bottom")
            start += phase.epochs
        ax.set_xlim(-0.6, max(start, self.history[-1]["epoch"] + 1) - 0.4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("top-1 accuracy (held-out)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        path.with_suffix(".json").write_text(json.dumps(self.history, indent=1))
        print(f"validation curves: {path}", flush=True)
