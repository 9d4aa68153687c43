"""Resume never silently restarts; recipes train the epochs their phases say (issue 11, items 2-3).

The kill test runs the tiny supernet recipe (redirected to tmp_path, phases shortened) as a
subprocess, SIGKILLs it at chosen and random moments -- mid-checkpoint-write, during
validation, at a random moment of training -- restarts it with ``--ckpt_path last`` each time, and checks
that the final run ends where an uninterrupted one would, with ``last.ckpt`` intact.
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from apq_lightning.checkpointing import AtomicCheckpointIO, clean_stale_temporaries, partial_name
from apq_lightning.cli import main as cli_main
from apq_lightning.modules import load_supernet

ROOT = Path(__file__).resolve().parents[1]
BATCHES = 3  # training batches per epoch in the test recipe
PHASES = [{"name": "full", "epochs": 1}, {"name": "kernel", "epochs": 1}, {"name": "width", "epochs": 1}]

HOOKS = textwrap.dedent(
    """
    # Test-only hooks, imported by the fit subprocess: marks what the run is doing, and a
    # checkpoint writer that pauses half-way through the file so the test can kill it there.
    import io, os, time
    from pathlib import Path
    import lightning as L
    import torch
    from apq_lightning.checkpointing import AtomicCheckpointIO

    MARKS = Path(os.environ["APQ_TEST_MARKS"])

    def mark(name, text=""):
        with open(MARKS / name, "a") as f:
            f.write(text + "\\n")

    class Marks(L.Callback):
        def on_train_start(self, trainer, module):
            mark("starts", f"{os.environ['APQ_TEST_RUN']} {trainer.current_epoch} {trainer.global_step}")
        def on_train_batch_end(self, trainer, *args):
            mark("step", str(trainer.global_step))
        def on_validation_start(self, trainer, module):
            mark("val", str(trainer.current_epoch))

    class SlowCheckpointIO(AtomicCheckpointIO):
        def _write(self, checkpoint, tmp):
            buf = io.BytesIO()
            torch.save(checkpoint, buf)
            data = buf.getvalue()
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                mark("writing", str(tmp))
                if len((MARKS / "writing").read_text().splitlines()) == int(os.environ["APQ_TEST_PAUSE_AT"]):
                    time.sleep(60)  # the test kills the run here, half-way through the file
                f.write(data[len(data) // 2 :])
    """
)


def tiny_recipe(tmp: Path, phases: list[dict], hooks: bool = False) -> Path:
    """``recipes/supernet_tiny.yaml`` with every path in ``tmp``, short epochs, no W&B / plots."""
    r = yaml.safe_load((ROOT / "recipes" / "supernet_tiny.yaml").read_text())
    ck = str(tmp / "checkpoints")
    t = r["trainer"]
    t.update(default_root_dir=str(tmp), logger=False, enable_progress_bar=False, enable_model_summary=False,
             limit_train_batches=BATCHES, limit_val_batches=2, num_sanity_val_steps=0, accelerator="cpu")
    t["callbacks"] = [
        {"class_path": "apq_lightning.callbacks.LastCheckpoint", "init_args": {"dirpath": ck}},
        {"class_path": "apq_lightning.callbacks.ProgressExceptionCheckpoint", "init_args": {"dirpath": ck}},
    ]
    if hooks:
        t["callbacks"].append({"class_path": "killhooks.Marks"})
        t["plugins"] = [{"class_path": "killhooks.SlowCheckpointIO"}]
    r["model"]["init_args"].update(phases=phases, bn_calib_batches=1, num_random_eval=0)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _ckpt_state(path: Path) -> tuple[int, int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return int(ckpt["epoch"]), int(ckpt["global_step"])


class FitProcess:
    """``apq fit --config recipe --ckpt_path last`` in a subprocess, with its marks directory."""

    def __init__(self, tmp: Path, recipe: Path, run: int, pause_at_write: int = 0) -> None:
        self.marks = tmp / "marks"
        for old in self.marks.glob("*"):
            if old.name != "starts":
                old.unlink()
        self.marks.mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp), str(ROOT)]), "OMP_NUM_THREADS": "1",
               "APQ_TEST_MARKS": str(self.marks), "APQ_TEST_RUN": str(run), "APQ_TEST_PAUSE_AT": str(pause_at_write),
               "TMPDIR": str(tmp / "tmpdir"), "WANDB_MODE": "offline"}
        self.log = open(tmp / "fit.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "apq_lightning.cli", "fit", "--config", str(recipe), "--ckpt_path", "last"],
            cwd=tmp, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def count(self, name: str) -> int:
        p = self.marks / name
        return len(p.read_text().splitlines()) if p.exists() else 0

    def wait_for(self, name: str, n: int = 1, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while self.count(name) < n:
            assert self.proc.poll() is None, f"fit ended (rc {self.proc.returncode}) before mark {name!r} #{n}"
            assert time.monotonic() < end, f"no mark {name!r} #{n} within {timeout} s"
            time.sleep(0.02)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()

    def finish(self, timeout: float = 300.0) -> int:
        rc = self.proc.wait(timeout)
        self.log.close()
        return rc


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume(tmp_path):
    """Killed mid-write, in validation and at a random moment of training, the run still ends at
    the same epoch and step as an uninterrupted one, each restart resumes (never restarts), no
    temporary is left in $TMPDIR or beside the checkpoints, and last.ckpt loads."""
    (tmp_path / "killhooks.py").write_text(HOOKS)
    (tmp_path / "tmpdir").mkdir()
    recipe = tiny_recipe(tmp_path, PHASES, hooks=True)
    last = tmp_path / "checkpoints" / "last.ckpt"
    total = sum(p["epochs"] for p in PHASES)
    rng = random.Random(11)
    resumed_from: list[tuple[int, int] | None] = []

    def start(pause_at_write: int = 0) -> FitProcess:
        resumed_from.append(_ckpt_state(last) if last.exists() else None)
        return FitProcess(tmp_path, recipe, len(resumed_from) - 1, pause_at_write)

    # 1. killed half-way through writing the second last.ckpt: the first one must survive
    run = start(pause_at_write=2)
    run.wait_for("writing", 2)
    run.kill()
    assert _ckpt_state(last) == (0, BATCHES)
    assert len(list(last.parent.glob(".last.ckpt.*.partial"))) == 1  # the torn temporary, beside it
    # 2. killed during validation of the resumed epoch
    run = start()
    run.wait_for("val")
    run.kill()
    # 3. killed at a random moment of training: after a random number of steps, a random delay
    #    later (in a step, in validation or in a save)
    run = start()
    run.wait_for("step", rng.randint(1, BATCHES))
    time.sleep(rng.uniform(0.0, 2.0))
    run.kill()
    # 4. runs to the end
    run = start()
    assert run.finish() == 0, (tmp_path / "fit.log").read_text()[-3000:]

    assert _ckpt_state(last) == (total - 1, total * BATCHES)  # as an uninterrupted run ends
    assert load_supernet(str(last)).space.name == "tiny"
    assert not list(last.parent.glob("*.partial")), "stale temporaries of killed saves were not cleaned"
    leftovers = [p for p in (tmp_path / "tmpdir").iterdir() if p.is_file()]  # (wandb makes directories there)
    assert not leftovers, f"checkpoint temporaries went to $TMPDIR: {leftovers}"
    # every run that got to training resumed from the checkpoint it found, never from scratch
    starts = [tuple(map(int, line.split())) for line in (run.marks / "starts").read_text().splitlines()]
    # a run whose checkpoint already held the final epoch (the random kill came after training
    # ended) has nothing to train and never starts
    final = (total - 1, total * BATCHES)
    assert [run_id for run_id, _, _ in starts] == [i for i, found in enumerate(resumed_from) if found != final]
    for i, epoch, step in starts:
        found = resumed_from[i]
        assert (epoch, step) == ((found[0] + 1, found[1]) if found else (0, 0)), (i, found, starts)


def _fit(tmp: Path, recipe: Path, *extra: str) -> int:
    try:
        return cli_main(["fit", "--config", str(recipe), *extra])
    except SystemExit as exc:
        return int(exc.code or 0)


def test_torn_last_checkpoint_is_reported_not_restarted(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe(tmp_path, PHASES)
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 3}, ck / "on_exception.ckpt")
    os.utime(ck / "on_exception.ckpt", (1, 1))  # older than last.ckpt
    (ck / "last.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a torn zip
    stale = partial_name(ck / "last.ckpt")
    stale.write_bytes(b"half a checkpoint")
    for args in ([], ["--ckpt_path", "last"]):  # fit resumes from "last" by itself, too
        assert _fit(tmp_path, recipe, *args) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"fit: checkpoint {ck / 'last.ckpt'} cannot be read (truncated or not a checkpoint")
        assert f"delete it to resume from {ck / 'on_exception.ckpt'}, or pass --ckpt_path <another file>" in err
    assert (ck / "last.ckpt").read_bytes()[:4] == b"PK\x03\x04"  # untouched, not overwritten by a new run
    assert not stale.exists()  # temporaries of killed saves are cleaned at start


def test_phases_on_the_command_line_set_the_epochs(tmp_path, monkeypatch):
    """``max_epochs: null`` follows the phases actually used, not the recipe's (it was 12)."""
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe(tmp_path, PHASES)
    assert _fit(tmp_path, recipe, "--model.init_args.phases", "[{name: full, epochs: 1}]",
                "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1") == 0
    assert _ckpt_state(tmp_path / "checkpoints" / "last.ckpt") == (0, 2)


def test_atomic_checkpoint_io_writes_beside_the_target(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmpdir"))
    (tmp_path / "tmpdir").mkdir()
    target = tmp_path / "ck" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "epoch": 0}, target)
    io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "epoch": 1}, target)
    assert torch.load(target, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert not list((tmp_path / "tmpdir").iterdir())
    # a failed write leaves the previous file and no temporary
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):  # a lambda cannot be pickled
        io.save_checkpoint({"bad": lambda: None}, target)
    assert torch.load(target, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    # only our temporaries are cleaned
    stale, other = partial_name(target), target.parent / "notes.partial"
    stale.write_text("x")
    other.write_text("y")
    assert clean_stale_temporaries([target.parent]) == [stale]
    assert other.exists()
