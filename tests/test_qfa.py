"""Quantized-for-all: batch-range quantizers, the supernet's re-estimation, the 'quant' phase and
the policy sampler (issue 15)."""

from __future__ import annotations

import dataclasses

import lightning as L
import numpy as np
import pytest
import torch

from apq_lightning.data import ImageDataModule
from apq_lightning.modules import Phase, SupernetModule
from apq_lightning.quant.quantizers import LinearQuantizer, fake_quantize_range
from apq_lightning.quant.supernet import quantize_supernet, reestimate_supernet, supernet_quant_disabled
from apq_lightning.space import get_space
from apq_lightning.space.policy_sampling import mean_bits, sample_policy
from apq_lightning.supernet import Supernet
from apq_lightning.supernet_io import export_supernet_weights, is_quantized_for_all, load_supernet

TINY = get_space("tiny")


def test_batch_range_quantizer_uses_the_batch_in_training_and_the_running_range_in_eval():
    q = LinearQuantizer(4, signed=False).set_range_source("batch", momentum=0.5)
    x1, x2 = torch.rand(64) * 2.0, torch.rand(64) * 4.0
    y1 = q(x1)
    assert float(q.v) == pytest.approx(float(x1.max()))
    assert len(torch.unique(y1)) <= 16 and float(y1.max()) == pytest.approx(float(x1.max()))  # covers the batch
    q(x2)
    assert float(q.v) == pytest.approx(0.5 * float(x1.max()) + 0.5 * float(x2.max()))  # running range
    q.eval()
    y = q(x2)
    assert float(y.max()) == pytest.approx(float(q.v), rel=1e-6)  # clipped to the running range
    assert torch.equal(y, fake_quantize_range(x2, q.v, 4, False))  # the cached evaluation path: the same numbers
    q.train()
    q(x1)  # the running range moves; evaluation must follow it, not a cached scale
    q.eval()
    assert torch.equal(q(x2), fake_quantize_range(x2, q.v, 4, False)) and not torch.equal(q(x2), y)
    # gradients pass everywhere when the range was taken from the batch itself
    q.train()
    x = (torch.rand(32) * 3).requires_grad_()
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match="range source 'nope' unknown"):
        q.set_range_source("nope")
    fresh = LinearQuantizer(4, signed=True).set_range_source("batch").eval()
    with pytest.raises(RuntimeError, match="no running range yet"):
        fresh(torch.randn(4))


def test_running_range_quantizer_clips_the_batch_to_the_shared_range_in_training():
    q = LinearQuantizer(4, signed=False).set_range_source("running", momentum=0.5)
    x1, x2 = torch.rand(64) * 2.0, torch.rand(64) * 4.0
    assert float(q(x1).max()) == pytest.approx(float(x1.max()))  # the first batch sets the range
    y2 = q(x2)
    v = 0.5 * float(x1.max()) + 0.5 * float(x2.max())
    assert float(q.v) == pytest.approx(v) and float(y2.max()) == pytest.approx(v, rel=1e-6)  # clipped, not covered
    x = (torch.rand(32) * 2 * v).requires_grad_()
    q(x).sum().backward()  # the straight-through gradient stops where the shared range clips
    passes = (x.detach() < float(q.v) * 15.5 / 15).float()  # up to qmax + 1/2 levels
    assert 0 < float(x.grad.sum()) < 32 and torch.equal(x.grad, passes)


@pytest.mark.parametrize("ranges", ["batch", "running"])
def test_reestimation_keeps_the_trained_range_source(ranges):
    torch.manual_seed(0)
    net = quantize_supernet(Supernet("tiny", 10), ranges=ranges)
    net.set_active(TINY.sample(1, quantized=True))
    reestimate_supernet(net, [(torch.randn(16, 3, 16, 16), None)] * 2)
    sources = {q.input_quantizer.range_source for q in net.modules() if hasattr(q, "input_quantizer")}
    assert sources == {ranges} and net._apq_quant.ranges == ranges
    with pytest.raises(ValueError, match="quant_ranges must be one of batch, running"):
        SupernetModule(space="tiny", phases=[Phase("quant", 1)], quant_ranges="learned")


