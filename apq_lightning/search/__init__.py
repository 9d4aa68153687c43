"""Resource-constrained search (pipeline stage 6): evolution, random search, NSGA-II Pareto fronts.

Quick use::

    from apq_lightning.predictor import AccuracyPredictor
    from apq_lightning.search import Budget, SearchSettings, prepare, run

    predictor = AccuracyPredictor.load("runs/predictor_mp/predictor.pt")
    budgets = [Budget.of({"latency_ms": 8.4})]
    settings = SearchSettings(generations=500, seed=0)
    [result] = run(prepare(predictor, "bitfusion", budgets, settings), settings, budgets)
    result.best.subnet, result.best.predicted_acc, result.best.latency_ms

Lower level: :class:`SearchProblem` (scorer + cost tables + budget, validated),
:func:`evolution_search`, :func:`random_search`, :func:`pareto_search`. See docs/search.md.
"""

from apq_lightning.search.constraints import COST_METRICS, Budget, as_budgets, parse_budgets, parse_constraint
from apq_lightning.search.costs import FastCost
from apq_lightning.search.evolution import EvolutionConfig, evolution_search, random_search
from apq_lightning.search.genes import GeneSpec
from apq_lightning.search.pareto import ParetoConfig, ParetoResult, pareto_search
from apq_lightning.search.problem import BudgetError, SearchProblem
from apq_lightning.search.result import Candidate, SearchResult
from apq_lightning.search.runner import MODES, SearchSettings, prepare, run
from apq_lightning.search.scorer import FunctionScorer, MLPScorer, ModuleScorer, as_scorer

__all__ = [
    "COST_METRICS", "Budget", "as_budgets", "parse_budgets", "parse_constraint", "FastCost", "EvolutionConfig",
    "evolution_search", "random_search", "GeneSpec", "ParetoConfig", "ParetoResult", "pareto_search",
    "BudgetError", "SearchProblem", "Candidate", "SearchResult", "MODES", "SearchSettings", "prepare", "run",
    "FunctionScorer", "MLPScorer", "ModuleScorer", "as_scorer",
]
