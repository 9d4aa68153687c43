"""The whole pipeline under ``kill -9`` (issue 18, item 5): every stage after the supernet.

A reduced tiny pipeline (:data:`PRESET`: one budget, few samples, short fits) runs twice from
the same supernet: once uninterrupted (run A), and once (run B) killed -- the driver's whole
process group, ``SIGKILL`` -- at random moments of randomly chosen later stages, rerun after
each kill, and finally run to the end. B must end as A did:

* the same results table (every row and value except ``search s``, a wall time);
* every sample store holds each index exactly once, with A's accuracies (none measured twice);
* no finished stage redone: once a stage's ``== stage`` line is in the log, no later driver run
  starts its command again (``stages_done.json`` skips it).

The supernet is a random tiny one, not trained: what is tested is the pipeline's bookkeeping,
and each stage's resume. The kill moments come from ``APQ_TEST_SEED`` (the ``seed`` fixture),
so a failure replays with the same seed; docs/testing.md records the last run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from apq_lightning.collection import read_samples
from apq_lightning.stages import PRESETS
from apq_lightning.supernet import Supernet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]
PRESET = dict(
    name="kill", budgets=(0.6,), fp_samples=40, mp_samples=16, generations=10, baseline_bits="8",
    overrides={"predictor_fp": ("--trainer.max_epochs", "10"),
               "predictor_mp": ("--trainer.max_epochs", "10", "--data.init_args.val_fraction", "0.3"),
               "collect_mp": ("--model.init_args.qat_steps", "2", "--model.init_args.qat_batch_size", "32",
                              "--model.init_args.method", "minmax", "--model.init_args.calib_batches", "1"),
               "finetune": ("--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6",
                            "--model.init_args.calib_batches", "1", "--model.init_args.bn_calib_batches", "1")},
    transfer_sizes="8,all", transfer_seeds="0", transfer_epochs=10,
)
LAUNCHER = f"""
import dataclasses, sys
from apq_lightning import stages
stages.PRESETS["kill"] = dataclasses.replace(stages.PRESETS["tiny"], **{PRESET!r})
raise SystemExit(stages.main(sys.argv[1:]))
"""
KILLS = 4  # kills in as many different stages (of the 8 after the supernet)


def _random_supernet(path: Path) -> Path:
    """A random tiny supernet in the checkpoint layout ``load_supernet`` reads (nothing trained)."""
    torch.manual_seed(0)
    net = Supernet("tiny", 10)
    for m in net.modules():  # residual blocks that are not identities, so subnets differ
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    state = {f"supernet.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"space": "tiny", "num_classes": 10, "dropout": 0.0}}, path)
    return path


class Driver:
    """``python -m apq_lightning.stages`` (through the launcher that adds :data:`PRESET`) in its own
    process group, in a folder of its own (every recipe writes under ``runs/`` there)."""

    def __init__(self, folder: Path, supernet: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "launcher.py").write_text(LAUNCHER)
        self.cmd = [sys.executable, "launcher.py", "--preset", "kill", "--supernet", str(supernet)]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore",
                    "PYTHONPATH": str(ROOT)}
        self.out = folder / "runs" / "pipeline_kill"
        self.log = self.out / "pipeline.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.folder / "driver.out", "a") as fh:
            self.proc = subprocess.Popen(self.cmd, cwd=self.folder, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def finish(self, timeout: float = 900) -> None:
        self.start()
        assert self.proc.wait(timeout) == 0, (self.folder / "driver.out").read_text()[-4000:]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the driver and the stage command it runs
        assert self.proc.wait(60) == -signal.SIGKILL

    def current(self, stage_of: dict[str, str]) -> str | None:
        """The stage whose command runs now: the last ``$ apq`` line after the last ``== stage`` line."""
        if not self.log.is_file():
            return None
        current = None
        for line in self.log.read_text().splitlines():
            if line.startswith("$ apq "):
                current = stage_of.get(line, line)
            elif line.startswith("== stage "):
                current = None
        return current


def _commands_by_stage(log: Path) -> dict[str, str]:
    """``$ apq ...`` line -> its stage, from an uninterrupted run's log."""
    stage_of, pending = {}, []
    for line in log.read_text().splitlines():
        if line.startswith("$ apq "):
            pending.append(line)
        elif line.startswith("== stage "):
            name = line[len("== stage "):].rsplit(":", 1)[0]
            stage_of.update(dict.fromkeys(pending, name))
            pending = []
    return stage_of


