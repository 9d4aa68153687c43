"""Hardware cost models: BitFusion table, measured tables, the fit, vectorised evaluation, commands."""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr
from timm.layers import make_divisible

from apq_lightning.hardware import (
    BitFusionCost,
    BitOpsCost,
    ConvShape,
    FittedBitFusionCost,
    HybridBitFusionCost,
    LayerwiseCost,
    MeasuredCost,
    bitfusion_table_path,
    cross_validate,
    get_cost_model,
    load_table,
    parse_key,
)
from apq_lightning.hardware.commands import cost_main, lut_main
from apq_lightning.hardware.geometry import block_convs
from apq_lightning.hardware.pricing import TablePricer
from apq_lightning.space import BitPolicy, Subnet, get_space

METRICS = ("latency_ms", "energy_mJ", "bitops", "size_bytes", "feasible", "source")
IMAGENET = get_space("apq_imagenet")


# --------------------------------------------------------------------------------------
# An independent re-derivation of the APQ reference's BitFusion sum, from the raw JSON
# --------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def raw_table() -> dict:
    return json.loads(bitfusion_table_path().read_text())


def reference_cost(spec: dict, what: str) -> float:
    """Sum as the reference does it: sizes from 112 halve by (s+1)//2 at stride-2 stages, a
    block's stride is 2 where its input and output sizes differ, the project conv is keyed at
    in_size // stride, mid = make_divisible(e * cin, 8); skipped blocks add nothing."""
    table = raw_table()
    cin = [16, 24, 40, 80, 96, 192]
    cout = [24, 40, 80, 96, 192, 320]
    sizes = [112]
    for stage_stride in (2, 2, 2, 1, 2, 1):
        sizes.append((sizes[-1] + 1) // 2 if stage_stride == 2 else sizes[-1])
    total = table["head"][what] + table["tail"][what]
    for layer in range(21):
        stage, pos = divmod(layer, 4)
        if pos >= spec["d"][stage]:
            continue
        c_in = cin[stage] if pos == 0 else cout[stage]
        h_in = sizes[stage] if pos == 0 else sizes[stage + 1]
        stride = 1 if h_in == sizes[stage + 1] else 2
        mid = make_divisible(spec["e"][layer] * c_in, 8)
        k = spec["ks"][layer]
        pw = (spec["pw_w_bits_setting"][layer], spec["pw_a_bits_setting"][layer])
        dw = (spec["dw_w_bits_setting"][layer], spec["dw_a_bits_setting"][layer])
        for conv, (w, a) in (
            ((c_in, mid, h_in, 1, 1, 0, 1), pw),
            ((mid, mid, h_in, k, stride, k // 2, mid), dw),
            ((mid, cout[stage], h_in // stride, 1, 1, 0, 1), pw),
        ):
            total += table[f"{conv}-W{w}A{a}"][what]
    return total


def feasible_sample(rng: np.random.Generator) -> Subnet:
    """A random quantized apq_imagenet subnet with no 7x7 depthwise at 4-bit activations."""
    s = IMAGENET.sample(rng, quantized=True)
    dw_a = [6 if (k == 7 and a == 4) else a for k, a in zip(s.kernels, s.bits.dw_a)]
    return s.with_bits(BitPolicy(s.bits.pw_w, s.bits.pw_a, s.bits.dw_w, tuple(dw_a)))


@pytest.fixture(scope="module")
def bitfusion() -> BitFusionCost:
    return BitFusionCost()


# --------------------------------------------------------------------------------------
# The packaged table
# --------------------------------------------------------------------------------------
def test_packaged_table_is_verbatim_with_notice():
    path = bitfusion_table_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == (
        "ac7b951ca87eefc1a53f9cb195d12868ae89e58cd81f8dbe4a49dd0faaede705"
    )
    notice = (path.parent / "LICENSE.bitfusion").read_text()
    assert "Copyright (c) 2020, Tianzhe Wang, Kuan Wang, Han Cai, Ji Lin, Zhijian Liu, Song Han" in notice
    assert "THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS" in notice
    assert len(load_table(path)) == 6569 - 2


def test_geometry_reproduces_the_table_key_set(bitfusion):
    """Every layer our geometry builds for apq_imagenet is in the table (but 7x7 dw at A4), and
    every table entry is a layer of the space: the key format matches exactly."""
    ours = set(bitfusion._cache)
    table = set(bitfusion.pricer.table.entries)
    missing = {q for q in ours if q not in table}
    assert missing and all(s.depthwise and s.kernel == 7 and a == 4 for s, _, a in missing)
    assert table <= ours


# --------------------------------------------------------------------------------------
# BitFusion = the reference
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["smallest4", "largest8"])
def test_extreme_subnets_match_reference(bitfusion, which):
    subnet = IMAGENET.smallest(4) if which == "smallest4" else IMAGENET.largest(8)
    out = bitfusion.costs(subnet)
    assert out["feasible"] and out["source"] == "table"
    spec = subnet.to_apq()
    assert out["latency_ms"] == pytest.approx(reference_cost(spec, "latency"), rel=1e-12)
    assert out["energy_mJ"] == pytest.approx(reference_cost(spec, "energy"), rel=1e-12)


def test_random_subnets_match_reference(bitfusion):
    rng = np.random.default_rng(0)
    subnets = [feasible_sample(rng) for _ in range(50)]
    vec = bitfusion.evaluate_subnets(subnets)
    for i, s in enumerate(subnets):
        spec = s.to_apq()
        lat, en = reference_cost(spec, "latency"), reference_cost(spec, "energy")
        assert bitfusion.costs(s)["latency_ms"] == pytest.approx(lat, rel=1e-12)
        assert vec["latency_ms"][i] == pytest.approx(lat, rel=1e-12)
        assert vec["energy_mJ"][i] == pytest.approx(en, rel=1e-12)


def test_hybrid_equals_table_on_imagenet(bitfusion):
    hybrid = get_cost_model("bitfusion", "apq_imagenet")
    g = IMAGENET.sample_genomes(5, 300)
    a, b = hybrid.evaluate(g), bitfusion.evaluate(g)
    for k in METRICS:
        assert np.array_equal(a[k], b[k]), k


def test_infeasible_7x7_depthwise_at_4bit_activations(bitfusion):
    s = IMAGENET.largest(8)
    dw_a = list(s.bits.dw_a)
    dw_a[9] = 4
    bad = s.with_bits(BitPolicy(s.bits.pw_w, s.bits.pw_a, s.bits.dw_w, tuple(dw_a)))
    out = bitfusion.costs(bad)
    assert out["feasible"] is False and math.isinf(out["latency_ms"])
    assert "block 9" in out["reason"] and "7, 1, 3," in out["reason"] and "W8A4" in out["reason"]
    vec = bitfusion.evaluate_subnets([bad, s])
    assert vec["feasible"].tolist() == [False, True] and np.isinf(vec["latency_ms"][0])
    # the smallest kernel (3) at 4 bits is fine; a 7x7/A4 gene in a *skipped* block is too
    assert bitfusion.costs(IMAGENET.smallest(4))["feasible"]
    g = IMAGENET.to_genome(IMAGENET.smallest(4))
    sl = IMAGENET.genome_slices()
    g[sl["kernels"]][3] = 2  # block 3 is skipped at depth 2
    assert bitfusion.evaluate(g)["feasible"][0]
    for hw in ("bitfusion", "bitfusion_fit"):
        assert get_cost_model(hw, "apq_imagenet").costs(bad)["feasible"] is False


# --------------------------------------------------------------------------------------
# Vectorised == looped
# --------------------------------------------------------------------------------------
def assert_same(model: LayerwiseCost, genomes: np.ndarray) -> None:
    vec = model.evaluate(genomes)
    looped = [model.costs(model.space.from_genome(g)) for g in genomes]
    for k in METRICS:
        ref = np.array([d[k] for d in looped])
        if ref.dtype.kind in "biuU":
            assert np.array_equal(vec[k], ref), k
        else:
            np.testing.assert_allclose(vec[k], ref, rtol=1e-12, equal_nan=True, err_msg=k)


def test_vectorised_equals_looped_1000_imagenet(bitfusion):
    genomes = IMAGENET.sample_genomes(1, 1000)
    assert_same(bitfusion, genomes)
    assert 0 < bitfusion.evaluate(genomes)["feasible"].mean() < 1  # both kinds are covered


@pytest.mark.parametrize("space", ["apq_cifar", "tiny"])
def test_vectorised_equals_looped_fit_and_bitops(space):
    genomes = get_space(space).sample_genomes(2, 200)
    assert_same(get_cost_model("bitfusion", space), genomes)
    assert_same(BitOpsCost(space), genomes)


def test_float_subnet_counts_as_8_bits(bitfusion):
    s = IMAGENET.sample(3)
    assert bitfusion.costs(s) == bitfusion.costs(s.with_bits(8))


# --------------------------------------------------------------------------------------
# BitOps / size against the quantization counting on a real extracted network
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", ["tiny", "apq_cifar"])
def test_bitops_and_size_match_counting(space):
    pytest.importorskip("apq_lightning.supernet")
    counting = pytest.importorskip("apq_lightning.quant.counting")
    from apq_lightning.supernet import Supernet

    sp = get_space(space)
    net = Supernet(sp, 10)
    model_costs = BitOpsCost(sp, num_classes=10)
    shape = (1, 3, sp.image_size, sp.image_size)
    rng = np.random.default_rng(4)
    for subnet in [sp.sample(rng), sp.sample(rng, quantized=True), sp.largest(4)]:
        model = net.extract(subnet)
        ours = model_costs.costs(subnet)
        if subnet.bits is None:  # a float subnet counts as 8/8
            assert ours["bitops"] == counting.count_bitops(model, shape, 8, 8)
            assert ours["size_bytes"] == counting.model_size_bytes(model, 8)
            continue
        # per-layer bits by module name: pw pair for 1x1 convs of blocks, dw pair for depthwise
        bits_of = {}
        for j, blk in enumerate(model.blocks):
            pw_w, pw_a, dw_w, dw_a = subnet.bits.block(blk.block_index)
            bits_of.update({f"blocks.{j}.expand.conv": (pw_w, pw_a), f"blocks.{j}.project.conv": (pw_w, pw_a),
                            f"blocks.{j}.depthwise.conv": (dw_w, dw_a)})
        layers = counting.layer_costs(model, shape, 8, 8)
        assert ours["bitops"] == sum(c.macs * math.prod(bits_of.get(c.name, (8, 8))) for c in layers)
        size_bits = 0
        for name, p in model.named_parameters():
            conv = name.rsplit(".", 1)[0]
            if name.endswith("weight") and (conv in bits_of or conv.endswith("conv") or conv == "classifier"):
                size_bits += p.numel() * bits_of.get(conv, (8, 8))[0]
            else:
                size_bits += p.numel() * 32
        assert ours["size_bytes"] == size_bits / 8


# --------------------------------------------------------------------------------------
# Measured tables
# --------------------------------------------------------------------------------------
def test_measured_table_round_trip_tiny(tmp_path):
    out = tmp_path / "lut.json"
    assert lut_main(["build", "--space", "tiny", "--out", str(out), "--repeats", "1", "--warmup", "1",
                     "--threads", "1", "--no-progress"]) == 0
    raw = json.loads(out.read_text())
    assert raw["__meta__"]["space"] == "tiny" and raw["__meta__"]["complete"] is True
    assert all(k in ("__meta__", "head", "tail") or k.endswith("-W32A32") for k in raw)
    sp = get_space("tiny")
    model = get_cost_model(f"lut:{out}", "tiny")
    for subnet in (sp.largest(4), sp.smallest(), sp.sample(7, quantized=True)):
        expect = raw["head"]["latency"] + raw["tail"]["latency"]
        for i in subnet.active_blocks:
            for conv in block_convs(sp.blocks[i], subnet.kernels[i], subnet.widths[i]):
                expect += raw[f"{tuple(conv)}-W32A32"]["latency"]
        got = model.costs(subnet)
        assert got["latency_ms"] == pytest.approx(expect, rel=1e-12)
        assert got["feasible"] and math.isnan(got["energy_mJ"])
    assert_same(model, sp.sample_genomes(3, 50))
    # resumable: drop a few entries, rebuild -> only those are measured again, the rest is kept
    keys = [k for k in raw if k.endswith("-W32A32")]
    partial = {k: v for k, v in raw.items() if k not in keys[:3]}
    out.write_text(json.dumps(partial))
    assert lut_main(["build", "--space", "tiny", "--out", str(out), "--repeats", "1", "--warmup", "1",
                     "--no-progress", "--threads", "1"]) == 0
    again = json.loads(out.read_text())
    assert set(again) == set(raw)
    assert all(again[k] == raw[k] for k in keys[3:])
    # a table of another space, or resuming with other settings, is refused
    with pytest.raises(ValueError, match="'tiny'.*'apq_cifar'"):
        MeasuredCost(out, "apq_cifar")
    assert lut_main(["build", "--space", "tiny", "--out", str(out), "--batch", "2", "--no-progress"]) == 2


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, match", [
    ("not json", "not a JSON cost table"),
    ("[1, 2]", "must be a JSON object"),
    ('{"(1, 2, 3)-W8A8": {"latency": 1}}', r"key '\(1, 2, 3\)-W8A8' does not parse"),
    ('{"__import__(\'os\').system(\'true\')": {"latency": 1}}', "does not parse"),
    ('{"(8, 8, 4, 3, 1, 1, 8)-W8A8": {"energy": 1}}', r"entry '\(8, 8, 4, 3, 1, 1, 8\)-W8A8' must be an object"),
    ('{"(8, 8, 4, 3, 1, 1, 8)-W8A8": {"latency": "fast"}}', "non-numeric latency"),
    ('{"head": {"latency": 1}}', "no conv entries"),
])
def test_bad_table_files(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        load_table(path)
    assert str(path) in str(err.value)


def test_bad_key_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="x.json: key '1, 2' does not parse"):
        parse_key("1, 2", "x.json")
    assert parse_key("(24, 144, 56, 1, 1, 0, 1)-W4A6", "t") == (ConvShape(24, 144, 56, 1, 1, 0, 1), 4, 6)
    with pytest.raises(ValueError, match="not found"):
        load_table(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="unknown hardware 'tpu'"):
        get_cost_model("tpu", "tiny")


def test_subnet_or_genome_of_another_space(bitfusion):
    cifar = get_space("apq_cifar").sample(0, quantized=True)
    with pytest.raises(ValueError, match="'apq_cifar'.*'apq_imagenet'"):
        bitfusion.costs(cifar)
    with pytest.raises(ValueError, match="apq_imagenet.*shape"):
        bitfusion.evaluate(get_space("apq_cifar").sample_genomes(0, 3)[:, :10])
    with pytest.raises(ValueError, match="covers space 'apq_imagenet' only, not 'apq_cifar'"):
        BitFusionCost("apq_cifar")


# --------------------------------------------------------------------------------------
# The fit beyond the table
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fit_report():
    return cross_validate(n_splits=5)


def test_fit_held_out_goals(fit_report):
    r = fit_report
    assert r.n_shapes == 779
    assert r.median_ape["latency"] <= 0.05 and r.median_ape["energy"] <= 0.08
    for t in ("latency", "energy"):  # far better than the trivial cost ∝ MACs
        assert r.median_ape[t] < r.baseline_median_ape[t] / 5


def test_fit_network_rank_agreement(bitfusion, fit_report):
    genomes = IMAGENET.sample_genomes(11, 1000)
    sl = IMAGENET.genome_slices()  # 7x7 depthwise at A4 -> A6, so all 1000 are feasible
    dw_a = genomes[:, sl["dw_a"]]
    dw_a[(genomes[:, sl["kernels"]] == 2) & (dw_a == 0)] = 1
    genomes[:, sl["dw_a"]] = dw_a
    exact = bitfusion.evaluate(genomes)
    ok = exact["feasible"]
    assert ok.all()
    fitted = FittedBitFusionCost("apq_imagenet").evaluate(genomes)
    assert np.array_equal(fitted["feasible"], ok) and set(fitted["source"]) == {"fit"}
    assert spearmanr(fitted["latency_ms"][ok], exact["latency_ms"][ok]).statistic >= 0.98
    # out-of-fold: each layer priced by a fit that never saw its shape
    held_out = LayerwiseCost("apq_imagenet", TablePricer(fit_report.out_of_fold), "oof")
    oof = held_out.evaluate(genomes)
    assert spearmanr(oof["latency_ms"][ok], exact["latency_ms"][ok]).statistic >= 0.98


@pytest.mark.parametrize("space", ["apq_cifar", "tiny"])
def test_fit_prices_other_spaces_and_bits_matter(space):
    sp = get_space(space)
    model = get_cost_model("bitfusion", space)
    arch = sp.sample(5)
    policies = [sp.uniform_policy(b) for b in ((4, 4, 4, 6), (6, 6, 6, 6), (8, 8, 8, 8))]  # dw A4 + 7x7: infeasible
    lat = [model.costs(arch.with_bits(p))["latency_ms"] for p in policies]
    en = [model.costs(arch.with_bits(p))["energy_mJ"] for p in policies]
    assert lat[0] < lat[1] <= lat[2] and en[0] < en[2]
    assert model.costs(arch.with_bits(8))["source"] == "fit"
    assert model.costs(sp.largest(8))["latency_ms"] > model.costs(sp.smallest(8))["latency_ms"]
    assert isinstance(model, HybridBitFusionCost)


# --------------------------------------------------------------------------------------
# The cost command
# --------------------------------------------------------------------------------------
def test_cost_command_json_and_jsonl(tmp_path, capsys, bitfusion):
    one = tmp_path / "one.json"
    s = IMAGENET.largest(8)
    one.write_text(json.dumps(s.to_apq()))  # the APQ reference spec format
    assert cost_main(["--hardware", "bitfusion", "--subnet", str(one)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["latency_ms"] == pytest.approx(reference_cost(s.to_apq(), "latency"), rel=1e-12)
    assert row["source"] == "table" and row["feasible"] is True

    many = tmp_path / "many.jsonl"
    rng = np.random.default_rng(9)
    subnets = [IMAGENET.sample(rng, quantized=True) for _ in range(4)] + [get_space("apq_cifar").sample(1)]
    many.write_text("".join(x.to_json() + "\n" for x in subnets))
    assert cost_main(["--subnet", str(many)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 5
    for x, r in zip(subnets[:4], rows):
        expect = bitfusion.costs(x)
        assert r["feasible"] == expect["feasible"] and r["bitops"] == expect["bitops"]
        if r["feasible"]:
            assert r["latency_ms"] == pytest.approx(expect["latency_ms"])
        else:
            assert r["latency_ms"] is None and "W" in r["reason"]
    assert rows[4]["space"] == "apq_cifar" and rows[4]["source"] == "fit"
    for key in ("latency_ms", "energy_mJ", "bitops", "size_bytes", "feasible"):
        assert key in rows[0]

    assert cost_main(["--subnet", str(tmp_path / "missing.json")]) == 2
    assert cost_main(["--hardware", "bitfusion_table", "--subnet", str(many)]) == 2
    assert "covers space" in capsys.readouterr().err


def test_measured_table_path_roundtrip_through_cost_command(tmp_path, capsys):
    out = tmp_path / "lut.json"
    assert lut_main(["build", "--space", "tiny", "--out", str(out), "--repeats", "1", "--warmup", "1",
                     "--no-progress"]) == 0
    capsys.readouterr()
    sub = tmp_path / "s.json"
    sub.write_text(get_space("tiny").largest().to_json())
    assert cost_main(["--hardware", f"lut:{out}", "--subnet", str(sub)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["latency_ms"] > 0 and row["energy_mJ"] is None and row["feasible"] is True


def test_paths_are_not_hard_coded():
    assert Path(bitfusion_table_path()).name == "bitfusion_b1.json"


def test_layout_and_cost_models_stay_torch_free():
    """The layout description and the cost models are shared with torch code but import no torch
    (the ``cost`` command and the search start fast)."""
    import subprocess
    import sys

    code = ("import sys, apq_lightning.layout, apq_lightning.hardware.cost, apq_lightning.hardware.geometry; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
