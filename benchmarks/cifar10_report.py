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
import os
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from apq_lightning.collection.reading import read_samples, store_files  # noqa: E402
from apq_lightning.collection.store import merge_stores  # noqa: E402
from apq_lightning.final.results import (  # noqa: E402
    accuracy_vs_latency_plot,
    budget_label,
    budget_name,
    finalist_diagnosis,
    results_rows,
    results_table,
)
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


GOALS = {"largest": 0.85, "smallest": 0.75, "mean of random subnets": 0.80}
"""The issue's goals for the supernet (top-1 on the held-out images)."""


def shipped_supernet_section(curves_path: Path, float_epochs: int, dest: Path) -> str:
    """The supernet the run started from (``make pipeline SUPERNET=...``): its accuracies at the end
    of its float phases from the training's per-epoch curves, the random-subnet mean from the FP
    store (measured on exactly these weights), each next to its goal."""
    lines = ["## 1. Supernet (trained in chunks, shipped as `weights/apq_cifar_supernet.pt`)", ""]
    curves = _json(curves_path)
    if not curves or len(curves) < float_epochs:
        return "\n".join([*lines, MISSING])
    end = curves[float_epochs - 1]
    fp = dest / "samples_fp.jsonl"
    accs = [r.acc for r in read_samples([fp])] if fp.is_file() else []
    measured = {"largest": end.get("val/acc_largest"), "smallest": end.get("val/acc_smallest"),
                "mean of random subnets": statistics.mean(accs) if accs else None}
    lines += [f"Top-1 on the 5,000 held-out training images after BN re-calibration, at the end of the float "
              f"phases (epoch {float_epochs - 1} of `{curves_path.name}`; the random-subnet mean over the "
              f"{len(accs)} FP samples of stage 2, 2,000 held-out images each). How it was trained, phase by "
              "phase: `docs/results/cifar10_study/README.md`.", "",
              "| subnet | top-1 | goal | |", "|---|---|---|---|"]
    for k, goal in GOALS.items():
        v = measured[k]
        lines.append(f"| {k} | {_f(v)} | ≥ {goal:.2f} | {'met' if v is not None and v >= goal else 'not met'} |")
    if accs:
        lines += ["", f"Random subnets: std {statistics.pstdev(accs):.3f}, min {min(accs):.3f}, max {max(accs):.3f}."]
    figure = curves_path.with_suffix(".png")  # the curves' plot, where the study keeps it beside them
    if figure.is_file():
        lines += ["", f"![supernet validation curves]({Path(os.path.relpath(figure, dest.parent)).as_posix()})"]
    return "\n".join(lines)


