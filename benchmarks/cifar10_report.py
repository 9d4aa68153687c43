"""Write ``docs/results/cifar10.md`` from a ``make pipeline`` run on CIFAR-10 (finished or partial).

    python benchmarks/cifar10_report.py --runs /path/where/make/pipeline/ran --out docs/results

Reads the run's folders (``runs/supernet_cifar``, ``runs/collect_{fp,mp}_cifar``,
``runs/predictor_{fp,mp}``, ``runs/pipeline_cifar``), copies the merged sample stores and the
plots into ``<out>/cifar10/`` and writes the markdown: the plan of the run, supernet accuracy,
FP / MP predictor quality, the transfer study, the APQ-vs-baselines table in the shape of the
paper's Table 2, and the commands that reproduce each number. A section whose inputs do not
exist yet says so instead of inventing numbers; the hand-written reading of the results comes
from ``<out>/cifar10/notes.md`` when it exists.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from apq_lightning.collection.reading import read_samples, store_files  # noqa: E402
from apq_lightning.collection.store import merge_stores  # noqa: E402
from apq_lightning.final.results import budget_label, budget_name, results_table  # noqa: E402
from apq_lightning.stages import PRESETS  # noqa: E402

PRESET = PRESETS["cifar"]
MISSING = "_Not produced yet: the run has not reached this stage._"


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _f(v: object, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def copy_stores(runs: Path, dest: Path) -> dict[str, int]:
    """Merged, deterministic copies of the FP and MP stores; returns the record counts."""
    counts = {}
    for kind in ("fp", "mp"):
        folder = runs / f"collect_{kind}_cifar"
        if any(folder.glob("samples*.jsonl")):
            counts[kind] = merge_stores(store_files(str(folder / "samples*.jsonl")), dest / f"samples_{kind}.jsonl")
    return counts


def copy_plots(runs: Path, dest: Path) -> list[str]:
    pairs = [
        (runs / "supernet_cifar" / "validation_curves.png", "supernet_validation_curves.png"),
        (runs / "predictor_fp" / "scatter_val.png", "predictor_fp_scatter.png"),
        (runs / "predictor_mp" / "scatter_val.png", "predictor_mp_scatter.png"),
        (runs / "pipeline_cifar" / "transfer_study" / "transfer_study.png", "transfer_study.png"),
        *((runs / "pipeline_cifar" / "search" / f"{budget_name(b)}.png", f"search_{budget_name(b)}.png")
          for b in PRESET.budgets),
        (runs / "pipeline_cifar" / "accuracy_vs_latency.png", "accuracy_vs_latency.png"),
    ]
    copied = []
    for src, name in pairs:
        if src.is_file():
            shutil.copy2(src, dest / name)
            copied.append(name)
    return copied


def supernet_section(runs: Path, dest: Path) -> str:
    summary = _json(runs / "supernet_cifar" / "summary.json")
    lines = ["## 1. Supernet (stage 1)", ""]
    if summary is None:
        return "\n".join([*lines, MISSING])
    m = summary["metrics"]
    lines += [f"{summary.get('epochs', '?')} epochs of progressive shrinking (`recipes/supernet_cifar.yaml`). "
              "Top-1 on the 5,000 held-out training images after BN re-calibration, at the end of training:", "",
              "| subnet | top-1 |", "|---|---|"]
    lines += [f"| {k.removeprefix('val/acc_')} | {_f(v)} |" for k, v in sorted(m.items()) if k.startswith("val/acc_")]
    fp = dest / "samples_fp.jsonl"
    if fp.is_file():
        accs = [r.acc for r in read_samples([fp])]
        lines += ["", f"Random subnets (the {len(accs)} FP samples of stage 2, 2,000 held-out images each): "
                  f"mean {statistics.mean(accs):.3f}, std {statistics.pstdev(accs):.3f}, "
                  f"min {min(accs):.3f}, max {max(accs):.3f}."]
    lines += ["", "![supernet validation curves](cifar10/supernet_validation_curves.png)"]
    return "\n".join(lines)


def predictor_section(runs: Path, counts: dict[str, int]) -> str:
    lines = ["## 2. Accuracy predictors (stages 3 and 5)", "",
             "On the validation split of each store (`val_fraction: 0.1` of the architectures, never trained on: "
             "about 80 FP and 12 MP samples, so the MP numbers rest on a few dozen pairs; section 3 scores MP "
             "predictors on a larger fixed test split):", "",
             "| predictor | samples | pairwise accuracy | Kendall τ | RMSE |", "|---|---|---|---|---|"]
    found = False
    for kind, title in (("fp", "FP (full precision)"), ("mp", "MP (transferred from FP)")):
        s = _json(runs / f"predictor_{kind}" / "summary.json")
        if s is None:
            continue
        found = True
        m = s["metrics"]
        lines.append(f"| {title} | {counts.get(kind, '-')} | {_f(m.get('val/pairwise_acc'))} | "
                     f"{_f(m.get('val/kendall_tau'))} | {_f(m.get('val/rmse'), 4)} |")
    if not found:
        return "\n".join(lines[:2] + [MISSING])
    lines += ["", "| FP predictor | MP predictor |", "|---|---|",
              "| ![FP scatter](cifar10/predictor_fp_scatter.png) | ![MP scatter](cifar10/predictor_mp_scatter.png) |"]
    return "\n".join(lines)


def _mean_bits(subnet: dict) -> float:
    """Mean bit width over the active tensors of a policy (skipped blocks hold 0)."""
    vals = [b for row in (subnet.get("bits") or {}).values() for b in row if b]
    return sum(vals) / len(vals) if vals else float("nan")


def bits_section(dest: Path) -> str:
    """How much the bit policy alone moves accuracy: MP samples that share an architecture."""
    mp = dest / "samples_mp.jsonl"
    lines = ["### What the bits alone do (MP samples that share an architecture)", ""]
    if not mp.is_file():
        return "\n".join([*lines, MISSING])
    groups: dict[str, list[tuple[float, float]]] = {}
    for r in read_samples([mp]):
        arch = json.dumps({k: v for k, v in r.subnet.items() if k != "bits"}, sort_keys=True)
        groups.setdefault(arch, []).append((_mean_bits(r.subnet), r.acc))
    accs = [a for g in groups.values() for _, a in g]
    lines += [f"MP samples: top-1 after 30 QAT steps on 2,000 held-out images, mean {statistics.mean(accs):.3f}, "
              f"std {statistics.pstdev(accs):.3f}, min {min(accs):.3f}, max {max(accs):.3f}.", ""]
    shared = [g for g in groups.values() if len(g) >= 5]
    if not shared:
        return "\n".join([*lines, "No architecture has 5 or more policies in the store."])
    spreads = [max(a for _, a in g) - min(a for _, a in g) for g in shared]
    rhos = [_spearman([b for b, _ in g], [a for _, a in g]) for g in shared]
    lines += [f"{len(shared)} architectures have 5 or more bit policies each ({sum(map(len, shared))} samples). "
              f"Across the policies of one architecture, top-1 (after the 30-step QAT) spans "
              f"{statistics.mean(spreads):.3f} on average (min {min(spreads):.3f}, max {max(spreads):.3f}); "
              f"the Spearman correlation of top-1 with the policy's mean bit width is "
              f"{statistics.mean(rhos):+.2f} on average (per architecture: "
              f"{', '.join(f'{r:+.2f}' for r in rhos)}). This is the signal the MP predictor must "
              "learn beyond the FP one."]
    return "\n".join(lines)


def _spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def transfer_section(runs: Path) -> str:
    md = runs / "pipeline_cifar" / "transfer_study" / "transfer_study.md"
    lines = ["## 3. Predictor transfer (APQ Fig. 7): transfer vs. scratch, MSE vs. ranking loss", ""]
    if not md.is_file():
        return "\n".join([*lines, MISSING])
    body = [ln for ln in md.read_text().splitlines() if not ln.startswith("# ")]
    return "\n".join([*lines, *body, "", "![transfer study](cifar10/transfer_study.png)"])


def table2_section(runs: Path) -> str:
    results = _json(runs / "pipeline_cifar" / "results.json")  # the driver's data, not its Markdown
    lines = ["## 4. APQ vs. fixed precision and the sequential pipeline (the shape of the paper's Table 2)", ""]
    if results is None:
        return "\n".join([*lines, MISSING])
    lines += ["Top-1 on the 10,000 CIFAR-10 test images after the same 300-step QAT finetune "
              "(`recipes/finetune_short.yaml`) for every method; latency and energy from the fitted BitFusion "
              "model; search s: wall time of the search on the predictors (2 CPU cores). `largest` and `random` "
              "are compared on predicted accuracy only.", ""]
    seeds = results.get("finetune_seeds") or []
    if seeds:
        lines += [f"Every finetuned method ran with seeds {', '.join(map(str, seeds))} (mean ± std, n); "
                  "Δ vs APQ is the paired difference (seed k of the method minus seed k of APQ, the same test "
                  "images) with its standard error over the seeds: a margin is a result only when it is larger "
                  "than about two standard errors. float top-1: the same subnet finetuned unquantized.", ""]
    lines.append(results_table(results["rows"]))
    if results.get("accuracy_vs_latency"):
        lines += ["", "![accuracy vs latency](cifar10/accuracy_vs_latency.png)"]
    searches = [f"![search {budget_label(b)}](cifar10/search_{budget_name(b)}.png)" for b in PRESET.budgets]
    return "\n".join([*lines, "", *searches])


def plan_section(runs: Path) -> str:
    times = _json(runs / "pipeline_cifar" / "stage_times.json") or {}
    over = " ".join(" ".join(v) for v in PRESET.overrides.values())
    lines = ["## The run", "",
             f"`make pipeline` (preset `cifar`): budgets {', '.join(budget_label(b) for b in PRESET.budgets)} on "
             f"BitFusion, {PRESET.fp_samples} FP samples, {PRESET.mp_samples} MP samples, "
             f"{PRESET.generations} generations × 100, fixed-precision baselines at {PRESET.baseline_bits} bits; "
             f"recipe overrides `{over}`.", ""]
    sup = runs / "supernet_cifar"
    first, end = sorted(sup.glob("csv/version_*/hparams.yaml")), sup / "summary.json"
    if "1 supernet" not in times and first and end.is_file():  # trained outside the driver (make supernet)
        times = {"1 supernet (from its files' times)": end.stat().st_mtime - first[0].stat().st_mtime, **times}
    if times:
        lines += ["Wall time per stage on the 2-core CPU machine, as the driver logged it (added up over the "
                  "invocations that finished; a chunk that was killed and resumed is not counted):", "",
                  "| stage | minutes |", "|---|---|", *(f"| {k} | {v / 60:.1f} |" for k, v in times.items())]
    per_sample = []
    for kind in ("fp", "mp"):
        path = Path(str(runs / f"collect_{kind}_cifar"))
        files = sorted(path.glob("samples*.jsonl"))
        if files:
            recs = read_samples(files)
            total = sum(float((r.timing or {}).get("total_s", 0.0)) for r in recs)
            per_sample.append(f"{kind.upper()} {len(recs)} samples, {total / 60:.1f} min of measuring in all "
                              f"({total / max(len(recs), 1):.1f} s each)")
    if per_sample:
        lines += ["", "Collection cost from the stores' own per-sample timings (every chunk included): "
                  + "; ".join(per_sample) + "."]
    return "\n".join(lines)


REPRODUCE = """## Reproduce

