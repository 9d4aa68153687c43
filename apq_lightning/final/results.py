"""The pipeline's results: one row per (budget, method) from a run folder's files, the table, the
paired differences to APQ, and the accuracy-vs-latency figure in the shape of APQ's Fig. 8.

Why paired: every finetuned method is tested on the same 10,000 test images, and seed ``k`` of
every method starts from the same random state, so ``acc_method(k) - acc_APQ(k)`` cancels what the
images and the seed share; its standard error over the seeds is what a margin must exceed.

Folders (written by :mod:`apq_lightning.stages` and ``apq baselines --finetune``): APQ's finetune
of budget ``B`` and its first seed in ``<out>/final/B``, its other seeds in ``<out>/final/B.seed<k>``,
its float reference in ``<out>/final/B.float``; the baselines' in ``<out>/baselines/B/baselines.json``
(their rows carry ``achieved_accs`` per seed and ``float_acc``).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from apq_lightning.metrics import pairwise_accuracy

Budget = float | str
"""A budget of the pipeline: a float is a BitFusion latency budget in ms; a string is one or more
constraints joined by ``+``, e.g. ``"latency_ms=0.7+energy_mJ=0.5"`` (``apq search --constraint``
each)."""

APQ = "APQ (joint search)"

RESULT_COLUMNS = ("method", "budget", "predicted top-1", "achieved top-1 (after QAT)", "latency ms", "energy mJ",
                  "GBitOps", "size kB", "search s")
OPTIONAL_COLUMNS = ("Δ vs APQ (paired ± SE)", "float top-1")
"""Shown when some row has them (several finetune seeds; a float reference)."""


# ---- budgets --------------------------------------------------------------------------------------
def budget_constraints(budget: Budget) -> tuple[str, ...]:
    """The ``NAME=V`` constraints of a budget (one ``--constraint`` each)."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return (f"latency_ms={budget:g}",)
    parts = tuple(p.strip() for p in str(budget).split("+") if p.strip())
    if not parts or any("=" not in p for p in parts):
        raise ValueError(f"budget {budget!r}: expected a latency in ms or NAME=V[+NAME=V], e.g. "
                         f"latency_ms=0.7+energy_mJ=0.5")
    return parts


def budget_name(budget: Budget) -> str:
    """The budget's folder and file name: ``latency_ms=0.45``, ``latency_ms=0.7+energy_mJ=0.5``."""
    return "+".join(budget_constraints(budget))


_UNITS = {"latency_ms": "ms", "energy_mJ": "mJ"}


def budget_label(budget: Budget) -> str:
    """For tables: ``0.45 ms``, ``0.7 ms + 0.5 mJ``."""
    out = []
    for c in budget_constraints(budget):
        name, value = c.split("=", 1)
        out.append(f"{float(value):g} {_UNITS.get(name, name)}")
    return " + ".join(out)


def budget_latency(budget: Budget) -> float | None:
    for c in budget_constraints(budget):
        name, value = c.split("=", 1)
        if name == "latency_ms":
            return float(value)
    return None


def seed_run_dir(run_dir: Path, seed: int | None, seeds: Sequence[int] | None) -> Path:
    """Where the finetune of ``seed`` lives: the first seed (or the only run) in ``run_dir`` itself,
    the others beside it as ``<run_dir>.seed<k>`` (a study grown to more seeds keeps its first runs)."""
    return run_dir if not seeds or seed == seeds[0] else run_dir.with_name(f"{run_dir.name}.seed{seed}")


# ---- rows -----------------------------------------------------------------------------------------
def _final_row(path: Path) -> dict | None:
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    return r.get("row", r)


