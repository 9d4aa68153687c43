"""Per-activation cost of one fake quantization on the CPU, each way the code can compute it.

The label-level cost (``label_noise.py``) is what the collection goal is about; this benchmark
makes the per-activation numbers behind docs/collection.md §5.1 reproducible. One activation
of each of ``--shapes`` (default: an evaluation batch of 100 CIFAR images with 96 channels at
16×16, 9.8 MB, and at 32×32, 39 MB: above glibc malloc's largest mmap threshold of 32 MB, so a
new output tensor is fresh memory, faulted in page by page), one calibrated range, 4 or 8 bits,
timed five ways at the thread count given (``--threads``):

- ``op``: PyTorch's ``torch.fake_quantize_per_tensor_affine``;
- ``passes``: the fast path's four elementwise torch passes (what several threads use);
- ``passes_inplace``: the same, writing into the input (``overwrite_input``);
- ``loop``: the numba-compiled single loop (what one thread uses for tensors of 4,096+ elements);
- ``loop_inplace``: the same, in place (the loop ways on one thread only: with more, the code
  never takes them).

Calls of the five interleave, in a rotating order, so that machine noise hits all alike;
medians of wall-clock time. Every way's output is checked bit for bit against the op first.
Each in-place call gets a fresh copy of the input, made outside the timed region.

    python benchmarks/fake_quant_speed.py [--threads 1] [--repeats 20] [--out speed.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from apq_lightning.quant import cpu_kernel
from apq_lightning.quant.cpu_kernel import float32_reciprocal

WAYS = ("op", "passes", "passes_inplace", "loop", "loop_inplace")


def _way(name: str, scale: float, qmin: int, qmax: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function computing the fake quantization of its argument the way ``name`` says."""
    inv = float32_reciprocal(scale)
    if name == "op":
        return lambda x: torch.fake_quantize_per_tensor_affine(x, scale, 0, qmin, qmax)
    loop_min = 0 if name.startswith("loop") else 2**62  # the switch cpu_kernel reads

    def run(x: torch.Tensor) -> torch.Tensor:
        saved, cpu_kernel._LOOP_MIN = cpu_kernel._LOOP_MIN, loop_min
        try:
            return cpu_kernel._fq_values(x, scale, inv, qmin, qmax, inplace=name.endswith("inplace"))
        finally:
            cpu_kernel._LOOP_MIN = saved

    return run


def measure(shape: tuple[int, ...], bits: int, threads: int, repeats: int, seed: int = 0) -> dict:
    """Median seconds per call of each way, and each way's time ÷ the op's and ÷ the four passes'."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) * 6.0  # post-ReLU6-like, unsigned
    qmax = 2**bits - 1
    scale = float(torch.tensor(5.5 / qmax, dtype=torch.float32))  # a range a little below the max: some clipping
    names = WAYS if threads == 1 else WAYS[:3]  # the loop runs on one thread only (cpu_kernel._fq_values)
    ways = {name: _way(name, scale, 0, qmax) for name in names}
    ref = ways["op"](x)
    for name, fn in ways.items():  # bit for bit, and warm (numba compiles on first call)
        out = fn(x.clone())
        if not torch.equal(out.view(torch.int32), ref.view(torch.int32)):
            raise AssertionError(f"{name} differs from torch.fake_quantize_per_tensor_affine")
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            inp = x.clone() if name.endswith("inplace") else x
            t = time.perf_counter()
            ways[name](inp)
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "shape": list(shape), "bits": bits, "threads": threads, "repeats": repeats,
        "median_s": med,
        "speedup_vs_op": {n: med["op"] / med[n] for n in names},
        "speedup_vs_passes": {n: med["passes"] / med[n] for n in names},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="100x96x16x16,100x96x32x32", help="activation shapes, e.g. 100x96x16x16,...")
    p.add_argument("--bits", default="4,8", help="bit widths, comma-separated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    shapes = [tuple(int(d) for d in s.split("x")) for s in a.shapes.split(",")]
    results = [measure(shape, int(b), a.threads, a.repeats) for shape in shapes for b in a.bits.split(",")]
    for res in results:
        print(f"\nshape {tuple(res['shape'])}, {res['bits']} bits, {res['threads']} thread(s), median of {a.repeats}:")
        print(f"  {'way':<16}{'ms':>9}{'op ÷ way':>10}{'passes ÷ way':>14}")
        for n in res["median_s"]:
            print(f"  {n:<16}{res['median_s'][n] * 1e3:>9.2f}{res['speedup_vs_op'][n]:>10.2f}"
                  f"{res['speedup_vs_passes'][n]:>14.2f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
