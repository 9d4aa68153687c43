"""How noisy is an MP label, and what does one cost? Per measurement protocol, in one run.

For ``--pairs`` random (architecture, policy) pairs (the 'spread' sampler), each protocol labels
every pair ``--repeats`` times:

* ``short_qat`` (APQ's): extract, BN re-calibration, KL calibration, ``--qat-steps`` of QAT, BN
  re-estimated; repeats differ by the QAT seed (data order and augmentation);
* ``qfa`` (needs ``--qfa-supernet``, a supernet trained with a quant phase): subnet + policy
  inside the supernet, BN and activation ranges re-estimated on the fixed images; deterministic
  given the images, so its repeats differ only by the evaluation images below;
* ``qfa_out_of_place``: ``qfa`` without in-place quantization of the blocks' private inputs (the
  same labels; what writing in place saves);

and every label is measured on two disjoint halves of the evaluation images. Reported per
protocol: the noise of one label in points, from two parts -- the pooled std of a pair's repeats
(the protocol's own randomness) and the half-vs-half disagreement scaled to all images (what
finite evaluation images cost; partly shared between labels on the same images, so their sum
is an upper bound) -- the spread of labels
across pairs, and the **pairwise-accuracy ceiling** these imply: a perfect predictor scored
against labels with noise σ on true values of spread τ orders a random pair right with
probability 1/2 + arctan(τ/σ)/π. Cost: seconds per label of each protocol and of an FP sample on
the same images (BN re-calibration + evaluation), interleaved, as ratios to the FP sample.

    python benchmarks/label_noise.py --data PATH/cifar10-jpeg.tar.gz --supernet weights/apq_cifar_supernet.pt \\
        --qfa-supernet weights/apq_cifar_qfa_supernet.pt --pairs 8 --repeats 3 --out docs/results/label_noise.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from apq_lightning.collection.measure import measure_qfa  # noqa: E402
from apq_lightning.data import ImageDataModule  # noqa: E402
from apq_lightning.metrics import top1  # noqa: E402
from apq_lightning.modules.collection.qat import ShortQAT, short_qat  # noqa: E402
from apq_lightning.outputs import write_json  # noqa: E402
from apq_lightning.quant import quantize_subnet  # noqa: E402
from apq_lightning.quant.quantizers import LinearQuantizer  # noqa: E402
from apq_lightning.quant.subnet import clone_float  # noqa: E402
from apq_lightning.quant.supernet import is_batch_quantized  # noqa: E402
from apq_lightning.space.policy_sampling import sample_policy  # noqa: E402
from apq_lightning.supernet import recalibrate_bn  # noqa: E402
from apq_lightning.supernet_io import load_supernet  # noqa: E402

CL = torch.channels_last


PROTOCOLS = ("fp", "short_qat", "qfa", "qfa_out_of_place")
"""``qfa_out_of_place``: ``qfa`` with every quantizer writing a new tensor (see :func:`qfa_label`)."""


def pairwise_ceiling(spread: float, noise: float) -> float:
    """P(a perfect predictor orders a random pair like labels with ``noise``), true spread ``spread``."""
    if noise <= 0:
        return 1.0
    true = math.sqrt(max(spread**2 - noise**2, 0.0))
    return 0.5 + math.atan(true / noise) / math.pi


def _cached(loader, max_images: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, seen = [], 0
    for x, y in loader:
        if max_images is not None:
            x, y = x[: max_images - seen], y[: max_images - seen]
        out.append((x.contiguous(memory_format=CL), y))
        seen += len(y)
        if max_images is not None and seen >= max_images:
            break
    return out


def _halves(batches: list, batch_size: int) -> tuple[list, list]:
    """Two disjoint halves of the evaluation images, each in batches of ``batch_size`` (as the
    collections evaluate: one 1,000-image batch would time page faults, not the protocols)."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    mid = len(y) // 2

    def chunks(lo: int, hi: int) -> list:
        return [(x[i:min(i + batch_size, hi)], y[i:min(i + batch_size, hi)]) for i in range(lo, hi, batch_size)]

    return chunks(0, mid), chunks(mid, len(y))


