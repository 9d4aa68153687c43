"""Print what a run got, in one table, when fitting ends."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class MetricsSummary(L.Callback):
    """At fit end print the final logged metrics (and write them as JSON if ``out`` is set).

    Long runs scroll their progress bar away; this puts the answer last on the screen.
    """

    def __init__(self, prefix: str = "val/", out: str | None = None) -> None:
        self.prefix = prefix
        self.out = out

    def metrics(self, trainer: L.Trainer) -> dict[str, float]:
        return {
            k: float(v)
            for k, v in sorted(trainer.callback_metrics.items())
            if k.startswith(self.prefix) and getattr(v, "numel", lambda: 1)() == 1
        }

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = self.metrics(trainer)
        if not metrics:
            return
        width = max(len(k) for k in metrics)
        lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
        lines += [f"{k:<{width}}  {v:.4f}" for k, v in metrics.items()]
        ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") or getattr(
            trainer.checkpoint_callback, "last_model_path", ""
        )
        if ckpt:
            lines.append(f"checkpoint: {ckpt}")
        print("\n".join(["", f"== results after {trainer.current_epoch} epochs ==", *lines]), flush=True)
        if self.out:
            path = Path(self.out)
            path.parent.mkdir(parents=True, exist_ok=True)
            summary = {"epochs": trainer.current_epoch, "metrics": metrics, "checkpoint": ckpt}
            path.write_text(json.dumps(summary, indent=2))
