"""A fit resumes only the job that wrote its checkpoint (issue: a predictor fit on other stores in
the same run directory restored the finished run, trained 0 epochs and exited 0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _stores import write_store

from apq_lightning.cli import main as cli_main
from apq_lightning.job_identity import differences, job_identity

ROOT = Path(__file__).resolve().parents[1]


def _fit(run: Path, store: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "recipes" / "predictor_fp_tiny.yaml"), "--trainer.default_root_dir",
            str(run), "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "2",
            "--data.init_args.stores", json.dumps([str(store)]), *extra]


def _epoch(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]


@pytest.fixture
def two_stores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = tmp_path / "a" / "samples.rank0.jsonl", tmp_path / "b" / "samples.rank0.jsonl"
    write_store(a, "tiny", "fp", 60, seed=0)
    write_store(b, "tiny", "fp", 60, seed=1)
    return a, b


def test_new_directory_trains_and_other_stores_in_the_same_directory_refuse(two_stores, tmp_path, capsys):
    a, b = two_stores
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli_main(_fit(first, a)) == 0
    assert _epoch(first) == 1
    # The repro: another store, a new directory -> a new run that trains (not the old one's last.ckpt).
    assert cli_main(_fit(second, b)) == 0
    assert (second / "checkpoints" / "last.ckpt").is_file() and _epoch(second) == 1
    # Other stores in the same directory: one line naming both jobs and the fix, exit 2.
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        cli_main(_fit(first, b, "--ckpt_path", "last"))
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "another job" in err and "stores" in err and "default_root_dir" in err


def test_a_grown_store_is_a_new_job_and_the_same_job_resumes(two_stores, tmp_path, capsys):
    a, _ = two_stores
    run = tmp_path / "run"
    assert cli_main(_fit(run, a)) == 0
    # The same job resumes: nothing left to train, exit 0 (not refused).
    assert cli_main(_fit(run, a, "--ckpt_path", "last")) == 0
    write_store(a, "tiny", "fp", 5, seed=7, start_index=60)  # the store grew
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        cli_main(_fit(run, a, "--ckpt_path", "last"))
    assert done.value.code == 2 and "stores" in capsys.readouterr().err


def test_other_hyperparameters_are_another_job(two_stores, tmp_path, capsys):
    a, _ = two_stores
    run = tmp_path / "run"
    assert cli_main(_fit(run, a)) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        cli_main(_fit(run, a, "--model.init_args.hidden", "32"))  # no --ckpt_path: auto-resume is checked too
    err = capsys.readouterr().err
    assert done.value.code == 2 and "model.hidden" in err


def test_differences_ignore_where_the_data_lives():
    class M:
        hparams = {"lr": 0.1}

    class D:
        def __init__(self, root):
            self.hparams = {"root": root, "num_workers": 2, "batch_size": 64}

    a, b = job_identity(M(), D("/x/cifar.tar.gz")), job_identity(M(), D("/elsewhere/cifar.tar.gz"))
    assert differences(a, b) == []
    c = job_identity(M(), D("/x"))
    c["data"]["batch_size"] = 32
    assert differences(a, c) == ["data.batch_size: 64 -> 32"]
