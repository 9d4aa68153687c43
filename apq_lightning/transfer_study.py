"""Predictor-transfer study (APQ, CVPR 2020, Figure 7) on our own sample stores: ``apq transfer-study``.

    apq transfer-study --fp-stores 'runs/collect_fp_cifar/samples*.jsonl' \\
        --mp-stores 'runs/collect_mp_cifar/samples*.jsonl' --space apq_cifar \\
        --sizes 50,100,200,400,all --seeds 0,1,2 --losses mse,ranking --epochs 150 --out runs/transfer_study

APQ's claim is that an MP predictor started from the FP predictor needs far fewer expensive
quantization-aware samples than one trained from scratch. This study measures that claim on our
stores: one FP predictor is trained on the FP stores (once). Then, for every MP training-set
size, seed, loss and initialisation (``transfer``: from the FP predictor, ``quantize_fc = 0``;
``scratch``: random init, regressor bias = mean training accuracy), an MP predictor is trained
on a subset of the MP training split and evaluated on **one fixed held-out MP test split**:
pairwise accuracy (APQ's), Kendall τ-b and RMSE.

* **Splits.** Both datamodules use the same ``split_seed``; the split is a hash of the
  architecture, so the FP predictor never saw an architecture of the MP test split (transfer
  would otherwise leak test architectures), and the test split is the same for every run, so
  runs differ only in what they were trained on.
* **Subsets.** The datamodule's ``max_train`` ties its subset to ``split_seed`` (which would
  move the test split), so the subsets are drawn here: seed ``s`` takes the first ``size``
  samples of a fixed permutation of the MP training split (``numpy`` ``default_rng(s)``):
  nested in the size for one seed (a larger set only adds samples), different across seeds.
  ``all`` is the whole split; a size at or above the split's size is run as ``all`` (with a
  note), and sizes that end up equal are run once. The seed also sets the initialisation
  (scratch) and the batch order.
* **Training.** A plain loop through :class:`~apq_lightning.modules.PredictorModule` (its loss,
  its predictor; Adam with weight decay, per-epoch cosine decay as in the recipes) over
  pre-encoded tensors, one torch thread: a Trainer per run would cost more than the run
  itself on a few hundred samples. ``min_steps`` raises the epochs of small training sets so
  that each run takes at least that many optimizer steps (0 = exactly ``epochs``).

Outputs in ``out``: ``transfer_study.json`` (config, FP predictor, every run, per-cell
mean/std), ``transfer_study.md`` (mean ± std pairwise accuracy over seeds), ``transfer_study.png``
(pairwise accuracy vs. MP training samples) and ``fp_predictor.pt``.

Bad input (a size that is neither a positive integer nor ``all``, an unknown loss, stores that
match no file, a store too small to split, ...) is one line on stderr and exit code 2, before
any training.
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apq_lightning.space import get_space

if TYPE_CHECKING:  # torch and Lightning are imported when the study runs, so ``--help`` is quick
    import torch

    from apq_lightning.modules import PredictorModule
    from apq_lightning.predictor import AccuracyPredictor

INITS: tuple[str, ...] = ("transfer", "scratch")
"""``transfer``: start from the FP predictor; ``scratch``: random init (the comparison of Figure 7)."""
LOSSES: tuple[str, ...] = ("mse", "ranking", "mse+ranking")
"""The losses of :class:`~apq_lightning.modules.PredictorModule`."""
OUTPUTS: tuple[str, ...] = ("transfer_study.json", "transfer_study.md", "transfer_study.png", "fp_predictor.pt")
"""The files a study writes into its ``out`` directory."""

Size = int | str  # a positive number of MP training samples, or "all"


class StudyError(ValueError):
    """Bad input to the study: shown as one line (``transfer-study: ...``), exit code 2."""


# ---- configuration ---------------------------------------------------------------------------
def _dedupe(items: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def parse_sizes(text: str) -> list[Size]:
    """``"50,100,all"`` -> ``[50, 100, "all"]`` (duplicates dropped)."""
    out: list[Size] = []
    for part in (s.strip() for s in str(text).split(",")):
        if not part:
            continue
        if part == "all":
            out.append("all")
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise StudyError(
                f"--sizes: {part!r} is neither a positive integer nor 'all'; allowed: a comma list of "
                "positive integers and 'all', e.g. 50,100,all"
            )
    if not out:
        raise StudyError("--sizes is empty; allowed: a comma list of positive integers and 'all', e.g. 50,100,all")
    return _dedupe(out)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (duplicates dropped: a repeated seed would repeat its runs exactly)."""
    out = []
    for part in (s.strip() for s in str(text).split(",")):
        if not part:
            continue
        try:
            seed = int(part)
        except ValueError:
            seed = -1
        if seed < 0:
            raise StudyError(f"--seeds: {part!r} is not a non-negative integer; allowed: a comma list such as 0,1,2")
        out.append(seed)
    if not out:
        raise StudyError("--seeds is empty; allowed: a comma list of non-negative integers such as 0,1,2")
    return _dedupe(out)


