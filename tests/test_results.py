"""The pipeline's results (apq_lightning.final.results): budgets, seeds paired with APQ's, the float
reference, the table and the accuracy-vs-latency figure; and the driver's commands for them."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import pytest
from test_stages import FakeApq

from apq_lightning import stages
from apq_lightning.final.results import (
    APQ,
    accuracy_vs_latency_plot,
    budget_constraints,
    budget_label,
    budget_name,
    close_calls,
    finalist_diagnosis,
    paired_difference,
    results_rows,
    results_table,
    seed_run_dir,
)
from apq_lightning.stages import PRESETS, run_pipeline

ENERGY = "latency_ms=0.7+energy_mJ=0.5"


def test_budgets_name_their_constraints():
    assert budget_constraints(0.45) == ("latency_ms=0.45",) and budget_name(0.45) == "latency_ms=0.45"
    assert budget_constraints(ENERGY) == ("latency_ms=0.7", "energy_mJ=0.5") and budget_name(ENERGY) == ENERGY
    assert budget_label(ENERGY) == "0.7 ms + 0.5 mJ" and budget_label(1.0) == "1 ms"
    with pytest.raises(ValueError, match="expected a latency in ms or NAME=V"):
        budget_constraints("fast")
    runs = Path("final/b")
    assert [seed_run_dir(runs, s, (0, 1, 2)) for s in (0, 1, 2)] == [runs, Path("final/b.seed1"), Path("final/b.seed2")]
    assert seed_run_dir(runs, None, ()) == runs


def test_paired_difference_is_over_matching_seeds():
    mean, se = paired_difference([0.78, 0.81, 0.79], [0.80, 0.82, 0.81])
    diffs = [-0.02, -0.01, -0.02]
    assert mean == pytest.approx(statistics.mean(diffs)) and se == pytest.approx(statistics.stdev(diffs) / math.sqrt(3))
    assert paired_difference([0.7, 0.8], [0.7]) == (None, None)
    assert paired_difference([0.7], [0.6])[1] is None


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def test_rows_pair_every_seed_with_apqs_and_show_the_float_reference(tmp_path):
    out, seeds = tmp_path, (0, 1, 2)
    for b, accs in ((0.45, (0.70, 0.72, 0.71)), (ENERGY, (0.80, 0.82, 0.81))):
        for s, acc in zip(seeds, accs):
            _write(seed_run_dir(out / "final" / budget_name(b), s, seeds) / "final.json",
                   {"top1": acc, "predicted_acc": 0.8, "latency_ms": 0.4 if b == 0.45 else 0.66, "energy_mJ": 0.45,
                    "bitops": 2e8, "size_bytes": 1e5})
        _write(out / "baselines" / budget_name(b) / "baselines.json", {"rows": [
            {"method": "fp-search@8bit", "predicted_acc": 0.78, "achieved_acc": 0.0, "float_acc": 0.85,
             "achieved_accs": [a - 0.02 + 0.01 * (s == 1) for s, a in zip(seeds, accs)], "latency_ms": 0.6},
            {"method": "fp-search@4bit", "achieved_accs": [0.5, 0.6], "latency_ms": 0.3},  # a seed missing
        ]})
    _write(out / "final" / f"{ENERGY}.float" / "final.json", {"top1": 0.86})
    rows = results_rows((0.45, ENERGY), out, seeds)
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("APQ (joint search)", "latency_ms=0.45"), ("fp-search@8bit", "latency_ms=0.45"),
        ("fp-search@4bit", "latency_ms=0.45"), ("APQ (joint search)", ENERGY), ("fp-search@8bit", ENERGY),
        ("fp-search@4bit", ENERGY)]
    apq, fp8, fp4 = rows[3:]
    assert apq["achieved_acc"] == pytest.approx(0.81) and apq["achieved_std"] == pytest.approx(0.01)
    assert apq["float_acc"] == 0.86 and rows[0]["float_acc"] is None and apq["budget_ms"] == 0.7
    assert fp8["achieved_acc"] == pytest.approx(0.81 - 0.02 + 0.01 / 3)  # the seeds' mean, not the doc's field
    assert fp8["diff_vs_apq"] == pytest.approx(-0.02 + 0.01 / 3)
    assert fp8["diff_se"] == pytest.approx(statistics.stdev([-0.02, -0.01, -0.02]) / math.sqrt(3))
    assert fp4["diff_vs_apq"] is None  # not the same seeds: no paired difference
    json.dumps(rows)
    lines = results_table(rows).splitlines()
    assert lines[0].endswith("| Δ vs APQ (paired ± SE) | float top-1 |")
    assert lines[5].startswith("| APQ (joint search) | 0.7 ms + 0.5 mJ | 0.800 | 0.810 ± 0.010 (n=3) |")
    assert lines[5].endswith("| - | 0.860 |") and lines[6].endswith("| -0.0167 ± 0.0033 | 0.850 |")
    png = accuracy_vs_latency_plot(rows, tmp_path / "fig" / "accuracy_vs_latency.png")
    assert png is not None and png.stat().st_size > 5000
    assert accuracy_vs_latency_plot([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_diagnosis_names_the_search_or_the_predictor_when_apq_loses():
    def row(budget: str, method: str, pred: float, ach: float, status: str = "within") -> dict:
        return {"budget": budget, "budget_label": budget, "method": method, "status": status,
                "predicted_acc": pred, "achieved_acc": ach}

    rows = [row("a", APQ, 0.80, 0.81), row("a", "fp-search@8bit", 0.78, 0.80),
            row("b", APQ, 0.80, 0.79), row("b", "fp-search@6bit", 0.82, 0.80), row("b", "sequential", 0.79, 0.78),
            row("c", APQ, 0.83, 0.79), row("c", "fp-search@8bit", 0.80, 0.80), row("c", "sequential", 0.79, 0.78),
            row("c", "fp-search@4bit", 0.90, 0.95, status="over"),  # over the budget: not a finalist
            row("d", APQ, 0.80, 0.80),  # no baseline finetuned yet
            row("e", APQ, 0.80, 0.801), {**row("e", "fp-search@4bit", 0.77, 0.800), "diff_vs_apq": -0.001,
                                         "diff_se": 0.001},
            row("f", APQ, 0.80, 0.81), {**row("f", "fp-search@4bit", 0.77, 0.80), "diff_vs_apq": -0.01,
                                        "diff_se": 0.002}]
    a, b, c, e, f = finalist_diagnosis(rows)
    assert f["reading"] == "APQ ahead of fp-search@4bit by 5.0 standard errors"
    assert e["reading"] == "tie: fp-search@4bit is within two standard errors of APQ (paired)"
    assert (a["budget"], a["reading"], a["apq_rank_achieved"]) == ("a", "APQ ahead", 1)
    assert b["reading"] == "search: the predictor rates fp-search@6bit above APQ's subnet"
    assert b["search_missed"] == ["fp-search@6bit"] and b["apq_rank_predicted"] == 2
    assert c["reading"].startswith("predictor") and c["finalists"] == 3 and c["best"] == "fp-search@8bit"
    assert (c["apq_rank_predicted"], c["apq_rank_achieved"]) == (1, 2)
    assert c["pairs_ordered_right"] == pytest.approx(2 / 3)  # APQ vs fp-search@8bit is the misordered pair


def test_driver_finetunes_every_seed_the_float_reference_and_energy_budgets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = FakeApq()
    monkeypatch.setattr(stages, "_apq", fake)
    p = dataclasses.replace(PRESETS["tiny"], budgets=(0.45, ENERGY), finetune_seeds=(0, 1, 2), float_reference=True)
    run_pipeline(p, tmp_path / "out", [])
    calls = [c for c in fake.calls if c[0] in ("search", "final", "baselines")]
    searches = [c for c in calls if c[0] == "search"]
    assert [c.count("--constraint") for c in searches] == [1, 2]
    assert "energy_mJ=0.5" in searches[1] and searches[1][searches[1].index("--out") + 1].endswith(f"{ENERGY}.json")
    finals = [(Path(c[c.index("--out") + 1]).name, c[c.index("--seed_everything") + 1]) for c in calls
              if c[0] == "final"]
    assert finals == [("latency_ms=0.45", "0"), ("latency_ms=0.45.seed1", "1"), ("latency_ms=0.45.seed2", "2"),
                      ("latency_ms=0.45.float", "0"), (ENERGY, "0"), (f"{ENERGY}.seed1", "1"), (f"{ENERGY}.seed2", "2"),
                      (f"{ENERGY}.float", "0")]
    floats = [c for c in calls if c[0] == "final" and c[c.index("--out") + 1].endswith(".float")]
    assert all(c[c.index("--model.policy") + 1] == "float" and "--no-onnx" in c for c in floats)
    tuned = [c for c in calls if c[0] == "baselines" and "--finetune" in c]
    assert len(tuned) == 2 and all(c[c.index("--finetune-seeds") + 1] == "0,1,2" and "--float-reference" in c
                                   for c in tuned)


def test_figures_are_logged_to_wandb_offline(tmp_path, monkeypatch):
    from apq_lightning.loggers import log_images

    rows = results_rows((0.45,), tmp_path)  # nothing yet
    assert rows == [] and accuracy_vs_latency_plot(rows, tmp_path / "x.png") is None
    png = tmp_path / "fig.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.plot([0, 1], [1, 0])
    plt.savefig(png)
    plt.close("all")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert log_images({"pipeline/fig": png}, "t", tmp_path / "wb") is None
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert log_images({"pipeline/fig": tmp_path / "missing.png"}, "t", tmp_path / "wb") is None
    broken = tmp_path / "broken.png"
    broken.write_text("not a png")
    assert log_images({"pipeline/broken": broken}, "t", tmp_path / "wb") is None  # skipped, named on stderr
    run_dir = Path(log_images({"pipeline/fig": png, "pipeline/broken": broken}, "t", tmp_path / "wb"))
    assert run_dir.is_relative_to(tmp_path / "wb") and [p.name.split("_")[0] for p in run_dir.rglob("*.png")] == ["fig"]


def test_added_seeds_are_paired_and_close_calls_are_the_unresolved_margins(tmp_path):
    out, seeds, name = tmp_path, (0, 1, 2), "latency_ms=0.5"
    apq = {0: 0.80, 1: 0.81, 2: 0.80, 3: 0.82, 4: 0.79}
    for s, acc in apq.items():
        _write(seed_run_dir(out / "final" / name, s, (0, 1, 2, 3, 4)) / "final.json", {"top1": acc})
    _write(out / "final" / f"{name}.seedx" / "final.json", {"top1": 0.1})  # not a seed folder: ignored
    close = out / "baselines" / name / "final" / "fp-search_4bit"
    for s, acc in ((3, 0.80), (4, 0.81)):
        _write(close.with_name(f"fp-search_4bit.seed{s}") / "final.json", {"top1": acc})
    _write(out / "baselines" / name / "baselines.json", {"rows": [
        {"method": "fp-search@4bit", "achieved_accs": [0.80, 0.80, 0.81], "final_run": f"elsewhere/{close.name}"},
        {"method": "fp-search@8bit", "achieved_accs": [0.70, 0.71, 0.70], "final_run": "elsewhere/fp-search_8bit"},
    ]})
    apq_row, fp4, fp8 = results_rows((0.5,), out, seeds)
    assert apq_row["seeds"] == [0, 1, 2, 3, 4]
    assert apq_row["achieved_acc"] == pytest.approx(statistics.mean(apq.values()))
    assert fp4["seeds"] == [0, 1, 2, 3, 4] and fp4["achieved_accs"] == [0.80, 0.80, 0.81, 0.80, 0.81]
    diffs = [0.0, -0.01, 0.01, -0.02, 0.02]
    assert fp4["diff_vs_apq"] == pytest.approx(0.0, abs=1e-12)
    assert fp4["diff_se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(5))
    # fp-search@8bit has the run's seeds only: paired over those three, not dropped for APQ's added ones
    assert fp8["seeds"] == [0, 1, 2] and fp8["diff_vs_apq"] == pytest.approx(-0.10)
    assert close_calls([apq_row, fp4, fp8]) == {name: ["fp-search@4bit"]}  # |0| < 2 SE; -0.10 is resolved
    assert close_calls([{**fp8, "diff_se": None}]) == {}


class _CloseBaselines(FakeApq):
    """Baselines whose fp-search@8bit ties APQ's seeds (all 0.5) and whose 4-bit search is clearly behind."""

    def __call__(self, args: list[str], log: Path) -> None:
        super().__call__(args, log)
        if args[0] == "baselines" and "--finetune" in args:
            out = Path(args[args.index("--out") + 1])
            rows = [{"method": "fp-search@8bit", "achieved_accs": [0.5, 0.51, 0.49],
                     "final_run": str(out / "final" / "fp-search_8bit")},
                    {"method": "fp-search@4bit", "achieved_accs": [0.40, 0.41, 0.40],
                     "final_run": str(out / "final" / "fp-search_4bit")}]
            (out / "baselines.json").write_text(json.dumps({"rows": rows}))