def test_cumulative_reestimation_does_not_depend_on_what_ran_before():
    torch.manual_seed(0)
    net = quantize_supernet(Supernet("tiny", 10), ranges="batch")
    batches = [(torch.randn(16, 3, 16, 16), None) for _ in range(3)]
    sub = TINY.sample(1, quantized=True)

    def score() -> torch.Tensor:
        net.set_active(sub)
        reestimate_supernet(net, batches)
        with torch.no_grad():
            return net(batches[0][0])

    first = score()
    net.train()
    net.set_active(TINY.largest(8))
    net(torch.randn(16, 3, 16, 16) * 5)  # another subnet and other data move every running statistic
    torch.testing.assert_close(score(), first)
    with supernet_quant_disabled(net), torch.no_grad():
        float_out = net(batches[0][0])
    assert not torch.allclose(float_out, first)  # quantized for real
    with pytest.raises(ValueError, match="ranges='batch'"):
        reestimate_supernet(quantize_supernet(Supernet("tiny", 10)), batches)


def test_in_place_quantization_of_private_inputs_changes_no_number():
    """The depthwise and project convs quantize their ReLU6 input in place without autograd
    (layout's input_private); the block input, which the residual reads too, is never
    overwritten. Scores, BN statistics and ranges equal those of the out-of-place path, and a
    gradient step is untouched (autograd on: nothing in place)."""
    torch.manual_seed(0)
    net = quantize_supernet(Supernet("tiny", 10), ranges="batch")
    flags = {q.name.split(".")[-1]: q.input_quantizer.overwrite_input
             for q in net.modules() if hasattr(q, "input_quantizer") and hasattr(q, "name")}
    assert flags == {"expand_conv": False, "dw_conv": True, "project_conv": True}
    fixed = {n: m.input_quantizer.overwrite_input for n, m in net.named_modules()
             if n in {"stem.conv", "first.depthwise.conv", "first.project.conv", "head.conv", "classifier"}}
    assert fixed == {"stem.conv": False, "first.depthwise.conv": False,  # the image; tiny's first block is residual
                     "first.project.conv": True, "head.conv": True, "classifier": True}
    batches = [(torch.randn(16, 3, 16, 16), None) for _ in range(2)]
    sub = TINY.sample(3, quantized=True)
    private = [q for q in net.modules() if isinstance(q, LinearQuantizer) and q.overwrite_input]

    def score(overwrite: bool) -> tuple[torch.Tensor, dict]:
        for q in private:
            q.overwrite_input = overwrite
        net.set_active(sub)
        reestimate_supernet(net, batches)
        x = batches[0][0].clone()
        with torch.no_grad():
            out = net(x)
        assert torch.equal(x, batches[0][0])  # the images are not touched
        return out, {k: v.clone() for k, v in net.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}

    (out_in, state_in), (out_out, state_out) = score(True), score(False)
    assert torch.equal(out_in, out_out)
    assert state_in.keys() == state_out.keys() and all(torch.equal(state_in[k], state_out[k]) for k in state_in)

    def grads(overwrite: bool) -> list[torch.Tensor]:
        for q in private:
            q.overwrite_input = overwrite
        net.train()
        net.zero_grad()
        net(batches[1][0]).logsumexp(1).sum().backward()
        return [p.grad.clone() for p in net.parameters() if p.grad is not None]

    torch.manual_seed(1)
    g_in = grads(True)
    torch.manual_seed(1)
    assert all(torch.equal(a, b) for a, b in zip(g_in, grads(False)))


