"""Cost models: latency, energy, BitOps and size of subnets, one at a time or whole populations.

Every cost model answers two questions:

* ``costs(subnet) -> dict`` -- one subnet, walked layer by layer (readable; used by the
  ``cost`` command and as the reference the vectorised path is tested against);
* ``evaluate(genomes) -> dict[str, np.ndarray]`` -- N integer genomes
  (``SearchSpace.to_genome`` layout) at once, for the search. Per block it precomputes, once,
  tables indexed by (kernel, width, bits) choice, then gathers them with numpy fancy
  indexing: no Python loop per subnet.

Metrics (keys of both): ``latency_ms``, ``energy_mJ``, ``bitops`` (per sample),
``size_bytes``, ``feasible``, ``source`` (``"table"``, ``"fit"`` or ``"mixed"``: where the
latency / energy came from; ``"count"`` for the BitOps-only model). An infeasible subnet
(a layer the hardware cannot run) has latency and energy ``inf``; a model that has no energy
(a measured CPU table) or no latency at all (``bitops``) reports NaN there.

Per-layer latency / energy come from a :class:`~apq_lightning.hardware.pricing.LayerPricer`
(a table, a fit, or both); this module sums them.

BitOps and size are computed analytically from the layer shapes and count what
``apq_lightning.quant.counting`` counts on the extracted network: every conv and the
classifier; BitOps = MACs x w_bits x a_bits; size = conv / linear weights at their weight
bits + BN scale/shift and the classifier bias at 32 bits. Elastic blocks use their policy
(both 1x1 convs the pw pair, the depthwise conv the dw pair); stem, fixed first block, head
conv and classifier use ``space.fixed_bits`` for weights and activations. A float subnet
(``bits`` None) is costed at the largest bit choice, 8/8 in every preset -- the same
convention as ``SearchSpace.to_genome``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apq_lightning.hardware.fit import BitFusionFit, bitfusion_fit
from apq_lightning.hardware.geometry import block_convs, block_extra_params, default_num_classes, fixed_layers
from apq_lightning.hardware.pricing import FitPricer, HybridPricer, LayerPricer, Priced, TablePricer
from apq_lightning.hardware.table import ConvShape, CostTable, LayerQuery, bitfusion_table, load_table
from apq_lightning.layout import BLOCK_CONVS, BLOCK_ROLES, block_policy
from apq_lightning.space import BIT_FIELDS, SearchSpace, Subnet, get_space

METRICS: tuple[str, ...] = ("latency_ms", "energy_mJ", "bitops", "size_bytes", "feasible", "source")
ROLES: tuple[str, ...] = BLOCK_ROLES
"""Roles of an elastic block's convs, in network order (from :mod:`apq_lightning.layout`)."""
PARAM_BITS = 32  # BN scale/shift and biases are stored in float


# --------------------------------------------------------------------------------------
# Cost models
# --------------------------------------------------------------------------------------
# channels of the precomputed per-choice tables
LAT, EN, BITOPS, SIZE, NFIT, MISSING = range(6)
_NCH = 6
# the two per-block gather tables: convs on the pw pair (kernel-independent), convs on the dw pair
_PW, _DW = ("pw_w", "pw_a"), ("dw_w", "dw_a")


class CostModel(ABC):
    """Latency / energy / BitOps / size of subnets of one space on one piece of hardware."""

    hardware: str
    space: SearchSpace
    num_classes: int

    @abstractmethod
    def costs(self, subnet: Subnet) -> dict[str, Any]:
        """All metrics of one subnet (plus ``reason`` when infeasible)."""

    @abstractmethod
    def evaluate(self, genomes: np.ndarray) -> dict[str, np.ndarray]:
        """All metrics of N genomes as arrays of length N."""

    def evaluate_subnets(self, subnets: Sequence[Subnet]) -> dict[str, np.ndarray]:
        for s in subnets:
            self.space.check(s)
        return self.evaluate(np.stack([self.space.to_genome(s) for s in subnets]))


def _check_num_classes(num_classes: int | None, space: SearchSpace) -> int:
    """The classifier width: the space's default for ``None``, else an integer >= 1 (0 or -5
    would silently shrink the classifier's BitOps and size)."""
    if num_classes is None:
        return default_num_classes(space)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return int(num_classes)