def test_driver_adds_seeds_to_apq_and_to_the_close_baselines_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = _CloseBaselines()
    monkeypatch.setattr(stages, "_apq", fake)
    p = dataclasses.replace(PRESETS["tiny"], budgets=(0.45,), finetune_seeds=(0, 1, 2), added_seeds=(3, 4))
    run_pipeline(p, tmp_path / "out", [])
    added = [c for c in fake.calls if c[0] == "final" and c[c.index("--seed_everything") + 1] in ("3", "4")]
    outs = [(Path(c[c.index("--out") + 1]).name, c[c.index("--seed_everything") + 1]) for c in added]
    assert outs == [("latency_ms=0.45.seed3", "3"), ("latency_ms=0.45.seed4", "4"),
                    ("fp-search_8bit.seed3", "3"), ("fp-search_8bit.seed4", "4")]
    assert all("--no-onnx" in c for c in added)
    assert added[0][added[0].index("--search") + 1].endswith("search/latency_ms=0.45.json")
    assert added[2][added[2].index("--subnet") + 1].endswith("fp-search_8bit/subnet.json")
    assert added[2][added[2].index("--label") + 1] == "fp-search@8bit"
    n = len(fake.calls)
    run_pipeline(p, tmp_path / "out", [])  # a rerun: nothing is finetuned again
    assert [c for c in fake.calls[n:] if c[0] == "final"] == []
    apq_row, fp8, fp4 = results_rows(p.budgets, tmp_path / "out", p.finetune_seeds)
    assert apq_row["seeds"] == fp8["seeds"] == [0, 1, 2, 3, 4] and fp4["seeds"] == [0, 1, 2]
