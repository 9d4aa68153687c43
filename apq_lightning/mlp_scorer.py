"""The accuracy predictor's MLP on integer genomes, without building the one-hot input.

Any module of the predictor's attribute contract (``layers[i][0]`` Linear + ReLU,
``quantize_fc`` for the MP input head, ``regressor``, optionally ``bit_head``) qualifies. Its
first layer on a one-hot vector is a sum of weight rows. Rows are pre-summed per block choice --
``W[kernel] + W[width]`` for the FP head and ``W[pw_w] + W[pw_a] + W[dw_w] + W[dw_a]`` for the
quantization head -- so a genome needs one row per block and head (21 + 21 on ``apq_imagenet``
instead of a 100x772 @ 772x400 product), gathered and summed by ``embedding_bag``. The 400x400
layers stay dense. Numeric bit features (:meth:`~apq_lightning.encoding.Encoder.bit_deficits`,
a linear map ``D`` of the one-hots) fold into the same rows: a ``quantize_fc`` on ``[x_q, D·x_q]``
is ``Wq_onehot + Wq_numeric·D`` on the one-hots, and a linear ``bit_head`` on ``D·x_q`` is one
pre-summed scalar per block choice, added to the output. Outputs equal the module's forward on
``encode_genomes`` to float32 rounding (tested).

One implementation for both users: the search scores every generation with it
(:mod:`apq_lightning.search.scorer`), and ``AccuracyPredictor.predict`` scores populations
with it, so a search's predicted accuracy and the predictor's agree exactly. It sits beside the
predictor, below the search, as the import order of docs/design.md §14.2 asks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from apq_lightning.encoding import get_encoder
from apq_lightning.space import SearchSpace, get_space


def _linear(module: Any, where: str) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise ValueError(f"predictor: {where} must be an nn.Linear, got {type(module).__name__}")
    return module


def follows_contract(predictor: Any) -> bool:
    """Whether ``predictor`` has the attributes :class:`MLPScorer` reads (the project's predictor)."""
    try:
        _linear(predictor.layers[0][0], "layers[0][0]")
        _linear(predictor.regressor, "regressor")
        return all(isinstance(layer[0], nn.Linear) for layer in predictor.layers)
    except (AttributeError, TypeError, IndexError, ValueError):
        return False


class MLPScorer:
    """Gather-and-sum first layer + dense hidden layers on a CPU snapshot of the predictor's
    weights (see the module docstring); ``scorer(genomes) -> (N,)`` float64."""

    def __init__(self, predictor: nn.Module, space: str | SearchSpace | None = None) -> None:
        if not follows_contract(predictor):
            raise ValueError("predictor does not follow the AccuracyPredictor contract (layers[i][0] Linear, "
                             "regressor Linear); use ModuleScorer for other modules")
        sp = get_space(space if space is not None else predictor.space)
        self.space = sp
        self.quantized = bool(getattr(predictor, "quantized", False))
        enc = get_encoder(sp)
        first = _linear(predictor.layers[0][0], "layers[0][0]")
        if first.in_features != enc.fp_dim:
            raise ValueError(f"predictor's first layer takes {first.in_features} inputs, but space {sp.name!r} "
                             f"has {enc.fp_dim} FP features; is it a predictor of another space?")
        with torch.no_grad():
            w1 = first.weight.detach().float().cpu().T  # (fp_dim, H)
            self._fp_rows, self._fp_off = _block_rows(w1, enc.offsets[:2], sp, ("kernels", "widths"))
            self._b1 = first.bias.detach().float().cpu().clone()
            self._q_rows = self._h_rows = None
            if self.quantized:
                self._bit_tables(predictor, enc, sp)
            self._hidden = [(layer[0].weight.detach().float().cpu().T.contiguous(),
                             layer[0].bias.detach().float().cpu().clone()) for layer in list(predictor.layers)[1:]]
            reg = predictor.regressor
            self._wr = reg.weight.detach().float().cpu().T.contiguous()
            self._br = reg.bias.detach().float().cpu().clone()
        sl = sp.genome_slices()
        self._fp_genes = [sl["kernels"], sl["widths"]]
        self._q_genes = [sl[f] for f in ("pw_w", "pw_a", "dw_w", "dw_a")]
        card = sp.gene_cardinality
        self._nw = card[sl["widths"]]
        self._nb = len(sp.bit_choices)
        self.last_rows: tuple[np.ndarray, np.ndarray | None] | None = None  # for inspection in tests
        self._bag_offsets: torch.Tensor | None = None
        self._bag_per = 0

    def rows(self, genomes: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Row indices into the pre-summed tables, (N, B) each; a skipped block gets the zero row."""
        g = genomes
        k, w = g[:, self._fp_genes[0]], g[:, self._fp_genes[1]]
        fp = np.where(active, self._fp_off + k * self._nw + w, len(self._fp_rows) - 1)
        q = None
        if self.quantized:
            nb = self._nb
            a, b, c, d = (g[:, s] for s in self._q_genes)
            q = np.where(active, self._q_off + ((a * nb + b) * nb + c) * nb + d, self._q_zero)
        return fp, q

    def __call__(self, genomes: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        active = self.space.genome_active(genomes) if active is None else active
        fp, q = self.rows(genomes, active)
        self.last_rows = (fp, q)
        return self.forward_rows(fp, q)

    def _offsets(self, n: int, per: int) -> torch.Tensor:
        """Bag offsets of n bags of ``per`` rows (cached: the 2-D call would rebuild them each time)."""
        if self._bag_offsets is None or len(self._bag_offsets) != n or self._bag_per != per:
            self._bag_offsets, self._bag_per = torch.arange(0, n * per, per), per
        return self._bag_offsets

    def forward_rows(self, fp: np.ndarray, q: np.ndarray | None) -> np.ndarray:
        """Scores from :meth:`rows`' indices (the prediction proper)."""
        n, per = fp.shape
        offsets = self._offsets(n, per)
        with torch.no_grad():
            h = F.embedding_bag(torch.from_numpy(fp.reshape(-1)), self._fp_rows, offsets, mode="sum")
            h = torch.relu_(h.add_(self._b1))
            q_idx = torch.from_numpy(q.reshape(-1)) if q is not None else None
            if q_idx is not None and self._q_rows is not None:
                hq = F.embedding_bag(q_idx, self._q_rows, offsets, mode="sum")
                h.add_(hq).add_(self._bq)
            for w, b in self._hidden:
                h = torch.relu_(torch.addmm(b, h, w))
            out = torch.addmm(self._br, h, self._wr)
            if q_idx is not None and self._h_rows is not None:
                out.add_(F.embedding_bag(q_idx, self._h_rows, offsets, mode="sum")).add_(self._bh)
        return out[:, 0].double().numpy()

    def _bit_tables(self, predictor: Any, enc: Any, sp: SearchSpace) -> None:
        """Pre-summed rows of the bit part: ``quantize_fc`` (one-hots, or one-hots + deficits
        folded into one-hot rows) and/or a linear ``bit_head`` on the deficits (one scalar per
        block choice). Both tables share the row indices of :meth:`rows`."""
        parts = ("pw_w", "pw_a", "dw_w", "dw_a")
        deficits = torch.from_numpy(enc.bit_deficits())  # (quant_dim, 4·B)
        q, head = getattr(predictor, "quantize_fc", None), getattr(predictor, "bit_head", None)
        if q is None and head is None:
            raise ValueError("predictor: an MP predictor needs quantize_fc or bit_head")
        tables = []
        if q is not None:
            q = _linear(q, "quantize_fc")
            wq = q.weight.detach().float().cpu().T  # (in, H)
            if q.in_features == enc.quant_dim + deficits.shape[1]:
                wq = wq[: enc.quant_dim] + deficits @ wq[enc.quant_dim:]
            elif q.in_features != enc.quant_dim:
                raise ValueError(f"predictor's quantize_fc takes {q.in_features} inputs, space {sp.name!r} "
                                 f"has {enc.quant_dim} quantization features (+ {deficits.shape[1]} numeric)")
            self._q_rows, self._q_off = _block_rows(wq, enc.offsets[2:] - enc.fp_dim, sp, parts)
            self._bq = q.bias.detach().float().cpu().clone()
            tables.append(self._q_rows)
        if head is not None:
            head = _linear(head, "bit_head")
            if head.in_features != deficits.shape[1] or head.out_features != 1:
                raise ValueError(f"predictor's bit_head maps {head.in_features} -> {head.out_features}, space "
                                 f"{sp.name!r} needs {deficits.shape[1]} -> 1")
            wh = deficits @ head.weight.detach().float().cpu().T  # (quant_dim, 1)
            self._h_rows, self._q_off = _block_rows(wh, enc.offsets[2:] - enc.fp_dim, sp, parts)
            self._bh = head.bias.detach().float().cpu().clone()
            tables.append(self._h_rows)
        self._q_zero = len(tables[0]) - 1


def _block_rows(w: torch.Tensor, offsets: np.ndarray, sp: SearchSpace,
                parts: tuple[str, ...]) -> tuple[torch.Tensor, np.ndarray]:
    """Per block, every joint choice of ``parts`` as one pre-summed row; a zero row last.

    ``w`` is the (features, H) transposed weight; ``offsets[p][b]`` the first feature of part p of
    block b. Row of block b, choices (c0, c1, ...) = off[b] + ravel_multi_index((c0, c1, ...)).
    """
    sl = sp.genome_slices()
    tables, starts, start = [], [], 0
    for b in range(sp.num_blocks):
        sizes = [int(sp.gene_cardinality[sl[p].start + b]) for p in parts]
        grids = np.indices(sizes).reshape(len(parts), -1)
        cols = [offsets[i, b] + grids[i] for i in range(len(parts))]
        rows = sum(w[torch.from_numpy(c)] for c in cols)
        tables.append(rows)
        starts.append(start)
        start += len(rows)
    tables.append(torch.zeros(1, w.shape[1]))
    return torch.cat(tables).contiguous(), np.asarray(starts, dtype=np.int64)
