"""The sample store: append-only JSONL files of measured ``(subnet, accuracy)`` pairs.

Stages 2 and 4 spend most of the pipeline's compute producing these records and stages 3 and 5
train predictors on them, so the format favours *never losing a finished sample*. The store is
three modules of :mod:`apq_lightning.collection`, one job each: :mod:`~.record` (one record and
one line: fields, validation, parsing), :mod:`~.reading` (whole or incremental reads, the origin
checks, expanding file lists) and this one -- the files: naming, durable appends, repair,
merging. The collection writes through them and the predictor datamodule
(:mod:`apq_lightning.data.samples`) reads through them; they import nothing from
:mod:`apq_lightning.data` (the arrow points one way: ``data`` -> ``collection``).

* one JSON object per line, written with one ``write`` followed by ``flush`` + ``os.fsync``,
  so a record is either wholly on disk or is the last, torn, line of the file;
* a torn last line (``kill -9`` or a crash mid-write) is recognised as the start of a record
  (``{"key":"…``, never valid JSON) after whole records; :meth:`SampleStore.repair` (run before
  the first append) moves it to ``<store>.torn`` with a warning, readers skip it with a
  warning. Anything else that is not a record -- a damaged line anywhere, a complete but invalid
  last record, a file that is not a store at all -- is an error naming the file (and line), and
  nothing is deleted;
* every record names the space, the supernet checkpoint (``supernet_hash``, :func:`checkpoint_hash`)
  and the measurement ``protocol``, so samples of different supernets or settings are never mixed
  silently (:class:`~apq_lightning.collection.reading.SameOrigin`,
  :func:`~apq_lightning.collection.reading.check_same_measurement`);
* one file per process, ``samples.rank{r}.jsonl`` (:func:`store_path`): DDP ranks never write
  to the same file, :func:`merge_stores` combines files deterministically.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from apq_lightning.collection.reading import read_from, read_samples
from apq_lightning.collection.record import (
    SampleRecord,
    TornLineWarning,
    is_torn,
    record_or_error,
)

__all__ = [
    "STORE_GLOB",
    "SampleStore",
    "checkpoint_hash",
    "merge_stores",
    "rank_files",
    "read_store_dir",
    "store_path",
]

STORE_GLOB = "samples.rank*.jsonl"
"""The store files of one collection directory (one per process, see :func:`store_path`)."""
_MAX_LINE = 1 << 20  # far above any record (~2 KB): a longer first line is not a store


# --------------------------------------------------------------------------------------------
# Naming
# --------------------------------------------------------------------------------------------
def store_path(output_dir: str | os.PathLike[str], rank: int) -> Path:
    """The store file of one process: ``<output_dir>/samples.rank{rank}.jsonl``."""
    return Path(output_dir) / f"samples.rank{rank}.jsonl"


def rank_files(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Every process's store file in ``output_dir`` (any earlier world size), sorted."""
    out = Path(output_dir)
    return sorted(p for p in out.glob(STORE_GLOB) if p.is_file()) if out.is_dir() else []


# --------------------------------------------------------------------------------------------
# One store file
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tail:
    """The unterminated end of a file: nothing, a whole record, or a torn one."""

    start: int
    raw: bytes
    state: Literal["none", "record", "torn"]