class LayerwiseCost(CostModel):
    """Sum of per-layer prices + fixed head/tail; ``pricer=None`` gives BitOps and size only."""

    def __init__(self, space: str | SearchSpace, pricer: LayerPricer | None, hardware: str,
                 num_classes: int | None = None) -> None:
        self.space = get_space(space)
        self.pricer = pricer
        self.hardware = hardware
        self.num_classes = _check_num_classes(num_classes, self.space)
        self._cache: dict[LayerQuery, Priced | None] = {}
        self._build()

    # ---- precomputation ------------------------------------------------------------------
    def _queries(self) -> list[LayerQuery]:
        sp, out = self.space, []
        for blk in sp.blocks:
            for mid in blk.width_choices:
                for k in sp.kernel_choices:
                    shapes = block_convs(blk, k, mid)
                    for w in sp.bit_choices:
                        for a in sp.bit_choices:
                            out += [(shape, w, a) for shape in shapes]
        return list(dict.fromkeys(out))

    def _build(self) -> None:
        """Price every layer choice once, then fill the per-block gather tables."""
        sp = self.space
        if self.pricer is not None:
            queries = self._queries()
            self._cache = dict(zip(queries, self.pricer.price(queries)))
            head, tail = self.pricer.fixed(sp, self.num_classes)
            self._fixed_prices = (head, tail)
        fb = sp.fixed_bits
        fixed = fixed_layers(sp, self.num_classes)
        self._fixed_bitops = sum(f.shape.macs for f in fixed) * fb * fb
        self._fixed_size = sum(f.shape.weight_params * fb + f.extra_params * PARAM_BITS for f in fixed) / 8
        nb, nk = len(sp.bit_choices), len(sp.kernel_choices)
        nw = self._nw = max(len(b.width_choices) for b in sp.blocks)
        # one extra all-zero row per table: inactive blocks gather it, so sums need no mask
        self._pw = np.zeros((sp.num_blocks * nw * nb * nb + 1, _NCH))
        self._dw = np.zeros((sp.num_blocks * nk * nw * nb * nb + 1, _NCH))
        pw = self._pw[:-1].reshape(sp.num_blocks, nw, nb, nb, _NCH)
        dw = self._dw[:-1].reshape(sp.num_blocks, nk, nw, nb, nb, _NCH)
        for blk in sp.blocks:
            nmid = len(blk.width_choices)
            for conv in BLOCK_CONVS:
                # [mid choice][kernel choice] -> this conv's shape
                shapes = [[conv.shape(blk, k, mid) for k in sp.kernel_choices] for mid in blk.width_choices]
                if conv.bits == _PW:  # a 1x1 conv: the same layer at every kernel
                    pw[blk.index, :nmid] += self._layer_table([s[0] for s in shapes])
                elif conv.bits == _DW:
                    for ki in range(nk):
                        dw[blk.index, ki, :nmid] += self._layer_table([s[ki] for s in shapes])
                else:
                    raise ValueError(f"block conv {conv.role!r}: bits {conv.bits} are neither {_PW} nor {_DW}")
            bn_bytes = np.array([block_extra_params(blk, mid) for mid in blk.width_choices]) * PARAM_BITS / 8
            pw[blk.index, :nmid, :, :, SIZE] += bn_bytes[:, None, None]

    def _layer_table(self, shapes: Sequence[ConvShape]) -> np.ndarray:
        """(len(shapes), nb, nb, channels): every layer at every (w, a) choice."""
        bits = np.asarray(self.space.bit_choices, dtype=np.float64)
        nb = len(bits)
        out = np.zeros((len(shapes), nb, nb, _NCH))
        macs = np.array([s.macs for s in shapes], dtype=np.float64)[:, None, None]
        params = np.array([s.weight_params for s in shapes], dtype=np.float64)[:, None, None]
        out[..., BITOPS] = macs * bits[:, None] * bits[None, :]
        out[..., SIZE] = params * bits[:, None] / 8  # broadcasts over a_bits
        if self.pricer is None:
            out[..., LAT] = out[..., EN] = np.nan
            return out
        priced = [self._cache[(s, w, a)] for s in shapes for w in self.space.bit_choices
                  for a in self.space.bit_choices]
        vals = np.array([(p[0].latency, p[0].energy, p[1], 0.0) if p is not None else (0.0, 0.0, 0.0, 1.0)
                         for p in priced]).reshape(len(shapes), nb, nb, 4)
        out[..., [LAT, EN, NFIT, MISSING]] = vals
        return out

    # ---- vectorised path -------------------------------------------------------------------
    def _check_genomes(self, genomes: np.ndarray) -> np.ndarray:
        g = np.asarray(genomes)
        g = g[None] if g.ndim == 1 else g
        if g.ndim != 2 or g.shape[1] != self.space.genome_length or not np.issubdtype(g.dtype, np.integer):
            raise ValueError(f"space {self.space.name!r}: genomes must be an integer array of shape "
                             f"(N, {self.space.genome_length}), got {g.dtype} {g.shape}")
        bad = (g < 0) | (g >= self.space.gene_cardinality)
        if bad.any():
            n, j = np.argwhere(bad)[0]
            raise ValueError(f"space {self.space.name!r}: genome {n}, gene {j} = {g[n, j]} outside "
                             f"[0, {self.space.gene_cardinality[j]})")
        return g.astype(np.int64, copy=False)

    def evaluate(self, genomes: np.ndarray) -> dict[str, np.ndarray]:
        g = self._check_genomes(genomes)
        sp, sl = self.space, self.space.genome_slices()
        nb, nk, nw = len(sp.bit_choices), len(sp.kernel_choices), self._nw
        active = sp.genome_active(g)
        blocks = np.arange(sp.num_blocks)[None, :]
        widths = g[:, sl["widths"]]
        pw_idx = ((blocks * nw + widths) * nb + g[:, sl["pw_w"]]) * nb + g[:, sl["pw_a"]]
        dw_idx = (((blocks * nk + g[:, sl["kernels"]]) * nw + widths) * nb + g[:, sl["dw_w"]]) * nb + g[:, sl["dw_a"]]
        pw_idx[~active] = len(self._pw) - 1  # the zero row
        dw_idx[~active] = len(self._dw) - 1
        total = self._pw[pw_idx].sum(axis=1) + self._dw[dw_idx].sum(axis=1)  # (N, channels)
        return self._finish(total, active.sum(axis=1))

    def _finish(self, total: np.ndarray, n_active: np.ndarray) -> dict[str, np.ndarray]:
        """Add the fixed layers and turn channel sums into the public metrics."""
        n = len(total)
        feasible = total[:, MISSING] == 0
        bitops = np.rint(total[:, BITOPS] + self._fixed_bitops).astype(np.int64)
        size = total[:, SIZE] + self._fixed_size
        if self.pricer is None:
            nan = np.full(n, np.nan)
            return {"latency_ms": nan, "energy_mJ": nan.copy(), "bitops": bitops, "size_bytes": size,
                    "feasible": np.ones(n, bool), "source": np.full(n, "count")}
        (head, hfit), (tail, tfit) = self._fixed_prices
        lat = np.where(feasible, total[:, LAT] + head.latency + tail.latency, np.inf)
        en = np.where(feasible, total[:, EN] + head.energy + tail.energy, np.inf)
        n_fit = total[:, NFIT] + hfit + tfit
        n_layers = len(BLOCK_CONVS) * n_active + 2 - total[:, MISSING]  # priced layers (+ head and tail)
        source = np.where(n_fit == 0, "table", np.where(n_fit == n_layers, "fit", "mixed"))
        return {"latency_ms": lat, "energy_mJ": en, "bitops": bitops, "size_bytes": size,
                "feasible": feasible, "source": source}

    # ---- one subnet, layer by layer --------------------------------------------------------
    def _price(self, q: LayerQuery) -> Priced | None:
        if q not in self._cache:
            self._cache[q] = self.pricer.price([q])[0]  # type: ignore[union-attr]
        return self._cache[q]

    def costs(self, subnet: Subnet) -> dict[str, Any]:
        self.space.check(subnet)
        sp = self.space
        fb, top = sp.fixed_bits, sp.bit_choices[-1]
        bitops = sum(f.shape.macs for f in fixed_layers(sp, self.num_classes)) * fb * fb
        size_bits = sum(f.shape.weight_params * fb + f.extra_params * PARAM_BITS
                        for f in fixed_layers(sp, self.num_classes))
        lat = en = 0.0
        n_fit, n_layers, reason = 0, 2, None
        if self.pricer is not None:
            (head, hfit), (tail, tfit) = self._fixed_prices
            lat, en, n_fit = head.latency + tail.latency, head.energy + tail.energy, int(hfit) + int(tfit)
        for i in subnet.active_blocks:
            blk = sp.blocks[i]
            policy = block_policy(subnet.bits.block(i) if subnet.bits is not None else (top,) * len(BIT_FIELDS))
            convs = block_convs(blk, subnet.kernels[i], subnet.widths[i])
            size_bits += block_extra_params(blk, subnet.widths[i]) * PARAM_BITS
            for conv, shape in zip(BLOCK_CONVS, convs):
                role, (w, a) = conv.role, conv.layer_bits(policy)
                bitops += shape.macs * w * a
                size_bits += shape.weight_params * w
                n_layers += 1
                if self.pricer is None:
                    continue
                priced = self._price((shape, w, a))
                if priced is None:
                    reason = reason or f"block {i} {role} conv: {self.pricer.why_missing((shape, w, a))}"
                    n_layers -= 1
                    continue
                lat, en, n_fit = lat + priced[0].latency, en + priced[0].energy, n_fit + priced[1]
        out: dict[str, Any] = {"latency_ms": lat, "energy_mJ": en, "bitops": int(bitops),
                               "size_bytes": size_bits / 8, "feasible": reason is None}
        if self.pricer is None:
            out.update(latency_ms=math.nan, energy_mJ=math.nan, source="count")
            return out
        if reason is not None:
            out.update(latency_ms=math.inf, energy_mJ=math.inf, reason=reason)
        out["source"] = "table" if n_fit == 0 else "fit" if n_fit == n_layers else "mixed"
        return out


