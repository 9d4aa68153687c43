"""Checkpoint files that survive being killed at any moment, and the resume decision.

Lightning's ``TorchCheckpointIO`` saves through an fsspec transaction: the bytes go to a
``tempfile.mkstemp()`` file in ``$TMPDIR`` which is then moved onto the target. A job killed
during a save leaves that temporary behind (in ``/tmp``, under an anonymous name, and a few
hundred MB for a large supernet), one more per kill; when ``$TMPDIR`` is on another filesystem
the "move" is a copy, which a kill can also tear. :class:`AtomicCheckpointIO` writes the
temporary *beside* the target instead (``.last.ckpt.<pid>-<token>.partial``), flushes it to
disk and renames it over the target with ``os.replace`` -- atomic on POSIX and Windows -- so
``last.ckpt`` is always either the previous complete file or the new complete file.
:func:`clean_stale_temporaries` removes the leftovers of killed saves (only files of that name
pattern) when a run starts.

:func:`resume_checkpoint` resolves ``--ckpt_path last`` the way Lightning does (the newest of
every ``ModelCheckpoint`` directory's ``last*.ckpt`` and the ``OnExceptionCheckpoint`` file) and
checks that the file loads, so that a torn or foreign file is reported by name instead of being
loaded into a traceback or replaced by a fresh start.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from apq_lightning.torch_io import read_torch_file

PARTIAL_SUFFIX = ".partial"
_PARTIAL_RE = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.partial$")


def partial_name(target: Path) -> Path:
    """The temporary that :class:`AtomicCheckpointIO` writes for ``target`` (same directory)."""
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def _is_local(path: str | Path) -> bool:
    return type(get_filesystem(str(path))).__name__ == "LocalFileSystem"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic on the local filesystem, with no ``$TMPDIR`` use.

    Remote paths (``s3://``, ...) keep Lightning's own transaction.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_name(target)
        try:
            self._write(checkpoint, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)  # only left when the write itself failed
        _fsync_dir(target.parent)

    def _write(self, checkpoint: dict[str, Any], tmp: Path) -> None:
        """Serialise straight to the temporary (no in-memory copy) and flush it to disk."""
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def checkpoint_dirs(trainer: L.Trainer) -> list[Path]:
    """The local directories the trainer's checkpoint callbacks write to (resolved ones only)."""
    dirs: list[Path] = []
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        d = getattr(cb, "dirpath", None) if isinstance(cb, (ModelCheckpoint, OnExceptionCheckpoint)) else None
        if d and _is_local(d) and Path(d) not in dirs:
            dirs.append(Path(d))
    return dirs


@rank_zero_only
def clean_stale_temporaries(dirs: list[Path]) -> list[Path]:
    """Delete the ``.partial`` temporaries that killed saves left in ``dirs``; returns them.

    Called when a run starts, before it can save: any temporary present then belongs to a dead
    process. Only names of :func:`partial_name`'s pattern are touched.
    """
    removed = []
    for d in dirs:
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if _PARTIAL_RE.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        rank_zero_info(f"removed {len(removed)} partial checkpoint file(s) of interrupted saves: "
                       f"{', '.join(str(p) for p in removed)}")
    return removed


def last_checkpoint_candidates(trainer: L.Trainer) -> list[Path]:
    """What ``ckpt_path="last"`` chooses from, as Lightning's checkpoint connector does: each
    ``OnExceptionCheckpoint``'s file and every ``last*.ckpt`` in a ``ModelCheckpoint``'s directory."""
    found: list[Path] = []
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, OnExceptionCheckpoint):
            found.append(Path(cb.ckpt_path))
        elif isinstance(cb, ModelCheckpoint) and cb.dirpath and Path(cb.dirpath).is_dir():
            # Lightning's rule: a ".ckpt" file whose name starts with "last" (last.ckpt, last-v1.ckpt)
            found += [p for p in Path(cb.dirpath).iterdir() if p.suffix == ".ckpt" and p.name.startswith("last")]
    return sorted({p for p in found if p.is_file()})


def resume_checkpoint(trainer: L.Trainer) -> Path | None:
    """What ``--ckpt_path last`` resumes from, checked: the newest candidate of
    :func:`last_checkpoint_candidates` (``None``: nothing to resume), or a ``ValueError`` naming
    it when it does not load, with the file that deleting it would resume from instead."""
    candidates = sorted(last_checkpoint_candidates(trainer), key=lambda p: p.stat().st_mtime, reverse=True)
    if not candidates:
        return None
    fallback = (f"delete it to resume from {candidates[1]}" if len(candidates) > 1
                else "delete it to start afresh (no other checkpoint to resume from)")
    check_resumable(candidates[0], f"{fallback}, or pass --ckpt_path <another file>")
    return candidates[0]


def check_resumable(path: str | Path, advice: str = "pass --ckpt_path <another file>") -> None:
    """ValueError naming ``path`` and what to do (``advice``), unless it loads as a Lightning
    checkpoint.

    Uses ``mmap`` so that checking a large checkpoint costs little; a file torn by a kill has
    no zip central directory and fails at once.
    """
    try:
        ckpt = read_torch_file(path, "checkpoint", mmap=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} not found; pass --ckpt_path <an existing file>, or 'last'") from None
    except ValueError as err:
        raise ValueError(f"{err}; {advice}") from None
    if "state_dict" not in ckpt or "epoch" not in ckpt:
        raise ValueError(f"checkpoint {path} cannot be read (not a Lightning training checkpoint: no "
                         f"'state_dict'/'epoch'); {advice}")
