"""One search problem: genes, scorer, costs and a budget, checked before any search work.

:meth:`SearchProblem.build` rejects what would make a search meaningless -- a predictor of
another space than the cost model's, a budget on a metric the hardware does not report, a
budget below the cheapest runnable subnet -- with one clear ``ValueError`` each. Its
:meth:`admissible_genomes` draws genomes that meet the budget (rejection sampling, then repair
towards an admissible anchor), shared by every search mode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from apq_lightning.hardware import CostModel
from apq_lightning.search.constraints import COST_METRICS, UNITS, Budget
from apq_lightning.search.costs import FastCost, anchor_for
from apq_lightning.search.genes import BitsMode, GeneSpec
from apq_lightning.search.result import Candidate
from apq_lightning.search.scorer import Scorer
from apq_lightning.space import SearchSpace


class BudgetError(ValueError):
    """No subnet of the space can meet the budget on this hardware."""


@dataclass
class SearchProblem:
    """Everything a search mode needs; genomes are ``(N, L)`` int64 arrays throughout."""

    genes: GeneSpec
    scorer: Scorer
    cost: FastCost
    budget: Budget
    anchor: np.ndarray
    metrics: tuple[str, ...] = ()  # computed per candidate: the budget's, plus latency for plots
    _sample_rate: float = 0.1  # running share of uniform samples that meet the budget
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("variation", "cost", "encoding", "prediction", "selection"), 0.0))

    @classmethod
    def build(cls, scorer: Scorer, cost: CostModel | FastCost, budget: Budget, bits: BitsMode = "search",
              fixed: tuple[tuple[int, int], ...] = ()) -> SearchProblem:
        """Validate and assemble; raises ``ValueError`` / :class:`BudgetError` with the reason."""
        fast = cost if isinstance(cost, FastCost) else FastCost.of(cost)
        sp = fast.space
        own = getattr(scorer, "space", None) or sp  # scorers of plain functions do not name one
        own = getattr(own, "name", own)
        if own != sp.name:
            raise ValueError(f"the predictor is for space {own!r} but the cost model prices space {sp.name!r}; "
                             f"search the predictor's space")
        if bits == "search" and not getattr(scorer, "quantized", True):
            raise ValueError("an FP predictor cannot rank bit policies: fix the bits (bits=8, an int from the "
                             "space's bit choices) or search float subnets (bits=None)")
        genes = GeneSpec(sp, bits, tuple(fixed))
        check_budget(budget, fast, genes)
        anchor = anchor_for(budget, fast, genes)
        if anchor is None:
            floors = ", ".join(f"{m} {fast.floor(m, genes):.4g}" for m in budget.metrics)
            raise BudgetError(f"no subnet found that meets all of {budget} jointly on {fast.model.hardware} "
                              f"(space {sp.name}); each alone can reach: {floors}")
        metrics = tuple(m for m in COST_METRICS if m in budget.metrics or (m == "latency_ms" and fast.available(m)))
        return cls(genes, scorer, fast, budget, anchor, metrics)

    def reset(self) -> None:
        """Forget timings and sampling statistics: every search starts alike (determinism)."""
        for k in self.timings:
            self.timings[k] = 0.0
        self._sample_rate = 0.1

    @property
    def space(self) -> SearchSpace:
        return self.genes.space

    # ---- pieces every mode uses --------------------------------------------------------
    def costs(self, genomes: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """(costs, admissible mask, active blocks) of N genomes; timed as 'cost'."""
        t = time.perf_counter()
        active = self.genes.active(genomes)
        c = self.cost.evaluate(genomes, active, self.metrics or COST_METRICS)
        ok = self.budget.admissible(c)
        self.timings["cost"] += time.perf_counter() - t
        return c, ok, active

    def score(self, genomes: np.ndarray, active: np.ndarray) -> np.ndarray:
        """One batched predictor call; encoding and prediction timed apart when the scorer allows."""
        t0 = time.perf_counter()
        rows = getattr(self.scorer, "rows", None)
        if rows is not None and hasattr(self.scorer, "forward_rows"):
            fp, q = rows(genomes, active)
            t1 = time.perf_counter()
            out = self.scorer.forward_rows(fp, q)
        else:
            t1 = t0
            out = self.scorer(genomes, active)
        t2 = time.perf_counter()
        self.timings["encoding"] += t1 - t0
        self.timings["prediction"] += t2 - t1
        return np.asarray(out, dtype=np.float64)

    def admissible_genomes(self, rng: np.random.Generator, n: int, rounds: int = 3) -> tuple[np.ndarray, dict]:
        """``n`` uniformly random genomes within the budget: rejection sampling in batches sized by
        the admission rate seen so far, then, if the budget is so tight that too few were
        accepted, random genomes blended towards the anchor until admissible.
        Returns (genomes, their costs)."""
        got: list[np.ndarray] = []
        have = 0
        for _ in range(rounds):
            t = time.perf_counter()
            batch = int(np.ceil(1.25 * (n - have) / max(self._sample_rate, 1e-3))) + 8
            g = self.genes.sample(rng, min(batch, 20 * n))
            self.timings["variation"] += time.perf_counter() - t
            _, ok, _ = self.costs(g)
            self._sample_rate = 0.5 * self._sample_rate + 0.5 * max(ok.mean(), 1e-4)
            got.append(g[ok][: n - have])
            have += len(got[-1])
            if have == n:
                break
        if have < n:
            got.append(self.repair(rng, self.genes.sample(rng, n - have),
                                   np.repeat(self.anchor[None], n - have, axis=0)))
        g = np.concatenate(got)
        c, ok, _ = self.costs(g)
        assert ok.all()
        return g, c

    def repair(self, rng: np.random.Generator, genomes: np.ndarray, towards: np.ndarray,
               rounds: int = 12) -> np.ndarray:
        """Blend inadmissible genomes towards admissible ones (half the genes per round, then a
        copy): ends admissible by construction."""
        g = genomes.copy()
        _, ok, _ = self.costs(g)
        for _ in range(rounds):
            if ok.all():
                return g
            bad = np.flatnonzero(~ok)
            t = time.perf_counter()
            g[bad] = self.genes.blend(rng, g[bad], towards[bad], 0.5)
            self.timings["variation"] += time.perf_counter() - t
            _, ok_bad, _ = self.costs(g[bad])
            ok[bad] = ok_bad
        g[~ok] = towards[~ok]
        return g

    def candidates(self, genomes: np.ndarray, scores: np.ndarray) -> list[Candidate]:
        """Materialise genomes as subnets with the cost model's own numbers (not the fast tables),
        dropping any that these exact numbers put outside the budget."""
        if len(genomes) == 0:
            return []
        exact = self.cost.model.evaluate(genomes)
        ok = self.budget.admissible(exact)
        out = []
        for i in np.flatnonzero(ok):
            out.append(Candidate(self.genes.to_subnet(genomes[i]), float(scores[i]),
                                 float(exact["latency_ms"][i]), float(exact["energy_mJ"][i]),
                                 int(exact["bitops"][i]), float(exact["size_bytes"][i])))
        return out


def check_budget(budget: Budget, cost: FastCost, genes: GeneSpec) -> None:
    """Reject limits on metrics the hardware lacks and limits below the cheapest runnable subnet."""
    for metric, limit in budget.limits:
        if not cost.available(metric):
            raise ValueError(f"hardware {cost.model.hardware!r} does not report {metric}; constrain bitops or "
                             f"size_bytes, or use a latency model (bitfusion, lut:PATH)")
        floor = cost.floor(metric, genes)
        if floor > limit:
            raise BudgetError(f"no subnet of space {cost.space.name} meets {metric} <= {limit:g} on "
                              f"{cost.model.hardware}: the cheapest runnable subnet needs {floor:.4g} "
                              f"{UNITS[metric]}")
