"""Search results as people read them: a PNG of accuracy vs cost and W&B-ready rows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apq_lightning.search.constraints import COST_METRICS
from apq_lightning.search.result import Candidate, SearchResult

TABLE_COLUMNS: list[str] = ["constraint", "rank", "predicted_acc", *COST_METRICS, "depths", "subnet"]


def table_rows(results: Sequence[SearchResult]) -> list[list[Any]]:
    """One row per returned subnet of every search (for ``WandbLogger.log_table``)."""
    import json

    rows = []
    for r in results:
        for rank, c in enumerate(r.results, 1):
            rows.append([str(r.budget), rank, c.predicted_acc, c.latency_ms, c.energy_mJ, c.bitops, c.size_bytes,
                         str(list(c.subnet.depths)), json.dumps(c.subnet.to_dict())])
    return rows


def plot_metric(results: Sequence[SearchResult]) -> str:
    """Latency when the hardware reports it, else the first budget metric."""
    for r in results:
        if np.isfinite(r.best.latency_ms):
            return "latency_ms"
    return results[0].budget.metrics[0] if results and results[0].budget else "bitops"


def plot_search(results: Sequence[SearchResult], path: str | Path, max_points: int = 20_000) -> Path:
    """Scatter of the scored candidates (a random subsample) and of the initial population, the
    non-dominated front, and each search's chosen subnets and budget line, accuracy vs latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = plot_metric(results)
    scale, label = {"latency_ms": (1.0, "latency (ms)"), "energy_mJ": (1.0, "energy (mJ)"),
                    "bitops": (1e-9, "GBitOps"), "size_bytes": (1e-6, "size (MB)")}[metric]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rng = np.random.default_rng(0)
    for i, r in enumerate(results):
        color = colors[i % len(colors)]
        s = r.samples
        if s:
            x, y = s[metric] * scale, s["predicted_acc"]
            ok = np.isfinite(x)
            idx = np.flatnonzero(ok)
            if len(idx) > max_points:
                idx = np.sort(rng.choice(idx, max_points, replace=False))
            ax.scatter(x[idx], y[idx], s=3, alpha=0.15, color=color, linewidths=0,
                       label=f"scored ({r.scored:,})" if i == 0 else None)
            first = np.flatnonzero(ok)[: r.settings.get("population", 100)]
            ax.scatter(x[first], y[first], s=8, color="grey", marker="x", linewidths=0.8,
                       label="initial population" if i == 0 else None)
        if r.front:
            fx = [getattr(c, metric) * scale for c in r.front]
            fy = [c.predicted_acc for c in r.front]
            ax.step(fx, fy, where="post", color=color, lw=1.2, label=f"front ({r.budget})")
        bx = [getattr(c, metric) * scale for c in r.results]
        by = [c.predicted_acc for c in r.results]
        ax.scatter(bx, by, s=40, marker="*", color=color, edgecolors="black", linewidths=0.5, zorder=5,
                   label=f"chosen ({r.budget})")
        if r.budget is not None and metric in r.budget.metrics:
            ax.axvline(r.budget.to_dict()[metric] * scale, color=color, ls="--", lw=0.8)
    ax.set_xlabel(f"{label} on {results[0].settings.get('hardware', '?')}" if results else label)
    ax.set_ylabel("predicted accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    mode = results[0].mode if results else "search"
    ax.set_title(f"{mode} search: predicted accuracy vs {label.split(' (')[0]}", fontsize=10)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def front_table(front: Sequence[Candidate], rows: int = 12) -> str:
    """A few evenly spaced points of a front."""
    if not front:
        return "(empty front)"
    step = max(1, len(front) // rows)
    lines = [f"{'pred.acc':>8} {'lat ms':>7} {'energy mJ':>9} {'GBitOps':>8}"]
    for c in list(front)[::step]:
        lines.append(f"{c.predicted_acc:8.4f} {c.latency_ms:7.3f} {c.energy_mJ:9.3f} {c.bitops / 1e9:8.2f}")
    return "\n".join(lines)
