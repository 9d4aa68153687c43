"""Measuring one subnet's accuracy cheaply (stage 2), and the image batches it needs.

Every FP sample costs a BatchNorm re-calibration (a few training batches in train mode) plus
one evaluation pass over the held-out images; nothing else may cost much, since thousands of
samples are collected. Hence:

* the images are decoded, transformed and moved to the device **once** (:func:`cache_batches`)
  and reused by every sample: a per-image transform pipeline would cost about as much as the
  forward pass of a small subnet;
* the subnet runs either **inside the supernet** (``mode="inplace"``: ``set_active`` +
  re-calibrating the supernet's own BN buffers, no copy) or as an **extracted** static model
  (``mode="extract"``); both give the same accuracy, and ``benchmarks/collection_cost.py`` measures
  which is faster.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from apq_lightning.metrics import top1
from apq_lightning.quant.supernet import reestimate_supernet
from apq_lightning.space import Subnet
from apq_lightning.supernet import Supernet, recalibrate_bn

__all__ = ["FPMode", "FP_MODES", "cache_batches", "measure_fp", "measure_qfa"]

FPMode = Literal["inplace", "extract"]
FP_MODES: tuple[str, ...] = ("inplace", "extract")


def cache_batches(
    loader: Iterable[Any],
    max_images: int | None = None,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(images, labels)`` batches of ``loader``, at most ``max_images`` images, on ``device``.

    Created outside inference mode, so the same tensors can feed QAT's autograd later.
    """
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen = 0
    with torch.inference_mode(False), torch.no_grad():
        for batch in loader:
            x, y = batch[0], batch[1]
            if max_images is not None:
                x, y = x[: max_images - seen], y[: max_images - seen]
            x = x.to(device).clone()
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append((x, y.to(device).clone()))
            seen += len(y)
            if max_images is not None and seen >= max_images:
                break
    if not out:
        raise ValueError("no images: the data loader is empty")
    return out


@dataclass
class FPResult:
    """One measured accuracy and where its seconds went (FP and ``qfa`` samples alike)."""

    acc: float
    bn_s: float
    eval_s: float
    total_s: float


def measure_fp(
    supernet: Supernet,
    subnet: Subnet,
    bn_images: Sequence[torch.Tensor],
    eval_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    mode: FPMode = "extract",
    channels_last: bool = True,
) -> FPResult:
    """Accuracy of a float subnet after BatchNorm re-calibration on ``bn_images``.

    ``inplace`` overwrites the supernet's BN statistics (every sample re-estimates them from
    scratch, so nothing carries over between samples) and leaves ``subnet`` active.
    """
    if mode not in FP_MODES:
        raise ValueError(f"mode={mode!r} is not allowed; allowed: {list(FP_MODES)}")
    if subnet.bits is not None:
        raise ValueError("measure_fp takes a float subnet (no bits); quantized subnets are measured by stage 4")
    t0 = time.perf_counter()
    if mode == "inplace":
        supernet.set_active(subnet)
        model: nn.Module = supernet
    else:
        model = supernet.extract(subnet)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    t1 = time.perf_counter()
    recalibrate_bn(model, bn_images)
    t2 = time.perf_counter()
    acc = top1(model, eval_batches)
    t3 = time.perf_counter()
    return FPResult(acc=acc, bn_s=t2 - t1, eval_s=t3 - t2, total_s=t3 - t0)


def measure_qfa(
    supernet: Supernet,
    subnet: Subnet,
    bn_images: Iterable[torch.Tensor],
    eval_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> FPResult:
    """Accuracy of ``subnet`` with its bits inside a quantized-for-all supernet: activated, its
    BatchNorm statistics and activation ranges re-estimated on ``bn_images``, evaluated (stage 4's
    ``qfa`` protocol). Leaves ``subnet`` active."""
    t0 = time.perf_counter()
    supernet.set_active(subnet)
    reestimate_supernet(supernet, bn_images)
    t1 = time.perf_counter()
    acc = top1(supernet, eval_batches)
    t2 = time.perf_counter()
    return FPResult(acc=acc, bn_s=t1 - t0, eval_s=t2 - t1, total_s=t2 - t0)
