"""The transfer study's settings: one checked :class:`TransferStudyConfig` (the command's options)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from apq_lightning.space import get_space

INITS: tuple[str, ...] = ("transfer", "scratch")
"""``transfer``: start from the FP predictor; ``scratch``: random init (the comparison of Figure 7)."""
LOSSES: tuple[str, ...] = ("mse", "ranking", "mse+ranking")
"""The losses of :class:`~apq_lightning.modules.PredictorModule`."""
OUTPUTS: tuple[str, ...] = ("transfer_study.json", "transfer_study.md", "transfer_study.png", "fp_predictor.pt")
"""The files a study writes into its ``out`` directory."""

Size = int | str  # a positive number of MP training samples, or "all"


class StudyError(ValueError):
    """Bad input to the study: shown as one line (``transfer-study: ...``), exit code 2."""


def _dedupe(items: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def parse_sizes(text: str) -> list[Size]:
    """``"50,100,all"`` -> ``[50, 100, "all"]`` (duplicates dropped)."""
    out: list[Size] = []
    for part in (s.strip() for s in str(text).split(",")):
        if not part:
            continue
        if part == "all":
            out.append("all")
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise StudyError(
                f"--sizes: {part!r} is neither a positive integer nor 'all'; allowed: a comma list of "
                "positive integers and 'all', e.g. 50,100,all"
            )
    if not out:
        raise StudyError("--sizes is empty; allowed: a comma list of positive integers and 'all', e.g. 50,100,all")
    return _dedupe(out)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (duplicates dropped: a repeated seed would repeat its runs exactly)."""
    out = []
    for part in (s.strip() for s in str(text).split(",")):
        if not part:
            continue
        try:
            seed = int(part)
        except ValueError:
            seed = -1
        if seed < 0:
            raise StudyError(f"--seeds: {part!r} is not a non-negative integer; allowed: a comma list such as 0,1,2")
        out.append(seed)
    if not out:
        raise StudyError("--seeds is empty; allowed: a comma list of non-negative integers such as 0,1,2")
    return _dedupe(out)


def parse_losses(text: str) -> list[str]:
    """``"mse,ranking"`` -> ``["mse", "ranking"]``; each one of :data:`LOSSES`."""
    out = [s.strip() for s in str(text).split(",") if s.strip()]
    for loss in out:
        if loss not in LOSSES:
            raise StudyError(f"--losses: {loss!r} is not allowed; allowed: {', '.join(LOSSES)}")
    if not out:
        raise StudyError(f"--losses is empty; allowed: a comma list of {', '.join(LOSSES)}")
    return _dedupe(out)


@dataclass
class TransferStudyConfig:
    """Everything that defines a study (the command's options); checked on construction.

    ``sizes``, ``seeds`` and ``losses`` take lists or the command's comma strings. The JSON
    writes them back as comma strings, as the first version of the study (a benchmark script)
    did, so older result files and newer ones read alike.
    """

    fp_stores: list[str]
    mp_stores: list[str]
    out: str
    space: str | None = None
    sizes: list[Size] = field(default_factory=lambda: [50, 100, 200, 400, "all"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    losses: list[str] = field(default_factory=lambda: ["mse", "ranking"])
    epochs: int = 150
    fp_epochs: int | None = None
    min_steps: int = 0
    hidden: int = 400
    num_layers: int = 3
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    test_fraction: float = 0.2
    split_seed: int = 0
    fp_seed: int = 0

    def __post_init__(self) -> None:
        def as_text(v: Any) -> str:
            return v if isinstance(v, str) else ",".join(map(str, v))

        self.fp_stores = [str(s) for s in ([self.fp_stores] if isinstance(self.fp_stores, str) else self.fp_stores)]
        self.mp_stores = [str(s) for s in ([self.mp_stores] if isinstance(self.mp_stores, str) else self.mp_stores)]
        if not self.fp_stores or not self.mp_stores:
            raise StudyError("--fp-stores and --mp-stores each need at least one store file, directory or glob")
        self.sizes = parse_sizes(as_text(self.sizes))
        self.seeds = parse_seeds(as_text(self.seeds))
        self.losses = parse_losses(as_text(self.losses))
        if self.space is not None:
            try:
                self.space = get_space(self.space).name
            except ValueError as err:
                raise StudyError(f"--space: {err}") from None
        for name, low in (("epochs", 1), ("min_steps", 0), ("hidden", 1), ("num_layers", 1), ("batch_size", 1)):
            if int(getattr(self, name)) < low:
                raise StudyError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be an integer >= {low}")
        if self.fp_epochs is not None and self.fp_epochs < 1:
            raise StudyError(f"--fp-epochs {self.fp_epochs}: must be an integer >= 1 (or left out: --epochs)")
        if not self.lr > 0:
            raise StudyError(f"--lr {self.lr}: must be > 0")
        if not self.weight_decay >= 0:
            raise StudyError(f"--weight-decay {self.weight_decay}: must be >= 0")
        if not 0 < self.test_fraction < 1:
            raise StudyError(f"--test-fraction {self.test_fraction}: must be in (0, 1)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TransferStudyConfig:
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in vars(args).items() if k in keys})

    def to_json(self) -> dict[str, Any]:
        """The config as the result JSON stores it (the script's keys and order)."""
        return {
            "fp_stores": self.fp_stores,
            "mp_stores": self.mp_stores,
            "space": self.space,
            "sizes": ",".join(map(str, self.sizes)),
            "seeds": ",".join(map(str, self.seeds)),
            "losses": ",".join(self.losses),
            "epochs": self.epochs,
            "fp_epochs": self.fp_epochs,
            "min_steps": self.min_steps,
            "hidden": self.hidden,
            "num_layers": self.num_layers,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "batch_size": self.batch_size,
            "test_fraction": self.test_fraction,
            "split_seed": self.split_seed,
            "fp_seed": self.fp_seed,
            "out": self.out,
        }
