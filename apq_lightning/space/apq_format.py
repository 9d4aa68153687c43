"""The APQ reference's subnet spec: ``ks``, ``e`` (expand ratios), ``d``, ``*_bits_setting``.

Kept apart from the project format because it is a translation, not a serialisation: the
reference names a block's width by a ratio, so importing it rounds and exporting it divides.
The reference rounds two ways (:data:`APQ_ROUNDING`): its network runs ``make_divisible(round(e ·
Cin), 8)`` channels, its latency converter and predictor price ``make_divisible(e · Cin, 8)``;
they differ for about one block in twenty of its random ratios (Cin 16, e 5.741: 96 run, 88
priced). An APQ spec means the network APQ runs (``"network"``); ``"cost"`` reproduces the
reference's own latency sums. Ratios written from widths of the space (``to_apq``, the
converter's ``k / Cin``) mean the same under both. Both directions work on plain fields; the
:class:`~apq_lightning.space.subnet.Subnet` that validates them is built by ``Subnet.from_apq``.
Torch-free: the ``cost`` command parses APQ specs and must start fast (a test checks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .bits import BIT_FIELDS
from .spec import SearchSpace
from .values import check_len, int_tuple, listlike, short

if TYPE_CHECKING:
    from .subnet import Subnet

APQ_BIT_KEYS: dict[str, str] = {f: f"{f}_bits_setting" for f in BIT_FIELDS}
"""Field name -> key in the APQ reference's spec dicts."""

ApqRounding = Literal["network", "cost"]
APQ_ROUNDING: tuple[str, ...] = ("network", "cost")
"""How an APQ ratio becomes channels: ``network`` = ``make_divisible(round(e · Cin), 8)`` (the
reference's ``DynamicMBConvLayer``: what runs), ``cost`` = ``make_divisible(e · Cin, 8)`` (its
``utils/converter.py`` and ``utils/latency_predictor.py``: what it priced)."""

SubnetFields = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], dict[str, tuple[int, ...]] | None]
"""``(depths, kernels, widths, bits)``, the arguments of a ``Subnet`` after its space."""


def apq_fields(spec: Mapping[str, Any], sp: SearchSpace, rounding: ApqRounding = "network") -> SubnetFields:
    """The subnet fields of an APQ spec in space ``sp``, not yet validated against the space.

    A stage whose blocks cannot be skipped takes its fixed depth whatever ``d`` says (``d`` may
    have one entry fewer, as the reference writes it); widths follow ``rounding`` (:data:`APQ_ROUNDING`).
    """
    if rounding not in APQ_ROUNDING:
        raise ValueError(f"APQ rounding {rounding!r}: allowed {', '.join(APQ_ROUNDING)}")
    for key in ("ks", "e", "d"):
        if key not in spec:
            raise ValueError(f"APQ spec: missing key {key!r} (have {sorted(spec)})")
    d = int_tuple(spec["d"], "APQ spec: d")
    if len(d) not in (sp.num_stages, sp.num_stages - 1):
        raise ValueError(f"APQ spec: 'd' has {len(d)} entries, space {sp.name!r} needs {sp.num_stages}")
    depths = []
    for s, allowed in enumerate(sp.stage_depth_choices):
        depths.append(allowed[0] if len(allowed) == 1 else d[s])
    e = _ratio_tuple(spec["e"], "APQ spec: e")
    check_len("e", e, sp.num_blocks, "one per block", sp.name)
    widths = [apq_channels(r, b.in_channels, sp.width_step, rounding) for r, b in zip(e, sp.blocks)]
    kernels = int_tuple(spec["ks"], "APQ spec: ks")
    return tuple(depths), kernels, tuple(widths), _apq_policy(spec)


def apq_spec(subnet: Subnet) -> dict[str, Any]:
    """``subnet`` in the reference's format (skipped blocks: ks 3, e 4, 8 bits, as it writes them)."""
    sp = subnet.search_space
    active = subnet.active_mask
    spec: dict[str, Any] = {
        "wid": None,
        "ks": [k if a else 3 for k, a in zip(subnet.kernels, active)],
        "e": [w / b.in_channels if a else 4 for w, b, a in zip(subnet.widths, sp.blocks, active)],
        "d": list(subnet.depths),
    }
    if subnet.bits is not None:
        for f, key in APQ_BIT_KEYS.items():
            spec[key] = [v if a else 8 for v, a in zip(subnet.bits.get(f), active)]
    return spec


def apq_channels(ratio: float, in_channels: int, divisor: int = 8, rounding: ApqRounding = "network") -> int:
    """A block's mid channels for APQ expand ratio ``ratio`` under ``rounding`` (:data:`APQ_ROUNDING`)."""
    value = ratio * in_channels
    return make_divisible(round(value) if rounding == "network" else value, divisor)


def make_divisible(value: float, divisor: int = 8) -> int:
    """The MobileNet channel rounding rule that APQ uses for ``mid = e · Cin``.

    Nearest multiple of ``divisor`` (halves round up), at least ``divisor``, and one step up
    where rounding down lost more than 10 % of the value. Written here rather than imported
    from ``timm.layers.make_divisible`` (the same rule, docs/design.md §2.4) because timm
    imports torch and this package must stay torch-free (the ``cost`` command parses APQ
    specs); a test checks that both agree on many values.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _ratio_tuple(values: Iterable[Any], name: str) -> tuple[float, ...]:
    """Finite positive numbers (APQ's expand ratios); strings, null, inf and NaN are errors."""
    out = []
    for i, v in enumerate(listlike(values, name, "numbers")):
        number = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
        if not number or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name}[{i}] must be a finite number > 0, got {type(v).__name__} {short(v)}")
        out.append(float(v))
    return tuple(out)


def _apq_policy(spec: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """The four ``*_bits_setting`` lists of an APQ spec: all four (quantized) or none (float)."""
    present = [k for k in APQ_BIT_KEYS.values() if k in spec]
    if not present:
        return None
    if len(present) != len(APQ_BIT_KEYS):
        missing = [k for k in APQ_BIT_KEYS.values() if k not in spec]
        raise ValueError(
            f"APQ spec: has {present} but not {missing}; give all four *_bits_setting keys, or none for "
            f"a full-precision subnet"
        )
    return {f: int_tuple(spec[k], f"APQ spec: {k}") for f, k in APQ_BIT_KEYS.items()}