def fp_label(net, subnet, bn, halves) -> tuple[list[float], float]:
    t = time.perf_counter()
    model = net.extract(subnet.with_bits(None)).to(memory_format=CL)
    recalibrate_bn(model, [x for x, _ in bn])
    accs = [top1(model, h) for h in halves]
    return accs, time.perf_counter() - t


def short_qat_label(net, subnet, bn, calib, train_set, qat: ShortQAT, seed: int, halves) -> tuple[list[float], float]:
    t = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = net.extract(subnet).to(memory_format=CL)
        recalibrate_bn(model, [x for x, _ in bn])
        teacher = clone_float(model).eval().requires_grad_(False)
        quantize_subnet(model, subnet, [x for x, _ in calib])
        g = torch.Generator().manual_seed(seed)
        sampler = torch.utils.data.RandomSampler(train_set, num_samples=qat.steps * qat.batch_size, generator=g)
        loader = torch.utils.data.DataLoader(train_set, batch_size=qat.batch_size, sampler=sampler, drop_last=True)
        short_qat(model, teacher, loader, qat)
        recalibrate_bn(model, [x for x, _ in bn])
        accs = [top1(model, h) for h in halves]
    return accs, time.perf_counter() - t


def qfa_label(qnet, subnet, bn, halves, overwrite: bool = True) -> tuple[list[float], float]:
    """``overwrite=False``: every quantizer writes a new tensor (the path before in-place
    quantization of private inputs), to measure what that saves; the labels must not change."""
    private = [m for m in qnet.modules() if isinstance(m, LinearQuantizer) and m.overwrite_input]
    for m in private:
        m.overwrite_input = overwrite
    try:
        t = time.perf_counter()
        accs = [measure_qfa(qnet, subnet, [x for x, _ in bn], halves[0]).acc, top1(qnet, halves[1])]
        return accs, time.perf_counter() - t
    finally:
        for m in private:
            m.overwrite_input = True


