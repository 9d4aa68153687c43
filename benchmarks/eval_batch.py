"""Evaluation batch size vs. seconds per label on CPU (why the collection recipes use 100).

For K random (architecture, 'spread' policy) pairs: the FP label's evaluation (the extracted float
subnet, BN re-calibrated) and the ``qfa`` label's (the subnet and policy inside the
quantized-for-all supernet, ranges re-estimated) on the same N images, at each batch size,
interleaved in one process; prints seconds per batch size and the accuracies, which must not
depend on it (evaluation-mode BN and re-estimated ranges treat every image alone).

Why it matters on CPU: a 500-image batch of 32x32 activations (e.g. 500 x 96 x 32 x 32 floats,
197 MB) is far above glibc malloc's largest mmap threshold (32 MB), so every new activation is
fresh memory faulted in page by page; at 100 images most of that cost is gone.

    python benchmarks/eval_batch.py [--supernet weights/apq_cifar_supernet.pt] \\
        [--qfa-supernet weights/apq_cifar_qfa_supernet.pt] [--pairs 4] [--images 1000] [--sizes 500,100,50]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from apq_lightning.collection.sampling import MPSampling, mp_subnet  # noqa: E402
from apq_lightning.metrics import top1  # noqa: E402
from apq_lightning.quant.supernet import reestimate_supernet  # noqa: E402
from apq_lightning.supernet import recalibrate_bn  # noqa: E402
from apq_lightning.supernet_io import load_supernet  # noqa: E402

CL = torch.channels_last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--supernet", default=str(ROOT / "weights/apq_cifar_supernet.pt"))
    ap.add_argument("--qfa-supernet", default=str(ROOT / "weights/apq_cifar_qfa_supernet.pt"))
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--images", type=int, default=1000, help="random images (timing only: shapes are what matter)")
    ap.add_argument("--sizes", default="500,100,50")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(args.threads)
    fp_net = load_supernet(args.supernet).eval().to(memory_format=CL)
    qfa_net = load_supernet(args.qfa_supernet).eval().to(memory_format=CL)
    space = fp_net.space
    g = torch.Generator().manual_seed(0)
    side = space.image_size
    x = torch.randn(args.images, 3, side, side, generator=g).contiguous(memory_format=CL)
    y = torch.randint(0, fp_net.num_classes, (args.images,), generator=g)
    bn = [torch.randn(256, 3, side, side, generator=g).contiguous(memory_format=CL) for _ in range(2)]
    seconds = {s: [0.0, 0.0] for s in sizes}
    accs: dict[int, list[tuple[float, float]]] = {s: [] for s in sizes}
    for i in range(args.pairs):
        _, sub = mp_subnet(space, 0, i, MPSampling())
        model = fp_net.extract(sub.with_bits(None)).to(memory_format=CL)
        recalibrate_bn(model, bn)
        with torch.inference_mode(False):
            qfa_net.set_active(sub)
            reestimate_supernet(qfa_net, bn)
            for s in sizes:
                batches = [(x[j:j + s], y[j:j + s]) for j in range(0, args.images, s)]
                t0 = time.perf_counter()
                a_fp = top1(model, batches)
                t1 = time.perf_counter()
                a_qfa = top1(qfa_net, batches)
                t2 = time.perf_counter()
                seconds[s][0] += t1 - t0
                seconds[s][1] += t2 - t1
                accs[s].append((a_fp, a_qfa))
    base = sizes[0]
    print(f"{args.pairs} pairs x {args.images} images, {torch.get_num_threads()} thread(s)")
    print(f"{'batch':>6} {'FP s':>7} {'qfa s':>7} {'qfa/FP':>7} {'FP speed-up':>11} {'qfa speed-up':>12}")
    for s in sizes:
        f, q = seconds[s]
        print(f"{s:>6} {f:7.2f} {q:7.2f} {q / f:7.2f} {seconds[base][0] / f:11.2f} {seconds[base][1] / q:12.2f}")
    same = all(accs[s] == accs[base] for s in sizes)
    print(f"accuracies identical at every batch size: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
