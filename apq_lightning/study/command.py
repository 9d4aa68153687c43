"""``apq transfer-study``: the command line of the study (argparse; bad input is one line, exit 2)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from apq_lightning.study.config import LOSSES, StudyError, TransferStudyConfig


class _Parser(argparse.ArgumentParser):
    """argparse whose errors become :class:`StudyError` (one line, exit 2) instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise StudyError(f"{message} (see apq transfer-study --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="apq transfer-study",
        description="Predictor-transfer study (APQ Figure 7): MP predictors trained on growing subsets of the MP "
        "samples, transferred from the FP predictor vs. from scratch, on one fixed held-out MP test split.",
    )
    p.add_argument("--fp-stores", nargs="+", required=True, help="FP sample stores (files, dirs, globs)")
    p.add_argument("--mp-stores", nargs="+", required=True, help="MP sample stores (files, dirs, globs)")
    p.add_argument("--space", default=None, help="search space (default: the first record's)")
    p.add_argument(
        "--sizes",
        default="50,100,200,400,all",
        help="MP training-set sizes, 'all' = whole split; sizes above the split run as 'all'",
    )
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (subset, init and batch order)")
    p.add_argument("--losses", default="mse,ranking", help=f"comma list of {', '.join(LOSSES)}")
    p.add_argument("--epochs", type=int, default=150, help="epochs of every MP run")
    p.add_argument("--fp-epochs", type=int, default=None, help="epochs of the FP predictor (default --epochs)")
    p.add_argument("--min-steps", type=int, default=0, help="at least this many optimizer steps per MP run")
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--num-layers", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of architectures (fixed test)")
    p.add_argument("--split-seed", type=int, default=0, help="split of FP and MP stores (same for every run)")
    p.add_argument("--fp-seed", type=int, default=0, help="seed of the FP predictor")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``apq transfer-study ...``: 0 when the study ran, 2 (one line on stderr) on bad input."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except StudyError as err:
        print(f"transfer-study: {err}", file=sys.stderr)
        return 2
    try:
        config = TransferStudyConfig.from_args(args)
        from apq_lightning.study.run import run_study  # torch and Lightning: only when a study runs

        run_study(config, progress=not args.no_progress)
    except StudyError as err:
        print(f"transfer-study: {err}", file=sys.stderr)
        return 2
    return 0
