"""Command line: ``python -m apq_lightning.cli {fit,validate,test,lut,cost} ...``.

``fit``/``validate``/``test`` are LightningCLI (omegaconf parser mode, so recipes may use
``${...}`` interpolation); the model class comes from the recipe (``model.class_path``).
``lut`` and ``cost`` are the hardware cost-model commands.
"""

from __future__ import annotations

import sys
from typing import Any


def _phase_epochs(phases: Any) -> int:  # an omegaconf ListConfig
    """``${phase_epochs:${model.init_args.phases}}``: trainer epochs = sum of the PS phases'."""
    return int(sum(int(p["epochs"]) for p in phases))


def lightning_main(argv: list[str] | None) -> None:
    """fit / validate / test / predict through LightningCLI (imported here: it is slow to import)."""
    from lightning.pytorch.cli import LightningCLI
    from omegaconf import OmegaConf

    from apq_lightning.data import ImageDataModule

    if not OmegaConf.has_resolver("phase_epochs"):
        # omegaconf >= 2.4 renamed register_new_resolver; support both.
        (getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver)(
            "phase_epochs", _phase_epochs
        )

    class APQLightningCLI(LightningCLI):
        """LightningCLI that sizes the model's classifier from the datamodule."""

        def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
            parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    APQLightningCLI(
        datamodule_class=ImageDataModule,
        subclass_mode_model=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=argv,
    )


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("lut", "cost"):
        from apq_lightning.hardware.commands import cost_main, lut_main

        return (lut_main if args[0] == "lut" else cost_main)(args[1:])
    lightning_main(argv)  # None: LightningCLI reads sys.argv itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