class SampleStore:
    """One append-only JSONL file of :class:`SampleRecord` (one writer process per file).

    ``append`` makes each record durable before returning (``flush`` + ``fsync``); the first
    append runs :meth:`repair`, so a new record is never glued onto half of an old one.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fh: Any = None

    def __repr__(self) -> str:
        return f"SampleStore({str(self.path)!r})"

    # ---- writing ----------------------------------------------------------------------------
    def append(self, record: SampleRecord) -> None:
        if not isinstance(record, SampleRecord):
            raise ValueError(f"SampleStore.append takes a SampleRecord, got {type(record).__name__}")
        line = record.to_json() + "\n"
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.repair()
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(line)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> SampleStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def torn_path(self) -> Path:
        """Where :meth:`repair` keeps what it cuts off: ``<store>.torn`` (not matched by ``*.jsonl``)."""
        return self.path.with_name(self.path.name + ".torn")

    def check(self) -> None:
        """Refuse (``ValueError`` naming the file) a file that is not a sample store.

        Reads the first line and the end of the file, not all of it: the first and the last
        whole line must be records, and an unterminated end must be a record or a torn one
        right after a record. A missing or empty file passes (a store not yet written).
        """
        if self.path.is_file():
            with open(self.path, "rb") as fh:
                self._inspect(fh)

    def repair(self) -> int:
        """Make the file end with a whole record before appending; returns the bytes moved out.

        A torn last line after whole records (a write that ``kill -9`` interrupted) is appended
        to :attr:`torn_path` (fsync'ed) and then cut off, with a :class:`TornLineWarning`; a
        complete record that only lacks its newline gets it. A file that is not a store
        (:meth:`check`) is refused and left as it is.
        """
        if not self.path.is_file():
            return 0
        with open(self.path, "rb+") as fh:
            tail = self._inspect(fh)
            if tail.state == "none":
                return 0
            if tail.state == "record":
                fh.seek(0, os.SEEK_END)
                fh.write(b"\n")
            else:
                with open(self.torn_path, "ab") as side:  # kept before anything is cut
                    side.write(tail.raw + b"\n")
                    side.flush()
                    os.fsync(side.fileno())
                fh.truncate(tail.start)
            fh.flush()
            os.fsync(fh.fileno())
        if tail.state == "record":
            return 0
        warnings.warn(
            f"{self.path}: moved a torn last line ({len(tail.raw)} bytes at byte {tail.start}, an interrupted "
            f"write) to {self.torn_path}",
            TornLineWarning,
            stacklevel=2,
        )
        return len(tail.raw)

    def _inspect(self, fh: BinaryIO) -> _Tail:
        """What the end of the file is (see :meth:`check`), or the refusal of a file that is not a store."""
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return _Tail(0, b"", "none")
        fh.seek(0)
        first = fh.readline(_MAX_LINE)
        if first.endswith(b"\n"):
            self._require_record(first[:-1], "line 1")
        elif len(first) < size:
            self._refuse(f"its first {len(first)} bytes hold no line break")
        start = _last_line_start(fh, size)
        fh.seek(start)
        raw = fh.read()
        if raw.endswith(b"\n"):
            self._require_record(raw[:-1], "the last line")
            return _Tail(size, b"", "none")
        if isinstance(record_or_error(raw), SampleRecord):
            return _Tail(start, raw, "record")
        if not is_torn(raw):
            self._require_record(raw, "the last line (no line break)")
        if start > 0:  # a torn write follows whole records only
            before = _last_line_start(fh, start)
            fh.seek(before)
            self._require_record(fh.read(start - before)[:-1], "the line before a torn last line")
        return _Tail(start, raw, "torn")

    def _require_record(self, raw: bytes, which: str) -> None:
        rec = record_or_error(raw)
        if isinstance(rec, str):
            self._refuse(f"{which} is not a sample record ({rec})")

    def _refuse(self, why: str) -> None:
        raise ValueError(
            f"{self.path} is not a sample store: {why}; nothing was changed -- move the file away "
            "(or store samples elsewhere)"
        )

    # ---- reading ----------------------------------------------------------------------------
    def records(self) -> list[SampleRecord]:
        """Every record of this file (a torn last line is skipped with a warning)."""
        return [r for _, r in read_from(self.path).records] if self.path.is_file() else []

    def done_indices(self, kinds: Iterable[str] | None = None) -> set[int]:
        """Indices already measured here (optionally only of some kinds)."""
        wanted = set(kinds) if kinds is not None else None
        return {r.index for r in self.records() if wanted is None or r.kind in wanted}


def _last_line_start(fh: Any, size: int) -> int:
    """Byte offset where the file's last line starts (after the last newline before EOF-1)."""
    pos, chunk = size, 1 << 16
    while pos > 0:
        start = max(0, pos - chunk)
        fh.seek(start)
        block = fh.read(pos - start)
        # the newline that ends the last line itself does not count
        j = block.rfind(b"\n", 0, len(block) - 1 if pos == size else len(block))
        if j >= 0:
            return start + j + 1
        pos = start
    return 0


# --------------------------------------------------------------------------------------------
# Several files
# --------------------------------------------------------------------------------------------
def read_store_dir(output_dir: str | os.PathLike[str]) -> list[SampleRecord]:
    """Every record of a collection directory's store files (:func:`rank_files`; ``[]`` if none)."""
    files = rank_files(output_dir)
    return read_samples(files) if files else []


def merge_stores(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], out: str | os.PathLike[str]) -> int:
    """Merge stores into one file, sorted by (kind, index, key) and without duplicates.

    The result does not depend on the order of the inputs: records are sorted by
    ``(kind, index, key, seed, protocol)`` and, among identical measurements (same kind, index,
    subnet, seed and protocol, e.g. one sample in two copies of a store), the one whose JSON
    sorts first is kept. Written atomically (temp file + rename). Returns the number of records.
    """
    records = read_samples(paths)
    best: dict[tuple, tuple[str, SampleRecord]] = {}
    for r in records:
        text = r.to_json()
        ident = r.identity
        if ident not in best or text < best[ident][0]:
            best[ident] = (text, r)
    lines = [best[k][0] for k in sorted(best)]
    dst = Path(out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return len(lines)


def checkpoint_hash(path: str | os.PathLike[str]) -> str:
    """First 16 hex digits of the file's SHA-256: the ``supernet_hash`` of its samples."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"supernet checkpoint {str(p)!r} does not exist (or is not a file)")
    h = hashlib.sha256()
    try:
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as err:
        raise ValueError(f"supernet checkpoint {str(p)!r} is unreadable: {err.strerror or err}") from None
    return h.hexdigest()[:16]
