"""Vectorised cost evaluation vs the per-subnet loop (docs/design.md §8, issue 4 item 4).

10,000 random ``apq_imagenet`` genomes (with bit policies) through the BitFusion cost model:
``evaluate(genomes)`` (precomputed per-block tables + numpy gathers) beside
``[costs(from_genome(g)) for g in genomes]`` in the same run. Prints both times and the ratio
(goal: vectorised latency + energy + BitOps of 10k candidates <= 50 ms), and checks that both
paths agree.

    python benchmarks/cost_eval.py [--n 10000] [--hardware bitfusion] [--loop-n 2000] [--fit]

``--fit`` adds the report of the regression fitted to the BitFusion table (issue 4 item 6):
held-out error with whole layer shapes held out (GroupKFold), a trivial baseline, and the
Spearman rank agreement of fitted vs exact whole-network latency of 1,000 random subnets
(in-sample fit, and out-of-fold: every layer priced by a fit that never saw its shape).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from apq_lightning.hardware import get_cost_model
from apq_lightning.space import get_space


def _best_of(fn, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)  # the least-disturbed run: other jobs share this machine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default="apq_imagenet")
    p.add_argument("--hardware", default="bitfusion")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--loop-n", type=int, default=None, help="subnets for the loop (default: all n)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit", action="store_true", help="also report the BitFusion fit's errors")
    args = p.parse_args(argv)

    space = get_space(args.space)
    t0 = time.perf_counter()
    model = get_cost_model(args.hardware, space)
    build_s = time.perf_counter() - t0
    genomes = space.sample_genomes(args.seed, args.n)
    model.evaluate(genomes[:10])  # first-touch
    vec_s = _best_of(lambda: model.evaluate(genomes), args.repeats)
    vec = model.evaluate(genomes)

    loop_n = min(args.loop_n or args.n, args.n)
    subnets = [space.from_genome(g) for g in genomes[:loop_n]]
    t0 = time.perf_counter()
    looped = [model.costs(s) for s in subnets]
    loop_s = (time.perf_counter() - t0) * args.n / loop_n  # scaled to n if a subset was looped

    for key in ("latency_ms", "energy_mJ", "bitops", "size_bytes", "feasible"):
        a = np.array([d[key] for d in looped])
        b = vec[key][:loop_n]
        same = np.array_equal(a, b) if a.dtype.kind in "biu" else np.allclose(a, b, rtol=1e-12, equal_nan=True)
        if not same:
            print(f"MISMATCH in {key}", file=sys.stderr)
            return 1

    print(f"{args.n} random {space.name} genomes, hardware {args.hardware} "
          f"(model build {1e3 * build_s:.0f} ms, once)")
    print(f"  vectorised evaluate : {1e3 * vec_s:8.1f} ms  (best of {args.repeats}; goal <= 50 ms)")
    print(f"  per-subnet loop     : {1e3 * loop_s:8.1f} ms  ({loop_n} looped"
          f"{'' if loop_n == args.n else f', scaled to {args.n}'}; from_genome excluded)")
    print(f"  ratio loop / vectorised: {loop_s / vec_s:.0f}x   (both paths agree on every metric)")
    print(f"  feasible: {vec['feasible'].mean():.1%} of random genomes (7x7 depthwise with 4-bit "
          f"activations is infeasible on BitFusion)")
    if args.fit:
        fit_report(args.seed)
    return 0


def fit_report(seed: int) -> None:
    """Held-out and network-level accuracy of the fit of the BitFusion table."""
    from apq_lightning.hardware import BitFusionCost, FittedBitFusionCost, LayerwiseCost, cross_validate
    from apq_lightning.hardware.fit import rank_agreement
    from apq_lightning.hardware.pricing import TablePricer

    t0 = time.perf_counter()
    r = cross_validate(n_splits=5)
    cv_s = time.perf_counter() - t0
    print(f"\nBitFusion fit, GroupKFold(5) over {r.n_shapes} layer shapes ({r.n_entries} entries), {cv_s:.0f} s:")
    for t, goal in (("latency", 0.05), ("energy", 0.08)):
        by_type = r.median_ape_by_type
        print(f"  {t:8s} median APE {100 * r.median_ape[t]:5.2f}% (goal <= {100 * goal:.0f}%)  mean "
              f"{100 * r.mean_ape[t]:5.2f}%  p95 {100 * r.p95_ape[t]:5.2f}%  | pw {100 * by_type['pw'][t]:.2f}%"
              f" dw {100 * by_type['dw'][t]:.2f}%  | baseline c*MACs {100 * r.baseline_median_ape[t]:5.1f}%")
    space = get_space("apq_imagenet")
    genomes = space.sample_genomes(seed + 1, 1000)
    sl = space.genome_slices()  # make every subnet feasible: 7x7 depthwise at A4 -> A6
    k7 = genomes[:, sl["kernels"]] == space.kernel_choices.index(7)
    genomes[:, sl["dw_a"]][k7 & (genomes[:, sl["dw_a"]] == 0)] = 1
    exact = BitFusionCost().evaluate(genomes)
    fitted = FittedBitFusionCost(space).evaluate(genomes)
    oof = LayerwiseCost(space, TablePricer(r.out_of_fold), "oof").evaluate(genomes)
    ok = exact["feasible"]
    for name, res in (("fitted (in-sample)", fitted), ("out-of-fold", oof)):
        rho = rank_agreement(res["latency_ms"][ok], exact["latency_ms"][ok])
        rho_e = rank_agreement(res["energy_mJ"][ok], exact["energy_mJ"][ok])
        ape = np.abs(res["latency_ms"][ok] / exact["latency_ms"][ok] - 1)
        print(f"  1000 random subnets ({ok.sum()} feasible), {name:18s}: Spearman latency {rho:.4f} "
              f"(goal >= 0.98), energy {rho_e:.4f}; network latency median APE {100 * np.median(ape):.2f}%")


if __name__ == "__main__":
    sys.exit(main())
