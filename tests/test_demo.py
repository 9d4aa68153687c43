"""The demo's seven stages end to end (``make demo`` at reduced size): what a newcomer sees first.

One run of :func:`apq_lightning.stages.run_all` on the tiny preset (its stage 1 ends with the
quantized-for-all phase; stage 4 scores ``qfa`` samples in it) with fewer samples and shorter
finetunes, in a scratch folder (every recipe writes under ``runs/`` of the working directory).
The assertions are on the outputs a user reads: searched subnets within their budgets, finetuned
accuracy far above chance (digits: 10 classes), the results table, and the plots folder with
every kind of plot the demo promises.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from apq_lightning.stages import PRESETS, Preset, run_all

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Preset, object]:
    folder = tmp_path_factory.mktemp("demo")
    preset = dataclasses.replace(
        PRESETS["tiny"], fp_samples=120, mp_samples=24, generations=60,
        overrides={"finetune": ("--trainer.max_epochs", "2")},
        transfer_sizes="8,all", transfer_seeds="0", transfer_epochs=40,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("WANDB_MODE", "offline")
        report = run_all(preset, folder / "runs" / "pipeline_tiny", [])
    return preset, report


def test_searched_subnets_meet_their_budgets_and_learn(demo):
    preset, report = demo
    out = report.parent
    for ms in preset.budgets:
        final = json.loads((out / "final" / f"latency_ms={ms:g}" / "final.json").read_text())
        row = final.get("row", final)
        assert row["latency_ms"] <= ms + 1e-9, f"searched subnet over its {ms} ms budget: {row['latency_ms']}"
        assert row["top1"] > 0.6, f"finetuned top-1 {row['top1']} is not far above chance (0.1)"
        assert 0.0 <= row["predicted_acc"] <= 1.0
        assert row["bitops"] > 0 and row["energy_mJ"] > 0


def test_results_table_lists_apq_and_baselines_per_budget(demo):
    preset, report = demo
    text = report.read_text()
    for ms in preset.budgets:
        assert sum(line.startswith("| APQ (joint search) |") and f"| {ms:g} ms |" in line
                   for line in text.splitlines()) == 1
        rows = [line for line in text.splitlines() if f"| {ms:g} ms" in line]
        methods = {line.split("|")[1].strip() for line in rows}
        assert {"fp-search@8bit", "fp-search@4bit", "sequential"} <= methods, methods
    achieved = [line.split("|")[4].strip() for line in text.splitlines() if line.startswith("| fp-search@8bit")]
    assert achieved and all(float(a) > 0.6 for a in achieved)  # baselines are finetuned too
    times = json.loads((report.parent / "stage_times.json").read_text())
    assert {"1 supernet", "2 FP samples", "5b transfer study", "7 final latency_ms=0.45"} <= set(times)


def test_plots_folder_holds_every_kind_of_plot(demo):
    _, report = demo
    plots = sorted(p.name for p in (report.parent / "plots").glob("*.png"))
    for kind in ("validation_curves", "scatter", "transfer_study", "latency_ms=0.45", "latency_ms=0.6"):
        assert any(kind in name for name in plots), (kind, plots)
    assert all((report.parent / "plots" / name).stat().st_size > 5000 for name in plots)
    logged = {p.name.split("_")[0] for p in (report.parent / "wandb").rglob("media/images/pipeline/*.png")}
    assert {"accuracy", "search"} <= logged, logged  # the figure and the search fronts, in the W&B run


def test_mp_samples_are_qfa_labels_from_the_quantized_for_all_stage_1(demo):
    from apq_lightning.collection import read_samples

    _, report = demo
    recs = read_samples(report.parent.parent / "collect_mp_tiny")
    assert len(recs) == 24 and {r.protocol["protocol"] for r in recs} == {"qfa"}
    assert all(r.timing["qat_s"] == 0 for r in recs)
