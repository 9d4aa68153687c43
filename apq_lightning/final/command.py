"""``final`` and ``baselines`` commands (dispatched by ``python -m apq_lightning.cli``).

    apq final --search result.json --supernet CKPT --recipe recipes/finetune.yaml [--data.root ...] [--out DIR]
    apq baselines --fp-predictor FP --mp-predictor MP --hardware bitfusion --constraint latency_ms=8.4 \\
        [--finetune --supernet CKPT --recipe recipes/finetune.yaml ...]

Options the commands do not know themselves and that start with ``--trainer.``, ``--model.``,
``--data.`` are handed to the finetune recipe. Bad input is one line on stderr and exit code 2,
before any training; an ONNX file that does not match PyTorch (or cannot be written) is exit
code 1, after the report was written. See docs/final.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apq_lightning.final.pipeline import FinalInputError, FinalSettings, FinalTarget


def _add_final_options(p: argparse.ArgumentParser, required: bool) -> None:
    """Options shared by ``final`` and ``baselines --finetune``."""
    p.add_argument("--supernet", required=required, help="stage-1 supernet checkpoint (SupernetModule .ckpt) or "
                   "supernet weights file (apq export-supernet)")
    p.add_argument("--recipe", required=required, help="finetune recipe: recipes/finetune.yaml (CIFAR-10, the long "
                   "schedule), recipes/finetune_tiny.yaml (tiny space, digits)")
    p.add_argument("--weights", choices=("last", "best"), default="last", help="test and export the weights at the "
                   "end of training (last, default) or the best by val/acc (best)")
    if required:  # `final`; `baselines` has its own --hardware for the searches and the reports
        p.add_argument("--hardware", default=None, help="cost model of the report (default: the search's, else "
                       "bitfusion)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and its check")
    p.add_argument("--opset", type=int, default=13, help="ONNX opset (>= 13: per-channel QuantizeLinear)")
    p.add_argument("--onnx-rtol", type=float, default=0.05, help="ONNX check: max |onnx - torch| <= 1e-4 + RTOL * "
                   "max |torch| (default 0.05; see docs/final.md)")
    p.add_argument("--force", action="store_true", help="redo a run whose report exists, and start training afresh")


def _final_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apq final", allow_abbrev=False,
        description="Stage 7: QAT-finetune a searched subnet with the long recipe, test it on the test split, export "
                    "it (quantized.pt + ONNX, both checked) and write its report row. Other options starting with "
                    "--trainer., --model., --data. go to the recipe (e.g. --data.root PATH).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--search", help="search result JSON (search --out, or an EvolutionSearch file): its 'best'")
    src.add_argument("--subnet", help="a plain subnet JSON (docs/design.md §2.3, or the APQ reference spec)")
    p.add_argument("--budget-index", type=int, default=None, help="which search of a multi-budget result")
    p.add_argument("--predictor", default=None, help="with --subnet: an accuracy predictor for the report's "
                   "predicted accuracy")
    p.add_argument("--out", default=None, help="run directory (default runs/final/<name of the JSON>)")
    p.add_argument("--label", default=None, help="the report's method name (default: name of the JSON)")
    p.add_argument("--table", default=None, help="report table stem: appends to STEM.csv / STEM.md (default: "
                   "report beside the run directory)")
    _add_final_options(p, required=True)
    return p


def _split_recipe_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Own options, and the rest as recipe overrides (anything else is an error naming it)."""
    args, rest = parser.parse_known_args(list(argv))
    options = [a for a in rest if a.startswith("--") or re.match(r"-[A-Za-z]", a)]  # not values such as -1
    stray = [a for a in options if not a.startswith(("--trainer.", "--model.", "--data.", "--seed_everything"))]
    if stray:
        parser.error(f"unrecognized argument {stray[0]}; recipe values are --trainer.*, --model.*, --data.*")
    if rest and not rest[0].startswith("--"):
        parser.error(f"unrecognized argument {rest[0]!r}")
    return args, rest


