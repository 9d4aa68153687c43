"""The accuracy numbers of the project: a classifier's top-1 (:func:`top1`) and the ranking
metrics of accuracy predictors (docs/design.md §6.3).

Each is written once here and called by everything that reports it (sample collection, QAT,
the predictor module, its scatter plot, the transfer study), so two reports of "the same"
number cannot drift apart.

The search only ever *compares* predicted accuracies, so the metric that matters is the share
of pairs a predictor orders correctly (APQ's "pairwise accuracy"); Kendall's τ
(``torchmetrics.regression.KendallRankCorrCoef``) and RMSE (``MeanSquaredError(squared=False)``)
are reported beside it; :func:`predictor_metrics` computes the three together, and
:class:`PredictorMetrics` is the same as a ``torchmetrics`` metric (for the Lightning module).

:class:`PairwiseAccuracy` keeps every prediction as a concatenated list state
(``dist_reduce_fx="cat"``), so under DDP every rank computes over the whole held-out set, and
counts pairs in ``O(n log² n)`` (a merge-count of inversions with batched ``searchsorted``)
instead of materialising ``n²`` comparisons: 20k samples are 2·10⁸ pairs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.functional.regression import kendall_rank_corrcoef
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "PREDICTOR_METRICS",
    "PairwiseAccuracy",
    "arch_groups",
    "pairwise_split",
    "PredictorMetrics",
    "count_inversions",
    "pairwise_accuracy",
    "pairwise_counts",
    "predictor_metrics",
    "top1",
]

PREDICTOR_METRICS: tuple[str, ...] = ("pairwise_acc", "kendall_tau", "rmse")
"""The keys of :func:`predictor_metrics` (logged as ``val/<key>``, ``test/<key>``)."""


@torch.no_grad()
def top1(
    model: nn.Module,
    batches: Iterable[Sequence[torch.Tensor]],
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    channels_last: bool = False,
) -> float:
    """Top-1 accuracy of ``model`` in eval mode over ``(images, labels, ...)`` batches (the model's
    mode is restored).

    ``device`` / ``channels_last`` move and lay out each batch first (``None`` / ``False``: the
    batches are used as they come, e.g. images cached on the device once). At most
    ``max_batches`` batches (``None``: all). No image at all is a ValueError: an accuracy of an
    empty set would read as a measured 0.
    """
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x, y = batch[0], batch[1]
            if device is not None:
                x, y = x.to(device), y.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("top1: no evaluation images")
    return correct / total


def count_inversions(x: torch.Tensor) -> int:
    """Number of pairs ``i < j`` with ``x[i] > x[j]`` (strict), in ``O(n log² n)`` tensor ops.

    Bottom-up over block sizes ``s = 1, 2, 4, …``: for each pair of neighbouring blocks, every
    element of the right block counts the elements of the (sorted) left block above it with one
    batched ``searchsorted``. Padding with ``+inf`` at the end adds nothing: a padded element is
    never strictly below another in a later block.
    """
    x = x.detach().reshape(-1).to(torch.float64)
    n = x.numel()
    if n < 2:
        return 0
    size = 1 << (n - 1).bit_length()
    padded = torch.cat([x, x.new_full((size - n,), float("inf"))])
    total = 0
    s = 1
    while s < size:
        blocks = padded.view(-1, 2, s)
        left = blocks[:, 0].sort(dim=1).values.contiguous()
        right = blocks[:, 1].contiguous()
        not_above = torch.searchsorted(left, right, right=True)  # left elements <= each right element
        total += int((s - not_above).sum())
        s *= 2
    return total


def _tie_pairs(x: torch.Tensor) -> int:
    """Pairs of equal values in a *sorted* 1-D tensor."""
    counts = torch.unique_consecutive(x, return_counts=True)[1].to(torch.int64)
    return int((counts * (counts - 1) // 2).sum())


def pairwise_counts(preds: torch.Tensor, target: torch.Tensor) -> tuple[int, int, int]:
    """``(concordant, discordant, pred_ties)`` over pairs whose targets differ.

    Knight's method: sort by ``(target, pred)``; a pair with different targets is discordant iff
    it is an inversion of the sorted preds (pairs within a target group are sorted, never
    inverted); predicted ties among them are all pred ties minus the pairs tied in both.
    """
    p = preds.detach().reshape(-1).to(torch.float64)
    t = target.detach().reshape(-1).to(torch.float64)
    if p.shape != t.shape:
        raise ValueError(f"preds and target must have the same number of elements, got {p.numel()} and {t.numel()}")
    n = p.numel()
    order = p.argsort(stable=True)
    order = order[t[order].argsort(stable=True)]  # lexicographic (target, pred)
    p_sorted, t_sorted = p[order], t[order]
    all_pairs = n * (n - 1) // 2
    target_ties = _tie_pairs(t_sorted)
    pair_keys = torch.stack([t_sorted, p_sorted], dim=1)
    joint = torch.unique_consecutive(pair_keys, dim=0, return_counts=True)[1].to(torch.int64) if n else torch.zeros(0)
    joint_ties = int((joint * (joint - 1) // 2).sum())
    pred_ties = _tie_pairs(p.sort().values) - joint_ties
    discordant = count_inversions(p_sorted)
    concordant = all_pairs - target_ties - discordant - pred_ties
    return concordant, discordant, pred_ties


def pairwise_accuracy(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of pairs with different true values that ``preds`` orders correctly.

    A predicted tie scores **half** a pair: it is what breaking the tie by a coin flip would
    score on average, so a constant predictor sits at chance (0.5) instead of at 0. NaN when no
    pair has different targets.
    """
    c, d, ties = pairwise_counts(preds, target)
    valid = c + d + ties
    return torch.tensor((c + 0.5 * ties) / valid if valid else float("nan"), dtype=torch.float32)