def test_kept_quantized_weights_follow_every_weight_change():
    """Without autograd the supernet keeps each conv's quantized (and transformed) weight between
    batches; a changed weight, kernel transform, bit width or subnet must be seen at once."""
    torch.manual_seed(0)
    net = quantize_supernet(Supernet("tiny", 10), ranges="batch")
    x = torch.randn(8, 3, 16, 16)
    sub = TINY.sample(5, quantized=True)
    small = min(TINY.kernel_choices)
    sub = dataclasses.replace(sub, kernels=tuple(small if k else 0 for k in sub.kernels))  # transformed kernels

    def fresh(subnet) -> torch.Tensor:  # the same weights in a supernet that has kept nothing yet
        other = quantize_supernet(Supernet("tiny", 10), ranges="batch")
        other.load_state_dict(net.state_dict())
        other.set_active(subnet)
        reestimate_supernet(other, [(x, None)])
        with torch.no_grad():
            return other(x)

    def score(subnet) -> torch.Tensor:
        net.set_active(subnet)
        reestimate_supernet(net, [(x, None)])
        with torch.no_grad():
            return net(x)

    before = score(sub)
    torch.testing.assert_close(before, fresh(sub), rtol=0, atol=0)
    with torch.no_grad():
        for blk in net.blocks:
            blk.project_conv.weight.mul_(1.5)
            for t in blk.dw_conv.transforms.values():
                t.add_(0.05)
    after = score(sub)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, fresh(sub), rtol=0, atol=0)
    eight = sub.with_bits(sample_policy(TINY, np.random.default_rng(1)))
    torch.testing.assert_close(score(eight), fresh(eight), rtol=0, atol=0)
    # a weight changed between two evaluations, with no re-estimation (no quantizer reset) between
    with torch.no_grad():
        first = net(x)
        next(b for b in net.blocks if not b.spec.residual).expand_conv.weight.mul_(-1)  # (residual: zero-init)
        second = net(x)
    other = quantize_supernet(Supernet("tiny", 10), ranges="batch")
    other.load_state_dict(net.state_dict())
    other.set_active(eight)
    other.eval()
    with torch.no_grad():
        assert not torch.equal(first, second) and torch.equal(second, other(x))


def test_spread_sampler_spans_the_bit_range_and_independent_does_not():
    stds = {}
    for sampler in ("spread", "independent"):
        means = []
        for i in range(400):
            rng = np.random.default_rng([3, i])
            sub = TINY.sample(rng)
            means.append(mean_bits(sample_policy(TINY, rng, sampler), sub.active_blocks))
        stds[sampler] = float(np.std(means))
    assert stds["spread"] >= 1.0 > 0.5 > stds["independent"]
    with pytest.raises(ValueError, match="policy sampler 'bad' unknown"):
        Phase("quant", 1, sampler="bad")


@pytest.mark.slow
def test_quant_phase_fits_exports_and_resumes(tmp_path):
    torch.manual_seed(0)
    dm = ImageDataModule("digits", batch_size=64, train_subset=384)
    phases = [Phase("full", 2), Phase("width", 1), Phase("quant", 1, lr=0.02)]
    model = SupernetModule(space="tiny", num_classes=dm.num_classes, phases=phases, lr=0.1, bn_calib_batches=2,
                           lr_schedule="phase")
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, enable_model_summary=False, limit_train_batches=5,
                        limit_val_batches=2)
    trainer.fit(model, dm)
    assert model.quantized and model.teacher is not None
    assert trainer.callback_metrics["val/acc_largest"] > 0.3  # quantized at 4 bits, after 4 short epochs
    ckpt = tmp_path / "q.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=True)
    assert raw["apq_quantized"] and is_quantized_for_all({k[9:]: v for k, v in raw["state_dict"].items()})
    resumed = SupernetModule.load_from_checkpoint(ckpt, weights_only=True)
    assert resumed.quantized
    weights = export_supernet_weights(ckpt, tmp_path / "qfa.pt", torch.float32)  # float16 flips 4-bit levels
    net = load_supernet(str(weights))
    sub = TINY.sample(2, quantized=True)
    calib = [(torch.randn(8, 3, 16, 16).clamp(-2, 2), None)] * 2
    model.supernet.to(memory_format=torch.contiguous_format)  # same layout, same rounding at 4 bits
    for n in (net, model.supernet):
        n.set_active(sub)
        reestimate_supernet(n, calib)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model.supernet(x), atol=1e-5, rtol=1e-5)
