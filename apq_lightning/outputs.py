"""Output files that commands promise: checked before the work, written whole and valid.

Why: a search or a finetune can take minutes to hours; an ``--out`` that names a directory, or
a path under a file, used to fail only when the result was written, in a traceback, with the
result lost. And ``json.dumps`` writes ``Infinity`` / ``NaN`` by default, which is not JSON: a
report that other tools (and our own report scripts) cannot read. Torch-free.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def check_output_file(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """``path`` as a Path when a file can be written there, else a one-line ``ValueError``
    naming the option and why (a directory, a parent that is a file, a folder without write
    permission). Creates nothing."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {p}: is a directory; give a file path inside it, e.g. {p / 'result.json'}")
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise ValueError(f"{what} {p}: {ancestor} is a file, not a folder")
    if ancestor.exists() and not os.access(ancestor, os.W_OK):
        raise ValueError(f"{what} {p}: no permission to write in {ancestor}")
    return p


def _first_non_finite(value: Any, where: str = "") -> str | None:
    """The key path of the first NaN / infinite float in ``value`` (``None``: all finite)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "(top level)"
    if isinstance(value, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, v in items:
        found = _first_non_finite(v, key)
        if found is not None:
            return found
    return None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json_text(data: Any) -> str:
    """Strict JSON text (indent 1, trailing newline); a NaN / infinite value is a ``ValueError``
    naming its key, never ``Infinity`` in the file."""
    try:
        return json.dumps(data, indent=1, default=_plain, allow_nan=False) + "\n"
    except ValueError:
        plain = json.loads(json.dumps(data, default=_plain))  # numpy scalars as floats, to find the key
        raise ValueError(f"refusing to write a non-finite number (at {_first_non_finite(plain)}) into JSON") from None


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write strict JSON atomically (a temporary beside the target, renamed over it): a killed
    run never leaves a half-written report that a later run would take for a finished one."""
    p = Path(path)
    text = to_json_text(data)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.partial")
    tmp.write_text(text)
    os.replace(tmp, p)
    return p


__all__ = ["check_output_file", "to_json_text", "write_json"]
