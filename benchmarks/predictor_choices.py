"""Predictor choices on the committed CIFAR-10 stores (issue 15 item 5): which training and which
bit features rank held-out architectures and policies best.

    python benchmarks/predictor_choices.py                  # writes docs/results/predictor_choices.{md,json}
    python benchmarks/predictor_choices.py --folds 6 --seeds 0,1,2 --fp-folds 5 --out DIR/name

The stores: ``docs/results/cifar10/samples_fp.jsonl`` (800 FP samples, one per architecture) and
``samples_mp.jsonl`` (120 MP samples of 66 architectures, 6 of them under 10 policies; 30-step
QAT labels with ~1 point of noise). Every predictor is a ``PredictorModule`` fitted by a
Lightning Trainer (``apq_lightning.study.run.fit_predictor``), so what is measured is the code
the recipes run.

**Protocol.** Architecture-grouped K-fold cross-validation: no architecture is in a training
and a test fold, nor in an FP predictor's training set and the MP test fold it serves.

* *FP store* (``--fp-folds``): APQ's training, the same with steps and early stopping, and the
  new training (below): pairwise accuracy, Kendall τ and RMSE on each held-out fold.
* *MP store* (``--folds`` × ``--seeds``): each seed draws another grouping of the 66
  architectures into folds (balanced by samples, so each fold holds one of the 10-policy
  architectures when ``--folds`` is 6) and another initialisation. For each fold, FP predictors
  are trained on the FP store minus the fold's MP architectures and minus a 1/K share of the FP-only
  architectures, then the choices (a)-(g) are fitted to the other folds' MP samples.
* *Metrics* per fold: pairwise accuracy over all held-out pairs, over pairs of two policies of
  one architecture (``same arch``: the bit signal alone) and over the rest (``diff arch``), via
  :func:`apq_lightning.metrics.pairwise_split`; ``FP @ 8 bit``: the MP predictor with every
  tensor at 8 bits ranking the held-out FP-only architectures by their FP accuracy (does MP
  training keep the FP ranking?); RMSE on the fold, and on the MP samples it was trained on
  (memorisation). Mean ± standard error over the folds × seeds, and the paired difference to
  today's recipe (a) on the same folds.

**Choices.** *APQ training*: one-hot bits, Adam + L2 1e-4 on raw accuracies, 150 epochs of batch
256 (full batch on the MP store), cosine, whole network trained after transfer (the recipes
before issue 15). *New training*: standardised targets, AdamW, batch 64, steps with validation
every 20 and early stopping (patience 10, at most 2,000 steps) on an inner architecture-grouped
split of the training fold (the datamodule's :class:`~apq_lightning.data.samples.SplitRule`:
``val_fraction`` 0.1, at least 20 samples of 8 architectures), best weights restored.

(a) APQ recipe: APQ-trained FP predictor, APQ-trained MP predictor transferred from it;
(b) the FP predictor, bits ignored; (c) FP predictor + a fixed 0.3 points per mean bit;
(d) new training, one-hot bits, whole network trained; (e) the same + numeric bit deficits per
tensor; (f) new training, one-hot bits, only ``quantize_fc`` trained (FP part frozen);
(g) FP prediction + linear bit-correction head on the per-tensor deficits, FP part frozen (the
head at lr 5e-2 in z units, as in the MP recipes). (b)-(g) start from the FP predictor of
``--fp-training`` (default: APQ's optimiser with steps and early stopping, the FP recipes').
What the numbers say, and which choices the recipes took: docs/predictor.md §5.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FP_STORE = ROOT / "docs" / "results" / "cifar10" / "samples_fp.jsonl"
MP_STORE = ROOT / "docs" / "results" / "cifar10" / "samples_mp.jsonl"
PRIOR_PER_BIT = 0.003  # (c): 0.3 accuracy points per bit of mean bit width
HEAD_LR = 5e-2  # (g): the bit head's learning rate in z units (~1e-3 in accuracy units), the MP recipes'
INNER_SPLIT = {"val_fraction": 0.1, "test_fraction": 0.0, "min_val_samples": 20, "min_val_archs": 8}
MP_METRICS = ("pairwise_acc", "pairwise_acc_same_arch", "pairwise_acc_diff_arch", "fp_at_8bit", "rmse", "train_rmse")
FP_METRICS = ("pairwise_acc", "kendall_tau", "rmse", "train_rmse")


@dataclass
class Store:
    """One sample store, pre-encoded: features (quantized encoding when it has bits), accuracies,
    genomes and each sample's architecture key."""

    x: torch.Tensor
    y: torch.Tensor
    genomes: np.ndarray
    archs: np.ndarray
    space: str

    def take(self, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        idx = torch.from_numpy(np.flatnonzero(mask))
        return self.x[idx], self.y[idx], self.archs[mask]


@dataclass(frozen=True)
class Training:
    """How a predictor is fitted: ``PredictorModule`` arguments and the trainer's length."""

    name: str
    module: dict[str, Any]
    budget: Any = None  # a StepBudget (with an inner validation split), or None: ``epochs``
    epochs: int = 150
    batch_size: int = 256


@dataclass(frozen=True)
class Choice:
    """One row of the MP table: a predictor built from the fold's FP predictor."""

    key: str
    label: str
    kind: str  # "mp": an MP predictor fitted by ``training``; "fp": the FP predictor; "prior": FP + PRIOR_PER_BIT
    training: Training | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    fp: str = "default"  # "apq": starts from the APQ-trained FP predictor


def trainings() -> dict[str, Training]:
    from apq_lightning.modules.predictor_module import APQ_TRAINING
    from apq_lightning.study.run import StepBudget

    return {"apq": Training("APQ training (150 epochs)", dict(APQ_TRAINING)),
            "apq_steps": Training("APQ training, steps + early stopping", {**APQ_TRAINING, "best_monitor": "val/loss"},
                                  StepBudget()),
            "new": Training("new training", {}, StepBudget(), batch_size=64)}


def choices(train: dict[str, Training]) -> list[Choice]:
    new = train["new"]
    return [
        Choice("a", "(a) APQ recipe: FP and MP, APQ training", "mp", train["apq"], fp="apq"),
        Choice("b", "(b) FP predictor, bits ignored", "fp"),
        Choice("c", "(c) FP + 0.3 pt per mean bit (fixed)", "prior"),
        Choice("d", "(d) new training, one-hot bits", "mp", new, {"bit_features": "onehot", "train_transferred": True}),
        Choice("e", "(e) new training, one-hot + numeric bits", "mp", new,
               {"bit_features": "onehot+numeric", "train_transferred": True}),
        Choice("f", "(f) new training, one-hot bits, FP part frozen", "mp", new, {"bit_features": "onehot"}),
        Choice("g", "(g) FP + bit-correction head, FP part frozen", "mp", new, {"bit_features": "head", "lr": HEAD_LR}),
    ]


# ---- data --------------------------------------------------------------------------------------
def load_store(path: Path, quantized: bool) -> Store:
    from apq_lightning.data import SubnetSampleDataModule
    from apq_lightning.data.splits import arch_keys
    from apq_lightning.space import get_space

    dm = SubnetSampleDataModule([str(path)], quantized=quantized, val_fraction=0.0, test_fraction=0.0)
    ds = dm.dataset("train")
    x, y = ds.__getitems__(range(len(ds)))
    genomes = ds.genomes.astype(np.int64)
    return Store(x.float(), y.float(), genomes, np.array(arch_keys(get_space(dm.space), genomes)), dm.space)


def grouped_folds(archs: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold of every sample: architectures, largest first (ties in a seeded random order), each to
    the fold with the fewest samples so far."""
    rng = np.random.default_rng(seed)
    keys, inverse, counts = np.unique(archs, return_inverse=True, return_counts=True)
    order = sorted(range(len(keys)), key=lambda i: (-counts[i], rng.random()))
    load, fold_of = np.zeros(k), np.zeros(len(keys), dtype=np.int64)
    for i in order:
        f = int(np.argmin(load + rng.random(k) * 1e-9))
        fold_of[i], load[f] = f, load[f] + counts[i]
    return fold_of[inverse]


def mean_bits(space: str, genomes: np.ndarray) -> np.ndarray:
    """Mean bit width over the tensors of the active blocks."""
    from apq_lightning.space import BIT_FIELDS, get_space

    sp = get_space(space)
    sl, active = sp.genome_slices(), sp.genome_active(genomes)
    bits = np.stack([np.asarray(sp.bit_choices)[genomes[:, sl[f]]] for f in BIT_FIELDS], axis=1)
    return (bits * active[:, None, :]).sum(axis=(1, 2)) / (len(BIT_FIELDS) * active.sum(axis=1))


def at_8bit(space: str, genomes: np.ndarray) -> torch.Tensor:
    """The quantized encoding of genomes with every tensor at the largest bit choice."""
    from apq_lightning.encoding import get_encoder
    from apq_lightning.space import get_space

    sp = get_space(space)
    g = genomes.copy()
    g[:, sp.genome_slices()["pw_w"].start:] = len(sp.bit_choices) - 1
    return torch.from_numpy(get_encoder(sp).encode_genomes(g, quantized=True))


# ---- fitting -----------------------------------------------------------------------------------
def fit(space: str, quantized: bool, training: Training, data: tuple, seed: int, root: Path,
        transfer: Any = None, **overrides: Any) -> Any:
    """A ``PredictorModule`` of ``training`` fitted to ``data`` = (features, accuracies, archs);
    with a step budget, on the data minus an inner architecture-grouped validation split."""
    from apq_lightning.data.splits import SplitRule
    from apq_lightning.modules import PredictorModule
    from apq_lightning.study.run import fit_predictor

    x, y, archs = data
    val = None
    if training.budget is not None:
        split = SplitRule(**INNER_SPLIT, seed=seed).assign(list(archs))
        is_val = np.array([split[a] == "val" for a in archs])
        val = (x[torch.from_numpy(is_val)], y[torch.from_numpy(is_val)])
        x, y = x[torch.from_numpy(~is_val)], y[torch.from_numpy(~is_val)]
    torch.manual_seed(seed)
    args = {**training.module, **overrides}
    module = PredictorModule(space=space, quantized=quantized, **args, base_acc=float(y.double().mean()),
                             target_std=float(y.double().std()) if args.get("standardize", True) else None)
    if transfer is not None:
        module.transfer(transfer)
    fit_predictor(module, x, y, training.epochs, training.batch_size, seed, root, val=val, budget=training.budget)
    module.train_rmse = float(torch.sqrt(torch.mean((predict(module.predictor, x) - y) ** 2)))
    return module


@torch.no_grad()
def predict(predictor: Any, x: torch.Tensor) -> torch.Tensor:
    predictor.eval()
    return predictor(x if predictor.quantized else x[:, : predictor.encoder.fp_dim]).float()


def pairwise(p: torch.Tensor, y: torch.Tensor) -> float:
    from apq_lightning.metrics import pairwise_accuracy

    return float(pairwise_accuracy(p, y))


# ---- the two parts -----------------------------------------------------------------------------
def fp_part(fp: Store, space: str, train: dict[str, Training], folds: int, root: Path, say: Any) -> list[dict]:
    """Grouped K-fold on the FP store: APQ vs new training of the FP predictor."""
    from apq_lightning.metrics import predictor_metrics

    fold = grouped_folds(fp.archs, folds, 0)
    rows = []
    for f in range(folds):
        for name, training in train.items():
            t = time.perf_counter()
            module = fit(space, False, training, fp.take(fold != f), 0, root)
            x, y, _ = fp.take(fold == f)
            m = predictor_metrics(predict(module.predictor, x), y)
            rows.append({"training": name, "fold": f, **{k: m[k] for k in FP_METRICS[:3]},
                         "train_rmse": module.train_rmse, "steps": int(module.trainer.global_step),
                         "seconds": round(time.perf_counter() - t, 2)})
            say(f"  FP fold {f} {name:>4}: pairwise {m['pairwise_acc']:.3f} ({rows[-1]['steps']} steps)")
    return rows


def mp_part(fp: Store, mp: Store, space: str, train: dict[str, Training], fp_training: str, folds: int,
            seeds: list[int], root: Path, say: Any) -> list[dict]:
    """Grouped K-fold on the MP store, per seed: every choice on every fold (module docstring)."""
    from apq_lightning.metrics import predictor_metrics

    groups = torch.from_numpy(np.unique(mp.archs, return_inverse=True)[1]).double()
    prior = torch.from_numpy(PRIOR_PER_BIT * mean_bits(space, mp.genomes)).float()
    fp_only = ~np.isin(fp.archs, mp.archs)
    rows = []
    for seed in seeds:
        fold = grouped_folds(mp.archs, folds, seed)
        fp_fold = np.full(len(fp.archs), -1)
        fp_fold[fp_only] = grouped_folds(fp.archs[fp_only], folds, seed + 1000)
        for f in range(folds):
            test = fold == f
            fp_train = ~np.isin(fp.archs, mp.archs[test]) & (fp_fold != f)
            x8 = at_8bit(space, fp.genomes[fp_fold == f])
            y8 = fp.y[torch.from_numpy(fp_fold == f)]
            fps = {name: fit(space, False, train[name], fp.take(fp_train), seed, root).predictor
                   for name in dict.fromkeys(("apq", fp_training))}
            x, y, _ = mp.take(test)
            g = groups[torch.from_numpy(test)]
            for choice in choices(train):
                t = time.perf_counter()
                source = fps["apq" if choice.fp == "apq" else fp_training]
                train_rmse = float("nan")
                if choice.kind == "mp":
                    module = fit(space, True, choice.training, mp.take(~test), seed, root, transfer=source,
                                 **choice.overrides)
                    train_rmse = module.train_rmse
                    p, p8 = predict(module.predictor, x), predict(module.predictor, x8)
                else:
                    p, p8 = predict(source, x), predict(source, x8)
                    if choice.kind == "prior":
                        p = p + prior[torch.from_numpy(test)]
                m = predictor_metrics(p, y, g)
                rows.append({"choice": choice.key, "seed": seed, "fold": f, "n_test": int(test.sum()),
                             **{k: m[k] for k in MP_METRICS[:3]}, "fp_at_8bit": pairwise(p8, y8),
                             "rmse": m["rmse"], "train_rmse": train_rmse,
                             "seconds": round(time.perf_counter() - t, 2)})
            say(f"  seed {seed} fold {f}: " + ", ".join(f"{r['choice']} {r['pairwise_acc']:.3f}"
                                                       for r in rows[-len(choices(train)):]))
    return rows


# ---- summary -----------------------------------------------------------------------------------
def mean_se(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, 0
    se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else math.nan
    return statistics.fmean(vals), se, len(vals)


def summarize(rows: list[dict], by: str, metrics: tuple[str, ...], base: str | None = None) -> dict[str, dict]:
    """Per value of ``by``: mean, s.e. and count of each metric over the rows; with ``base``, the
    paired difference of the pairwise accuracy to that value's row of the same fold and seed."""
    out: dict[str, dict] = {}
    ref = {(r.get("seed"), r["fold"]): r for r in rows if base is not None and r[by] == base}
    for key in dict.fromkeys(r[by] for r in rows):
        mine = [r for r in rows if r[by] == key]
        cell = {m: dict(zip(("mean", "se", "n"), mean_se([r[m] for r in mine]))) for m in metrics}
        if base is not None:
            diffs = [r["pairwise_acc"] - ref[(r.get("seed"), r["fold"])]["pairwise_acc"] for r in mine]
            cell["delta_pairwise"] = dict(zip(("mean", "se", "n"), mean_se(diffs)))
        out[key] = cell
    return out


def _fmt(cell: dict, digits: int = 3, signed: bool = False) -> str:
    if cell["n"] == 0:
        return "–"
    sign = "+" if signed else ""
    se = "" if math.isnan(cell["se"]) else f" ± {cell['se']:.{digits}f}"
    return f"{cell['mean']:{sign}.{digits}f}{se}"


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = ["# Predictor choices on the CIFAR-10 stores", "",
             f"`{result['command']}` ({result['seconds']:.0f} s, {cfg['threads']} torch thread; FP predictor of "
             f"(b)-(g): {result['trainings'].get(cfg['fp_training'])}; protocol in the script's docstring). "
             "Mean ± standard error over "
             f"{cfg['folds']} architecture-grouped folds × {len(cfg['seeds'].split(','))} seeds; Δ: paired "
             "difference to (a) on the same folds.", "",
             f"## MP predictor ({result['mp_samples']} MP samples, {result['mp_archs']} architectures)", "",
             "| choice | pairwise | same arch | diff arch | FP archs @ 8 bit | RMSE | train RMSE | Δ pairwise |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    labels = {c["key"]: c["label"] for c in result["choices"]}
    for key, cell in result["mp_summary"].items():
        lines.append(f"| {labels[key]} | " + " | ".join(_fmt(cell[m], 4 if "rmse" in m else 3) for m in MP_METRICS)
                     + f" | {_fmt(cell['delta_pairwise'], signed=True)} |")
    lines += ["", f"## FP predictor ({result['fp_samples']} FP samples, {cfg['fp_folds']} folds)", "",
              "| training | pairwise | Kendall τ | RMSE | train RMSE |", "|---|---:|---:|---:|---:|"]
    for key, cell in result["fp_summary"].items():
        lines.append(f"| {result['trainings'][key]} | "
                     + " | ".join(_fmt(cell[m], 4 if "rmse" in m else 3) for m in FP_METRICS) + " |")
    lines += ["", "What the numbers say, and which choices the recipes took: [docs/predictor.md](../predictor.md) §5."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fp-store", default=str(FP_STORE))
    p.add_argument("--mp-store", default=str(MP_STORE))
    p.add_argument("--folds", type=int, default=6, help="architecture-grouped folds of the MP store")
    p.add_argument("--seeds", default="0,1,2", help="comma list: fold groupings and initialisations of the MP part")
    p.add_argument("--fp-folds", type=int, default=5, help="folds of the FP store (0 = skip the FP part)")
    p.add_argument("--parts", default="fp,mp", help="comma list of fp (FP store) and mp (MP store)")
    p.add_argument("--fp-training", choices=("new", "apq", "apq_steps"), default="apq_steps",
                   help="the FP training (b)-(g) start from (the recipes')")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "predictor_choices"),
                   help="output path without suffix: writes .md and .json")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.folds < 2 or not seeds or args.fp_folds < 0 or args.fp_folds == 1:
        p.error("--folds must be >= 2, --fp-folds 0 or >= 2, --seeds a non-empty comma list")

    from apq_lightning.study.run import quiet_and_single_threaded

    t0 = time.perf_counter()
    with quiet_and_single_threaded(), tempfile.TemporaryDirectory() as tmp:
        fp, mp = load_store(Path(args.fp_store), False), load_store(Path(args.mp_store), True)
        if fp.space != mp.space:
            p.error(f"the FP store is of space {fp.space!r}, the MP store of {mp.space!r}; they must match")
        space = mp.space
        train = trainings()
        say = print
        say(f"FP store {len(fp.y)} samples, MP store {len(mp.y)} samples of {len(set(mp.archs))} architectures")
        parts = {s.strip() for s in args.parts.split(",")}
        fp_rows = fp_part(fp, space, train, args.fp_folds, Path(tmp), say) if "fp" in parts and args.fp_folds else []
        mp_rows = mp_part(fp, mp, space, train, args.fp_training, args.folds, seeds, Path(tmp), say) \
            if "mp" in parts else []
    result = {
        "command": " ".join(["python benchmarks/predictor_choices.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": {"fp_store": str(Path(args.fp_store).relative_to(ROOT) if Path(args.fp_store).is_relative_to(ROOT)
                                   else args.fp_store),
                   "mp_store": str(Path(args.mp_store).relative_to(ROOT) if Path(args.mp_store).is_relative_to(ROOT)
                                   else args.mp_store),
                   "folds": args.folds, "seeds": args.seeds, "fp_folds": args.fp_folds,
                   "fp_training": args.fp_training, "threads": 1,  # quiet_and_single_threaded
                   "inner_split": INNER_SPLIT, "prior_per_bit": PRIOR_PER_BIT},
        "trainings": {k: v.name for k, v in train.items()},
        "fp_samples": len(fp.y), "mp_samples": len(mp.y), "mp_archs": len(set(mp.archs)),
        "choices": [{"key": c.key, "label": c.label, "overrides": c.overrides} for c in choices(train)],
        "mp_summary": summarize(mp_rows, "choice", MP_METRICS, base="a") if mp_rows else {},
        "fp_summary": summarize(fp_rows, "training", FP_METRICS) if fp_rows else {},
        "mp_runs": mp_rows, "fp_runs": fp_rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print("\n" + table)
    print(f"wrote {out.with_suffix('.md')} and .json ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
