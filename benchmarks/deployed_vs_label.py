"""Does the cheap MP label predict the deployed accuracy? (issue 15, item 7)

A sample's label is what the MP predictor learns; what a user gets is the accuracy of the subnet
after stage 7's QAT finetune, on the test images. This study measures, for ``--pairs``
(architecture, policy) pairs that span latency and mean bit width, both labels and the deployed
accuracy, and reports how well each label *orders* the deployed accuracies (Spearman ρ with a
bootstrap interval over the pairs) and what a label costs (median seconds per sample).

1. **Pairs.** From the records of ``--pool`` (an MP store, e.g. a ``qfa`` collection), the ones
   BitFusion can run are placed on a grid of latency × mean-bit quantiles and one record is taken
   per cell (then the rest round-robin over the cells), so the pairs span both axes.
2. **Labels.** The same indices are measured under every protocol of ``--protocol`` (a store
   directory under ``OUT/labels/<protocol>``, filled by ``apq predict`` with
   ``--data.init_args.indices``; same seed and sampling as the pool, so the same subnets). The
   pool's own records serve as the labels of its protocol.
3. **Deployed.** Each pair is finetuned by ``apq final``'s pipeline (``--recipe``, default
   ``recipes/finetune_short.yaml``: 300 QAT steps) from the float ``--supernet`` and tested on
   the test split.

Every step is resumable: rerunning the command skips finished collections and finetunes.

    python benchmarks/deployed_vs_label.py --data PATH/cifar10-jpeg.tar.gz \\
        --pool runs/collect_mp_qfa --supernet weights/apq_cifar_supernet.pt \\
        --qfa-supernet weights/apq_cifar_qfa_supernet.pt --protocol short_qat --protocol qfa \\
        --pairs 16 --out runs/deployed_vs_label --report docs/results/cifar10/deployed_vs_label
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from apq_lightning.collection.record import SampleRecord  # noqa: E402
from apq_lightning.collection.store import read_store_dir  # noqa: E402
from apq_lightning.hardware import get_cost_model  # noqa: E402
from apq_lightning.outputs import write_json  # noqa: E402
from apq_lightning.space.policy_sampling import mean_bits  # noqa: E402


# ---- 1. pairs ----------------------------------------------------------------------------------
def describe(records: list[SampleRecord], hardware: str = "bitfusion") -> list[dict[str, Any]]:
    """Latency, mean bits and feasibility of each record's subnet."""
    out, models = [], {}
    for r in records:
        subnet = r.to_subnet()
        if subnet.space not in models:  # one cost model per space, not per record
            models[subnet.space] = get_cost_model(hardware, subnet.space)
        costs = models[subnet.space].costs(subnet)
        out.append({"index": r.index, "kind": r.kind, "latency_ms": costs.get("latency_ms"),
                    "feasible": bool(costs.get("feasible", True)), "mean_bits": mean_bits(subnet.bits,
                                                                                           subnet.active_blocks)})
    return out


