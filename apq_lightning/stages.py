"""All seven stages of APQ in one resumable command (``make demo``, ``make pipeline``).

Each stage is one ``apq`` command on a recipe, run as its own process, exactly as a user would
type it; stages pass files (checkpoints, sample stores, search results), never globals. Every
command is resumable by itself (``--ckpt_path last`` for fits, finished indices skipped by the
collections, finished final runs skipped), so rerunning this driver after a kill finishes the
interrupted stage. The done ones are not even started again: ``<out>/stages_done.json`` records
each command that finished with a digest of its inputs and outputs (:class:`DoneLedger`), and a
command whose record still matches is skipped. One driver at a time per ``<out>``: a second one
is refused with one line naming the first (:func:`apq_lightning.locks.run_lock`).

    python -m apq_lightning.stages --preset tiny                      # digits, offline, minutes
    python -m apq_lightning.stages --preset cifar --data PATH.tar.gz  # CIFAR-10, CPU hours

At the end it prints (and writes ``<out>/results.md``, its data in ``<out>/results.json``) a table:
the searched subnets under each budget with predicted and achieved accuracy after QAT, latency,
energy and BitOps, beside the fixed-precision baselines, and it names the folder of the PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from apq_lightning.cli import STAGES
from apq_lightning.final.results import (
    Budget,
    accuracy_vs_latency_plot,
    budget_constraints,
    budget_name,
    close_calls,
    finalist_diagnosis,
    results_rows,
    results_table,
    seed_run_dir,
)
from apq_lightning.locks import RunLockedError, run_lock
from apq_lightning.loggers import log_images
from apq_lightning.outputs import write_json
from apq_lightning.step_ledger import DoneLedger, Step


@dataclass(frozen=True)
class Preset:
    """What one pipeline run trains, collects and searches (sizes chosen for its machine)."""

    name: str
    supernet: str
    collect_fp: str
    collect_mp: str
    predictor_fp: str
    predictor_mp: str
    finetune: str
    budgets: tuple[Budget, ...]  # of the searches: BitFusion latency in ms, or "latency_ms=X+energy_mJ=Y"
    fp_samples: int
    mp_samples: int
    generations: int
    baseline_bits: str = "8,4"
    # Per-stage options appended to a stage's command (the preset's sizing of a recipe), keyed by
    # supernet / collect_fp / collect_mp / predictor_fp / predictor_mp / finetune / transfer_study.
    overrides: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # The predictor-transfer study (APQ Fig. 7) on this run's stores: sizes, seeds, epochs.
    transfer_sizes: str = "8,16,all"
    transfer_seeds: str = "0,1"
    transfer_epochs: int = 60
    # Finetune seeds of every finetuned method (APQ, fixed precision, sequential): paired differences to APQ
    # with their standard error. Empty: one finetune with the recipe's seed.
    finetune_seeds: tuple[int, ...] = ()
    # Seeds added, after the baselines, to APQ and to each baseline within two standard errors of it
    # (final.results.close_calls): the "more seeds where two methods are close".
    added_seeds: tuple[int, ...] = ()
    float_reference: bool = False  # also finetune every finetuned subnet unquantized (what quantization costs)
    needs_data: bool = True  # the recipes read a dataset given with --data (tiny: scikit-learn's digits, built in)

    def args(self, stage: str) -> tuple[str, ...]:
        if stage not in STAGE_KEYS:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_KEYS)}")
        return tuple(self.overrides.get(stage, ()))

    def recipe(self, stage: str) -> str:
        """The recipe file of a stage: relative to the working directory, else to the repository."""
        path = Path(getattr(self, stage))
        if path.is_absolute() or path.is_file() or not (REPO / path).is_file():
            return str(path)
        return str(REPO / path)

    def config(self, stage: str) -> dict:
        """A stage's recipe as plain YAML (no interpolation: read only for paths written out)."""
        return yaml.safe_load(Path(self.recipe(stage)).read_text()) or {}

    def run(self, stage: str) -> Path:
        """The run directory of a stage's recipe (its ``trainer.default_root_dir``)."""
        root = (self.config(stage).get("trainer") or {}).get("default_root_dir")
        if not root:
            raise ValueError(f"{self.recipe(stage)}: the recipe names no trainer.default_root_dir")
        return Path(root)

    def stores(self, stage: str) -> list[str]:
        """The sample stores a predictor recipe trains on (its ``data.init_args.stores``)."""
        stores = ((self.config(stage).get("data") or {}).get("init_args") or {}).get("stores")
        return [stores] if isinstance(stores, str) else list(stores or [])


