"""The pipeline driver's own logic (the stages themselves run in tests/test_demo.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apq_lightning.stages import PRESETS, main, results_rows, results_table, run_pipeline


def test_run_dirs_and_stores_come_from_the_recipes():
    cifar, tiny = PRESETS["cifar"], PRESETS["tiny"]
    assert cifar.run("supernet") == Path("runs/supernet_cifar")
    assert cifar.run("collect_fp") == Path("runs/collect_fp_cifar")  # not the recipe's stem (collect_fp)
    assert cifar.stores("predictor_mp") == ["runs/collect_mp_cifar/samples*.jsonl"]
    assert tiny.stores("predictor_fp") == ["runs/collect_fp_tiny/samples*.jsonl"]
    assert Path(tiny.recipe("supernet")).is_file()  # found from any working directory


def test_recipes_resolve_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(PRESETS["tiny"].recipe("finetune")).is_file()
    assert PRESETS["tiny"].run("predictor_mp") == Path("runs/predictor_mp_tiny")


def test_overrides_are_per_stage_and_stage_names_are_checked():
    cifar = PRESETS["cifar"]
    assert cifar.args("collect_mp") == ("--model.init_args.qat_steps", "30")
    assert cifar.args("supernet") == ()
    with pytest.raises(ValueError, match="unknown stage 'colect_fp'; stages: supernet, collect_fp"):
        cifar.args("colect_fp")


def test_cifar_needs_data_and_a_given_supernet_must_exist(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--preset", "cifar"])
    assert err.value.code == 2 and "--preset cifar needs --data PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--supernet .*nope.pt: no such file"):
        run_pipeline(PRESETS["tiny"], tmp_path / "out", [], supernet=str(tmp_path / "nope.pt"))


def test_results_table_rows_per_budget(tmp_path):
    p = PRESETS["tiny"]
    out = tmp_path
    ms = p.budgets[0]
    final = out / "final" / f"latency_ms={ms:g}" / "final.json"
    final.parent.mkdir(parents=True)
    final.write_text(json.dumps({"row": {"predicted_acc": 0.9, "top1": 0.95, "latency_ms": 0.4, "energy_mJ": 0.5,
                                         "bitops": 2e8, "size_bytes": 1e5, "search_wall_time_s": 1.5}}))
    base = out / "baselines" / f"latency_ms={ms:g}" / "baselines.json"
    base.parent.mkdir(parents=True)
    base.write_text(json.dumps({"rows": [
        {"method": "apq", "predicted_acc": 0.9},  # APQ's own row comes from final.json
        {"method": "fp-search@8bit", "predicted_acc": 0.8, "achieved_acc": 0.85, "latency_ms": 0.44,
         "energy_mJ": 0.6, "bitops": 3e8, "size_bytes": 2e5, "within_budget": True},
        {"method": "largest@4bit", "predicted_acc": 0.7, "feasible": False, "within_budget": False},
        {"method": "largest@8bit", "predicted_acc": 0.7, "latency_ms": 1.9, "within_budget": False},
    ]}))
    rows = results_rows(p, out)
    assert rows[0]["method"] == "APQ (joint search)" and rows[0]["achieved_acc"] == 0.95 and rows[0]["gbitops"] == 0.2
    assert [r["status"] for r in rows] == ["within", "within", "not runnable", "over"]
    json.dumps(rows)  # the rows are results.json's data: plain JSON
    lines = results_table(rows).splitlines()
    assert lines[2] == ("| APQ (joint search) | 0.45 ms | 0.900 | 0.950 | 0.400 | 0.500 | 0.200 | 100.0 | 1.50 |")
    assert lines[3].startswith("| fp-search@8bit | 0.45 ms | 0.800 | 0.850 |")
    assert lines[4].startswith("| largest@4bit | 0.45 ms (not runnable) |")
    assert lines[5].startswith("| largest@8bit | 0.45 ms (over) |")
    assert len(lines) == 6  # nothing for the second budget yet
