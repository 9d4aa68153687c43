"""Where per-layer latency / energy come from: layer pricers over tables and fits.

A cost model (:mod:`apq_lightning.hardware.cost`) walks a subnet's layers and sums their
prices; a :class:`LayerPricer` answers what one conv layer (shape, weight bits, activation bits)
and a space's fixed head / tail cost on one piece of hardware. Kept apart from the cost models
because they are the part that changes with the hardware source -- an exact table
(:class:`TablePricer`), the regression fitted to one (:class:`FitPricer`), or both
(:class:`HybridPricer`) -- while the summing, caching and vectorised evaluation stay the same.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from apq_lightning.hardware.fit import BitFusionFit, as_gemm, conv_type
from apq_lightning.hardware.geometry import FixedLayer, default_num_classes, head_layers, tail_layers
from apq_lightning.hardware.table import FLOAT_BITS, Cost, CostTable, LayerQuery, format_key
from apq_lightning.space import SearchSpace, get_space

__all__ = ["FitPricer", "HybridPricer", "LayerPricer", "Priced", "TablePricer"]

Priced = tuple[Cost, bool]  # (cost, came from the fit)


class LayerPricer(ABC):
    """Latency / energy of single conv layers and of a space's fixed head / tail."""

    name: str = "pricer"

    @abstractmethod
    def price(self, queries: Sequence[LayerQuery]) -> list[Priced | None]:
        """Prices of many layers (batched so a fitted model predicts once); None = cannot run."""

    @abstractmethod
    def fixed(self, space: SearchSpace, num_classes: int) -> tuple[Priced, Priced]:
        """(head, tail) of a space; ValueError when this pricer cannot price them."""

    @abstractmethod
    def why_missing(self, query: LayerQuery) -> str:
        """A one-line reason why ``query`` has no price."""


def _combos(queries: Sequence[LayerQuery]) -> set[tuple[str, int, int, int]]:
    return {(conv_type(as_gemm(s)), as_gemm(s).kernel, w, a) for s, w, a in queries}


def _missing_hint(combos: set[tuple[str, int, int, int]], query: LayerQuery, what: str) -> str:
    shape, w, a = query
    g = as_gemm(shape)
    if (conv_type(g), g.kernel, w, a) not in combos:
        kind = "depthwise" if shape.depthwise else "pointwise/dense"
        return f"; {what} has no {g.kernel}x{g.kernel} {kind} conv at W{w}A{a} at any size"
    return ""


class TablePricer(LayerPricer):
    """Exact entries of one table; a float-only table prices every layer at ``-W32A32``."""

    def __init__(self, table: CostTable) -> None:
        self.table = table
        self.name = table.name
        self._combos = _combos(list(table.entries))
        self._float_only = table.float_only

    def _query(self, q: LayerQuery) -> LayerQuery:
        return (q[0], FLOAT_BITS, FLOAT_BITS) if self._float_only else q

    def price(self, queries: Sequence[LayerQuery]) -> list[Priced | None]:
        out: list[Priced | None] = []
        for q in queries:
            c = self.table.entries.get(self._query(q))
            out.append(None if c is None else (c, False))
        return out

    def fixed(self, space: SearchSpace, num_classes: int) -> tuple[Priced, Priced]:
        t = self.table
        if t.space is not None and t.space != space.name:
            raise ValueError(f"table {t.name} was built for space {t.space!r}; it cannot price the fixed "
                             f"layers of space {space.name!r}")
        if t.head is None or t.tail is None:
            raise ValueError(f"table {t.name} has no 'head'/'tail' entries, needed for the fixed layers")
        n = t.meta.get("num_classes")
        if n is not None and int(n) != num_classes:
            raise ValueError(f"table {t.name} was measured with {n} classes, the cost model has {num_classes}")
        return (t.head, False), (t.tail, False)

    def why_missing(self, query: LayerQuery) -> str:
        q = self._query(query)
        return f"table {self.name} has no entry {format_key(*q)!r}" + _missing_hint(self._combos, q, "it")


class FitPricer(LayerPricer):
    """The regression fitted to a table (see ``fit.py``); fixed layers calibrated to the table.

    Head and tail are the fit's prediction for the space's own stem / first block and head
    conv / classifier, scaled so that on the table's space they equal the table's entries.
    """

    def __init__(self, fit: BitFusionFit, table: CostTable) -> None:
        if table.space is None or table.head is None or table.tail is None:
            raise ValueError(f"table {table.name}: a fitted model needs the table's space and head/tail entries")
        self.fit_model = fit
        self.table = table
        self.name = f"fit of {table.name}"

    def price(self, queries: Sequence[LayerQuery]) -> list[Priced | None]:
        return [None if c is None else (c, True) for c in self.fit_model.predict(queries)]

    def _predicted_sum(self, layers: Sequence[FixedLayer], bits: int) -> Cost:
        costs = self.fit_model.predict([(layer.shape, bits, bits) for layer in layers])
        if any(c is None for c in costs):
            raise ValueError(f"{self.name}: cannot price fixed layers at {bits} bits")
        return Cost(sum(c.latency for c in costs), sum(c.energy for c in costs))  # type: ignore[union-attr]

    def fixed(self, space: SearchSpace, num_classes: int) -> tuple[Priced, Priced]:
        ref = get_space(self.table.space)  # type: ignore[arg-type]
        out = []
        for part, layers_of in (("head", lambda s, n: head_layers(s)), ("tail", tail_layers)):
            ours = self._predicted_sum(layers_of(space, num_classes), space.fixed_bits)
            theirs = self._predicted_sum(layers_of(ref, default_num_classes(ref)), ref.fixed_bits)
            exact: Cost = getattr(self.table, part)
            out.append((Cost(exact.latency * ours.latency / theirs.latency,
                             exact.energy * ours.energy / theirs.energy), True))
        return out[0], out[1]

    def why_missing(self, query: LayerQuery) -> str:
        shape, w, a = query
        kind = "depthwise" if shape.depthwise else "pointwise/dense"
        return (f"{self.name}: no {shape.kernel}x{shape.kernel} {kind} conv at W{w}A{a} on this hardware "
                f"(the table has none at any size)")


class HybridPricer(LayerPricer):
    """Exact table entries where they exist, the fit elsewhere (``--hardware bitfusion``)."""

    def __init__(self, table: TablePricer, fit: FitPricer) -> None:
        self.table, self.fit = table, fit
        self.name = f"{table.name} + fit"

    def price(self, queries: Sequence[LayerQuery]) -> list[Priced | None]:
        exact = self.table.price(queries)
        todo = [i for i, p in enumerate(exact) if p is None]
        for i, p in zip(todo, self.fit.price([queries[i] for i in todo])):
            exact[i] = p
        return exact

    def fixed(self, space: SearchSpace, num_classes: int) -> tuple[Priced, Priced]:
        if self.table.table.space == space.name and num_classes == default_num_classes(space):
            return self.table.fixed(space, num_classes)  # the table's own network
        return self.fit.fixed(space, num_classes)

    def why_missing(self, query: LayerQuery) -> str:
        return self.table.why_missing(query) + " and the fit does not cover it"