```bash
make pipeline DATA=path/to/cifar10-jpeg.tar.gz                                   # everything, resumable
make pipeline DATA=path/to/cifar10-jpeg.tar.gz SUPERNET=weights/apq_cifar_supernet.pt   # from stage 2
python benchmarks/cifar10_report.py --runs . --out docs/results                  # this page
```

Single numbers: supernet `apq fit --config recipes/supernet_cifar.yaml --data.init_args.root DATA --ckpt_path last`;
predictors `apq fit --config recipes/predictor_{fp,mp}.yaml` (on the stores in `docs/results/cifar10/`, pass
`--data.init_args.stores '[docs/results/cifar10/samples_fp.jsonl]'`); transfer study
`apq transfer-study --fp-stores docs/results/cifar10/samples_fp.jsonl --mp-stores docs/results/cifar10/samples_mp.jsonl
--sizes 25,50,100,all --seeds 0,1,2 --epochs 150 --out runs/transfer_study`; a search
`apq search --predictor runs/predictor_mp/checkpoints/last.ckpt --hardware bitfusion --constraint latency_ms=0.45`;
its final model `apq final --search r.json --supernet weights/apq_cifar_supernet.pt --recipe recipes/finetune_short.yaml
--data.init_args.root DATA`; the baselines `apq baselines --fp-predictor … --mp-predictor … --constraint latency_ms=0.45
--methods fp-search,sequential --bits 8,6,4 --finetune --supernet weights/apq_cifar_supernet.pt
--recipe recipes/finetune_short.yaml --data.init_args.root DATA`."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="the folder `make pipeline` ran in (it holds runs/)")
    ap.add_argument("--out", default="docs/results", help="where cifar10.md and cifar10/ go")
    args = ap.parse_args(argv)
    runs = Path(args.runs) / "runs"
    if not runs.is_dir():
        ap.error(f"--runs {args.runs}: no runs/ folder there (the folder make pipeline ran in)")
    out = Path(args.out)
    dest = out / "cifar10"
    dest.mkdir(parents=True, exist_ok=True)
    counts = copy_stores(runs, dest)
    copy_plots(runs, dest)
    notes = dest / "notes.md"
    sections = [
        "# APQ on CIFAR-10 (apq_cifar, BitFusion)",
        "Produced by `benchmarks/cifar10_report.py` from one `make pipeline` run on a 2-core CPU machine; "
        "the sample stores are in `docs/results/cifar10/` "
        f"({', '.join(f'{n} {k.upper()}' for k, n in counts.items()) or 'none yet'}).",
        plan_section(runs),
        supernet_section(runs, dest),
        predictor_section(runs, counts),
        bits_section(dest),
        transfer_section(runs),
        table2_section(runs),
        "## Reading the results\n\n" + (notes.read_text().strip() if notes.is_file() else MISSING),
        REPRODUCE,
    ]
    (out / "cifar10.md").write_text("\n\n".join(sections) + "\n")
    print(f"wrote {out / 'cifar10.md'} and {dest}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