# --------------------------------------------------------------------------------------
# Named hardware
# --------------------------------------------------------------------------------------
class BitFusionCost(LayerwiseCost):
    """Exactly the APQ reference's BitFusion table; only for ``apq_imagenet`` (the table's space)."""

    def __init__(self, space: str | SearchSpace = "apq_imagenet", num_classes: int | None = None) -> None:
        table = bitfusion_table()
        if get_space(space).name != table.space:
            raise ValueError(f"the BitFusion table covers space {table.space!r} only, not "
                             f"{get_space(space).name!r}; use hardware 'bitfusion' (table + fit) or "
                             f"'bitfusion_fit' for other spaces")
        super().__init__(space, TablePricer(table), "bitfusion_table", num_classes)


class FittedBitFusionCost(LayerwiseCost):
    """The regression fitted to the BitFusion table, for every layer (any space)."""

    def __init__(self, space: str | SearchSpace, num_classes: int | None = None,
                 fit: BitFusionFit | None = None) -> None:
        super().__init__(space, FitPricer(fit or bitfusion_fit(), bitfusion_table()), "bitfusion_fit", num_classes)


class HybridBitFusionCost(LayerwiseCost):
    """BitFusion: exact table entries where the table has them, the fit elsewhere."""

    def __init__(self, space: str | SearchSpace, num_classes: int | None = None,
                 fit: BitFusionFit | None = None) -> None:
        table = bitfusion_table()
        pricer = HybridPricer(TablePricer(table), FitPricer(fit or bitfusion_fit(), table))
        super().__init__(space, pricer, "bitfusion", num_classes)


