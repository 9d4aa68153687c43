"""Multi-objective search with pymoo's NSGA-II: the accuracy / cost front in one run.

The genome's free genes are pymoo integer variables (``IntegerRandomSampling``, ``SBX`` and
``PM`` with ``RoundingRepair``, pymoo's recipe for integer problems); ``_evaluate`` is
vectorised over the population and uses the same scorer and cost tables as the evolution.
Objectives: maximise predicted accuracy, minimise one or two costs. Budget limits are pymoo
inequality constraints (``cost / limit - 1 <= 0``), and so is feasibility on the hardware.

A list of budgets is answered by **one** run under the loosest limits: each budget takes the
best distinct candidates that the run scored within it (they include the front's members that
meet it). Every candidate scored is kept, so a budget's answer is never worse than the front's
best point inside it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from apq_lightning.search.constraints import COST_METRICS, Budget
from apq_lightning.search.evolution import Archive
from apq_lightning.search.problem import SearchProblem
from apq_lightning.search.result import Candidate, SearchResult
from apq_lightning.search.scorer import torch_threads

_BIG = 1e12  # stands in for inf (an unrunnable subnet's latency) in pymoo's arrays


@dataclass(frozen=True)
class ParetoConfig:
    """NSGA-II settings; ``generations x population`` predictor calls, like the evolution."""

    generations: int = 500
    population: int = 100
    seed: int = 0
    top_k: int = 10
    start: str = "admissible"  # or "random": pymoo's IntegerRandomSampling over the whole space
    crossover_eta: float = 15.0
    mutation_eta: float = 20.0
    threads: int | None = 1  # torch intra-op threads while searching (restored after)

    def __post_init__(self) -> None:
        if self.population < 2 or self.generations < 0 or self.top_k < 1:
            raise ValueError(f"population must be >= 2, generations >= 0, top_k >= 1; got {self.population}, "
                             f"{self.generations}, {self.top_k}")
        if self.start not in ("admissible", "random"):
            raise ValueError(f"start must be 'admissible' or 'random', got {self.start!r}")

    @property
    def scored(self) -> int:
        return self.population * (self.generations + 1)


@dataclass
class ParetoResult:
    """The final non-dominated set (feasible, distinct) and one answer per budget."""

    objectives: tuple[str, ...]
    front: list[Candidate]
    answers: list[SearchResult]
    wall_time_s: float
    scored: int


def envelope(budgets: Sequence[Budget]) -> Budget:
    """The loosest limits over ``budgets`` (every metric any of them names)."""
    limits: dict[str, float] = {}
    for b in budgets:
        for m, v in b.limits:
            limits[m] = max(v, limits.get(m, v))
    return Budget(tuple(limits.items()))


def default_objectives(budget: Budget, problem: SearchProblem) -> tuple[str, ...]:
    """The budget's metrics (at most two), else latency."""
    metrics = budget.metrics[:2]
    return metrics if metrics else ("latency_ms",)


