"""Measure a latency table on the local device, layer by layer (``lut build``).

Why layer by layer: a table of every distinct layer configuration of a space (a few hundred
for ``apq_cifar``) prices any of its ~10^20 subnets by summation, so the search never times a
network. Each entry times the module the network really runs for that conv --
``ConvBNAct`` (conv, BN, and ReLU6 where the layout has one) from :mod:`apq_lightning.layers`
-- in eval mode, float32, at a fixed batch. ``head`` times the stem + fixed first block,
``tail`` the head conv + pool + classifier, built by the same functions as every network. Keys end in
``-W32A32`` (float); the cost model then ignores bit widths on this table.

The build is resumable: the table is rewritten atomically every ``save_every`` seconds, and a
rerun with the same ``--out`` skips the entries already there (after checking that space,
device, batch and class count match).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from apq_lightning.hardware.geometry import default_num_classes, distinct_block_convs
from apq_lightning.hardware.table import (
    FLOAT_BITS,
    ConvShape,
    Cost,
    CostTable,
    check_build_settings,
    format_key,
    load_table,
)
from apq_lightning.layers import build_classifier, build_first_block, build_head, build_stem, conv_unit
from apq_lightning.layout import BLOCK_CONVS
from apq_lightning.space import SearchSpace, get_space

_MATCH_META = ("space", "device", "batch", "num_classes", "stat")


def device_name(device: torch.device) -> str:
    """A human-readable name of the device, stored in the table's metadata."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_module(module: nn.Module, input_shape: tuple[int, ...], device: str | torch.device = "cpu",
                repeats: int = 20, warmup: int = 5, stat: str = "median") -> float:
    """Wall time of one forward pass in ms: ``stat`` ("median" or "min") of ``repeats`` passes.

    Not the mean: a shared machine produces long outliers. "min" estimates the uncontended
    time (most robust when other jobs share the CPU); "median" the typical one. CUDA is
    synchronised around every pass so the time covers the kernels, not just their launch.
    Denormal floats are flushed to zero while timing: the activations of an untrained or
    randomly extracted network can be denormal, which makes CPU time depend on the weights
    (up to 2x here) rather than on the layer shape that the table is keyed by.
    """
    if stat not in ("median", "min"):
        raise ValueError(f"stat must be 'median' or 'min', got {stat!r}")
    dev = torch.device(device)
    module = module.to(dev).eval()
    x = torch.randn(input_shape, device=dev)
    torch.set_flush_denormal(True)  # denormal activations of an untrained net can double CPU time
    try:
        for _ in range(max(warmup, 0)):
            module(x)
        times = []
        for _ in range(max(repeats, 1)):
            _sync(dev)
            t0 = time.perf_counter()
            module(x)
            _sync(dev)
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_flush_denormal(False)  # torch's default
    return statistics.median(times) if stat == "median" else min(times)


def conv_module(shape: ConvShape, act: bool) -> nn.Module:
    """The network's unit for one conv key (conv + BN (+ ReLU6))."""
    return conv_unit(shape, act)


def head_module(space: SearchSpace) -> nn.Module:
    """Stem + fixed first block, built as every network of the space builds them."""
    return nn.Sequential(build_stem(space), build_first_block(space))


def tail_module(space: SearchSpace, num_classes: int) -> nn.Module:
    """Head conv + global pool + classifier, as every network of the space runs them."""
    return nn.Sequential(
        build_head(space), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), build_classifier(space, num_classes)
    )


Job = tuple[str, Callable[[], nn.Module], tuple[int, ...]]  # (key, module factory, input shape)


def measurement_jobs(space: SearchSpace, batch: int, num_classes: int) -> list[Job]:
    """Every entry of a space's table: head, tail and each distinct elastic conv."""
    jobs: list[Job] = [
        ("head", lambda: head_module(space), (batch, 3, space.image_size, space.image_size)),
        ("tail", lambda: tail_module(space, num_classes),
         (batch, space.stage_channels[-1], space.final_size, space.final_size)),
    ]
    act = {c.role: c.act for c in BLOCK_CONVS}
    for shape, role in distinct_block_convs(space):
        jobs.append((
            format_key(shape, FLOAT_BITS, FLOAT_BITS),
            lambda s=shape, r=role: conv_module(s, act=act[r]),
            (batch, shape.in_channels, shape.input_size, shape.input_size),
        ))
    return jobs


