"""Which subnet a sample index stands for: a pure function of ``(seed, index)``.

Sample collection is resumable and sharded across processes, so the subnet measured for index
``i`` must not depend on which process measures it, in which order, or after how many
restarts: every index gets its own generator ``np.random.default_rng([seed, i])``.

Stage 4 mixes APQ's two sampling kinds. Indices are grouped in runs of ``policies_per_arch``
(group ``g`` = indices ``g·P … g·P + P - 1``); a group is either

* ``mp_random``: every index its own random architecture and random policy, drawn from
  ``default_rng([seed, i])``, or
* ``mp_arch_policies``: one random architecture for the whole group (drawn from the
  generator of the group's first index) under a random policy per index (each index's
  own generator),

and the groups of the second kind are spread evenly (a Bresenham pattern) so that any prefix
``0 … N-1`` holds the requested ``arch_policies_fraction`` to within one group, whatever N is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from apq_lightning.space import SearchSpace, Subnet, get_space
from apq_lightning.space.policy_sampling import check_sampler, sample_policy

__all__ = ["MPSampling", "arch_index", "fp_subnet", "index_rng", "mp_kind", "mp_subnet", "qat_seed"]


def index_rng(seed: int, index: int, stream: int | None = None) -> np.random.Generator:
    """The generator of one sample index (``stream`` separates further uses, e.g. QAT)."""
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    key = [int(seed), int(index)] if stream is None else [int(seed), int(index), int(stream)]
    return np.random.default_rng(key)


def qat_seed(seed: int, index: int) -> int:
    """Seed of the short QAT of sample ``index`` (data order and augmentation)."""
    return int(index_rng(seed, index, stream=1).integers(0, 2**62))


def arch_index(index: int, sampling: MPSampling) -> int:
    """The index whose generator drew ``index``'s architecture: the group's first index for
    ``mp_arch_policies``, the index itself otherwise. Policies of one architecture share its QAT
    seed, so their labels differ by the policy, not by the QAT's data order."""
    if mp_kind(index, sampling) == "mp_arch_policies":
        return index - index % sampling.policies_per_arch
    return index


def fp_subnet(space: str | SearchSpace, seed: int, index: int) -> Subnet:
    """Stage 2: a uniformly random float subnet for ``index``."""
    return get_space(space).sample(index_rng(seed, index), quantized=False)


@dataclass(frozen=True)
class MPSampling:
    """How stage 4 maps indices to (kind, architecture, policy); see the module docstring.

    ``uniform_bits``: every sample gets this uniform policy instead of a random one (all kinds
    become ``mp_random``): a study of what quantization costs, not predictor data.
    ``policy_sampler``: how a random policy is drawn (:mod:`apq_lightning.space.policy_sampling`):
    ``spread`` (default: mean bit widths that cover the range) or APQ's ``independent``.
    """

    arch_policies_fraction: float = 0.5
    policies_per_arch: int = 10
    uniform_bits: int | None = None
    policy_sampler: str = "spread"

    def __post_init__(self) -> None:
        f = self.arch_policies_fraction
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0.0 <= f <= 1.0:
            raise ValueError(f"arch_policies_fraction must be a number in [0, 1], got {f!r}")
        p = self.policies_per_arch
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            raise ValueError(f"policies_per_arch must be an integer >= 1, got {p!r}")
        check_sampler(self.policy_sampler)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mp_kind(index: int, sampling: MPSampling) -> str:
    """``mp_random`` or ``mp_arch_policies`` for ``index`` (a whole group shares its kind)."""
    if sampling.uniform_bits is not None:
        return "mp_random"
    g = index // sampling.policies_per_arch
    f = sampling.arch_policies_fraction
    return "mp_arch_policies" if math.floor((g + 1) * f + 1e-9) > math.floor(g * f + 1e-9) else "mp_random"


def _group_policy(sp: SearchSpace, seed: int, index: int, kind: str, sampling: MPSampling) -> Any:
    """``index``'s policy from its own generator; within an ``mp_arch_policies`` group, redrawn
    until it differs from the policies of the group's earlier indices (a 'spread' draw repeats a
    uniform policy often, and the same architecture under the same policy twice would be a
    wasted measurement). Still a pure function of ``(seed, index)``."""
    first = index - index % sampling.policies_per_arch if kind == "mp_arch_policies" else index
    taken: list[Any] = []
    for i in range(first, index + 1):
        rng = index_rng(seed, i, stream=2)
        policy = sample_policy(sp, rng, sampling.policy_sampler)
        for _ in range(100):
            if policy not in taken:
                break
            policy = sample_policy(sp, rng, sampling.policy_sampler)
        taken.append(policy)
    return taken[-1]


def mp_subnet(space: str | SearchSpace, seed: int, index: int, sampling: MPSampling) -> tuple[str, Subnet]:
    """Stage 4: ``(kind, quantized subnet)`` for ``index``."""
    sp = get_space(space)
    kind = mp_kind(index, sampling)
    genome = sp.sample_genomes(index_rng(seed, index), 1)[0]
    if kind == "mp_arch_policies":  # the group's architecture genes, this index's bit genes
        first = index - index % sampling.policies_per_arch
        arch = sp.sample_genomes(index_rng(seed, first), 1)[0]
        bits = slice(sp.genome_slices()["pw_w"].start, sp.genome_length)
        genome = np.concatenate([arch[: bits.start], genome[bits]])
    subnet = sp.from_genome(genome, quantized=True)
    if sampling.policy_sampler != "independent":  # the genome's bit genes are APQ's independent draw
        subnet = subnet.with_bits(_group_policy(sp, seed, index, kind, sampling))
    if sampling.uniform_bits is not None:
        if sampling.uniform_bits not in sp.bit_choices:
            raise ValueError(
                f"uniform_bits={sampling.uniform_bits} is not a bit choice of space {sp.name!r}; "
                f"allowed: {list(sp.bit_choices)}"
            )
        subnet = subnet.with_bits(sampling.uniform_bits)
    return kind, subnet
