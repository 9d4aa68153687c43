"""Layer geometry of a space's networks, derived from the space alone (no torch).

The cost models price a subnet layer by layer, so they need the conv shapes that the
network (``apq_lightning.layers.SubnetModel``) runs, in the table's key format:

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

from apq_lightning.hardware.table import ConvShape
from apq_lightning.space import BlockSpec, SearchSpace

DEFAULT_NUM_CLASSES: dict[str, int] = {"apq_imagenet": 1000}
"""Classifier width when none is given: ImageNet for its space, 10 (CIFAR-10 / digits) otherwise."""


def default_num_classes(space: SearchSpace) -> int:
    return DEFAULT_NUM_CLASSES.get(space.name, 10)


def block_convs(block: BlockSpec, kernel: int, mid: int) -> tuple[ConvShape, ConvShape, ConvShape]:
    """Expand, depthwise and project conv of one elastic block at (kernel, mid)."""
    h = block.input_size
    return (
        ConvShape(block.in_channels, mid, h, 1, 1, 0, 1),
        ConvShape(mid, mid, h, kernel, block.stride, kernel // 2, mid),
        ConvShape(mid, block.out_channels, block.output_size, 1, 1, 0, 1),
    )


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


def head_layers(space: SearchSpace) -> tuple[FixedLayer, ...]:
    """What the table calls ``head``: the stem conv and the fixed first MBConv (expand ratio 1)."""
    stem = ConvShape(3, space.stem_channels, space.image_size, 3, space.stem_stride, 1, 1)
    h = stem.output_size
    c = space.stem_channels
    return (
        FixedLayer("stem", stem),
        FixedLayer("first.depthwise", ConvShape(c, c, h, 3, 1, 1, c)),
        FixedLayer("first.project", ConvShape(c, space.first_block_channels, h, 1, 1, 0, 1)),
    )


def tail_layers(space: SearchSpace, num_classes: int) -> tuple[FixedLayer, ...]:
    """What the table calls ``tail``: the 1x1 head conv and the linear classifier."""
    return (
        FixedLayer("head", ConvShape(space.stage_channels[-1], space.head_channels, space.final_size, 1, 1, 0, 1)),
        FixedLayer("classifier", ConvShape(space.head_channels, num_classes, 1, 1, 1, 0, 1), bn=False, bias=True),
    )


def fixed_layers(space: SearchSpace, num_classes: int) -> tuple[FixedLayer, ...]:
    return head_layers(space) + tail_layers(space, num_classes)


def block_extra_params(block: BlockSpec, mid: int) -> int:
    """BN parameters of a block (scale + shift after expand, depthwise and project)."""
    return 2 * (mid + mid + block.out_channels)


def distinct_block_convs(space: SearchSpace) -> list[tuple[ConvShape, str]]:
    """Every distinct elastic conv of a space with its role (``expand``/``depthwise``/``project``).

    Roles matter to a measured table only (the project conv has no ReLU6 after it).
    """
    seen: dict[ConvShape, str] = {}
    for blk in space.blocks:
        for mid in blk.width_choices:
            for k in space.kernel_choices:
                for role, shape in zip(("expand", "depthwise", "project"), block_convs(blk, k, mid)):
                    seen.setdefault(shape, role)
    return list(seen.items())