def _runs(log: Path) -> list[list[str]]:
    """The log split at each driver start."""
    runs: list[list[str]] = []
    for line in log.read_text().splitlines():
        if line.startswith("# pipeline run "):
            runs.append([])
        elif runs:
            runs[-1].append(line)
    return runs


def _table(out: Path) -> list[dict]:
    """results.json's rows without the search wall time (the one value a rerun may change)."""
    rows = json.loads((out / "results.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k != "search_s"} for r in rows]


def test_pipeline_killed_in_later_stages_ends_as_an_uninterrupted_run(tmp_path: Path, seed: int):
    supernet = _random_supernet(tmp_path / "supernet.ckpt")
    a, b = Driver(tmp_path / "A", supernet), Driver(tmp_path / "B", supernet)
    t0 = time.monotonic()
    a.finish()
    uninterrupted_s = time.monotonic() - t0
    stage_of = _commands_by_stage(a.log)
    seconds = json.loads((a.out / "stage_times.json").read_text())
    later = list(seconds)  # every stage after the supernet (--supernet: stage 1 is not run), in order
    assert len(later) == 8 and later[0].startswith("2 ") and later[-1].startswith("baselines"), later

    rng = random.Random(seed)
    targets = sorted(rng.sample(range(len(later)), KILLS))
    landed = []
    for target in targets:
        b.start()
        while b.running() and later.index(b.current(stage_of) or later[0]) < target:
            time.sleep(0.05)
        while b.running() and b.current(stage_of) is None:  # between two stages: wait for the next
            time.sleep(0.05)
        time.sleep(rng.uniform(0.1, 0.8) * seconds[later[target]])
        if not b.running():  # the pipeline ended before this kill: nothing left to kill
            break
        landed.append(b.current(stage_of) or "between stages")
        b.kill()
    b.finish()
    total_b_s = time.monotonic() - t0 - uninterrupted_s
    print(f"uninterrupted {uninterrupted_s:.0f} s; killed run {total_b_s:.0f} s in {len(landed) + 1} driver runs; "
          f"kills landed in {landed}")
    assert len({s for s in landed if s in later}) >= KILLS - 1, f"kills landed in {landed} (aimed at {targets})"

    # the same results table
    assert _table(b.out) == _table(a.out)
    # each sample once, with the accuracy the uninterrupted run measured
    for pattern in (*PRESETS["tiny"].stores("predictor_fp"), *PRESETS["tiny"].stores("predictor_mp")):
        got = {r.index: r.acc for r in read_samples(str(b.folder / pattern))}
        want = {r.index: r.acc for r in read_samples(str(a.folder / pattern))}
        indices = [r.index for r in read_samples(str(b.folder / pattern))]
        assert sorted(indices) == list(range(len(want))), f"{pattern}: indices {sorted(indices)}"
        assert got == want, pattern
    # no finished stage redone: after its "== stage" line, its command never starts again
    finished: set[str] = set()
    runs = _runs(b.log)
    assert len(runs) == len(landed) + 1
    for run in runs:
        for line in run:
            if line.startswith("$ apq "):
                stage = stage_of.get(line, line)
                assert stage not in finished, f"finished stage {stage} started again: {line}"
            elif line.startswith("== stage "):
                finished.add(line[len("== stage "):].rsplit(":", 1)[0])
    assert finished == set(later)
