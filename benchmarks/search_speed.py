"""Search speed and quality (issue 8), measured side by side in one run.

Speed: the paper's setting -- 500 generations x population 100 on ``apq_imagenet``, BitFusion
latency <= 8.4 ms, a 772-input MP predictor (random weights: the speed does not depend on
them) -- for these variants, interleaved round-robin so they share the machine's load:

* ``fast``: the search as shipped (pre-summed first-layer rows + dense hidden layers,
  block cost tables);
* ``predict_genomes``: the predictor's own population path (``AccuracyPredictor.predict_genomes``)
  in place of the search's scorer; it runs ``MLPScorer`` itself since issue 17, so this variant
  now measures rebuilding the scorer's tables at every call (before: ``feature_indices`` +
  ``embedding_bag`` over the raw weight rows, the row in docs/search.md);
* ``dense predictor``: the naive path, dense one-hot encoding and the module's forward;
* ``model costs``: the cost model's own ``evaluate`` in place of the block cost tables.

"same best" says whether a variant's best predicted accuracy equals the fast variant's. The
block tables admit exactly what ``evaluate`` admits, so "model costs" always agrees; a scorer
that sums the same weights in another order (dense) agrees with the fast one to float32
rounding (~1e-7), which can flip a near-tie and send a search elsewhere.

Wall time and CPU time (``process_time``) are reported as medians of ``--repeats``; on a
shared machine the CPU time is the better estimate of the wall time on an idle one. The split
is variation / cost / encoding / prediction / selection (wall).

Quality: best predicted accuracy within the budget for evolution, random search and NSGA-II
at equal predictor calls (population + generations x 100), over ``--seeds`` seeds, with a
random-weight MP predictor (``--scorer predictor``) or a synthetic smooth accuracy model
(``--scorer synthetic``: saturating gains in depth, kernel, width and bits per block).

    python benchmarks/search_speed.py [--repeats 3] [--seeds 5] [--json docs/results/search_speed.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from apq_lightning.hardware import get_cost_model
from apq_lightning.predictor import AccuracyPredictor
from apq_lightning.search import (
    Budget,
    EvolutionConfig,
    FastCost,
    FunctionScorer,
    MLPScorer,
    ModuleScorer,
    ParetoConfig,
    SearchProblem,
    evolution_search,
    pareto_search,
    random_search,
)
from apq_lightning.space import BIT_FIELDS, get_space

SPACE, HARDWARE, BUDGET = "apq_imagenet", "bitfusion", {"latency_ms": 8.4}


def _predictor(seed: int = 0) -> AccuracyPredictor:
    torch.manual_seed(seed)
    return AccuracyPredictor(SPACE, quantized=True, base_acc=0.7).eval()


def synthetic_scorer() -> FunctionScorer:
    """A smooth accuracy-like function of the genome: each active block adds a saturating gain in
    its width, kernel and bits, weighted by its depth in the network; low bits cost more in
    narrow blocks (mixed precision matters)."""
    sp = get_space(SPACE)
    sl = sp.genome_slices()
    bits = np.array(sp.bit_choices, dtype=float)
    kern = np.array(sp.kernel_choices, dtype=float)
    weight = np.linspace(1.0, 0.5, sp.num_blocks)
    width_frac = [np.linspace(0, 1, len(b.width_choices)) for b in sp.blocks]
    wtab = np.zeros((sp.num_blocks, max(len(w) for w in width_frac)))
    for i, w in enumerate(width_frac):
        wtab[i, : len(w)] = w

    def score(g: np.ndarray) -> np.ndarray:
        active = sp.genome_active(g)
        w = wtab[np.arange(sp.num_blocks), g[:, sl["widths"]]]
        k = (kern[g[:, sl["kernels"]]] - 3) / 4
        q = {f: 1 - np.exp(-(bits[g[:, sl[f]]] - 2) / 2) for f in BIT_FIELDS}
        gain = (0.6 * (1 - np.exp(-2 * w)) + 0.25 * k) * q["pw_w"] * q["pw_a"] * (0.5 + 0.5 * q["dw_w"] * q["dw_a"])
        gain = gain - 0.1 * (1 - w) * (q["dw_a"] < 0.9)
        return 0.5 + 0.03 * ((gain + 0.4) * weight * active).sum(axis=1)

    return FunctionScorer(score)


# --------------------------------------------------------------------------------------
# speed
# --------------------------------------------------------------------------------------
def speed(generations: int, repeats: int) -> dict:
    pred = _predictor()
    model = get_cost_model(HARDWARE, SPACE)
    fast_cost, slow_cost = FastCost.of(model), FastCost(model)  # the second calls model.evaluate
    budget = Budget.of(BUDGET)
    variants = {
        "fast": (MLPScorer(pred), fast_cost),
        "predict_genomes": (FunctionScorer(lambda g: pred.predict_genomes(g).numpy()), fast_cost),
        "dense predictor": (ModuleScorer(pred), fast_cost),
        "model costs": (MLPScorer(pred), slow_cost),
    }
    problems = {k: SearchProblem.build(s, c, budget) for k, (s, c) in variants.items()}
    cfg = EvolutionConfig(generations=generations, seed=0)
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, problem in problems.items():
            cpu = time.process_time()
            res = evolution_search(problem, cfg)
            runs[name].append({"wall": res.wall_time_s, "cpu": time.process_time() - cpu, **res.timings,
                               "best": res.best.predicted_acc})
    out = {}
    for name, rs in runs.items():
        out[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        out[name]["best_same_as_fast"] = all(r["best"] == runs["fast"][0]["best"] for r in rs)
    return out


def print_speed(res: dict, generations: int, repeats: int) -> None:
    base = res["fast"]
    print(f"\nspeed: {generations} generations x 100, {SPACE}, {HARDWARE} latency <= {BUDGET['latency_ms']} ms, "
          f"772-input MP predictor; median of {repeats}, torch threads {torch.get_num_threads()}")
    cols = ["variation", "cost", "encoding", "prediction", "selection"]
    print(f"{'variant':<16} {'wall s':>7} {'cpu s':>6} {'x fast':>7} " + " ".join(f"{c:>10}" for c in cols)
          + "  same best")
    for name, r in res.items():
        print(f"{name:<16} {r['wall']:7.3f} {r['cpu']:6.3f} {r['wall'] / base['wall']:7.2f} "
              + " ".join(f"{r[c]:10.3f}" for c in cols) + f"  {r['best_same_as_fast']}")


# --------------------------------------------------------------------------------------
# quality
# --------------------------------------------------------------------------------------
def quality(generations: int, seeds: int, scorer_name: str) -> dict:
    scorer = MLPScorer(_predictor()) if scorer_name == "predictor" else synthetic_scorer()
    problem = SearchProblem.build(scorer, FastCost.of(get_cost_model(HARDWARE, SPACE)), Budget.of(BUDGET))
    cfg = EvolutionConfig(generations=generations)
    rows: dict[str, list[tuple[float, int, float]]] = {"evolution": [], "random": [], "nsga2": []}
    for seed in range(seeds):
        c = EvolutionConfig(generations=generations, seed=seed)
        for name, fn in (("evolution", evolution_search), ("random", random_search)):
            r = fn(problem, c)
            rows[name].append((r.best.predicted_acc, r.scored, r.wall_time_s))
        p = pareto_search(problem, ParetoConfig(generations=generations, population=cfg.population, seed=seed))
        rows["nsga2"].append((p.answers[0].best.predicted_acc, p.scored, p.wall_time_s))
    return {k: {"best": [v[0] for v in vs], "scored": [v[1] for v in vs], "wall": [v[2] for v in vs]}
            for k, vs in rows.items()}


def print_quality(res: dict, generations: int, scorer_name: str) -> None:
    print(f"\nquality: best predicted accuracy within latency <= {BUDGET['latency_ms']} ms, {generations} generations, "
          f"scorer: {scorer_name}")
    print(f"{'method':<10} {'mean':>8} {'std':>8} {'min':>8} {'max':>8} {'scored':>8} {'wall s':>7}  per seed")
    for name, r in res.items():
        b = np.array(r["best"])
        scored = int(np.median(r["scored"]))
        print(f"{name:<10} {b.mean():8.4f} {b.std():8.4f} {b.min():8.4f} {b.max():8.4f} {scored:8d} "
              f"{np.median(r['wall']):7.2f}  " + " ".join(f"{x:.4f}" for x in b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generations", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--quality-generations", type=int, default=500)
    ap.add_argument("--scorer", choices=("predictor", "synthetic"), default="predictor")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out: dict = {"settings": vars(args)}
    if not args.skip_speed:
        out["speed"] = speed(args.generations, args.repeats)
        print_speed(out["speed"], args.generations, args.repeats)
    if not args.skip_quality:
        out["quality"] = quality(args.quality_generations, args.seeds, args.scorer)
        print_quality(out["quality"], args.quality_generations, args.scorer)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