def _resume(out: Path, meta: dict[str, Any]) -> dict[str, Cost]:
    """Entries of an existing partial table at ``out``; ValueError if it was built differently."""
    if not out.exists():
        return {}
    old = load_table(out)
    for k in _MATCH_META:
        if str(old.meta.get(k)) != str(meta[k]):
            raise ValueError(f"{out}: existing table has {k}={old.meta.get(k)!r}, this build has {meta[k]!r}; "
                             f"choose another --out or delete the file")
    done = {format_key(s, w, a): c for (s, w, a), c in old.entries.items()}
    done.update({k: getattr(old, k) for k in ("head", "tail") if getattr(old, k) is not None})
    return done


def _to_table(done: dict[str, Cost], meta: dict[str, Any], name: str) -> CostTable:
    data: dict[str, Any] = {"__meta__": meta}
    data.update({k: {"latency": c.latency} for k, c in done.items()})
    return CostTable.from_dict(data, name)


def build_table(
    space: str | SearchSpace,
    out: str | Path | None = None,
    *,
    device: str = "cpu",
    batch: int = 1,
    repeats: int = 30,
    warmup: int = 5,
    num_classes: int | None = None,
    threads: int | None = None,
    stat: str = "median",
    save_every: float = 30.0,
    progress: bool = True,
) -> CostTable:
    """Time every distinct layer of ``space`` on ``device`` and return (and write) the table."""
    sp = get_space(space)
    check_build_settings(batch=batch, repeats=repeats, warmup=warmup, threads=threads, num_classes=num_classes,
                         stat=stat)
    if out is not None and Path(out).is_dir():
        raise ValueError(f"out {out} is a directory; give a table file path such as {Path(out) / 'lut.json'}")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _build(sp, dev, out, batch, repeats, warmup, num_classes, stat, save_every, progress)
    finally:
        torch.set_num_threads(previous_threads)  # a library call must not change the caller's threads


def _build(sp: SearchSpace, dev: torch.device, out: str | Path | None, batch: int, repeats: int, warmup: int,
           num_classes: int | None, stat: str, save_every: float, progress: bool) -> CostTable:
    n_cls = default_num_classes(sp) if num_classes is None else num_classes
    meta = {"space": sp.name, "device": str(dev), "device_name": device_name(dev), "batch": batch,
            "num_classes": n_cls, "repeats": repeats, "warmup": warmup, "stat": stat,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": "float32", "complete": False}
    out_path = Path(out) if out is not None else None
    done = _resume(out_path, meta) if out_path is not None else {}
    name = str(out_path) if out_path is not None else f"<measured {sp.name} on {dev}>"
    jobs = [j for j in measurement_jobs(sp, batch, n_cls) if j[0] not in done]
    last_save = time.monotonic()
    for key, make, shape in tqdm(jobs, desc=f"lut {sp.name} on {dev}", disable=not progress, unit="layer"):
        done[key] = Cost(time_module(make(), shape, dev, repeats, warmup, stat))
        if out_path is not None and time.monotonic() - last_save > save_every and len(done) > 2:
            _to_table(done, meta, name).save(out_path)
            last_save = time.monotonic()
    meta["complete"] = True
    table = _to_table(done, meta, name)
    if out_path is not None:
        table.save(out_path)
    return table


def time_network(model: nn.Module, image_size: int, device: str = "cpu", batch: int = 1,
                 repeats: int = 20, warmup: int = 5, stat: str = "median") -> float:
    """End-to-end latency of a whole network in ms, timed like the table entries."""
    return time_module(model, (batch, 3, image_size, image_size), device, repeats, warmup, stat)


__all__ = ["build_table", "time_module", "time_network", "measurement_jobs", "head_module", "tail_module",
           "conv_module"]
