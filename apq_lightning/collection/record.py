"""One sample record: the line format of the sample store, its validation and parsing.

Stages 2 and 4 write one JSON object per measured subnet; this module is the one place that
says what such a line is (:class:`SampleRecord`: fields, checks, the canonical JSON) and how
one line of a file is parsed -- including what counts as a *torn* line, the start of a record
an interrupted append left behind. Files of records (naming, appending, repair) are
:mod:`~apq_lightning.collection.store`'s, reading them is :mod:`~apq_lightning.collection.reading`'s.

Record (one line)::

    {"key": "3f2a…", "subnet": {... subnet JSON, with "bits" for MP ...}, "acc": 0.8312,
     "index": 17, "seed": 0, "kind": "fp", "space": "apq_cifar", "supernet_hash": "9c1e…",
     "protocol": {"bn_batches": 4, "eval_images": 5000, ...},
     "timing": {"total_s": 1.9, "bn_s": 0.4, "eval_s": 1.4, "qat_s": 0.0, "threads": 1}}

``timing`` holds seconds per part of the measurement and ``threads``, the torch threads it ran on
(older stores lack it).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from apq_lightning.space import Subnet

__all__ = [
    "KINDS",
    "MP_KINDS",
    "SampleRecord",
    "TornLineWarning",
    "is_torn",
    "parse_line",
    "record_or_error",
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
_RECORD_START = b'{"key":"'  # how every line SampleRecord.to_json writes begins


class TornLineWarning(UserWarning):
    """A store's last line was cut off mid-write (readers skip it,
    :meth:`~apq_lightning.collection.store.SampleStore.repair` moves it aside)."""


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
# One line
# --------------------------------------------------------------------------------------------
def record_or_error(raw: bytes) -> SampleRecord | str:
    """The record of one line, or why it is not one."""
    if not raw.strip():
        return "an empty line"
    try:
        return SampleRecord.from_json(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        return str(err)


def parse_line(raw: bytes, where: str) -> SampleRecord:
    """The record of one line; ``ValueError("file:line: ...")`` otherwise."""
    if not raw.strip():
        raise ValueError(f"{where}: empty line inside a sample store")
    rec = record_or_error(raw)
    if isinstance(rec, str):
        raise ValueError(f"{where}: malformed sample record: {rec}")
    return rec


def is_torn(raw: bytes) -> bool:
    """An interrupted append: the beginning of a line as :meth:`SampleRecord.to_json` writes it
    (ASCII, starting ``{"key":"``) that is not yet valid JSON. A complete JSON object, binary
    data or other text is never taken for one."""
    if not raw.isascii() or not (raw.startswith(_RECORD_START) or _RECORD_START.startswith(raw)):
        return False
    try:
        json.loads(raw)
    except ValueError:
        return True
    return False
