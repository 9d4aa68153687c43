"""Stage 7: the final model of a searched subnet -- finetune, test, export, check, report.

:func:`run_final` takes a subnet (the ``best`` of a search result, or a plain subnet JSON), and

1. checks the inputs before any work (files, the subnet's space against the supernet's, bits);
2. builds the finetune recipe (``recipes/finetune*.yaml``, LightningCLI with ``run=False``) with
   ``--model.subnet``, ``--model.supernet_ckpt`` and ``--trainer.default_root_dir OUT`` set, plus
   any recipe overrides (``--data.root``, ``--trainer.max_epochs`` ...);
3. QAT-finetunes it (:class:`~apq_lightning.modules.QATModule`), resuming from
   ``OUT/checkpoints/last.ckpt`` when an earlier run was interrupted;
4. evaluates top-1 on the **test** split (the only stage that touches it, docs/design.md §11);
5. exports ``OUT/quantized.pt`` (:func:`~apq_lightning.quant.save_quantized`: state dict + subnet
   JSON, ``weights_only``-loadable), reloads it with :func:`~apq_lightning.quant.load_quantized` and
   checks that it gives the same outputs, then writes ``OUT/model.onnx`` (QuantizeLinear /
   DequantizeLinear pairs) and checks it with ONNX Runtime against PyTorch on a test batch;
6. prices the subnet on the hardware (latency, energy, BitOps, size) and writes the report row:
   ``OUT/final.json`` and one row of ``report.csv`` / ``report.md`` (default: beside ``OUT``).

A run whose ``final.json`` exists for the same inputs is not repeated (``force`` redoes it).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from apq_lightning.final.report import append_row
from apq_lightning.hardware import get_cost_model
from apq_lightning.outputs import write_json
from apq_lightning.space import Subnet, get_space, save_subnets
from apq_lightning.supernet_io import supernet_contents
from apq_lightning.torch_io import read_torch_file

RECIPE_GROUPS: tuple[str, ...] = ("--trainer.", "--model.", "--data.", "--seed_everything")
"""Prefixes of the recipe overrides ``final`` passes through to the finetune recipe."""

_SET_BY_FINAL = ("--model.subnet", "--model.supernet_ckpt", "--trainer.default_root_dir")


class FinalInputError(ValueError):
    """Bad input found before (or instead of) training: one line, exit code 2."""


# ---- what to finetune -----------------------------------------------------------------------------
@dataclass(frozen=True)
class FinalTarget:
    """The subnet to finalise and what the search said about it."""

    subnet: dict[str, Any]  # subnet JSON (validated against the supernet's space by run_final)
    label: str
    source: str | None = None
    predicted_acc: float | None = None
    search_wall_time_s: float | None = None
    hardware: str | None = None  # the search's cost model
    budget: dict[str, float] | None = None


def _read_json(path: str | Path, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise FinalInputError(f"{what} not found: {p}" if not p.exists() else f"{what} {p} is not a file")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FinalInputError(f"{what} {p} is not valid JSON ({str(err).splitlines()[0]})") from None


def read_search(path: str | Path, budget_index: int | None = None, label: str | None = None) -> FinalTarget:
    """The ``best`` subnet of a search result (``search --out``, ``EvolutionSearch``'s files);
    a result of several budgets (``{"searches": [...]}``) needs ``budget_index``."""
    doc = _read_json(path, "search result")
    if isinstance(doc, dict) and isinstance(doc.get("searches"), list):
        n = len(doc["searches"])
        if budget_index is None or not 0 <= budget_index < n:
            got = "" if budget_index is None else f", got {budget_index}"
            raise FinalInputError(f"search result {path} holds {n} searches (one per budget); pick one with "
                                  f"--budget-index 0..{n - 1}{got}")
        doc = doc["searches"][budget_index]
    elif budget_index not in (None, 0):
        raise FinalInputError(f"search result {path} holds one search; --budget-index {budget_index} does not exist")
    if not isinstance(doc, dict) or not isinstance(doc.get("best"), dict) or "subnet" not in doc["best"]:
        keys = sorted(doc)[:8] if isinstance(doc, dict) else type(doc).__name__
        raise FinalInputError(f"search result {path} has no 'best' entry with a 'subnet' (found {keys}); pass a "
                              f"search output (search --out) or a plain subnet JSON with --subnet")
    best, settings = doc["best"], doc.get("settings") or {}
    acc = best.get("predicted_acc")
    wall = doc.get("wall_time_s")
    return FinalTarget(subnet=best["subnet"], label=label or Path(path).stem, source=str(path),
                       predicted_acc=None if acc is None else float(acc),
                       search_wall_time_s=None if wall is None else float(wall),
                       hardware=settings.get("hardware"), budget=settings.get("constraint"))


def read_subnet(path: str | Path, label: str | None = None) -> FinalTarget:
    """A plain subnet JSON (docs/design.md §2.3, or the APQ reference spec)."""
    doc = _read_json(path, "subnet JSON")
    if isinstance(doc, dict) and "best" in doc:
        raise FinalInputError(f"{path} is a search result, not a subnet: pass it with --search")
    if not isinstance(doc, dict):
        raise FinalInputError(f"subnet JSON {path} must hold one JSON object, found {type(doc).__name__}")
    return FinalTarget(subnet=doc, label=label or Path(path).stem, source=str(path))


def supernet_space(path: str | Path) -> tuple[str, int]:
    """(space, num_classes) of a stage-1 checkpoint, read without building the supernet."""
    p = Path(path)
    if not p.is_file():
        raise FinalInputError(f"supernet checkpoint not found: {p}")
    try:
        ckpt = read_torch_file(p, "supernet checkpoint", mmap=True)
    except ValueError as err:
        raise FinalInputError(str(err)) from None
    h, _, _ = supernet_contents(ckpt)
    if not isinstance(h, dict) or "space" not in h or "num_classes" not in h:
        raise FinalInputError(f"supernet checkpoint {p} is not a SupernetModule checkpoint nor a supernet weights "
                              f"file (no 'space' / 'num_classes')")
    return str(h["space"]), int(h["num_classes"])


def resolve_subnet(target: FinalTarget, space: str, supernet: str | Path) -> Subnet:
    """The target's subnet, checked against the supernet's space (one line naming both)."""
    own = target.subnet.get("space")
    if own is not None and own != get_space(space).name:
        raise FinalInputError(f"the subnet ({target.source or 'given'}) is of space {own!r}, but the supernet "
                              f"checkpoint {supernet} is of space {space!r}; finalise subnets of the supernet's space")
    try:
        return Subnet.from_dict(target.subnet, space)
    except ValueError as err:
        raise FinalInputError(f"subnet ({target.source or 'given'}): {err}") from None


# ---- how ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinalSettings:
    """Where and how to finetune; ``overrides`` are recipe options (``--data.root X`` ...)."""

    supernet: str
    recipe: str
    out: Path
    overrides: tuple[str, ...] = ()
    weights: Literal["last", "best"] = "last"
    hardware: str | None = None  # default: the search's, else bitfusion
    onnx: bool = True
    opset: int = 13
    onnx_atol: float = 1e-4
    onnx_rtol: float = 0.05
    check_images: int = 64
    table: Path | None = None  # report stem; default OUT/../report
    force: bool = False

    def __post_init__(self) -> None:
        if self.weights not in ("last", "best"):
            raise FinalInputError(f"weights={self.weights!r}; allowed: last, best")
        bad = [a for a in self.overrides if a.startswith("--") and not a.startswith(RECIPE_GROUPS)]
        if bad:
            raise FinalInputError(f"unknown option {bad[0]}; recipe values are --trainer.*, --model.*, --data.* "
                                  f"(see apq final --help)")
        taken = [a for a in self.overrides if a.split("=", 1)[0] in _SET_BY_FINAL]
        if taken:
            raise FinalInputError(f"{taken[0].split('=', 1)[0]} is set by final itself; use --subnet/--search, "
                                  f"--supernet and --out")

    @property
    def table_stem(self) -> Path:
        return Path(self.table) if self.table is not None else Path(self.out).parent / "report"

    def gives(self, option: str) -> bool:
        return any(a.split("=", 1)[0] == option for a in self.overrides)


def fingerprint(subnet: Subnet, settings: FinalSettings) -> dict[str, Any]:
    """What decides a final run's result: a finished run with the same fingerprint is reused."""
    return {"subnet": subnet.to_dict(), "supernet": str(Path(settings.supernet).resolve()),
            "recipe": str(Path(settings.recipe).resolve()), "overrides": list(settings.overrides),
            "weights": settings.weights}


# ---- the recipe, in process ---------------------------------------------------------------------
def build_recipe(args: Sequence[str], instantiate: bool = True) -> Any:
    """Model, datamodule and trainer of a recipe + overrides, through the project's checked
    LightningCLI (one-line errors; AtomicCheckpointIO), without running a subcommand.
    ``instantiate=False`` only parses: a cheap check of the recipe values (unknown keys, types)
    before hours of other work."""
    from apq_lightning.checked_cli import CLIInputError, build_cli, parse_error_message

    try:
        return build_cli(list(args), run=False, instantiate=instantiate)
    except CLIInputError as err:
        raise FinalInputError(str(err)) from None
    except argparse.ArgumentError as err:
        raise FinalInputError(parse_error_message(err)) from None


def check_recipe(settings: FinalSettings) -> None:
    """Parse the recipe with ``settings``' overrides (no model, no data): bad values fail now."""
    build_recipe(_recipe_args(Path(settings.out) / "subnet.json", settings), instantiate=False)


def _recipe_args(subnet_path: Path, settings: FinalSettings) -> list[str]:
    args = ["--config", str(settings.recipe), "--trainer.default_root_dir", str(settings.out),
            "--model.subnet", str(subnet_path), "--model.supernet_ckpt", str(settings.supernet)]
    if not settings.gives("--model.policy"):
        args += ["--model.policy", "null"]  # the searched bits, not the recipe's demo policy
    return args + list(settings.overrides)


# ---- the run ----------------------------------------------------------------------------------------
def check_deployable(subnet: Subnet, space: str, hardware: str, budget: dict[str, float] | None) -> None:
    """Before any training: the subnet must run on the report's hardware, and meet ``budget``
    (the search's constraint) when one is given; FinalInputError naming the numbers otherwise.
    (A subnet BitFusion cannot run used to be finetuned for minutes and reported at ``inf`` ms.)"""
    costs = get_cost_model(hardware, get_space(space)).costs(subnet)
    if not costs.get("feasible", True):
        reason = costs.get("reason") or "no unit for one of its layers"
        raise FinalInputError(f"the subnet cannot run on {hardware} ({reason}); "
                              f"pick a runnable subnet (search with --hardware {hardware}) or another --hardware")
    over = [f"{k} {costs[k]:.4g} > {v:g}" for k, v in (budget or {}).items()
            if k in costs and costs[k] is not None and float(costs[k]) > float(v) * (1 + 1e-6)]
    if over:
        raise FinalInputError(f"the subnet is over the search's budget on {hardware} ({', '.join(over)}); "
                              f"finetune a subnet that meets it, or pass the hardware it was searched on")


def run_final(target: FinalTarget, settings: FinalSettings, log: Callable[[str], None] = print,
              enforce_budget: bool = True) -> dict[str, Any]:
    """Finetune, test, export and report one subnet (module doc); returns the report row.

    Raises :class:`FinalInputError` for bad input (before training where it can be known): among
    them a subnet the hardware cannot run, and with ``enforce_budget`` one over its target's budget
    (baselines finetune their rows whatever the budget: their reports mark it)."""
    for path, what in ((settings.recipe, "recipe"), (settings.supernet, "supernet checkpoint")):
        if not Path(path).is_file():
            raise FinalInputError(f"{what} not found: {path}")
    space, _ = supernet_space(settings.supernet)
    subnet = resolve_subnet(target, space, settings.supernet)
    if subnet.bits is None and not settings.gives("--model.policy"):
        raise FinalInputError("the subnet has no bit policy ('bits'); search with an MP predictor, or give one with "
                              "--model.policy uniform8 (the final model is quantized)")
    if subnet.bits is not None:
        check_deployable(subnet, space, settings.hardware or target.hardware or "bitfusion",
                         target.budget if enforce_budget else None)
    out = Path(settings.out)
    inputs = fingerprint(subnet, settings)
    done = _finished(out, inputs, settings.force, settings.onnx)
    if done is not None:
        append_row(settings.table_stem, done)
        log(f"final: {out} is already done for this subnet and recipe (top-1 {done['top1']:.4f}); --force redoes it")
        return done

    subnet_path = out / "subnet.json"
    save_subnets(subnet_path, [subnet])
    cli = build_recipe(_recipe_args(subnet_path, settings))
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    if settings.weights == "best" and getattr(trainer.checkpoint_callback, "monitor", None) is None:
        raise FinalInputError("--weights best needs a ModelCheckpoint with a monitor (val/acc) in the recipe; use "
                              "--weights last")
    resume = _resume(trainer, settings.force)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=resume)
    fit_s = time.perf_counter() - start
    if "val/acc" not in trainer.callback_metrics:  # resumed after training had ended: measure it again
        trainer.validate(model, datamodule=dm, verbose=False)
    val_acc = trainer.callback_metrics.get("val/acc")
    if settings.weights == "best" and not getattr(trainer.checkpoint_callback, "best_model_path", ""):
        raise FinalInputError("--weights best: no best checkpoint was saved (no validation ran); use --weights last")
    tested = trainer.test(model, datamodule=dm, ckpt_path="best" if settings.weights == "best" else None,
                          verbose=False)
    if not trainer.is_global_zero:
        return {}
    test_acc = float(tested[0]["test/acc"])
    row = _row(target, settings, subnet, space, model, test_acc, val_acc, fit_s, trainer)
    row.update(_export(model, dm, out, settings, subnet, log))
    row["inputs"] = inputs
    write_json(out / "final.json", row)
    csv_path, md_path = append_row(settings.table_stem, row)
    log(_summary(row) + f"\nfinal: wrote {out / 'final.json'}, {md_path} and {csv_path}")
    return row


