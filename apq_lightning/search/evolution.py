"""Resource-constrained evolution (the APQ paper's) and random search at equal predictor calls.

Per generation: the top ``parents`` (25) distinct subnets so far breed ``mutations`` (50)
children by per-block re-drawing and ``crossovers`` (50) by uniform crossover; **every** child
is scored, with its own bit policy, in one batched predictor call, and competes with the
parents. Children outside the budget are re-drawn (same operator, fresh parents) a few times
and then repaired towards their first parent, so no inadmissible subnet is ever scored or
kept. Parents are elitist and de-duplicated, so the final parents are the best distinct
subnets ever scored. Deterministic for a seed (one numpy ``Generator``; stable sorts).

Differences from the APQ reference implementation, on purpose: only the first 50 of its 100
children compete each generation (the crossover children are predicted and dropped), and its
predictor sees every candidate at 8 bits; here all 100 are scored with their real bits and
compete.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from apq_lightning.search.constraints import COST_METRICS
from apq_lightning.search.problem import SearchProblem
from apq_lightning.search.result import SearchResult
from apq_lightning.search.scorer import torch_threads


@dataclass(frozen=True)
class EvolutionConfig:
    """The paper's settings by default (population 100, parents 25, 50 + 50 children, p = 0.1)."""

    generations: int = 500
    population: int = 100
    parents: int = 25
    mutations: int = 50
    crossovers: int = 50
    mutate_prob: float = 0.1
    seed: int = 0
    top_k: int = 10
    redraws: int = 4
    oversample: float = 1.25
    threads: int | None = 1  # torch intra-op threads while searching (restored after); None: leave as is

    def __post_init__(self) -> None:
        for name in ("population", "parents", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("generations", "mutations", "crossovers", "redraws"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mutations + self.crossovers < 1 and self.generations:
            raise ValueError("mutations + crossovers must be >= 1 to run generations")
        if self.parents > self.population:
            raise ValueError(f"parents ({self.parents}) cannot exceed population ({self.population})")
        if self.top_k > self.parents:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed parents ({self.parents}): the results are the "
                             f"best distinct parents")
        if self.oversample < 1.0:
            raise ValueError(f"oversample must be >= 1, got {self.oversample}")
        if not 0.0 <= self.mutate_prob <= 1.0:
            raise ValueError(f"mutate_prob must be in [0, 1], got {self.mutate_prob}")

    @property
    def children(self) -> int:
        return self.mutations + self.crossovers

    @property
    def scored(self) -> int:
        """Predictor calls (candidates scored) of a whole run: population + generations x children."""
        return self.population + self.generations * self.children


class Archive:
    """Every scored genome with its generation, score and costs (fronts, per-budget answers, plots)."""

    def __init__(self, capacity: int, genome_length: int) -> None:
        self.genomes = np.zeros((capacity, genome_length), dtype=np.int16)
        self.scores = np.zeros(capacity)
        self.gen = np.zeros(capacity, dtype=np.int64)
        self.feasible = np.zeros(capacity, dtype=bool)
        self.costs = {m: np.full(capacity, np.nan) for m in COST_METRICS}
        self.n = 0

    def _grow(self, k: int) -> None:
        grow = max(k, len(self.scores))
        self.genomes = np.concatenate([self.genomes, np.zeros((grow, self.genomes.shape[1]), np.int16)])
        self.scores = np.concatenate([self.scores, np.zeros(grow)])
        self.gen = np.concatenate([self.gen, np.zeros(grow, np.int64)])
        self.feasible = np.concatenate([self.feasible, np.zeros(grow, bool)])
        self.costs = {m: np.concatenate([v, np.full(grow, np.nan)]) for m, v in self.costs.items()}

    def add(self, genomes: np.ndarray, scores: np.ndarray, costs: dict[str, np.ndarray], gen: int) -> None:
        k = len(genomes)
        if self.n + k > len(self.scores):  # only if a caller scores more than planned
            self._grow(k)
        sl = slice(self.n, self.n + k)
        self.genomes[sl] = genomes
        self.scores[sl] = scores
        self.gen[sl] = gen
        self.feasible[sl] = costs["feasible"]
        for m in COST_METRICS:
            if m in costs:
                self.costs[m][sl] = costs[m]
        self.n += k

    def front_indices(self, metric: str) -> np.ndarray:
        """Indices of the non-dominated (max score, min ``metric``) entries, by increasing metric."""
        x, y = self.costs[metric][: self.n], self.scores[: self.n]
        order = np.lexsort((-y, x))  # by metric, then best score first
        best = np.maximum.accumulate(y[order])
        improves = np.concatenate([[True], y[order][1:] > best[:-1]])
        return order[improves & np.isfinite(x[order])]

    def samples(self) -> dict[str, np.ndarray]:
        return {"predicted_acc": self.scores[: self.n].copy(),
                **{m: v[: self.n].copy() for m, v in self.costs.items()}}


@dataclass
class Pool:
    """Genomes with what selection needs: scores, subnet hashes (for de-duplication), activity."""

    genomes: np.ndarray
    scores: np.ndarray
    hashes: np.ndarray
    active: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, idx: np.ndarray) -> Pool:
        return Pool(self.genomes[idx], self.scores[idx], self.hashes[idx], self.active[idx])

    def join(self, other: Pool) -> Pool:
        return Pool(*(np.concatenate([a, b]) for a, b in
                      ((self.genomes, other.genomes), (self.scores, other.scores),
                       (self.hashes, other.hashes), (self.active, other.active))))

    def best(self, k: int) -> Pool:
        """The ``k`` best *distinct* subnets, best first (stable: ties keep their order)."""
        order = np.argsort(-self.scores, kind="stable")
        _, first = np.unique(self.hashes[order], return_index=True)
        return self.take(order[np.sort(first)[:k]])


