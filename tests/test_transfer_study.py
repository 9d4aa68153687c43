"""``apq transfer-study`` (apq_lightning/study/): the predictor-transfer study of APQ's
Figure 7, run through its command on synthetic stores (``tests/_stores.py``: accuracy is a known,
learnable function of the encoding)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _stores import write_store

from apq_lightning import cli, study
from apq_lightning.space import get_space

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]


def _study_args(fp: Path, mp: Path, out: Path, *extra: str) -> list[str]:
    return ["--fp-stores", str(fp), "--mp-stores", str(mp), "--space", "tiny", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, seed) -> Path:
    """400 FP and 200 MP samples (random architectures and policies) of the tiny space."""
    root = tmp_path_factory.mktemp("stores")
    write_store(root / "fp" / "samples.rank0.jsonl", "tiny", "fp", 400, seed=100 * seed)
    write_store(root / "mp" / "samples.rank0.jsonl", "tiny", "mp_random", 200, seed=100 * seed + 1)
    return root


@pytest.fixture(scope="module")
def study_run(stores, tmp_path_factory) -> tuple[Path, dict, str]:
    """One study through ``main``: sizes 20 and all, seeds 0 and 1, both losses (16 runs)."""
    out = tmp_path_factory.mktemp("study")
    args = _study_args(
        stores / "fp" / "samples*.jsonl",
        stores / "mp",
        out,
        *("--sizes", "20,all", "--seeds", "0,1", "--losses", "mse,ranking", "--epochs", "40", "--hidden", "64"),
        *("--batch-size", "32"),
    )
    assert study.main(args) == 0
    return out, json.loads((out / "transfer_study.json").read_text()), (out / "transfer_study.md").read_text()


def test_study_writes_one_run_per_cell_on_one_fixed_test_split(study_run):
    out, res, md = study_run
    for name in study.OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    runs, cells, pool = res["runs"], res["cells"], res["mp_train_pool"]
    keys = [(str(r["size"]), r["seed"], r["loss"], r["init"]) for r in runs]
    expected = {
        (s, seed, loss, init)
        for s in ("20", "all")
        for seed in (0, 1)
        for loss in ("mse", "ranking")
        for init in ("transfer", "scratch")
    }
    assert len(keys) == len(set(keys)) == 16 and set(keys) == expected
    # one fixed test split for every run; no validation split: train pool + test = every MP sample
    assert {r["test_id"] for r in runs} == {res["test"]["id"]} and {r["n_test"] for r in runs} == {res["test"]["n"]}
    assert res["test"]["n"] >= 10 and res["test"]["n"] + pool == 200 and 20 < pool
    # seeds draw different subsets of 20 but the same "all"
    subsets = {(r["seed"], str(r["size"])): r["train_id"] for r in runs}
    assert subsets[(0, "20")] != subsets[(1, "20")] and subsets[(0, "all")] == subsets[(1, "all")]
    assert {c["n_train"] for c in cells if c["size"] == "all"} == {pool}
    assert all(c["n_runs"] == 2 and sorted(c["seeds"]) == [0, 1] for c in cells) and len(cells) == 8
    assert res["config"]["sizes"] == "20,all" and res["config"]["losses"] == "mse,ranking"
    assert res["sizes_run"] == [20, "all"] and res["notes"] == []
    assert "| MP train samples | mse transfer | mse scratch | ranking transfer | ranking scratch |" in md
    assert f"| all ({pool}) |" in md and "| 20 |" in md


def test_predictors_learn_the_synthetic_target_on_the_whole_split(study_run):
    """Chance is 0.5. Measured with APQ_TEST_SEED 0-3 (1 and 2 threads alike; the study runs
    on one): 'all' cells 0.754-0.853 with transfer, 0.645-0.726 from scratch; FP predictor
    0.899-0.931. Each bound leaves >= 0.095."""
    _, res, _ = study_run
    for r in res["runs"]:
        assert 0.0 <= r["test"]["pairwise_acc"] <= 1.0 and r["test"]["rmse"] >= 0.0
    whole = {(c["loss"], c["init"]): c["pairwise_acc_mean"] for c in res["cells"] if c["size"] == "all"}
    assert len(whole) == 4
    for (loss, init), acc in whole.items():
        assert acc > (0.65 if init == "transfer" else 0.55), (loss, init, acc)
    assert res["fp_predictor"]["test_fp"]["pairwise_acc"] > 0.8


def test_demo_sized_stores_clip_and_dedupe_sizes(tmp_path, capsys):
    """The pipeline's demo: 200 FP and 40 MP samples, half of them 10 policies of one architecture."""
    sp = get_space("tiny")
    write_store(tmp_path / "fp" / "s.jsonl", "tiny", "fp", 200, seed=3)
    genomes = sp.sample_genomes(4, 40)  # seeds whose split holds 13 test samples (some give < 2: exit 2)
    arch = sp.genome_slices()["pw_w"].start  # genes before it: the architecture; from it: the bits
    genomes[0:10, :arch], genomes[10:20, :arch] = genomes[0, :arch], genomes[10, :arch]
    write_store(tmp_path / "mp" / "s.jsonl", "tiny", "mp_arch_policies", 40, seed=4, genomes=genomes)
    out = tmp_path / "out"
    args = ("--sizes", "8,16,1000,all,8", "--seeds", "0,1", "--epochs", "5", "--hidden", "32", "--no-progress")
    assert study.main(_study_args(tmp_path / "fp", tmp_path / "mp", out, *args)) == 0
    res = json.loads((out / "transfer_study.json").read_text())
    pool = res["mp_train_pool"]
    assert 16 < pool < 40
    assert res["sizes_run"] == [8, 16, "all"]  # 1000 ran as 'all', once; the repeated 8 once
    assert any("1000 exceeds the MP training split" in note for note in res["notes"])
    assert "note: --sizes 1000 exceeds" in capsys.readouterr().out
    assert len(res["runs"]) == 3 * 2 * 2 * 2 and max(r["n_train"] for r in res["runs"]) == pool


