"""Training-step cost of the elastic supernet vs. the same subnet as a static model.

For each of N random ``apq_cifar`` subnets: time a training step (forward, backward,
optimizer step; batch 128, NHWC as in training) with the subnet active in the supernet and
on its extracted static model, interleaved, and report the ratio. Goal: median ≤ 1.3.
Then the quantized-for-all step: a random subnet under a random ('spread') policy in the supernet
quantized with batch ranges, over the same subnet's float step (goal: median ≤ 1.3).
Also reports the training throughput of the largest subnet (goal ≥ 250 img/s on 2 cores).

    python benchmarks/supernet_step.py [--subnets 10] [--batch 128] [--repeats 3]
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

from apq_lightning.quant.supernet import quantize_supernet
from apq_lightning.space import get_space
from apq_lightning.space.policy_sampling import mean_bits, sample_policy
from apq_lightning.supernet import Supernet


def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """Median seconds of a full SGD training step."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i:  # the first step warms up allocator / kernels
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def qfa_step_ratios(net: Supernet, sp, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator,
                    args: argparse.Namespace) -> list[float]:
    """Step time of a random subnet under a random policy in the quantized-for-all supernet (batch
    ranges, as the quant phase trains it) over the same subnet's float step in the float supernet."""
    qnet = quantize_supernet(copy.deepcopy(net), ranges="batch").to(memory_format=torch.channels_last)
    print(f"{'subnet':>8} {'mean bits':>9} {'qfa ms':>10} {'float ms':>10} {'ratio':>6}")
    ratios = []
    for j in range(args.subnets):
        subnet = sp.sample(rng).with_bits(sample_policy(sp, rng))
        net.set_active(subnet.with_bits(None))
        qnet.set_active(subnet)
        t_float = step_time(net, x, y, args.repeats)
        t_q = step_time(qnet, x, y, args.repeats)
        ratios.append(t_q / t_float)
        bits = mean_bits(subnet.bits, subnet.active_blocks)
        print(f"{j:>8} {bits:>9.2f} {t_q * 1e3:>10.1f} {t_float * 1e3:>10.1f} {ratios[-1]:>6.2f}")
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="apq_cifar")
    ap.add_argument("--subnets", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    sp = get_space(args.space)
    cl = torch.channels_last
    net = Supernet(sp, 10).to(memory_format=cl)
    x = torch.randn(args.batch, 3, sp.image_size, sp.image_size).contiguous(memory_format=cl)
    y = torch.randint(0, 10, (args.batch,))
    rng = np.random.default_rng(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, space {sp.name}, batch {args.batch}")
    print(f"{'subnet':>8} {'blocks':>6} {'supernet ms':>12} {'static ms':>10} {'ratio':>6}")
    ratios = []
    for j in range(args.subnets):
        subnet = sp.sample(rng)
        net.set_active(subnet)
        static = net.extract(subnet).to(memory_format=cl)
        t_static = step_time(static, x, y, args.repeats)
        t_super = step_time(net, x, y, args.repeats)
        ratios.append(t_super / t_static)
        print(f"{j:>8} {sum(subnet.active_mask):>6} {t_super * 1e3:>12.1f} {t_static * 1e3:>10.1f} {ratios[-1]:>6.2f}")
    print(f"median supernet/static step-time ratio over {len(ratios)} subnets: {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}; goal <= 1.3)")
    qfa_ratios = qfa_step_ratios(net, sp, x, y, rng, args)
    print(f"median quantized-for-all / float supernet step-time ratio over {len(qfa_ratios)} subnets + policies: "
          f"{statistics.median(qfa_ratios):.3f} (min {min(qfa_ratios):.3f}, max {max(qfa_ratios):.3f}; goal <= 1.3)")
    largest = net.extract(sp.largest()).to(memory_format=cl)
    t = step_time(largest, x, y, args.repeats + 2)
    net.set_active(sp.largest())
    t_sup = step_time(net, x, y, args.repeats + 2)
    print(f"largest {sp.name} subnet training throughput: static {args.batch / t:.0f} img/s, "
          f"in the supernet {args.batch / t_sup:.0f} img/s (goal >= 250 img/s)")


if __name__ == "__main__":
    main()
