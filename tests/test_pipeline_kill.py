"""The whole pipeline under kill -9 (issue 18 item 5), and what its resume relies on.

The pipeline test runs ``benchmarks/pipeline_kill.py``'s check with 3 kills at random moments of
random stages after the supernet (seeded by ``APQ_TEST_SEED``, so a failure replays): the killed
and rerun pipeline must end with the uninterrupted run's results table, each sample measured
once, and no finished stage started again (the script's docstring has the details; the script
runs it with a kill in every stage, docs/testing.md has its last result). The fast tests hold
the pieces that make a resumed run end as an uninterrupted one: a resumed fit draws the same
batches (``LastCheckpoint`` stores and restores the random generators), a resumed QAT finetune
keeps its distillation teacher, and the check's own log reading finds a stage started again.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from _benchmarks import load_benchmark

from apq_lightning.callbacks import LastCheckpoint
from apq_lightning.modules import QATModule
from apq_lightning.quant.subnet import clone_float


@pytest.fixture(scope="module")
def check():
    return load_benchmark("pipeline_kill")


@pytest.fixture(scope="module")
def supernet(tmp_path_factory, check) -> Path:
    return check.random_supernet(tmp_path_factory.mktemp("supernet") / "tiny.ckpt")


def _weights_only(obj: object) -> object:
    """``obj`` after a trip through a checkpoint file, loaded as every loader here loads one."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_last_checkpoint_restores_the_random_generators(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    saved = _weights_only(LastCheckpoint(str(tmp_path)).state_dict())
    expected = _draws()
    random.seed(2), np.random.seed(2), torch.manual_seed(2)  # a new process: other states
    assert _draws() != expected
    resumed = LastCheckpoint(str(tmp_path))
    resumed.load_state_dict(saved)
    assert _draws() == expected
    assert resumed.dirpath == saved["dirpath"]  # ModelCheckpoint's own state is restored as before
    older = {k: v for k, v in saved.items() if k != "rng"}  # a checkpoint written before the states were
    LastCheckpoint(str(tmp_path)).load_state_dict(older)


@pytest.mark.parametrize("teacher", ["subnet", "largest"])
def test_a_resumed_qat_finetune_keeps_its_teacher(supernet, teacher):
    def module() -> QATModule:
        return QATModule(supernet_ckpt=str(supernet), space="tiny", policy="uniform4", kd_ratio=1.0, teacher=teacher)

    trained = module()
    trained.set_teacher(clone_float(trained.model) if teacher == "subnet" else trained.teacher)
    for buf in trained.teacher.buffers():  # what prepare()'s BN re-calibration changes
        if buf.dtype.is_floating_point:
            buf.add_(0.25)
    trained.prepared = True
    ckpt: dict = {}
    trained.on_save_checkpoint(ckpt)
    resumed = module()
    assert (resumed.teacher is None) == (teacher == "subnet")  # prepare() makes it, and a resume skips prepare()
    resumed.on_load_checkpoint(_weights_only(ckpt))
    want, got = trained.teacher.state_dict(), resumed.teacher.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want if torch.is_tensor(want[k]))
    assert not any(p.requires_grad for p in resumed.teacher.parameters())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(trained.teacher.eval()(x), resumed.teacher(x))


def test_the_check_finds_a_finished_stage_started_again(tmp_path, check):
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text("# pipeline run 1\n$ apq predict fp\nsamples...\n== stage 2 FP samples: 3 s\n$ apq fit fp\n"
                 "== stage 3 FP predictor: 5 s\n")
    stage_of = check.commands_by_stage(a)
    assert stage_of == {"$ apq predict fp": "2 FP samples", "$ apq fit fp": "3 FP predictor"}
    b.write_text("# pipeline run 1\n$ apq predict fp\n== stage 2 FP samples: 3 s\n$ apq fit fp\n"
                 "# pipeline run 2\n== stage 2 FP samples: done by an earlier run, skipped\n$ apq fit fp\n"
                 "== stage 3 FP predictor: 4 s\n")
    assert check.redone_stages(b, stage_of) == ([], {"2 FP samples", "3 FP predictor"})
    b.write_text(b.read_text() + "# pipeline run 3\n$ apq predict fp\n== stage 2 FP samples: 1 s\n")
    assert check.redone_stages(b, stage_of)[0] == ["$ apq predict fp"]
    assert len(check.driver_runs(b)) == 3


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_pipeline_killed_in_later_stages_ends_as_an_uninterrupted_run(tmp_path, check, seed):
    summary = check.run_check(tmp_path, kills=3, seed=seed)
    print(f"kills landed in {summary['kills_landed_in']}; {summary['wall_s']} s")
    assert summary["failures"] == [], summary
