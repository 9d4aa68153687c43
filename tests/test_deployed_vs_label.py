"""benchmarks/deployed_vs_label.py: the choice of pairs and the rank statistics it reports."""

from __future__ import annotations

import numpy as np
import pytest
from _benchmarks import load_benchmark

dvl = load_benchmark("deployed_vs_label")


def _items(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"index": i, "latency_ms": float(rng.uniform(0.3, 1.3)), "mean_bits": float(rng.uniform(4, 8)),
             "feasible": bool(i % 5), "kind": "mp_random"} for i in range(n)]


def test_spanning_covers_latency_and_bits_and_skips_what_cannot_run():
    items = _items(400)
    chosen = dvl.spanning(items, 16)
    assert len(chosen) == 16 and len({c["index"] for c in chosen}) == 16
    assert all(c["feasible"] for c in chosen)
    assert chosen == dvl.spanning(items, 16)  # deterministic
    feasible = [it for it in items if it["feasible"]]
    for key in ("latency_ms", "mean_bits"):  # every quartile of both axes is represented
        edges = np.quantile([it[key] for it in feasible], [0.25, 0.5, 0.75])
        cells = set(np.searchsorted(edges, [c[key] for c in chosen]))
        assert cells == {0, 1, 2, 3}, key
    # a random draw of 16 would miss a quartile now and then; the grid never does
    with pytest.raises(SystemExit, match="only 8 deployable records"):
        dvl.spanning(_items(10), 16)


def test_spearman_and_its_bootstrap_interval():
    x = list(range(20))
    up = dvl.spearman_ci(x, [v**3 for v in x], reps=200)
    assert up["rho"] == pytest.approx(1.0) and up["ci_low"] == pytest.approx(1.0)
    down = dvl.spearman_ci(x, [-v for v in x], reps=200)
    assert down["rho"] == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    noisy = dvl.spearman_ci(x, list(np.array(x) + rng.normal(0, 8, 20)), reps=500)
    assert noisy["ci_low"] < noisy["rho"] < noisy["ci_high"] and noisy["ci_high"] - noisy["ci_low"] > 0.1
    d = dvl.paired_rho_difference(x, x, [-v for v in x], reps=200)
    assert d["diff"] == pytest.approx(2.0)


def test_choice_weighs_rank_agreement_against_cost():
    def res(rho, lo, s):
        return {"spearman": {"rho": rho, "ci_low": lo, "ci_high": 1.0}, "seconds_per_label": s}

    # within each other's interval: the cheaper one
    assert dvl.choose({"short_qat": res(0.80, 0.60, 9.0), "qfa": res(0.75, 0.5, 3.0)})[0] == "qfa"
    # clearly better: worth its cost
    assert dvl.choose({"short_qat": res(0.90, 0.80, 9.0), "qfa": res(0.40, 0.1, 3.0)})[0] == "short_qat"
    assert dvl.choose({"short_qat": res(0.50, 0.2, 9.0), "qfa": res(0.80, 0.6, 3.0)})[0] == "qfa"
