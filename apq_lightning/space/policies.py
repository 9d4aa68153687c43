"""Named bit policies (``uniform4``, ``w4a8``, ``float``): baselines that every space offers.

A name means the same thing on every architecture of a space (every active block at those
bits), so it is a fact of the space, not of the quantizer: recipes and the ``final`` command
name policies, and :mod:`apq_lightning.quant` applies whatever policy a subnet carries.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .bits import BitPolicy
from .spec import SearchSpace, get_space

if TYPE_CHECKING:
    from .subnet import Subnet

FLOAT_POLICY_NAMES: tuple[str, ...] = ("float", "fp", "fp32", "none")
"""Names of the float "policy" (no bits: the blocks stay full precision)."""


def is_float_policy_name(name: str) -> bool:
    return str(name).strip().lower() in FLOAT_POLICY_NAMES


def policy_names(space: str | SearchSpace) -> list[str]:
    """Names :func:`named_policy` accepts for ``space``."""
    bits = get_space(space).bit_choices
    return ["float"] + [f"uniform{b}" for b in bits] + [f"w{w}a{a}" for w in bits for a in bits]


def named_policy(space: str | SearchSpace, name: str) -> BitPolicy | None:
    """Named baseline policies: ``uniform4`` / ``uniform6`` / ``uniform8`` (every active block at
    those bits), ``w4a8``-style (weights / activations of every conv), ``float`` (``None``: no
    policy, the blocks stay full precision)."""
    sp = get_space(space)
    key = str(name).strip().lower()
    if key in FLOAT_POLICY_NAMES:
        return None
    m = re.fullmatch(r"uniform(\d+)", key) or re.fullmatch(r"w(\d+)a(\d+)", key)
    if m is not None:
        w = int(m.group(1))
        a = int(m.group(2)) if m.lastindex == 2 else w
        bad = [b for b in (w, a) if b not in sp.bit_choices]
        if not bad:
            return sp.uniform_policy((w, a, w, a))
        raise ValueError(
            f"policy {name!r}: {bad[0]} bits is not a bit choice of space {sp.name!r} "
            f"(allowed: {list(sp.bit_choices)})"
        )
    raise ValueError(f"unknown policy {name!r}; named policies of space {sp.name!r}: {', '.join(policy_names(sp))}")


def apply_named_policy(subnet: Subnet, policy: str | BitPolicy | Mapping[str, Sequence[int]] | int | None) -> Subnet:
    """``subnet`` under ``policy`` (a name of :func:`named_policy`, a policy, or a uniform int)."""
    if isinstance(policy, str):
        return subnet.with_bits(named_policy(subnet.search_space, policy))
    return subnet.with_bits(policy)