def summarize(labels: dict[int, list[list[float]]]) -> dict[str, float]:
    """labels[pair] = repeats x halves accuracies -> noise / spread / ceiling in points."""
    full = {p: [statistics.mean(r) for r in reps] for p, reps in labels.items()}  # each repeat on all images
    repeat_var = [statistics.variance(v) for v in full.values() if len(v) > 1]
    half_diff = [r[0] - r[1] for reps in labels.values() for r in reps]
    noise_repeat = math.sqrt(statistics.mean(repeat_var)) if repeat_var else 0.0
    noise_images = statistics.pstdev(half_diff) / 2 if len(half_diff) > 1 else 0.0  # one label on all images
    # Both parts, as an upper bound: image noise is partly shared by labels on the same images.
    noise = math.sqrt(noise_repeat**2 + noise_images**2)
    means = [statistics.mean(v) for v in full.values()]
    spread = statistics.pstdev(means) if len(means) > 1 else 0.0
    spread_one = math.sqrt(spread**2 + noise**2)  # the spread of single labels
    return {"noise_pts": 100 * noise, "noise_repeats_pts": 100 * noise_repeat, "noise_images_pts": 100 * noise_images,
            "spread_pts": 100 * spread_one, "pairwise_ceiling": pairwise_ceiling(spread_one, noise),
            "pairs": len(labels), "repeats": max(len(v) for v in full.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="cifar10-jpeg.tar.gz (or an ImageFolder tree); 'digits' for tiny")
    ap.add_argument("--supernet", required=True, help="float supernet (FP and short_qat labels)")
    ap.add_argument("--qfa-supernet", default=None, help="quantized-for-all supernet (qfa labels)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--qat-steps", type=int, default=30)
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--eval-batch-size", type=int, default=100, help="as recipes/collect_*.yaml")
    ap.add_argument("--protocols", default="fp,short_qat,qfa",
                    help=f"comma-separated subset of {','.join(PROTOCOLS)} (fp is always measured: the cost unit)")
    ap.add_argument("--bn-batches", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON of the numbers")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    net = load_supernet(args.supernet).to(memory_format=CL)
    qnet = None
    if args.qfa_supernet:
        qnet = load_supernet(args.qfa_supernet).to(memory_format=CL)
        if not is_batch_quantized(qnet):
            ap.error(f"--qfa-supernet {args.qfa_supernet} has no quant phase")
    sp = net.space
    digits = args.data == "digits"
    dm = ImageDataModule("digits" if digits else "cifar10", root=None if digits else args.data,
                         image_size=sp.image_size)
    dm.setup("fit")
    bn = _cached(dm.calib_dataloader(args.bn_batches, 256))
    calib = _cached(dm.calib_dataloader(4, 128))
    halves = _halves(_cached(dm.heldout_dataloader(500), args.eval_images), args.eval_batch_size)
    wanted = {p.strip() for p in args.protocols.split(",") if p.strip()} | {"fp"}
    if not wanted <= set(PROTOCOLS):
        ap.error(f"--protocols {args.protocols!r}: allowed {', '.join(PROTOCOLS)}")
    qat = ShortQAT(steps=args.qat_steps)
    rng = np.random.default_rng(args.seed)
    labels: dict[str, dict[int, list[list[float]]]] = {k: {} for k in PROTOCOLS}
    cost: dict[str, list[float]] = {k: [] for k in PROTOCOLS}
    for p in range(args.pairs):
        arch = sp.sample(rng)
        subnet = arch.with_bits(sample_policy(sp, rng))
        for r in range(args.repeats):  # interleaved, so the machine's load hits every protocol alike
            accs, s = fp_label(net, arch, bn, halves)
            labels["fp"].setdefault(p, []).append(accs)
            cost["fp"].append(s)
            if "short_qat" in wanted:
                accs, s = short_qat_label(net, subnet, bn, calib, dm.train_set, qat, 1000 * p + r, halves)
                labels["short_qat"].setdefault(p, []).append(accs)
                cost["short_qat"].append(s)
            if qnet is not None and "qfa" in wanted:
                accs, s = qfa_label(qnet, subnet, bn, halves)
                labels["qfa"].setdefault(p, []).append(accs)
                cost["qfa"].append(s)
            if qnet is not None and "qfa_out_of_place" in wanted:
                accs, s = qfa_label(qnet, subnet, bn, halves, overwrite=False)
                labels["qfa_out_of_place"].setdefault(p, []).append(accs)
                cost["qfa_out_of_place"].append(s)
        print(f"pair {p + 1}/{args.pairs}: " + ", ".join(
            f"{k} {statistics.mean(statistics.mean(r) for r in v[p]):.4f}" for k, v in labels.items() if p in v),
            flush=True)
    fp_s = statistics.median(cost["fp"])
    out = {"space": sp.name, "supernet": args.supernet, "qfa_supernet": args.qfa_supernet,
           "eval_images": sum(len(b[1]) for h in halves for b in h),
           "eval_batch_size": args.eval_batch_size, "qat_steps": args.qat_steps, "protocols": {}}
    print(f"\n{'protocol':>16} {'noise pts':>9} {'(repeats':>9} {'images)':>8} {'spread pts':>10} "
          f"{'pairwise ceiling':>16} {'s/label':>8} {'x FP':>6}")
    for k in PROTOCOLS:
        if not labels[k]:
            continue
        s = summarize(labels[k])
        s["seconds"] = statistics.median(cost[k])
        s["cost_vs_fp"] = s["seconds"] / fp_s
        out["protocols"][k] = s
        print(f"{k:>16} {s['noise_pts']:9.2f} {s['noise_repeats_pts']:9.2f} {s['noise_images_pts']:8.2f} "
              f"{s['spread_pts']:10.2f} {s['pairwise_ceiling']:16.3f} {s['seconds']:8.2f} {s['cost_vs_fp']:6.2f}")
    if args.out:
        write_json(args.out, out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
