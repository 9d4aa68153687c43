"""The transfer study's report: per-cell mean ± std over seeds, a Markdown table and a plot."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np

from apq_lightning.metrics import PREDICTOR_METRICS
from apq_lightning.study.config import INITS


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(runs: list[dict]) -> list[dict]:
    """One cell per (size, loss, init): mean and std over seeds of every test metric."""
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        cells.setdefault((str(r["size"]), r["loss"], r["init"]), []).append(r)
    out = []
    for (_, loss, init), rs in cells.items():
        cell = {
            "size": rs[0]["size"],
            "loss": loss,
            "init": init,
            "n_runs": len(rs),
            "seeds": [r["seed"] for r in rs],
            "n_train": rs[0]["n_train"],
        }
        for m in PREDICTOR_METRICS:
            cell[f"{m}_mean"], cell[f"{m}_std"] = _mean_std([r["test"][m] for r in rs])
        out.append(cell)
    return out


def markdown(cells: list[dict], sizes: list, losses: list[str], info: dict) -> str:
    """The size × (loss, init) table of mean ± std test pairwise accuracy; the best init in bold."""
    idx = {(str(c["size"]), c["loss"], c["init"]): c for c in cells}
    head = ["MP train samples"] + [f"{loss} {init}" for loss in losses for init in INITS]
    lines = [
        f"Test pairwise accuracy (mean ± std over seeds {info['seeds']}) on {info['n_test']} held-out MP samples, "
        f"space `{info['space']}`; FP predictor: {info['fp_n_train']} FP samples, "
        f"test pairwise {info['fp_test_pairwise']:.3f}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---:|" * len(head),
    ]
    for size in sizes:
        n_train = next((c["n_train"] for c in cells if str(c["size"]) == str(size)), None)
        row = [f"{size} ({n_train})" if size == "all" else str(n_train if n_train is not None else size)]
        for loss in losses:
            vals = {i: idx.get((str(size), loss, i)) for i in INITS}
            best = max((v["pairwise_acc_mean"] for v in vals.values() if v), default=float("nan"))
            for init in INITS:
                c = vals[init]
                if c is None:
                    row.append("–")
                    continue
                text = f"{c['pairwise_acc_mean']:.3f} ± {c['pairwise_acc_std']:.3f}"
                row.append(f"**{text}**" if c["pairwise_acc_mean"] == best and len(vals) > 1 else text)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(cells: list[dict], losses: list[str], info: dict, path: Path) -> None:
    """Pairwise accuracy vs. MP training samples: one colour per loss, solid = transfer, dashed =
    scratch, ± std bands over seeds; log x when the sizes span a factor of 4 or more."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"transfer": "-", "scratch": "--"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for li, loss in enumerate(losses):
        for init in INITS:
            cs = sorted((c for c in cells if c["loss"] == loss and c["init"] == init), key=lambda c: c["n_train"])
            if not cs:
                continue
            xs = np.array([c["n_train"] for c in cs], dtype=float)
            mu = np.array([c["pairwise_acc_mean"] for c in cs])
            sd = np.array([c["pairwise_acc_std"] for c in cs])
            color = colors[li % len(colors)]
            ax.plot(
                xs,
                mu,
                linestyle=styles[init],
                marker="o" if init == "transfer" else "s",
                color=color,
                label=f"{init} ({loss})",
            )
            ax.fill_between(xs, mu - sd, mu + sd, color=color, alpha=0.15 if init == "transfer" else 0.08)
    ns = sorted({c["n_train"] for c in cells})
    if len(ns) > 1 and ns[0] > 0 and ns[-1] / ns[0] >= 4:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("MP training samples")
    ax.set_ylabel("test pairwise accuracy")
    ax.set_title(f"Predictor transfer, {info['space']} ({info['n_test']} test samples, ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
