"""Does a measured latency table predict whole-network latency on this machine?

Builds (or loads) a float latency table of a space on the local device, extracts random
subnets from a (randomly initialised -- weights do not change latency) supernet, times each
end to end exactly like the table entries (same batch, warm-up, median of repeats), and
compares with the table's sum. Reports Spearman rho (goal >= 0.9) and the mean absolute
percentage error, writes a scatter plot (PNG) and the numbers (JSON).

    python benchmarks/lut_validate.py --space apq_cifar --table runs/lut_apq_cifar_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from apq_lightning.hardware import MeasuredCost
from apq_lightning.hardware.measure import build_table, time_network
from apq_lightning.space import get_space


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default="apq_cifar")
    p.add_argument("--device", default="cpu")
    p.add_argument("--table", default=None, help="table to load (built there first if missing)")
    p.add_argument("--subnets", type=int, default=30, help="random subnets to time (>= 20)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = least noise on a shared box)")
    p.add_argument("--stat", choices=("median", "min"), default="min",
                   help="statistic of the repeats (min resists other jobs on a shared machine)")
    p.add_argument("--rounds", type=int, default=3,
                   help="time the subnets round-robin this often and keep each one's best round, so a "
                        "burst of load elsewhere does not hit a run of consecutive subnets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default="docs/results/lut_validation.png")
    p.add_argument("--json", default="docs/results/lut_validation.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from apq_lightning.supernet import Supernet
    except ImportError as err:
        print(f"lut_validate: apq_lightning.supernet is not importable yet ({err}); "
              f"it is needed to extract the subnets that are timed end to end.", file=sys.stderr)
        return 2
    space = get_space(args.space)
    torch.set_num_threads(args.threads)
    table_path = Path(args.table or f"runs/lut_{space.name}_{args.device}_b{args.batch}.json")
    t0 = time.perf_counter()
    try:
        table = build_table(space, table_path, device=args.device, batch=args.batch, repeats=args.repeats,
                            warmup=args.warmup, threads=args.threads, stat=args.stat)
    except ValueError as err:
        print(f"lut_validate: {err}", file=sys.stderr)
        return 2
    print(f"table {table_path}: {len(table)} layers (+ head, tail), {time.perf_counter() - t0:.1f} s to build/load")
    cost = MeasuredCost(table, space)
    torch.manual_seed(args.seed)
    supernet = Supernet(space, cost.num_classes).eval()
    rng = np.random.default_rng(args.seed)
    subnets = [space.sample(rng) for _ in range(args.subnets)]
    models = [supernet.extract(s).eval() for s in subnets]
    rounds = np.full((args.rounds, len(subnets)), np.inf)
    for r in range(args.rounds):
        for i, model in enumerate(models):
            rounds[r, i] = time_network(model, space.image_size, args.device, args.batch, args.repeats,
                                        args.warmup, args.stat)
    meas = rounds.min(axis=0)
    pred = np.array([cost.costs(s)["latency_ms"] for s in subnets])
    for i in range(len(subnets)):
        print(f"  subnet {i:2d}: predicted {pred[i]:7.3f} ms, measured {meas[i]:7.3f} ms")
    rho = float(spearmanr(pred, meas).statistic)
    mape = float(np.mean(np.abs(pred - meas) / meas))
    bias = float(np.median(pred / meas))
    half = len(pred) // 2  # one scale factor fitted on the first half, MAPE on the other half
    scale = float(np.median(meas[:half] / pred[:half]))
    mape_cal = float(np.mean(np.abs(scale * pred[half:] - meas[half:]) / meas[half:]))
    print(f"\n{space.name} on {args.device} (batch {args.batch}, {args.threads} thread(s), {args.stat} of "
          f"{args.repeats} repeats, best of {args.rounds} rounds), {len(subnets)} subnets:")
    print(f"  Spearman rho = {rho:.3f} (goal >= 0.9)   MAPE = {100 * mape:.1f}%   "
          f"median predicted/measured = {bias:.3f}")
    print(f"  with one scale factor ({scale:.3f}, fitted on {half} subnets): MAPE on the other "
          f"{len(pred) - half} = {100 * mape_cal:.1f}%")
    result = {"space": space.name, "device": args.device, "batch": args.batch, "threads": args.threads,
              "stat": args.stat, "rounds": args.rounds, "repeats": args.repeats,
              "subnets": len(subnets), "spearman": rho, "mape": mape, "median_ratio": bias,
              "calibration_scale": scale, "calibrated_mape_held_out": mape_cal,
              "predicted_ms": pred.tolist(), "measured_ms": meas.tolist()}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.png:
        _plot(pred, meas, rho, mape, f"{space.name}, {args.device}, batch {args.batch}", Path(args.png))
        print(f"  plot: {args.png}")
    return 0 if rho >= 0.9 else 1


def _plot(pred: np.ndarray, meas: np.ndarray, rho: float, mape: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(meas, pred, s=14)
    lo, hi = min(pred.min(), meas.min()) * 0.95, max(pred.max(), meas.max()) * 1.05
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
    ax.set_xlabel("measured end-to-end latency (ms)")
    ax.set_ylabel("table prediction (ms)")
    ax.set_title(f"{title}\nSpearman {rho:.3f}, MAPE {100 * mape:.1f}%", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
