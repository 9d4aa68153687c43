"""Integer genomes: a subnet as one choice index per gene, and populations as ``(N, L)`` arrays.

The search, the cost tables, the predictor and the sample stores all work on genomes, because
a Python object per subnet costs more than the work done on it. :func:`to_genomes` is the one
converter from any population form (subnets, subnet JSON dicts of either format, integer
arrays) to genomes, so every caller parses, validates and names bad input the same way.
The gene layout itself (``gene_choices``, ``genome_slices``) belongs to the space.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .bits import BIT_FIELDS, BitPolicy
from .spec import SearchSpace, get_space
from .subnet import Subnet

Population = Subnet | Mapping[str, Any] | Sequence[Subnet | Mapping[str, Any]] | np.ndarray
"""What :func:`to_genomes` takes: one subnet or dict, a sequence of them, or integer genomes."""

_PROJECT_KEYS = frozenset({"space", "depths", "kernels", "widths", "bits"})


def subnet_genome(sp: SearchSpace, subnet: Subnet) -> np.ndarray:
    """Genome of a subnet; skipped blocks get index 0, a float subnet the largest bit index."""
    sp.check(subnet)
    g = np.zeros(sp.genome_length, dtype=np.int64)
    sl = sp.genome_slices()
    g[sl["depths"]] = [c.index(d) for c, d in zip(sp.stage_depth_choices, subnet.depths)]
    active = subnet.active_mask
    for i, blk in enumerate(sp.blocks):
        if not active[i]:
            continue
        g[sl["kernels"]][i] = sp.kernel_choices.index(subnet.kernels[i])
        g[sl["widths"]][i] = blk.width_choices.index(subnet.widths[i])
        for f in BIT_FIELDS:
            value = subnet.bits.get(f)[i] if subnet.bits is not None else sp.bit_choices[-1]
            g[sl[f]][i] = sp.bit_choices.index(value)
    return g


def genome_subnet(sp: SearchSpace, genome: Sequence[int] | np.ndarray, quantized: bool = True) -> Subnet:
    """The subnet of one genome (``quantized=False``: its bit genes are dropped)."""
    g = np.asarray(genome, dtype=np.int64)
    if g.shape != (sp.genome_length,):
        raise ValueError(f"space {sp.name!r}: genome must have {sp.genome_length} genes, got shape {g.shape}")
    if (g < 0).any() or (g >= sp.gene_cardinality).any():
        bad = int(np.flatnonzero((g < 0) | (g >= sp.gene_cardinality))[0])
        raise ValueError(f"space {sp.name!r}: gene {bad} = {g[bad]} outside [0, {sp.gene_cardinality[bad]})")
    vals = [sp.gene_choices[j][int(x)] for j, x in enumerate(g)]
    sl = sp.genome_slices()
    bits = BitPolicy(*[tuple(vals[sl[f]]) for f in BIT_FIELDS]) if quantized else None
    return sp.subnet(vals[sl["depths"]], vals[sl["kernels"]], vals[sl["widths"]], bits)


def check_genomes(space: str | SearchSpace, genomes: np.ndarray) -> np.ndarray:
    """``genomes`` as an ``(N, genome_length)`` int64 array, every gene inside its choices."""
    sp = get_space(space)
    g = np.atleast_2d(np.asarray(genomes))
    if g.ndim != 2 or g.shape[1] != sp.genome_length:
        raise ValueError(
            f"space {sp.name!r}: genomes must have shape (N, {sp.genome_length}), got {np.asarray(genomes).shape}"
        )
    if not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"genomes must be integer arrays, got dtype {g.dtype}")
    if (g < 0).any() or (g >= sp.gene_cardinality).any():
        row, col = map(int, np.argwhere((g < 0) | (g >= sp.gene_cardinality))[0])
        raise ValueError(
            f"space {sp.name!r}: genome {row}, gene {col} = {g[row, col]} outside [0, {sp.gene_cardinality[col]})"
        )
    return g.astype(np.int64, copy=False)


def to_genomes(
    space: str | SearchSpace,
    population: Population,
    where: Sequence[str] | None = None,
    need_bits: bool = False,
    dtype: type[np.integer] = np.int64,
) -> np.ndarray:
    """Validated integer genomes ``(N, genome_length)`` of any population form.

    ``population``: integer genomes (checked by :func:`check_genomes`), or a :class:`Subnet`, a
    subnet JSON dict (project format or APQ spec; no ``space`` key means this space) or a
    sequence of them. A float subnet codes its bits as the largest choice, as
    :meth:`SearchSpace.to_genome` does; ``need_bits`` refuses it instead. Equal to
    ``sp.to_genome(Subnet.from_dict(d))`` for every dict, but the project-format dicts of a batch
    are parsed together (vectorised: one ``Subnet`` at a time costs ~0.3 ms, and a sample store
    holds 80k). A dict the fast path cannot take (another format, ragged lists, non-integers) or
    that fails its checks is parsed by ``Subnet.from_dict``, whose error names block, field,
    value and allowed set; every error starts with the item's label, ``where[i]`` (e.g. a
    file:line) or ``item i``. ``dtype``: of the result (sample stores keep ``int16``).
    """
    sp = get_space(space)
    if isinstance(population, np.ndarray):
        return check_genomes(sp, population).astype(dtype, copy=False)
    items = [population] if isinstance(population, (Subnet, Mapping)) else list(population)
    labels = [f"item {i}" for i in range(len(items))] if where is None else list(where)
    if len(labels) != len(items):
        raise ValueError(f"to_genomes: {len(labels)} labels in 'where' for {len(items)} subnets")
    genomes = np.zeros((len(items), sp.genome_length), dtype=dtype)
    todo = np.ones(len(items), dtype=bool)
    rows = [i for i, item in enumerate(items) if isinstance(item, Mapping)]
    fast = _dict_genomes(sp, [items[i] for i in rows], need_bits) if rows else None
    if fast is not None:
        genomes[rows], todo[rows] = fast
    for i in np.flatnonzero(todo):
        genomes[i] = sp.to_genome(_item_subnet(sp, items[i], labels[i], need_bits))
    return genomes


def _item_subnet(sp: SearchSpace, item: Any, label: str, need_bits: bool) -> Subnet:
    """One population item as a subnet of ``sp``, or an error that starts with its label."""
    if isinstance(item, Mapping):
        own = item.get("space")
        try:
            item = Subnet.from_dict(item, sp.name if own is None else own)
        except ValueError as err:
            raise ValueError(f"{label}: invalid subnet: {err}") from None
    elif not isinstance(item, Subnet):
        raise ValueError(
            f"{label}: a {type(item).__name__} is not a subnet; expected a Subnet or a subnet JSON dict "
            f"(or pass the whole population as an integer genome array)"
        )
    if item.space != sp.name:
        raise ValueError(f"{label}: a subnet of space {item.space!r}, expected space {sp.name!r}")
    if need_bits and item.bits is None:
        raise ValueError(
            f"{label}: a float subnet (no 'bits'), but a bit policy per block is needed: add 'bits' "
            f"(e.g. subnet.with_bits(8))"
        )
    return item


def _dict_genomes(
    sp: SearchSpace, dicts: Sequence[Mapping[str, Any]], need_bits: bool
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(genomes, bad)``: the vectorised half of :func:`to_genomes`; ``None`` when the batch is
    not uniformly shaped integer lists in the project format. ``bad`` marks the rows that the
    slow path must parse (and name): a value outside its choices, another space, missing bits."""
    n = len(dicts)
    try:
        if any(set(d) - _PROJECT_KEYS for d in dicts):
            return None
        depths = np.array([d["depths"] for d in dicts])
        kernels = np.array([d["kernels"] for d in dicts])
        widths = np.array([d["widths"] for d in dicts])
        with_bits = np.array([d.get("bits") is not None for d in dicts], dtype=bool)
        if any(w and set(d["bits"]) != set(BIT_FIELDS) for d, w in zip(dicts, with_bits)):
            return None
        filler = [list(sp.bit_choices[-1:]) * sp.num_blocks] * len(BIT_FIELDS)
        bits = np.array([[d["bits"][f] for f in BIT_FIELDS] if w else filler for d, w in zip(dicts, with_bits)])
    except (KeyError, TypeError, ValueError):
        return None
    arrays = (depths, kernels, widths, bits)
    shapes = ((n, sp.num_stages), (n, sp.num_blocks), (n, sp.num_blocks), (n, len(BIT_FIELDS), sp.num_blocks))
    if any(a.shape != s or a.dtype.kind not in "iu" for a, s in zip(arrays, shapes)):
        return None
    g = np.zeros((n, sp.genome_length), dtype=np.int64)
    bad = np.array([d.get("space") not in (None, sp.name) for d in dicts], dtype=bool)
    if need_bits:
        bad |= ~with_bits
    sl = sp.genome_slices()

    def lookup(values: np.ndarray, choices: Sequence[int], mask: np.ndarray | None = None) -> np.ndarray:
        c = np.asarray(choices)
        idx = np.clip(np.searchsorted(c, values), 0, len(c) - 1)
        wrong = c[idx] != values
        wrong = wrong if mask is None else wrong & mask
        bad[:] |= wrong.reshape(n, -1).any(axis=1)
        return idx if mask is None else np.where(mask, idx, 0)

    for s, choices in enumerate(sp.stage_depth_choices):
        g[:, sl["depths"].start + s] = lookup(depths[:, s], choices)
    active = sp.position_of_block[None, :] < depths[:, sp.stage_of_block]
    g[:, sl["kernels"]] = lookup(kernels, sp.kernel_choices, active)
    for b, blk in enumerate(sp.blocks):
        g[:, sl["widths"].start + b] = lookup(widths[:, b], blk.width_choices, active[:, b])
    for f, name in enumerate(BIT_FIELDS):
        g[:, sl[name]] = lookup(bits[:, f], sp.bit_choices, active)
    return g, bad
