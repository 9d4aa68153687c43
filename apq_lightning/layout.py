"""The layers of a space's networks, described once and without torch (docs/design.md §3.1, §7, §8).

Every network of a :class:`~apq_lightning.space.SearchSpace` -- the supernet, an extracted
:class:`~apq_lightning.layers.SubnetModel`, the modules timed for a latency table -- is

    stem conv → fixed first MBConv (depthwise, project) → elastic MBConv blocks → head conv
    → global pool → classifier

and the code that prices, quantizes or builds these layers needs the same facts about each of
them: its module name, its role, its kind (dense / pointwise / depthwise conv, linear), which
bit fields of the policy it takes, whether its input is signed, whether BN / ReLU6 / a bias
follow, and its geometry. They are written down here, once:

* :data:`FIXED_LAYERS` -- the always-on layers (stem, first block, head conv, classifier), at
  ``space.fixed_bits``; ``part`` says which fixed entry of a cost table (``head`` before the
  blocks, ``tail`` after them) prices the layer;
* :data:`BLOCK_CONVS` -- the convs of one elastic block, with the policy fields they take
  (both 1x1 convs the pw pair, the depthwise conv the dw pair) and the attribute of the
  supernet's dynamic block that holds them.

The quantization policy (:mod:`apq_lightning.quant.subnet`), the cost models
(:mod:`apq_lightning.hardware`) and the torch builders (:mod:`apq_lightning.layers`,
:mod:`apq_lightning.supernet`) derive their tables from these two; a new block type or a new
fixed layer is a change here (plus its torch module). Activation signedness follows from where
a layer's input comes from, not from data: after a ReLU6 it is unsigned, a block's input
(BN without activation) and the normalised image are signed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from apq_lightning.space import BIT_FIELDS, BlockSpec, SearchSpace


class ConvShape(NamedTuple):
    """Geometry of one conv layer (a linear layer is a 1x1 conv on a 1x1 map), in the field
    order of a cost-table key (docs/design.md §8.2)."""

    in_channels: int
    out_channels: int
    input_size: int
    kernel: int
    stride: int
    padding: int
    groups: int

    @property
    def output_size(self) -> int:
        return (self.input_size + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    @property
    def weight_params(self) -> int:
        return self.out_channels * (self.in_channels // self.groups) * self.kernel * self.kernel

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one sample: output elements x weights per output channel."""
        return self.out_channels * self.output_size**2 * (self.in_channels // self.groups) * self.kernel**2


LayerKind = Literal["conv", "pw", "dw", "linear"]
"""``conv``: dense kxk conv, ``pw``: 1x1 conv, ``dw``: depthwise conv, ``linear``: nn.Linear."""


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """What every consumer needs to know about one conv / linear layer of the network."""

    name: str
    """Module name: qualified in the network for a fixed layer (``stem.conv``), relative to the
    block for a block conv (``expand.conv``; in a SubnetModel ``blocks.<j>.expand.conv``)."""
    role: str
    """Short name used in cost tables and messages (``stem``, ``expand``, ``classifier``, ...)."""
    kind: LayerKind
    a_signed: bool
    """Whether the layer's input can be negative (signed activation quantizer)."""
    act: bool
    """ReLU6 after the layer's BN."""
    bn: bool = True
    bias: bool = False
    input_private: bool = False
    """Its input is read by this layer alone (a ReLU6 output inside a block, the last block's
    output, the pooled features); a block's input, which a residual may read too, and the image
    are not. Its activation quantizer may then overwrite the input when no gradient flows."""

    def extra_params(self, shape: ConvShape) -> int:
        """Parameters stored at 32 bits beside the weight: BN scale + shift per channel, the bias."""
        return 2 * shape.out_channels * self.bn + shape.out_channels * self.bias


@dataclass(frozen=True, kw_only=True)
class FixedLayerSpec(LayerSpec):
    """An always-on layer; it runs at the space's ``fixed_bits``."""

    part: Literal["head", "tail"]
    """The fixed cost-table entry that prices it: ``head`` (before the blocks) or ``tail``."""
    geometry: Callable[[SearchSpace, int], ConvShape] = field(compare=False, repr=False)
    """``geometry(space, num_classes)``."""

    def shape(self, space: SearchSpace, num_classes: int) -> ConvShape:
        return self.geometry(space, num_classes)


@dataclass(frozen=True, kw_only=True)
class BlockConvSpec(LayerSpec):
    """A conv of an elastic block; its bits come from the block's policy."""

    bits: tuple[str, str]
    """The policy fields ``(weight, activation)`` it takes, e.g. ``("pw_w", "pw_a")``."""
    supernet_attr: str
    """Attribute of the supernet's dynamic block that holds it."""
    geometry: Callable[[BlockSpec, int, int], ConvShape] = field(compare=False, repr=False)
    """``geometry(block, kernel, mid)``."""

    def shape(self, block: BlockSpec, kernel: int, mid: int) -> ConvShape:
        return self.geometry(block, kernel, mid)

    def layer_bits(self, policy: dict[str, int | None]) -> tuple[int | None, int | None]:
        """``(w_bits, a_bits)`` of this conv from one block's ``{field: bits}``."""
        return policy[self.bits[0]], policy[self.bits[1]]


# ---- geometry ------------------------------------------------------------------------------
FIRST_BLOCK_KERNEL = 3
"""Depthwise kernel of the fixed first block (expand ratio 1, stride 1)."""


def _stem(sp: SearchSpace, num_classes: int) -> ConvShape:
    return ConvShape(3, sp.stem_channels, sp.image_size, 3, sp.stem_stride, 1, 1)


def _first_depthwise(sp: SearchSpace, num_classes: int) -> ConvShape:
    c, k = sp.stem_channels, FIRST_BLOCK_KERNEL
    return ConvShape(c, c, _stem(sp, num_classes).output_size, k, 1, k // 2, c)


def _first_project(sp: SearchSpace, num_classes: int) -> ConvShape:
    dw = _first_depthwise(sp, num_classes)
    return ConvShape(dw.out_channels, sp.first_block_channels, dw.output_size, 1, 1, 0, 1)


def _head(sp: SearchSpace, num_classes: int) -> ConvShape:
    return ConvShape(sp.stage_channels[-1], sp.head_channels, sp.final_size, 1, 1, 0, 1)


def _classifier(sp: SearchSpace, num_classes: int) -> ConvShape:
    return ConvShape(sp.head_channels, num_classes, 1, 1, 1, 0, 1)  # after global pooling


def _expand(b: BlockSpec, kernel: int, mid: int) -> ConvShape:
    return ConvShape(b.in_channels, mid, b.input_size, 1, 1, 0, 1)


def _depthwise(b: BlockSpec, kernel: int, mid: int) -> ConvShape:
    return ConvShape(mid, mid, b.input_size, kernel, b.stride, kernel // 2, mid)


def _project(b: BlockSpec, kernel: int, mid: int) -> ConvShape:
    return ConvShape(mid, b.out_channels, b.output_size, 1, 1, 0, 1)


# ---- the layout ----------------------------------------------------------------------------
FIXED_LAYERS: tuple[FixedLayerSpec, ...] = (
    FixedLayerSpec(name="stem.conv", role="stem", kind="conv", a_signed=True, act=True, part="head",
                   geometry=_stem),  # input: the normalised image
    FixedLayerSpec(name="first.depthwise.conv", role="first.depthwise", kind="dw", a_signed=False, act=True,
                   part="head", geometry=_first_depthwise),
    FixedLayerSpec(name="first.project.conv", role="first.project", kind="pw", a_signed=False, act=False,
                   part="head", input_private=True, geometry=_first_project),
    FixedLayerSpec(name="head.conv", role="head", kind="pw", a_signed=True, act=True, part="tail",
                   input_private=True, geometry=_head),  # input: the last block's output (BN, no ReLU6)
    FixedLayerSpec(name="classifier", role="classifier", kind="linear", a_signed=False, act=False, bn=False,
                   bias=True, part="tail", input_private=True, geometry=_classifier),  # input: pooled ReLU6 output
)
"""The always-on layers, in network order."""

BLOCK_CONVS: tuple[BlockConvSpec, ...] = (
    BlockConvSpec(name="expand.conv", role="expand", kind="pw", a_signed=True, act=True,
                  bits=("pw_w", "pw_a"), supernet_attr="expand_conv", geometry=_expand),
    BlockConvSpec(name="depthwise.conv", role="depthwise", kind="dw", a_signed=False, act=True,
                  bits=("dw_w", "dw_a"), supernet_attr="dw_conv", input_private=True, geometry=_depthwise),
    BlockConvSpec(name="project.conv", role="project", kind="pw", a_signed=False, act=False,
                  bits=("pw_w", "pw_a"), supernet_attr="project_conv", input_private=True,
                  geometry=_project),
)
"""The convs of one elastic block, in network order."""

BLOCK_ROLES: tuple[str, ...] = tuple(c.role for c in BLOCK_CONVS)


def fixed_layer(role: str) -> FixedLayerSpec:
    """The fixed layer with ``role`` (``stem``, ``first.depthwise``, ``head``, ...)."""
    for spec in FIXED_LAYERS:
        if spec.role == role:
            return spec
    raise KeyError(f"no fixed layer with role {role!r}; roles: {[s.role for s in FIXED_LAYERS]}")


def block_conv_shapes(block: BlockSpec, kernel: int, mid: int) -> tuple[ConvShape, ...]:
    """Geometry of every conv of ``block`` at (kernel, mid), in :data:`BLOCK_CONVS` order."""
    return tuple(c.shape(block, kernel, mid) for c in BLOCK_CONVS)


def block_policy(bits: tuple[int, ...] | None) -> dict[str, int | None]:
    """``{field: bits}`` of one block from its 4-tuple (``None``: a float block)."""
    return dict(zip(BIT_FIELDS, bits)) if bits is not None else dict.fromkeys(BIT_FIELDS)


__all__ = [
    "BLOCK_CONVS", "BLOCK_ROLES", "FIRST_BLOCK_KERNEL", "FIXED_LAYERS", "BlockConvSpec", "ConvShape",
    "FixedLayerSpec", "LayerKind", "LayerSpec", "block_conv_shapes", "block_policy", "fixed_layer",
]