def parse_losses(text: str) -> list[str]:
    """``"mse,ranking"`` -> ``["mse", "ranking"]``; each one of :data:`LOSSES`."""
    out = [s.strip() for s in str(text).split(",") if s.strip()]
    for loss in out:
        if loss not in LOSSES:
            raise StudyError(f"--losses: {loss!r} is not allowed; allowed: {', '.join(LOSSES)}")
    if not out:
        raise StudyError(f"--losses is empty; allowed: a comma list of {', '.join(LOSSES)}")
    return _dedupe(out)


@dataclass
class TransferStudyConfig:
    """Everything that defines a study (the command's options); checked on construction.

    ``sizes``, ``seeds`` and ``losses`` take lists or the command's comma strings. The JSON
    writes them back as comma strings, as the first version of the study (a benchmark script)
    did, so older result files and newer ones read alike.
    """

    fp_stores: list[str]
    mp_stores: list[str]
    out: str
    space: str | None = None
    sizes: list[Size] = field(default_factory=lambda: [50, 100, 200, 400, "all"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    losses: list[str] = field(default_factory=lambda: ["mse", "ranking"])
    epochs: int = 150
    fp_epochs: int | None = None
    min_steps: int = 0
    hidden: int = 400
    num_layers: int = 3
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    test_fraction: float = 0.2
    split_seed: int = 0
    fp_seed: int = 0

    def __post_init__(self) -> None:
        def as_text(v: Any) -> str:
            return v if isinstance(v, str) else ",".join(map(str, v))

        self.fp_stores = [str(s) for s in ([self.fp_stores] if isinstance(self.fp_stores, str) else self.fp_stores)]
        self.mp_stores = [str(s) for s in ([self.mp_stores] if isinstance(self.mp_stores, str) else self.mp_stores)]
        if not self.fp_stores or not self.mp_stores:
            raise StudyError("--fp-stores and --mp-stores each need at least one store file, directory or glob")
        self.sizes = parse_sizes(as_text(self.sizes))
        self.seeds = parse_seeds(as_text(self.seeds))
        self.losses = parse_losses(as_text(self.losses))
        if self.space is not None:
            try:
                self.space = get_space(self.space).name
            except ValueError as err:
                raise StudyError(f"--space: {err}") from None
        for name, low in (("epochs", 1), ("min_steps", 0), ("hidden", 1), ("num_layers", 1), ("batch_size", 1)):
            if int(getattr(self, name)) < low:
                raise StudyError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be an integer >= {low}")
        if self.fp_epochs is not None and self.fp_epochs < 1:
            raise StudyError(f"--fp-epochs {self.fp_epochs}: must be an integer >= 1 (or left out: --epochs)")
        if not self.lr > 0:
            raise StudyError(f"--lr {self.lr}: must be > 0")
        if not self.weight_decay >= 0:
            raise StudyError(f"--weight-decay {self.weight_decay}: must be >= 0")
        if not 0 < self.test_fraction < 1:
            raise StudyError(f"--test-fraction {self.test_fraction}: must be in (0, 1)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TransferStudyConfig:
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in vars(args).items() if k in keys})

    def to_json(self) -> dict[str, Any]:
        """The config as the result JSON stores it (the script's keys and order)."""
        return {
            "fp_stores": self.fp_stores,
            "mp_stores": self.mp_stores,
            "space": self.space,
            "sizes": ",".join(map(str, self.sizes)),
            "seeds": ",".join(map(str, self.seeds)),
            "losses": ",".join(self.losses),
            "epochs": self.epochs,
            "fp_epochs": self.fp_epochs,
            "min_steps": self.min_steps,
            "hidden": self.hidden,
            "num_layers": self.num_layers,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "batch_size": self.batch_size,
            "test_fraction": self.test_fraction,
            "split_seed": self.split_seed,
            "fp_seed": self.fp_seed,
            "out": self.out,
        }


# ---- data ------------------------------------------------------------------------------------
def load_split(
    stores: list[str], space: str | None, quantized: bool, config: TransferStudyConfig, option: str
) -> tuple[str, dict[str, tuple[torch.Tensor, torch.Tensor]], np.ndarray]:
    """``(space, {train, test: (features, accs)}, test genomes)`` of the stores.

    No validation split: the study trains for a fixed budget and never selects on held-out
    data, so every sample outside the test split is training data. Store problems (nothing
    matched, another space, too few samples for a training split) become a :class:`StudyError`
    naming ``option``.
    """
    import torch

    from apq_lightning.data import SubnetSampleDataModule

    try:
        dm = SubnetSampleDataModule(
            stores,
            quantized=quantized,
            space=space,
            val_fraction=0.0,
            test_fraction=config.test_fraction,
            split_seed=config.split_seed,
        )
        dm.setup("fit")
    except ValueError as err:
        raise StudyError(f"{option}: {err}") from None
    out = {}
    for split in ("train", "test"):
        ds = dm.dataset(split)
        x, y = ds.__getitems__(range(len(ds))) if len(ds) else (torch.zeros(0, dm.feature_dim), ds.accs)
        out[split] = (x.float(), y.float())
    return dm.space, out, dm.dataset("test").genomes


def split_id(genomes: np.ndarray, accs: torch.Tensor) -> str:
    """Identity of a test split (its genomes and accuracies), to show that it never changes."""
    h = hashlib.sha1(np.ascontiguousarray(genomes, dtype="<i2").tobytes())
    h.update(accs.numpy().astype("<f4").tobytes())
    return h.hexdigest()[:12]


def resolve_sizes(sizes: Sequence[Size], pool: int) -> tuple[list[tuple[Size, int]], list[str]]:
    """``([(label, n_train)], notes)``: the runs' training-set sizes on a pool of ``pool`` samples.

    A size at or above the pool is the whole pool, i.e. ``all``: demo stores are small, and a
    study recipe written for a larger store should still run there, saying what it did. Sizes
    that end up equal are run once; the result is ordered by ``n_train``.
    """
    runs: list[tuple[Size, int]] = []
    notes: list[str] = []
    for size in sizes:
        if size != "all" and int(size) > pool:
            notes.append(f"--sizes {size} exceeds the MP training split ({pool} samples): run as 'all'")
        label, n = ("all", pool) if size == "all" or int(size) >= pool else (int(size), int(size))
        if all(n != m for _, m in runs):
            runs.append((label, n))
    return sorted(runs, key=lambda r: r[1]), notes


# ---- training --------------------------------------------------------------------------------
def train_predictor(
    module: PredictorModule, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, seed: int
) -> int:
    """Adam + per-epoch cosine decay over ``epochs`` (PredictorModule's recipe); returns the steps."""
    import torch

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


def evaluate(predictor: AccuracyPredictor, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Pairwise accuracy (APQ's metric), Kendall τ-b and RMSE of ``predictor`` on ``(x, y)``."""
    import torch
    from torchmetrics.functional.regression import kendall_rank_corrcoef

    from apq_lightning.metrics import pairwise_accuracy

    predictor.eval()
    with torch.no_grad():
        pred = predictor(x).float()
    tau = kendall_rank_corrcoef(pred, y, variant="b") if len(y) > 1 else torch.tensor(float("nan"))
    return {
        "pairwise_acc": float(pairwise_accuracy(pred, y)),
        "kendall_tau": float(tau),
        "rmse": float(torch.sqrt(torch.mean((pred - y) ** 2))),
    }


def epochs_for(n: int, config: TransferStudyConfig) -> int:
    """``epochs``, raised so that a run on ``n`` samples takes at least ``min_steps`` steps."""
    if not config.min_steps:
        return config.epochs
    return max(config.epochs, math.ceil(config.min_steps / math.ceil(n / config.batch_size)))


# ---- report ----------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(runs: list[dict]) -> list[dict]:
    """One cell per (size, loss, init): mean and std over seeds of every test metric."""
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        cells.setdefault((str(r["size"]), r["loss"], r["init"]), []).append(r)
    out = []
    for (_, loss, init), rs in cells.items():
        cell = {
            "size": rs[0]["size"],
            "loss": loss,
            "init": init,
            "n_runs": len(rs),
            "seeds": [r["seed"] for r in rs],
            "n_train": rs[0]["n_train"],
        }
        for m in ("pairwise_acc", "kendall_tau", "rmse"):
            cell[f"{m}_mean"], cell[f"{m}_std"] = _mean_std([r["test"][m] for r in rs])
        out.append(cell)
    return out


def markdown(cells: list[dict], sizes: list, losses: list[str], info: dict) -> str:
    """The size × (loss, init) table of mean ± std test pairwise accuracy; the best init in bold."""
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
    """Pairwise accuracy vs. MP training samples: one colour per loss, solid = transfer, dashed =
    scratch, ± std bands over seeds; log x when the sizes span a factor of 4 or more."""
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
            ax.plot(
                xs,
                mu,
                linestyle=styles[init],
                marker="o" if init == "transfer" else "s",
                color=color,
                label=f"{init} ({loss})",
            )
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


# ---- the study -------------------------------------------------------------------------------
def _module(config: TransferStudyConfig, space: str, quantized: bool, loss: str, y: torch.Tensor) -> PredictorModule:
    """A fresh predictor module of the study's shape; its bias starts at the training mean."""
    from apq_lightning.modules import PredictorModule

    return PredictorModule(space=space, quantized=quantized, hidden=config.hidden, num_layers=config.num_layers,
                           lr=config.lr, weight_decay=config.weight_decay, loss=loss,
                           base_acc=float(y.double().mean()))


def run_study(config: TransferStudyConfig, progress: bool = True, echo: Callable[[str], None] | None = None) -> dict:
    """Run the study of ``config``, write its outputs (:data:`OUTPUTS`) and return the result JSON.

    One torch thread while it runs (the previous count is restored): the runs are small
    matrix products that extra threads only slow down. ``progress`` shows a tqdm bar over the
    runs on stderr; ``echo`` prints the per-run lines (default: through tqdm, on stdout).
    Raises :class:`StudyError` on bad stores before any training.
    """
    import torch

    import apq_lightning.data  # noqa: F401 (Lightning sets its loggers' levels when first imported)
    import apq_lightning.modules  # noqa: F401

    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out {out}: is a file; allowed: a directory (created when missing)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # The datamodule's "samples: ..." lines go through Lightning's rank-zero logger (under
    # lightning.pytorch or lightning.fabric, whichever was imported last); the study prints its own.
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        return _run(config, out, progress, echo)
    finally:
        torch.set_num_threads(threads)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _run(config: TransferStudyConfig, out: Path, progress: bool, echo: Callable[[str], None] | None) -> dict:
    import torch
    from tqdm.auto import tqdm


    say = echo or tqdm.write
    t0 = time.perf_counter()
    space, fp_data, _ = load_split(config.fp_stores, config.space, False, config, "--fp-stores")
    _, mp_data, test_genomes = load_split(config.mp_stores, space, True, config, "--mp-stores")
    (x_pool, y_pool), (x_test, y_test) = mp_data["train"], mp_data["test"]
    n_mp = len(y_pool) + len(y_test)
    if len(y_test) < 2:
        raise StudyError(
            f"--mp-stores: the MP test split has {len(y_test)} of {n_mp} samples, at least 2 are needed; "
            f"raise --test-fraction (now {config.test_fraction}), change --split-seed or add MP samples"
        )
    test_id = split_id(test_genomes, y_test)
    sizes, notes = resolve_sizes(config.sizes, len(y_pool))
    if len(y_test) < 10:  # demo stores: say why the numbers jump
        pairs = len(y_test) * (len(y_test) - 1) // 2
        notes.append(f"the MP test split has only {len(y_test)} samples ({pairs} pairs): pairwise accuracy is coarse")
    out.mkdir(parents=True, exist_ok=True)
    say(
        f"space {space}: FP train {len(fp_data['train'][1])}, MP train pool {len(y_pool)}, "
        f"MP test {len(y_test)} (split_seed {config.split_seed}, test {test_id})"
    )
    for note in notes:
        say(f"note: {note}")

    # FP predictor, once
    torch.manual_seed(config.fp_seed)
    fp_epochs = config.fp_epochs if config.fp_epochs is not None else config.epochs
    fp_mod = _module(config, space, False, "mse", fp_data["train"][1])
    t = time.perf_counter()
    train_predictor(fp_mod, *fp_data["train"], epochs=fp_epochs, batch_size=config.batch_size, seed=config.fp_seed)
    fp_pred = fp_mod.predictor
    fp_path = fp_pred.save(out / "fp_predictor.pt")
    fp_info = {
        "n_train": len(fp_data["train"][1]),
        "n_test": len(fp_data["test"][1]),
        "epochs": fp_epochs,
        "seconds": round(time.perf_counter() - t, 2),
        "path": str(fp_path),
        "test_fp": evaluate(fp_pred, *fp_data["test"]) if len(fp_data["test"][1]) > 1 else None,
        "test_mp_zero_shot": evaluate(fp_pred, x_test[:, : fp_pred.encoder.fp_dim], y_test),
    }
    say(
        f"FP predictor: {fp_info['n_train']} samples, {fp_epochs} epochs, {fp_info['seconds']} s; on the MP test "
        f"split without bits: pairwise {fp_info['test_mp_zero_shot']['pairwise_acc']:.3f}"
    )

    runs: list[dict] = []
    total = len(config.seeds) * len(sizes) * len(config.losses) * len(INITS)
    bar = tqdm(total=total, desc="transfer study", unit="run", file=sys.stderr, disable=not progress)
    try:
        for seed in config.seeds:
            perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(y_pool)))
            for size, n in sizes:
                idx = perm[:n]
                x_tr, y_tr = x_pool[idx], y_pool[idx]
                train_id = hashlib.sha1(np.sort(idx.numpy()).astype("<i8").tobytes()).hexdigest()[:12]
                epochs = epochs_for(n, config)
                for loss in config.losses:
                    for init in INITS:
                        torch.manual_seed(seed)
                        mod = _module(config, space, True, loss, y_tr)
                        if init == "transfer":
                            mod.predictor.transfer_from(fp_pred)  # regressor bias: the FP predictor's
                        t = time.perf_counter()
                        steps = train_predictor(mod, x_tr, y_tr, epochs=epochs, batch_size=config.batch_size, seed=seed)
                        run = {
                            "size": size,
                            "n_train": n,
                            "train_id": train_id,
                            "seed": seed,
                            "loss": loss,
                            "init": init,
                            "epochs": epochs,
                            "steps": steps,
                            "seconds": round(time.perf_counter() - t, 3),
                            "n_test": len(y_test),
                            "test_id": test_id,
                            "test": evaluate(mod.predictor, x_test, y_test),
                        }
                        runs.append(run)
                        bar.update(1)
                        bar.set_postfix_str(f"{size}/{seed}/{loss}/{init}: {run['test']['pairwise_acc']:.3f}")
                        say(
                            f"  size {size!s:>5} (n={n}) seed {seed} {loss:>11} {init:>8}: pairwise "
                            f"{run['test']['pairwise_acc']:.3f}, tau {run['test']['kendall_tau']:.3f}, "
                            f"rmse {run['test']['rmse']:.4f} ({steps} steps, {run['seconds']:.1f} s)"
                        )
    finally:
        bar.close()

    cells = summarize(runs)
    info = {
        "space": space,
        "seeds": config.seeds,
        "n_test": len(y_test),
        "fp_n_train": fp_info["n_train"],
        "fp_test_pairwise": (fp_info["test_fp"] or fp_info["test_mp_zero_shot"])["pairwise_acc"],
    }
    result = {
        "config": config.to_json(),
        "space": space,
        "fp_stores": config.fp_stores,
        "mp_stores": config.mp_stores,
        "mp_train_pool": len(y_pool),
        "sizes_run": [size for size, _ in sizes],
        "notes": notes,
        "test": {"n": len(y_test), "id": test_id, "split_seed": config.split_seed, "fraction": config.test_fraction},
        "fp_predictor": fp_info,
        "runs": runs,
        "cells": cells,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "transfer_study.json").write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    table = markdown(cells, [size for size, _ in sizes], config.losses, info)
    (out / "transfer_study.md").write_text("# Predictor transfer study\n\n" + table)
    plot(cells, config.losses, info, out / "transfer_study.png")
    say("")
    say(table)
    say(f"wrote {out / 'transfer_study.json'}, .md, .png ({result['seconds']} s)")
    return result


# ---- command line ----------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse whose errors become :class:`StudyError` (one line, exit 2) instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise StudyError(f"{message} (see apq transfer-study --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="apq transfer-study",
        description="Predictor-transfer study (APQ Figure 7): MP predictors trained on growing subsets of the MP "
        "samples, transferred from the FP predictor vs. from scratch, on one fixed held-out MP test split.",
    )
    p.add_argument("--fp-stores", nargs="+", required=True, help="FP sample stores (files, dirs, globs)")
    p.add_argument("--mp-stores", nargs="+", required=True, help="MP sample stores (files, dirs, globs)")
    p.add_argument("--space", default=None, help="search space (default: the first record's)")
    p.add_argument(
        "--sizes",
        default="50,100,200,400,all",
        help="MP training-set sizes, 'all' = whole split; sizes above the split run as 'all'",
    )
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (subset, init and batch order)")
    p.add_argument("--losses", default="mse,ranking", help=f"comma list of {', '.join(LOSSES)}")
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``apq transfer-study ...``: 0 when the study ran, 2 (one line on stderr) on bad input."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except StudyError as err:
        print(f"transfer-study: {err}", file=sys.stderr)
        return 2
    try:
        run_study(TransferStudyConfig.from_args(args), progress=not args.no_progress)
    except StudyError as err:
        print(f"transfer-study: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
