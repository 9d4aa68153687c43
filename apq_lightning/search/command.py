"""``search`` command (dispatched by ``python -m apq_lightning.cli search``).

    python -m apq_lightning.cli search --predictor CKPT --hardware bitfusion \\
        --constraint latency_ms=8.4 [--constraint energy_mJ=12] --generations 500 --seed 0 --out result.json

``CKPT`` is a project predictor (``AccuracyPredictor.save`` file or a ``PredictorModule``
Lightning checkpoint) or a state dict saved by the APQ reference implementation. Bad input --
an unknown constraint, a non-positive budget, a budget no subnet meets, a predictor of another
space, a missing checkpoint -- is one line on stderr and exit code 2, before any search work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apq_lightning.outputs import check_output_file, write_json
from apq_lightning.search.constraints import COST_METRICS, parse_budgets
from apq_lightning.search.runner import MODES, SearchSettings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apq search", description="Search subnets under hardware budgets with an "
                                "accuracy predictor (evolution, random, or NSGA-II Pareto).")
    p.add_argument("--predictor", required=True, help="predictor checkpoint: the project's (.pt / Lightning "
                   ".ckpt) or a state dict saved by the APQ reference")
    p.add_argument("--hardware", default="bitfusion", help="cost model: bitfusion, bitfusion_table, bitfusion_fit, "
                   "bitops or lut:PATH (default bitfusion)")
    p.add_argument("--constraint", action="append", default=[], metavar="NAME=V[,V...]",
                   help=f"budget, repeatable; NAME in {', '.join(COST_METRICS)}; a comma list gives several budgets "
                   f"(every combination is searched)")
    p.add_argument("--mode", choices=MODES, default="evolution",
                   help="evolution (one per budget), pareto (one NSGA-II run for all budgets), random")
    p.add_argument("--generations", type=int, default=500)
    p.add_argument("--population", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=10, help="subnets per budget in 'results' (evolution: <= "
                   "population / 4)")
    p.add_argument("--space", default=None, help="search space (default: the predictor's; APQ reference "
                   "state dicts: apq_imagenet)")
    p.add_argument("--bits", default="auto", help="auto (search the policy with an MP predictor, float with an FP "
                   "one), float, or a uniform bit width such as 8")
    p.add_argument("--objectives", default=None, help="Pareto mode: one or two comma-separated costs to trade "
                   "against accuracy (default: the constraints' metrics)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier width for the cost model")
    p.add_argument("--threads", type=int, default=1, help="torch threads during the search (default 1)")
    p.add_argument("--out", default=None, help="result JSON (default: print only)")
    p.add_argument("--plot", default=None, help="also write a PNG of accuracy vs latency (.png is added when the "
                   "name has no such suffix)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def load_predictor(path: str, space: str | None) -> Any:
    """A project checkpoint, else an APQ reference state dict (in ``space``, default apq_imagenet)."""
    from apq_lightning.predictor import AccuracyPredictor

    if not Path(path).is_file():
        raise FileNotFoundError(f"predictor checkpoint not found: {path}")
    try:
        return AccuracyPredictor.load(path)
    except ValueError as project_err:
        try:
            return AccuracyPredictor.from_apq_checkpoint(path, space or "apq_imagenet")
        except ValueError as apq_err:
            raise ValueError(f"{path} is neither a project predictor ({project_err}) nor an APQ reference state "
                             f"dict ({apq_err})") from None


def _bits(text: str) -> Any:
    if text in ("auto", "float", "search"):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--bits {text!r}: expected auto, float, search or an integer bit width") from None


def _settings(args: argparse.Namespace) -> SearchSettings:
    objectives = tuple(o.strip() for o in args.objectives.split(",")) if args.objectives else None
    return SearchSettings(mode=args.mode, generations=args.generations, population=args.population, seed=args.seed,
                          top_k=args.top_k, bits=_bits(args.bits), objectives=objectives, threads=args.threads,
                          num_classes=args.num_classes)


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    from apq_lightning.search import runner  # torch + cost models: after argparse, so --help is quick

    try:
        out, plot = _check_outputs(args)  # before the search: a bad path must not cost the result
        budgets = parse_budgets(args.constraint)
        settings = _settings(args)
        predictor = load_predictor(args.predictor, args.space)
        problems = runner.prepare(predictor, args.hardware, budgets, settings, args.space)
    except (ValueError, FileNotFoundError) as err:
        print(f"search: {err}", file=sys.stderr)
        return 2
    total = settings.generations * (1 if settings.mode == "pareto" else len(problems))
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"{settings.mode} search", unit="gen", file=sys.stderr)
    try:
        results = runner.run(problems, settings, budgets, bar)
    finally:
        if bar is not None:
            bar.close()
    common = {"predictor": str(args.predictor), "predictor_space": problems[0].space.name,
              "predictor_quantized": bool(getattr(predictor, "quantized", True))}
    docs = []
    for r in results:
        r.settings.update(common)
        docs.append(r.to_dict())
    doc: dict[str, Any] = docs[0] if len(docs) == 1 else {"searches": docs, "settings": {
        **common, "mode": settings.mode, "constraints": [b.to_dict() for b in budgets]}}
    for r in results:
        print(f"{r.mode} search, {r.budget} on {r.settings['hardware']} ({r.settings['space']}): "
              f"{r.scored:,} subnets scored in {r.wall_time_s:.2f} s")
        print(r.table())
    if out is not None:
        try:
            write_json(out, doc)
        except ValueError as err:
            print(f"search: {out}: {err}", file=sys.stderr)
            return 1
        print(f"wrote {out}")
    if plot is not None:
        from apq_lightning.search.report import plot_search

        print(f"wrote {plot_search(results, plot)}")
    return 0


def _check_outputs(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """``--out`` and ``--plot`` as the files that will be written (``--plot X`` -> ``X.png``), and
    the counts that must be positive; ValueError naming the option otherwise."""
    for name in ("top_k", "threads"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be >= 1")
    out = check_output_file(args.out, "--out") if args.out else None
    plot = None
    if args.plot:
        plot = Path(args.plot)
        plot = check_output_file(plot if plot.suffix.lower() == ".png" else Path(f"{plot}.png"), "--plot")
    if out is not None and plot is not None and out.resolve() == plot.resolve():
        raise ValueError(f"--out and --plot are the same file {out}")
    return out, plot
