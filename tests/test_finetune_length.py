"""benchmarks/finetune_length.py: which subnets it finetunes longer, and the paired table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _benchmarks import load_benchmark

from apq_lightning.final.results import APQ, seed_run_dir

fl = load_benchmark("finetune_length")


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def test_longer_finetunes_are_paired_with_apqs_and_bad_methods_are_named(tmp_path, monkeypatch, capsys):
    run, budget = tmp_path / "run", "latency_ms=0.5"
    for k, acc in zip((0, 1, 2), (0.80, 0.81, 0.80)):
        _write(seed_run_dir(run / "final" / budget, k, (0, 1, 2)) / "final.json", {"top1": acc})
    _write(run / "baselines" / budget / "baselines.json", {"rows": [
        {"method": "fp-search@4bit", "achieved_accs": [0.79, 0.80, 0.80], "final_run": "x/fp-search_4bit"}]})
    calls = []

    def fake(src, out, steps, seed, args, label):
        calls.append((src, out.name, steps, seed, label))
        return {APQ: 0.82, "fp-search@4bit": 0.84}[label] + 0.001 * seed

    monkeypatch.setattr(fl, "finetune", fake)
    base = ["--run", str(run), "--budget", budget, "--steps", "900", "--seeds", "0,1", "--data", "d", "--supernet", "s",
            "--out", str(tmp_path / "long")]
    assert fl.main([*base, "--methods", "fp-search@4bit"]) == 0
    assert [c[1:] for c in calls] == [
        ("APQ_joint_search_900.seed0", 900, 0, APQ), ("APQ_joint_search_900.seed1", 900, 1, APQ),
        ("fp-search_4bit_900.seed0", 900, 0, "fp-search@4bit"), ("fp-search_4bit_900.seed1", 900, 1, "fp-search@4bit")]
    assert calls[0][0] == ("--search", str(run / "search" / f"{budget}.json"))
    assert calls[2][0] == ("--subnet", str(run / "baselines" / budget / "final" / "fp-search_4bit" / "subnet.json"))
    res = json.loads((tmp_path / "long" / budget / "finetune_length_900.json").read_text())
    short, long = res["methods"]["fp-search@4bit"]["short"], res["methods"]["fp-search@4bit"]["long"]
    assert short["diff_vs_apq"] == pytest.approx(-0.01) and short["diff_se"] == pytest.approx(0.0)  # -1, -1 points
    assert long["mean"] == pytest.approx(0.8405) and long["diff_vs_apq"] == pytest.approx(0.02)  # 2 points ahead
    assert res["methods"]["APQ (joint search)"]["long"]["diff_vs_apq"] is None
    assert "| fp-search@4bit | 79.50 | 84.05 | -1.00 ± 0.00 | +2.00 ± 0.00 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no finetuned baseline of that name.*there: fp-search@4bit"):
        fl.main([*base, "--methods", "fp-search@6bit"])