def _settings(args: argparse.Namespace, out: Path, overrides: list[str], table: Path | None) -> FinalSettings:
    return FinalSettings(supernet=args.supernet, recipe=args.recipe, out=out, overrides=tuple(overrides),
                         weights=args.weights, hardware=args.hardware, onnx=not args.no_onnx, opset=args.opset,
                         onnx_rtol=args.onnx_rtol, table=table, force=args.force)


def _with_prediction(target: FinalTarget, predictor_path: str) -> FinalTarget:
    from apq_lightning.search.command import load_predictor
    from apq_lightning.space import Subnet

    try:
        predictor = load_predictor(predictor_path, target.subnet.get("space"))
    except (ValueError, FileNotFoundError) as err:
        raise FinalInputError(str(err)) from None
    try:
        subnet = Subnet.from_dict(target.subnet, predictor.space)
    except ValueError as err:
        raise FinalInputError(f"--predictor {predictor_path} (space {predictor.space!r}): {err}") from None
    return dataclasses.replace(target, predicted_acc=float(predictor.predict([subnet])[0]))


def final_main(argv: Sequence[str]) -> int:
    parser = _final_parser()
    args, overrides = _split_recipe_args(parser, argv)
    from apq_lightning.final.pipeline import read_search, read_subnet, run_final

    try:
        if args.search:
            target = read_search(args.search, args.budget_index, args.label)
        else:
            target = read_subnet(args.subnet, args.label)
        if args.predictor:
            target = _with_prediction(target, args.predictor)
        out = Path(args.out) if args.out else Path("runs/final") / _safe(target.label)
        row = run_final(target, _settings(args, out, overrides, Path(args.table) if args.table else None))
    except FinalInputError as err:
        print(f"final: {err}", file=sys.stderr)
        return 2
    return 0 if args.no_onnx else _onnx_status(row)


def _onnx_status(row: dict[str, Any]) -> int:
    if row.get("onnx_ok") is False:
        reason = row.get("onnx_error") or (f"max abs diff {row['onnx_max_abs_diff']:.3g} exceeds the tolerance "
                                           f"{row['onnx_check']['tolerance']:.3g}")
        print(f"final: ONNX check failed for {row.get('run')}: {reason}", file=sys.stderr)
        return 1
    return 0


