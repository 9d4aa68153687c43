"""Subnet files: one subnet (``.json``), many (``.jsonl``, one per line, or a JSON list).

Every failure is a one-line error naming the file (and the line of a ``.jsonl``): subnet files
come from searches, from other tools and from hand edits.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .apq_format import ApqRounding
from .spec import SearchSpace
from .subnet import Subnet
from .values import parse_json


def load_subnets(
    path: str | Path, space: str | SearchSpace | None = None, apq_rounding: ApqRounding = "network"
) -> list[Subnet]:
    """Read one subnet (``.json``) or many (``.jsonl``, one per line; or a JSON list); APQ specs'
    ratios become channels by ``apq_rounding`` (:meth:`Subnet.from_apq`).

    Every failure is a ``ValueError`` (``FileNotFoundError`` for a missing file) whose message
    names the file (and the line of a ``.jsonl``): a directory, a binary file, JSON nested too
    deeply to parse, or a subnet that does not validate.
    """
    p = Path(path)
    text = _read_text(p, "subnet file")
    if p.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(Subnet.from_dict(parse_json(line), space, apq_rounding))
                except ValueError as err:
                    raise ValueError(f"{p}:{n}: {err}") from None
        return out
    try:
        data = parse_json(text)
        if isinstance(data, list):
            return [Subnet.from_dict(x, space, apq_rounding) for x in data]
        return [Subnet.from_dict(data, space, apq_rounding)]
    except ValueError as err:
        raise ValueError(f"{p}: {err}") from None


def load_subnet(path: str | Path, space: str | SearchSpace | None = None) -> Subnet:
    subnets = load_subnets(path, space)
    if len(subnets) != 1:
        raise ValueError(f"{path}: expected exactly one subnet, found {len(subnets)}")
    return subnets[0]


def save_subnets(path: str | Path, subnets: Sequence[Subnet]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".jsonl":
        p.write_text("".join(s.to_json() + "\n" for s in subnets))
    elif len(subnets) == 1:
        p.write_text(subnets[0].to_json(indent=2) + "\n")
    else:
        p.write_text(json.dumps([s.to_dict() for s in subnets], indent=2) + "\n")


def _read_text(p: Path, what: str) -> str:
    """A UTF-8 text file; a missing path, a directory or binary content named in one line."""
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if p.is_dir():
        raise ValueError(f"{p} is a directory; expected a {what} (.json or .jsonl)")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{p}: not a text (UTF-8 JSON) {what}: {err.reason} at byte {err.start}") from None
    except OSError as err:
        raise ValueError(f"{p}: cannot read the {what}: {err.strerror or err}") from None
