"""Does a longer finetune change who wins? APQ's subnet and a baseline's, finetuned longer.

Why: the study compares every method after the same 300-step QAT finetune. A subnet that
gains more from longer training (a larger network at fewer bits, say) could lose at 300 steps
and win at deployment length, so a margin at 300 steps may be the finetune's, not the
search's. This finetunes APQ's winner and each named baseline's subnet of one budget of a
``make pipeline`` run with ``--steps`` steps (the recipe's cosine schedule stretched to it),
with the seeds given, through ``apq final`` (resumable: a finished run is not repeated), and
prints top-1 per method and length beside the run's own 300-step numbers, with the paired
difference to APQ (seed k minus seed k, the same test images) and its standard error.

    python benchmarks/finetune_length.py --run runs/pipeline_cifar --budget latency_ms=0.5 \\
        --methods fp-search@4bit --steps 1200 --seeds 0,1 --data PATH/cifar10-jpeg.tar.gz \\
        --supernet weights/apq_cifar_supernet.pt [--out runs/finetune_length]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from apq_lightning.final.results import APQ, paired_difference, results_rows  # noqa: E402
from apq_lightning.outputs import write_json  # noqa: E402
from apq_lightning.stages import PRESETS  # noqa: E402


def sources(run: Path, budget: str, methods: list[str]) -> dict[str, tuple[str, str]]:
    """``{method: ("--search" | "--subnet", path)}``: APQ's search result, each baseline's subnet file."""
    out = {APQ: ("--search", str(run / "search" / f"{budget}.json"))}
    doc = run / "baselines" / budget / "baselines.json"
    rows = {r["method"]: r for r in json.loads(doc.read_text())["rows"]} if doc.is_file() else {}
    for m in methods:
        r = rows.get(m)
        if r is None or not r.get("final_run"):
            raise SystemExit(f"--methods {m}: no finetuned baseline of that name in {doc} "
                             f"(there: {', '.join(sorted(rows)) or 'none'})")
        out[m] = ("--subnet", str(run / "baselines" / budget / "final" / Path(r["final_run"]).name / "subnet.json"))
    return out


def finetune(src: tuple[str, str], out: Path, steps: int, seed: int, args: argparse.Namespace, label: str) -> float:
    """Top-1 of one ``apq final`` run of ``steps`` steps (an earlier finished run is read back)."""
    cmd = [sys.executable, "-m", "apq_lightning.cli", "final", *src, "--supernet", args.supernet, "--recipe",
           args.recipe, "--out", str(out), "--table", str(out.parent / "report"), "--label", label, "--no-onnx",
           "--data.init_args.root", args.data, "--seed_everything", str(seed), "--trainer.max_steps", str(steps),
           "--trainer.val_check_interval", str(steps)]
    print(f"$ {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True)
    row = json.loads((out / "final.json").read_text())
    return float(row.get("row", row)["top1"])


def _delta(d: float | None, se: float | None) -> str:
    """A paired difference in points, ``± SE`` when there are two seeds or more."""
    return "-" if d is None else f"{100 * d:+.2f}" + ("" if se is None else f" ± {100 * se:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="the pipeline's output folder, e.g. runs/pipeline_cifar")
    ap.add_argument("--budget", required=True, help="a budget folder of the run, e.g. latency_ms=0.5")
    ap.add_argument("--methods", required=True, help="baselines to compare with APQ, e.g. fp-search@4bit")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--data", required=True)
    ap.add_argument("--supernet", required=True)
    ap.add_argument("--recipe", default="recipes/finetune_short.yaml")
    ap.add_argument("--out", type=Path, default=Path("runs/finetune_length"))
    args = ap.parse_args(argv)
    run, seeds = Path(args.run), [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    src = sources(run, args.budget, methods)
    short = {r["method"]: dict(zip(r["seeds"], r["achieved_accs"])) for r in
             results_rows([args.budget], run, PRESETS["cifar"].finetune_seeds) if r.get("seeds")}
    long: dict[str, dict[int, float]] = {}
    for method, s in src.items():
        name = re.sub(r"[^A-Za-z0-9.-]+", "_", method).strip("_")
        long[method] = {k: finetune(s, args.out / args.budget / f"{name}_{args.steps}.seed{k}", args.steps, k, args,
                                    method) for k in seeds}
    result = {"budget": args.budget, "steps": args.steps, "seeds": seeds, "methods": {}}
    print(f"\n{args.budget}: top-1 after 300 steps (the run) and {args.steps} steps, seeds {seeds}")
    print(f"| method | 300 steps | {args.steps} steps | Δ vs APQ at 300 | Δ vs APQ at {args.steps} |")
    print("|---|---|---|---|---|")
    for method in src:
        cells, runs = {}, {"short": (short.get(method, {}), short.get(APQ, {})), "long": (long[method], long[APQ])}
        for length, (accs, ref) in runs.items():
            ks = [k for k in seeds if k in accs and k in ref]
            d, se = (None, None) if method == APQ else paired_difference([accs[k] for k in ks], [ref[k] for k in ks])
            cells[length] = {"mean": statistics.mean(accs[k] for k in ks) if ks else math.nan, "diff_vs_apq": d,
                             "diff_se": se}
        result["methods"][method] = {**cells, "short_accs": {k: short.get(method, {}).get(k) for k in seeds},
                                     "long_accs": long[method]}
        deltas = [_delta(c["diff_vs_apq"], c["diff_se"]) for c in cells.values()]
        print(f"| {method} | {100 * cells['short']['mean']:.2f} | {100 * cells['long']['mean']:.2f} | "
              f"{deltas[0]} | {deltas[1]} |")
    write_json(args.out / args.budget / f"finetune_length_{args.steps}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