def _safe(name: str) -> str:
    """A directory name from a label (``largest@8bit`` -> ``largest_8bit``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "final"


# ---- baselines ------------------------------------------------------------------------------------------
def _baselines_parser() -> argparse.ArgumentParser:
    from apq_lightning.search.baselines import METHODS
    from apq_lightning.search.constraints import COST_METRICS

    p = argparse.ArgumentParser(
        prog="apq baselines", allow_abbrev=False,
        description="The APQ paper's comparisons under one budget: the joint search (apq), fixed precision (largest "
                    "subnet and FP-predictor NAS at uniform bits), sequential (architecture -> widths -> bits) and "
                    "random search at equal predictor calls; a markdown + JSON table. --finetune finalises every "
                    "subnet as `apq final` does (other --trainer./--model./--data. options go to the recipe).")
    p.add_argument("--fp-predictor", required=True, help="stage-3 FP predictor checkpoint")
    p.add_argument("--mp-predictor", required=True, help="stage-5 MP predictor checkpoint")
    p.add_argument("--hardware", default="bitfusion", help="cost model (default bitfusion)")
    p.add_argument("--constraint", action="append", default=[], metavar="NAME=V",
                   help=f"the budget, repeatable for several limits at once; NAME in {', '.join(COST_METRICS)}")
    p.add_argument("--generations", type=int, default=500)
    p.add_argument("--population", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", default="8,6,4", help="uniform bit widths of the fixed-precision rows (default 8,6,4)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--space", default=None, help="space of APQ-reference predictor state dicts (default: the "
                   "predictors')")
    p.add_argument("--threads", type=int, default=1, help="torch threads during the searches")
    p.add_argument("--out", default=None, help="directory for baselines.json / baselines.md (default "
                   "runs/baselines/<budget>)")
    p.add_argument("--finetune", action="store_true", help="finalise every subnet (apq final) and add its test "
                   "top-1 as achieved_acc")
    p.add_argument("--finetune-seeds", default=None, help="with --finetune: finetune every subnet once per seed "
                   "(comma list, e.g. 0,1,2; --seed_everything of each run); achieved_acc is their mean, "
                   "achieved_accs each seed's (default: one run with the recipe's seed)")
    p.add_argument("--float-reference", action="store_true", help="with --finetune: also finetune every subnet "
                   "unquantized (--model.policy float, the first seed) as float_acc: what quantization costs")
    _add_final_options(p, required=False)
    return p


def _budget(texts: list[str]) -> Any:
    from apq_lightning.search.constraints import parse_budgets

    budgets = parse_budgets(texts)
    if len(budgets) != 1:
        raise ValueError(f"baselines compare methods under one budget, got {len(budgets)} (a comma list); run the "
                         f"command once per budget")
    return budgets[0]


def _int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"{name} {text!r}: expected comma-separated integers such as 8,6,4") from None


def baselines_main(argv: Sequence[str]) -> int:
    parser = _baselines_parser()
    args, overrides = _split_recipe_args(parser, argv)
    if overrides and not args.finetune:
        parser.error(f"{overrides[0]} is a recipe option: it needs --finetune")
    if args.finetune and not (args.supernet and args.recipe):
        parser.error("--finetune needs --supernet CKPT and --recipe RECIPE")
    if (args.finetune_seeds is not None or args.float_reference) and not args.finetune:
        parser.error("--finetune-seeds and --float-reference need --finetune")
    if args.finetune_seeds is not None:
        try:
            args.finetune_seeds = _int_list(args.finetune_seeds, "--finetune-seeds")
        except ValueError as err:
            parser.error(str(err))
        if not args.finetune_seeds or len(set(args.finetune_seeds)) != len(args.finetune_seeds):
            parser.error(f"--finetune-seeds {','.join(map(str, args.finetune_seeds))}: give distinct seeds")
        if any(a.split("=", 1)[0] == "--seed_everything" for a in overrides):
            parser.error("--seed_everything is set per run by --finetune-seeds; give one or the other")
    from apq_lightning.search.baselines import Baselines, BaselineSettings
    from apq_lightning.search.command import load_predictor
    from apq_lightning.search.runner import SearchSettings

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    try:
        budget = _budget(args.constraint)
        settings = BaselineSettings(
            hardware=args.hardware, budget=budget, fixed_bits=_int_list(args.bits, "--bits"),
            methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
            search=SearchSettings(generations=args.generations, population=args.population, seed=args.seed,
                                  top_k=1, threads=args.threads))
        fp = load_predictor(args.fp_predictor, args.space)
        mp = load_predictor(args.mp_predictor, args.space)
        out = Path(args.out) if args.out else Path("runs/baselines") / budget.slug
        if args.finetune:
            _check_finetune(args, overrides, mp.space, out)
        runner = Baselines(fp, mp, settings, log=log)
    except (ValueError, FileNotFoundError) as err:  # FinalInputError and BudgetError are ValueErrors
        print(f"baselines: {err}", file=sys.stderr)
        return 2
    rows = runner.run()
    status = 0
    if args.finetune:
        try:
            status = _finetune_rows(rows, args, overrides, out, budget, log)
        except FinalInputError as err:
            print(f"baselines: {err}", file=sys.stderr)
            return 2
    doc = _baselines_doc(rows, settings, runner.space.name, args)
    _write_baselines(out, doc, rows, budget, args.hardware, runner.space.name)
    return status


def _check_finetune(args: argparse.Namespace, overrides: list[str], space: str, out: Path) -> None:
    """Everything the finetunes will need, before any search work."""
    from apq_lightning.final.pipeline import check_recipe, supernet_space

    if not Path(args.recipe).is_file():
        raise FinalInputError(f"recipe not found: {args.recipe}")
    sup_space, _ = supernet_space(args.supernet)
    if sup_space != space:
        raise FinalInputError(f"the predictors are for space {space!r}, but the supernet checkpoint {args.supernet} is "
                              f"of space {sup_space!r}")
    check_recipe(_settings(args, out, overrides, None))  # unknown keys and bad types, before the searches


def _finetune_rows(rows: list[Any], args: argparse.Namespace, overrides: list[str], out: Path, budget: Any,
                   log: Any) -> int:
    from apq_lightning.final.pipeline import run_final
    from apq_lightning.final.results import seed_run_dir

    status = 0
    seeds: tuple[int, ...] | None = args.finetune_seeds
    table = out / "final" / "report"
    for row in rows:
        if row.subnet is None:
            continue
        if row.feasible is False:
            log(f"baselines: {row.method}: not runnable on {args.hardware}; not finetuned")
            continue
        target = FinalTarget(subnet=row.subnet.to_dict(), label=row.method, source="baselines",
                             predicted_acc=row.predicted_acc, search_wall_time_s=row.search_wall_time_s or None,
                             hardware=args.hardware, budget=budget.to_dict())
        run_dir = out / "final" / _safe(row.method)
        accs = []
        for seed in seeds or (None,):
            extra = [] if seed is None else ["--seed_everything", str(seed)]
            result = run_final(target, _settings(args, seed_run_dir(run_dir, seed, seeds), [*overrides, *extra], table),
                               log=log, enforce_budget=False)
            accs.append(result.get("top1"))
            status = max(status, 0 if args.no_onnx else _onnx_status(result))
        row.achieved_accs = accs if seeds else []
        row.achieved_acc = None if None in accs else sum(accs) / len(accs)  # None: a DDP rank other than 0
        row.final_run = str(run_dir)
        if args.float_reference:
            extra = [] if not seeds else ["--seed_everything", str(seeds[0])]
            settings = dataclasses.replace(
                _settings(args, run_dir.with_name(f"{run_dir.name}.float"), [*overrides, *extra, "--model.policy",
                                                                              "float"], table), onnx=False)
            row.float_acc = run_final(dataclasses.replace(target, label=f"{row.method} (float)"), settings, log=log,
                                      enforce_budget=False).get("top1")
    return status


def _baselines_doc(rows: list[Any], settings: Any, space: str, args: argparse.Namespace) -> dict[str, Any]:
    s = settings.search
    return {"budget": settings.budget.to_dict(), "hardware": settings.hardware, "space": space,
            "settings": {"generations": s.generations, "population": s.population, "seed": s.seed,
                         "fixed_bits": list(settings.fixed_bits), "methods": list(settings.methods),
                         "arch_bits": settings.arch_bits, "fp_predictor": args.fp_predictor,
                         "mp_predictor": args.mp_predictor, "finetune": bool(args.finetune)},
            "rows": [r.to_dict() for r in rows]}


def _write_baselines(out: Path, doc: dict[str, Any], rows: list[Any], budget: Any, hardware: str, space: str) -> None:
    from apq_lightning.final.report import markdown_table
    from apq_lightning.outputs import write_json
    from apq_lightning.search.baselines import table_rows

    flat = table_rows(rows)
    optional = ("achieved_acc", "achieved_std", "float_acc")  # shown when some row has one
    columns = [c for c in flat[0] if c not in optional or any(r[c] is not None for r in flat)] if flat else []
    table = markdown_table(flat, columns)
    write_json(out / "baselines.json", doc)
    (out / "baselines.md").write_text(f"# Baselines: {budget} on {hardware} ({space})\n\npredicted_acc: the MP "
                                      f"predictor on each final subnet with its real bits.\n\n{table}")
    print(table, end="")
    print(f"wrote {out / 'baselines.json'} and {out / 'baselines.md'}")


__all__ = ["baselines_main", "final_main"]