def _offspring(problem: SearchProblem, rng: np.random.Generator, parents: np.ndarray, n_mut: int, n_cx: int,
               prob: float) -> tuple[np.ndarray, np.ndarray]:
    """(children, index of each child's first parent): mutations first, then crossovers."""
    p = len(parents)
    pm = rng.integers(0, p, n_mut)
    pa = rng.integers(0, p, n_cx)
    pb = (pa + rng.integers(1, p, n_cx)) % p if p > 1 else pa  # two different parents
    genes = problem.genes
    kids = np.concatenate([genes.mutate(rng, parents[pm], prob), genes.crossover(rng, parents[pa], parents[pb])])
    return kids, np.concatenate([pm, pa])


@dataclass
class Brood:
    """Admissible children of one generation, mutations first, with their costs."""

    genomes: np.ndarray
    costs: dict[str, np.ndarray]
    active: np.ndarray
    drawn: int  # candidates generated and priced to get them
    hits: int  # how many of those met the budget (admission rate = hits / drawn)


class Admission:
    """Running admission rate of each operator, to size the next generation's draws."""

    def __init__(self, n_ops: int = 2, prior: float = 0.5) -> None:
        self.rate = [prior] * n_ops

    def update(self, op: int, kept: int, drawn: int) -> None:
        if drawn:
            self.rate[op] = 0.7 * self.rate[op] + 0.3 * kept / drawn

    def draws(self, op: int, need: int, factor: float) -> int:
        """Enough draws to fill ``need`` slots in one round in most generations."""
        if need == 0:
            return 0
        return int(np.ceil(factor * need / max(self.rate[op], 0.02))) + 2


def breed(problem: SearchProblem, rng: np.random.Generator, parents: np.ndarray, cfg: EvolutionConfig,
          admission: Admission | None = None) -> Brood:
    """``cfg.mutations`` + ``cfg.crossovers`` admissible children.

    Rejection sampling, batched: each round draws, per operator, ``oversample`` x (missing
    children / recent admission rate) candidates in one go (one cost call) and keeps the first
    admissible ones in draw order; the factor doubles for what is still missing. After
    ``cfg.redraws`` rounds the rest are fresh children repaired towards their (admissible) first
    parent. Taking the first admissible draws is rejection sampling: the children are
    distributed as the operators make them, conditioned on the budget.
    """
    admission = admission or Admission()
    need = [cfg.mutations, cfg.crossovers]
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[], []]  # per operator: (genomes, index into costs)
    costs_parts, active_parts = [], []
    drawn, hit, factor, base = 0, 0, cfg.oversample, 0
    for _ in range(cfg.redraws + 1):
        if not any(need):
            break
        t = time.perf_counter()
        n = [admission.draws(op, need[op], factor) for op in (0, 1)]
        kids, _ = _offspring(problem, rng, parents, n[0], n[1], cfg.mutate_prob)
        problem.timings["variation"] += time.perf_counter() - t
        c, ok, act = problem.costs(kids)
        drawn += len(kids)
        for op, (lo, hi) in enumerate(((0, n[0]), (n[0], n[0] + n[1]))):
            hits = np.flatnonzero(ok[lo:hi])
            hit += len(hits)
            admission.update(op, len(hits), hi - lo)
            idx = lo + hits[: need[op]]
            parts[op].append((kids[idx], base + idx))
            need[op] -= len(idx)
        costs_parts.append(c)
        active_parts.append(act)
        base += len(kids)
        factor *= 2
    if any(need):
        kids, first = _offspring(problem, rng, parents, need[0], need[1], cfg.mutate_prob)
        kids = problem.repair(rng, kids, parents[first])
        c, _, act = problem.costs(kids)
        drawn += len(kids)
        parts[0].append((kids[: need[0]], base + np.arange(need[0])))
        parts[1].append((kids[need[0]:], base + need[0] + np.arange(need[1])))
        costs_parts.append(c)
        active_parts.append(act)
    order = parts[0] + parts[1]
    where = np.concatenate([i for _, i in order])
    if len(costs_parts) == 1:
        all_costs = {m: v[where] for m, v in costs_parts[0].items()}
        active = active_parts[0][where]
    else:
        all_costs = {m: np.concatenate([c[m] for c in costs_parts])[where] for m in costs_parts[0]}
        active = np.concatenate(active_parts)[where]
    return Brood(np.concatenate([g for g, _ in order]), all_costs, active, drawn, hit)


