"""Cost of quantization-aware training and of calibration for an extracted apq_cifar subnet.

1. QAT step ÷ full-precision step: the same extracted subnet, once float and once quantized
   (``quantize_subnet``, KL-calibrated), a full SGD step each (forward, cross-entropy, backward,
   optimizer step), batch 128, NHWC as in training. A third model, the same quantized subnet
   with ``LinearQuantizer.fast_cpu = False`` (PyTorch's ``fake_quantize_per_tensor_affine`` CPU
   kernel for every tensor, the implementation before the fast path), is timed alongside
   (``--no-op-baseline`` drops it). Steps of the models interleave, in alternating order, so
   that machine noise hits all alike; medians of wall-clock time, and of process CPU time
   (user + system: on a shared, loaded machine it leaves out the time the process waited for a
   core). Goal: QAT / float <= 1.3.
2. Calibration of a whole subnet on 512 images (4 batches of 128, already in memory):
   ``calibrate`` = observing forward passes + KL range search of every layer + weight ranges.
   Goal < 1 s on CPU. Printed beside the plain float forward over the same images.

    python benchmarks/qat_step.py [--subnet largest|random] [--policy uniform8] [--steps 12]

Set OMP_NUM_THREADS to the cores you want to measure with (the thread count is printed).
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from apq_lightning.quant import LinearQuantizer, calibrate, named_policy, quantize_subnet
from apq_lightning.space import get_space
from apq_lightning.supernet import Supernet

CL = torch.channels_last


GOAL = 1.3


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN201
    """One SGD step of ``model``; returns (wall seconds, process CPU seconds)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step() -> tuple[float, float]:
        c, t = _cpu_seconds(), time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t, _cpu_seconds() - c

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="apq_cifar")
    ap.add_argument("--subnet", default="largest", help="largest, smallest or random")
    ap.add_argument("--policy", default="uniform8", help="named policy (uniform4/6/8, w4a8, ...); random = sampled")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per model (after 2 warm-up steps)")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="calibration repeats (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--op-baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the QAT model on PyTorch's fake-quant op (fast_cpu=False)")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    sp = get_space(args.space)
    rng = np.random.default_rng(args.seed)
    arch = {"largest": sp.largest(), "smallest": sp.smallest()}.get(args.subnet) or sp.sample(rng)
    bits = sp.sample(rng, quantized=True).bits if args.policy == "random" else named_policy(sp, args.policy)
    subnet = arch.with_bits(bits)
    net = Supernet(sp, 10)
    size = sp.image_size
    x = torch.randn(args.batch, 3, size, size).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (args.batch,))
    n_cal = max(1, args.calib_images // args.batch)
    calib = [torch.randn(args.batch, 3, size, size).contiguous(memory_format=CL) for _ in range(n_cal)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); space {sp.name}, subnet {args.subnet} "
          f"({len(subnet.active_blocks)} blocks), policy {args.policy}, batch {args.batch}, channels_last")

    # ---- 1. step-time ratio ---------------------------------------------------------------
    fp = net.extract(subnet).to(memory_format=CL)
    q = quantize_subnet(net.extract(subnet).to(memory_format=CL), subnet, calib)
    models = {"float": fp, "QAT": q}
    if args.op_baseline:
        q_op = copy.deepcopy(q)
        for m in q_op.modules():
            if isinstance(m, LinearQuantizer):
                m.fast_cpu = False
        models["QAT, PyTorch's op"] = q_op
    steps = {name: make_step(m, x, y) for name, m in models.items()}
    for _ in range(2):  # warm-up: allocator, oneDNN primitives, cached quantization parameters
        for step in steps.values():
            step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.steps):
        for name in list(steps)[:: 1 if i % 2 == 0 else -1]:
            w, c = steps[name]()
            wall[name].append(w)
            cpu[name].append(c)
    m_wall = {name: statistics.median(t) for name, t in wall.items()}
    m_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    print(f"training step, median of {args.steps} (wall | process CPU):")
    for name in steps:
        print(f"  {name:18s} {m_wall[name] * 1e3:7.1f} ms | {m_cpu[name] * 1e3:7.1f} ms"
              + ("" if name == "float" else f"  -> / float = {m_wall[name] / m_wall['float']:.3f} | "
                 f"{m_cpu[name] / m_cpu['float']:.3f}"))
    print(f"QAT/FP = {m_wall['QAT'] / m_wall['float']:.3f} (goal <= {GOAL}; CPU time "
          f"{m_cpu['QAT'] / m_cpu['float']:.3f})")

    # ---- 2. calibration time -----------------------------------------------------------------
    base = net.extract(subnet).to(memory_format=CL).eval()
    with torch.no_grad():
        base(calib[0])
        t = time.perf_counter()
        for c in calib:
            base(c)
        t_fwd = time.perf_counter() - t
    times = []
    for _ in range(args.repeats):
        model = quantize_subnet(copy.deepcopy(base), subnet, calib[:1])  # swap in quantized layers
        t = time.perf_counter()
        calibrate(model, calib)
        times.append(time.perf_counter() - t)
    t_cal = statistics.median(times)
    print(f"calibration of the whole subnet on {n_cal * args.batch} images, median of {args.repeats}: "
          f"{t_cal:.3f} s (goal < 1 s); float forward over the same images {t_fwd:.3f} s "
          f"-> calibration/forward = {t_cal / t_fwd:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
