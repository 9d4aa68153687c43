"""What a training run was started on, recorded in its checkpoints, so that a resume continues
the same job or refuses by name.

Why: ``fit`` resumes from ``last.ckpt`` in the run directory (``--ckpt_path last``, and with no
``--ckpt_path`` at all once an ``OnExceptionCheckpoint`` is configured). A fit started on other
sample stores, another transfer source or other hyperparameters in the same directory would
otherwise restore the finished run, train 0 epochs and exit 0 -- a predictor that silently never
saw the new samples. The identity holds:

* ``model``: the module's hyperparameters (everything the recipe gave its ``init_args``);
* ``data``: the datamodule's hyperparameters, minus settings that do not change what is learned
  (workers, where the images are cached or found);
* ``stores``: for a datamodule that trains on sample stores (``stores``), each file's name, size
  and SHA-256, so a grown store is a new job (unless the datamodule ``follow``\\s its stores,
  where growing is the job).

:class:`JobRecord` (added to every ``fit`` by the CLI) writes it into each checkpoint;
:func:`check_same_job` compares it with the job about to run. Checkpoints without a record
(written before this existed) are resumed as before.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L

OPERATIONAL_DATA_KEYS = frozenset({"num_workers", "root", "cache_dir", "download", "pin_memory", "follow",
                                   "stores"})
"""Datamodule settings that say *where* or *how fast*, not *what*: a moved archive or another worker
count continues the same job. (``stores`` is compared by content instead.)"""

RECORD_KEY = "JobRecord"


def _plain(value: Any) -> Any:
    """JSON-normal form (tuples as lists, paths and other objects as strings) for comparison."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def store_fingerprint(patterns: list[str]) -> list[dict[str, Any]]:
    """Name, size and SHA-256 (16 hex digits) of every store file the patterns match."""
    from apq_lightning.collection.reading import store_files

    out = []
    for path in store_files(patterns):
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        out.append({"file": str(path), "bytes": Path(path).stat().st_size, "sha256": digest})
    return out


def job_identity(model: L.LightningModule, datamodule: L.LightningDataModule | None) -> dict[str, Any]:
    """The identity of a fit (see the module docstring)."""
    ident: dict[str, Any] = {"model": _plain(dict(getattr(model, "hparams", {}) or {}))}
    if datamodule is not None:
        hp = dict(getattr(datamodule, "hparams", {}) or {})
        ident["data"] = _plain({k: v for k, v in hp.items() if k not in OPERATIONAL_DATA_KEYS})
        stores = getattr(datamodule, "stores", None)
        if stores and not hp.get("follow", False):
            try:
                ident["stores"] = store_fingerprint([str(s) for s in stores])
            except ValueError:
                ident["stores"] = []  # no store yet: the datamodule reports that itself
    return ident


def differences(saved: Mapping[str, Any], now: Mapping[str, Any], limit: int = 3) -> list[str]:
    """Up to ``limit`` readable differences between two identities (``key: then -> now``)."""
    out: list[str] = []
    for part in ("model", "data"):
        a, b = saved.get(part) or {}, now.get(part) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{part}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    a_st, b_st = saved.get("stores"), now.get("stores")
    if a_st is not None and b_st is not None and a_st != b_st:
        before = sum(s["bytes"] for s in a_st)
        after = sum(s["bytes"] for s in b_st)
        out.append(f"stores: {len(a_st)} file(s), {before} bytes then -> {len(b_st)} file(s), {after} bytes now"
                   + (" (same size, other content)" if before == after else ""))
    return out[:limit]


def check_same_job(ckpt: Mapping[str, Any], path: str | Path, now: Mapping[str, Any], run_dir: str | Path) -> None:
    """ValueError naming both jobs and the fix when checkpoint ``path`` was written by another job."""
    saved = ((ckpt.get("callbacks") or {}).get(RECORD_KEY) or {}).get("job")
    if not isinstance(saved, Mapping):
        return  # a checkpoint from before job records: resume as before
    diff = differences(saved, now)
    if diff:
        raise ValueError(
            f"checkpoint {path} is another job than this run ({'; '.join(diff)}); to train this one, give it a "
            f"new --trainer.default_root_dir, or delete {Path(run_dir) / 'checkpoints'} to start over in {run_dir}")


class JobRecord(L.Callback):
    """Writes the run's :func:`job_identity` into every checkpoint (the CLI adds it to ``fit``)."""

    def __init__(self) -> None:
        self.job: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return RECORD_KEY

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.job is None:
            self.job = job_identity(pl_module, getattr(trainer, "datamodule", None))

    def state_dict(self) -> dict[str, Any]:
        return {"job": self.job}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # the resume was checked against this record before fitting (check_same_job)


__all__ = ["JobRecord", "check_same_job", "differences", "job_identity", "store_fingerprint"]
