"""Predicted accuracy of whole populations of genomes: the fast MLP scorer and plain ones.

A scorer maps ``(N, L)`` genomes to ``(N,)`` predicted accuracies. The search calls it once per
generation with all of that generation's children, each with its own bit policy.

* :class:`~apq_lightning.mlp_scorer.MLPScorer` runs an accuracy predictor of the project's
  attribute contract with pre-summed first-layer rows (defined beside the predictor, which
  scores its own populations with it). Its 400x400 layers run single-threaded in the search
  (:func:`torch_threads`: at batch 100 a second thread only adds synchronisation on a shared
  machine).
* :class:`ModuleScorer` is the naive path (dense encoding + the module's forward), kept for the
  benchmark's ratio and for predictors outside the contract.
* :class:`FunctionScorer` wraps any function of genomes (synthetic objectives, tests, baselines).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from apq_lightning.encoding import get_encoder
from apq_lightning.mlp_scorer import MLPScorer, follows_contract
from apq_lightning.space import SearchSpace, get_space


class Scorer(Protocol):
    """``scorer(genomes, active) -> (N,) float64`` predicted accuracies."""

    quantized: bool

    def __call__(self, genomes: np.ndarray, active: np.ndarray | None = None) -> np.ndarray: ...


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads and restore the caller's setting (a callback inside a
    training process must not leave it changed)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ModuleScorer:
    """Naive path: dense one-hot encoding (``encode_genomes``) and the module's own forward."""

    def __init__(self, module: nn.Module, space: str | SearchSpace | None = None,
                 quantized: bool | None = None) -> None:
        self.module = module
        self.space = get_space(space if space is not None else module.space)
        self.quantized = bool(getattr(module, "quantized", False) if quantized is None else quantized)
        self.encoder = get_encoder(self.space)

    def __call__(self, genomes: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        x = torch.from_numpy(self.encoder.encode_genomes(genomes, quantized=self.quantized))
        with torch.no_grad():
            y = self.module(x)
        return y.reshape(len(x)).double().cpu().numpy()


class FunctionScorer:
    """Any ``f(genomes) -> (N,)`` array as a scorer (synthetic objectives, tests, baselines)."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], quantized: bool = True) -> None:
        self.fn = fn
        self.quantized = quantized

    def __call__(self, genomes: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        return np.asarray(self.fn(genomes), dtype=np.float64)


def as_scorer(predictor: Any, space: str | SearchSpace | None = None) -> Scorer:
    """The fastest scorer for ``predictor``: MLPScorer for contract predictors, ModuleScorer for
    other modules, FunctionScorer for plain callables; scorers pass through."""
    if isinstance(predictor, (MLPScorer, ModuleScorer, FunctionScorer)):
        return predictor
    if isinstance(predictor, nn.Module):
        if follows_contract(predictor):
            return MLPScorer(predictor, space)
        return ModuleScorer(predictor, space)
    if callable(predictor):
        return FunctionScorer(predictor)
    raise ValueError(f"cannot score with {type(predictor).__name__}: expected an AccuracyPredictor, an nn.Module "
                     f"taking encodings, or a function of genomes")
