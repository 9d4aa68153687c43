"""The elastic once-for-all supernet with fine-grained channels (stage 1 of APQ).

One set of weights holds every subnet of a :class:`~apq_lightning.space.SearchSpace`:

* **elastic kernel** – a depthwise conv stores the largest kernel; smaller kernels take the
  centre of the next larger one through a learned ``k²×k²`` transformation (7→5→3), so that
  a small kernel is not forced to equal the centre of the large one (once-for-all);
* **elastic width** – a block runs the first ``mid`` channels of its expanded layer; before
  width training :meth:`Supernet.sort_channels` re-orders channels by importance so the
  first ones are the most useful (the full network's function is unchanged);
* **elastic depth** – the first ``d`` blocks of a stage run;
* **dynamic BatchNorm** – statistics and affine parameters are sliced with the channels.

``set_active(subnet)`` selects a subnet in place (cheap; used every training step),
``extract(subnet)`` copies its weights into a plain static :class:`SubnetModel`.
Reading and writing supernet files is :mod:`apq_lightning.supernet_io`'s.
Every dynamic conv has a ``quantizer`` slot (``None`` = float) and an ``active_bits`` pair
set from the subnet's policy, which the quantization package fills in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from apq_lightning.batches import iter_images
from apq_lightning.layers import InvertedResidual, MBConvNet, SubnetModel
from apq_lightning.layout import BLOCK_CONVS, block_policy
from apq_lightning.space import BlockSpec, SearchSpace, Subnet, get_space


# --------------------------------------------------------------------------------------
# Dynamic ops
# --------------------------------------------------------------------------------------
class DynamicConv(nn.Module):
    """Base of the dynamic convs: owns the full weight and the optional quantizer hook."""

    def __init__(self) -> None:
        super().__init__()
        self.quantizer: nn.Module | None = None
        self.active_bits: tuple[int | None, int | None] = (None, None)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int) -> torch.Tensor:
        if self.quantizer is not None:
            x, weight = self.quantizer(x, weight, self.active_bits)
        return F.conv2d(x, weight, None, stride, weight.shape[-1] // 2, 1, groups)


class DynamicPointConv(DynamicConv):
    """1x1 conv whose input channels follow ``x`` and whose output channels are set."""

    def __init__(self, max_in: int, max_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_out, max_in, 1, 1))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        self.active_out = max_out

    def active_weight(self, cin: int) -> torch.Tensor:
        return self.weight[: self.active_out, :cin]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.active_weight(x.shape[1]), 1, 1)


class DynamicDepthwiseConv(DynamicConv):
    """Depthwise conv with elastic kernel size via learned kernel transformations."""

    def __init__(self, max_channels: int, kernel_choices: tuple[int, ...], stride: int) -> None:
        super().__init__()
        self.kernel_choices = tuple(sorted(kernel_choices))
        self.stride = stride
        kmax = self.kernel_choices[-1]
        self.weight = nn.Parameter(torch.empty(max_channels, 1, kmax, kmax))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        # One matrix per step down (e.g. "7to5", "5to3"), shared by all channels; identity start
        # so that, before training, a small kernel is the centre of the larger one.
        self.transforms = nn.ParameterDict(
            {
                f"{big}to{small}": nn.Parameter(torch.eye(small * small))
                for big, small in zip(self.kernel_choices[:0:-1], self.kernel_choices[-2::-1])
            }
        )
        self.active_kernel = kmax
        self._kept: tuple[tuple, torch.Tensor] | None = None  # see active_weight

    def active_weight(self, channels: int, kernel: int | None = None) -> torch.Tensor:
        kernel = kernel or self.active_kernel
        if torch.is_grad_enabled() or kernel == self.kernel_choices[-1]:
            self._kept = None
            return self._transformed(channels, kernel)
        # Without autograd (scoring a subnet: one call per batch), the transformed kernel is
        # kept while the parameters are unchanged, and returned as the same tensor, so that a
        # quantizer can keep its quantized copy too (quant.supernet.SupernetQuantizer).
        params = (self.weight, *self.transforms.values())
        key = (channels, kernel, *((p.data_ptr(), p._version) for p in params))
        if self._kept is None or self._kept[0] != key:
            self._kept = (key, self._transformed(channels, kernel))
        return self._kept[1]

    def _transformed(self, channels: int, kernel: int) -> torch.Tensor:
        w = self.weight[:channels]
        size = w.shape[-1]
        for big, small in zip(self.kernel_choices[:0:-1], self.kernel_choices[-2::-1]):
            if size <= kernel:
                break
            start = (big - small) // 2
            w = w[:, :, start : start + small, start : start + small]
            w = (w.reshape(channels, small * small) @ self.transforms[f"{big}to{small}"]).reshape(
                channels, 1, small, small
            )
            size = small
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        return self._conv(x, self.active_weight(c), self.stride, c)


class DynamicBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first ``C`` channels of the input; statistics are updated in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.num_features:
            return super().forward(x)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        else:
            factor = 0.0
        use_batch_stats = self.training or self.running_mean is None
        return F.batch_norm(
            x,
            self.running_mean[:c] if self.running_mean is not None else None,
            self.running_var[:c] if self.running_var is not None else None,
            self.weight[:c],
            self.bias[:c],
            use_batch_stats,
            factor,
            self.eps,
        )


# --------------------------------------------------------------------------------------
# Dynamic block
# --------------------------------------------------------------------------------------
class DynamicMBConv(nn.Module):
    """An elastic MBConv block: kernel and mid width are chosen with :meth:`set_active`."""

    def __init__(self, spec: BlockSpec, kernel_choices: tuple[int, ...]) -> None:
        super().__init__()
        self.spec = spec
        mid = spec.width_choices[-1]
        self.expand_conv = DynamicPointConv(spec.in_channels, mid)
        self.expand_bn = DynamicBatchNorm2d(mid)
        self.dw_conv = DynamicDepthwiseConv(mid, kernel_choices, spec.stride)
        self.dw_bn = DynamicBatchNorm2d(mid)
        self.project_conv = DynamicPointConv(mid, spec.out_channels)
        self.project_bn = DynamicBatchNorm2d(spec.out_channels)
        self.set_active(max(kernel_choices), mid)

    def set_active(self, kernel: int, mid: int) -> None:
        self.expand_conv.active_out = mid
        self.dw_conv.active_kernel = kernel
        self.active_kernel, self.active_mid = kernel, mid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ReLU6 in place on BN's fresh output, as the extracted model's nn.ReLU6(inplace=True):
        # the same values, one tensor less per activation (on a CPU, that allocation costs as
        # much as the clamp itself for a large activation)
        y = F.relu6(self.expand_bn(self.expand_conv(x)), inplace=True)
        y = F.relu6(self.dw_bn(self.dw_conv(y)), inplace=True)
        y = self.project_bn(self.project_conv(y))
        return x + y if self.spec.residual else y

    @torch.no_grad()
    def sort_channels(self) -> None:
        """Re-order mid channels by importance (L1 of the project weights), keeping the function.

        The permutation is applied consistently to the expand conv's outputs, both mid BNs,
        the depthwise conv and the project conv's inputs, so the full block computes the
        same function while its first channels become the most important ones.
        """
        importance = self.project_conv.weight.abs().sum(dim=(0, 2, 3))
        order = torch.argsort(importance, descending=True)
        self.expand_conv.weight.copy_(self.expand_conv.weight[order])
        self.dw_conv.weight.copy_(self.dw_conv.weight[order])
        self.project_conv.weight.copy_(self.project_conv.weight[:, order])
        for bn in (self.expand_bn, self.dw_bn):
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(bn, name)
                t.copy_(t[order])


# --------------------------------------------------------------------------------------
# Supernet
# --------------------------------------------------------------------------------------
class Supernet(MBConvNet):
    """Once-for-all supernet over a search space (see module docstring)."""

    def __init__(self, space: str | SearchSpace = "apq_cifar", num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.space = get_space(space)
        sp = self.space
        self.num_classes = num_classes
        self._build_front(sp)
        self.blocks = nn.ModuleList(DynamicMBConv(b, sp.kernel_choices) for b in sp.blocks)
        self._build_back(sp, num_classes, dropout)
        self._init_weights()
        self.active_subnet: Subnet = sp.largest()
        self.set_active(self.active_subnet)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of residual blocks: a fresh block starts as identity, which
        # makes deep/shallow subnets agree early in training.
        for blk in self.blocks:
            if blk.spec.residual:
                nn.init.zeros_(blk.project_bn.weight)

    # ---- selection -----------------------------------------------------------------------
    def set_active(self, subnet: Subnet) -> None:
        """Make ``subnet`` (and its bit policy, if any) the one that ``forward`` runs."""
        self.space.check(subnet)
        self.active_subnet = subnet
        for i in subnet.active_blocks:
            blk = self.blocks[i]
            blk.set_active(subnet.kernels[i], subnet.widths[i])
            policy = block_policy(subnet.bits.block(i) if subnet.bits is not None else None)
            for conv in BLOCK_CONVS:
                getattr(blk, conv.supernet_attr).active_bits = conv.layer_bits(policy)

    @contextmanager
    def activated(self, subnet: Subnet) -> Iterator[Supernet]:
        """Temporarily run ``subnet``; the previous active subnet is restored on exit."""
        previous = self.active_subnet
        self.set_active(subnet)
        try:
            yield self
        finally:
            self.set_active(previous)

    def active_block_modules(self) -> list[DynamicMBConv]:
        return [self.blocks[i] for i in self.active_subnet.active_blocks]

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.active_block_modules():
            x = blk(x)
        return x

    # ---- width re-sort ---------------------------------------------------------------------
    def sort_channels(self) -> None:
        """Importance re-sort of every block's mid channels (before elastic-width training)."""
        for blk in self.blocks:
            blk.sort_channels()

    # ---- extraction ------------------------------------------------------------------------
    @torch.no_grad()
    def extract(self, subnet: Subnet | None = None) -> SubnetModel:
        """Copy ``subnet``'s weights into a plain static model (same device/dtype, eval-equal)."""
        subnet = subnet or self.active_subnet
        self.space.check(subnet)
        ref = next(self.parameters())
        model = SubnetModel(subnet, self.num_classes, self.dropout.p).to(device=ref.device, dtype=ref.dtype)
        for name in ("stem", "first", "head", "classifier"):
            _copy_float_state(getattr(self, name), getattr(model, name))
        for static, i in zip(model.blocks, subnet.active_blocks):
            _copy_block(self.blocks[i], static, subnet.kernels[i], subnet.widths[i])
        set_bn_param(model, **bn_param(self))  # eps is no state entry: the fixed layers need it too
        model.train(self.training)
        return model


