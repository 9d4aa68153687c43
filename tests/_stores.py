"""Synthetic sample stores for the predictor tests (``test_predictor``, ``test_transfer_study``):
records in the collection's format with a learnable ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from apq_lightning.collection.record import SampleRecord
from apq_lightning.encoding import get_encoder
from apq_lightning.space import get_space


def true_accuracy(space: str, genomes: np.ndarray, quantized: bool) -> np.ndarray:
    """A ground truth a predictor can learn: additive per-choice effects plus a depth × bits
    interaction, in [0, 1]. Float subnets score their architecture only."""
    enc = get_encoder(space)
    w = np.random.default_rng(123).normal(0.0, 0.01, enc.dim)
    x = enc.encode_genomes(genomes, quantized=True)
    if not quantized:
        x[:, enc.fp_dim:] = 0
    active = get_space(space).genome_active(genomes).sum(axis=1)
    bits = x[:, enc.fp_dim:].sum(axis=1) / max(1, enc.quant_dim)
    return np.clip(0.55 + x @ w + 0.002 * active * bits, 0.0, 1.0)


def write_store(path: Path, space: str, kind: str, n: int, seed: int = 0, supernet_hash: str = "abc123",
                genomes: np.ndarray | None = None, start_index: int = 0, noise: float = 0.0) -> np.ndarray:
    """``n`` records in the collection's format; returns their genomes. ``noise``: the std of
    Gaussian label noise added to the ground truth (a short-QAT store's labels)."""
    sp = get_space(space)
    genomes = sp.sample_genomes(seed, n) if genomes is None else genomes
    quantized = kind != "fp"
    accs = true_accuracy(space, genomes, quantized)
    if noise:
        accs = np.clip(accs + np.random.default_rng(seed + 7).normal(0.0, noise, len(accs)), 0.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        for i, (g, a) in enumerate(zip(genomes, accs)):
            rec = SampleRecord.measured(sp.from_genome(g, quantized=quantized), float(a), start_index + i, seed, kind,
                                        supernet_hash, {"bn_batches": 1}, {"total_s": 0.1})
            fh.write(rec.to_json() + "\n")
    return genomes