def pairwise_split(preds: torch.Tensor, target: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """Pairwise accuracy on pairs *within* a group and on pairs *across* groups.

    With ``groups`` = the architecture of each sample, ``same_arch`` is the share of pairs of two
    policies of one architecture that are ordered right -- the bit signal alone, which the overall
    number hides under the spread between architectures -- and ``diff_arch`` the rest. Ties and
    NaN as in :func:`pairwise_accuracy`; counted per group, then the across-group counts are the
    overall ones minus those.
    """
    p, t, g = (v.detach().reshape(-1).to(torch.float64) for v in (preds, target, groups))
    if not p.shape == t.shape == g.shape:
        raise ValueError(f"preds, target and groups must have the same number of elements, got {p.numel()}, "
                         f"{t.numel()} and {g.numel()}")
    c_all, d_all, ties_all = pairwise_counts(p, t)
    c_in = d_in = ties_in = 0
    keys, inverse, counts = torch.unique(g, return_inverse=True, return_counts=True)
    for k in torch.nonzero(counts > 1).reshape(-1).tolist():
        members = inverse == k
        c, d, ties = pairwise_counts(p[members], t[members])
        c_in, d_in, ties_in = c_in + c, d_in + d, ties_in + ties

    def share(c: int, d: int, ties: int) -> float:
        return (c + 0.5 * ties) / (c + d + ties) if c + d + ties else math.nan

    return {"pairwise_acc_same_arch": share(c_in, d_in, ties_in),
            "pairwise_acc_diff_arch": share(c_all - c_in, d_all - d_in, ties_all - ties_in),
            "same_arch_pairs": float(c_in + d_in + ties_in)}


def predictor_metrics(preds: torch.Tensor, target: torch.Tensor,
                      groups: torch.Tensor | None = None) -> dict[str, float]:
    """Pairwise accuracy (APQ's), Kendall's τ-b and RMSE of predicted vs. true accuracies, and
    with ``groups`` (each sample's architecture) the :func:`pairwise_split` of the pairwise accuracy.

    NaN where a metric is undefined: the two ranking metrics below two samples, RMSE on none.
    """
    p, t = preds.detach().reshape(-1).float(), target.detach().reshape(-1).float()
    if p.shape != t.shape:
        raise ValueError(f"preds and target must have the same number of elements, got {p.numel()} and {t.numel()}")
    n = p.numel()
    out = {
        "pairwise_acc": float(pairwise_accuracy(p, t)),
        "kendall_tau": float(kendall_rank_corrcoef(p, t, variant="b")) if n > 1 else math.nan,
        "rmse": float(torch.sqrt(torch.mean((p - t) ** 2))) if n else math.nan,
    }
    if groups is not None:
        out.update(pairwise_split(p, t, groups))
    return out


def arch_groups(features: torch.Tensor, fp_dim: int) -> torch.Tensor:
    """One float64 key per row of encoded features: equal for rows of the same architecture
    (the first ``fp_dim`` columns), different otherwise (a fixed random projection; a collision
    needs two different 0/1 rows to project within float64 rounding of each other)."""
    arch = features.detach()[:, :fp_dim].to(torch.float64)
    w = torch.randn(fp_dim, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    return arch @ w.to(arch.device)


class _CatStates(Metric):
    """Every ``(pred, target)`` since the last reset, concatenated across batches and ranks."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:  # noqa: ANN003 (torchmetrics' Metric kwargs)
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        if preds.numel() != target.numel():
            raise ValueError(
                f"preds and target must have the same number of elements, got {preds.numel()} and {target.numel()}"
            )
        self.preds.append(preds.detach().reshape(-1).float())
        self.target.append(target.detach().reshape(-1).float())
        if groups is not None:
            self.groups.append(groups.detach().reshape(-1).to(torch.float64))

    def _cat(self) -> tuple[torch.Tensor, torch.Tensor]:
        return dim_zero_cat(self.preds), dim_zero_cat(self.target)

    def _groups(self) -> torch.Tensor | None:
        """The groups of every sample, when every update gave them (else None)."""
        if not self.groups:
            return None
        g = dim_zero_cat(self.groups)
        return g if g.numel() == dim_zero_cat(self.preds).numel() else None


class PredictorMetrics(_CatStates):
    """:func:`predictor_metrics` as a ``torchmetrics`` metric: ``compute`` returns the dict of
    :data:`PREDICTOR_METRICS` over everything seen (all batches, all ranks)."""

    def compute(self) -> dict[str, float]:
        return predictor_metrics(*self._cat(), groups=self._groups())


class PairwiseAccuracy(_CatStates):
    """APQ's pairwise accuracy as a ``torchmetrics`` metric (see :func:`pairwise_accuracy`).

    Pairs are formed over *everything* seen since the last reset (all batches, all ranks), not
    within batches, which is why the states are lists concatenated across processes.
    """

    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def compute(self) -> torch.Tensor:
        preds, target = self._cat()
        return pairwise_accuracy(preds, target).to(preds.device)