def _copy_float_state(src: nn.Module, dst: nn.Module) -> None:
    """Copy ``src``'s weights and BN buffers into ``dst`` by name. Entries that ``dst`` lacks
    (quantizer ranges of a quantized supernet's fixed layers) are left out: an extracted model
    is always float; every entry of ``dst`` must be present."""
    want = dst.state_dict()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in want})


def _copy_block(dyn: DynamicMBConv, static: InvertedResidual, kernel: int, mid: int) -> None:
    cin = dyn.spec.in_channels
    static.expand.conv.weight.copy_(dyn.expand_conv.weight[:mid, :cin])
    static.depthwise.conv.weight.copy_(dyn.dw_conv.active_weight(mid, kernel))
    static.project.conv.weight.copy_(dyn.project_conv.weight[:, :mid])
    _copy_bn(dyn.expand_bn, static.expand.bn, mid)
    _copy_bn(dyn.dw_bn, static.depthwise.bn, mid)
    _copy_bn(dyn.project_bn, static.project.bn, dyn.spec.out_channels)


def bn_param(module: nn.Module) -> dict[str, float | None]:
    """``{"eps", "momentum"}`` of ``module``'s BatchNorm layers (its first one's; the networks
    here set one pair for all). Neither is a state-dict entry, so a weights file stores them
    beside the state dict (the APQ reference's supernet runs at eps 1e-3, torch's default is 1e-5)."""
    bn = next(m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return {"eps": float(bn.eps), "momentum": None if bn.momentum is None else float(bn.momentum)}


def set_bn_param(module: nn.Module, eps: float, momentum: float | None) -> None:
    """Give every BatchNorm layer of ``module`` this ``eps`` (> 0) and ``momentum`` (in (0, 1], or
    ``None``: cumulative average); a bad value is a one-line ``ValueError``."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"batchnorm eps must be a number in (0, 1), got {eps!r}")
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                 or not 0 < momentum <= 1):
        raise ValueError(f"batchnorm momentum must be a number in (0, 1] or null, got {momentum!r}")
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps, m.momentum = float(eps), None if momentum is None else float(momentum)


def _copy_bn(src: nn.BatchNorm2d, dst: nn.BatchNorm2d, c: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, name).copy_(getattr(src, name)[:c])
    dst.num_batches_tracked.copy_(src.num_batches_tracked)
    dst.eps, dst.momentum = src.eps, src.momentum


# --------------------------------------------------------------------------------------
# BatchNorm re-calibration
# --------------------------------------------------------------------------------------
@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, num_batches: int | None = None) -> int:
    """Reset every BN's running statistics and re-estimate them on training batches.

    A subnet sliced out of a supernet inherits statistics accumulated over *all* subnets,
    which do not match its own activations; an exact cumulative average over a few batches
    fixes that (OFA / APQ evaluate every subnet this way). Returns the number of batches used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [(bn.momentum, bn.training) for bn in bns]
    was_training = model.training
    device = next(model.parameters()).device
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    used = 0
    try:
        for x in iter_images(batches, num_batches, device):
            model(x)
            used += 1
    finally:
        for bn, (momentum, _) in zip(bns, saved):
            bn.momentum = momentum
        model.train(was_training)
    if used == 0:
        raise ValueError("recalibrate_bn: no batches were given; pass a non-empty loader of training images")
    return used
