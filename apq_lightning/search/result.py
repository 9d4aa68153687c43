"""What a search returns: ranked candidates with every cost, the curve, and a JSON form."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apq_lightning.outputs import write_json
from apq_lightning.search.constraints import COST_METRICS, Budget
from apq_lightning.space import Subnet


@dataclass(frozen=True)
class Candidate:
    """One subnet with its predicted accuracy and costs on the search's hardware."""

    subnet: Subnet
    predicted_acc: float
    latency_ms: float
    energy_mJ: float
    bitops: int
    size_bytes: float

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"subnet": self.subnet.to_dict(), "predicted_acc": self.predicted_acc}
        for m in COST_METRICS:
            v = getattr(self, m)
            out[m] = None if isinstance(v, float) and not math.isfinite(v) else v
        return out


@dataclass
class SearchResult:
    """Ranked subnets of one search (best first) and how it got there.

    ``history[t]`` is the best predicted accuracy after generation ``t`` (index 0: the initial
    population). ``samples`` holds (predicted accuracy, latency or the first budget metric) of
    everything scored, for plots; ``front`` the non-dominated ones among them.
    """

    mode: str
    budget: Budget | None
    best: Candidate
    results: list[Candidate]
    history: list[float]
    wall_time_s: float
    settings: dict[str, Any]
    scored: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    samples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    front: list[Candidate] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "best": self.best.to_dict(),
            "results": [c.to_dict() for c in self.results],
            "history": [float(h) if math.isfinite(h) else None for h in self.history],
            "wall_time_s": self.wall_time_s,
            "settings": {**self.settings, "mode": self.mode,
                         "constraint": None if self.budget is None else self.budget.to_dict(),
                         "scored": self.scored},
        }
        if self.front:
            out["front"] = [c.to_dict() for c in self.front]
        return out

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def table(self, rows: int = 5) -> str:
        """A short fixed-width table of the top ``rows`` results."""
        head = f"{'#':>2} {'pred.acc':>8} {'lat ms':>7} {'energy mJ':>9} {'GBitOps':>8} {'size MB':>7}  depths"
        lines = [head]
        for i, c in enumerate(self.results[:rows]):
            lines.append(f"{i + 1:>2} {c.predicted_acc:8.4f} {c.latency_ms:7.3f} {c.energy_mJ:9.3f} "
                         f"{c.bitops / 1e9:8.2f} {c.size_bytes / 1e6:7.3f}  {list(c.subnet.depths)}")
        return "\n".join(lines)
