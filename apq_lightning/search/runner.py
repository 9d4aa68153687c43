"""One entry point for the command and the callback: predictor + hardware + budgets -> results.

:func:`prepare` does every check (space, hardware, each budget) before any search work, so a
bad budget in a list of five fails in a second, not after four searches; :func:`run` then runs
one evolution (or random search) per budget, or one NSGA-II run for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from apq_lightning.hardware import get_cost_model
from apq_lightning.search.constraints import Budget
from apq_lightning.search.costs import FastCost
from apq_lightning.search.evolution import EvolutionConfig, evolution_search, random_search
from apq_lightning.search.genes import BitsMode
from apq_lightning.search.pareto import ParetoConfig, envelope, pareto_search
from apq_lightning.search.problem import SearchProblem
from apq_lightning.search.result import SearchResult
from apq_lightning.search.scorer import as_scorer
from apq_lightning.space import get_space

MODES: tuple[str, ...] = ("evolution", "pareto", "random")


@dataclass(frozen=True)
class SearchSettings:
    """What to search and how; ``bits="auto"`` searches the policy with an MP predictor and float
    subnets (costed at 8/8) with an FP one."""

    mode: str = "evolution"
    generations: int = 500
    population: int = 100
    seed: int = 0
    top_k: int = 10
    bits: BitsMode | str = "auto"
    objectives: tuple[str, ...] | None = None  # Pareto mode; default: the budget's metrics
    threads: int | None = 1  # torch intra-op threads during the search (restored afterwards)
    num_classes: int | None = None  # classifier width for the cost model (default: the space's)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.generations < 0 or self.population < 2:
            raise ValueError(f"generations must be >= 0 and population >= 2, got {self.generations}, "
                             f"{self.population}")

    def evolution(self) -> EvolutionConfig:
        """The paper's proportions at any population: parents 1/4, children = population (1/2 + 1/2)."""
        p = self.population
        parents = max(1, p // 4)
        return EvolutionConfig(generations=self.generations, population=p, parents=parents,
                               mutations=p // 2, crossovers=p - p // 2, seed=self.seed,
                               top_k=min(self.top_k, parents), threads=self.threads)

    def pareto(self) -> ParetoConfig:
        return ParetoConfig(generations=self.generations, population=self.population, seed=self.seed,
                            top_k=self.top_k, threads=self.threads)


def resolve_bits(bits: BitsMode | str, quantized: bool) -> BitsMode:
    if bits == "auto":
        return "search" if quantized else None
    if bits == "float":
        return None
    return bits


def build_cost(hardware: str, space: str, settings: SearchSettings) -> FastCost:
    """The cost model of ``hardware`` for ``space`` with its block tables (built once, reusable)."""
    kw = {} if settings.num_classes is None else {"num_classes": settings.num_classes}
    return FastCost.of(get_cost_model(hardware, get_space(space), **kw))


def prepare(predictor: Any, hardware: str, budgets: Sequence[Budget], settings: SearchSettings,
            space: str | None = None, cost: FastCost | None = None,
            fixed: Sequence[tuple[int, int]] = ()) -> list[SearchProblem]:
    """One validated problem per search to run (one per budget; one for Pareto mode).

    ``cost`` reuses tables from :func:`build_cost` (they must be for ``hardware`` and the space).
    ``fixed`` holds genes at given choice indices, ``(gene, index)`` pairs (``GeneSpec.fixed``):
    restricted searches such as the sequential baseline's width-only or bits-only stages run the
    same evolution with the other genes held (``apq_lightning.search.baselines.hold``)."""
    if not budgets:
        raise ValueError("give at least one budget, e.g. latency_ms=8.4")
    own = getattr(predictor, "space", None)
    if space is not None and isinstance(own, str) and get_space(space).name != get_space(own).name:
        raise ValueError(f"the predictor was trained for space {own!r}, not {get_space(space).name!r}: a predictor "
                         f"ranks subnets of its own space only (drop --space or pass --space {own})")
    scorer = as_scorer(predictor, space)
    sp = get_space(space if space is not None else getattr(scorer, "space", None) or predictor.space)
    if cost is None or cost.space.name != sp.name:
        cost = build_cost(hardware, sp.name, settings)
    bits = resolve_bits(settings.bits, bool(getattr(scorer, "quantized", True)))
    fixed = tuple((int(g), int(v)) for g, v in fixed)
    if settings.mode == "pareto":
        for b in budgets:  # every budget must be reachable on its own
            SearchProblem.build(scorer, cost, b, bits, fixed)
        return [SearchProblem.build(scorer, cost, envelope(budgets), bits, fixed)]
    return [SearchProblem.build(scorer, cost, b, bits, fixed) for b in budgets]


def run(problems: Sequence[SearchProblem], settings: SearchSettings, budgets: Sequence[Budget],
        progress: Any = None) -> list[SearchResult]:
    """Run the prepared problems; one :class:`SearchResult` per budget, in ``budgets`` order."""
    if settings.mode == "pareto":
        return pareto_search(problems[0], settings.pareto(), settings.objectives, budgets, progress).answers
    fn = evolution_search if settings.mode == "evolution" else random_search
    return [fn(p, settings.evolution(), progress) for p in problems]
