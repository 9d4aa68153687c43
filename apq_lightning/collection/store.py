"""The sample store: append-only JSONL files of measured ``(subnet, accuracy)`` pairs.

Stages 2 and 4 spend most of the pipeline's compute producing these records and stages 3 and 5
train predictors on them, so the format favours *never losing a finished sample*. This module is
the one place that knows the store: format, file naming, durable appends, (incremental) reading,
the checks and merging. The collection writes through it and the predictor datamodule
(:mod:`apq_lightning.data.samples`) reads through it; it imports nothing from
:mod:`apq_lightning.data` (the arrow points one way: ``data`` -> ``collection.store``).

* one JSON object per line, written with one ``write`` followed by ``flush`` + ``os.fsync``,
  so a record is either wholly on disk or is the last, torn, line of the file;
* a torn last line (``kill -9`` or a crash mid-write) is recognised as the start of a record
  (``{"key":"…``, never valid JSON) after whole records; :meth:`SampleStore.repair` (run before
  the first append) moves it to ``<store>.torn`` with a warning, readers skip it with a
  warning. Anything else that is not a record -- a damaged line anywhere, a complete but invalid
  last record, a file that is not a store at all -- is an error naming the file (and line), and
  nothing is deleted;
* every record names the space, the supernet checkpoint (``supernet_hash``) and the
  measurement ``protocol``, so samples of different supernets or settings are never mixed
  silently (:class:`SameOrigin`, :func:`check_same_measurement`);
* one file per process, ``samples.rank{r}.jsonl`` (:func:`store_path`): DDP ranks never write
  to the same file, :func:`merge_stores` combines files deterministically;
* :func:`read_from` reads a file from where an earlier read stopped (:class:`StoreCursor`), so a
  reader that follows a growing store costs only the new lines.

Record (one line)::

    {"key": "3f2a…", "subnet": {... subnet JSON, with "bits" for MP ...}, "acc": 0.8312,
     "index": 17, "seed": 0, "kind": "fp", "space": "apq_cifar", "supernet_hash": "9c1e…",
     "protocol": {"bn_batches": 4, "eval_images": 5000, ...},
     "timing": {"total_s": 1.9, "bn_s": 0.4, "eval_s": 1.4, "qat_s": 0.0}}
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal

from apq_lightning.space import Subnet

__all__ = [
    "KINDS",
    "MP_KINDS",
    "STORE_GLOB",
    "SameOrigin",
    "SampleRecord",
    "SampleStore",
    "StoreCursor",
    "StoreRead",
    "TornLineWarning",
    "check_same_measurement",
    "checkpoint_hash",
    "merge_stores",
    "rank_files",
    "read_from",
    "read_samples",
    "read_store_dir",
    "store_files",
    "store_path",
]

KINDS: tuple[str, ...] = ("fp", "mp_random", "mp_arch_policies")
"""``fp``: float subnet (stage 2); ``mp_random``: random architecture + random policy;
``mp_arch_policies``: one random architecture under several random policies (stage 4)."""
MP_KINDS: tuple[str, ...] = ("mp_random", "mp_arch_policies")

STORE_GLOB = "samples.rank*.jsonl"
"""The store files of one collection directory (one per process, see :func:`store_path`)."""

_FIELDS: tuple[str, ...] = (
    "key",
    "subnet",
    "acc",
    "index",
    "seed",
    "kind",
    "space",
    "supernet_hash",
    "protocol",
    "timing",
)
_SUBNET_KEYS = ("space", "depths", "kernels", "widths", "bits")
_RECORD_START = b'{"key":"'  # how every line this module writes begins (SampleRecord.to_json)
_MAX_LINE = 1 << 20  # far above any record (~2 KB): a longer first line is not a store


class TornLineWarning(UserWarning):
    """A store's last line was cut off mid-write (readers skip it, :meth:`SampleStore.repair` moves it aside)."""


