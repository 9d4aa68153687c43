"""Reading sample stores: whole files or only what was appended since the last read, with the
checks that keep samples of different supernets, spaces or measurements apart.

A reader that follows a growing store (the predictor datamodule while stage 2 still writes)
calls :func:`read_from` with the :class:`StoreCursor` of its previous read and pays only for the
new lines. Every record a reader uses passes :class:`SameOrigin` (one space, one supernet
checkpoint); a run that appends to an existing store first checks each stored record with
:func:`check_same_measurement`. Parsing one line is :mod:`~apq_lightning.collection.record`'s;
writing is :mod:`~apq_lightning.collection.store`'s.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from apq_lightning.collection.record import KINDS, SampleRecord, TornLineWarning, is_torn, parse_line

__all__ = [
    "SameOrigin",
    "StoreCursor",
    "StoreRead",
    "check_same_measurement",
    "read_from",
    "read_samples",
    "store_files",
]


# --------------------------------------------------------------------------------------------
# Reading, from the start or from where the last read stopped
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreCursor:
    """How far one store file has been read (:func:`read_from` continues from here)."""

    offset: int = 0
    line: int = 0
    newline_owed: bool = False  # a last record was read before its newline was written
    inode: int = 0  # a file replaced by another (merge_stores renames over it) is read anew


@dataclass(frozen=True)
class StoreRead:
    """What one :func:`read_from` found: ``(line number, record)`` pairs and where to go on."""

    records: list[tuple[int, SampleRecord]]
    cursor: StoreCursor
    restarted: bool  # the file was replaced or truncated since the cursor: read from its start


def read_from(path: str | os.PathLike[str], cursor: StoreCursor | None = None, follow: bool = False) -> StoreRead:
    """The records appended to ``path`` since ``cursor`` (``None``: the whole file).

    A malformed line raises ``ValueError("file:line: ...")``. The unterminated end of the file
    is, with ``follow=False``, a record (read; the file ends there) or a torn write (skipped
    with a :class:`TornLineWarning`), anything else an error; with ``follow=True`` it is a
    write in progress, left for the next read without a word. The caller keeps the returned
    cursor only once it has used the records, so a failed read is retried from the same place.
    """
    path = Path(path)
    stat = path.stat()
    restarted = cursor is not None and (stat.st_ino != cursor.inode or stat.st_size < cursor.offset)
    if cursor is None or restarted:
        cursor = StoreCursor(inode=stat.st_ino)
    if stat.st_size == cursor.offset:
        return StoreRead([], cursor, restarted)
    with open(path, "rb") as fh:
        fh.seek(cursor.offset)
        data = fh.read()
    consumed, line, owed = 0, cursor.line, False
    if cursor.newline_owed and data.startswith(b"\n"):
        data, consumed = data[1:], 1
    *complete, tail = data.split(b"\n")
    records: list[tuple[int, SampleRecord]] = []
    for raw in complete:
        line += 1
        consumed += len(raw) + 1
        records.append((line, parse_line(raw, f"{path}:{line}")))
    if tail.strip() and not follow:
        if is_torn(tail):
            warnings.warn(
                f"{path}:{line + 1}: skipping a torn last line ({len(tail)} bytes, an interrupted write); "
                f"the next append moves it to {path.name}.torn",
                TornLineWarning,
                stacklevel=2,
            )
        else:  # a complete record without its newline (the file ends there), or an error
            line += 1
            consumed += len(tail)
            owed = True
            records.append((line, parse_line(tail, f"{path}:{line}")))
    next_cursor = replace(cursor, offset=cursor.offset + consumed, line=line, newline_owed=owed)
    return StoreRead(records, next_cursor, restarted)


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
@dataclass
class SameOrigin:
    """Records that may be used together: one space and one supernet checkpoint.

    Each is given (``space_from`` / ``hash_from`` name where, for the messages) or taken from
    the first record checked; any other record is refused naming its file:line and both values,
    so samples of two spaces or two supernets are never mixed silently.
    """

    space: str | None = None
    supernet_hash: str | None = None
    space_from: str = "the requested space"
    hash_from: str = "the requested supernet_hash"

    def check(self, rec: SampleRecord, where: str) -> None:
        if self.space is None:
            self.space, self.space_from = rec.space, f"the first record ({where})"
        if self.supernet_hash is None:
            self.supernet_hash, self.hash_from = rec.supernet_hash, f"the first record ({where})"
        if rec.space != self.space:
            raise ValueError(
                f"{where}: record is for space {rec.space!r}, but {self.space_from} says space {self.space!r}; "
                "keep stores of different spaces apart"
            )
        if rec.supernet_hash != self.supernet_hash:
            raise ValueError(
                f"{where}: record was measured on supernet {rec.supernet_hash!r}, but {self.hash_from} says "
                f"supernet_hash {self.supernet_hash!r}; samples of different supernet checkpoints cannot be mixed"
            )


def check_same_measurement(r: SampleRecord, identity: Mapping[str, Any], output_dir: str | os.PathLike[str]) -> None:
    """Raise unless record ``r`` was measured exactly as a run with ``identity`` measures
    (``{"space", "supernet_hash", "seed", "protocol", "kinds"}``), i.e. may share its store."""

    def refuse(what: str, theirs: Any, ours: Any) -> None:
        raise ValueError(
            f"{output_dir} already holds samples measured with another {what} (index {r.index}: "
            f"{theirs}; this run: {ours}); use another output_dir, or rerun with the settings of "
            "the stored samples"
        )

    if r.space != identity["space"]:
        refuse("space", r.space, identity["space"])
    if r.supernet_hash != identity["supernet_hash"]:
        refuse("supernet checkpoint (supernet_hash)", r.supernet_hash, identity["supernet_hash"])
    if r.seed != identity["seed"]:
        refuse("seed", r.seed, identity["seed"])
    if r.kind not in identity["kinds"]:
        refuse("stage (kind)", r.kind, "/".join(identity["kinds"]))
    ours = identity["protocol"]
    if r.protocol != ours:
        diff = sorted(k for k in set(r.protocol) | set(ours) if r.protocol.get(k) != ours.get(k))
        theirs_txt = json.dumps({k: r.protocol.get(k) for k in diff})
        ours_txt = json.dumps({k: ours.get(k) for k in diff})
        refuse("protocol", theirs_txt, ours_txt)


# --------------------------------------------------------------------------------------------
# Several files
# --------------------------------------------------------------------------------------------
def store_files(paths_or_globs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files, directories (their ``*.jsonl``) and glob patterns into a sorted file list.

    Raises ValueError when a pattern matches nothing, so a typo is not an empty training set.
    """
    items = [paths_or_globs] if isinstance(paths_or_globs, (str, os.PathLike)) else list(paths_or_globs)
    if not items:
        raise ValueError("no sample files given")
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise ValueError(f"sample directory {p} holds no *.jsonl files")
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(m) for m in glob.glob(str(item)) if Path(m).is_file())
            if not found:
                raise ValueError(f"no sample files match {str(item)!r}")
        out.extend(f for f in found if f not in out)
    return out


def read_samples(
    paths_or_globs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    space: str | None = None,
    supernet_hash: str | None = None,
    kinds: Iterable[str] | None = None,
) -> list[SampleRecord]:
    """Every record of the given stores, in file order.

    ``space`` / ``supernet_hash``: the records must all have them; ``None`` takes them from the
    first record (:class:`SameOrigin`). ``kinds`` keeps only those kinds. A malformed line raises
    ``ValueError("file:line: ...")``; a torn last line is skipped with a :class:`TornLineWarning`.
    """
    wanted = None if kinds is None else set(kinds)
    if wanted is not None and not wanted <= set(KINDS):
        raise ValueError(f"kinds {sorted(wanted - set(KINDS))} unknown; allowed: {list(KINDS)}")
    origin = SameOrigin(space, supernet_hash)
    out: list[SampleRecord] = []
    for path in store_files(paths_or_globs):
        for n, rec in read_from(path).records:
            origin.check(rec, f"{path}:{n}")
            if wanted is None or rec.kind in wanted:
                out.append(rec)
    return out