def paired_difference(accs: Sequence[float], reference: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and standard error of ``accs[k] - reference[k]`` over the seeds both have (None below 2)."""
    if not accs or len(accs) != len(reference) or any(v is None for v in (*accs, *reference)):
        return None, None
    diffs = [a - b for a, b in zip(accs, reference)]
    if len(diffs) < 2:
        return statistics.mean(diffs), None
    return statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def added_seeds(run_dir: Path, seeds: Sequence[int]) -> dict[int, float]:
    """Top-1 of the finetunes beside ``run_dir`` with a seed the run did not list
    (``<run_dir>.seed<k>``, ``k`` not in ``seeds``): the seeds the driver adds to close calls."""
    out = {}
    for d in run_dir.parent.glob(f"{run_dir.name}.seed*"):
        k = d.name[len(run_dir.name) + len(".seed"):]
        row = _final_row(d / "final.json") if k.isdigit() and int(k) not in seeds else None
        if row is not None and row.get("top1") is not None:
            out[int(k)] = row["top1"]
    return dict(sorted(out.items()))


def results_rows(budgets: Sequence[Budget], out: Path, seeds: Sequence[int] = ()) -> list[dict]:
    """Under each budget, APQ's searched subnet, then the baselines under that budget: one dict a
    row (the data of ``results.json``; :func:`results_table` renders them). ``seeds``: the
    finetune seeds of the run (empty: one finetune with the recipe's seed); seeds added later to
    close calls (:func:`close_calls`) are found beside the runs and paired the same way."""
    rows = []
    for b in budgets:
        name = budget_name(b)
        apq_dir = out / "final" / name
        apq_runs = [_final_row(seed_run_dir(apq_dir, s, seeds) / "final.json") for s in (seeds or [None])]
        apq_by_seed: dict[int, float] = {}
        if apq_runs[0] is not None:
            r = apq_runs[0]
            if seeds:
                apq_by_seed = {s: x["top1"] for s, x in zip(seeds, apq_runs) if x is not None}
                apq_by_seed.update(added_seeds(apq_dir, seeds))
            flt = _final_row(out / "final" / f"{name}.float" / "final.json")
            rows.append(_row(APQ, b, r.get("predicted_acc"), list(apq_by_seed.values()) if seeds else [r.get("top1")],
                             r, None if flt is None else flt.get("top1"), list(apq_by_seed)))
        for folder in ("baselines", "baselines_predicted"):
            doc = out / folder / name / "baselines.json"
            if not doc.is_file():
                continue
            for r in json.loads(doc.read_text()).get("rows", []):
                if r.get("method") == "apq":
                    continue
                accs = r.get("achieved_accs") or ([r["achieved_acc"]] if r.get("achieved_acc") is not None else [])
                by_seed = dict(zip(seeds, accs)) if seeds and len(accs) == len(seeds) else {}
                if by_seed and r.get("final_run"):
                    by_seed.update(added_seeds(out / folder / name / "final" / Path(r["final_run"]).name, seeds))
                row = _row(r.get("method", "?"), b, r.get("predicted_acc"), list(by_seed.values()) or accs, r,
                           r.get("float_acc"), list(by_seed))
                common = [s for s in by_seed if s in apq_by_seed]  # the run's seeds, and added ones both have
                if by_seed and set(seeds) <= set(common):
                    row["diff_vs_apq"], row["diff_se"] = paired_difference([by_seed[s] for s in common],
                                                                           [apq_by_seed[s] for s in common])
                rows.append(row)
    return rows


def is_close_call(row: dict) -> bool:
    """A row whose paired difference to APQ is within two standard errors: no winner can be named
    from its seeds (the one rule behind :func:`close_calls` and the diagnosis's "tie")."""
    diff, se = row.get("diff_vs_apq"), row.get("diff_se")
    return diff is not None and se is not None and abs(diff) < 2 * se


def close_calls(rows: Sequence[dict]) -> dict[str, list[str]]:
    """Per budget, the finetuned baselines whose paired difference to APQ is within two standard
    errors (not resolved by the seeds so far): the issue's "more seeds where two methods are close"."""
    out: dict[str, list[str]] = {}
    for r in filter(is_close_call, rows):
        out.setdefault(r["budget"], []).append(r["method"])
    return out


def _row(method: str, budget: Budget, pred: object, accs: Sequence[Any], r: dict, float_acc: Any,
         seeds: Sequence[int] = ()) -> dict:
    bitops, size, search = r.get("bitops"), r.get("size_bytes"), r.get("search_wall_time_s")
    within = r.get("within_budget", True)
    status = "not runnable" if r.get("feasible") is False else ("within" if within in (True, None) else "over")
    accs = [a for a in accs if a is not None]
    return {"method": method, "budget": budget_name(budget), "budget_ms": budget_latency(budget),
            "budget_label": budget_label(budget), "status": status, "predicted_acc": pred,
            "achieved_acc": statistics.mean(accs) if accs else None,
            "achieved_std": statistics.stdev(accs) if len(accs) > 1 else None, "achieved_accs": list(accs),
            "seeds": list(seeds),
            "float_acc": float_acc, "diff_vs_apq": None, "diff_se": None,
            "latency_ms": r.get("latency_ms"), "energy_mJ": r.get("energy_mJ"),
            "gbitops": bitops / 1e9 if bitops else None, "size_kB": size / 1e3 if size else None,
            "search_s": float(search) if search else None}


# ---- where APQ loses ------------------------------------------------------------------------------
def _pairwise(pred: Sequence[float], true: Sequence[float]) -> float | None:
    """:func:`~apq_lightning.metrics.pairwise_accuracy` of the finalists (None without a pair)."""
    acc = float(pairwise_accuracy(torch.tensor(pred), torch.tensor(true)))
    return None if math.isnan(acc) else acc


def finalist_diagnosis(rows: Sequence[dict]) -> list[dict]:
    """Per budget with APQ and at least one finetuned baseline (within the budget): whether APQ is
    ahead on achieved top-1 and, if not, where the loss comes from.

    * ``search`` -- a baseline's subnet that the MP predictor itself rates above APQ's: it lies in
      APQ's space and under the same budget, so the joint search should have found it;
    * ``predictor`` -- the predictor rated APQ's subnet highest of the finalists and the finetune
      did not (the predictor misorders the finalists);
    * ``tie`` -- the best baseline's paired difference to APQ is within two standard errors: no
      winner can be named, whichever mean is higher.

    Also the predicted and achieved rank of APQ's subnet among the finalists and the share of
    finalist pairs the predictor orders as the finetune does.
    """
    by_budget: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("achieved_acc") is not None and r.get("predicted_acc") is not None and r.get("status") == "within":
            by_budget.setdefault(r["budget"], []).append(r)
    out = []
    for budget, finalists in by_budget.items():
        apq = next((r for r in finalists if r["method"] == APQ), None)
        others = [r for r in finalists if r["method"] != APQ]
        if apq is None or not others:
            continue
        best = max(others, key=lambda r: r["achieved_acc"])
        pred = [r["predicted_acc"] for r in finalists]
        true = [r["achieved_acc"] for r in finalists]
        missed = [r["method"] for r in others if r["predicted_acc"] > apq["predicted_acc"]]
        diff, se = best.get("diff_vs_apq"), best.get("diff_se")
        if is_close_call(best):
            reading = f"tie: {best['method']} is within two standard errors of APQ (paired)"
        elif apq["achieved_acc"] >= best["achieved_acc"]:
            reading = "APQ ahead" + ("" if not se else f" of {best['method']} by {abs(diff) / se:.1f} standard errors")
        elif missed:
            reading = f"search: the predictor rates {', '.join(missed)} above APQ's subnet"
        else:
            reading = "predictor: it rated APQ's subnet highest; the finetune did not"
        out.append({"budget": budget, "budget_label": apq.get("budget_label", budget), "finalists": len(finalists),
                    "apq_predicted": apq["predicted_acc"], "apq_achieved": apq["achieved_acc"],
                    "best": best["method"], "best_predicted": best["predicted_acc"],
                    "best_achieved": best["achieved_acc"],
                    "apq_rank_predicted": 1 + sum(p > apq["predicted_acc"] for p in pred),
                    "apq_rank_achieved": 1 + sum(t > apq["achieved_acc"] for t in true),
                    "pairs_ordered_right": _pairwise(pred, true), "search_missed": missed,
                    "reading": reading})
    return out


# ---- table ----------------------------------------------------------------------------------------
def _fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _achieved(r: dict) -> str:
    if r["achieved_std"] is None:
        return _fmt(r["achieved_acc"])
    return f"{r['achieved_acc']:.3f} ± {r['achieved_std']:.3f} (n={len(r['achieved_accs'])})"


def _diff(r: dict) -> str:
    if r["method"] == APQ or r["diff_vs_apq"] is None:
        return "-"
    se = "" if r["diff_se"] is None else f" ± {r['diff_se']:.4f}"  # 4 places: SEs of 0.0005 decide ties
    return f"{r['diff_vs_apq']:+.4f}{se}"


def results_table(rows: list[dict]) -> str:
    """Markdown of :func:`results_rows` (the table ``make demo`` prints and ``results.md`` holds)."""
    extra = [c for c, key in zip(OPTIONAL_COLUMNS, ("diff_vs_apq", "float_acc")) if any(r.get(key) is not None
                                                                                       for r in rows)]
    columns = (*RESULT_COLUMNS, *extra)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        label = r.get("budget_label") or f"{r['budget_ms']:g} ms"
        budget = label + {"within": "", "over": " (over)"}.get(r["status"], f" ({r['status']})")
        cells = [r["method"], budget, _fmt(r["predicted_acc"]), _achieved(r), _fmt(r["latency_ms"]),
                 _fmt(r["energy_mJ"]), _fmt(r["gbitops"]), _fmt(r["size_kB"], 1), _fmt(r["search_s"], 2)]
        cells += [_diff(r) if c == OPTIONAL_COLUMNS[0] else _fmt(r["float_acc"]) for c in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- figure ---------------------------------------------------------------------------------------
def accuracy_vs_latency_plot(rows: list[dict], path: Path) -> Path | None:
    """Achieved top-1 (mean ± std over the seeds) against the subnet's latency, one line per method
    across the budgets (latency-only budgets; energy budgets as hollow markers). None when no row
    was finetuned."""
    points: dict[str, list[tuple[float, float, float, bool]]] = {}
    for r in rows:
        if r["achieved_acc"] is None or r["latency_ms"] is None or r["status"] == "not runnable":
            continue
        energy = "energy_mJ" in r["budget"]
        points.setdefault(r["method"], []).append(
            (r["latency_ms"], 100 * r["achieved_acc"], 100 * (r["achieved_std"] or 0.0), energy))
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for method, pts in sorted(points.items(), key=lambda kv: kv[0] != APQ):
        line = sorted(p for p in pts if not p[3])
        style = {"lw": 2.2, "zorder": 3} if method == APQ else {"lw": 1.2}
        if line:
            eb = ax.errorbar([p[0] for p in line], [p[1] for p in line], yerr=[p[2] for p in line], marker="o",
                             capsize=3, label=method, **style)
            color = eb[0].get_color()
        else:
            color = None
        for p in pts:
            if p[3]:
                ax.errorbar([p[0]], [p[1]], yerr=[p[2]], marker="s", mfc="none", capsize=3, color=color,
                            label=None if line else f"{method} (energy budget)")
    ax.set_xlabel("BitFusion latency of the subnet (ms)")
    ax.set_ylabel("top-1 % on the test images (mean ± std over seeds)")
    ax.set_title("Accuracy vs latency (hollow squares: latency + energy budget)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


__all__ = ["APQ", "Budget", "accuracy_vs_latency_plot", "budget_constraints", "budget_label", "budget_latency",
           "budget_name", "finalist_diagnosis", "paired_difference", "results_rows", "results_table", "seed_run_dir"]