# --------------------------------------------------------------------------------------------
# Record
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleRecord:
    """One measured sample; ``subnet`` is the subnet JSON dict (with ``bits`` for MP kinds).

    Use :meth:`from_dict` (validating) to read one and :meth:`to_json` to write one;
    :meth:`to_subnet` parses the subnet.
    """

    key: str
    subnet: dict[str, Any]
    acc: float
    index: int
    seed: int
    kind: str
    space: str
    supernet_hash: str
    protocol: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self)

    # ---- conversion -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}

    def to_json(self) -> str:
        """One line of compact JSON (no newline), fields in a fixed order."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SampleRecord:
        """Validate and build a record; ValueError names the first problem found."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a sample record must be a JSON object, got {type(d).__name__}")
        missing = [k for k in _FIELDS if k not in d]
        unknown = sorted(set(d) - set(_FIELDS))
        if missing or unknown:
            raise ValueError(
                f"sample record: missing fields {missing}, unknown fields {unknown}; required: {list(_FIELDS)}"
            )
        timing = d["timing"]
        if not isinstance(timing, Mapping) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in timing.values()
        ):
            raise ValueError(f"sample record: timing must map names to seconds, got {timing!r}")
        return cls(
            key=d["key"],
            subnet=dict(d["subnet"]) if isinstance(d["subnet"], Mapping) else d["subnet"],
            acc=float(d["acc"]) if isinstance(d["acc"], (int, float)) and not isinstance(d["acc"], bool) else d["acc"],
            index=d["index"],
            seed=d["seed"],
            kind=d["kind"],
            space=d["space"],
            supernet_hash=d["supernet_hash"],
            protocol=dict(d["protocol"]) if isinstance(d["protocol"], Mapping) else d["protocol"],
            timing={str(k): float(v) for k, v in timing.items()},
        )

    @classmethod
    def from_json(cls, line: str) -> SampleRecord:
        return cls.from_dict(json.loads(line))

    @classmethod
    def measured(
        cls,
        subnet: Subnet,
        acc: float,
        index: int,
        seed: int,
        kind: str,
        supernet_hash: str,
        protocol: Mapping[str, Any],
        timing: Mapping[str, float],
    ) -> SampleRecord:
        """A record for a measurement of ``subnet`` (key and space taken from it)."""
        return cls(
            key=subnet.key(),
            subnet=subnet.to_dict(),
            acc=float(acc),
            index=int(index),
            seed=int(seed),
            kind=kind,
            space=subnet.space,
            supernet_hash=supernet_hash,
            protocol=dict(protocol),
            timing={k: round(float(v), 6) for k, v in timing.items()},
        )

    def to_subnet(self) -> Subnet:
        return Subnet.from_dict(self.subnet)

    @property
    def identity(self) -> tuple[str, int, str, int, str]:
        """What makes two records the same measurement: kind, index, subnet, seed, protocol."""
        return (self.kind, self.index, self.key, self.seed, json.dumps(self.protocol, sort_keys=True))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate(r: SampleRecord) -> None:
    """Cheap structural checks of every field, plus the subnet's key.

    The key check is fast for records written by this module (their subnet dict is canonical,
    so hashing it as is reproduces the key); any other dict goes through full subnet
    validation against its space before the key is compared.
    """
    if not isinstance(r.key, str) or not r.key:
        raise ValueError(f"sample record: key must be a non-empty string, got {r.key!r}")
    if r.kind not in KINDS:
        raise ValueError(f"sample record: kind={r.kind!r} is not allowed; allowed: {list(KINDS)}")
    if not isinstance(r.acc, float) or not math.isfinite(r.acc) or not 0.0 <= r.acc <= 1.0:
        raise ValueError(f"sample record: acc must be a number in [0, 1], got {r.acc!r}")
    if not _is_int(r.index) or r.index < 0:
        raise ValueError(f"sample record: index must be an integer >= 0, got {r.index!r}")
    if not _is_int(r.seed):
        raise ValueError(f"sample record: seed must be an integer, got {r.seed!r}")
    if not isinstance(r.space, str) or not r.space:
        raise ValueError(f"sample record: space must be a non-empty string, got {r.space!r}")
    if not isinstance(r.supernet_hash, str) or not r.supernet_hash:
        raise ValueError(f"sample record: supernet_hash must be a non-empty string, got {r.supernet_hash!r}")
    if not isinstance(r.protocol, dict):
        raise ValueError(f"sample record: protocol must be an object, got {type(r.protocol).__name__}")
    if not isinstance(r.timing, dict):
        raise ValueError(f"sample record: timing must be an object, got {type(r.timing).__name__}")
    s = r.subnet
    if not isinstance(s, dict):
        raise ValueError(f"sample record: subnet must be a subnet JSON object, got {type(s).__name__}")
    if s.get("space") != r.space:
        raise ValueError(f"sample record: subnet space {s.get('space')!r} differs from the record's space {r.space!r}")
    has_bits = s.get("bits") is not None
    if r.kind == "fp" and has_bits:
        raise ValueError("sample record: kind 'fp' must have a float subnet (no 'bits')")
    if r.kind != "fp" and not has_bits:
        raise ValueError(f"sample record: kind {r.kind!r} needs a subnet with 'bits'")
    if _fast_key(s) == r.key:
        return
    try:
        sub = Subnet.from_dict(s)
    except ValueError as err:
        raise ValueError(f"sample record: invalid subnet: {err}") from None
    if sub.key() != r.key:
        raise ValueError(f"sample record: key {r.key!r} does not match its subnet (key {sub.key()!r})")


