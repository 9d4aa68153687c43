"""The LightningCLI behaviour behind ``fit`` / ``validate`` / ``test`` / ``predict``.

Three promises, each kept here rather than in the recipes:

* **One line per user error, exit 2.** jsonargparse reports a bad recipe value as a 20-100
  line tree of union alternatives, and a ``ValueError`` raised while instantiating a class
  comes out as 2-3 chained tracebacks. :func:`run_lightning_cli` catches both at the CLI
  boundary -- parsing, instantiation, and the checks before running; never errors raised
  while training -- and prints the innermost meaningful message with the recipe key it
  belongs to (``fit: model.init_args.lr must be a number in (0, inf), got -0.1``). Set
  ``APQ_DEBUG=1`` to get the full traceback instead.
* **Resume never silently restarts.** ``--ckpt_path last`` (and, for ``fit``, no
  ``--ckpt_path`` when an ``OnExceptionCheckpoint`` is configured, which Lightning treats the
  same) is resolved here the way Lightning does it, and the chosen file must load
  (``torch.load(weights_only=True)``): a torn ``last.ckpt`` is reported by name with what to do.
  An explicit ``--ckpt_path FILE`` is checked before Lightning reads it. Checkpoints are written
  by :class:`~apq_lightning.checkpointing.AtomicCheckpointIO` (added unless the recipe names
  another ``CheckpointIO`` plugin), and temporaries of killed saves are removed at start.
* **Recipes mean what they say.** A model with progressive-shrinking ``phases`` trains for the
  sum of the phases' epochs: ``trainer.max_epochs: null`` (the supernet recipes) is set to that
  sum from the phases actually used, including ones given on the command line. An explicit
  ``trainer.max_epochs`` wins; ``SupernetModule`` warns (``rank_zero_warn``) when it differs.
* **A resume continues the same job.** Every ``fit`` records what it trains on (hyperparameters,
  data settings, the content of its sample stores) in its checkpoints
  (:class:`~apq_lightning.job_identity.JobRecord`); resuming a checkpoint of another job is one
  line naming the differences and the fix, not a silent 0-epoch "fit".
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.cli import LightningCLI

from apq_lightning.checkpointing import (
    AtomicCheckpointIO,
    check_resumable,
    checkpoint_dirs,
    clean_stale_temporaries,
    resume_checkpoint,
)
from apq_lightning.job_identity import JobRecord, check_same_job, job_identity
from apq_lightning.torch_io import read_torch_file

SPECIAL_CKPT_PATHS = ("last", "best", "hpc")
_NOISE = ("Does not validate against any of the Union subtypes", "Problem with given class_path", "Parser key")


class CLIInputError(Exception):
    """A user error found before running: printed as one line, exit code 2."""


class CheckedLightningCLI(LightningCLI):
    """LightningCLI with one-line input errors, checked resumes and phase-derived epochs."""

    # ---- parsing -----------------------------------------------------------------------------
    def parse_arguments(self, parser: Any, args: Any) -> None:
        _as_input_error(_check_config_files, sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)  # ArgumentError propagates (exit_on_error=False)
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        # Before LightningCLI itself torch.loads an explicit file (to read its hyperparameters).
        if ckpt is not None and str(ckpt) not in SPECIAL_CKPT_PATHS and "://" not in str(ckpt):
            _as_input_error(check_resumable, ckpt)

    # ---- instantiation -----------------------------------------------------------------------
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as err:
            if _debug():
                raise
            raise CLIInputError(self._instantiation_message(err)) from None

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, with :class:`AtomicCheckpointIO` unless the recipe chose a CheckpointIO."""
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "fit" and not any(isinstance(cb, JobRecord) for cb in trainer.callbacks):
            trainer.callbacks.append(JobRecord())  # what this fit is, in every checkpoint it writes
        return trainer

    def _instantiation_message(self, err: BaseException) -> str:
        """Innermost message, prefixed with the recipe key (``model.init_args.lr``) where known."""
        text = innermost_message(err)
        if isinstance(err, MisconfigurationException):
            return f"trainer: {text}"
        class_path = _given_class_path(err)
        sub = self.config.get("subcommand")
        section = self.config[sub] if sub else self.config
        for group in ("model", "data"):
            node = section.get(group)
            if node is not None and class_path is not None and node.get("class_path") == class_path:
                return _qualify(text, group, list((node.get("init_args") or {}).keys()))
        return f"{class_path}: {text}" if class_path else text

    # ---- before running ----------------------------------------------------------------------
    def before_fit(self) -> None:
        _as_input_error(self._derive_max_epochs)
        clean_stale_temporaries(checkpoint_dirs(self.trainer))
        _as_input_error(self._resolve_last, "fit")
        _as_input_error(self._check_same_job)

    def before_validate(self) -> None:
        _as_input_error(self._resolve_last, "validate")

    def before_test(self) -> None:
        _as_input_error(self._resolve_last, "test")

    def before_predict(self) -> None:
        _as_input_error(self._resolve_last, "predict")

    def _derive_max_epochs(self) -> None:
        """``trainer.max_epochs: null`` + a model with phases: train exactly the phases' epochs."""
        total = getattr(self.model, "total_phase_epochs", None)
        if total is None or self.trainer.fast_dev_run:
            return
        if self._get(self.config, "trainer", default={}).get("max_epochs") is None:
            self.trainer.fit_loop.max_epochs = int(total)

    def _check_same_job(self) -> None:
        """A fit that resumes a checkpoint must be the job that wrote it (see job_identity)."""
        ckpt = self.config_init["fit"].get("ckpt_path")
        if ckpt is None or str(ckpt) in SPECIAL_CKPT_PATHS or "://" in str(ckpt):
            return
        saved = read_torch_file(ckpt, "checkpoint", mmap=True)
        check_same_job(saved, ckpt, job_identity(self.model, self.datamodule), self.trainer.default_root_dir)

    def _resolve_last(self, subcommand: str) -> None:
        """Resolve ``last`` ourselves, check the file loads, and hand Lightning that exact path."""
        cfg = self.config_init[subcommand]
        ckpt = cfg.get("ckpt_path")
        auto = (ckpt is None and subcommand == "fit"
                and any(isinstance(cb, OnExceptionCheckpoint) for cb in self.trainer.callbacks))
        if ckpt != "last" and not auto:
            return
        path = resume_checkpoint(self.trainer)  # checked: ValueError naming a torn file
        if path is not None:  # None: nothing to resume, a first run (Lightning says so itself)
            cfg["ckpt_path"] = str(path)


