"""Search with the freshly fitted accuracy predictor when fitting ends (pipeline stage 6).

Put it in the MP predictor's recipe; after ``fit`` it runs one search per budget on
``pl_module.predictor`` and writes, under ``out_dir``:

* ``<constraint>.json`` per budget (e.g. ``latency_ms-8.4.json``), the same document as
  ``python -m apq_lightning.cli search --out``;
* ``search.png``: the scored population and the front, accuracy vs latency, chosen subnets
  marked;

and, with a ``WandbLogger`` attached (online or offline), a table of the chosen subnets and
the PNG. A budget that no subnet can meet is reported and skipped: a finished training run is
not turned into a crash at its very end. Under ``fast_dev_run`` the search runs 2 generations.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from apq_lightning.search import SearchResult, SearchSettings, as_budgets, prepare, run
from apq_lightning.search.report import TABLE_COLUMNS, plot_search, table_rows
from apq_lightning.search.runner import build_cost


class EvolutionSearch(L.Callback):
    """Resource-constrained search at ``on_fit_end`` (rank zero) with the module's predictor.

    Args:
        hardware: cost model name (``bitfusion``, ``bitops``, ``lut:PATH``, ...).
        constraints: budgets, each a mapping such as ``{latency_ms: 8.4}`` or
            ``{latency_ms: 6.0, energy_mJ: 12}`` (every limit of a mapping holds at once).
        generations, population, seed, top_k: search settings (paper: 500, 100).
        mode: ``evolution`` (one per budget), ``pareto`` (one NSGA-II run) or ``random``.
        bits: ``auto`` (search the policy with an MP predictor, float subnets with an FP one),
            ``float`` or a uniform bit width.
        out_dir: where the files go; default ``<trainer.log_dir or default_root_dir>/search``.
        attribute: the module attribute holding the predictor.
    """

    def __init__(self, hardware: str = "bitfusion", constraints: list[dict[str, float]] | None = None,
                 generations: int = 500, population: int = 100, seed: int = 0, top_k: int = 10,
                 mode: str = "evolution", bits: str | int = "auto", out_dir: str | None = None,
                 attribute: str = "predictor") -> None:
        self.hardware = hardware
        self.budgets = as_budgets(constraints if constraints is not None else [{"latency_ms": 8.4}])
        self.settings = SearchSettings(mode=mode, generations=generations, population=population, seed=seed,
                                       top_k=top_k, bits=bits)
        self.out_dir = out_dir
        self.attribute = attribute
        self.results: list[SearchResult] = []

    def _dir(self, trainer: L.Trainer) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "search"

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        predictor = getattr(pl_module, self.attribute, None)
        if predictor is None:
            rank_zero_warn(f"EvolutionSearch: the module has no '{self.attribute}' attribute; no search")
            return
        settings = self.settings
        if trainer.fast_dev_run:  # a smoke test of the whole run: exercise the search, briefly
            settings = dataclasses.replace(settings, generations=min(settings.generations, 2))
        was_training = predictor.training
        predictor.eval()
        try:
            self.results = self._search(predictor, settings)
        finally:
            predictor.train(was_training)
        if self.results:
            self._write(trainer, self.results)

    def _search(self, predictor: Any, settings: SearchSettings) -> list[SearchResult]:
        results = []
        cost = None
        for budget in self.budgets:  # one at a time, so one unreachable budget skips only itself
            try:
                cost = cost or build_cost(self.hardware, predictor.space, settings)
                problems = prepare(predictor, self.hardware, [budget], settings, cost=cost)
            except ValueError as err:
                rank_zero_warn(f"EvolutionSearch: skipping {budget}: {err}")
                continue
            results += run(problems, settings, [budget])
        return results

    def _write(self, trainer: L.Trainer, results: list[SearchResult]) -> None:
        out = self._dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        for r in results:
            r.settings.update(hardware=self.hardware, source="EvolutionSearch callback")
            (out / f"{r.budget.slug}.json").write_text(json.dumps(r.to_dict(), indent=1) + "\n")
        png = plot_search(results, out / "search.png")
        for r in results:
            print(f"search {r.budget}: best predicted acc {r.best.predicted_acc:.4f} at "
                  f"{r.best.latency_ms:.3f} ms ({r.scored:,} scored, {r.wall_time_s:.2f} s) -> {out}", flush=True)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="search/results", columns=TABLE_COLUMNS, data=table_rows(results))
                logger.log_image(key="search/front", images=[str(png)])