def spanning(items: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``n`` items spread over latency × mean bits: one per cell of a quantile grid, then round-robin.

    Deterministic: within a cell the lowest index comes first."""
    items = [it for it in items if it["feasible"] and it["latency_ms"] is not None]
    if len(items) < n:
        raise SystemExit(f"only {len(items)} deployable records in the pool; {n} pairs wanted: collect more")
    k = max(2, math.ceil(math.sqrt(n)))
    lat = np.array([it["latency_ms"] for it in items])
    bits = np.array([it["mean_bits"] for it in items])
    lat_edges = np.quantile(lat, np.linspace(0, 1, k + 1)[1:-1])
    bit_edges = np.quantile(bits, np.linspace(0, 1, k + 1)[1:-1])
    cells: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for it, a, b in zip(items, np.searchsorted(lat_edges, lat, "right"), np.searchsorted(bit_edges, bits, "right")):
        cells.setdefault((int(a), int(b)), []).append(it)
    queues = [sorted(v, key=lambda it: it["index"]) for _, v in sorted(cells.items())]
    chosen: list[dict[str, Any]] = []
    while len(chosen) < n:
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    return sorted(chosen, key=lambda it: it["index"])


def choose_pairs(pool: list[SampleRecord], n: int, pool_size: int | None, saved: Path) -> list[dict[str, Any]]:
    """The pairs of this study: chosen once (:func:`spanning`) and kept in ``saved`` for reruns."""
    if saved.is_file():
        doc = json.loads(saved.read_text())
        if doc["pairs_wanted"] == n and doc["pool_size"] == pool_size:
            return doc["pairs"]
        raise SystemExit(f"{saved} holds {doc['pairs_wanted']} pairs from a pool of {doc['pool_size']}; use another "
                         f"--out for --pairs {n} --pool-size {pool_size}")
    if pool_size is not None:
        have = {r.index for r in pool}
        missing = [i for i in range(pool_size) if i not in have]
        if missing:
            raise SystemExit(f"the pool lacks {len(missing)} of its first {pool_size} indices (e.g. {missing[:5]}): "
                             "collect them first, or lower --pool-size")
        pool = [r for r in pool if r.index < pool_size]
    pairs = spanning(describe(pool), n)
    write_json(saved, {"pairs_wanted": n, "pool_size": pool_size, "pairs": pairs})
    return pairs


# ---- 2. labels ---------------------------------------------------------------------------------
def collect_labels(protocol: str, pool: list[SampleRecord], indices: list[int], out: Path, data: list[str],
                   supernet: str, recipe: str, extra: list[str]) -> Path:
    """Measure ``indices`` under ``protocol`` with the pool's seed and sampling (resumable)."""
    first = pool[0]
    sampling = first.protocol.get("sampling", {})
    args = [sys.executable, "-m", "apq_lightning.cli", "predict", "--config", recipe,
            *data, "--trainer.default_root_dir", str(out),
            "--data.init_args.indices", json.dumps(indices),
            "--model.init_args.supernet_ckpt", supernet, "--model.init_args.protocol", protocol,
            "--model.init_args.seed", str(first.seed),
            "--model.init_args.eval_images", str(first.protocol.get("eval_images", 2000))]
    for key in ("arch_policies_fraction", "policies_per_arch", "policy_sampler"):
        if key in sampling:
            args += [f"--model.init_args.{key}", str(sampling[key])]
    args += extra
    print("collecting:", " ".join(args[2:]), flush=True)
    subprocess.run(args, check=True, cwd=ROOT)
    return out


def labels_of(records: list[SampleRecord], indices: list[int], pool: list[SampleRecord],
              where: str) -> dict[int, SampleRecord]:
    by_index = {r.index: r for r in records}
    missing = [i for i in indices if i not in by_index]
    if missing:
        raise SystemExit(f"{where} lacks indices {missing}")
    pool_keys = {r.index: r.key for r in pool}
    wrong = [i for i in indices if by_index[i].key != pool_keys[i]]
    if wrong:
        raise SystemExit(f"{where}: indices {wrong} are other subnets than the pool's (another seed or sampling)")
    return {i: by_index[i] for i in indices}


# ---- 3. deployed -------------------------------------------------------------------------------
def finetune(record: SampleRecord, supernet: str, recipe: str, out: Path, data: list[str], seed: int) -> dict[str, Any]:
    from apq_lightning.final.pipeline import FinalSettings, FinalTarget, run_final

    target = FinalTarget(subnet=record.subnet, label=f"index{record.index}", source=f"sample {record.index}")
    settings = FinalSettings(supernet=supernet, recipe=recipe, out=out,
                             overrides=(*data, "--seed_everything", str(seed)),
                             onnx=False, table=out.parent / "report")
    return run_final(target, settings, enforce_budget=False)


# ---- analysis ----------------------------------------------------------------------------------
def spearman_ci(x: list[float], y: list[float], reps: int = 2000, seed: int = 0) -> dict[str, float]:
    """Spearman ρ and a percentile bootstrap 95 % interval (pairs resampled with replacement)."""
    from scipy.stats import spearmanr

    x_, y_ = np.asarray(x), np.asarray(y)
    rho = float(spearmanr(x_, y_).statistic)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(reps):
        idx = rng.integers(0, len(x_), len(x_))
        if len(set(x_[idx])) > 1 and len(set(y_[idx])) > 1:
            boots.append(float(spearmanr(x_[idx], y_[idx]).statistic))
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {"rho": rho, "ci_low": float(lo), "ci_high": float(hi), "bootstrap_reps": len(boots)}


def paired_rho_difference(deployed: list[float], a: list[float], b: list[float], reps: int = 2000,
                          seed: int = 0) -> dict[str, float]:
    """ρ(a) − ρ(b) on the same pairs, with a bootstrap interval over the same resamples."""
    from scipy.stats import spearmanr

    d, a_, b_ = np.asarray(deployed), np.asarray(a), np.asarray(b)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(reps):
        idx = rng.integers(0, len(d), len(d))
        if min(len(set(v[idx])) for v in (d, a_, b_)) > 1:
            diffs.append(float(spearmanr(a_[idx], d[idx]).statistic - spearmanr(b_[idx], d[idx]).statistic))
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return {"diff": float(spearmanr(a_, d).statistic - spearmanr(b_, d).statistic), "ci_low": float(lo),
            "ci_high": float(hi)}


def choose(results: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """The protocol that predicts the deployed accuracy better per CPU-second, and why."""
    names = sorted(results, key=lambda p: -results[p]["spearman"]["rho"])
    best, other = names[0], names[-1]
    rb, ro = results[best], results[other]
    if len(names) == 1:
        return best, "the only protocol measured"
    cheaper = min(names, key=lambda p: results[p]["seconds_per_label"])
    overlap = rb["spearman"]["ci_low"] <= ro["spearman"]["rho"]
    if cheaper == best:
        return best, (f"{best} orders the deployed accuracies at least as well (ρ {rb['spearman']['rho']:.2f} vs "
                      f"{ro['spearman']['rho']:.2f}) and costs less ({rb['seconds_per_label']:.1f} vs "
                      f"{ro['seconds_per_label']:.1f} s per label)")
    if overlap:
        return cheaper, (f"ρ {rb['spearman']['rho']:.2f} ({best}) and {results[cheaper]['spearman']['rho']:.2f} "
                         f"({cheaper}) are within the bootstrap interval of each other, and {cheaper} costs "
                         f"{results[cheaper]['seconds_per_label']:.1f} s per label against "
                         f"{rb['seconds_per_label']:.1f}: per CPU-second, {cheaper}")
    return best, (f"{best} orders the deployed accuracies clearly better (ρ {rb['spearman']['rho']:.2f} vs "
                  f"{ro['spearman']['rho']:.2f}, outside the other's interval), worth its "
                  f"{rb['seconds_per_label']:.1f} s per label")


def plot(rows: list[dict[str, Any]], protocols: list[str], results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(protocols), figsize=(4.6 * len(protocols), 4.2), squeeze=False, sharey=True)
    dep = [100 * r["deployed"] for r in rows]
    bits = [r["mean_bits"] for r in rows]
    for ax, p in zip(axes[0], protocols):
        sc = ax.scatter([100 * r["labels"][p] for r in rows], dep, c=bits, cmap="viridis", s=30)
        s = results[p]["spearman"]
        ax.set_title(f"{p}: Spearman {s['rho']:.2f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}]", fontsize=10)
        ax.set_xlabel(f"{p} label, top-1 % (held-out images)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("deployed top-1 % (after finetune, test images)")
    fig.colorbar(sc, ax=axes[0].tolist(), label="mean bits")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def markdown(doc: dict[str, Any]) -> str:
    protocols = doc["protocols"]
    lines = ["# Does the cheap MP label predict the deployed accuracy?\n",
             f"Written by `benchmarks/deployed_vs_label.py` from `{doc['out']}`. {len(doc['rows'])} (architecture, "
             f"policy) pairs of the pool `{doc['pool']}`, spread over BitFusion latency × mean bits; deployed = "
             f"top-1 on the test images after `{doc['recipe']}` (seed {doc['finetune_seed']}) from "
             f"`{doc['supernet']}`.\n",
             "| protocol | Spearman ρ vs deployed | 95 % bootstrap | s per label (median) | seconds from |",
             "|---|---|---|---|---|"]
    for p in protocols:
        r = doc["results"][p]
        s = r["spearman"]
        lines.append(f"| {p} | {s['rho']:.3f} | [{s['ci_low']:.3f}, {s['ci_high']:.3f}] | "
                     f"{r['seconds_per_label']:.1f} | {r['seconds_from']} |")
    if doc.get("difference"):
        d = doc["difference"]
        lines.append(f"\nPaired ρ({d['a']}) − ρ({d['b']}) = {d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
                     " (the same bootstrap resamples).")
    lines.append(f"\n**Default protocol: {doc['choice']}** — {doc['why']}.\n")
    head = "| index | latency ms | mean bits | " + " | ".join(protocols) + " | deployed |"
    lines += [head, "|" + "---|" * (4 + len(protocols))]
    for r in doc["rows"]:
        labels = " | ".join(f"{100 * r['labels'][p]:.1f}" for p in protocols)
        lines.append(f"| {r['index']} | {r['latency_ms']:.3f} | {r['mean_bits']:.2f} | {labels} | "
                     f"{100 * r['deployed']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="cifar10-jpeg.tar.gz or its ImageFolder tree; 'digits' for the "
                    "tiny recipes (no root)")
    ap.add_argument("--pool", required=True, help="MP store directory to draw the pairs from (its protocol is one "
                    "of the compared)")
    ap.add_argument("--supernet", required=True, help="float supernet: short_qat labels and the finetunes")
    ap.add_argument("--qfa-supernet", default=None, help="quantized-for-all supernet: qfa labels")
    ap.add_argument("--protocol", action="append", default=None, help="protocols to compare (repeat); default: "
                    "short_qat and qfa")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--pool-size", type=int, default=None, help="choose among the pool's indices below this only "
                    "(a pool still being collected gives the same pairs on every rerun)")
    ap.add_argument("--recipe", default="recipes/finetune_short.yaml", help="the deployed finetune")
    ap.add_argument("--collect-recipe", default="recipes/collect_mp.yaml")
    ap.add_argument("--collect-args", nargs="*", default=[], help="extra collection options for every protocol "
                    "(e.g. --model.init_args.qat_steps 30)")
    ap.add_argument("--costs", default=None, help="benchmarks/label_noise.py's JSON: seconds per label measured "
                    "interleaved in one run (default: the stores' own timings, comparable only when the stores were "
                    "collected under the same load)")
    ap.add_argument("--finetune-seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="work directory (stores, finetune runs); rerun to resume")
    ap.add_argument("--report", default=None, help="stem of the .md/.json/.png report (default OUT/deployed_vs_label)")
    args = ap.parse_args(argv)
    protocols = args.protocol or ["short_qat", "qfa"]
    out = Path(args.out)
    data = [] if args.data == "digits" else ["--data.init_args.root", str(Path(args.data).resolve())]
    pool = read_store_dir(args.pool)
    if not pool:
        ap.error(f"--pool {args.pool} holds no samples")
    pool_protocol = pool[0].protocol.get("protocol")
    chosen = choose_pairs(pool, args.pairs, args.pool_size, out / "pairs.json")
    indices = [c["index"] for c in chosen]
    print(f"{len(chosen)} pairs: indices {indices}", flush=True)
    labels: dict[str, dict[int, SampleRecord]] = {}
    for p in protocols:
        if p == pool_protocol:
            labels[p] = labels_of(pool, indices, pool, args.pool)
            continue
        supernet = args.qfa_supernet if p == "qfa" else args.supernet
        if supernet is None:
            ap.error(f"protocol {p} needs --qfa-supernet")
        store = collect_labels(p, pool, indices, out / "labels" / p, data, supernet, args.collect_recipe,
                               args.collect_args)
        labels[p] = labels_of(read_store_dir(store), indices, pool, str(store))
    rows = []
    for c in chosen:
        rec = labels[protocols[0]][c["index"]]
        row = finetune(rec, args.supernet, args.recipe, out / "finetune" / f"index{c['index']}", data,
                       args.finetune_seed)
        rows.append({**c, "deployed": row["top1"], "labels": {p: labels[p][c["index"]].acc for p in protocols},
                     "label_seconds": {p: labels[p][c["index"]].timing.get("total_s") for p in protocols}})
        print(f"index {c['index']}: deployed {row['top1']:.4f}, labels " +
              ", ".join(f"{p} {rows[-1]['labels'][p]:.4f}" for p in protocols), flush=True)
    deployed = [r["deployed"] for r in rows]
    measured = json.loads(Path(args.costs).read_text())["protocols"] if args.costs else {}
    results = {p: {"spearman": spearman_ci([r["labels"][p] for r in rows], deployed),
                   "seconds_per_label": measured[p]["seconds"] if p in measured else
                   statistics.median(r["label_seconds"][p] for r in rows),
                   "seconds_from": args.costs if p in measured else "store timings"} for p in protocols}
    choice, why = choose(results)
    doc = {"pool": args.pool, "supernet": args.supernet, "qfa_supernet": args.qfa_supernet, "recipe": args.recipe,
           "finetune_seed": args.finetune_seed, "out": str(out), "protocols": protocols, "rows": rows,
           "results": results, "choice": choice, "why": why}
    if len(protocols) == 2:
        a, b = protocols
        doc["difference"] = {"a": a, "b": b, **paired_rho_difference(
            deployed, [r["labels"][a] for r in rows], [r["labels"][b] for r in rows])}
    stem = Path(args.report) if args.report else out / "deployed_vs_label"
    write_json(stem.with_suffix(".json"), doc)
    stem.with_suffix(".md").write_text(markdown(doc))
    plot(rows, protocols, results, stem.with_suffix(".png"))
    print(markdown(doc))
    print(f"wrote {stem}.json/.md/.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