def _pymoo_problem(problem: SearchProblem, objectives: tuple[str, ...], archive: Archive, record: dict[str, Any]):
    """A pymoo ``Problem`` over the free genes (built lazily: pymoo is imported only here)."""
    from pymoo.core.problem import Problem

    genes = problem.genes
    free = np.flatnonzero(genes.free)
    card = problem.space.gene_cardinality[free]
    metrics = tuple(dict.fromkeys([*objectives, *problem.budget.metrics, *problem.metrics]))

    class GenomeProblem(Problem):
        def __init__(self) -> None:
            super().__init__(n_var=len(free), n_obj=1 + len(objectives), n_ieq_constr=len(problem.budget.limits) + 1,
                             xl=np.zeros(len(free)), xu=(card - 1).astype(float), vtype=int)

        def _evaluate(self, x: np.ndarray, out: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            g = np.repeat(genes.values[None], len(x), axis=0)
            g[:, free] = np.clip(np.rint(x), 0, card - 1).astype(np.int64)
            t = time.perf_counter()
            active = problem.genes.active(g)
            costs = problem.cost.evaluate(g, active, metrics)
            problem.timings["cost"] += time.perf_counter() - t
            acc = problem.score(g, active)
            archive.add(g, acc, costs, record["gen"])
            record["gen"] += 1
            cols = [np.where(np.isfinite(costs[m]), costs[m], _BIG) for m in objectives]
            out["F"] = np.column_stack([-acc, *cols])
            viol = np.nan_to_num(problem.budget.violation(costs), nan=_BIG, posinf=_BIG)
            out["G"] = np.column_stack([viol, 0.5 - costs["feasible"].astype(np.float64)])
            if record["progress"] is not None and record["gen"] > 1:
                record["progress"].update(1)

    return GenomeProblem(), free


def pareto_search(problem: SearchProblem, cfg: ParetoConfig = ParetoConfig(),
                  objectives: Sequence[str] | None = None, budgets: Sequence[Budget] | None = None,
                  progress: Any = None) -> ParetoResult:
    """NSGA-II over (predicted accuracy, ``objectives``) within ``problem.budget``; one answer per
    budget in ``budgets`` (default: ``problem.budget``), each within ``problem.budget``."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling
    from pymoo.optimize import minimize

    objectives = tuple(objectives or default_objectives(problem.budget, problem))
    for m in objectives:
        if m not in COST_METRICS:
            raise ValueError(f"unknown objective {m!r}; known: {', '.join(COST_METRICS)}")
        if not problem.cost.available(m):
            raise ValueError(f"hardware {problem.cost.model.hardware!r} does not report {m}; pick another objective")
    if not 1 <= len(objectives) <= 2:
        raise ValueError(f"Pareto mode optimises accuracy and one or two costs, got {len(objectives)}: {objectives}")
    budgets = list(budgets or [problem.budget])
    rng = np.random.default_rng(cfg.seed)
    problem.reset()
    start = time.perf_counter()
    archive = Archive(cfg.scored, problem.space.genome_length)
    record: dict[str, Any] = {"gen": 0, "progress": progress}
    moo, free = _pymoo_problem(problem, objectives, archive, record)
    if cfg.start == "admissible":
        sampling: Any = problem.admissible_genomes(rng, cfg.population, rounds=10)[0][:, free].astype(float)
    else:
        sampling = IntegerRandomSampling()
    algorithm = NSGA2(
        pop_size=cfg.population,
        sampling=sampling,
        crossover=SBX(eta=cfg.crossover_eta, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=cfg.mutation_eta, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )
    with torch_threads(cfg.threads):
        res = minimize(moo, algorithm, ("n_gen", cfg.generations + 1), seed=cfg.seed, verbose=False)
    wall = time.perf_counter() - start
    front = _front(problem, res, free)
    settings = {**asdict(cfg), "objectives": list(objectives), "space": problem.space.name,
                "hardware": problem.cost.model.hardware, "bits": problem.genes.bits,
                "envelope": problem.budget.to_dict()}
    answers = [answer(problem, archive, b, "pareto", cfg.top_k, wall, settings, front) for b in budgets]
    return ParetoResult(objectives, front, answers, wall, archive.n)


def _front(problem: SearchProblem, res: Any, free: np.ndarray) -> list[Candidate]:
    """NSGA-II's final non-dominated feasible set, distinct subnets, by increasing first cost."""
    if res.X is None:
        return []
    x = np.atleast_2d(res.X)
    g = np.repeat(problem.genes.values[None], len(x), axis=0)
    g[:, free] = np.rint(x).astype(np.int64)
    acc = -np.atleast_2d(res.F)[:, 0]
    _, first = np.unique(problem.genes.hashes(g), return_index=True)
    g, acc = g[first], acc[first]
    cands = problem.candidates(g, acc)
    metric = problem.budget.metrics[0] if not np.isfinite([c.latency_ms for c in cands]).any() else "latency_ms"
    return sorted(cands, key=lambda c: (getattr(c, metric), -c.predicted_acc))


def answer(problem: SearchProblem, archive: Archive, budget: Budget, mode: str, top_k: int, wall: float,
           settings: dict[str, Any], front: list[Candidate]) -> SearchResult:
    """Best distinct scored candidates within ``budget`` and the best-so-far curve for it."""
    n = archive.n
    costs = {m: archive.costs[m][:n] for m in COST_METRICS}
    costs["feasible"] = archive.feasible[:n]
    ok = budget.admissible(costs)
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        raise ValueError(f"{mode} search scored no subnet within {budget}")
    order = idx[np.argsort(-archive.scores[idx], kind="stable")]
    g = archive.genomes[order].astype(np.int64)
    _, first = np.unique(problem.genes.hashes(g), return_index=True)
    keep = np.sort(first)[:top_k]
    results = problem.candidates(g[keep], archive.scores[order][keep])
    gens = archive.gen[:n]
    per_gen = np.full(gens.max() + 1, -np.inf)
    np.maximum.at(per_gen, gens[ok], archive.scores[:n][ok])
    history = np.maximum.accumulate(per_gen)
    return SearchResult(mode, budget, results[0], results, [float(h) for h in history], wall,
                        dict(settings), scored=n, timings=dict(problem.timings), samples=archive.samples(),
                        front=[c for c in front if budget.admissible(_one(c))[0]])


def _one(c: Candidate) -> dict[str, np.ndarray]:
    return {**{m: np.array([getattr(c, m)], dtype=float) for m in COST_METRICS}, "feasible": np.array([True])}