def _fast_key(s: dict[str, Any]) -> str | None:
    """``Subnet.key()`` of a dict already in canonical form (else a value that never matches)."""
    if list(s) != [k for k in _SUBNET_KEYS if k in s]:
        return None
    return hashlib.sha1(json.dumps(s).encode()).hexdigest()[:12]


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
# One line
# --------------------------------------------------------------------------------------------
def _record_or_error(raw: bytes) -> SampleRecord | str:
    """The record of one line, or why it is not one."""
    if not raw.strip():
        return "an empty line"
    try:
        return SampleRecord.from_json(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        return str(err)


def _parse_line(raw: bytes, where: str) -> SampleRecord:
    """The record of one line; ``ValueError("file:line: ...")`` otherwise."""
    if not raw.strip():
        raise ValueError(f"{where}: empty line inside a sample store")
    rec = _record_or_error(raw)
    if isinstance(rec, str):
        raise ValueError(f"{where}: malformed sample record: {rec}")
    return rec


def _is_torn(raw: bytes) -> bool:
    """An interrupted append: the beginning of a line as :meth:`SampleStore.append` writes it
    (ASCII, starting ``{"key":"``) that is not yet valid JSON. A complete JSON object, binary
    data or other text is never taken for one."""
    if not raw.isascii() or not (raw.startswith(_RECORD_START) or _RECORD_START.startswith(raw)):
        return False
    try:
        json.loads(raw)
    except ValueError:
        return True
    return False


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
        if isinstance(_record_or_error(raw), SampleRecord):
            return _Tail(start, raw, "record")
        if not _is_torn(raw):
            self._require_record(raw, "the last line (no line break)")
        if start > 0:  # a torn write follows whole records only
            before = _last_line_start(fh, start)
            fh.seek(before)
            self._require_record(fh.read(start - before)[:-1], "the line before a torn last line")
        return _Tail(start, raw, "torn")

    def _require_record(self, raw: bytes, which: str) -> None:
        rec = _record_or_error(raw)
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
        records.append((line, _parse_line(raw, f"{path}:{line}")))
    if tail.strip() and not follow:
        if _is_torn(tail):
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
            records.append((line, _parse_line(tail, f"{path}:{line}")))
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
