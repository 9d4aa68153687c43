"""A regression fitted to the BitFusion table, for layers the table does not hold.

Why: the table only knows ``apq_imagenet`` at 224 px; the CIFAR and tiny spaces have other
layer shapes, and a float CPU table cannot show how bit widths change cost on an accelerator.
The fit keeps the accelerator's bit-width behaviour everywhere.

Model, per conv type (pointwise / depthwise), for latency and energy separately, in log space:

* a **trend** ``log y = α·log MACs + β[w, a]`` (least squares; one slope per conv type, one
  intercept per (w_bits, a_bits) pair) -- it carries the fit to layers smaller or larger than
  any in the table, where trees cannot extrapolate, and since the pairs share the slope their
  order does not flip far outside the table;
* per (w_bits, a_bits) pair, **boosted trees** (scikit-learn's
  ``HistGradientBoostingRegressor``) on the trend's residual, from shape features (log MACs,
  channels, sizes, kernel, stride, weight / input / output volumes) -- they learn the
  accelerator's tiling steps and memory effects (and hold the nearest table layer's residual
  beyond the table).

A dense conv with a kernel (the stem) is priced as the pointwise GEMM it lowers to
(``Cin·k² -> Cout`` at the output size). A (type, kernel, w, a) combination that the table
never has -- BitFusion's 7x7 depthwise with 4-bit activations -- is *unsupported*: the fit
returns NaN and the cost model calls the subnet infeasible, as the table does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.stats import spearmanr
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import GroupKFold
from threadpoolctl import threadpool_limits

from apq_lightning.hardware.table import ConvShape, Cost, CostTable, LayerQuery, bitfusion_table

TARGETS: tuple[str, ...] = ("latency", "energy")
FEATURES: tuple[str, ...] = (
    "log_macs", "log_cin", "log_cout", "log_h_in", "log_h_out", "log_kernel", "stride",
    "log_weights", "log_in_volume", "log_out_volume",
)


def conv_type(shape: ConvShape) -> str:
    return "dw" if shape.depthwise else "pw"


def as_gemm(shape: ConvShape) -> ConvShape:
    """A dense kxk conv as the 1x1 conv on its im2col matrix (what a GEMM accelerator runs)."""
    if shape.depthwise or shape.kernel == 1:
        return shape
    return ConvShape(shape.in_channels * shape.kernel**2, shape.out_channels, shape.output_size, 1, 1, 0, 1)


def features(shapes: Sequence[ConvShape]) -> np.ndarray:
    """(n, len(FEATURES)) feature matrix; logs because costs span four orders of magnitude."""
    a = np.array([tuple(s) for s in shapes], dtype=np.float64).reshape(-1, 7)
    cin, cout, h, k, s, p, g = a.T
    h_out = np.floor((h + 2 * p - k) / s) + 1
    weights = cout * (cin / g) * k * k
    macs = weights * h_out * h_out
    cols = [macs, cin, cout, h, h_out, k]
    out = np.log(np.stack(cols, axis=1))
    return np.concatenate(
        [out, s[:, None], np.log(np.stack([weights, cin * h * h, cout * h_out * h_out], axis=1))], axis=1
    )


@dataclass(frozen=True)
class TreeParams:
    """Boosting settings; small and fast because each group has only a few hundred rows."""

    max_iter: int = 60
    learning_rate: float = 0.2
    min_samples_leaf: int = 8
    random_state: int = 0


class TypeModel:
    """Shared-slope log-linear trend over all bit pairs of one conv type + per-pair residual trees."""

    def __init__(self, params: TreeParams = TreeParams()) -> None:
        self.params = params
        self.pairs: list[tuple[int, int]] = []
        self.trend: LinearRegression | None = None
        self.trees: dict[tuple[int, int], HistGradientBoostingRegressor] = {}

    def _trend_inputs(self, X: np.ndarray, bits: np.ndarray) -> np.ndarray:
        onehot = np.stack([(bits[:, 0] == w) & (bits[:, 1] == a) for w, a in self.pairs], axis=1)
        return np.concatenate([X[:, :1], onehot.astype(np.float64)], axis=1)

    def fit(self, X: np.ndarray, bits: np.ndarray, y: np.ndarray) -> TypeModel:
        """``X`` features, ``bits`` (n, 2) int, ``y`` log cost."""
        self.pairs = sorted({(int(w), int(a)) for w, a in bits})
        T = self._trend_inputs(X, bits)
        self.trend = LinearRegression(fit_intercept=False).fit(T, y)
        resid = y - self.trend.predict(T)
        p = self.params
        for w, a in self.pairs:
            m = (bits[:, 0] == w) & (bits[:, 1] == a)
            self.trees[(w, a)] = HistGradientBoostingRegressor(
                max_iter=p.max_iter, learning_rate=p.learning_rate, min_samples_leaf=p.min_samples_leaf,
                random_state=p.random_state,
            ).fit(X[m], resid[m])
        return self

    def predict(self, X: np.ndarray, w: int, a: int) -> np.ndarray:
        """Log cost of layers ``X`` at one fitted bit pair."""
        assert self.trend is not None, "fit() first"
        bits = np.tile([w, a], (len(X), 1))
        return self.trend.predict(self._trend_inputs(X, bits)) + self.trees[(w, a)].predict(X)


ModelKey = tuple[str, str]  # (conv type, target)
Supported = frozenset[tuple[str, int, int, int]]  # (conv type, kernel, w_bits, a_bits)


def monotone_log_cost(model: TypeModel, typ: str, X: np.ndarray, kernels: np.ndarray, bits: np.ndarray,
                      supported: Supported) -> np.ndarray:
    """Log cost of layers ``X`` (one conv type) at their own (w, a) ``bits`` (n, 2).

    The prediction is the maximum over every supported pair ``(w', a') <= (w, a)``: more bits
    never run faster or cheaper. Within the table's range this rarely binds; far outside it
    (tiny layers of small spaces) it keeps bit widths in their physical order.
    """
    best = np.full(len(X), -np.inf)
    for w, a in model.pairs:
        ok = (w <= bits[:, 0]) & (a <= bits[:, 1])
        ok &= np.array([(typ, int(k), w, a) in supported for k in kernels])
        if ok.any():
            best[ok] = np.maximum(best[ok], model.predict(X[ok], w, a))
    return best


def _rows(table: CostTable) -> tuple[list[ConvShape], np.ndarray, np.ndarray, np.ndarray]:
    """Table entries as (shapes, bits (n,2), latency, energy)."""
    items = sorted(table.entries.items())
    shapes = [as_gemm(s) for (s, _, _), _ in items]
    bits = np.array([(w, a) for (_, w, a), _ in items], dtype=np.int64).reshape(-1, 2)
    lat = np.array([c.latency for _, c in items])
    en = np.array([c.energy for _, c in items])
    return shapes, bits, lat, en


def _supported(table: CostTable) -> Supported:
    """(type, kernel, w, a) combinations the table has at least once: what the hardware runs."""
    return frozenset((conv_type(as_gemm(s)), as_gemm(s).kernel, w, a) for s, w, a in table.entries)


class BitFusionFit:
    """Per-(type, w, a) latency and energy models fitted to a table, and what they cover.

    Fitting takes a few seconds, so it happens on the first prediction that needs it: a cost
    model whose layers are all in the table (``apq_imagenet``) never pays for it.
    """

    def __init__(self, table: CostTable, params: TreeParams = TreeParams()) -> None:
        self.table = table
        self.params = params
        self.supported = _supported(table)
        self._models: dict[ModelKey, TypeModel] | None = None
        self._cache: dict[LayerQuery, Cost] = {}

    @property
    def models(self) -> dict[ModelKey, TypeModel]:
        if self._models is None:
            self._models = _fit_types(self.table, self.params)
        return self._models

    def supports(self, shape: ConvShape, w_bits: int, a_bits: int) -> bool:
        g = as_gemm(shape)
        return (conv_type(g), g.kernel, int(w_bits), int(a_bits)) in self.supported

    def predict(self, queries: Sequence[LayerQuery]) -> list[Cost | None]:
        """Costs of many layers at once (one batched model call per group); None if unsupported."""
        out: list[Cost | None] = [self._cache.get(q) for q in queries]
        todo: dict[str, list[int]] = {}
        for i, (shape, w, a) in enumerate(queries):
            if out[i] is None and self.supports(shape, w, a):
                todo.setdefault(conv_type(as_gemm(shape)), []).append(i)
        for typ, idx in todo.items():
            gemm = [as_gemm(queries[i][0]) for i in idx]
            X, kernels = features(gemm), np.array([g.kernel for g in gemm])
            bits = np.array([queries[i][1:] for i in idx], dtype=np.int64)
            with threadpool_limits(1):
                preds = {t: np.exp(monotone_log_cost(self.models[(typ, t)], typ, X, kernels, bits, self.supported))
                         for t in TARGETS}
            for j, i in enumerate(idx):
                out[i] = self._cache[queries[i]] = Cost(float(preds["latency"][j]), float(preds["energy"][j]))
        return out


def _fit_types(table: CostTable, params: TreeParams,
               rows: np.ndarray | None = None) -> dict[ModelKey, TypeModel]:
    """One :class:`TypeModel` per (conv type, target), on all entries or on ``rows`` (a mask)."""
    shapes, bits, lat, en = _rows(table)
    types = np.array([conv_type(s) for s in shapes])
    X = features(shapes)
    use = np.ones(len(shapes), bool) if rows is None else rows
    models: dict[ModelKey, TypeModel] = {}
    with threadpool_limits(1):  # tiny fits: thread start-up costs more than it saves
        for typ in sorted(set(types)):
            m = use & (types == typ)
            for name, y in (("latency", lat), ("energy", en)):
                if np.isnan(y[m]).any() or (y[m] <= 0).any():
                    raise ValueError(f"{table.name}: the fit needs positive latency and energy for every entry")
                models[(typ, name)] = TypeModel(params).fit(X[m], bits[m], np.log(y[m]))
    return models


def fit_table(table: CostTable, params: TreeParams = TreeParams()) -> BitFusionFit:
    """Fit every conv type of ``table`` now (a few seconds for BitFusion)."""
    fit = BitFusionFit(table, params)
    fit.models  # noqa: B018 -- force the fit
    return fit


@lru_cache(maxsize=1)
def bitfusion_fit() -> BitFusionFit:
    """The (lazily fitted) model of the packaged BitFusion table, one per process."""
    return BitFusionFit(bitfusion_table())


# --------------------------------------------------------------------------------------
# Held-out evaluation
# --------------------------------------------------------------------------------------
@dataclass
class FitReport:
    """Held-out errors of the fit (whole layer shapes held out) and of a trivial baseline."""

    n_splits: int
    n_entries: int
    n_shapes: int
    median_ape: dict[str, float]
    mean_ape: dict[str, float]
    p95_ape: dict[str, float]
    median_ape_by_type: dict[str, dict[str, float]]
    baseline_median_ape: dict[str, float]
    out_of_fold: CostTable

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "out_of_fold"}


def cross_validate(table: CostTable | None = None, n_splits: int = 5,
                   params: TreeParams = TreeParams()) -> FitReport:
    """GroupKFold over layer shapes: every bit pair of a held-out shape is held out together.

    The baseline is the trivial ``cost = c · MACs`` per (type, w, a) group (c = median ratio
    on the training folds), i.e. what BitOps-style proxies assume.
    """
    table = table or bitfusion_table()
    shapes, bits, lat, en = _rows(table)
    types = np.array([conv_type(s) for s in shapes])
    X = features(shapes)
    macs = np.exp(X[:, 0])
    _, groups = np.unique(np.array([tuple(s) for s in shapes]), axis=0, return_inverse=True)
    ys = {"latency": lat, "energy": en}
    pred = {t: np.full(len(shapes), np.nan) for t in TARGETS}
    base = {t: np.full(len(shapes), np.nan) for t in TARGETS}
    kernels = np.array([s.kernel for s in shapes])
    supported = _supported(table)
    pairs = sorted({(t, int(b[0]), int(b[1])) for t, b in zip(types, bits)})
    for train, _ in GroupKFold(n_splits).split(X, groups=groups.ravel()):
        tr = np.zeros(len(shapes), bool)
        tr[train] = True
        models = _fit_types(table, params, rows=tr)
        with threadpool_limits(1):
            for typ in ("pw", "dw"):
                test = np.flatnonzero((types == typ) & ~tr)
                for t in TARGETS:
                    pred[t][test] = np.exp(monotone_log_cost(models[(typ, t)], typ, X[test], kernels[test],
                                                             bits[test], supported))
        for typ, w, a in pairs:
            grp = (types == typ) & (bits[:, 0] == w) & (bits[:, 1] == a)
            for t in TARGETS:
                base[t][grp & ~tr] = np.median(ys[t][grp & tr] / macs[grp & tr]) * macs[grp & ~tr]
    ape = {t: np.abs(pred[t] - ys[t]) / ys[t] for t in TARGETS}
    base_ape = {t: np.abs(base[t] - ys[t]) / ys[t] for t in TARGETS}
    items = sorted(table.entries)
    oof = CostTable(
        {q: Cost(float(pred["latency"][i]), float(pred["energy"][i])) for i, q in enumerate(items)},
        table.head, table.tail, f"{table.name} (out-of-fold fit)", table.space, {"fit": "out-of-fold"},
    )
    return FitReport(
        n_splits, len(shapes), int(groups.max()) + 1,
        {t: float(np.median(ape[t])) for t in TARGETS},
        {t: float(np.mean(ape[t])) for t in TARGETS},
        {t: float(np.percentile(ape[t], 95)) for t in TARGETS},
        {typ: {t: float(np.median(ape[t][types == typ])) for t in TARGETS} for typ in ("pw", "dw")},
        {t: float(np.median(base_ape[t])) for t in TARGETS},
        oof,
    )


def rank_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman ρ over the entries finite in both (infeasible subnets are left out)."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return math.nan
    return float(spearmanr(a[ok], b[ok]).statistic)
