"""Per-generation costs in a few gathers: block cost tables derived from the cost model.

``CostModel.evaluate`` is already vectorised, but at population 100 its fixed overheads
(validation, the ``source`` strings, six channels) make it ~0.4 ms a call, several times per
generation. The search needs less: every cost model of the project is *additive* -- a fixed
part plus, per active block, a price of its 1x1 convs at ``(width, pw_w, pw_a)`` and of its
depthwise conv at ``(kernel, width, dw_w, dw_a)`` (docs/design.md §8.5). :class:`FastCost` measures
those two tables per block **through the model's public** ``evaluate`` (probe genomes that
differ from a reference in one block only), checks the result against ``evaluate`` on random
genomes, and from then on prices a population with one gather-and-sum per metric. If a model is not
additive in this way the check fails and ``FastCost`` simply calls ``evaluate``: the fast path
never changes an answer, only its speed.

The same tables give the exact cheapest feasible subnet for any positive mix of metrics (a
per-block minimum), used to reject budgets no subnet can meet and to seed repair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from apq_lightning.hardware import CostModel
from apq_lightning.search.constraints import COST_METRICS, Budget
from apq_lightning.search.genes import GeneSpec
from apq_lightning.space import SearchSpace

_CH = len(COST_METRICS)  # value channels; channel _CH counts missing (unrunnable) layers
LAT, EN = COST_METRICS.index("latency_ms"), COST_METRICS.index("energy_mJ")


class _NotAdditive(Exception):
    """The probes cannot isolate one block (non-contiguous depths, no runnable reference)."""


@dataclass
class FastCost:
    """Population costs of one cost model: ``evaluate(genomes)`` like the model's, faster."""

    model: CostModel
    exact: bool = False  # the derived tables reproduce ``model.evaluate``; else it is called
    probes: int = 0
    _const: np.ndarray = field(default=None, repr=False)  # (_CH + 1,)
    _table: np.ndarray = field(default=None, repr=False)  # (_CH + 1, rows + 1): channel-major, last row 0
    _pw_off: np.ndarray = field(default=None, repr=False)  # (B,) first pointwise row of each block
    _dw_off: np.ndarray = field(default=None, repr=False)  # (B,) first depthwise row of each block
    _nw: np.ndarray = field(default=None, repr=False)  # (B,) width choices per block
    _available: dict[str, bool] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, model: CostModel, check: int = 256, seed: int = 0) -> FastCost:
        """Derive the block tables and verify them on ``check`` random genomes."""
        fast = cls(model)
        try:
            fast._derive()
        except _NotAdditive:
            return fast
        fast.exact = fast._agrees(np.random.default_rng(seed), check)
        return fast

    @property
    def space(self) -> SearchSpace:
        return self.model.space

    # ---- evaluation ----------------------------------------------------------------------
    def evaluate(self, genomes: np.ndarray, active: np.ndarray | None = None,
                 metrics: tuple[str, ...] = COST_METRICS) -> dict[str, np.ndarray]:
        """``{metric: (N,), "feasible": (N,)}`` of N genomes, as the model's ``evaluate`` says.

        ``metrics`` limits the work to what the caller needs (admission needs the budget's
        metrics only); ``active`` (``genome_active``) may be passed when already known.
        """
        if not self.exact:
            out = self.model.evaluate(genomes)
            return {k: out[k] for k in (*metrics, "feasible")}
        rows = self.rows(genomes, active)
        missing = np.take(self._table[_CH], rows).sum(axis=1)
        feasible = missing < 0.5
        out: dict[str, np.ndarray] = {}
        for m in metrics:
            i = COST_METRICS.index(m)
            v = self._const[i] + np.take(self._table[i], rows).sum(axis=1)
            if i in (LAT, EN):
                v = np.where(feasible, v, np.inf)
            out[m] = np.rint(v).astype(np.int64) if m == "bitops" else v
        out["feasible"] = feasible
        return out

    def rows(self, g: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        """(N, 2B) table rows: each block's pointwise then depthwise entry (skipped: the zero row)."""
        sp = self.space
        sl = sp.genome_slices()
        nb = len(sp.bit_choices)
        active = sp.genome_active(g) if active is None else active
        w = g[:, sl["widths"]]
        pw = self._pw_off + (w * nb + g[:, sl["pw_w"]]) * nb + g[:, sl["pw_a"]]
        dw = self._dw_off + ((g[:, sl["kernels"]] * self._nw + w) * nb + g[:, sl["dw_w"]]) * nb + g[:, sl["dw_a"]]
        both = np.concatenate([pw, dw], axis=1)
        return np.where(np.concatenate([active, active], axis=1), both, self._table.shape[1] - 1)

    def available(self, metric: str) -> bool:
        """Whether the model reports ``metric`` (the ``bitops`` model has no latency / energy)."""
        if metric not in self._available:
            sp = self.space
            g = sp.to_genome(sp.smallest(sp.bit_choices[-1]))[None]
            self._available[metric] = bool(np.isfinite(self.model.evaluate(g)[metric]).all())
        return self._available[metric]

    # ---- derivation ------------------------------------------------------------------------
    def _model_sums(self, genomes: np.ndarray) -> np.ndarray:
        """Model costs as channels: metrics (NaN kept) then missing = 1 - feasible."""
        out = self.model.evaluate(genomes)
        cols = [np.asarray(out[m], dtype=np.float64) for m in COST_METRICS]
        return np.stack([*cols, 1.0 - np.asarray(out["feasible"], dtype=np.float64)], axis=1)

    def _reference(self) -> np.ndarray:
        """Smallest depths and choices, at the first uniform bit index the hardware runs."""
        sp = self.space
        for bits in reversed(range(len(sp.bit_choices))):
            g = np.zeros(sp.genome_length, dtype=np.int64)
            for f in ("pw_w", "pw_a", "dw_w", "dw_a"):
                g[sp.genome_slices()[f]] = bits
            if self.model.evaluate(g[None])["feasible"][0]:
                return g
        raise _NotAdditive

    def _contexts(self, g0: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(probe base, reference): genomes in which only ``block`` differs in running."""
        sp = self.space
        blk = sp.blocks[block]
        allowed = sp.stage_depth_choices[blk.stage]
        if blk.position < allowed[0]:
            return g0, g0  # always runs: prices relative to its smallest choice, offset in const
        if blk.position not in allowed or blk.position + 1 not in allowed:
            raise _NotAdditive
        probe, ref = g0.copy(), g0.copy()
        probe[blk.stage] = allowed.index(blk.position + 1)
        ref[blk.stage] = allowed.index(blk.position)
        return probe, ref

    def _probe(self, base: np.ndarray, block: int, *choices: np.ndarray) -> np.ndarray:
        """Model sums of ``base`` with ``block``'s six genes (kernel, width, pw_w, pw_a, dw_w, dw_a)
        set to each column of ``choices``."""
        sl = self.space.genome_slices()
        g = np.repeat(base[None], len(choices[0]), axis=0)
        for name, v in zip(("kernels", "widths", "pw_w", "pw_a", "dw_w", "dw_a"), choices):
            g[:, sl[name].start + block] = v
        self.probes += len(g)
        return self._model_sums(g)

    def _derive(self) -> None:
        sp = self.space
        nb, nk, top = len(sp.bit_choices), len(sp.kernel_choices), len(sp.bit_choices) - 1
        g0 = self._reference()
        pw_rows, dw_rows = [], []
        for blk in sp.blocks:
            b, nw = blk.index, len(blk.width_choices)
            base, ref = self._contexts(g0, b)
            r = self._model_sums(ref[None])[0]
            # depthwise table at the top pw bits: D[k, w, dww, dwa] (+ P[w, top, top])
            k, w, dww, dwa = (a.ravel() for a in np.indices((nk, nw, nb, nb)))
            d = self._probe(base, b, k, w, np.full_like(k, top), np.full_like(k, top), dww, dwa)
            d = d.reshape(nk, nw, nb, nb, -1)
            d_run = d[..., _CH] < 0.5
            if not d_run.reshape(nk, nw, -1).any(axis=(0, 2)).all():
                raise _NotAdditive  # a width with no runnable depthwise at the reference pw bits
            # per width, the first runnable (kernel, dw_w, dw_a) as the pointwise probes' context
            first = d_run.transpose(1, 0, 2, 3).reshape(nw, -1).argmax(axis=1)
            kr, dwr, dar = np.unravel_index(first, (nk, nb, nb))
            w2, pww, pwa = (a.ravel() for a in np.indices((nw, nb, nb)))
            p = self._probe(base, b, kr[w2], w2, pww, pwa, dwr[w2], dar[w2]).reshape(nw, nb, nb, -1)
            p_ref = p[:, top, top]  # (nw, C): the same subnet as d at its reference choice
            p_tab = p - p_ref[:, None, None, :]  # P[w, pww, pwa] - P[w, top, top]
            d_tab = d - r
            p_tab[..., _CH] = p[..., _CH]  # missing counts are absolute, not differences
            d_tab[..., _CH] = d[..., _CH]
            for tab in (p_tab, d_tab):
                miss = tab[..., _CH] > 0.5
                tab[..., LAT] = np.where(miss, 0.0, tab[..., LAT])
                tab[..., EN] = np.where(miss, 0.0, tab[..., EN])
            pw_rows.append(p_tab.reshape(-1, _CH + 1))
            dw_rows.append(d_tab.reshape(-1, _CH + 1))
        n_pw = sum(len(x) for x in pw_rows)
        self._table = np.ascontiguousarray(np.concatenate([*pw_rows, *dw_rows, np.zeros((1, _CH + 1))]).T)
        self._pw_off = np.cumsum([0] + [len(x) for x in pw_rows[:-1]]).astype(np.int64)
        self._dw_off = n_pw + np.cumsum([0] + [len(x) for x in dw_rows[:-1]]).astype(np.int64)
        self._nw = np.array([len(b.width_choices) for b in sp.blocks], dtype=np.int64)
        self._const = self._model_sums(g0[None])[0]
        self._const[_CH] = 0.0

    def _agrees(self, rng: np.random.Generator, n: int) -> bool:
        sp = self.space
        g = np.concatenate([sp.sample_genomes(rng, n),
                            np.stack([sp.to_genome(sp.smallest(b)) for b in sp.bit_choices]),
                            np.stack([sp.to_genome(sp.largest(b)) for b in sp.bit_choices])])
        want = self.model.evaluate(g)
        got = self.evaluate(g)
        if not np.array_equal(want["feasible"], got["feasible"]):
            return False
        for m in COST_METRICS:
            a, b = np.asarray(want[m], dtype=np.float64), np.asarray(got[m], dtype=np.float64)
            if not np.allclose(a, b, rtol=1e-9, atol=1e-9, equal_nan=True):
                return False
        return True

    # ---- cheapest subnets ----------------------------------------------------------------------
    def cheapest(self, weights: dict[str, float], genes: GeneSpec) -> np.ndarray:
        """The runnable genome minimising ``sum(weights[m] * cost_m)`` exactly (tables), or the best
        of 20,000 random genomes and the uniform smallest subnets when the model is not additive."""
        if not self.exact:
            return self._cheapest_sampled(weights, genes)
        sp = self.space
        sl = sp.genome_slices()
        nb, nk = len(sp.bit_choices), len(sp.kernel_choices)
        wv = np.array([weights.get(m, 0.0) for m in COST_METRICS])
        held = {name: None for name in sl}
        for name in ("kernels", "widths", "pw_w", "pw_a", "dw_w", "dw_a"):
            start = sl[name].start
            held[name] = [None if genes.free[start + b] else int(genes.values[start + b])
                          for b in range(sp.num_blocks)]
        genome = genes.values.copy()
        block_cost = np.zeros(sp.num_blocks)
        for blk in sp.blocks:
            b, nw = blk.index, int(self._nw[blk.index])
            p = self._table[:, self._pw_off[b]: self._pw_off[b] + nw * nb * nb].T.reshape(nw, nb, nb, -1)
            d = self._table[:, self._dw_off[b]: self._dw_off[b] + nk * nw * nb * nb].T.reshape(nk, nw, nb, nb, -1)
            pc = np.where(p[..., _CH] > 0.5, np.inf, np.nan_to_num(p[..., :_CH]) @ wv)
            dc = np.where(d[..., _CH] > 0.5, np.inf, np.nan_to_num(d[..., :_CH]) @ wv)
            pc, dc = _mask_held(pc, [held["widths"][b], held["pw_w"][b], held["pw_a"][b]]), \
                _mask_held(dc, [held["kernels"][b], held["widths"][b], held["dw_w"][b], held["dw_a"][b]])
            pbest = pc.reshape(nw, -1).min(axis=1)
            dbest = dc.transpose(1, 0, 2, 3).reshape(nw, -1).min(axis=1)
            wi = int(np.argmin(pbest + dbest))
            block_cost[b] = pbest[wi] + dbest[wi]
            pww, pwa = np.unravel_index(int(np.argmin(pc[wi])), (nb, nb))
            ki, dww, dwa = np.unravel_index(int(np.argmin(dc[:, wi])), (nk, nb, nb))
            for name, v in (("kernels", ki), ("widths", wi), ("pw_w", pww), ("pw_a", pwa),
                            ("dw_w", dww), ("dw_a", dwa)):
                genome[sl[name].start + b] = v
        for s, allowed in enumerate(sp.stage_depth_choices):
            if not genes.free[s]:
                continue
            costs = [block_cost[(sp.stage_of_block == s) & (sp.position_of_block < d)].sum() for d in allowed]
            genome[s] = int(np.argmin(costs))
        return genome

    def _cheapest_sampled(self, weights: dict[str, float], genes: GeneSpec) -> np.ndarray:
        sp = self.space
        g = np.concatenate([genes.sample(np.random.default_rng(0), 20_000),
                            genes.hold(np.stack([sp.to_genome(sp.smallest(b)) for b in sp.bit_choices]))])
        c = self.evaluate(g)
        total = sum(w * np.nan_to_num(np.asarray(c[m], dtype=np.float64), nan=0.0) for m, w in weights.items())
        total = np.where(c["feasible"], total, np.inf)
        return g[int(np.argmin(total))]

    def floor(self, metric: str, genes: GeneSpec) -> float:
        """The smallest ``metric`` any runnable subnet reaches (exact on additive models)."""
        return float(self.evaluate(self.cheapest({metric: 1.0}, genes)[None])[metric][0])


def _mask_held(costs: np.ndarray, held: list[int | None]) -> np.ndarray:
    """Set to inf every choice that disagrees with a held gene (axis i <-> held[i])."""
    out = costs.copy()
    for axis, value in enumerate(held):
        if value is None:
            continue
        keep = np.zeros(costs.shape[axis], dtype=bool)
        keep[value] = True
        shape = [1] * costs.ndim
        shape[axis] = -1
        out = np.where(keep.reshape(shape), out, np.inf)
    return out


def anchor_for(budget: Budget, cost: FastCost, genes: GeneSpec) -> np.ndarray | None:
    """An admissible genome to repair towards: the cheapest by the budget-normalised sum, else by
    each metric alone; ``None`` when none of these meets the budget."""
    tries = [{m: 1.0 / v for m, v in budget.limits}] + [{m: 1.0} for m in budget.metrics]
    for weights in tries:
        g = cost.cheapest(weights, genes)
        if budget.admissible(cost.evaluate(g[None]))[0]:
            return g
    return None
