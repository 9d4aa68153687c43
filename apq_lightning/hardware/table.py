"""Per-layer cost lookup tables: the key format, parsing, loading and saving.

A table maps one conv layer at one bit-width pair to its latency (ms) and, where known,
energy (mJ). The key format is the APQ reference's (docs/design.md §8.2)::

    "(Cin, Cout, H_in, kernel, stride, padding, groups)-W{w_bits}A{a_bits}"

plus two fixed entries, ``"head"`` (the network's stem + fixed first block) and ``"tail"``
(1x1 head conv + pool + classifier). Values are ``{"latency": ms, "energy": mJ}``; a table
measured on a CPU/GPU has no energy. A table written by this project may carry one more
entry, ``"__meta__"`` (space, device, batch, ...), which the BitFusion table does not have.

Keys are parsed with a regular expression, never evaluated; any malformed file or key is a
``ValueError`` that names the file and the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from apq_lightning.layout import ConvShape

FIXED_KEYS: tuple[str, ...] = ("head", "tail")
META_KEY = "__meta__"
FLOAT_BITS = 32
"""Bits written in the key of a float (unquantized) measurement: ``-W32A32``."""

MAX_COST = 1e6
"""Upper bound of one entry's latency (ms) or energy (mJ): a layer taking 1,000 s or 1 kJ is a
unit or measurement error, and bounded entries keep every subnet's sum finite (an entry near
1e308 would overflow to ``inf``, which reads as infeasible)."""

META_INTS: dict[str, int] = {"batch": 1, "num_classes": 1, "repeats": 1, "warmup": 0, "threads": 1}
"""Integer fields of ``__meta__`` and their smallest allowed value (checked on read and write)."""

BITFUSION_SPACE = "apq_imagenet"
BITFUSION_SHA256 = "ac7b951ca87eefc1a53f9cb195d12868ae89e58cd81f8dbe4a49dd0faaede705"

_KEY_RE = re.compile(
    r"^\(\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)-W(\d+)A(\d+)$"
)


LayerQuery = tuple[ConvShape, int, int]
"""One table question: (shape, weight bits, activation bits)."""


def format_key(shape: ConvShape, w_bits: int, a_bits: int) -> str:
    """The table key of a layer, exactly as the APQ reference writes it (``str`` of a tuple)."""
    return f"({', '.join(str(int(v)) for v in shape)})-W{int(w_bits)}A{int(a_bits)}"


def parse_key(key: str, source: str = "<table>") -> LayerQuery:
    """``"(Cin, Cout, H, k, s, p, g)-WxAy"`` -> (ConvShape, x, y); ValueError naming ``source`` and ``key``."""
    m = _KEY_RE.match(key) if isinstance(key, str) else None
    if m is None:
        raise ValueError(
            f"{source}: key {key!r} does not parse; expected '(Cin, Cout, H_in, kernel, stride, padding, "
            f"groups)-W<bits>A<bits>', 'head' or 'tail'"
        )
    v = [int(x) for x in m.groups()]
    shape = ConvShape(*v[:7])
    if min(shape) < 0 or min(shape.in_channels, shape.out_channels, shape.input_size, shape.kernel,
                             shape.stride, shape.groups) < 1 or shape.in_channels % shape.groups:
        raise ValueError(f"{source}: key {key!r} is not a valid conv layer (zero size or groups not dividing Cin)")
    if v[7] < 1 or v[8] < 1:
        raise ValueError(f"{source}: key {key!r} has a zero bit width")
    return shape, v[7], v[8]


@dataclass(frozen=True)
class Cost:
    """Latency (ms) and energy (mJ) of one entry; energy is NaN where the table has none."""

    latency: float
    energy: float = math.nan


@dataclass
class CostTable:
    """A parsed lookup table: conv entries, the fixed head/tail costs and optional metadata.

    ``space`` names the search space whose fixed layers ``head``/``tail`` were measured for
    (``None`` when unknown); conv entries are valid for any space that has the same layer.
    """

    entries: dict[LayerQuery, Cost]
    head: Cost | None = None
    tail: Cost | None = None
    name: str = "<table>"
    space: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def bit_pairs(self) -> set[tuple[int, int]]:
        return {(w, a) for _, w, a in self.entries}

    @property
    def float_only(self) -> bool:
        """A float table (every key ``-W32A32``) prices every layer the same whatever its bits."""
        return self.bit_pairs == {(FLOAT_BITS, FLOAT_BITS)}

    # ---- (de)serialisation ------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, name: str = "<table>") -> CostTable:
        """Parse the JSON object of a table file; ``name`` is used in every error message."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{name}: a cost table must be a JSON object of key -> {{latency, energy}}, "
                             f"got {type(data).__name__}")
        meta = _check_meta(data.get(META_KEY, {}), name)
        entries: dict[LayerQuery, Cost] = {}
        fixed: dict[str, Cost] = {}
        for key, value in data.items():
            if key == META_KEY:
                continue
            cost = _parse_value(value, key, name)
            if key in FIXED_KEYS:
                fixed[key] = cost
            else:
                entries[parse_key(key, name)] = cost
        if not entries:
            raise ValueError(f"{name}: the table has no conv entries")
        return cls(entries, fixed.get("head"), fixed.get("tail"), name, meta.get("space"), dict(meta))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.meta or self.space:
            out[META_KEY] = {**self.meta, **({"space": self.space} if self.space else {})}
        for part in FIXED_KEYS:
            cost = getattr(self, part)
            if cost is not None:
                out[part] = _cost_json(cost)
        for (shape, w, a), cost in sorted(self.entries.items()):
            out[format_key(shape, w, a)] = _cost_json(cost)
        return out

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename) so an interrupted write never leaves half a table.

        The table is validated by the same rules as on reading first, so a file this project
        writes always loads again.
        """
        p = Path(path)
        if p.is_dir():
            raise ValueError(f"{p} is a directory; give a cost table file path such as {p / 'lut.json'}")
        data = self.to_dict()
        CostTable.from_dict(data, str(p))
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, p)


def _parse_value(value: Any, key: str, name: str) -> Cost:
    if not isinstance(value, Mapping) or "latency" not in value:
        raise ValueError(f"{name}: entry {key!r} must be an object with 'latency' (and optionally 'energy'), "
                         f"got {value!r}")
    out = []
    for field_name in ("latency", "energy"):
        v = value.get(field_name, math.nan)
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not numeric or (field_name in value and isinstance(v, float) and not math.isfinite(v)):
            raise ValueError(f"{name}: entry {key!r} has a non-numeric {field_name} {v!r}")
        if v < 0 or v > MAX_COST:
            raise ValueError(f"{name}: entry {key!r} has {field_name} {v!r}; allowed: 0 to {MAX_COST:g} "
                             f"(ms / mJ per layer)")
        out.append(float(v))
    return Cost(*out)


def check_build_settings(*, stat: str = "median", **settings: int | None) -> None:
    """ValueError naming the first build setting (``batch``, ``repeats``, ``warmup``, ``threads``,
    ``num_classes``) that is not an integer within :data:`META_INTS`; ``threads`` and
    ``num_classes`` may be ``None`` (torch's / the space's default). Checked before measuring
    and again, as ``__meta__``, whenever a table is read or written: batch 0 would time nothing
    and write meaningless latencies."""
    for key, value in settings.items():
        if value is None and key in ("threads", "num_classes"):
            continue
        low = META_INTS[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
    if stat not in ("median", "min"):
        raise ValueError(f"stat must be 'median' or 'min', got {stat!r}")


def _check_meta(meta: Any, name: str) -> dict[str, Any]:
    """``__meta__``: an object whose integer settings are integers in range (a table with
    ``num_classes: -5`` would shrink the classifier's BitOps and size without a word)."""
    if not isinstance(meta, Mapping):
        raise ValueError(f"{name}: key {META_KEY!r} must hold an object, got {type(meta).__name__}")
    for key, low in META_INTS.items():
        v = meta.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name}: {META_KEY}.{key} must be an integer >= {low}, got {v!r}")
    space = meta.get("space")
    if space is not None and not isinstance(space, str):
        raise ValueError(f"{name}: {META_KEY}.space must be a space name, got {space!r}")
    return dict(meta)