def supernet_section(runs: Path, dest: Path, curves: Path | None = None, float_epochs: int = 0) -> str:
    summary = _json(runs / "supernet_cifar" / "summary.json")
    lines = ["## 1. Supernet (stage 1)", ""]
    if summary is None and curves is not None:
        return shipped_supernet_section(curves, float_epochs, dest)
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
             "On the validation split of each store (`val_fraction: 0.1` by architecture, at least 8 "
             "architectures, never trained on; the MP predictor also holds out a `test_fraction: 0.1` test split). "
             "Pairwise accuracy overall, on pairs of two policies of one architecture (the bit signal) and on "
             "pairs of two architectures:", "",
             "| predictor | samples | pairwise | same-architecture pairs | different-architecture pairs | "
             "Kendall τ | RMSE |", "|---|---|---|---|---|---|---|"]
    found = False
    for kind, title in (("fp", "FP (full precision)"), ("mp", "MP (transferred from FP)")):
        s = _json(runs / f"predictor_{kind}" / "summary.json")
        if s is None:
            continue
        found = True
        m = s["metrics"]
        same = m.get("val/pairwise_acc_same_arch")
        n_same = int(m.get("val/same_arch_pairs") or 0)
        same_txt = "-" if same is None or not n_same else f"{same:.3f} ({n_same} pairs)"
        lines.append(f"| {title} | {counts.get(kind, '-')} | {_f(m.get('val/pairwise_acc'))} | {same_txt} | "
                     f"{_f(m.get('val/pairwise_acc_diff_arch'))} | {_f(m.get('val/kendall_tau'))} | "
                     f"{_f(m.get('val/rmse'), 4)} |")
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
    protocol = (read_samples([mp])[0].protocol or {}).get("protocol", "short_qat")
    how = ("scored inside the quantized-for-all supernet (protocol `qfa`)" if protocol == "qfa"
           else f"after the short QAT (protocol `{protocol}`)")
    lines += [f"MP samples: top-1 {how} on 2,000 held-out images, mean {statistics.mean(accs):.3f}, "
              f"std {statistics.pstdev(accs):.3f}, min {min(accs):.3f}, max {max(accs):.3f}.", ""]
    shared = [g for g in groups.values() if len(g) >= 5]
    if not shared:
        return "\n".join([*lines, "No architecture has 5 or more policies in the store."])
    spreads = [max(a for _, a in g) - min(a for _, a in g) for g in shared]
    rhos = [_spearman([b for b, _ in g], [a for _, a in g]) for g in shared]
    lines += [f"{len(shared)} architectures have 5 or more bit policies each ({sum(map(len, shared))} samples). "
              f"Across the policies of one architecture, top-1 spans "
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


def run_results(runs: Path) -> tuple[dict | None, bool]:
    """The driver's ``results.json`` (its data, not its Markdown), or -- while the run is still
    going -- the same rows read from the finetunes finished so far; ``(results, partial)``."""
    results = _json(runs / "pipeline_cifar" / "results.json")
    if results is not None:
        return results, False
    rows = results_rows(PRESET.budgets, runs / "pipeline_cifar", PRESET.finetune_seeds)
    if not rows:
        return None, True
    figure = accuracy_vs_latency_plot(rows, runs / "pipeline_cifar" / "accuracy_vs_latency.png")
    return {"rows": rows, "finetune_seeds": list(PRESET.finetune_seeds),
            "accuracy_vs_latency": None if figure is None else str(figure)}, True


def table2_section(runs: Path) -> str:
    results, partial = run_results(runs)
    lines = ["## 4. APQ vs. fixed precision and the sequential pipeline (the shape of the paper's Table 2)", ""]
    if results is None:
        return "\n".join([*lines, MISSING])
    if partial:
        done = sum(len(r["achieved_accs"]) for r in results["rows"])
        lines += [f"**Partial: the run is still going.** These rows are read from the {done} finetunes finished "
                  "so far; a budget or method that is missing has not been reached yet.", ""]
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
        added = sorted({s for r in results["rows"] for s in r.get("seeds", []) if s not in seeds})
        if added:
            lines[-1:-1] = [f"Where a baseline's paired difference to APQ was within two standard errors after these "
                            f"seeds, both were finetuned again with seeds {', '.join(map(str, added))} (`added_seeds` "
                            f"of the preset; n = {len(seeds) + len(added)} in those rows), and Δ pairs every seed "
                            f"both have.", ""]
    lines.append(results_table(results["rows"]))
    if results.get("accuracy_vs_latency"):
        lines += ["", "![accuracy vs latency](cifar10/accuracy_vs_latency.png)"]
    searches = [f"![search {budget_label(b)}](cifar10/search_{budget_name(b)}.png)" for b in PRESET.budgets]
    return "\n".join([*lines, "", *searches])


def diagnosis_section(runs: Path) -> str:
    """Where APQ loses, if it does (:func:`~apq_lightning.final.results.finalist_diagnosis`)."""
    results, _ = run_results(runs)
    lines = ["## 5. Where the margins come from: search or predictor", ""]
    if results is None:
        return "\n".join([*lines, MISSING])
    found = finalist_diagnosis(results["rows"])
    if not found:
        return "\n".join([*lines, "_No budget has APQ and a baseline finetuned yet._", "",
                          finalist_labels_table(runs, results["rows"])])
    lines += ["Per budget, among the finetuned methods within it: the MP predictor's accuracy for each finalist "
              "(with its real bits) next to the achieved top-1 (mean over the seeds). *search*: a baseline's "
              "subnet that the predictor rates above APQ's lay in APQ's space and budget, so the joint search "
              "missed it. *predictor*: the predictor rated APQ's subnet highest and the finetune did not. "
              "*tie*: the best baseline is within two standard errors of APQ (paired over the seeds). "
              "Pairs ordered right: the share of finalist pairs the predictor orders as the finetune does.", "",
              "| budget | APQ predicted / achieved | best baseline | its predicted / achieved | "
              "APQ's rank predicted / achieved | pairs ordered right | reading |",
              "|---|---|---|---|---|---|---|"]
    for d in found:
        lines.append(f"| {d['budget_label']} | {d['apq_predicted']:.3f} / {d['apq_achieved']:.3f} | {d['best']} | "
                     f"{d['best_predicted']:.3f} / {d['best_achieved']:.3f} | {d['apq_rank_predicted']} / "
                     f"{d['apq_rank_achieved']} of {d['finalists']} | {_f(d['pairs_ordered_right'], 2)} | "
                     f"{d['reading']} |")
    return "\n".join([*lines, "", finalist_labels_table(runs, results["rows"])])


def finalist_labels_table(runs: Path, rows: list[dict]) -> str:
    """Predicted accuracy, measured `qfa` label and finetuned top-1 of every finalist, from
    ``benchmarks/finalist_labels.py``'s file when it has been run."""
    doc = _json(runs / "pipeline_cifar" / "finalist_labels.json")
    if doc is None:
        return ("_The finalists' measured labels: run `python benchmarks/finalist_labels.py --run "
                "runs/pipeline_cifar --data DATA --qfa-supernet weights/apq_cifar_qfa_supernet.pt`._")
    achieved = {(r["budget"], r["method"]): r["achieved_acc"] for r in rows}
    lines = [f"Every finalist measured like an MP sample (`qfa`, {doc['eval_images']} held-out images; "
             "`benchmarks/finalist_labels.py`): a prediction far above the label means the search drove the "
             "predictor beyond its samples.", "",
             "| budget | method | predicted | `qfa` label | predicted − label | achieved top-1 |",
             "|---|---|---|---|---|---|"]
    for budget, methods in doc["budgets"].items():
        for method, v in methods.items():
            pred, lab = v.get("predicted"), v["qfa_label"]
            gap = "-" if pred is None else f"{pred - lab:+.3f}"
            lines.append(f"| {budget_label(budget)} | {method} | {_f(pred)} | {lab:.3f} | {gap} | "
                         f"{_f(achieved.get((budget, method)))} |")
    return "\n".join(lines)


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
                  "invocations that finished; a chunk that was killed and resumed is not counted, so a stage "
                  "whose work was done in killed chunks, or in stores copied in, shows only the last chunk's "
                  "minutes):", "",
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
make pipeline DATA=path/to/cifar10-jpeg.tar.gz                       # everything, from stage 1, resumable
make pipeline DATA=path/to/cifar10-jpeg.tar.gz SUPERNET=weights/apq_cifar_supernet.pt \\
    QFA_SUPERNET=weights/apq_cifar_qfa_supernet.pt                    # this run: from stage 2
python benchmarks/cifar10_report.py --runs . --out docs/results \\
    --supernet-curves docs/results/cifar10_study/supernet_curves.json   # this page
```

The stores of `docs/results/cifar10/` are complete, so copying them into `runs/collect_fp_cifar/` and
`runs/collect_mp_cifar/` (as `samples.rank0.jsonl`) makes stages 2 and 4 find nothing left to measure
(`docs/results/cifar10_study/README.md`, "Continuing the study"). Single numbers: predictors
`apq fit --config recipes/predictor_{fp,mp}.yaml`; transfer study `apq transfer-study --fp-stores
docs/results/cifar10/samples_fp.jsonl --mp-stores docs/results/cifar10/samples_mp.jsonl --sizes 25,50,100,all
--seeds 0,1,2 --epochs 150 --out runs/transfer_study`; a search `apq search --predictor
runs/predictor_mp/checkpoints/last.ckpt --hardware bitfusion --constraint latency_ms=0.75`; its final model
`apq final --search r.json --supernet weights/apq_cifar_supernet.pt --recipe recipes/finetune_short.yaml
--data.init_args.root DATA --seed_everything 0`; the baselines `apq baselines --fp-predictor … --mp-predictor …
--constraint latency_ms=0.75 --methods fp-search,sequential --bits 8,6,4 --finetune --finetune-seeds 0,1,2
--float-reference --supernet weights/apq_cifar_supernet.pt --recipe recipes/finetune_short.yaml
--data.init_args.root DATA`."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="the folder `make pipeline` ran in (it holds runs/)")
    ap.add_argument("--out", default="docs/results", help="where cifar10.md and cifar10/ go")
    ap.add_argument("--supernet-curves", default=None,
                    help="per-epoch curves of the shipped supernet's training, for a run that started at stage 2 "
                         "(e.g. docs/results/cifar10_study/supernet_curves.json)")
    ap.add_argument("--float-epochs", type=int, default=35,
                    help="epochs of the float phases in --supernet-curves (the quant phase follows)")
    args = ap.parse_args(argv)
    runs = Path(args.runs) / "runs"
    if not runs.is_dir():
        ap.error(f"--runs {args.runs}: no runs/ folder there (the folder make pipeline ran in)")
    out = Path(args.out)
    dest = out / "cifar10"
    dest.mkdir(parents=True, exist_ok=True)
    counts = copy_stores(runs, dest)
    run_results(runs)  # a partial run's accuracy-vs-latency figure is drawn here, before the plots are copied
    copy_plots(runs, dest)
    notes = dest / "notes.md"
    sections = [
        "# APQ on CIFAR-10 (apq_cifar, BitFusion)",
        "Produced by `benchmarks/cifar10_report.py` from one `make pipeline` run on a 2-core CPU machine; "
        "the sample stores are in `docs/results/cifar10/` "
        f"({', '.join(f'{n} {k.upper()}' for k, n in counts.items()) or 'none yet'}).",
        plan_section(runs),
        supernet_section(runs, dest, Path(args.supernet_curves) if args.supernet_curves else None,
                         args.float_epochs),
        predictor_section(runs, counts),
        bits_section(dest),
        transfer_section(runs),
        table2_section(runs),
        diagnosis_section(runs),
        "## Reading the results\n\n" + (notes.read_text().strip() if notes.is_file() else MISSING),
        REPRODUCE,
    ]
    (out / "cifar10.md").write_text("\n\n".join(sections) + "\n")
    print(f"wrote {out / 'cifar10.md'} and {dest}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