class MeasuredCost(LayerwiseCost):
    """A table measured on the user's device (``lut build``); float tables ignore bit widths."""

    def __init__(self, table: CostTable | str | Path, space: str | SearchSpace | None = None,
                 num_classes: int | None = None) -> None:
        table = table if isinstance(table, CostTable) else load_table(table)
        if space is None and table.space is None:
            raise ValueError(f"table {table.name} does not name its space; pass space=")
        sp = get_space(space if space is not None else table.space)  # type: ignore[arg-type]
        if table.space is not None and table.space != sp.name:
            raise ValueError(f"table {table.name} was measured for space {table.space!r}, not {sp.name!r}")
        if num_classes is None and table.meta.get("num_classes") is not None:
            num_classes = int(table.meta["num_classes"])
        self.table = table
        super().__init__(sp, TablePricer(table), f"lut:{table.name}", num_classes)


class BitOpsCost(LayerwiseCost):
    """BitOps and model size only (no latency / energy model): hardware-agnostic budgets."""

    def __init__(self, space: str | SearchSpace, num_classes: int | None = None) -> None:
        super().__init__(space, None, "bitops", num_classes)


_REGISTRY: dict[str, Callable[..., CostModel]] = {
    "bitfusion": HybridBitFusionCost,
    "bitfusion_table": BitFusionCost,
    "bitfusion_fit": FittedBitFusionCost,
    "bitops": BitOpsCost,
}


def register_cost_model(name: str, factory: Callable[..., CostModel]) -> None:
    """Add a hardware name for ``get_cost_model`` (``factory(space, **kw) -> CostModel``)."""
    if name in _REGISTRY or name.startswith("lut:"):
        raise ValueError(f"cost model {name!r} is already registered or reserved")
    _REGISTRY[name] = factory


def list_cost_models() -> list[str]:
    return sorted(_REGISTRY) + ["lut:<path to a measured table>"]


def get_cost_model(hardware: str, space: str | SearchSpace, **kw: Any) -> CostModel:
    """Factory over the registry; ``lut:PATH`` loads a measured table from PATH."""
    if hardware.startswith("lut:"):
        return MeasuredCost(hardware[4:], space, **kw)
    try:
        factory = _REGISTRY[hardware]
    except KeyError:
        raise ValueError(f"unknown hardware {hardware!r}; known: {', '.join(list_cost_models())}") from None
    return factory(space, **kw)


def json_ready(costs: dict[str, Any]) -> dict[str, Any]:
    """Non-finite floats -> None, numpy scalars -> Python, so ``json.dumps`` writes strict JSON."""
    out = {}
    for k, v in costs.items():
        v = v.item() if isinstance(v, np.generic) else v
        out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
    return out
