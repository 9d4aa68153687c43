"""Hardware budgets: parsing ``--constraint latency_ms=4,6,8.4`` and checking populations.

A :class:`Budget` is one set of upper limits (``latency_ms <= 8.4 and energy_mJ <= 12``); a
command line or a recipe may list several budgets at once (a comma list per metric, several
metrics: every combination), and the search answers each. Limits are inclusive (``<=``), as in
the APQ reference (``lat <= constraint``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

COST_METRICS: tuple[str, ...] = ("latency_ms", "energy_mJ", "bitops", "size_bytes")
"""Metrics a budget may limit: the cost model's numeric outputs (``hardware.METRICS``)."""

UNITS: dict[str, str] = {"latency_ms": "ms", "energy_mJ": "mJ", "bitops": "BitOps", "size_bytes": "B"}


@dataclass(frozen=True)
class Budget:
    """Upper limits on cost metrics, in ``COST_METRICS`` order; every one must hold."""

    limits: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        if not self.limits:
            raise ValueError(f"a budget needs at least one limit; known metrics: {', '.join(COST_METRICS)}")
        seen = set()
        for name, value in self.limits:
            _check_limit(name, value)
            if name in seen:
                raise ValueError(f"constraint {name} is given twice; give each metric once "
                                 f"(several budgets: {name}=A,B,C)")
            seen.add(name)
        ordered = tuple(sorted(((n, float(v)) for n, v in self.limits), key=lambda nv: COST_METRICS.index(nv[0])))
        object.__setattr__(self, "limits", ordered)

    @classmethod
    def of(cls, mapping: Mapping[str, float] | Budget) -> Budget:
        """From ``{"latency_ms": 8.4, "energy_mJ": 12}`` (recipes, the callback)."""
        if isinstance(mapping, Budget):
            return mapping
        if not isinstance(mapping, Mapping):
            raise ValueError(f"a constraint must be a mapping like {{latency_ms: 8.4}}, got {mapping!r}")
        return cls(tuple((str(k), _as_number(k, v)) for k, v in mapping.items()))

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.limits)

    def to_dict(self) -> dict[str, float]:
        return dict(self.limits)

    def __str__(self) -> str:
        return ", ".join(f"{n} <= {_fmt(v)}" for n, v in self.limits)

    @property
    def slug(self) -> str:
        """File-name form: ``latency_ms-8.4_energy_mJ-12``."""
        return "_".join(f"{n}-{_fmt(v)}" for n, v in self.limits)

    def admissible(self, costs: Mapping[str, np.ndarray]) -> np.ndarray:
        """(N,) bool: feasible on the hardware and within every limit (NaN never is)."""
        ok = np.asarray(costs["feasible"], dtype=bool).copy()
        for name, limit in self.limits:
            ok &= np.asarray(costs[name]) <= limit
        return ok

    def violation(self, costs: Mapping[str, np.ndarray]) -> np.ndarray:
        """(N, M) relative excess ``cost / limit - 1`` (<= 0 inside), for pymoo's constraints."""
        return np.stack([np.asarray(costs[n], dtype=np.float64) / v - 1.0 for n, v in self.limits], axis=1)


def _fmt(v: float) -> str:
    return f"{v:g}"


def _as_number(name: object, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        try:
            return float(str(value))
        except ValueError:
            raise ValueError(f"constraint {name}: budget {value!r} is not a number") from None
    return float(value)


def _check_limit(name: str, value: float) -> None:
    if name not in COST_METRICS:
        raise ValueError(f"unknown constraint {name!r}; known: {', '.join(COST_METRICS)}")
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"constraint {name}={value!r}: the budget must be a positive finite number "
                         f"(in {UNITS[name]})")


def parse_constraint(text: str) -> tuple[str, list[float]]:
    """``"latency_ms=4,6,8.4"`` -> ``("latency_ms", [4.0, 6.0, 8.4])`` (validated)."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or not name or not values.strip():
        raise ValueError(f"constraint {text!r}: expected NAME=VALUE[,VALUE...], e.g. latency_ms=8.4; "
                         f"known names: {', '.join(COST_METRICS)}")
    if name not in COST_METRICS:
        raise ValueError(f"unknown constraint {name!r}; known: {', '.join(COST_METRICS)}")
    budgets = []
    for v in values.split(","):
        number = _as_number(name, v.strip())
        _check_limit(name, number)
        budgets.append(number)
    return name, budgets


def parse_budgets(texts: Sequence[str]) -> list[Budget]:
    """Every combination of the listed limits: ``["latency_ms=4,6", "energy_mJ=12"]`` -> 2 budgets."""
    if not texts:
        raise ValueError(f"give at least one --constraint NAME=VALUE; known names: {', '.join(COST_METRICS)}")
    parsed = [parse_constraint(t) for t in texts]
    names = [n for n, _ in parsed]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"constraint {dup[0]} is given twice; list several budgets as {dup[0]}=A,B,C")
    return [Budget(tuple(zip(names, combo))) for combo in itertools.product(*(v for _, v in parsed))]


def as_budgets(constraints: Iterable[Mapping[str, float] | Budget | str]) -> list[Budget]:
    """Budgets from recipe entries: mappings, ``Budget`` objects or ``"latency_ms=8.4"`` strings."""
    out: list[Budget] = []
    for c in constraints:
        out += parse_budgets([s for s in c.split(";")]) if isinstance(c, str) else [Budget.of(c)]
    return out
