"""Running the transfer study: every predictor is a :class:`~apq_lightning.modules.PredictorModule`
fitted by a Lightning Trainer of its own, and scored by
:func:`~apq_lightning.metrics.predictor_metrics` on the fixed MP test split.

**Training.** The module's own loss and optimiser over pre-encoded tensors, with APQ's
training (:data:`~apq_lightning.modules.predictor_module.APQ_TRAINING`: one-hot bits, Adam with
weight decay, per-epoch cosine decay, the whole transferred network trained): the study measures
APQ's claim about transfer, in APQ's setting, for a fixed number of epochs (it has no validation
split to stop on). The seed fixes the initialisation (scratch) and the batch order. ``min_steps``
raises the epochs of small training sets so that each run takes at least that many optimizer
steps (0 = exactly ``epochs``). :func:`fit_predictor` also fits with a validation split, a step
budget and early stopping (:class:`StepBudget`), for ``benchmarks/predictor_choices.py``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, Sampler, TensorDataset

from apq_lightning.metrics import predictor_metrics
from apq_lightning.modules import PredictorModule
from apq_lightning.modules.predictor_module import APQ_TRAINING
from apq_lightning.predictor import AccuracyPredictor
from apq_lightning.study.config import INITS, StudyError, TransferStudyConfig
from apq_lightning.study.report import markdown, plot, summarize
from apq_lightning.study.splits import (
    epochs_for,
    load_split,
    resolve_sizes,
    split_id,
    subset_id,
    subset_order,
)


class EpochPermutations(Sampler[int]):
    """A fresh permutation of ``n`` indices per epoch, all drawn from one generator seeded once.

    Why not ``RandomSampler(generator=...)``: it draws one permutation more per epoch than it
    uses, so its epochs after the first differ from the study's first version (a plain loop
    over ``randperm(n).split(batch_size)``), whose numbers the Trainer reproduces with this.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


@dataclass(frozen=True)
class StepBudget:
    """Training length in optimizer steps: validate every ``val_every`` steps and stop after
    ``patience`` validations without a lower ``val/loss`` (Lightning's ``EarlyStopping``), or at
    ``max_steps``; the module restores its best weights. The recipes' numbers."""

    max_steps: int = 2000
    val_every: int = 20
    patience: int = 10

    def trainer_args(self) -> dict:
        """Trainer arguments of this budget (the recipes set the same)."""
        stop = EarlyStopping("val/loss", patience=self.patience, check_on_train_epoch_end=False)
        return {"max_steps": self.max_steps, "max_epochs": -1, "val_check_interval": self.val_every,
                "check_val_every_n_epoch": None, "callbacks": [stop], "num_sanity_val_steps": 0}


def fit_predictor(
    module: PredictorModule, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, seed: int, root: Path,
    val: tuple[torch.Tensor, torch.Tensor] | None = None, budget: StepBudget | None = None,
) -> int:
    """Fit ``module`` on ``(x, y)`` with a Trainer (CPU, no logger, no checkpoints); the batch
    order is a permutation per epoch drawn from ``seed``. ``epochs`` without ``val``; with ``val``
    (features, accuracies) and a ``budget``: steps, validation and early stopping. Returns the
    optimizer steps."""
    data = TensorDataset(x, y)
    order = EpochPermutations(len(data), seed)
    common = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
              "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": root}
    loader = DataLoader(data, batch_size=batch_size, sampler=order)
    if val is None or budget is None:
        trainer = L.Trainer(max_epochs=epochs, limit_val_batches=0, **common)
        trainer.fit(module, loader)
    else:
        trainer = L.Trainer(**budget.trainer_args(), **common)
        trainer.fit(module, loader, DataLoader(TensorDataset(*val), batch_size=max(1, len(val[1]))))
    module.eval()
    return int(trainer.global_step)


