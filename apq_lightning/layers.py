"""Static building blocks: the plain-torch models that an extracted subnet is made of.

Everything here is ordinary ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` so that an
extracted subnet can be quantized, exported or deployed without any supernet code.
Module names are part of the contract with the quantization code: inside a block the three
convs are ``expand.conv``, ``depthwise.conv`` and ``project.conv``; every block carries the
space's ``block_index`` it came from.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from apq_lightning.space import Subnet, get_space


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


class SubnetModel(nn.Module):
    """A standalone static network for one subnet (what ``Supernet.extract`` returns)."""

    def __init__(self, subnet: Subnet, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        space = get_space(subnet.space)
        self.subnet = subnet
        self.stem = ConvBNAct(3, space.stem_channels, 3, space.stem_stride)
        self.first = InvertedResidual(
            space.stem_channels, space.stem_channels, space.first_block_channels, 3, 1, expand=False
        )
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
        self.head = ConvBNAct(space.stage_channels[-1], space.head_channels, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(space.head_channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.first(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.forward_features(x)).flatten(1)
        return self.classifier(self.dropout(x))
