"""The whole pipeline under ``kill -9`` (issue 18, item 5): every stage after the supernet.

A reduced tiny pipeline (:data:`PRESET`: one budget, 40 FP and 16 MP samples, short fits and
finetunes) runs twice from the same supernet, each in a folder of its own: once uninterrupted
(run A), and once (run B) killed -- the driver's whole process group, ``SIGKILL`` -- at a random
moment of ``--kills`` randomly chosen stages after the supernet (default: all 8), rerun after
each kill, and finally run to the end. B must end as A did:

* the same results table: every row and value except ``search s`` (a wall time);
* each sample store holds every index exactly once, with A's accuracies (none measured twice);
* no finished stage redone: once a stage's ``== stage`` line is in the log, no later driver
  run starts its command again (``stages_done.json`` skips it).

A kill lands at ``uniform(0.1, 0.8)`` x the stage's wall time in run A after B entered the
stage (it may land in a later stage when B's resumed stage ends sooner; where each landed is
reported). The supernet is a random tiny one, not trained: what is checked is the pipeline's
bookkeeping and every stage's resume, not accuracy. ``make test`` runs it with 4 kills
(tests/test_pipeline_kill.py, about 3.5 minutes on the 2-core machine); docs/testing.md
records the last run of this script.

    python benchmarks/pipeline_kill.py [--seed S] [--kills 8] [--work DIR] [--json out.json]

``--seed`` (default ``$APQ_TEST_SEED`` or 0) picks the stages and moments: a failure replays
with the same seed. Exit code 1 when a check fails. Both runs execute the working tree: run it
on a tree nobody edits meanwhile (it says so when the code or a recipe changed during the check).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from apq_lightning.collection import read_samples
from apq_lightning.stages import PRESETS
from apq_lightning.supernet import Supernet

ROOT = Path(__file__).resolve().parents[1]
PRESET = dict(
    name="kill", budgets=(0.6,), fp_samples=40, mp_samples=16, generations=10, baseline_bits="8",
    overrides={"predictor_fp": ("--trainer.max_epochs", "10"),
               "predictor_mp": ("--trainer.max_epochs", "10", "--data.init_args.val_fraction", "0.3"),
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


def random_supernet(path: Path) -> Path:
    """A random tiny quantized-for-all supernet as a weights file (nothing trained beyond a few
    training-mode passes that set its activation ranges): what stage 1 of the tiny preset ends
    with, so every stage runs as in ``make demo`` (stage 4's ``qfa`` protocol needs the quant state)."""
    from apq_lightning.quant.supernet import quantize_supernet
    from apq_lightning.space import get_space
    from apq_lightning.supernet_io import save_supernet_weights

    torch.manual_seed(0)
    net = Supernet("tiny", 10)
    for m in net.modules():  # residual blocks that are not identities, so subnets differ
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    net = quantize_supernet(net, ranges="batch").train()
    with torch.no_grad():
        for i in range(3):
            net.set_active(get_space("tiny").sample(i, quantized=True))
            net(torch.randn(16, 3, 16, 16))
    return save_supernet_weights(net, path, torch.float32)


class Driver:
    """``python -m apq_lightning.stages`` (through a launcher that adds :data:`PRESET`) in its own
    process group and its own folder (every recipe writes under ``runs/`` of the working directory)."""

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

    def finish(self, timeout: float = 3600) -> None:
        self.start()
        if self.proc.wait(timeout) != 0:
            raise RuntimeError(f"the driver failed in {self.folder}:\n"
                               + (self.folder / "driver.out").read_text()[-4000:])

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the driver and the stage command it runs
        self.proc.wait(60)

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


def commands_by_stage(log: Path) -> dict[str, str]:
    """``$ apq ...`` line -> its stage, from an uninterrupted run's log."""
    stage_of, pending = {}, []
    for line in log.read_text().splitlines():
        if line.startswith("$ apq "):
            pending.append(line)
        elif line.startswith("== stage "):
            stage_of.update(dict.fromkeys(pending, _stage_name(line)))
            pending = []
    return stage_of


def _stage_name(line: str) -> str:
    return line[len("== stage "):].rsplit(":", 1)[0]


def driver_runs(log: Path) -> list[list[str]]:
    """The log's lines, split at each driver start."""
    runs: list[list[str]] = []
    for line in log.read_text().splitlines():
        if line.startswith("# pipeline run "):
            runs.append([])
        elif runs:
            runs[-1].append(line)
    return runs


def table(out: Path) -> list[dict]:
    """results.json's rows without the search wall time (the one value a rerun may change)."""
    rows = json.loads((out / "results.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k != "search_s"} for r in rows]


def redone_stages(log: Path, stage_of: dict[str, str]) -> tuple[list[str], set[str]]:
    """Commands started again after their stage had finished (or been skipped as finished), and
    the stages that ended."""
    finished: set[str] = set()
    redone = []
    for run in driver_runs(log):
        for line in run:
            if line.startswith("$ apq ") and stage_of.get(line, line) in finished:
                redone.append(line)
            elif line.startswith("== stage "):
                finished.add(_stage_name(line))
    return redone, finished


def kill_run(a: Driver, b: Driver, kills: int, rng: random.Random) -> tuple[dict[str, str], list[str], list[str]]:
    """Run A to the end, then B with ``kills`` kills; returns A's command->stage map, the stages
    after the supernet in order, and where each kill landed."""
    a.finish()
    stage_of = commands_by_stage(a.log)
    seconds = json.loads((a.out / "stage_times.json").read_text())
    later = list(seconds)  # --supernet: stage 1 is not run, so these are the stages after it, in order
    landed = []
    for target in sorted(rng.sample(range(len(later)), kills)):
        b.start()
        while b.running() and later.index(b.current(stage_of) or later[0]) < target:
            time.sleep(0.05)
        while b.running() and b.current(stage_of) is None:  # between two stages: wait for the next
            time.sleep(0.05)
        time.sleep(rng.uniform(0.1, 0.8) * seconds[later[target]])
        if not b.running():
            break
        landed.append(b.current(stage_of) or "between stages")
        b.kill()
    b.finish()
    return stage_of, later, landed


def check(a: Driver, b: Driver, stage_of: dict[str, str], later: list[str], landed: list[str]) -> list[str]:
    """What differs between the killed run B and the uninterrupted run A (empty: nothing)."""
    failures = []
    if table(b.out) != table(a.out):
        diff = [(x, y) for x, y in zip(table(a.out), table(b.out), strict=False) if x != y]
        failures.append(f"results tables differ: {diff or 'in the number of rows'}")
    for pattern in (*PRESETS["tiny"].stores("predictor_fp"), *PRESETS["tiny"].stores("predictor_mp")):
        records = read_samples(str(b.folder / pattern))
        want = {r.index: r.acc for r in read_samples(str(a.folder / pattern))}
        indices = sorted(r.index for r in records)
        if indices != sorted(want):
            failures.append(f"{pattern}: indices {indices}, not each of 0..{len(want) - 1} once")
        elif {r.index: r.acc for r in records} != want:
            failures.append(f"{pattern}: accuracies differ from the uninterrupted run's")
    redone, finished = redone_stages(b.log, stage_of)
    failures += [f"a finished stage started again: {line}" for line in redone]
    if finished != set(later):
        failures.append(f"stages that never ended: {sorted(set(later) - finished)}")
    if len(driver_runs(b.log)) != len(landed) + 1:
        failures.append(f"{len(driver_runs(b.log))} driver runs in the log for {len(landed)} kills")
    if len({s for s in landed if s in later}) < max(1, len(landed) - 1):
        failures.append(f"kills landed in too few stages: {landed}")
    return failures


def code_digest() -> str:
    """The code and recipes both runs execute: a tree edited during the check compares two programs."""
    h = hashlib.sha256()
    for path in sorted(p for d in ("apq_lightning", "callbacks", "recipes") for p in (ROOT / d).rglob("*")
                       if p.suffix in (".py", ".yaml")):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def run_check(work: Path, kills: int, seed: int) -> dict:
    """Both runs in ``work`` (an empty folder), the checks, and a summary; ``failures`` empty = passed."""
    supernet = random_supernet(work / "supernet.ckpt")
    a, b = Driver(work / "A", supernet), Driver(work / "B", supernet)
    start, code = time.monotonic(), code_digest()
    try:
        stage_of, later, landed = kill_run(a, b, kills, random.Random(seed))
    finally:
        for driver in (a, b):
            if driver.running():
                driver.kill()
    failures = check(a, b, stage_of, later, landed)
    if code_digest() != code:
        failures.insert(0, "the code or a recipe changed during the check: rerun it on a tree nobody edits")
    return {"seed": seed, "kills_landed_in": landed, "driver_runs": len(landed) + 1,
            "uninterrupted_stage_s": json.loads((a.out / "stage_times.json").read_text()),
            "killed_stage_s": json.loads((b.out / "stage_times.json").read_text()),
            "wall_s": round(time.monotonic() - start), "work": str(work), "failures": failures}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=int(os.environ.get("APQ_TEST_SEED", "0")))
    ap.add_argument("--kills", type=int, default=8, help="kills, each in another stage after the supernet (1-8; "
                    "default 8: one in every stage)")
    ap.add_argument("--work", default=None, help="an empty folder for the two runs (default: a new temporary one, "
                    "kept)")
    ap.add_argument("--json", default=None, help="write the summary here too")
    args = ap.parse_args(argv)
    if not 1 <= args.kills <= 8:
        ap.error(f"--kills {args.kills}: allowed 1..8 (the stages after the supernet)")
    work = Path(args.work or tempfile.mkdtemp(prefix="pipeline_kill_"))
    if work.exists() and any(work.iterdir()):
        ap.error(f"--work {work}: not empty (the runs of an earlier check would be skipped); give a new folder")
    work.mkdir(parents=True, exist_ok=True)
    summary = run_check(work, args.kills, args.seed)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
