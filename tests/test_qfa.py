"""Quantized-for-all: batch-range quantizers, the supernet's re-estimation, the 'quant' phase and
the policy sampler (issue 15)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from apq_lightning.data import ImageDataModule
from apq_lightning.modules import Phase, SupernetModule
from apq_lightning.quant.quantizers import LinearQuantizer
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
