"""What the pipeline's kill check (``benchmarks/pipeline_kill.py``, issue 18 item 5) relies on.

The check kills the whole tiny pipeline at random moments and compares the end with an
uninterrupted run; it takes ~10 minutes, so it runs by hand (docs/testing.md has its last
result). Here, in the suite: a resumed fit draws the batches the uninterrupted one would
(``LastCheckpoint`` stores and restores the random generators), a resumed QAT finetune keeps its
distillation teacher, a QAT finetune killed after an epoch ends with the uninterrupted run's
weights, and the check's own log reading finds a redone stage.
"""

from __future__ import annotations

import importlib.util
import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from apq_lightning.callbacks import LastCheckpoint
from apq_lightning.modules import QATModule
from apq_lightning.quant.subnet import clone_float

ROOT = Path(__file__).resolve().parents[1]


def _load_check():
    spec = importlib.util.spec_from_file_location("pipeline_kill", ROOT / "benchmarks" / "pipeline_kill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def check():
    return _load_check()


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
def test_a_qat_finetune_killed_after_an_epoch_ends_with_the_same_weights(tmp_path, supernet):
    """Before the random states and the teacher were in the checkpoint, the resumed epochs drew
    other batches and trained without distillation: the pipeline's finetuned top-1 changed."""

    def fit(run: str, kill: bool = False) -> dict:
        recipe = str(ROOT / "recipes" / "finetune_tiny.yaml")
        cmd = [sys.executable, "-m", "apq_lightning.cli", "fit", "--config", recipe,
               "--model.supernet_ckpt", str(supernet), "--trainer.default_root_dir", run, "--trainer.max_epochs", "3",
               "--trainer.limit_train_batches", "4", "--model.init_args.calib_batches", "1",
               "--model.init_args.bn_calib_batches", "1", "--trainer.enable_progress_bar", "false",
               "--ckpt_path", "last"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
        last = tmp_path / run / "checkpoints" / "last.ckpt"
        if kill:  # killed after its first epoch's checkpoint, in the second epoch
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 300
            while proc.poll() is None and not last.exists() and time.time() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert torch.load(last, weights_only=True)["epoch"] < 2, "the kill came after the run had ended"
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return torch.load(last, weights_only=True)

    whole, resumed = fit("whole"), fit("resumed", kill=True)
    assert (whole["epoch"], whole["global_step"]) == (resumed["epoch"], resumed["global_step"]) == (2, 12)
    for part in (whole["state_dict"], whole["apq_qat"]["teacher"]):
        other = resumed["state_dict"] if part is whole["state_dict"] else resumed["apq_qat"]["teacher"]
        differ = [k for k, v in part.items() if torch.is_tensor(v) and not torch.equal(v, other[k])]
        assert not differ, f"resumed weights differ from the uninterrupted run's: {differ[:5]}"