STAGE = {s.number: s.label for s in STAGES}
"""Stage labels by number, from the one stage table (:data:`apq_lightning.cli.STAGES`)."""
STAGE_KEYS = ("supernet", "collect_fp", "collect_mp", "predictor_fp", "predictor_mp", "finetune", "transfer_study")
REPO = Path(__file__).resolve().parents[1]


PRESETS: dict[str, Preset] = {
    # digits, 16 px, tiny space: a few minutes on 2 CPU cores. Budgets: about the 25th and 70th
    # percentile of random tiny subnets' BitFusion latency (fitted model). Stage 1 ends with the
    # quantized-for-all phase, which stage 4's `qfa` protocol scores subnets + policies in.
    "tiny": Preset(
        "tiny", "recipes/supernet_tiny_qfa.yaml", "recipes/collect_fp_tiny.yaml", "recipes/collect_mp_tiny.yaml",
        "recipes/predictor_fp_tiny.yaml", "recipes/predictor_mp_tiny.yaml", "recipes/finetune_tiny.yaml",
        budgets=(0.45, 0.6), fp_samples=200, mp_samples=40, generations=100, needs_data=False,
    ),
    # CIFAR-10, apq_cifar: the study of docs/results/cifar10.md, sized for 2 CPU cores in resumable
    # chunks (6-8 CPU-hours from a trained supernet). Budgets spread over the BitFusion latency of
    # random apq_cifar subnets BitFusion can run (5th / 25th / 50th / 95th percentile 0.54 / 0.75 /
    # 0.92 / 1.31 ms with the 'spread' policies; about half cannot run: no 4-bit 7x7 depthwise in the
    # table), and one latency + energy budget (0.7 mJ: the 25th percentile of the energy of runnable
    # subnets within 0.7 ms), so that "fixed 6-bit uses less energy" is tested, not stated. MP
    # samples: 2,000 `qfa` labels (about 3.5 s each on one core; docs/collection.md §5.1). Every
    # finetuned method (300-step QAT, about 2 min each) runs with 3 seeds, plus its float reference.
    "cifar": Preset(
        "cifar", "recipes/supernet_cifar.yaml", "recipes/collect_fp.yaml", "recipes/collect_mp.yaml",
        "recipes/predictor_fp.yaml", "recipes/predictor_mp.yaml", "recipes/finetune_short.yaml",
        budgets=(0.5, 0.75, 1.0, "latency_ms=0.75+energy_mJ=0.7"), fp_samples=800, mp_samples=2000,
        generations=500, baseline_bits="8,6,4", finetune_seeds=(0, 1, 2), added_seeds=(3, 4), float_reference=True,
        overrides={"collect_fp": ("--model.init_args.eval_images", "2000")},
        transfer_sizes="25,50,100,all", transfer_seeds="0,1,2", transfer_epochs=150,
    ),
}


