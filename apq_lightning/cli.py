"""Command line: ``apq <command> ...`` (or ``python -m apq_lightning.cli <command> ...``).

``fit``/``validate``/``test``/``predict`` are LightningCLI (omegaconf+ parser mode: recipes may
use ``${...}`` interpolation, resolved after the command line, so ``--trainer.default_root_dir``
moves every output that the recipe derives from it); the model and data classes come from the
recipe (``model.class_path``). ``cost`` and ``lut`` are the hardware cost-model commands,
``search`` the predictor-driven search. ``apq --help`` (or no arguments) lists the commands
and which recipe runs each stage of the pipeline.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


def lightning_main(argv: list[str] | None) -> None:
    """fit / validate / test / predict through LightningCLI (imported here: it is slow to import)."""
    from apq_lightning.checked_cli import build_cli, run_lightning_cli

    run_lightning_cli(lambda: build_cli(argv), argv)  # one-line errors, exit 2 (see checked_cli)


LIGHTNING_COMMANDS: tuple[str, ...] = ("fit", "validate", "test", "predict")

COMMANDS: dict[str, str] = {
    "fit": "train the recipe's model (LightningCLI): supernet, predictors, QAT finetune",
    "validate": "evaluate the recipe's model on the validation split (LightningCLI)",
    "test": "evaluate the recipe's model on the test split (LightningCLI)",
    "predict": "run the recipe's predict loop (LightningCLI): FP / MP sample collection",
    "cost": "latency, energy, BitOps and size of subnets on a hardware cost model",
    "lut": "measure a latency lookup table of a space on this machine (lut build)",
    "search": "search subnets under hardware budgets with an accuracy predictor",
    "final": "finetune a searched subnet, test it, export it (+ ONNX) and report it (stage 7)",
    "baselines": "fixed-precision, sequential and random-search baselines under the same budget",
    "export-supernet": "a trained supernet as one small weights-only file (later stages start from it)",
    "import-supernet": "the APQ reference's released ImageNet supernet as such a file: start at stage 2",
    "transfer-study": "MP predictor from the FP one vs. from scratch at growing MP sample counts (APQ Fig. 7)",
}
"""Every command of ``apq``, with its one-line description (the help lists them in this order)."""

@dataclass(frozen=True)
class Stage:
    """One stage of APQ: its label (the driver's log and ``stage_times.json`` use it), what it
    does, and the ``apq`` command that runs it (``{tiny,cifar,imagenet}``: the recipe variants)."""

    label: str
    does: str
    command: str

    @property
    def number(self) -> str:
        return self.label.split()[0]


STAGES: tuple[Stage, ...] = (
    Stage("1 supernet", "progressive shrinking + KD", "fit --config recipes/supernet_{tiny,cifar,imagenet}.yaml"),
    Stage("2 FP samples", "BN-recalibrated accuracy", "predict --config recipes/collect_fp{_tiny,}.yaml"),
    Stage("3 FP predictor", "accuracy of a float subnet", "fit --config recipes/predictor_fp{_tiny,}.yaml"),
    Stage("4 MP samples", "quantize + short QAT", "predict --config recipes/collect_mp{_tiny,}.yaml"),
    Stage("5 MP predictor", "transferred from stage 3", "fit --config recipes/predictor_mp{_tiny,}.yaml"),
    Stage("5b transfer study", "transfer vs. scratch (APQ Fig. 7)",
          "transfer-study --fp-stores FP --mp-stores MP --out DIR"),
    Stage("6 search", "under hardware budgets", "search --predictor CKPT --constraint latency_ms=V"),
    Stage("7 final", "finetune, test, export the winner",
          "final --search RESULT --supernet CKPT --recipe recipes/finetune{_tiny,}.yaml"),
    Stage("baselines", "the paper's comparisons",
          "baselines --fp-predictor FP --mp-predictor MP --constraint latency_ms=V"),
)
"""Every stage of APQ, in order: the one table behind ``apq --help``, the pipeline driver's stage
labels (:mod:`apq_lightning.stages`) and the README's pipeline table (tested against it)."""


def stage(label: str) -> Stage:
    """The stage with this label (``KeyError`` naming the labels otherwise)."""
    for s in STAGES:
        if s.label == label:
            return s
    raise KeyError(f"no stage {label!r}; stages: {[s.label for s in STAGES]}")


def usage() -> str:
    """The overview printed by ``apq --help`` and by ``apq`` without arguments."""
    width, stage_width = max(map(len, COMMANDS)), max(len(f"{s.label}: {s.does}") for s in STAGES)
    lines = [
        "usage: apq <command> [options]        (or: python -m apq_lightning.cli <command> [options])",
        "",
        "APQ: joint search of architecture, channel pruning and mixed-precision quantization.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()),
        "",
        "pipeline (recipes in recipes/; _tiny runs offline in minutes, the others on CIFAR-10 / ImageNet):",
        *(f"  {s.label + ': ' + s.does:<{stage_width}}  apq {s.command}" for s in STAGES),
        "  (to search as soon as stage 5 ends, add the EvolutionSearch callback to its recipe: docs/search.md)",
        "",
        "Every recipe writes under its trainer.default_root_dir (runs/<recipe>); --trainer.default_root_dir DIR",
        "moves all of a run's outputs. 'apq <command> --help' lists a command's options.",
    ]
    return "\n".join(lines)


def export_supernet_main(argv: list[str]) -> int:
    """``apq export-supernet CKPT OUT``: the supernet of a stage-1 checkpoint, weights only."""
    import argparse

    ap = argparse.ArgumentParser(prog="apq export-supernet", description="Write the supernet of a stage-1 "
                                 "checkpoint as one weights-only file (no optimizer, teacher or loop state) that "
                                 "every later stage accepts where it takes a supernet checkpoint.")
    ap.add_argument("ckpt", help="stage-1 checkpoint, e.g. runs/supernet_cifar/checkpoints/last.ckpt")
    ap.add_argument("out", help="the weights file to write, e.g. weights/apq_cifar_supernet.pt")
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                    help="storage type of the weights (float16: half the size; loaded back as float32)")
    args = ap.parse_args(argv)
    import torch

    from apq_lightning.supernet_io import export_supernet_weights

    try:
        out = export_supernet_weights(args.ckpt, args.out, getattr(torch, args.dtype))
    except (ValueError, FileNotFoundError) as err:
        print(f"export-supernet: {err}", file=sys.stderr)
        return 2
    print(f"{out}: {out.stat().st_size / 1e6:.2f} MB ({args.dtype})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command = args[0]
    if command in ("lut", "cost"):
        from apq_lightning.hardware.commands import cost_main, lut_main

        return (lut_main if command == "lut" else cost_main)(args[1:])
    if command == "search":
        from apq_lightning.search import command as search_command

        return search_command.main(args[1:])
    if command == "export-supernet":
        return export_supernet_main(args[1:])
    if command == "import-supernet":
        from apq_lightning.apq_reference import import_supernet_main

        return import_supernet_main(args[1:])
    if command == "transfer-study":
        from apq_lightning import study

        return study.main(args[1:])
    if command in ("final", "baselines"):
        from apq_lightning.final import command as final_command

        return (final_command.final_main if command == "final" else final_command.baselines_main)(args[1:])
    if command not in LIGHTNING_COMMANDS and not command.startswith("-"):
        print(f"apq: unknown command {command!r}; commands: {', '.join(COMMANDS)} (see apq --help)", file=sys.stderr)
        return 2
    lightning_main(argv)  # None: LightningCLI reads sys.argv itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