def _finished(out: Path, inputs: dict[str, Any], force: bool, want_onnx: bool) -> dict[str, Any] | None:
    """The stored row of a finished run with these inputs; an error for a run of other inputs.
    A run without its ONNX file is redone when one is wanted now (training resumes at its end)."""
    report = out / "final.json"
    if force or not report.is_file():
        return None
    try:
        done = json.loads(report.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # unreadable: redo it
    before = done.get("inputs") or {}
    if before != inputs:
        differ = [k for k in inputs if before.get(k) != inputs[k]]
        raise FinalInputError(f"{out} already holds a final run with another {', '.join(differ) or 'input'} (see its "
                              f"final.json); choose another --out, or pass --force to redo it there")
    if want_onnx and not done.get("onnx"):
        return None
    needed = [done.get("quantized")] + ([done.get("onnx")] if want_onnx else [])
    return done if all(p and Path(p).is_file() for p in needed) else None


def _resume(trainer: Any, force: bool) -> str | None:
    """The interrupted run's checkpoint to continue from (checked), or None for a fresh start."""
    from apq_lightning.checkpointing import checkpoint_dirs, clean_stale_temporaries, resume_checkpoint

    clean_stale_temporaries(checkpoint_dirs(trainer))
    if force:
        return None
    try:
        path = resume_checkpoint(trainer)
    except ValueError as err:
        raise FinalInputError(str(err)) from None
    return None if path is None else str(path)


def _row(target: FinalTarget, settings: FinalSettings, subnet: Subnet, space: str, model: Any, test_acc: float,
         val_acc: Any, fit_s: float, trainer: Any) -> dict[str, Any]:
    hardware = settings.hardware or target.hardware or "bitfusion"
    costs = get_cost_model(hardware, get_space(space)).costs(subnet)
    pred = target.predicted_acc
    prep = getattr(model, "prep_metrics", {}) or {}
    return {
        "method": target.label, "top1": test_acc, "predicted_acc": pred,
        "prediction_error": None if pred is None else pred - test_acc,
        "latency_ms": _num(costs.get("latency_ms")), "energy_mJ": _num(costs.get("energy_mJ")),
        "bitops": int(costs["bitops"]), "size_bytes": _num(costs.get("size_bytes")),
        "feasible": bool(costs.get("feasible", True)),
        "search_wall_time_s": target.search_wall_time_s, "finetune_wall_time_s": fit_s,
        "epochs": int(trainer.current_epoch), "weights": settings.weights,
        "fp_acc": prep.get("fp/acc"), "ptq_acc": prep.get("ptq/acc"),
        "val_acc": None if val_acc is None else float(val_acc),
        "space": space, "hardware": hardware, "budget": target.budget,
        "subnet_key": subnet.key(), "subnet": subnet.to_dict(), "source": target.source,
        "supernet": str(settings.supernet), "recipe": str(settings.recipe), "run": str(settings.out),
    }


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def _export(module: Any, dm: Any, out: Path, settings: FinalSettings, subnet: Subnet,
            log: Callable[[str], None]) -> dict[str, Any]:
    """quantized.pt (+ reload check) and model.onnx (+ ONNX Runtime check) of the finetuned model."""
    from apq_lightning.quant import load_quantized

    path = module.save_quantized(out / "quantized.pt")
    batch = next(iter(dm.test_dataloader()))[0][: settings.check_images].cpu().float()
    # In the reloaded model's memory format: a channels_last conv sums in another order, and a
    # quantizer turns that 1e-7 into a step (1e-4 seen) when a value sits on a rounding edge.
    live = copy.deepcopy(module.model).cpu().eval().to(memory_format=torch.contiguous_format)
    loaded = load_quantized(path)
    with torch.no_grad():
        reload_diff = float((loaded(batch) - live(batch)).abs().max())
    if reload_diff > 1e-5:
        raise RuntimeError(f"{path} reloads with different outputs (max abs diff {reload_diff:.3g}): the exported "
                           f"state dict does not describe the finetuned model")
    result: dict[str, Any] = {"quantized": str(path), "reload_max_abs_diff": reload_diff, "onnx": None,
                              "onnx_max_abs_diff": None, "onnx_ok": None}
    if not settings.onnx:
        return result
    from apq_lightning.quant.onnx_export import OnnxExportError, check_onnx, export_onnx

    try:
        onnx_path = export_onnx(loaded, out / "model.onnx", batch[:2], settings.opset,
                                metadata={"subnet": subnet.to_dict(), "source": "apq-lightning final"})
        check = check_onnx(onnx_path, loaded, batch, settings.onnx_atol, settings.onnx_rtol)
    except OnnxExportError as err:
        log(f"final: {err}")
        return {**result, "onnx_ok": False, "onnx_error": str(err)}
    log(f"final: {check}")
    return {**result, "onnx": str(onnx_path), "onnx_max_abs_diff": check.max_abs_diff,
            "onnx_ok": check.ok, "onnx_check": check.to_dict()}


def _summary(row: dict[str, Any]) -> str:
    pred = "-" if row["predicted_acc"] is None else f"{row['predicted_acc']:.4f}"
    lat = "-" if row["latency_ms"] is None else f"{row['latency_ms']:.4g} ms"
    en = "-" if row["energy_mJ"] is None else f"{row['energy_mJ']:.4g} mJ"
    return (f"final {row['method']} ({row['space']}, {row['subnet_key']}): top-1 {row['top1']:.4f} on the test split "
            f"(predicted {pred}); {row['hardware']}: {lat}, {en}, {row['bitops'] / 1e9:.3f} GBitOps, "
            f"{row['size_bytes'] / 1e6:.3f} MB")


__all__ = ["FinalInputError", "FinalSettings", "FinalTarget", "build_recipe", "check_recipe", "fingerprint",
           "read_search", "read_subnet", "resolve_subnet", "run_final", "supernet_space"]
