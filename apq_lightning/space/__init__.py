"""The APQ search space: architectures, fine-grained widths and per-block bit policies.

This package knows nothing of torch modules (docs/design.md §14.2): it describes *which* networks
exist (``SearchSpace``), names one of them (``Subnet``), validates and canonicalises it,
converts it to and from JSON / the APQ reference spec format, and codes it as an integer
genome for vectorised search and cost evaluation. Everything public is importable from
``apq_lightning.space``; the modules, in import order:

* ``spec`` -- :class:`SearchSpace` (geometry, counting, gene layout) and the registry
  (:func:`get_space`, :func:`register_space`, :func:`add_space`); ``presets`` registers
  ``apq_imagenet``, ``apq_cifar`` and ``tiny``;
* ``bits`` -- :class:`BitPolicy`; ``policies`` -- named policies (``uniform4``, ``w4a8``, ``float``);
* ``subnet`` -- :class:`Subnet` and the project's JSON; ``apq_format`` -- the reference's spec;
* ``genome`` -- genomes of subnets, and :func:`to_genomes`, the one converter from any
  population form; ``files`` -- ``.json`` / ``.jsonl`` subnet files.

Conventions
-----------
* Blocks are numbered 0..B-1 over all stages; block ``i`` of stage ``s`` runs iff its
  position within the stage is ``< depths[s]``.
* ``widths`` holds the *mid* (expanded) channel count of each block, i.e. the channel-pruning
  decision; the allowed set is ``{4·Cin, 4·Cin+8, …, 6·Cin}``.
* Values of skipped blocks carry no meaning: they are canonicalised to ``0`` so that two
  subnets that differ only in skipped blocks compare and hash equal.
"""

from .apq_format import APQ_BIT_KEYS, make_divisible
from .bits import BIT_FIELDS, BitPolicy
from .files import load_subnet, load_subnets, save_subnets
from .genome import Population, check_genomes, to_genomes
from .policies import FLOAT_POLICY_NAMES, apply_named_policy, is_float_policy_name, named_policy, policy_names
from .presets import apq_cifar, apq_imagenet, tiny
from .spec import BlockSpec, SearchSpace, add_space, conv_out_size, get_space, list_spaces, register_space
from .subnet import Subnet

__all__ = [
    "BIT_FIELDS", "APQ_BIT_KEYS", "BlockSpec", "SearchSpace", "conv_out_size", "register_space", "add_space",
    "list_spaces", "get_space", "apq_imagenet", "apq_cifar", "tiny", "BitPolicy", "Subnet", "make_divisible",
    "FLOAT_POLICY_NAMES", "is_float_policy_name", "policy_names", "named_policy", "apply_named_policy",
    "Population", "check_genomes", "to_genomes", "load_subnets", "load_subnet", "save_subnets",
]
