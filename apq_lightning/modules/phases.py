"""The progressive-shrinking schedule of stage 1: phases, and the subnets each may sample.

A recipe lists phases, each making one more dimension elastic: full network → elastic kernel →
elastic depth (e.g. {3,4} then {2,3,4}) → elastic width (coarse then fine), and optionally a
quantized-for-all ``quant`` phase. This module is that schedule as data -- :class:`Phase`
(validated when the recipe is read), :func:`resolve_phase` (a phase against a space: the value
sets it samples from) and :func:`sample_from` -- with no training in it, so it can be checked
and tested without a Trainer. :class:`~apq_lightning.modules.supernet_module.SupernetModule`
trains through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from apq_lightning.space import SearchSpace, Subnet
from apq_lightning.space.policy_sampling import check_sampler

__all__ = [
    "PHASE_NAMES",
    "Phase",
    "PhaseChoices",
    "as_phases",
    "default_phases",
    "resolve_phase",
    "sample_from",
]

PHASE_NAMES = ("full", "kernel", "depth", "width", "quant")


@dataclass
class Phase:
    """One progressive-shrinking phase.

    ``name`` says which dimension this phase opens; earlier dimensions stay elastic.
    ``kernels`` / ``depths`` restrict the sampled values (``None`` = every choice of the space);
    ``widths``: ``max`` (largest only), ``coarse`` (expand ratios 4, 5, 6 of the block input,
    i.e. multiples of Cin) or ``all`` (the fine-grained step-8 set).
    ``lr``: the phase's peak learning rate under ``lr_schedule: phase`` (``None`` = the module's
    ``lr``); once-for-all trains its elastic phases at a fraction of the full network's rate.

    ``quant`` (quantized-for-all, after the width phases): every sub-step also draws a bit policy
    (``sampler``, see :mod:`apq_lightning.space.policy_sampling`) and runs the subnet quantized
    inside the supernet, with batch-statistics ranges (so ranges stay right when the policy
    changes every step), distilled from the float full network; ``sandwich``: the first sub-step
    of every step trains the largest architecture (at a random policy).
    """

    name: Literal["full", "kernel", "depth", "width", "quant"] = "full"
    epochs: int = 1
    kernels: list[int] | None = None
    depths: list[int] | None = None
    widths: Literal["max", "coarse", "all"] | None = None
    lr: float | None = None
    sampler: str = "spread"
    sandwich: bool = True

    def __post_init__(self) -> None:
        # Messages start with "phases" so that the CLI can name the recipe key.
        if self.name not in PHASE_NAMES:
            raise ValueError(f"phases: phase name {self.name!r} unknown; allowed: {list(PHASE_NAMES)}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"phases: phase {self.name!r} has epochs={self.epochs!r}; must be an integer >= 1")
        try:
            check_sampler(self.sampler)
        except ValueError as err:
            raise ValueError(f"phases: phase {self.name!r}: {err}") from None
        if self.widths not in (None, "max", "coarse", "all"):
            raise ValueError(f"phases: phase {self.name!r} has widths={self.widths!r}; allowed: max, coarse, all")
        if self.lr is not None:
            ok = isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and 0 < self.lr < float("inf")
            if not ok:
                raise ValueError(f"phases: phase {self.name!r} has lr={self.lr!r}; must be a number > 0 (or null "
                                 f"for the module's lr)")


@dataclass
class PhaseChoices:
    """The value sets a phase samples from (resolved against a space)."""

    kernels: tuple[int, ...]
    depths: tuple[tuple[int, ...], ...]
    widths: tuple[tuple[int, ...], ...]

    @property
    def elastic(self) -> bool:
        """More than one subnet to sample (otherwise: the full network, no distillation)."""
        return len(self.kernels) > 1 or any(len(c) > 1 for c in (*self.depths, *self.widths))


def resolve_phase(phase: Phase, space: SearchSpace) -> PhaseChoices:
    """Turn a phase into concrete per-stage / per-block choice sets (validated against the space)."""
    level = PHASE_NAMES.index(phase.name)
    kernels = tuple(space.kernel_choices) if level >= 1 else (max(space.kernel_choices),)
    if phase.kernels is not None:
        bad = set(phase.kernels) - set(space.kernel_choices)
        if bad:
            raise ValueError(f"phase {phase.name!r}: kernels {sorted(bad)} not in space {list(space.kernel_choices)}")
        kernels = tuple(sorted(phase.kernels))
    depths = []
    for allowed in space.stage_depth_choices:
        ds = allowed if level >= 2 else (max(allowed),)
        if phase.depths is not None and len(allowed) > 1:
            bad = set(phase.depths) - set(space.depth_choices)
            if bad:
                raise ValueError(f"phase {phase.name!r}: depths {sorted(bad)} not in space {list(space.depth_choices)}")
            ds = tuple(d for d in allowed if d in phase.depths) or (max(allowed),)
        depths.append(tuple(ds))
    mode = phase.widths or ("all" if level >= 3 else "max")
    widths = []
    for blk in space.blocks:
        if mode == "max":
            widths.append((blk.width_choices[-1],))
        elif mode == "coarse":
            widths.append(tuple(w for w in blk.width_choices if w % blk.in_channels == 0))
        else:
            widths.append(blk.width_choices)
    return PhaseChoices(kernels, tuple(depths), tuple(widths))


def sample_from(choices: PhaseChoices, space: SearchSpace, rng: np.random.Generator) -> Subnet:
    depths = [int(rng.choice(d)) for d in choices.depths]
    kernels = [int(rng.choice(choices.kernels)) for _ in space.blocks]
    widths = [int(rng.choice(w)) for w in choices.widths]
    return space.subnet(depths, kernels, widths)


def default_phases(epochs: int = 1) -> list[Phase]:
    """OFA's schedule with ``epochs`` per phase (full, kernel, depth 2×, width 2×)."""
    return [
        Phase("full", epochs),
        Phase("kernel", epochs),
        Phase("depth", epochs, depths=[3, 4]),
        Phase("depth", epochs),
        Phase("width", epochs, widths="coarse"),
        Phase("width", epochs, widths="all"),
    ]


def as_phases(phases: Any) -> list[Phase]:
    """The phase list (``None``: :func:`default_phases`); an empty list trains nothing, so it is
    an error rather than a silent fall-back to the default schedule."""
    if phases is None:
        return default_phases()
    if isinstance(phases, (str, bytes, dict)) or not isinstance(phases, (list, tuple)):
        raise ValueError(f"phases must be a list of phases ({{name, epochs, ...}}), got {type(phases).__name__} "
                         f"{phases!r}")
    if not phases:
        raise ValueError("phases is empty, which trains nothing; give at least one phase, e.g. "
                         "[{name: full, epochs: 1}], or leave phases out for the default schedule")
    return [p if isinstance(p, Phase) else Phase(**p) for p in phases]
