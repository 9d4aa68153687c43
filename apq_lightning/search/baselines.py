"""The baselines behind the APQ paper's claims, built from the same search, predictors and costs.

Every method is asked for one subnet under the *same* hardware budget, and every final subnet
is then judged alike: the MP predictor's accuracy for it **with its real bits** and the cost
model's latency, energy, BitOps and size.

==================  ============================================================================
method              what it is
==================  ============================================================================
``apq``             the joint search: evolution over architecture, widths and bits, MP predictor
``largest@Nbit``    the space's largest subnet at uniform N bits (a reference point: it ignores
                    the budget, so its row says whether it fits)
``fp-search@Nbit``  NAS with the FP predictor under the budget, every block at uniform N bits
``sequential``      three searches in a row, each under the final budget: (1) architecture
                    (kernels + depths) with the FP predictor at 8 bits, widths held unpruned;
                    (2) widths (pruning) with the FP predictor at 8 bits, kernels and depths of
                    (1) held; (3) bits with the MP predictor, everything of (2) held
``random``          random search with the MP predictor, as many predictor calls as ``apq``
==================  ============================================================================

The restricted searches are the same evolution with genes held fixed (``GeneSpec.fixed``, via
``runner.prepare(..., fixed=...)``): mutation, crossover and repair never change a held gene.
Stage (1) holds the widths at the largest choice; if no subnet meets the budget that way at 8
bits, it holds them at the widest uniform *width level* that can (level ``l`` = choice
``round(l * (n - 1))`` of each block's ``n`` widths, ``l`` in 1, 0.75, 0.5, 0.25, 0).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from apq_lightning.search.constraints import COST_METRICS, Budget
from apq_lightning.search.costs import FastCost
from apq_lightning.search.problem import BudgetError
from apq_lightning.search.result import SearchResult
from apq_lightning.search.runner import SearchSettings, build_cost, prepare, run
from apq_lightning.space import SearchSpace, Subnet, get_space

METHODS: tuple[str, ...] = ("apq", "largest", "fp-search", "sequential", "random")
"""Method families; ``largest`` and ``fp-search`` give one row per uniform bit width."""

WIDTH_LEVELS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.0)
"""Uniform width levels the sequential baseline's architecture stage tries, widest first."""


# ---- holding genes ------------------------------------------------------------------------------
def hold(space: SearchSpace | str, subnet: Subnet, fields: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """``(gene, choice index)`` pairs that hold ``fields`` (``depths``, ``kernels``, ``widths``,
    ``pw_w``...) of ``subnet`` fixed in a search (skipped blocks' genes are held too: harmless,
    they do not run while the depths are held, and free otherwise)."""
    sp = get_space(space)
    genome = sp.to_genome(subnet)
    slices = sp.genome_slices()
    unknown = [f for f in fields if f not in slices]
    if unknown:
        raise ValueError(f"cannot hold {unknown}: fields are {', '.join(slices)}")
    return tuple((g, int(genome[g])) for f in fields for g in range(*slices[f].indices(sp.genome_length)))


def width_level(space: SearchSpace | str, level: float) -> tuple[tuple[int, int], ...]:
    """Hold every block's width at choice ``round(level * (n - 1))`` of its ``n`` choices."""
    sp = get_space(space)
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"width level must be in [0, 1], got {level}")
    start = sp.genome_slices()["widths"].start
    return tuple((start + b.index, int(round(level * (len(b.width_choices) - 1)))) for b in sp.blocks)


# ---- one row -------------------------------------------------------------------------------------
@dataclass
class BaselineRow:
    """One method's answer, judged alike: MP-predicted accuracy with real bits, exact costs."""

    method: str
    subnet: Subnet | None
    predicted_acc: float | None = None  # the MP predictor on the final subnet, real bits
    search_score: float | None = None  # what the method's own (last) predictor said
    latency_ms: float | None = None
    energy_mJ: float | None = None
    bitops: int | None = None
    size_bytes: float | None = None
    feasible: bool | None = None
    within_budget: bool | None = None
    predictor_calls: int = 0
    search_wall_time_s: float = 0.0
    error: str | None = None  # why the method has no subnet (e.g. 8 bits cannot meet the budget)
    note: str | None = None  # e.g. why the hardware cannot run the subnet
    stages: list[dict[str, Any]] = field(default_factory=list)  # sequential: each stage's answer
    achieved_acc: float | None = None  # top-1 on the test split after the final finetune (when asked; the seeds' mean)
    achieved_accs: list[float] = field(default_factory=list)  # one per finetune seed (--finetune-seeds)
    float_acc: float | None = None  # the same subnet finetuned unquantized (--float-reference)
    final_run: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method,
                               "subnet": None if self.subnet is None else self.subnet.to_dict()}
        for k in ("predicted_acc", "search_score", *COST_METRICS, "feasible", "within_budget", "predictor_calls",
                  "search_wall_time_s", "achieved_acc", "achieved_accs", "float_acc", "final_run", "error", "note"):
            v = getattr(self, k)
            out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        if self.stages:
            out["stages"] = self.stages
        return out


