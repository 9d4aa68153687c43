"""Cost of quantization-aware training and of calibration for an extracted apq_cifar subnet.

1. QAT step ÷ full-precision step: the same extracted subnet, once float and once quantized
   (``quantize_subnet``, KL-calibrated), a full SGD step each (forward, cross-entropy, backward,
   optimizer step), batch 128, NHWC as in training; steps of the two models alternate so that
   machine noise hits both alike; medians. Goal <= 1.6.
2. Calibration of a whole subnet on 512 images (4 batches of 128, already in memory):
   ``calibrate`` = observing forward passes + KL range search of every layer + weight ranges.
   Goal < 1 s on CPU. Printed beside the plain float forward over the same images.

    python benchmarks/qat_step.py [--subnet largest|random] [--policy uniform8] [--steps 8]

Set OMP_NUM_THREADS to the cores you want to measure with (the thread count is printed).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from apq_lightning.quant import calibrate, named_policy, quantize_subnet
from apq_lightning.space import get_space
from apq_lightning.supernet import Supernet

CL = torch.channels_last


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN201
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="apq_cifar")
    ap.add_argument("--subnet", default="largest", help="largest, smallest or random")
    ap.add_argument("--policy", default="uniform8", help="named policy (uniform4/6/8, w4a8, ...); random = sampled")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warm-up steps)")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="calibration repeats (median)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    sp = get_space(args.space)
    rng = np.random.default_rng(args.seed)
    arch = {"largest": sp.largest(), "smallest": sp.smallest()}.get(args.subnet) or sp.sample(rng)
    subnet = arch.with_bits(sp.sample(rng, quantized=True).bits if args.policy == "random" else named_policy(sp, args.policy))
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
    fp_step, q_step = make_step(fp, x, y), make_step(q, x, y)
    for _ in range(2):  # warm-up: allocator, oneDNN primitives
        fp_step(), q_step()
    t_fp, t_q = [], []
    for _ in range(args.steps):
        t_fp.append(fp_step())
        t_q.append(q_step())
    m_fp, m_q = statistics.median(t_fp), statistics.median(t_q)
    print(f"training step, median of {args.steps}: float {m_fp * 1e3:.1f} ms, QAT {m_q * 1e3:.1f} ms "
          f"-> QAT/FP = {m_q / m_fp:.3f} (goal <= 1.6)")

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