def test_resolve_sizes_clips_to_all_and_sorts():
    assert study.resolve_sizes([50, "all", 10], 30) == (
        [(10, 10), ("all", 30)],
        ["--sizes 50 exceeds the MP training split (30 samples): run as 'all'"],
    )
    assert study.resolve_sizes([30, 5], 30) == ([(5, 5), ("all", 30)], [])


@pytest.fixture(scope="module")
def small_stores(tmp_path_factory) -> Path:
    """Stores for the bad-input cases (fixed seeds: which split a sample lands in is a hash)."""
    root = tmp_path_factory.mktemp("small")
    write_store(root / "fp.jsonl", "tiny", "fp", 30, seed=3)
    write_store(root / "mp.jsonl", "tiny", "mp_random", 30, seed=4)
    sp = get_space("tiny")
    # two policies of one architecture: both samples in one split, the other split empty
    g = sp.sample_genomes(5, 2)
    arch = sp.genome_slices()["pw_w"].start
    g[1, :arch] = g[0, :arch]
    write_store(root / "mp_one_arch.jsonl", "tiny", "mp_random", 2, seed=5, genomes=g)
    return root


@pytest.mark.parametrize(
    ("change", "wanted"),
    [
        ({"--sizes": "8,x,all"}, "--sizes: 'x' is neither a positive integer nor 'all'; allowed:"),
        ({"--sizes": "0"}, "--sizes: '0' is neither a positive integer nor 'all'"),
        ({"--losses": "mse,l1"}, "--losses: 'l1' is not allowed; allowed: mse, ranking, mse+ranking"),
        ({"--seeds": "0,a"}, "--seeds: 'a' is not a non-negative integer"),
        ({"--epochs": "0"}, "--epochs 0: must be an integer >= 1"),
        ({"--epochs": "ten"}, "argument --epochs: invalid int value: 'ten'"),
        ({"--test-fraction": "1.5"}, "--test-fraction 1.5: must be in (0, 1)"),
        ({"--space": "nope"}, "--space: unknown search space 'nope'; registered spaces:"),
        ({"--mp-stores": "{root}/missing*.jsonl"}, "--mp-stores: no sample files match"),
        ({"--fp-stores": "{root}/nothing"}, "--fp-stores: no sample files match"),
        ({"--mp-stores": "{root}/fp.jsonl"}, "--mp-stores: {root}/fp.jsonl:1: a 'fp' record without bits"),
        ({"--mp-stores": "{root}/mp_one_arch.jsonl"}, "--mp-stores: "),  # train or test split empty
        ({"--out": None}, "the following arguments are required: --out"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(small_stores, tmp_path, capsys, change, wanted):
    opts = {
        "--fp-stores": str(small_stores / "fp.jsonl"),
        "--mp-stores": str(small_stores / "mp.jsonl"),
        "--space": "tiny",
        "--out": str(tmp_path / "out"),
        "--epochs": "1",
        "--hidden": "8",
    }
    opts.update({k: v.format(root=small_stores) if v else v for k, v in change.items()})
    argv = [x for k, v in opts.items() if v is not None for x in (k, v)]
    assert study.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("transfer-study: ") and wanted.format(root=small_stores) in err, err
    if "mp_one_arch" in str(change):
        assert "at least 2 are needed" in err or "no training samples" in err, err
    assert not (tmp_path / "out" / "transfer_study.json").exists()


def test_command_is_listed_and_dispatched(capsys):
    assert "transfer-study" in cli.COMMANDS
    assert cli.main(["transfer-study", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: apq transfer-study") and "--sizes" in out and "--min-steps" in out
    assert cli.main(["transfer-study", "--losses", "l1"]) == 2  # argparse errors: one line too
    assert "required: --fp-stores, --mp-stores, --out" in capsys.readouterr().err


def test_module_command_help_runs_in_a_fresh_interpreter():
    res = subprocess.run(
        [sys.executable, "-m", "apq_lightning.cli", "transfer-study", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and "usage: apq transfer-study" in res.stdout, res.stderr


def test_nothing_in_the_package_imports_the_study_but_the_cli():
    """docs/design.md §14.2: the study sits above data/modules/predictor; only the command line reaches it."""
    importers = []
    package = ROOT / "apq_lightning"
    for path in package.rglob("*.py"):
        if path == package / "cli.py" or (package / "study") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            module = (node.module or "") if isinstance(node, ast.ImportFrom) else ""
            if module.startswith("apq_lightning.study") or (module == "apq_lightning" and "study" in names) or any(
                n.startswith("apq_lightning.study") for n in names
            ):
                importers.append(str(path.relative_to(ROOT)))
    assert importers == []


def test_help_imports_neither_torch_nor_lightning():
    """``apq transfer-study --help`` stays quick: the study imports torch only when it runs."""
    code = "import sys; from apq_lightning import study; print([m for m in ('torch', 'lightning') if m in sys.modules])"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr


def test_split_id_changes_with_the_test_split():
    import torch

    g = np.arange(12, dtype=np.int16).reshape(3, 4)
    y = torch.tensor([0.1, 0.2, 0.3])
    assert study.split_id(g, y) == study.split_id(g.copy(), y.clone())
    assert study.split_id(g, y) != study.split_id(g[:2], y[:2]) != study.split_id(g, y + 0.01)