@dataclass(frozen=True)
class BaselineSettings:
    """What the comparison runs: one budget, the search settings every search shares."""

    hardware: str
    budget: Budget
    search: SearchSettings = SearchSettings(top_k=1)
    fixed_bits: tuple[int, ...] = (8, 6, 4)
    methods: tuple[str, ...] = METHODS
    arch_bits: int = 8  # the sequential pipeline's first two stages (NAS and pruning before quantization)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown baseline method {unknown[0]!r}; known: {', '.join(METHODS)}")
        if not self.fixed_bits and any(m in ("largest", "fp-search") for m in self.methods):
            raise ValueError("fixed_bits is empty: give the uniform bit widths of the fixed-precision baselines")


class Baselines:
    """Runs the methods of :data:`METHODS` with an FP and an MP predictor of the same space."""

    def __init__(self, fp_predictor: Any, mp_predictor: Any, settings: BaselineSettings,
                 log: Callable[[str], None] | None = None) -> None:
        fp_space, mp_space = getattr(fp_predictor, "space", None), getattr(mp_predictor, "space", None)
        if getattr(fp_predictor, "quantized", False):
            raise ValueError("the FP predictor is an MP (quantized) predictor; give the stage-3 FP predictor")
        if not getattr(mp_predictor, "quantized", True):
            raise ValueError("the MP predictor is an FP predictor (it cannot rank bit policies); give the stage-5 "
                             "MP predictor")
        if fp_space != mp_space:
            raise ValueError(f"the FP predictor is for space {fp_space!r} but the MP predictor for {mp_space!r}; "
                             f"both must be of one space")
        bad = [b for b in settings.fixed_bits if b not in get_space(mp_space).bit_choices]
        if bad:
            raise ValueError(f"fixed bits {bad[0]} is not a bit choice of space {mp_space!r}; allowed: "
                             f"{list(get_space(mp_space).bit_choices)}")
        self.fp, self.mp, self.settings = fp_predictor, mp_predictor, settings
        self.space = get_space(mp_space)
        self.cost: FastCost = build_cost(settings.hardware, self.space.name, settings.search)
        self.log = log or (lambda _msg: None)
        # the joint search must be possible, or there is nothing to compare against
        prepare(self.mp, settings.hardware, [settings.budget], replace(settings.search, bits="search"),
                cost=self.cost)

    # ---- searches --------------------------------------------------------------------------
    def search(self, predictor: Any, bits: Any, mode: str = "evolution",
               fixed: Sequence[tuple[int, int]] = ()) -> SearchResult:
        """One search under the budget (raises :class:`BudgetError` when it cannot be met)."""
        s = replace(self.settings.search, bits=bits, mode=mode)
        problems = prepare(predictor, self.settings.hardware, [self.settings.budget], s, cost=self.cost, fixed=fixed)
        return run(problems, s, [self.settings.budget])[0]

    def judge(self, row: BaselineRow) -> BaselineRow:
        """Fill the MP-predicted accuracy (real bits) and the exact costs of ``row.subnet``."""
        if row.subnet is None:
            return row
        row.predicted_acc = float(self.mp.predict([row.subnet])[0])
        c = self.cost.model.evaluate_subnets([row.subnet])
        row.latency_ms, row.energy_mJ = float(c["latency_ms"][0]), float(c["energy_mJ"][0])
        row.bitops, row.size_bytes = int(c["bitops"][0]), float(c["size_bytes"][0])
        row.feasible = bool(c["feasible"][0])
        row.within_budget = bool(self.settings.budget.admissible(c)[0])
        if not row.feasible:
            reason = self.cost.model.costs(row.subnet).get("reason")
            row.note = f"{self.settings.hardware} cannot run it" + (f": {reason}" if reason else "")
        return row

    def _searched(self, method: str, result: SearchResult) -> BaselineRow:
        return BaselineRow(method, result.best.subnet, search_score=result.best.predicted_acc,
                           predictor_calls=result.scored, search_wall_time_s=result.wall_time_s)

    def _failed(self, method: str, err: Exception) -> BaselineRow:
        self.log(f"  {method}: {err}")
        return BaselineRow(method, None, error=str(err))

    def apq(self) -> BaselineRow:
        return self._searched("apq", self.search(self.mp, "search"))

    def random(self) -> BaselineRow:
        return self._searched("random", self.search(self.mp, "search", mode="random"))

    def largest(self, bits: int) -> BaselineRow:
        return BaselineRow(f"largest@{bits}bit", self.space.largest(bits))

    def fp_search(self, bits: int) -> BaselineRow:
        method = f"fp-search@{bits}bit"
        try:
            return self._searched(method, self.search(self.fp, bits))
        except BudgetError as err:
            return self._failed(method, BudgetError(f"at uniform {bits} bits: {err}"))

    def sequential(self) -> BaselineRow:
        """Architecture, then widths, then bits; each stage holds what the previous decided."""
        b8 = self.settings.arch_bits
        try:
            arch, level = self._architecture_stage(b8)
            width = self.search(self.fp, b8, fixed=hold(self.space, arch.best.subnet, ("depths", "kernels")))
            bits = self.search(self.mp, "search",
                               fixed=hold(self.space, width.best.subnet, ("depths", "kernels", "widths")))
        except BudgetError as err:
            return self._failed("sequential", err)
        stages = [("architecture", arch, ["widths"], "fp"),
                  ("width", width, ["depths", "kernels"], "fp"),
                  ("bits", bits, ["depths", "kernels", "widths"], "mp")]
        row = BaselineRow("sequential", bits.best.subnet, search_score=bits.best.predicted_acc,
                          predictor_calls=sum(r.scored for _, r, _, _ in stages),
                          search_wall_time_s=sum(r.wall_time_s for _, r, _, _ in stages))
        for name, r, held, predictor in stages:
            row.stages.append({"stage": name, "predictor": predictor, "held": held,
                               "bits": r.settings.get("bits"), **r.best.to_dict(),
                               "predictor_calls": r.scored, "wall_time_s": r.wall_time_s})
        row.stages[0]["width_level"] = level
        return row

    def _architecture_stage(self, bits: int) -> tuple[SearchResult, float]:
        """Kernels and depths with the FP predictor at ``bits``, widths held at the widest level
        that the budget allows (the unpruned network when it fits)."""
        last: BudgetError | None = None
        for level in WIDTH_LEVELS:
            try:
                return self.search(self.fp, bits, fixed=width_level(self.space, level)), level
            except BudgetError as err:
                last = err
        assert last is not None
        raise BudgetError(f"sequential: no architecture at {bits} bits meets the budget at any width level "
                          f"({last})")

    # ---- all of them ------------------------------------------------------------------------
    def run(self) -> list[BaselineRow]:
        """Every method of the settings, one row each (``largest`` / ``fp-search``: one per bit
        width), judged by :meth:`judge`."""
        jobs: list[tuple[str, Callable[[], BaselineRow]]] = []
        for m in self.settings.methods:
            if m in ("largest", "fp-search"):
                fn = self.largest if m == "largest" else self.fp_search
                jobs += [(f"{m}@{b}bit", (lambda fn=fn, b=b: fn(b))) for b in self.settings.fixed_bits]
            else:
                jobs.append((m, getattr(self, m)))
        rows = []
        for name, job in jobs:
            t = time.perf_counter()
            row = self.judge(job())
            self.log(f"baselines: {name:<16} {_summary(row)} ({time.perf_counter() - t:.1f} s)")
            rows.append(row)
        return rows


