"""The sample store: append-only JSONL files of measured ``(subnet, accuracy)`` pairs.

Stages 2 and 4 spend most of the pipeline's compute producing these records and stages 3 and 5
train predictors on them, so the format favours *never losing a finished sample*:

* one JSON object per line, written with one ``write`` followed by ``flush`` + ``os.fsync``,
  so a record is either wholly on disk or is the last, torn, line of the file;
* a torn last line (``kill -9`` or a crash mid-write) is detected and truncated by
  :meth:`SampleStore.repair` (automatically before the first append) with a warning; readers
  skip it with a warning, any *other* malformed line is an error naming file and line;
* every record names the space, the supernet checkpoint (``supernet_hash``) and the
  measurement ``protocol``, so samples of different supernets or settings are never mixed
  silently (:func:`read_samples` refuses them);
* one file per process (``samples.rank{r}.jsonl``): DDP ranks never write to the same file,
  :func:`merge_stores` combines files deterministically.

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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apq_lightning.space import Subnet

__all__ = [
    "KINDS",
    "MP_KINDS",
    "SampleRecord",
    "SampleStore",
    "TornLineWarning",
    "checkpoint_hash",
    "merge_stores",
    "read_samples",
    "store_files",
]

KINDS: tuple[str, ...] = ("fp", "mp_random", "mp_arch_policies")
"""``fp``: float subnet (stage 2); ``mp_random``: random architecture + random policy;
``mp_arch_policies``: one random architecture under several random policies (stage 4)."""
MP_KINDS: tuple[str, ...] = ("mp_random", "mp_arch_policies")

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


class TornLineWarning(UserWarning):
    """A store's last line was cut off mid-write (and is skipped or truncated)."""


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
# One store file
# --------------------------------------------------------------------------------------------
class SampleStore:
    """One append-only JSONL file of :class:`SampleRecord` (one writer process per file).

    ``append`` makes each record durable before returning (``flush`` + ``fsync``); the first
    append repairs a torn last line left by an earlier crash, so a new record is never glued
    onto half of an old one.
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

    def repair(self) -> int:
        """Truncate a torn last line (no trailing newline and not a valid record); returns
        the number of bytes removed. A complete record that only lacks its newline gets it."""
        if not self.path.is_file():
            return 0
        with open(self.path, "rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            tail_start = _last_line_start(fh, size)
            fh.seek(tail_start)
            tail = fh.read()
            if tail.endswith(b"\n"):
                return 0
            if _parses(tail):
                fh.write(b"\n")
                fh.flush()
                os.fsync(fh.fileno())
                return 0
            fh.truncate(tail_start)
            fh.flush()
            os.fsync(fh.fileno())
        warnings.warn(
            f"{self.path}: removed a torn last line ({len(tail)} bytes, an interrupted write) at byte {tail_start}",
            TornLineWarning,
            stacklevel=2,
        )
        return len(tail)

    # ---- reading ----------------------------------------------------------------------------
    def records(self) -> list[SampleRecord]:
        """Every record of this file (a torn last line is skipped with a warning)."""
        return [r for _, r in _iter_file(self.path)] if self.path.is_file() else []

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


def _parses(raw: bytes) -> bool:
    try:
        SampleRecord.from_json(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def _iter_file(path: Path) -> Iterator[tuple[int, SampleRecord]]:
    """``(line number, record)`` of every line; raises ``ValueError("file:line: ...")`` on a
    malformed line unless it is the torn last line (no newline), which is skipped with a warning."""
    with open(path, "rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    last = len(lines)
    for n, raw in enumerate(lines, 1):
        if n == last:  # after the final newline: empty, or a torn line without one
            if raw.strip() and not _parses(raw):
                warnings.warn(
                    f"{path}:{n}: skipping a torn last line ({len(raw)} bytes, an interrupted write); "
                    "it is truncated the next time the store is appended to",
                    TornLineWarning,
                    stacklevel=3,
                )
                return
            if not raw.strip():
                return
        if not raw.strip():
            raise ValueError(f"{path}:{n}: empty line inside a sample store")
        try:
            rec = SampleRecord.from_json(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}:{n}: malformed sample record: {err}") from None
        yield n, rec


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
    first record, so records of two spaces or two supernets are never mixed silently. ``kinds``
    keeps only those kinds. A malformed line raises ``ValueError("file:line: ...")``; a torn last
    line is skipped with a :class:`TornLineWarning`.
    """
    wanted = None if kinds is None else set(kinds)
    if wanted is not None and not wanted <= set(KINDS):
        raise ValueError(f"kinds {sorted(wanted - set(KINDS))} unknown; allowed: {list(KINDS)}")
    out: list[SampleRecord] = []
    first: str | None = None
    for path in store_files(paths_or_globs):
        for n, rec in _iter_file(path):
            where = f"{path}:{n}"
            if space is None:
                space, first = rec.space, where
            if supernet_hash is None:
                supernet_hash, first = rec.supernet_hash, first or where
            if rec.space != space:
                origin = f"the first record ({first})" if first else "the requested space"
                raise ValueError(
                    f"{where}: record is for space {rec.space!r}, but {origin} is for space {space!r}; "
                    "keep stores of different spaces apart"
                )
            if rec.supernet_hash != supernet_hash:
                origin = f"the first record ({first})" if first else "the requested supernet_hash"
                raise ValueError(
                    f"{where}: record was measured on supernet {rec.supernet_hash!r}, but {origin} "
                    f"is for supernet {supernet_hash!r}; samples of different supernet checkpoints cannot be mixed"
                )
            if wanted is None or rec.kind in wanted:
                out.append(rec)
    return out


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
