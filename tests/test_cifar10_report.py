"""benchmarks/cifar10_report.py: the study's page from a run folder, whole or partial."""

from __future__ import annotations

import json
from pathlib import Path

from _benchmarks import load_benchmark

report = load_benchmark("cifar10_report")


def _write(path: Path, doc: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def test_partial_run_page_shows_what_is_finished_and_the_diagnosis(tmp_path):
    runs = tmp_path / "study" / "runs"
    (runs / "pipeline_cifar").mkdir(parents=True)
    out = tmp_path / "docs"
    assert report.main(["--runs", str(tmp_path / "study"), "--out", str(out)]) == 0
    empty = (out / "cifar10.md").read_text()
    assert empty.count(report.MISSING) >= 5 and "Partial" not in empty  # nothing produced: says so, invents nothing
    assert "qfa label" not in empty

    budget = report.budget_name(report.PRESET.budgets[0])
    final = runs / "pipeline_cifar" / "final"
    row = {"predicted_acc": 0.83, "latency_ms": 0.49, "energy_mJ": 0.7, "bitops": 3.5e8, "size_bytes": 474000}
    for seed, acc in zip(report.PRESET.finetune_seeds, (0.812, 0.810, 0.811)):
        run = final / budget if seed == report.PRESET.finetune_seeds[0] else final / f"{budget}.seed{seed}"
        _write(run / "final.json", {"row": {**row, "top1": acc}})
    _write(runs / "pipeline_cifar" / "baselines" / budget / "baselines.json", {"rows": [
        {"method": "fp-search@8bit", "predicted_acc": 0.84, "achieved_accs": [0.815, 0.816, 0.812],
         "latency_ms": 0.45, "within_budget": True}]})
    _write(runs / "pipeline_cifar" / "finalist_labels.json", {"eval_images": 2000, "budgets": {budget: {
        "fp-search@8bit": {"predicted": 0.84, "qfa_label": 0.79}}}})  # benchmarks/finalist_labels.py's file
    curves = [{"epoch": e, "val/acc_largest": 0.8, "val/acc_smallest": 0.7} for e in range(3)]
    _write(tmp_path / "curves.json", curves)
    (tmp_path / "curves.png").write_bytes(b"\x89PNG")  # the curves' plot beside them: linked from the page
    assert report.main(["--runs", str(tmp_path / "study"), "--out", str(out), "--supernet-curves",
                        str(tmp_path / "curves.json"), "--float-epochs", "2"]) == 0
    page = (out / "cifar10.md").read_text()
    assert "**Partial: the run is still going.** These rows are read from the 6 finetunes" in page
    assert "| APQ (joint search) | 0.5 ms | 0.830 | 0.811 ± 0.001 (n=3) |" in page
    assert "| +0.0033 ± 0.0015 |" in page  # the paired difference to APQ, seed by seed
    assert "search: the predictor rates fp-search@8bit above APQ's subnet" in page
    assert "| 0.5 ms | fp-search@8bit | 0.840 | 0.790 | +0.050 | 0.814 |" in page  # predicted, label, achieved
    assert "| largest | 0.800 | ≥ 0.85 | not met |" in page and "epoch 1 of `curves.json`" in page
    assert "![supernet validation curves](../curves.png)" in page  # relative to the page in out/
    assert (out / "cifar10" / "accuracy_vs_latency.png").stat().st_size > 5000  # the partial run's figure too