def evaluate(predictor: AccuracyPredictor, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """:func:`~apq_lightning.metrics.predictor_metrics` of ``predictor`` on ``(x, y)``."""
    predictor.eval()
    with torch.no_grad():
        return predictor_metrics(predictor(x).float(), y)


def new_module(config: TransferStudyConfig, space: str, quantized: bool, loss: str, y: torch.Tensor) -> PredictorModule:
    """A fresh predictor module of the study's shape and APQ's training; its bias starts at the
    training mean."""
    return PredictorModule(space=space, quantized=quantized, hidden=config.hidden, num_layers=config.num_layers,
                           **{**APQ_TRAINING, "lr": config.lr, "weight_decay": config.weight_decay}, loss=loss,
                           base_acc=float(y.double().mean()))


@contextmanager
def quiet_and_single_threaded() -> Iterator[None]:
    """One torch thread (the runs are small matrix products that extra threads only slow down)
    and Lightning's info lines and hints off (the study prints its own); all restored afterwards.

    The datamodule's "samples: ...", each Trainer's device lines go through Lightning's
    rank-zero logger (under lightning.pytorch or lightning.fabric); its hints (no workers, few
    batches per epoch: on purpose here) are PossibleUserWarnings. Filtering once for the whole
    study, not per Trainer, also lets any other warning show once, not once per run.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PossibleUserWarning)
            yield
    finally:
        torch.set_num_threads(threads)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run_study(config: TransferStudyConfig, progress: bool = True, echo: Callable[[str], None] | None = None) -> dict:
    """Run the study of ``config``, write its outputs (:data:`~apq_lightning.study.config.OUTPUTS`)
    and return the result JSON.

    ``progress`` shows a tqdm bar over the runs on stderr; ``echo`` prints the per-run lines
    (default: through tqdm, on stdout). Raises :class:`StudyError` on bad stores before any
    training.
    """
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out {out}: is a file; allowed: a directory (created when missing)")
    with quiet_and_single_threaded():
        return _run(config, out, progress, echo)


def _fp_predictor(config: TransferStudyConfig, space: str, fp_data: dict, mp_test: tuple, out: Path) -> tuple:
    """The FP predictor (once) and what the result JSON says of it."""
    torch.manual_seed(config.fp_seed)
    fp_epochs = config.fp_epochs if config.fp_epochs is not None else config.epochs
    module = new_module(config, space, False, "mse", fp_data["train"][1])
    t = time.perf_counter()
    fit_predictor(module, *fp_data["train"], epochs=fp_epochs, batch_size=config.batch_size, seed=config.fp_seed,
                  root=out)
    fp_pred = module.predictor
    x_test, y_test = mp_test
    info = {
        "n_train": len(fp_data["train"][1]),
        "n_test": len(fp_data["test"][1]),
        "epochs": fp_epochs,
        "seconds": round(time.perf_counter() - t, 2),
        "path": str(fp_pred.save(out / "fp_predictor.pt")),
        "test_fp": evaluate(fp_pred, *fp_data["test"]) if len(fp_data["test"][1]) > 1 else None,
        "test_mp_zero_shot": evaluate(fp_pred, x_test[:, : fp_pred.encoder.fp_dim], y_test),
    }
    return fp_pred, info


def _run(config: TransferStudyConfig, out: Path, progress: bool, echo: Callable[[str], None] | None) -> dict:
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

    fp_pred, fp_info = _fp_predictor(config, space, fp_data, (x_test, y_test), out)
    say(
        f"FP predictor: {fp_info['n_train']} samples, {fp_info['epochs']} epochs, {fp_info['seconds']} s; on the MP "
        f"test split without bits: pairwise {fp_info['test_mp_zero_shot']['pairwise_acc']:.3f}"
    )

    runs: list[dict] = []
    total = len(config.seeds) * len(sizes) * len(config.losses) * len(INITS)
    bar = tqdm(total=total, desc="transfer study", unit="run", file=sys.stderr, disable=not progress)
    try:
        for seed in config.seeds:
            order = subset_order(seed, len(y_pool))
            for size, n in sizes:
                idx = order[:n]
                x_tr, y_tr = x_pool[torch.from_numpy(idx)], y_pool[torch.from_numpy(idx)]
                epochs = epochs_for(n, config)
                for loss in config.losses:
                    for init in INITS:
                        torch.manual_seed(seed)
                        mod = new_module(config, space, True, loss, y_tr)
                        if init == "transfer":
                            mod.transfer(fp_pred)  # regressor bias: the FP predictor's
                        t = time.perf_counter()
                        steps = fit_predictor(mod, x_tr, y_tr, epochs=epochs, batch_size=config.batch_size,
                                              seed=seed, root=out)
                        run = {
                            "size": size,
                            "n_train": n,
                            "train_id": subset_id(idx),
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
    return _write(config, out, space, sizes, notes, (len(y_pool), len(y_test), test_id), fp_info, runs, t0, say)


def _write(config: TransferStudyConfig, out: Path, space: str, sizes: list, notes: list[str], split: tuple,
           fp_info: dict, runs: list[dict], t0: float, say: Callable[[str], None]) -> dict:
    """The result JSON, the Markdown table and the plot (:mod:`~apq_lightning.study.report`)."""
    pool, n_test, test_id = split
    cells = summarize(runs)
    info = {
        "space": space,
        "seeds": config.seeds,
        "n_test": n_test,
        "fp_n_train": fp_info["n_train"],
        "fp_test_pairwise": (fp_info["test_fp"] or fp_info["test_mp_zero_shot"])["pairwise_acc"],
    }
    result = {
        "config": config.to_json(),
        "space": space,
        "fp_stores": config.fp_stores,
        "mp_stores": config.mp_stores,
        "mp_train_pool": pool,
        "sizes_run": [size for size, _ in sizes],
        "notes": notes,
        "test": {"n": n_test, "id": test_id, "split_seed": config.split_seed, "fraction": config.test_fraction},
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
