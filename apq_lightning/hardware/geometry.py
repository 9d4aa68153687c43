"""Layer geometry of a space's networks for the cost models, from the layout (no torch).

The cost models price a subnet layer by layer, so they need the conv shapes that the
network runs, in the table's key format; :mod:`apq_lightning.layout` describes them once:

* elastic block: expand ``(Cin, mid, H_in, 1, 1, 0, 1)``, depthwise
  ``(mid, mid, H_in, k, s, k//2, mid)``, project ``(mid, Cout, H_out, 1, 1, 0, 1)``.
  ``H_out = (H_in - 1)//s + 1`` is the conv's real output size; the APQ reference writes
  ``H_in // s``, which is the same number for every (even) size of every preset, so the keys
  are identical (checked against the table in the tests);
* fixed "head" (the table's name for what runs before the blocks): stem 3x3 conv stride
  ``stem_stride`` 3 -> stem, depthwise 3x3 on the stem channels, project -> first block;
* fixed "tail": 1x1 head conv -> ``head_channels``, global pool, classifier (written as a
  1x1 conv on a 1x1 map, which has the same MACs and weights as the ``nn.Linear``).
"""

from __future__ import annotations

from dataclasses import dataclass

from apq_lightning.layout import BLOCK_CONVS, FIXED_LAYERS, ConvShape, block_conv_shapes
from apq_lightning.space import BlockSpec, SearchSpace

DEFAULT_NUM_CLASSES: dict[str, int] = {"apq_imagenet": 1000}
"""Classifier width when none is given: ImageNet for its space, 10 (CIFAR-10 / digits) otherwise."""


def default_num_classes(space: SearchSpace) -> int:
    return DEFAULT_NUM_CLASSES.get(space.name, 10)


def block_convs(block: BlockSpec, kernel: int, mid: int) -> tuple[ConvShape, ...]:
    """Every conv of one elastic block at (kernel, mid), in layout order (expand, depthwise, project)."""
    return block_conv_shapes(block, kernel, mid)


@dataclass(frozen=True)
class FixedLayer:
    """One always-on layer: its conv shape, whether a BN follows, whether it carries a bias."""

    name: str
    shape: ConvShape
    bn: bool = True
    bias: bool = False

    @property
    def extra_params(self) -> int:
        """Parameters stored at 32 bits: BN scale + shift per channel, or the bias."""
        return 2 * self.shape.out_channels * self.bn + self.shape.out_channels * self.bias


def _fixed(space: SearchSpace, num_classes: int, part: str) -> tuple[FixedLayer, ...]:
    return tuple(FixedLayer(s.role, s.shape(space, num_classes), s.bn, s.bias) for s in FIXED_LAYERS if s.part == part)


def head_layers(space: SearchSpace) -> tuple[FixedLayer, ...]:
    """What the table calls ``head``: the stem conv and the fixed first MBConv (expand ratio 1)."""
    return _fixed(space, default_num_classes(space), "head")  # no classifier: num_classes plays no role


def tail_layers(space: SearchSpace, num_classes: int) -> tuple[FixedLayer, ...]:
    """What the table calls ``tail``: the 1x1 head conv and the linear classifier."""
    return _fixed(space, num_classes, "tail")


def fixed_layers(space: SearchSpace, num_classes: int) -> tuple[FixedLayer, ...]:
    return head_layers(space) + tail_layers(space, num_classes)


_ANY_KERNEL = 1  # output channels, and so BN parameters, do not depend on the kernel


def block_extra_params(block: BlockSpec, mid: int) -> int:
    """Parameters of a block stored at 32 bits (BN scale + shift after each of its convs)."""
    return sum(c.extra_params(c.shape(block, _ANY_KERNEL, mid)) for c in BLOCK_CONVS)


def distinct_block_convs(space: SearchSpace) -> list[tuple[ConvShape, str]]:
    """Every distinct elastic conv of a space with its role (``expand``/``depthwise``/``project``).

    Roles matter to a measured table only (the project conv has no ReLU6 after it).
    """
    seen: dict[ConvShape, str] = {}
    for blk in space.blocks:
        for mid in blk.width_choices:
            for k in space.kernel_choices:
                for conv, shape in zip(BLOCK_CONVS, block_convs(blk, k, mid)):
                    seen.setdefault(shape, conv.role)
    return list(seen.items())
