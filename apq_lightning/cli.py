"""Command line: ``python -m apq_lightning.cli {fit,validate,test,lut,cost} ...``.

``fit``/``validate``/``test`` are LightningCLI (omegaconf parser mode, so recipes may use
``${...}`` interpolation); the model class comes from the recipe (``model.class_path``).
``lut`` and ``cost`` are the hardware cost-model commands.
"""

from __future__ import annotations

import sys
from typing import Any


def _phase_epochs(phases: Any) -> None:
    """``${phase_epochs:...}`` in recipes written before ``trainer.max_epochs: null``: resolves to
    null, i.e. "the sum of the phases", which the CLI derives from the phases actually used
    (the interpolation was resolved at parse time, from the recipe's phases only)."""
    return None


def _num_classes_of(datamodule: Any) -> int | None:
    return getattr(datamodule, "num_classes", None)


def lightning_main(argv: list[str] | None) -> None:
    """fit / validate / test / predict through LightningCLI (imported here: it is slow to import)."""
    import lightning as L
    from omegaconf import OmegaConf

    from apq_lightning.checked_cli import CheckedLightningCLI, run_lightning_cli

    if not OmegaConf.has_resolver("phase_epochs"):
        # omegaconf >= 2.4 renamed register_new_resolver; support both.
        (getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver)(
            "phase_epochs", _phase_epochs
        )

    class APQLightningCLI(CheckedLightningCLI):
        """LightningCLI that sizes the model's classifier from the datamodule.

        Both the model and the datamodule come from the recipe (``class_path``): image data
        for the supernet and finetuning, subnet indices for collection, sample stores for the
        predictors. Where the datamodule knows its ``num_classes`` and the model takes one, the
        model gets it; other pairs ignore the link.
        """

        def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
            parser.link_arguments(
                "data", "model.init_args.num_classes", compute_fn=_num_classes_of, apply_on="instantiate"
            )

    run_lightning_cli(  # one-line errors, exit 2 (see checked_cli)
        lambda: APQLightningCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
            save_config_kwargs={"overwrite": True},
            args=argv,
        ),
        argv,
    )


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("lut", "cost"):
        from apq_lightning.hardware.commands import cost_main, lut_main

        return (lut_main if args[0] == "lut" else cost_main)(args[1:])
    if args and args[0] == "search":
        from apq_lightning.search.command import main as search_main

        return search_main(args[1:])
    lightning_main(argv)  # None: LightningCLI reads sys.argv itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