def _cost_json(cost: Cost) -> dict[str, float]:
    d = {"latency": cost.latency}
    if not math.isnan(cost.energy):
        d["energy"] = cost.energy
    return d


def load_table(path: str | Path) -> CostTable:
    """Read and validate a table file; errors name the file (and the key where one is at fault)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p} is a directory, not a cost table file (a .json written by 'lut build')")
    if not p.is_file():
        raise ValueError(f"cost table file not found: {p}")
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{p}: not a JSON cost table: {err}") from None
    except RecursionError:
        raise ValueError(f"{p}: not a JSON cost table: nested too deeply to parse") from None
    except OSError as err:
        raise ValueError(f"{p}: cannot read the cost table: {err.strerror or err}") from None
    return CostTable.from_dict(data, str(p))


def bitfusion_table_path() -> Path:
    """Location of the packaged BitFusion table (works from a wheel or a source checkout)."""
    return Path(str(resources.files("apq_lightning") / "luts" / "bitfusion_b1.json"))


_BITFUSION: CostTable | None = None


def bitfusion_table() -> CostTable:
    """The APQ BitFusion table (batch 1), parsed once per process; it covers ``apq_imagenet``."""
    global _BITFUSION
    if _BITFUSION is None:
        ref = resources.files("apq_lightning") / "luts" / "bitfusion_b1.json"
        text = ref.read_bytes()
        table = CostTable.from_dict(json.loads(text), "bitfusion_b1.json")
        table.space = BITFUSION_SPACE
        table.meta = {"space": BITFUSION_SPACE, "device": "BitFusion", "batch": 1,
                      "sha256": hashlib.sha256(text).hexdigest()}
        _BITFUSION = table
    return _BITFUSION

