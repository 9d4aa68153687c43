"""Predictor-transfer study (APQ, CVPR 2020, Figure 7) on our own sample stores.

One FP predictor is trained on the FP stores (once). Then, for every MP training-set size,
seed, loss and initialisation (``transfer``: from the FP predictor, ``quantize_fc = 0``;
``scratch``: random init, regressor bias = mean training accuracy), an MP predictor is trained
on a subset of the MP training split and evaluated on **one fixed held-out MP test split**:
pairwise accuracy (APQ's), Kendall τ-b and RMSE.

* **Splits.** Both datamodules use the same ``--split-seed``; the split is a hash of the
  architecture, so the FP predictor never saw an architecture of the MP test split, and the
  test split is the same for every run.
* **Subsets.** The datamodule's ``max_train`` ties its subset to ``split_seed`` (which would
  move the test split), so the subsets are drawn here: seed ``s`` takes the first ``size``
  samples of a fixed permutation of the MP training split (``numpy`` ``default_rng(s)``):
  nested in the size for one seed, different across seeds. ``all`` is the whole split. The
  seed also sets the initialisation (scratch) and the batch order.
* **Training.** A plain loop through :class:`PredictorModule` (its loss, its predictor; Adam
  with weight decay, per-epoch cosine decay as in the recipes) over pre-encoded tensors, one
  torch thread. ``--min-steps`` raises the epochs of small training sets so that each run takes
  at least that many optimizer steps (0 = exactly ``--epochs``).

Outputs in ``--out``: ``transfer_study.json`` (config, FP predictor, every run, per-cell
mean/std), ``transfer_study.md`` (mean ± std pairwise accuracy over seeds) and
``transfer_study.png`` (pairwise accuracy vs. MP training samples).

    python benchmarks/transfer_study.py --fp-stores 'runs/collect_fp_cifar/samples*.jsonl' \\
        --mp-stores 'runs/collect_mp_cifar/samples*.jsonl' --space apq_cifar \\
        --sizes 50,100,200,400,all --seeds 0,1,2 --losses mse,ranking --epochs 150 --out runs/transfer_study
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.regression import kendall_rank_corrcoef

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from apq_lightning.data import SubnetSampleDataModule  # noqa: E402
from apq_lightning.metrics import pairwise_accuracy  # noqa: E402
from apq_lightning.modules import PredictorModule  # noqa: E402
from apq_lightning.predictor import AccuracyPredictor  # noqa: E402

INITS = ("transfer", "scratch")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fp-stores", nargs="+", required=True, help="FP sample stores (files, dirs, globs)")
    p.add_argument("--mp-stores", nargs="+", required=True, help="MP sample stores (files, dirs, globs)")
    p.add_argument("--space", default=None, help="search space (default: the first record's)")
    p.add_argument("--sizes", default="50,100,200,400,all", help="MP training-set sizes, 'all' = whole split")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--losses", default="mse,ranking", help="comma list of mse, ranking, mse+ranking")
    p.add_argument("--epochs", type=int, default=150, help="epochs of every MP run")
    p.add_argument("--fp-epochs", type=int, default=None, help="epochs of the FP predictor (default --epochs)")
    p.add_argument("--min-steps", type=int, default=0, help="at least this many optimizer steps per MP run")
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--num-layers", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of architectures (fixed test)")
    p.add_argument("--split-seed", type=int, default=0, help="split of FP and MP stores (same for every run)")
    p.add_argument("--fp-seed", type=int, default=0, help="seed of the FP predictor")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    args.size_list = _sizes(args.sizes)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.loss_list = [s.strip() for s in args.losses.split(",") if s.strip()]
    for loss in args.loss_list:
        if loss not in ("mse", "ranking", "mse+ranking"):
            p.error(f"--losses: {loss!r} is not allowed; allowed: mse, ranking, mse+ranking")
    if not args.seed_list or not args.loss_list:
        p.error("--seeds and --losses need at least one value each")
    return args


def _sizes(text: str) -> list[int | str]:
    out: list[int | str] = []
    for part in (s.strip() for s in text.split(",")):
        if not part:
            continue
        if part == "all":
            out.append("all")
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise SystemExit(f"--sizes: {part!r} is neither a positive integer nor 'all'")
    if not out:
        raise SystemExit("--sizes is empty")
    return out


# ---- data ----------------------------------------------------------------------------------
def load_split(stores: list[str], space: str | None, quantized: bool, args: argparse.Namespace,
               ) -> tuple[str, dict[str, tuple[torch.Tensor, torch.Tensor]], np.ndarray]:
    """``(space, {train, test: (features, accs)}, test genomes)``; no validation split (the
    study trains for a fixed budget and never selects on held-out data)."""
    dm = SubnetSampleDataModule(stores, quantized=quantized, space=space, val_fraction=0.0,
                                test_fraction=args.test_fraction, split_seed=args.split_seed)
    dm.setup("fit")
    out = {}
    for split in ("train", "test"):
        ds = dm.dataset(split)
        x, y = ds.__getitems__(range(len(ds))) if len(ds) else (torch.zeros(0, dm.feature_dim), ds.accs)
        out[split] = (x.float(), y.float())
    return dm.space, out, dm.dataset("test").genomes


def test_hash(genomes: np.ndarray, accs: torch.Tensor) -> str:
    """Identity of a test split (its genomes and accuracies), to show it never changes."""
    h = hashlib.sha1(np.ascontiguousarray(genomes, dtype="<i2").tobytes())
    h.update(accs.numpy().astype("<f4").tobytes())
    return h.hexdigest()[:12]


# ---- training ------------------------------------------------------------------------------
def train(module: PredictorModule, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int,
          seed: int) -> int:
    """Adam + per-epoch cosine decay over ``epochs`` (PredictorModule's recipe); returns steps."""
    hp = module.hparams
    opt = torch.optim.Adam(module.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs)) if hp.cosine else None
    gen = torch.Generator().manual_seed(seed)
    module.train()
    steps = 0
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            loss = module._loss(module(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        if sched is not None:
            sched.step()
    module.eval()
    return steps


@torch.no_grad()
def evaluate(predictor: AccuracyPredictor, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    predictor.eval()
    pred = predictor(x).float()
    tau = kendall_rank_corrcoef(pred, y, variant="b") if len(y) > 1 else torch.tensor(float("nan"))
    return {
        "pairwise_acc": float(pairwise_accuracy(pred, y)),
        "kendall_tau": float(tau),
        "rmse": float(torch.sqrt(torch.mean((pred - y) ** 2))),
    }


def epochs_for(n: int, args: argparse.Namespace) -> int:
    per_epoch = math.ceil(n / args.batch_size)
    return max(args.epochs, math.ceil(args.min_steps / per_epoch)) if args.min_steps else args.epochs


# ---- report --------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(runs: list[dict]) -> list[dict]:
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        cells.setdefault((str(r["size"]), r["loss"], r["init"]), []).append(r)
    out = []
    for (_, loss, init), rs in cells.items():
        cell = {"size": rs[0]["size"], "loss": loss, "init": init, "n_runs": len(rs),
                "seeds": [r["seed"] for r in rs], "n_train": rs[0]["n_train"]}
        for m in ("pairwise_acc", "kendall_tau", "rmse"):
            cell[f"{m}_mean"], cell[f"{m}_std"] = _mean_std([r["test"][m] for r in rs])
        out.append(cell)
    return out


def markdown(cells: list[dict], sizes: list, losses: list[str], info: dict) -> str:
    idx = {(str(c["size"]), c["loss"], c["init"]): c for c in cells}
    head = ["MP train samples"] + [f"{loss} {init}" for loss in losses for init in INITS]
    lines = [
        f"Test pairwise accuracy (mean ± std over seeds {info['seeds']}) on {info['n_test']} held-out MP samples, "
        f"space `{info['space']}`; FP predictor: {info['fp_n_train']} FP samples, "
        f"test pairwise {info['fp_test_pairwise']:.3f}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---:|" * len(head),
    ]
    for size in sizes:
        n_train = next((c["n_train"] for c in cells if str(c["size"]) == str(size)), None)
        row = [f"{size} ({n_train})" if size == "all" else str(n_train if n_train is not None else size)]
        for loss in losses:
            vals = {i: idx.get((str(size), loss, i)) for i in INITS}
            best = max((v["pairwise_acc_mean"] for v in vals.values() if v), default=float("nan"))
            for init in INITS:
                c = vals[init]
                if c is None:
                    row.append("–")
                    continue
                text = f"{c['pairwise_acc_mean']:.3f} ± {c['pairwise_acc_std']:.3f}"
                row.append(f"**{text}**" if c["pairwise_acc_mean"] == best and len(vals) > 1 else text)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(cells: list[dict], losses: list[str], info: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"transfer": "-", "scratch": "--"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for li, loss in enumerate(losses):
        for init in INITS:
            cs = sorted((c for c in cells if c["loss"] == loss and c["init"] == init), key=lambda c: c["n_train"])
            if not cs:
                continue
            xs = np.array([c["n_train"] for c in cs], dtype=float)
            mu = np.array([c["pairwise_acc_mean"] for c in cs])
            sd = np.array([c["pairwise_acc_std"] for c in cs])
            color = colors[li % len(colors)]
            ax.plot(xs, mu, linestyle=styles[init], marker="o" if init == "transfer" else "s", color=color,
                    label=f"{init} ({loss})")
            ax.fill_between(xs, mu - sd, mu + sd, color=color, alpha=0.15 if init == "transfer" else 0.08)
    ns = sorted({c["n_train"] for c in cells})
    if len(ns) > 1 and ns[0] > 0 and ns[-1] / ns[0] >= 4:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("MP training samples")
    ax.set_ylabel("test pairwise accuracy")
    ax.set_title(f"Predictor transfer, {info['space']} ({info['n_test']} test samples, ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main ----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    try:
        return _run(args, out)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, out: Path) -> int:
    t0 = time.perf_counter()
    space, fp_data, _ = load_split(args.fp_stores, args.space, False, args)
    _, mp_data, test_genomes = load_split(args.mp_stores, space, True, args)
    (x_pool, y_pool), (x_test, y_test) = mp_data["train"], mp_data["test"]
    if len(y_test) < 2:
        raise SystemExit(f"the MP test split has {len(y_test)} sample(s); raise --test-fraction or add samples")
    test_id = test_hash(test_genomes, y_test)
    print(f"space {space}: FP train {len(fp_data['train'][1])}, MP train pool {len(y_pool)}, "
          f"MP test {len(y_test)} (split_seed {args.split_seed}, test {test_id})")

    # FP predictor, once
    torch.manual_seed(args.fp_seed)
    fp_epochs = args.fp_epochs if args.fp_epochs is not None else args.epochs
    fp_mod = PredictorModule(space=space, quantized=False, hidden=args.hidden, num_layers=args.num_layers,
                             lr=args.lr, weight_decay=args.weight_decay, loss="mse",
                             base_acc=float(fp_data["train"][1].double().mean()))
    t = time.perf_counter()
    train(fp_mod, *fp_data["train"], epochs=fp_epochs, batch_size=args.batch_size, seed=args.fp_seed)
    fp_pred = fp_mod.predictor
    fp_path = fp_pred.save(out / "fp_predictor.pt")
    fp_info = {"n_train": len(fp_data["train"][1]), "n_test": len(fp_data["test"][1]), "epochs": fp_epochs,
               "seconds": round(time.perf_counter() - t, 2), "path": str(fp_path),
               "test_fp": evaluate(fp_pred, *fp_data["test"]) if len(fp_data["test"][1]) > 1 else None,
               "test_mp_zero_shot": evaluate(fp_pred, x_test[:, : fp_pred.encoder.fp_dim], y_test)}
    print(f"FP predictor: {fp_info['n_train']} samples, {fp_epochs} epochs, {fp_info['seconds']} s; on the MP test "
          f"split without bits: pairwise {fp_info['test_mp_zero_shot']['pairwise_acc']:.3f}")

    runs: list[dict] = []
    for seed in args.seed_list:
        perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(y_pool)))
        for size in args.size_list:
            n = len(y_pool) if size == "all" else min(int(size), len(y_pool))
            idx = perm[:n]
            x_tr, y_tr = x_pool[idx], y_pool[idx]
            train_id = hashlib.sha1(np.sort(idx.numpy()).astype("<i8").tobytes()).hexdigest()[:12]
            epochs = epochs_for(n, args)
            for loss in args.loss_list:
                for init in INITS:
                    torch.manual_seed(seed)
                    mod = PredictorModule(space=space, quantized=True, hidden=args.hidden,
                                          num_layers=args.num_layers, lr=args.lr, weight_decay=args.weight_decay,
                                          loss=loss, base_acc=float(y_tr.double().mean()))
                    if init == "transfer":
                        mod.predictor.transfer_from(fp_pred)  # regressor bias: the FP predictor's
                    t = time.perf_counter()
                    steps = train(mod, x_tr, y_tr, epochs=epochs, batch_size=args.batch_size, seed=seed)
                    run = {"size": size, "n_train": n, "train_id": train_id, "seed": seed, "loss": loss, "init": init,
                           "epochs": epochs, "steps": steps, "seconds": round(time.perf_counter() - t, 3),
                           "n_test": len(y_test), "test_id": test_id, "test": evaluate(mod.predictor, x_test, y_test)}
                    runs.append(run)
                    print(f"  size {size!s:>5} (n={n}) seed {seed} {loss:>11} {init:>8}: pairwise "
                          f"{run['test']['pairwise_acc']:.3f}, tau {run['test']['kendall_tau']:.3f}, "
                          f"rmse {run['test']['rmse']:.4f} ({steps} steps, {run['seconds']:.1f} s)")

    cells = summarize(runs)
    info = {"space": space, "seeds": args.seed_list, "n_test": len(y_test), "fp_n_train": fp_info["n_train"],
            "fp_test_pairwise": (fp_info["test_fp"] or fp_info["test_mp_zero_shot"])["pairwise_acc"]}
    config = {k: v for k, v in vars(args).items() if k not in ("size_list", "seed_list", "loss_list")}
    result = {"config": config, "space": space, "fp_stores": args.fp_stores, "mp_stores": args.mp_stores,
              "mp_train_pool": len(y_pool), "test": {"n": len(y_test), "id": test_id, "split_seed": args.split_seed,
                                                      "fraction": args.test_fraction},
              "fp_predictor": fp_info, "runs": runs, "cells": cells,
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / "transfer_study.json").write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    table = markdown(cells, args.size_list, args.loss_list, info)
    (out / "transfer_study.md").write_text("# Predictor transfer study\n\n" + table)
    plot(cells, args.loss_list, info, out / "transfer_study.png")
    print()
    print(table)
    print(f"wrote {out / 'transfer_study.json'}, .md, .png ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