def _start(problem: SearchProblem, rng: np.random.Generator, cfg: EvolutionConfig, archive: Archive) -> Pool:
    """The initial population within the budget, scored and archived."""
    pop, costs = problem.admissible_genomes(rng, cfg.population, rounds=10)  # uniform where the budget allows
    active = problem.genes.active(pop)
    scores = problem.score(pop, active)
    archive.add(pop, scores, costs, 0)
    t = time.perf_counter()
    pool = Pool(pop, scores, problem.genes.hashes(pop, active), active)
    problem.timings["selection"] += time.perf_counter() - t
    return pool


def evolution_search(problem: SearchProblem, cfg: EvolutionConfig = EvolutionConfig(),
                     progress: Any = None) -> SearchResult:
    """Run the evolution; ``progress`` is anything with ``update(n)`` (a tqdm bar)."""
    with torch_threads(cfg.threads):
        return _evolution(problem, cfg, progress)


def _evolution(problem: SearchProblem, cfg: EvolutionConfig, progress: Any) -> SearchResult:
    rng = np.random.default_rng(cfg.seed)
    problem.reset()
    start = time.perf_counter()
    archive = Archive(cfg.scored, problem.space.genome_length)
    parents = _start(problem, rng, cfg, archive).best(cfg.parents)
    history = [float(parents.scores[0])]
    drawn = hits = 0
    admission = Admission()
    for gen in range(1, cfg.generations + 1):
        brood = breed(problem, rng, parents.genomes, cfg, admission)
        drawn, hits = drawn + brood.drawn, hits + brood.hits
        scores = problem.score(brood.genomes, brood.active)
        archive.add(brood.genomes, scores, brood.costs, gen)
        t = time.perf_counter()
        kids = Pool(brood.genomes, scores, problem.genes.hashes(brood.genomes, brood.active), brood.active)
        parents = parents.join(kids).best(cfg.parents)
        problem.timings["selection"] += time.perf_counter() - t
        history.append(float(parents.scores[0]))
        if progress is not None:
            progress.update(1)
    wall = time.perf_counter() - start
    return _result(problem, "evolution", cfg, parents, history, wall, archive,
                   {"admission_rate": round(hits / drawn, 4) if drawn else 1.0,
                    "priced_per_generation": round(drawn / cfg.generations, 1) if cfg.generations else 0.0})


def random_search(problem: SearchProblem, cfg: EvolutionConfig = EvolutionConfig(),
                  progress: Any = None) -> SearchResult:
    """Admissible random subnets, as many as the evolution with ``cfg`` scores (equal predictor
    calls): the initial population, then ``cfg.children`` per 'generation'. Uniform over the
    subnets within the budget (rejection sampling), except under budgets so tight that 20
    rounds of sampling do not fill a generation: the rest are repaired towards the cheapest
    subnet (see ``SearchProblem.admissible_genomes``)."""
    with torch_threads(cfg.threads):
        return _random(problem, cfg, progress)


def _random(problem: SearchProblem, cfg: EvolutionConfig, progress: Any) -> SearchResult:
    rng = np.random.default_rng(cfg.seed)
    problem.reset()
    start = time.perf_counter()
    archive = Archive(cfg.scored, problem.space.genome_length)
    best = _start(problem, rng, cfg, archive).best(cfg.parents)
    history = [float(best.scores[0])]
    for gen in range(1, cfg.generations + 1):
        g, c = problem.admissible_genomes(rng, cfg.children, rounds=20)  # uniform unless the budget is tiny
        active = problem.genes.active(g)
        s = problem.score(g, active)
        archive.add(g, s, c, gen)
        best = best.join(Pool(g, s, problem.genes.hashes(g, active), active)).best(cfg.parents)
        history.append(float(best.scores[0]))
        if progress is not None:
            progress.update(1)
    wall = time.perf_counter() - start
    return _result(problem, "random", cfg, best, history, wall, archive, {})


def _result(problem: SearchProblem, mode: str, cfg: EvolutionConfig, best: Pool, history: list[float],
            wall: float, archive: Archive, extra: dict[str, Any]) -> SearchResult:
    results = problem.candidates(best.genomes[: cfg.top_k], best.scores[: cfg.top_k])
    metric = "latency_ms" if np.isfinite(archive.costs["latency_ms"][: archive.n]).any() else \
        problem.budget.metrics[0]
    front_idx = archive.front_indices(metric)
    front = problem.candidates(archive.genomes[front_idx].astype(np.int64), archive.scores[front_idx])
    settings = {**asdict(cfg), "space": problem.space.name, "hardware": problem.cost.model.hardware,
                "bits": problem.genes.bits, "fast_cost": problem.cost.exact, **extra}
    return SearchResult(mode, problem.budget, results[0], results, history, wall, settings,
                        scored=archive.n, timings=dict(problem.timings), samples=archive.samples(), front=front)
