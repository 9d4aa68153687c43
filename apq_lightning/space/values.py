"""The value rules of subnet JSON, shared by every format of the package.

Integers stay integers (4.7 or "4" is an error, never silently 4), a list is never split out of
a string, and every error fits on one line that names the field: a subnet file is written by
hand or by another tool, and its mistakes must be found from the message alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


def listlike(values: Any, name: str, what: str) -> list[Any]:
    """The entries of a JSON list; a string, mapping or scalar is refused whole (never split)."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a list of {what}, got {type(values).__name__} {short(values)}")
    return list(values)


def int_tuple(values: Iterable[Any], name: str) -> tuple[int, ...]:
    """Integers only: 4.7 or "4" is an error naming ``name``, never silently 4 (4.0 is 4)."""
    out = []
    for i, v in enumerate(listlike(values, name, "integers")):
        is_int = isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
        if not (is_int or isinstance(v, float) and v.is_integer()):
            raise ValueError(f"{name}[{i}] must be an integer, got {type(v).__name__} {short(v)}")
        out.append(int(v))
    return tuple(out)


def short(value: Any, limit: int = 60) -> str:
    """``repr`` cut to one readable line (a 100k-character value must not flood the terminal)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


def check_len(name: str, values: Sequence[Any], n: int, what: str, space: str) -> None:
    if len(values) != n:
        raise ValueError(f"space {space!r}: {name} has {len(values)} entries, expected {n} ({what})")


def parse_json(text: str) -> Any:
    """``json.loads`` with its two failure modes turned into one-line ``ValueError``s."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON: {err}") from None
    except RecursionError:
        raise ValueError("not a subnet: JSON nested too deeply to parse") from None
