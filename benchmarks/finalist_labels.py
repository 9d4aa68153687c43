"""The `qfa` label of every finalist of a pipeline run, next to what the MP predictor said of it.

Why: when a finetuned method beats APQ, the loss is the search's, the predictor's or the
finetune's. The search optimises the predictor and can drive it beyond its training samples;
this measures each finalist (APQ's winner and every baseline's subnet, per budget) the way the
MP samples were measured -- subnet and policy inside the quantized-for-all supernet, BN and
activation ranges re-estimated on fixed images, top-1 on the held-out images -- so the
predicted accuracy, the measured label and the finetuned accuracy can be compared finalist by
finalist (``benchmarks/cifar10_report.py`` shows the labels in its diagnosis).

    python benchmarks/finalist_labels.py --run runs/pipeline_cifar --data PATH/cifar10-jpeg.tar.gz \\
        --qfa-supernet weights/apq_cifar_qfa_supernet.pt [--out runs/pipeline_cifar/finalist_labels.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from apq_lightning.collection.measure import cache_batches, measure_qfa  # noqa: E402
from apq_lightning.data import ImageDataModule  # noqa: E402
from apq_lightning.final.results import APQ  # noqa: E402
from apq_lightning.outputs import write_json  # noqa: E402
from apq_lightning.quant.supernet import is_batch_quantized  # noqa: E402
from apq_lightning.space import Subnet  # noqa: E402
from apq_lightning.supernet_io import load_supernet  # noqa: E402

CL = torch.channels_last


def finalists(run: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{budget: {method: {"subnet", "predicted"}}}``: APQ's winner of every search of the run and
    every baseline row with a subnet (``baselines/`` and ``baselines_predicted/``)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted((run / "search").glob("*.json")):
        best = json.loads(path.read_text()).get("best") or {}
        if best.get("subnet"):
            out.setdefault(path.stem, {})[APQ] = {"subnet": best["subnet"], "predicted": best.get("predicted_acc")}
    for folder in ("baselines", "baselines_predicted"):
        for path in sorted((run / folder).glob("*/baselines.json")):
            for row in json.loads(path.read_text()).get("rows", []):
                if row.get("subnet") and row.get("method") != "apq":
                    out.setdefault(path.parent.name, {})[row["method"]] = {
                        "subnet": row["subnet"], "predicted": row.get("predicted_acc")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="the pipeline's output folder, e.g. runs/pipeline_cifar")
    ap.add_argument("--data", required=True, help="cifar10-jpeg.tar.gz (or an ImageFolder tree); 'digits' for tiny")
    ap.add_argument("--qfa-supernet", required=True, help="the quantized-for-all supernet the MP samples came from")
    ap.add_argument("--eval-images", type=int, default=2000, help="held-out images (as recipes/collect_mp.yaml)")
    ap.add_argument("--eval-batch-size", type=int, default=100)
    ap.add_argument("--bn-batches", type=int, default=2)
    ap.add_argument("--bn-batch-size", type=int, default=256)
    ap.add_argument("--out", default=None, help="JSON of the labels (default: <run>/finalist_labels.json)")
    args = ap.parse_args(argv)
    run = Path(args.run)
    found = finalists(run)
    if not found:
        ap.error(f"--run {run}: no search results (search/*.json) nor baselines there")
    qnet = load_supernet(args.qfa_supernet).to(memory_format=CL)
    if not is_batch_quantized(qnet):
        ap.error(f"--qfa-supernet {args.qfa_supernet} has no quant phase (train one with a 'quant' phase)")
    digits = args.data == "digits"
    dm = ImageDataModule("digits" if digits else "cifar10", root=None if digits else args.data,
                         image_size=qnet.space.image_size)
    dm.setup("fit")
    bn = [x for x, _ in cache_batches(dm.calib_dataloader(args.bn_batches, args.bn_batch_size), channels_last=True)]
    images = cache_batches(dm.heldout_dataloader(args.eval_batch_size), args.eval_images, channels_last=True)
    result: dict[str, Any] = {"qfa_supernet": args.qfa_supernet, "eval_images": sum(len(y) for _, y in images),
                              "budgets": {}}
    for budget, methods in found.items():
        for method, f in methods.items():
            acc = measure_qfa(qnet, Subnet.from_dict(f["subnet"], qnet.space), bn, images).acc
            result["budgets"].setdefault(budget, {})[method] = {"predicted": f["predicted"], "qfa_label": acc}
            pred = "-" if f["predicted"] is None else f"{f['predicted']:.4f}"
            print(f"{budget:>32} {method:>22}: predicted {pred}, qfa label {acc:.4f}", flush=True)
    out = Path(args.out) if args.out else run / "finalist_labels.json"
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
