"""Elastic supernet: extraction equivalence, kernel transforms, depth, width re-sort, BN recalibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apq_lightning.data import ImageDataModule
from apq_lightning.space import get_space
from apq_lightning.supernet import DynamicDepthwiseConv, Supernet, recalibrate_bn


def randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics / affine params and kernel transforms, so equalities mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
            if isinstance(m, DynamicDepthwiseConv):
                for p in m.transforms.values():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("name", ["tiny", "apq_cifar", "apq_imagenet"])
def test_extract_equals_supernet(name):
    torch.manual_seed(0)
    sp = get_space(name)
    net = randomise(Supernet(name, 10)).eval()
    rng = np.random.default_rng(0)
    x = torch.randn(1 if name == "apq_imagenet" else 4, 3, sp.image_size, sp.image_size)
    subnets = [sp.largest(), sp.smallest()] + [sp.sample(rng) for _ in range(20)]
    worst = 0.0
    with torch.no_grad():
        for s in subnets:
            net.set_active(s)
            model = net.extract(s).eval()
            # Plain torch modules only: no dynamic layer in the static model.
            assert not any(type(m).__module__.endswith("supernet") for m in model.modules())
            assert len(model.blocks) == sum(s.active_mask)
            worst = max(worst, (net(x) - model(x)).abs().max().item())
    assert worst <= 1e-5


def test_kernel_transform_shapes_and_effect():
    conv = DynamicDepthwiseConv(16, (3, 5, 7), stride=1)
    assert set(conv.transforms) == {"7to5", "5to3"}
    assert conv.transforms["7to5"].shape == (25, 25) and conv.transforms["5to3"].shape == (9, 9)
    for k in (3, 5, 7):
        assert conv.active_weight(12, k).shape == (12, 1, k, k)
    # identity start: the 3x3 kernel is the centre of the 7x7
    assert torch.allclose(conv.active_weight(16, 3), conv.weight[:, :, 2:5, 2:5])
    w7, w5 = conv.active_weight(16, 7).clone(), conv.active_weight(16, 5).clone()
    with torch.no_grad():
        conv.transforms["5to3"].add_(torch.randn(9, 9))
    assert torch.equal(conv.active_weight(16, 7), w7) and torch.equal(conv.active_weight(16, 5), w5)
    assert not torch.allclose(conv.active_weight(16, 3), conv.weight[:, :, 2:5, 2:5])
    # gradients reach the transformation matrices through a small kernel
    x = torch.randn(2, 16, 8, 8)
    conv.active_kernel = 3
    conv(x).square().sum().backward()
    assert conv.transforms["5to3"].grad.abs().sum() > 0 and conv.transforms["7to5"].grad.abs().sum() > 0


def test_depth_skipping():
    sp = get_space("tiny")
    net = randomise(Supernet("tiny", 10)).eval()
    s = sp.subnet([2, 3, 4, 2, 3, 1], [5] * sp.num_blocks, [b.width_choices[-1] for b in sp.blocks])
    net.set_active(s)
    called = []
    hooks = [blk.register_forward_hook(lambda m, i, o, j=j: called.append(j)) for j, blk in enumerate(net.blocks)]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = net(x)
        assert called == s.active_blocks and len(called) == 2 + 3 + 4 + 2 + 3 + 1
        skipped = [i for i, a in enumerate(s.active_mask) if not a]
        for i in skipped:  # weights of skipped blocks must not matter
            for p in net.blocks[i].parameters():
                p.add_(1.0)
        assert torch.equal(net(x), y)
        net.blocks[s.active_blocks[1]].expand_conv.weight.add_(1.0)
        assert not torch.allclose(net(x), y)
    for h in hooks:
        h.remove()


def test_width_resort_preserves_function():
    sp = get_space("tiny")
    torch.manual_seed(1)
    net = randomise(Supernet("tiny", 10), seed=1).eval()
    with torch.no_grad():  # unequal channel importances
        for blk in net.blocks:
            blk.project_conv.weight.mul_(torch.rand(1, blk.project_conv.weight.shape[1], 1, 1) * 3)
    x = torch.randn(4, 3, 16, 16)
    narrow = sp.subnet([4] * 5 + [1], [7] * sp.num_blocks, [b.width_choices[0] for b in sp.blocks])
    with torch.no_grad():
        net.set_active(sp.largest())
        full_before = net(x)
        net.set_active(narrow)
        narrow_before = net(x)
        net.sort_channels()
        net.set_active(sp.largest())
        full_after = net(x)
        net.set_active(narrow)
        narrow_after = net(x)
    assert (full_before - full_after).abs().max() <= 1e-5
    assert not torch.allclose(narrow_before, narrow_after, atol=1e-4)  # the slice now holds other channels
    for blk in net.blocks:
        imp = blk.project_conv.weight.abs().sum(dim=(0, 2, 3))
        assert (imp[:-1] >= imp[1:] - 1e-6).all()


def _accuracy(model: nn.Module, loader) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in loader:
            right += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return right / total


def test_bn_recalibration_restores_accuracy(seed):
    """Corrupted BN statistics break a trained subnet; re-calibration on 8 batches restores it.

    Margins are relative (after vs. before corruption), so they hold on any CPU, thread count
    and seed (docs/testing.md: trained accuracy 0.79-0.93, broken < 0.2, restored within 0.03).
    """
    torch.manual_seed(seed)
    dm = ImageDataModule("digits", batch_size=64, seed=seed)
    dm.setup()
    sp = get_space("tiny")
    net = Supernet("tiny", 10)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.train()
    for _ in range(4):
        for x, y in dm.train_dataloader():
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    model = net.extract(sp.largest())
    acc = _accuracy(model, dm.heldout_dataloader())
    assert acc > 0.5  # trained: far above chance (0.1)
    with torch.no_grad():  # wrong statistics, as after sharing BN across many subnets
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 2.0)
                m.running_var.uniform_(5.0, 10.0)
    broken = _accuracy(model, dm.heldout_dataloader())
    before = model.stem.bn.running_mean.clone()
    used = recalibrate_bn(model, dm.calib_dataloader(8), num_batches=8)
    assert used == 8
    assert not torch.allclose(before, model.stem.bn.running_mean)
    assert model.stem.bn.momentum == 0.1  # restored after the cumulative average
    fixed = _accuracy(model, dm.heldout_dataloader())
    print(f"BN recalibration: trained {acc:.3f}, corrupted {broken:.3f}, re-calibrated {fixed:.3f}")
    assert broken < acc - 0.2
    assert fixed > broken + 0.2
    assert fixed > acc - 0.1
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(model, [])


def test_activated_restores_previous_subnet():
    sp = get_space("tiny")
    net = Supernet("tiny", 10)
    small = sp.smallest()
    with net.activated(small):
        assert net.active_subnet == small and len(net.active_block_modules()) == 11
    assert net.active_subnet == sp.largest()


def test_set_active_rejects_other_space():
    net = Supernet("tiny", 10)
    with pytest.raises(ValueError, match="belongs to space 'apq_cifar'"):
        net.set_active(get_space("apq_cifar").largest())


@pytest.mark.parametrize("name", ["tiny", "apq_cifar"])
def test_networks_are_the_layout(name):
    """The torch networks are what :mod:`apq_lightning.layout` describes: every fixed layer and
    every block conv exists under its name (in the extracted model and in the supernet), with the
    layout's geometry, BN / ReLU6 / bias, and the policy's bits reach the convs it names."""
    from apq_lightning.layout import BLOCK_CONVS, FIXED_LAYERS, ConvShape, block_policy

    sp = get_space(name)
    subnet = sp.sample(np.random.default_rng(1), quantized=True)
    net = Supernet(name, 7)
    model = net.extract(subnet)
    sizes: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda m, i, n=n: sizes.update({n: i[0].shape[-1]}))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()(torch.zeros(1, 3, sp.image_size, sp.image_size))
    for h in hooks:
        h.remove()

    def shape_of(module: nn.Module, size: int) -> ConvShape:
        if isinstance(module, nn.Linear):
            return ConvShape(module.in_features, module.out_features, 1, 1, 1, 0, 1)
        return ConvShape(module.in_channels, module.out_channels, size, module.kernel_size[0], module.stride[0],
                         module.padding[0], module.groups)

    modules = dict(model.named_modules())
    for spec in FIXED_LAYERS:
        layer = modules[spec.name]
        assert shape_of(layer, sizes[spec.name]) == spec.shape(sp, 7), spec.name
        assert (layer.bias is not None) == spec.bias
        assert isinstance(dict(net.named_modules())[spec.name], type(layer))
        if spec.bn:
            unit = modules[spec.name.rsplit(".", 1)[0]]
            assert isinstance(unit.bn, nn.BatchNorm2d) and hasattr(unit, "act") == spec.act, spec.name
    for j, i in enumerate(subnet.active_blocks):
        policy = block_policy(subnet.bits.block(i))
        with net.activated(subnet):
            dyn = net.blocks[i]
            for spec, shape in zip(BLOCK_CONVS, [c.shape(sp.blocks[i], subnet.kernels[i], subnet.widths[i])
                                                 for c in BLOCK_CONVS]):
                name_ = f"blocks.{j}.{spec.name}"
                assert shape_of(modules[name_], sizes[name_]) == shape, name_
                unit = modules[name_.rsplit(".", 1)[0]]  # conv -> BN (-> ReLU6)
                assert isinstance(unit.bn, nn.BatchNorm2d) and hasattr(unit, "act") == spec.act
                assert getattr(dyn, spec.supernet_attr).active_bits == spec.layer_bits(policy)