def _summary(row: BaselineRow) -> str:
    if row.subnet is None:
        return f"no subnet: {row.error}"
    fit = "" if row.within_budget else "  (over budget)"
    return f"predicted {row.predicted_acc:.4f}, {row.latency_ms:.4g} ms, {row.energy_mJ:.4g} mJ{fit}"


def table_rows(rows: Sequence[BaselineRow]) -> list[dict[str, Any]]:
    """Flat rows for the markdown table: costs in GBitOps and MB, the subnet as its short key."""
    out = []
    for r in rows:
        d = r.to_dict()
        out.append({
            "method": r.method,
            "subnet": "" if r.subnet is None else f"{r.subnet.key()} d{list(r.subnet.depths)}",
            "predicted_acc": d["predicted_acc"],
            "achieved_acc": d["achieved_acc"],
            "achieved_std": statistics.stdev(r.achieved_accs) if len(r.achieved_accs) > 1 else None,
            "float_acc": r.float_acc,
            "latency_ms": d["latency_ms"],
            "energy_mJ": d["energy_mJ"],
            "GBitOps": None if r.bitops is None else r.bitops / 1e9,
            "size_MB": None if r.size_bytes is None else r.size_bytes / 1e6,
            "within_budget": d["within_budget"],
            "predictor_calls": r.predictor_calls or None,
            "note": r.error or r.note or "",
        })
    return out


def genomes_equal_on(space: SearchSpace | str, a: Subnet, b: Subnet, fields: Sequence[str]) -> bool:
    """Whether two subnets agree on ``fields`` over the blocks that run in ``a`` (tests, reports)."""
    sp = get_space(space)
    ga, gb = sp.to_genome(a), sp.to_genome(b)
    active = np.asarray(a.active_mask)
    for f in fields:
        sl = sp.genome_slices()[f]
        x, y = ga[sl], gb[sl]
        if f != "depths":
            x, y = x[active], y[active]
        if not np.array_equal(x, y):
            return False
    return True


__all__ = ["METHODS", "WIDTH_LEVELS", "BaselineRow", "BaselineSettings", "Baselines", "hold", "width_level",
           "table_rows", "genomes_equal_on"]