def _check_config_files(args: Any) -> None:
    """A ``--config`` file that is not text (jsonargparse raises a bare UnicodeDecodeError)."""
    if not isinstance(args, (list, tuple)):
        return
    for i, arg in enumerate(args):
        arg = str(arg)
        path = args[i + 1] if arg in ("-c", "--config") and i + 1 < len(args) else None
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
        if path is None or not os.path.isfile(str(path)):
            continue
        try:
            with open(str(path), encoding="utf-8") as f:
                f.read()
        except UnicodeDecodeError as err:
            raise ValueError(
                f"recipe {path} is not a text (UTF-8 YAML) file: {err.reason} at byte {err.start}"
            ) from None


def _debug() -> bool:
    return os.environ.get("APQ_DEBUG", "") not in ("", "0")


def _as_input_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a check; its ``ValueError`` becomes a :class:`CLIInputError` (one line, exit 2)."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        if _debug():
            raise
        raise CLIInputError(str(err)) from None


# ---- messages ---------------------------------------------------------------------------------
def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and its causes, innermost last; stops where a message was raised ``from None``."""
    out: list[BaseException] = []
    x: BaseException | None = err
    while x is not None and x not in out:
        out.append(x)
        x = x.__cause__ if x.__cause__ is not None else (None if x.__suppress_context__ else x.__context__)
    return out


def innermost_message(err: BaseException) -> str:
    """The deepest message of ``err``'s chain that is not jsonargparse's union bookkeeping."""
    for x in reversed(_chain(err)):
        text = str(x).strip()
        if isinstance(x, KeyError) and x.args:
            text = str(x.args[0])
        if text and not text.startswith(_NOISE) and not text.startswith("- "):
            return _tidy(text)
    return _tidy(str(err))


def _tidy(text: str) -> str:
    """One line; jsonargparse's ``Expected a <class 'int'>. Got value: x`` as ``expected int, got 'x'``."""
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    text = re.sub(r"(?:typing\.)?Literal\[(.*?)\]", r"one of \1", text)
    m = re.match(r"Expected a (.+?)\. Got value: (.*)$", text.splitlines()[0])
    if m:
        return f"expected {m.group(1)}, got {m.group(2)!r}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines[:2]) if lines else text


def _given_class_path(err: BaseException) -> str | None:
    for x in _chain(err):
        m = re.search(r"class_path='([\w.]+)'", str(x))
        if m:
            return m.group(1)
    return None


def _qualify(text: str, group: str, init_args: list[str]) -> str:
    """``lr must be ...`` -> ``model.init_args.lr must be ...`` when it starts with an argument."""
    m = re.match(r"([A-Za-z_]\w*)", text)
    if m and m.group(1) in init_args:
        return f"{group}.init_args.{text}"
    return f"{group}.init_args: {text}"


def parse_error_message(err: BaseException) -> str:
    """One line for a jsonargparse parse error: the recipe key path and the innermost reason."""
    texts = [str(x) for x in _chain(err)]
    keys: list[str] = []
    for t in texts:
        m = re.match(r'Parser key "([^"]+)"', t)
        if m and (not keys or keys[-1] != m.group(1)):
            keys.append(m.group(1))
    class_paths = [m.group(1) for t in texts for m in [re.match(r"Problem with given class_path '([\w.]+)'", t)] if m]
    reason = innermost_message(err)
    unknown = re.match(r"Option '(\w+)' is not accepted", reason)
    path = _key_path(keys)
    if unknown:
        path = _key_path([*keys, unknown.group(1)])
        owner = f" of {class_paths[-1]}" if class_paths else ""
        return f"{path}: unknown key; it is not a parameter{owner}"
    return f"{path}: {reason}" if path else reason


