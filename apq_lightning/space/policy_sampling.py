"""Random bit policies that span the bit range.

Why not APQ's draw (every tensor's bits independently uniform)? Averaged over the ~80 quantized
tensors of a subnet, independent draws all land near the middle: the mean bit width of a
policy varies by ~0.2 bits from policy to policy (apq_cifar, {4, 6, 8}), so samples carry almost
no signal about what fewer bits cost, and neither can a predictor trained on them, nor a
supernet trained under them ever see a mostly-4-bit network. The ``spread`` sampler mixes three
kinds of policy so that mean bit widths cover the range (std ≈ 1.1 bits on {4, 6, 8}):

* a quarter uniform (every tensor the same width, each width equally likely);
* a quarter per tensor kind (one width for all ``pw_w``, one for all ``pw_a``, ...);
* half per tensor from a per-policy mix ``w ~ Dirichlet(0.5, ..., 0.5)`` over the widths, so
  that one policy is mostly 4-bit, another mostly 8-bit, another anything in between.

``independent`` is APQ's draw, kept by name.
"""

from __future__ import annotations

import numpy as np

from .bits import BIT_FIELDS, BitPolicy
from .spec import SearchSpace

POLICY_SAMPLERS: tuple[str, ...] = ("spread", "independent")
"""Names of :func:`sample_policy`'s samplers; ``spread`` is the default everywhere."""


def check_sampler(name: str) -> str:
    if name not in POLICY_SAMPLERS:
        raise ValueError(f"policy sampler {name!r} unknown; allowed: {list(POLICY_SAMPLERS)}")
    return name


def sample_policy(space: SearchSpace, rng: np.random.Generator, sampler: str = "spread") -> BitPolicy:
    """One random policy for every block of ``space`` (see the module docstring)."""
    check_sampler(sampler)
    choices = np.asarray(space.bit_choices)
    k, n, f = len(choices), space.num_blocks, len(BIT_FIELDS)
    if sampler == "independent":
        idx = rng.integers(0, k, size=(f, n))
    else:
        u = rng.random()
        if u < 0.25:
            idx = np.full((f, n), rng.integers(0, k))
        elif u < 0.5:
            idx = np.repeat(rng.integers(0, k, size=(f, 1)), n, axis=1)
        else:
            idx = rng.choice(k, size=(f, n), p=rng.dirichlet(np.full(k, 0.5)))
    bits = choices[idx]
    return BitPolicy(*(tuple(int(b) for b in row) for row in bits))


def mean_bits(policy: BitPolicy, blocks: list[int] | tuple[int, ...] | None = None) -> float:
    """The policy's mean bit width over its tensors (of ``blocks`` only: e.g. the running blocks)."""
    cols = list(range(len(policy.pw_w))) if blocks is None else list(blocks)
    vals = [policy.get(fld)[i] for fld in BIT_FIELDS for i in cols]
    return float(np.mean(vals)) if vals else float("nan")


__all__ = ["POLICY_SAMPLERS", "check_sampler", "mean_bits", "sample_policy"]
