"""Static building blocks: the plain-torch models that an extracted subnet is made of.

Everything here is ordinary ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` so that an
extracted subnet can be quantized, exported or deployed without any supernet code.
Module names are part of the contract with the quantization code and are listed in
:mod:`apq_lightning.layout`: inside a block the three convs are ``expand.conv``,
``depthwise.conv`` and ``project.conv``; every block carries the space's ``block_index`` it
came from.

The fixed layers (stem, first block, head conv, classifier) are built here once, from the
layout's geometry, for every network that has them: :class:`SubnetModel`, the supernet and
the modules timed for a latency table (:mod:`apq_lightning.hardware.measure`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from apq_lightning.layout import ConvShape, FixedLayerSpec, fixed_layer
from apq_lightning.space import SearchSpace, Subnet, get_space


class ConvBNAct(nn.Sequential):
    """conv → BN → optional ReLU6 (the MobileNetV2 unit)."""

    def __init__(
        self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict({
            "conv": nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            "bn": nn.BatchNorm2d(cout),
        })
        if act:
            layers["act"] = nn.ReLU6(inplace=True)
        super().__init__(layers)


def conv_unit(shape: ConvShape, act: bool) -> ConvBNAct:
    """The network's unit for one conv of the layout (conv + BN (+ ReLU6)); 'same' padding only."""
    if shape.padding != shape.kernel // 2:
        raise ValueError(f"layer {shape}: only 'same' padding (k//2) is built by the network")
    return ConvBNAct(shape.in_channels, shape.out_channels, shape.kernel, shape.stride, shape.groups, act=act)


class InvertedResidual(nn.Module):
    """MBConv: 1x1 expand → kxk depthwise (stride) → 1x1 project, residual when shapes allow.

    ``expand`` is ``None`` for the fixed first block (expand ratio 1).
    """

    def __init__(
        self, cin: int, mid: int, cout: int, kernel: int, stride: int, expand: bool = True, block_index: int = -1
    ) -> None:
        super().__init__()
        self.block_index = block_index
        self.expand = ConvBNAct(cin, mid, 1) if expand else None
        self.depthwise = ConvBNAct(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBNAct(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


# ---- the fixed layers, from the layout ----------------------------------------------------------
def _fixed(space: SearchSpace, role: str, num_classes: int = 1) -> tuple[FixedLayerSpec, ConvShape]:
    spec = fixed_layer(role)
    return spec, spec.shape(space, num_classes)


def build_stem(space: SearchSpace) -> ConvBNAct:
    spec, shape = _fixed(space, "stem")
    return conv_unit(shape, spec.act)


def build_first_block(space: SearchSpace) -> InvertedResidual:
    """The fixed first MBConv (expand ratio 1): depthwise and project of the layout."""
    _, dw = _fixed(space, "first.depthwise")
    _, pw = _fixed(space, "first.project")
    return InvertedResidual(dw.in_channels, dw.out_channels, pw.out_channels, dw.kernel, dw.stride, expand=False)


def build_head(space: SearchSpace) -> ConvBNAct:
    spec, shape = _fixed(space, "head")
    return conv_unit(shape, spec.act)


def build_classifier(space: SearchSpace, num_classes: int) -> nn.Linear:
    spec, shape = _fixed(space, "classifier", num_classes)
    return nn.Linear(shape.in_channels, shape.out_channels, bias=spec.bias)


class MBConvNet(nn.Module):
    """What every network of a space shares: stem → first block → ``blocks`` → head conv →
    pool → dropout → classifier. Subclasses set ``self.blocks`` between :meth:`_build_front`
    and :meth:`_build_back` (the attribute order fixes the state-dict and module order) and
    define how the blocks run in :meth:`run_blocks`."""

    def _build_front(self, space: SearchSpace) -> None:
        self.stem = build_stem(space)
        self.first = build_first_block(space)

    def _build_back(self, space: SearchSpace, num_classes: int, dropout: float) -> None:
        self.head = build_head(space)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = build_classifier(space, num_classes)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The elastic blocks: static in SubnetModel, the active subnet's in Supernet."""
        raise NotImplementedError(f"{type(self).__name__} must implement run_blocks")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.run_blocks(self.first(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.forward_features(x)).flatten(1)
        return self.classifier(self.dropout(x))


class SubnetModel(MBConvNet):
    """A standalone static network for one subnet (what ``Supernet.extract`` returns)."""

    def __init__(self, subnet: Subnet, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        space = get_space(subnet.space)
        self.subnet = subnet
        self._build_front(space)
        blocks = []
        for i in subnet.active_blocks:
            spec = space.blocks[i]
            blocks.append(
                InvertedResidual(
                    spec.in_channels, subnet.widths[i], spec.out_channels, subnet.kernels[i], spec.stride,
                    block_index=i,
                )
            )
        self.blocks = nn.Sequential(*blocks)
        self._build_back(space, num_classes, dropout)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)