def _key_path(keys: list[str]) -> str:
    """``["model", "phases", "epochs"]`` -> ``model.init_args.phases.epochs`` (subclass mode)."""
    if not keys:
        return ""
    head, rest = keys[0], keys[1:]
    if head in ("model", "data") and rest:
        head += ".init_args"
    return ".".join([head, *rest])


def run_lightning_cli(make_cli: Callable[[], Any], argv: list[str] | None) -> None:
    """Build (and so run) the CLI; user errors become one line on stderr and ``SystemExit(2)``."""
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args and not args[0].startswith("-") else "apq"
    try:
        make_cli()
    except CLIInputError as err:
        _fail(command, str(err))
    except argparse.ArgumentError as err:
        if _debug():
            raise
        _fail(command, parse_error_message(err))


def _fail(command: str, message: str) -> None:
    print(f"{command}: {message}", file=sys.stderr)
    raise SystemExit(2)


def _takes_argument(class_path: str, name: str) -> bool:
    """Whether ``class_path``'s ``__init__`` accepts ``name`` (or any keyword)."""
    import importlib
    import inspect

    module, _, attr = class_path.rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module), attr).__init__).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _num_classes_of(datamodule: Any) -> int | None:
    return getattr(datamodule, "num_classes", None)


def _phase_epochs(phases: Any) -> None:
    """``${phase_epochs:...}`` in recipes written before ``trainer.max_epochs: null``: resolves to
    null, i.e. "the sum of the phases", which the CLI derives from the phases actually used
    (the interpolation was resolved at parse time, from the recipe's phases only)."""
    return None


class APQLightningCLI(CheckedLightningCLI):
    """The project's LightningCLI: sizes the model's classifier from the datamodule.

    Both the model and the datamodule come from the recipe (``class_path``): image data for the
    supernet and finetuning, subnet indices for collection, sample stores for the predictors.
    Where the datamodule knows its ``num_classes`` and the model takes one, the model gets it;
    other pairs ignore the link.
    """

    def __init__(self, *args: Any, instantiate: bool = True, **kwargs: Any) -> None:
        self._instantiate = instantiate
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data", "model.init_args.num_classes", compute_fn=_num_classes_of,
                              apply_on="instantiate")

    def instantiate_classes(self) -> None:
        if self._instantiate:
            super().instantiate_classes()

    def _parse_ckpt_path(self) -> None:
        """``test/validate/predict --ckpt_path FILE`` re-read the model's hyperparameters from the
        file (LightningCLI); drop the link target ``num_classes`` where the model's class does not
        take it (a predictor): the saved hyperparameters carry it as ``None``, and passing it back
        made ``apq test`` on a predictor checkpoint fail with an unexpected keyword argument."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt or not os.path.isfile(str(ckpt)):
            return
        hparams = dict(read_torch_file(str(ckpt), "checkpoint", mmap=True).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        class_path = hparams.pop("_class_path", None)
        if not hparams or class_path is None:
            return super()._parse_ckpt_path()
        if hparams.get("num_classes") is None and not _takes_argument(class_path, "num_classes"):
            hparams.pop("num_classes", None)
        model = {"class_path": class_path, "dict_kwargs": hparams}
        self.config = self.parser.parse_object({sub: {"model": model}}, self.config)


def build_cli(args: list[str] | None, *, run: bool = True, instantiate: bool = True) -> APQLightningCLI:
    """The one way a recipe becomes model + datamodule + trainer (``apq fit/...`` and ``apq final``).

    ``run=False`` builds without running a subcommand (``args`` then start with ``--config``);
    ``instantiate=False`` only parses: a cheap check of a recipe's values before hours of other
    work. omegaconf+ parser mode resolves ``${...}`` after the command line, so
    ``--trainer.default_root_dir`` moves every output a recipe derives from it. User errors
    raise :class:`CLIInputError` or ``argparse.ArgumentError`` (see :func:`run_lightning_cli`).
    """
    import warnings

    import lightning as L
    from jsonargparse import set_parsing_settings
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("phase_epochs"):
        OmegaConf.register_resolver("phase_epochs", _phase_epochs)  # omegaconf >= 2.4
    # Recipes write absolute keys (${trainer.default_root_dir}); relative to the subcommand here.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    with warnings.catch_warnings():  # args= on purpose when a command builds a recipe from its own options
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return APQLightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                               subclass_mode_data=True, run=run, args=args, instantiate=instantiate,
                               parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": False},
                               save_config_kwargs={"overwrite": True})