def _apq(args: list[str], log: Path) -> None:
    """Run one ``apq`` command in its own process, its output to the terminal and to ``log``."""
    cmd = [sys.executable, "-m", "apq_lightning.cli", *args]
    print(f"\n$ apq {shlex.join(args)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write(f"\n$ apq {shlex.join(args)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"stage failed (exit {proc.returncode}): apq {shlex.join(args)}\n--- {log} (end) ---\n{tail}")


def run_pipeline(p: Preset, out: Path, data: list[str], supernet: str | None = None,
                 qfa_supernet: str | None = None) -> dict[str, float]:
    """Run the seven stages (and the transfer study); returns the wall time of each (seconds).

    ``supernet``: a trained supernet (stage-1 checkpoint or weights-only file, e.g. the shipped
    ``weights/apq_cifar_supernet.pt``) to start from at stage 2; ``None`` trains stage 1.
    ``qfa_supernet``: the supernet stage 4 scores MP samples in (``protocol: qfa`` needs one
    trained with the quant phase, e.g. ``weights/apq_cifar_qfa_supernet.pt``); ``None`` = the same
    as stage 2's. A stage-1 run of the presets ends with the quant phase, so one checkpoint serves
    every stage (FP samples and finetunes use its float weights).
    A stage an earlier run of ``out`` finished (:class:`DoneLedger`) is skipped: 0 s.
    """
    log = out / "pipeline.log"
    times: dict[str, float] = {}
    supernet_ckpt = Path(supernet) if supernet else p.run("supernet") / "checkpoints" / "last.ckpt"
    mp_supernet = Path(qfa_supernet) if qfa_supernet else supernet_ckpt
    if qfa_supernet and not mp_supernet.is_file():
        raise SystemExit(f"--qfa-supernet {qfa_supernet}: no such file (a supernet trained with the quant phase)")
    fp_ckpt = p.run("predictor_fp") / "checkpoints" / "last.ckpt"
    mp_ckpt = p.run("predictor_mp") / "checkpoints" / "last.ckpt"
    fp_stores, mp_stores = tuple(p.stores("predictor_fp")), tuple(p.stores("predictor_mp"))

    ledger = out / "stage_times.json"  # wall seconds per stage, added up over reruns (resumed chunks)
    done = DoneLedger(out / "stages_done.json")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:  # where each run (a resumed chunk) starts in the log
        fh.write(f"\n# pipeline run of preset {p.name}, started {time.strftime('%Y-%m-%d %H:%M:%S')} "
                 f"(pid {os.getpid()})\n")

    def stage(name: str, *steps: Step) -> None:
        t = time.perf_counter()
        ran = False
        for step in steps:
            key = done.key(step)
            if done.done(step, key):
                continue
            _apq(list(step.args), log)
            done.record(step, key)
            ran = True
        times[name] = time.perf_counter() - t
        total = json.loads(ledger.read_text()) if ledger.is_file() else {}
        total[name] = total.get(name, 0.0) + times[name]
        write_json(ledger, total)  # atomic: a kill while it is written leaves the previous one
        line = f"== stage {name}: {times[name]:.0f} s" if ran else f"== stage {name}: done by an earlier run, skipped"
        with log.open("a") as fh:
            fh.write(line + "\n")
        print(line, flush=True)

    if supernet is None:
        stage(STAGE["1"], Step(("fit", "--config", p.recipe("supernet"), *data, "--ckpt_path", "last",
                                *p.args("supernet")), outputs=(str(supernet_ckpt),)))
    elif not supernet_ckpt.is_file():
        raise SystemExit(f"--supernet {supernet}: no such file (a stage-1 checkpoint or supernet weights file)")
    stage(STAGE["2"], Step(("predict", "--config", p.recipe("collect_fp"), *data, "--model.init_args.supernet_ckpt",
                            str(supernet_ckpt), "--data.init_args.num_samples", str(p.fp_samples),
                            *p.args("collect_fp")), outputs=fp_stores))
    stage(STAGE["3"], Step(("fit", "--config", p.recipe("predictor_fp"), "--ckpt_path", "last",
                            *p.args("predictor_fp")), outputs=(str(fp_ckpt),), inputs=fp_stores))
    stage(STAGE["4"], Step(("predict", "--config", p.recipe("collect_mp"), *data, "--model.init_args.supernet_ckpt",
                            str(mp_supernet), "--data.init_args.num_samples", str(p.mp_samples),
                            *p.args("collect_mp")), outputs=mp_stores))
    stage(STAGE["5"], Step(("fit", "--config", p.recipe("predictor_mp"), "--model.init_args.transfer_from",
                            str(fp_ckpt), "--ckpt_path", "last", *p.args("predictor_mp")),
                           outputs=(str(mp_ckpt),), inputs=mp_stores))
    study = out / "transfer_study"
    # The study and the searches are also skipped when their files exist (as before the ledger).
    if not (study / "transfer_study.json").is_file():
        stage(STAGE["5b"], Step(("transfer-study", "--fp-stores", *fp_stores, "--mp-stores", *mp_stores,
                                 "--sizes", p.transfer_sizes, "--seeds", p.transfer_seeds, "--epochs",
                                 str(p.transfer_epochs), "--out", str(study), *p.args("transfer_study")),
                                outputs=(str(study / "transfer_study.json"),), inputs=fp_stores + mp_stores))
    searches = []
    for b in p.budgets:
        name = budget_name(b)
        limits = tuple(a for c in budget_constraints(b) for a in ("--constraint", c))
        res = out / "search" / f"{name}.json"
        searches.append((b, res))
        if not (res.is_file() and res.with_suffix(".png").is_file()):
            stage(f"{STAGE['6']} {name}", Step((
                "search", "--predictor", str(mp_ckpt), "--hardware", "bitfusion", *limits,
                "--generations", str(p.generations), "--seed", "0", "--out", str(res),
                "--plot", str(res.with_suffix(".png"))), outputs=(str(res), str(res.with_suffix(".png")))))
    finetune = (*data, *p.args("finetune"))
    seeds = p.finetune_seeds

    def final_step(source: tuple[str, str], run: Path, seed: int | None, table: Path, *extra: str) -> Step:
        """``apq final`` of a search result or subnet file (``source``) into ``run``."""
        return Step(("final", *source, "--supernet", str(supernet_ckpt), "--recipe", p.recipe("finetune"), "--out",
                     str(run), "--table", str(table), *finetune, *extra,
                     *(() if seed is None else ("--seed_everything", str(seed)))), outputs=(str(run / "final.json"),))

    for b, res in searches:
        name = budget_name(b)
        final, src = out / "final" / name, ("--search", str(res))
        runs = [final_step(src, seed_run_dir(final, s, seeds), s, out / "final" / "report") for s in (seeds or (None,))]
        if p.float_reference:  # APQ's subnet unquantized, the first seed
            runs.append(final_step(src, Path(f"{final}.float"), seeds[0] if seeds else None, out / "final" / "report",
                                   "--label", "APQ (float)", "--no-onnx", "--model.policy", "float"))
        stage(f"{STAGE['7']} {name}", *runs)
    for b in p.budgets:
        name = budget_name(b)
        common = ("--fp-predictor", str(fp_ckpt), "--mp-predictor", str(mp_ckpt), "--hardware", "bitfusion",
                  *(a for c in budget_constraints(b) for a in ("--constraint", c)), "--generations", str(p.generations))
        finetuned, predicted = out / "baselines" / name, out / "baselines_predicted" / name
        seeded = (("--finetune-seeds", ",".join(map(str, seeds))) if seeds else ()) + (
            ("--float-reference",) if p.float_reference else ())
        # Fixed precision and the sequential pipeline are finetuned like APQ's subnets (achieved
        # accuracy); the largest subnet and random search are compared on predicted accuracy.
        stage(f"{STAGE['baselines']} {name}",
              Step(("baselines", *common, "--methods", "fp-search,sequential", "--bits", p.baseline_bits,
                    "--out", str(finetuned), "--finetune", *seeded, "--supernet", str(supernet_ckpt),
                    "--recipe", p.recipe("finetune"), *finetune), outputs=(str(finetuned / "baselines.json"),)),
              Step(("baselines", *common, "--methods", "largest,random", "--bits", p.baseline_bits,
                    "--out", str(predicted)), outputs=(str(predicted / "baselines.json"),)))
    if p.added_seeds and seeds:
        for name, methods in close_calls(results_rows(p.budgets, out, seeds)).items():
            stage(f"more seeds {name}", *_added_seed_steps(out, name, methods, p.added_seeds, final_step))
    return times


def _added_seed_steps(out: Path, name: str, methods: list[str], added: tuple[int, ...],
                      final_step: Callable[..., Step]) -> list[Step]:
    """Finetunes of APQ's subnet and of each close baseline's (its ``subnet.json``) with the
    ``added`` seeds, beside their first runs, where :func:`results_rows` pairs them (accuracy
    only: the first seeds checked the ONNX export)."""
    final, steps = out / "final" / name, []
    steps += [final_step(("--search", str(out / "search" / f"{name}.json")), final.with_name(f"{name}.seed{s}"), s,
                         out / "final" / "report", "--no-onnx") for s in added]
    doc = json.loads((out / "baselines" / name / "baselines.json").read_text())
    for r in doc["rows"]:
        if r["method"] in methods and r.get("final_run"):
            run = out / "baselines" / name / "final" / Path(r["final_run"]).name
            steps += [final_step(("--subnet", str(run / "subnet.json")), run.with_name(f"{run.name}.seed{s}"), s,
                                 run.parent / "report", "--label", r["method"], "--no-onnx") for s in added]
    return steps


def collect_plots(p: Preset, out: Path) -> Path:
    """Copy every stage's PNG into ``<out>/plots`` (one folder to look at)."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    sources = [p.run(stage) for stage in ("supernet", "predictor_fp", "predictor_mp")] + [out]
    for src in sources:
        for png in src.rglob("*.png"):
            if plots in png.parents:
                continue
            rel = png.relative_to(src.parent if src != out else out)
            shutil.copy2(png, plots / str(rel).replace(os.sep, "__"))
    return plots


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m apq_lightning.stages", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--data", default=None, help="dataset archive/tree for the cifar preset (--data.init_args.root)")
    ap.add_argument("--out", default=None,
                    help="folder of the search results, reports and plots (runs/pipeline_<preset>)")
    ap.add_argument("--supernet", default=None,
                    help="start at stage 2 from this trained supernet (a stage-1 checkpoint or a weights file such "
                         "as weights/apq_cifar_supernet.pt) instead of training stage 1")
    ap.add_argument("--qfa-supernet", default=None,
                    help="the quantized-for-all supernet stage 4 (protocol qfa) scores MP samples in, e.g. "
                         "weights/apq_cifar_qfa_supernet.pt; default: the --supernet (or stage-1) one")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    if p.needs_data and not args.data:
        ap.error(f"--preset {p.name} needs --data PATH (an ImageFolder tree or .tar.gz of CIFAR-10)")
    data = ["--data.init_args.root", str(Path(args.data).resolve())] if args.data else []
    out = Path(args.out or f"runs/pipeline_{p.name}")
    try:
        report = run_all(p, out, data, args.supernet, args.qfa_supernet)
    except RunLockedError as err:
        print(f"pipeline: {err}", file=sys.stderr)
        return 2
    print("\n" + report.read_text(), flush=True)
    return 0


def run_all(p: Preset, out: Path, data: list[str], supernet: str | None = None,
            qfa_supernet: str | None = None) -> Path:
    """The pipeline, its results (``<out>/results.json``, which reports read, and the same as
    Markdown in ``<out>/results.md``) and its plots folder; returns ``<out>/results.md``.

    The wall time of every stage is added up over reruns in ``<out>/stage_times.json``, so a
    pipeline run in several resumed chunks still reports what each stage cost in all.

    The whole run holds ``run_lock(out, "pipeline")``: a second driver on ``out`` (which would run
    the same commands on the same files at the same time) gets :class:`RunLockedError` naming the
    first; the kernel drops the lock however this process ends, ``kill -9`` included.
    """
    with run_lock(out, "pipeline"):
        times = run_pipeline(p, out, data, supernet, qfa_supernet)
        rows = results_rows(p.budgets, out, p.finetune_seeds)
        table = results_table(rows)
        figure = accuracy_vs_latency_plot(rows, out / "accuracy_vs_latency.png")
        fronts = {f"pipeline/search_{budget_name(b)}": out / "search" / f"{budget_name(b)}.png" for b in p.budgets}
        log_images({"pipeline/accuracy_vs_latency": figure, **fronts}, f"pipeline_{p.name}", out)
        plots = collect_plots(p, out)
        total_times = json.loads((out / "stage_times.json").read_text())
        results = {"preset": p.name, "budgets": [budget_name(b) for b in p.budgets],
                   "finetune_seeds": list(p.finetune_seeds), "rows": rows, "diagnosis": finalist_diagnosis(rows),
                   "accuracy_vs_latency": None if figure is None else str(figure), "stage_seconds_this_run": times,
                   "stage_seconds_all_runs": total_times, "plots": str(plots)}
        (out / "results.json").write_text(json.dumps(results, indent=1))
        stage_lines = "\n".join(f"| {k} | {times[k]:.0f} | {total_times[k]:.0f} |" for k in times)
        report = (f"# APQ pipeline, preset {p.name}\n\n{table}\n\nWall time per stage (s): this run, and all "
                  f"runs of this folder together (resumed chunks):\n\n| stage | this run | all runs |\n|---|---|---|\n"
                  f"{stage_lines}\n\nThis run {sum(times.values()):.0f} s. Plots: {plots}/\n")
        (out / "results.md").write_text(report)
    return out / "results.md"


if __name__ == "__main__":
    raise SystemExit(main())
