"""benchmarks/transfer_study.py (issue 7 item 7): the predictor-transfer study on synthetic stores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from _stores import write_store

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]


def _load_study():
    spec = importlib.util.spec_from_file_location("transfer_study", ROOT / "benchmarks" / "transfer_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_transfer_study_writes_every_cell_on_one_fixed_test_split(tmp_path, capsys):
    write_store(tmp_path / "fp" / "samples.rank0.jsonl", "tiny", "fp", 200, seed=0)
    write_store(tmp_path / "mp" / "samples.rank0.jsonl", "tiny", "mp_random", 120, seed=1)
    out = tmp_path / "study"
    args = ["--fp-stores", str(tmp_path / "fp" / "samples*.jsonl"), "--mp-stores", str(tmp_path / "mp"),
            "--space", "tiny", "--sizes", "20,all", "--seeds", "0,1", "--losses", "mse", "--epochs", "3",
            "--hidden", "16", "--batch-size", "32", "--out", str(out)]
    assert _load_study().main(args) == 0

    for name in ("transfer_study.json", "transfer_study.md", "transfer_study.png", "fp_predictor.pt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "transfer_study.json").read_text())
    runs, cells = res["runs"], res["cells"]
    assert len(runs) == 2 * 2 * 1 * 2  # sizes × seeds × losses × inits
    pool = res["mp_train_pool"]
    assert 20 < pool < 120
    # one fixed test split for every run
    assert {r["n_test"] for r in runs} == {res["test"]["n"]} and res["test"]["n"] >= 2
    assert {r["test_id"] for r in runs} == {res["test"]["id"]}
    assert res["test"]["n"] + pool == 120  # no validation split: train pool + test = all MP samples
    # every (size, loss) has both inits, each over both seeds
    assert {(str(c["size"]), c["loss"], c["init"]) for c in cells} == {
        (s, "mse", i) for s in ("20", "all") for i in ("transfer", "scratch")}
    for c in cells:
        assert c["n_runs"] == 2 and sorted(c["seeds"]) == [0, 1]
        assert c["n_train"] == (20 if c["size"] == 20 else pool)
        assert 0.0 <= c["pairwise_acc_mean"] <= 1.0 and c["pairwise_acc_std"] >= 0.0
    for r in runs:
        assert {"pairwise_acc", "kendall_tau", "rmse"} <= set(r["test"])
    # different seeds draw different subsets of 20 but the same "all"
    subsets = {(r["seed"], str(r["size"])): r["train_id"] for r in runs}
    assert subsets[(0, "20")] != subsets[(1, "20")] and subsets[(0, "all")] == subsets[(1, "all")]

    md = (out / "transfer_study.md").read_text()
    assert "| MP train samples | mse transfer | mse scratch |" in md
    assert f"| all ({pool}) |" in md and "| 20 |" in md
    assert "| MP train samples |" in capsys.readouterr().out  # the table is printed


def test_transfer_study_rejects_bad_arguments(tmp_path):
    study = _load_study()
    with pytest.raises(SystemExit):
        study.main(["--fp-stores", "x", "--mp-stores", "y", "--sizes", "0,all", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        study.main(["--fp-stores", "x", "--mp-stores", "y", "--losses", "l1", "--out", str(tmp_path)])
