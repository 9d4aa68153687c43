"""Quantization primitives: quantizer formula, KL calibration, quantized layers, counting."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from apq_lightning.quant import (
    SUPPORTED_BITS,
    HistogramObserver,
    LinearQuantizer,
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    calibrate,
    count_bitops,
    count_macs,
    kl_thresholds,
    layer_costs,
    model_size_bytes,
    quant_summary,
    quantize_modules,
    tensor_range,
)
from apq_lightning.quant.ranges import _kl_grid

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------- quantizer formula
def _closed_form(x: torch.Tensor, v: torch.Tensor, bits: int, signed: bool, ch_axis: int | None):
    qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    qmin = -qmax if signed else 0
    s = v.float() / qmax  # the scale exactly as the quantizer forms it (float32)
    if ch_axis is not None:
        shape = [1] * x.dim()
        shape[ch_axis] = -1
        s = s.reshape(shape)
    r = x.double() / s.double()
    ref = (torch.clamp(torch.round(r), qmin, qmax) * s.double()).float()
    near_tie = ((r - r.floor()) - 0.5).abs() < 1e-4  # torch multiplies by 1/s: ties may differ
    return ref, near_tie, s


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantizer_matches_closed_form(bits: int, signed: bool, per_channel: bool) -> None:
    g = torch.Generator().manual_seed(bits * 10 + signed)
    x = torch.randn(6, 5, 7, 3, generator=g) * 2
    v = torch.rand(6, generator=g) * 2 + 0.5 if per_channel else torch.tensor(1.7)
    q = LinearQuantizer(bits, signed, per_channel=per_channel, ch_axis=0)
    q.set_range(v)
    out = q(x)
    ref, near_tie, s = _closed_form(x, v, bits, signed, 0 if per_channel else None)
    assert near_tie.float().mean() < 0.01
    torch.testing.assert_close(out[~near_tie], ref[~near_tie], rtol=0, atol=0)
    assert ((out - ref).abs() <= s.expand_as(x) * 1.0001)[near_tie].all()
    # on the grid and inside the range
    vb = v.reshape(-1, 1, 1, 1) if per_channel else v
    assert (out.abs() <= vb + 1e-6).all()
    if not signed:
        assert (out >= 0).all()


def test_quantizer_modes_and_spec() -> None:
    x = torch.randn(100)
    q = LinearQuantizer.from_spec(QuantSpec(bits=4, signed=True))
    assert torch.equal(q(x), x)  # uncalibrated -> identity
    q.set_range(1.0)
    assert not torch.equal(q(x), x)
    q.enabled = False
    assert torch.equal(q(x), x)
    q.enabled = True
    assert q.spec == QuantSpec(bits=4, signed=True)
    assert "bits=4" in repr(q)
    with pytest.raises(ValueError, match="allowed values: 2, 3, 4, 5, 6, 7, 8"):
        LinearQuantizer(1)
    with pytest.raises(ValueError, match="method"):
        QuantSpec(method="mse")  # type: ignore[arg-type]


@pytest.mark.parametrize("signed", [True, False])
def test_straight_through_gradient(signed: bool) -> None:
    bits, v = 4, 1.0
    q = LinearQuantizer(bits, signed)
    q.set_range(v)
    s = v / (2 ** (bits - 1) - 1 if signed else 2**bits - 1)
    x = torch.linspace(-2.5, 2.5, 2001, requires_grad=True)
    q(x).sum().backward()
    lo = -v if signed else 0.0
    inside = (x > lo + s) & (x < v - s)
    outside = (x < lo - s) | (x > v + s)
    assert inside.sum() > 100 and outside.sum() > 100
    assert torch.equal(x.grad[inside], torch.ones(int(inside.sum())))
    assert torch.equal(x.grad[outside], torch.zeros(int(outside.sum())))


def _aten_fq(x: torch.Tensor, v: float, bits: int, signed: bool) -> torch.Tensor:
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    s = torch.tensor([v], dtype=torch.float32) / qmax
    return torch.fake_quantize_per_tensor_affine(x, s, torch.zeros(1, dtype=torch.int32), qmin, qmax)


@pytest.fixture(params=["torch passes", "compiled loop"])
def cpu_path(request, monkeypatch):
    """Both ways the fast path computes values: torch's four passes (several threads) and the
    compiled loop (one thread; every tensor size, for the test)."""
    from apq_lightning.quant import cpu_kernel

    if request.param == "torch passes":
        monkeypatch.setattr(cpu_kernel, "_LOOP_MIN", 2**62)
        yield request.param
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(cpu_kernel, "_LOOP_MIN", 0)
    try:
        yield request.param
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_cpu_fast_path_is_pytorchs_op_bit_for_bit(bits: int, signed: bool, cpu_path: str) -> None:
    """The vectorised CPU path (LinearQuantizer.fast_cpu) returns torch.fake_quantize_per_tensor_affine's
    values bit for bit (signed zeros included) and its gradients (up to the sign of a zero gradient):
    exact ties, one to four ulps either side of every tie and range edge, out-of-range and
    non-finite inputs, a flat odd-length tensor and a channels_last one; in place too."""
    g = torch.Generator().manual_seed(bits * 2 + signed)
    qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    qmin = -qmax if signed else 0
    inf = torch.tensor(float("inf"))
    for v in (1e-8, 3e-3, 0.37, 1.0, 5.9, 6.0, 1e4):
        s = float(torch.tensor(v, dtype=torch.float32).clamp_min(1e-8) / qmax)
        k = torch.arange(qmin - 3, qmax + 4, dtype=torch.float32)
        up = down = torch.cat([(k + 0.5) * s, (k - 0.5) * s, k * s])  # ties, levels
        pts = [up]
        for _ in range(4):
            up, down = torch.nextafter(up, inf), torch.nextafter(down, -inf)
            pts += [up, down]
        special = torch.tensor([0.0, -0.0, 1e30, -1e30, float("inf"), float("-inf"), 3e38, -3e38])
        x = torch.cat([*pts, torch.randn(3001, generator=g) * v, special])
        x = x[torch.randperm(x.numel(), generator=g)]
        n = x.numel() // 15 * 15
        for inp in (x, x[:n].reshape(1, 5, 3, -1).contiguous(memory_format=torch.channels_last)):
            q_fast, q_op = LinearQuantizer(bits, signed), LinearQuantizer(bits, signed)
            q_op.fast_cpu = False
            q_fast.set_range(v)
            q_op.set_range(v)
            xa, xb = inp.clone().requires_grad_(), inp.clone().requires_grad_()
            a, b = q_op(xa), q_fast(xb)
            assert a.grad_fn is not None and "FakeQuantize" in type(a.grad_fn).__name__  # PyTorch's op
            assert torch.equal(a, _aten_fq(inp, v, bits, signed))
            assert torch.equal(a.detach().view(torch.int32), b.detach().view(torch.int32)), (v, inp.shape)
            assert a.stride() == b.stride()
            grad = torch.randn(a.shape, generator=g)
            a.backward(grad)
            b.backward(grad)
            assert torch.equal(xa.grad, xb.grad), (v, inp.shape)
            with torch.no_grad():  # no autograd node: same values
                assert torch.equal(q_fast(inp), a.detach())
                q_fast.overwrite_input = True  # in place: the same bits, written into the input
                inp_copy = inp.clone()
                out = q_fast(inp_copy)
                assert out.data_ptr() == inp_copy.data_ptr()
                assert torch.equal(out.view(torch.int32), a.detach().view(torch.int32))


def test_quantizer_never_serves_a_stale_range() -> None:
    """Scale, zero point and STE window are cached per quantizer; every way of changing the
    range, the bits, the signedness, the dtype or the checkpoint must reach forward()."""
    x = torch.randn(4, 8, 5, 5) * 2
    q = LinearQuantizer(4, True)
    q.set_range(1.0)
    assert torch.equal(q(x), _aten_fq(x, 1.0, 4, True))
    q.set_range(0.5)
    assert torch.equal(q(x), _aten_fq(x, 0.5, 4, True))
    with torch.no_grad():
        q.v.fill_(2.0)  # in place, behind the quantizer's back
    assert torch.equal(q(x), _aten_fq(x, 2.0, 4, True))
    other = LinearQuantizer(4, True)
    other.set_range(0.3)
    q.load_state_dict(other.state_dict())
    assert torch.equal(q(x), _aten_fq(x, 0.3, 4, True))
    q.signed = False
    assert torch.equal(q(x), _aten_fq(x, 0.3, 4, False))
    q.bits = 6
    assert torch.equal(q(x), _aten_fq(x, 0.3, 6, False))
    q.double()  # a new v tensor; float64 input goes through PyTorch's op
    assert torch.equal(q(x.double()), _aten_fq(x.double(), 0.3, 6, False))
    q.reset()
    assert torch.equal(q(x.double()), x.double())  # uncalibrated: identity
    clone = copy.deepcopy(q)
    clone.set_range(0.7)
    assert torch.equal(clone(x.double()), _aten_fq(x.double(), 0.7, 6, False))


# ----------------------------------------------------------------------------- KL calibration
def _kl_naive(hist: torch.Tensor, qmax: int, cands: list[int]) -> list[float]:
    """Direct transcription of the TensorRT procedure, one candidate and one level at a time."""
    h = hist.double()
    total = h.sum()
    out = []
    for i in cands:
        sliced = h[:i].clone()
        p = sliced.clone()
        p[i - 1] += h[i:].sum()
        nz = p > 0
        level = torch.floor((torch.arange(i).double() + 0.5) * qmax / i + 0.5).long().clamp(max=qmax)
        q = torch.zeros(i, dtype=torch.float64)
        for k in range(qmax + 1):
            sel = level == k
            n = int((sel & nz).sum())
            if n:
                q[sel & nz] = sliced[sel].sum() / n
        pn, qn = p / total, q / max(float(sliced.sum()), 1e-12)
        out.append(float((torch.xlogy(pn, pn) - torch.xlogy(pn, qn + 1e-12)).sum()))
    return out


@pytest.mark.parametrize("qmax", [1, 7, 15, 127, 255])
def test_vectorised_kl_equals_naive(qmax: int) -> None:
    g = torch.Generator().manual_seed(qmax)
    x = (torch.randn(20000, generator=g) ** 3).abs()
    hist = torch.histc(x, 512, 1e-9, float(x.max())).double()
    hist[200:230] = 0  # holes exercise the non-empty-bin expansion
    cand, _, _ = _kl_grid(512, qmax, 160)
    naive = torch.tensor(_kl_naive(hist, qmax, cand.tolist()))
    assert float(kl_thresholds(hist, qmax)[0]) == float(cand[int(naive.argmin())])


def _heavy_tailed(n: int = 100_000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((n,))
    x[torch.randperm(n, generator=g)[:20]] = 40.0 * torch.sign(torch.randn(20, generator=g))
    return x


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_kl_clips_heavy_tails(bits: int) -> None:
    x = _heavy_tailed()
    m = float(x.abs().max())
    v = float(tensor_range(x, bits, signed=True))
    assert 0 < v < 0.5 * m
    v_u = float(tensor_range(x.relu(), bits, signed=False))  # post-ReLU flavour
    assert 0 < v_u < 0.5 * m
    v_t = float(tensor_range(torch.distributions.StudentT(2.0).sample((50_000,)), bits, signed=True))
    assert v_t > 0


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_kl_keeps_uniform_range(bits: int, signed: bool) -> None:
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(1))
    x = x * 2 - 1 if signed else x
    m = float(x.abs().max())
    v = float(tensor_range(x, bits, signed=signed))
    assert 0.9 * m <= v <= m


@pytest.mark.parametrize("dist", ["normal", "laplace", "relu", "zeros"])
def test_kl_range_within_data(dist: str) -> None:
    x = {"normal": torch.randn(30_000), "laplace": _heavy_tailed(30_000),
         "relu": torch.randn(30_000).relu(), "zeros": torch.zeros(100)}[dist]
    m = float(x.abs().max())
    for bits in (2, 4, 8):
        v = float(tensor_range(x, bits, signed=dist != "relu"))
        assert (0 < v <= m) if m > 0 else v == 0
        assert float(tensor_range(x, bits, True, method="minmax")) == m


def test_per_channel_weight_ranges() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 8, 3, 3, generator=g) * torch.linspace(0.1, 2.0, 16).reshape(-1, 1, 1, 1)
    v = tensor_range(w, 4, True, ch_axis=0)
    vmax = w.abs().amax((1, 2, 3))
    assert v.shape == (16,) and (v > 0).all() and (v <= vmax).all()
    assert torch.equal(tensor_range(w, 4, True, method="minmax", ch_axis=0), vmax)
    # a channel with enough weights and heavy tails is clipped; a uniform one is not
    wide = torch.stack([_heavy_tailed(4096), torch.rand(4096, generator=g) * 2 - 1]).reshape(2, 64, 8, 8)
    v = tensor_range(wide, 4, True, ch_axis=0)
    vmax = wide.abs().amax((1, 2, 3))
    assert v[0] < 0.5 * vmax[0] and v[1] >= 0.9 * vmax[1]


def test_histogram_observer_merges_batches() -> None:
    obs = HistogramObserver(bins=2048, signed=None)
    a = torch.rand(10_000)  # non-negative so far
    b = torch.randn(10_000) * 5  # larger range, with negatives
    obs.update(a)
    first_upper = obs.upper
    obs.update(b)
    assert obs.upper >= float(b.abs().max()) and math.log2(obs.upper / first_upper) % 1 == 0
    assert obs.hist is not None and float(obs.hist.sum()) == 20_000  # every non-zero value kept
    v, signed = obs.compute_range(8, "kl")
    assert signed and 0 < v <= obs.max_abs
    assert obs.compute_range(8, "minmax") == (pytest.approx(float(b.abs().max())), True)
    relu_obs = HistogramObserver(signed=None)
    relu_obs.update(torch.randn(1000).relu())
    assert relu_obs.compute_range(4)[1] is False  # never negative -> unsigned


# ----------------------------------------------------------------------------- quantized layers
class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24))  # no ReLU: signed output
        self.expand = nn.Conv2d(24, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(self.dw(self.stem(x)))
        x = torch.relu(self.expand(x)).mean((2, 3))
        return self.head(x)


def _net_and_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    net = SmallNet()
    x = torch.randn(128, 3, 16, 16)
    net.train()
    with torch.no_grad():  # give BN realistic running statistics
        for _ in range(3):
            net(x)
    return net.eval(), x


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_quantize_modules_replaces_and_shares_weights() -> None:
    net, _ = _net_and_data()
    w = net.stem[0].weight
    names = [n for n, m in net.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    q = quantize_modules(net)
    assert q is net
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in q.modules())
    assert [n for n, m in q.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))] == names
    assert q.stem[0].weight is w  # same Parameter: device, dtype, optimizer refs preserved
    assert "w_bits=8, a_bits=8" in repr(q.stem[0])
    assert q.dw[0].groups == 16 and q.expand.bias is not None
    copy_q = quantize_modules(SmallNet(), inplace=False)
    assert isinstance(copy_q.head, QuantLinear)


def test_calibrate_accuracy_and_signedness() -> None:
    net, x = _net_and_data()
    with torch.no_grad():
        ref = net(x)
    errs = {}
    for bits in (8, 4):
        q = quantize_modules(copy.deepcopy(net), default=(bits, bits))
        calibrate(q, x.split(32))
        with torch.no_grad():
            errs[bits] = _rel_err(q(x), ref)
        assert q.stem[0].a_signed is True  # raw image: signed
        assert q.dw[0].a_signed is False and q.project[0].a_signed is False  # after ReLU6
        assert q.expand.a_signed is True  # after BN without ReLU
        assert not q.training or q.training == net.training
    assert errs[8] < 0.05
    assert errs[4] > errs[8]


def test_qat_step_keeps_calibrated_ranges() -> None:
    net, x = _net_and_data()
    q = calibrate(quantize_modules(net, default=(4, 4)), x.split(64))
    ranges = {n: b.clone() for n, b in q.named_buffers() if n.endswith(".v")}
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    q.train()
    q(x[:16]).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in q.parameters() if p.dim() > 1)
    opt.step()
    assert all(torch.equal(b, ranges[n]) for n, b in q.named_buffers() if n.endswith(".v"))


def test_summary_lists_float_layers() -> None:
    net, x = _net_and_data()
    q = quantize_modules(net, {"head": (None, None), "expand": (4, None, True)}, default=(6, 8))
    calibrate(q, [x], method="minmax")
    table = quant_summary(q)
    head_row = next(line for line in table.splitlines() if line.startswith("head"))
    assert "float" in head_row
    assert "float: head" in table
    expand_row = next(line for line in table.splitlines() if line.startswith("expand"))
    assert expand_row.split()[2:4] == ["4", "float"]
    assert not any(line.startswith("head ") for line in quant_summary(q, include_float=False).splitlines())
    assert "1 float layer" in quant_summary(q, include_float=False)


def test_calibrate_needs_data() -> None:
    net, x = _net_and_data()
    q = quantize_modules(net)
    with pytest.raises(ValueError, match="no data"):
        calibrate(q, [])
    with pytest.raises(ValueError, match="num_batches"):
        calibrate(q, [x], num_batches=0)
    assert not any(isinstance(m, LinearQuantizer) and m.observing for m in q.modules())
    with pytest.raises(ValueError, match="no quantized layers"):
        calibrate(SmallNet(), [x])


def test_bad_bits_name_layer_and_allowed_values() -> None:
    net, _ = _net_and_data()
    with pytest.raises(ValueError, match=r"'dw\.0' w_bits = 9 .*allowed values: 2, 3, 4, 5, 6, 7, 8"):
        quantize_modules(net, {"dw.0": (9, 8)})
    with pytest.raises(ValueError, match=r"'head' a_bits = 5 .*allowed values: 4, 6, 8"):
        quantize_modules(net, {"head": (8, 5)}, allowed_bits=(4, 6, 8))
    with pytest.raises(ValueError, match="not nn.Conv2d"):
        quantize_modules(net, {"nope": (8, 8)})
    assert isinstance(net.dw[0], nn.Conv2d) and type(net.dw[0]) is nn.Conv2d  # untouched on error


def test_set_bits_rederives_ranges_without_data() -> None:
    net, x = _net_and_data()
    q = quantize_modules(net, default=(8, 8))
    calibrate(q, [x])
    layer = q.expand
    v8 = float(layer.input_quantizer.v)
    layer.set_bits(2, 2)
    assert layer.weight_quantizer.is_quantizing and layer.input_quantizer.is_quantizing
    assert float(layer.input_quantizer.v) <= v8
    quantize_modules(q, {"expand": (8, 8)})  # re-configuring a quantized model works in place
    assert float(layer.input_quantizer.v) == pytest.approx(v8)
    # a layer calibrated while float can be quantized later without data
    net2, _ = _net_and_data()
    q2 = calibrate(quantize_modules(net2, {"head": (None, None)}), [x])
    assert not q2.head.input_quantizer.is_quantizing
    q2.head.set_bits(6, 6)
    assert q2.head.input_quantizer.is_quantizing and q2.head.weight_quantizer.is_quantizing
    assert q2.head.a_signed is False  # decided from the histogram kept during calibration


def test_state_dict_roundtrip() -> None:
    net, x = _net_and_data()
    q = quantize_modules(copy.deepcopy(net), default=(4, 6), per_channel=True)
    calibrate(q, [x])
    fresh = quantize_modules(copy.deepcopy(net), default=(8, 8))
    fresh.load_state_dict(q.state_dict())
    assert fresh.stem[0].w_bits == 4 and fresh.stem[0].a_signed is True
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), q(x))


def test_calibration_in_chunks_of_512_images() -> None:
    torch.manual_seed(0)
    net = SmallNet().eval()
    images = torch.randn(512, 3, 16, 16)
    one = calibrate(quantize_modules(copy.deepcopy(net)), [images], method="minmax")
    drawn = []

    def chunks():
        for i, c in enumerate(images.split(64)):
            drawn.append(i)
            yield c, torch.zeros(len(c))  # (x, y) batches as a DataLoader yields them

    many = calibrate(quantize_modules(copy.deepcopy(net)), chunks(), method="minmax")
    assert len(drawn) == 8
    obs = many.stem[0].input_quantizer.observer
    assert obs.count == images.numel()
    for (n, a), (_, b) in zip(one.named_modules(), many.named_modules()):
        if isinstance(a, LinearQuantizer):
            torch.testing.assert_close(a.v, b.v, msg=n)
    # KL from merged histograms stays close to KL on everything at once
    kl_one = calibrate(quantize_modules(copy.deepcopy(net)), [images])
    kl_many = calibrate(quantize_modules(copy.deepcopy(net)), images.split(64))
    for (n, a), (_, b) in zip(kl_one.named_modules(), kl_many.named_modules()):
        if isinstance(a, LinearQuantizer) and n.endswith("input_quantizer"):
            assert float(b.v) == pytest.approx(float(a.v), rel=0.15), n
    drawn.clear()
    calibrate(quantize_modules(copy.deepcopy(net)), chunks(), num_batches=3)
    assert len(drawn) == 3  # the iterator is not advanced past num_batches


def test_layers_that_never_run_stay_float_with_warning() -> None:
    net, x = _net_and_data()
    net.unused = nn.Conv2d(3, 3, 1)
    q = quantize_modules(net)
    with pytest.warns(UserWarning, match="unused"):
        calibrate(q, [x])
    assert not q.unused.input_quantizer.is_quantizing
    assert "uncalibrated" in quant_summary(q)


# ----------------------------------------------------------------------------- counting
def test_mobilenet_v2_bitops() -> None:
    torchvision = pytest.importorskip("torchvision")
    m = torchvision.models.mobilenet_v2()
    m.train()
    bitops = count_bitops(m, (1, 3, 224, 224), 8, 8)
    assert abs(bitops - 19.2e9) / 19.2e9 < 0.01
    assert bitops == count_macs(m, (1, 3, 224, 224)) * 64
    assert m.training  # mode restored


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 16x16 -> 8x8
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_two_layer_counts_by_hand() -> None:
    net = TwoLayer()
    conv_macs = (8 * 8 * 8) * (3 * 3 * 3)  # out elems x Cin/groups x kh x kw
    fc_macs = 10 * 512
    assert count_macs(net, (1, 3, 16, 16)) == conv_macs + fc_macs
    assert count_macs(net, (5, 3, 16, 16)) == conv_macs + fc_macs  # per sample
    assert count_bitops(net, (1, 3, 16, 16), 8, 8) == (conv_macs + fc_macs) * 64
    assert count_bitops(net, (1, 3, 16, 16), None, 8) == (conv_macs + fc_macs) * 32 * 8

    q = quantize_modules(copy.deepcopy(net), {"conv": (4, 6), "fc": (2, 8)})
    assert count_bitops(q, (1, 3, 16, 16)) == conv_macs * 4 * 6 + fc_macs * 2 * 8
    mixed = quantize_modules(copy.deepcopy(net), {"conv": (4, 6), "fc": (None, None)})
    assert count_bitops(mixed, (1, 3, 16, 16)) == conv_macs * 4 * 6 + fc_macs * 32 * 32
    assert [c.name for c in layer_costs(q, (1, 3, 16, 16))] == ["conv", "fc"]

    # size: weights at their bits, biases at 32 bits
    assert model_size_bytes(net) == (8 * 27 + 10 * 512) * 8 / 8 + (8 + 10) * 4
    assert model_size_bytes(q) == 8 * 27 * 4 / 8 + 10 * 512 * 2 / 8 + (8 + 10) * 4
    assert model_size_bytes(mixed) == 8 * 27 * 4 / 8 + 10 * 512 * 4 + (8 + 10) * 4


def test_depthwise_macs_and_bn_size() -> None:
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4))
    assert count_macs(net, (2, 4, 5, 5)) == 4 * 5 * 5 * 9
    assert model_size_bytes(net, w_bits=8) == 4 * 9 + 2 * 4 * 4  # BN scale + shift at 32 bits


def test_counting_on_calibrated_model_and_dtype() -> None:
    net, x = _net_and_data()
    q = quantize_modules(copy.deepcopy(net).double(), default=(4, 4))
    assert q.stem[0].weight.dtype == torch.float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate(q, [x.double()])
    assert q(x.double()).dtype == torch.float64
    assert count_bitops(q, (1, 3, 16, 16)) == count_macs(net, (1, 3, 16, 16)) * 16
