"""Accuracy predictor, ranking metrics, sample datamodule, predictor module and recipes (issue 7)."""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from _stores import write_store
from test_encoding import reference_features

from apq_lightning.callbacks import PredictorScatter
from apq_lightning.cli import main as cli_main
from apq_lightning.collection.record import TornLineWarning
from apq_lightning.data import SubnetSampleDataModule
from apq_lightning.data.splits import arch_key
from apq_lightning.encoding import get_encoder
from apq_lightning.metrics import (
    PREDICTOR_METRICS,
    PairwiseAccuracy,
    PredictorMetrics,
    count_inversions,
    pairwise_accuracy,
    predictor_metrics,
)
from apq_lightning.mlp_scorer import MLPScorer
from apq_lightning.modules import PredictorModule
from apq_lightning.modules.predictor_module import pairwise_ranking_loss
from apq_lightning.predictor import BIT_FEATURES, FORMAT, AccuracyPredictor
from apq_lightning.space import get_space

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# AccuracyPredictor
# --------------------------------------------------------------------------------------------
def test_state_dict_keys_are_the_reference_layout():
    fp = AccuracyPredictor("apq_imagenet", quantized=False, base_acc=0.7)
    mp = AccuracyPredictor("apq_imagenet", quantized=True)
    layer_keys = [f"layers.{i}.0.{p}" for i in range(3) for p in ("weight", "bias")]
    assert list(fp.state_dict()) == layer_keys + ["regressor.weight", "regressor.bias"]
    assert set(mp.state_dict()) == set(fp.state_dict()) | {"quantize_fc.weight", "quantize_fc.bias"}
    assert fp.layers[0][0].weight.shape == (400, 520) and mp.quantize_fc.weight.shape == (400, 252)
    assert fp.regressor.bias.item() == pytest.approx(0.7)
    assert (fp.space, fp.quantized, fp.encoder.fp_dim) == ("apq_imagenet", False, 520)


def test_forward_fp_ignores_bits_and_mp_needs_them():
    fp = AccuracyPredictor("tiny", quantized=False, hidden=32)
    mp = AccuracyPredictor("tiny", quantized=True, hidden=32)
    enc = fp.encoder
    x = torch.from_numpy(enc.encode_genomes(enc.space.sample_genomes(0, 8)))
    assert fp(x).shape == (8,) and mp(x).shape == (8,)
    torch.testing.assert_close(fp(x), fp(x[:, : enc.fp_dim]))
    with pytest.raises(ValueError, match="needs the quantized encoding"):
        mp(x[:, : enc.fp_dim])
    with pytest.raises(ValueError, match=r"shape \(N, 174\) or \(N, 426\)"):
        fp(x[:, :100])


def test_forward_is_the_design_formula():
    mp = AccuracyPredictor("tiny", quantized=True, hidden=16)
    enc = mp.encoder
    x = torch.from_numpy(enc.encode_genomes(enc.space.sample_genomes(1, 4)))
    h = torch.relu(mp.layers[0][0](x[:, : enc.fp_dim])) + mp.quantize_fc(x[:, enc.fp_dim:])
    h = mp.layers[2](mp.layers[1](h))
    torch.testing.assert_close(mp(x), mp.regressor(h)[:, 0])


@pytest.mark.parametrize("quantized", [False, True])
def test_predict_accepts_every_population_form(quantized):
    pred = AccuracyPredictor("apq_cifar", quantized=quantized, hidden=64)
    sp = get_space("apq_cifar")
    genomes = sp.sample_genomes(3, 40)
    subnets = [sp.from_genome(g) for g in genomes]
    want = pred.predict(genomes)
    assert want.shape == (40,) and want.dtype == torch.float32 and not want.requires_grad
    mixed = [[s, s.to_dict(), s.to_apq()][i % 3] for i, s in enumerate(subnets)]
    for form in (subnets, [s.to_dict() for s in subnets], [s.to_apq() for s in subnets], mixed,
                 torch.from_numpy(genomes), genomes.astype(np.int16)):
        torch.testing.assert_close(pred.predict(form), want, rtol=0, atol=0)
    # the search's scorer, exactly: a search's predicted accuracy is what predict() says
    np.testing.assert_array_equal(want.numpy(), MLPScorer(pred)(genomes).astype(np.float32))
    torch.testing.assert_close(pred.predict_genomes(genomes), want, rtol=0, atol=0)
    one = pred.predict(subnets[5])  # a batch of one: another matmul kernel, so rounding may differ
    torch.testing.assert_close(one, want[5:6], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pred.predict(subnets[5].to_dict()), one, rtol=0, atol=0)
    dense = get_encoder(sp).encode_genomes(genomes, quantized)
    torch.testing.assert_close(pred.predict(dense), want, rtol=1e-5, atol=1e-6)  # dense path: other sum order
    assert pred.predict([]).shape == (0,)
    assert pred.training  # predict() restores the mode it found


def test_fp_predictor_ignores_bits_of_subnets():
    pred = AccuracyPredictor("tiny", quantized=False, hidden=32)
    sp = get_space("tiny")
    subnets = [sp.sample(i, quantized=True) for i in range(6)]
    torch.testing.assert_close(pred.predict(subnets), pred.predict([s.with_bits(None) for s in subnets]))


def test_predict_errors_are_named():
    mp = AccuracyPredictor("apq_cifar", quantized=True, hidden=16)
    with pytest.raises(ValueError, match="space 'tiny'.*space 'apq_cifar'"):
        mp.predict([get_space("tiny").sample(0, quantized=True)])
    with pytest.raises(ValueError, match="float subnet"):
        mp.predict([get_space("apq_cifar").sample(0)])
    with pytest.raises(ValueError, match=r"genomes must have shape \(N, 132\)"):
        mp.predict(np.zeros((2, 7), dtype=np.int64))
    with pytest.raises(ValueError, match="columns|shape"):
        mp.predict(np.zeros((2, 7), dtype=np.float32))
    with pytest.raises(ValueError, match="expected a Subnet"):
        mp.predict(["not a subnet"])


def test_transfer_copies_shared_weights_and_zeroes_quantize_fc(tmp_path):
    fp = AccuracyPredictor("tiny", quantized=False, hidden=32, base_acc=0.6)
    with torch.no_grad():
        for p in fp.parameters():
            p.normal_()
    sp = get_space("tiny")
    genomes = sp.sample_genomes(0, 20)
    for source in (fp, fp.save(tmp_path / "fp.pt")):
        mp = AccuracyPredictor("tiny", quantized=True, hidden=32)
        assert mp.transfer_from(source) is mp
        for k, v in fp.state_dict().items():
            torch.testing.assert_close(mp.state_dict()[k], v, rtol=0, atol=0)
        assert (mp.quantize_fc.weight == 0).all() and (mp.quantize_fc.bias == 0).all()
        # zero bit head: the transferred predictor is exactly the FP one, whatever the bits
        torch.testing.assert_close(mp.predict(genomes), fp.predict(genomes))


def test_transfer_errors_say_what_differs():
    mp = AccuracyPredictor("tiny", quantized=True, hidden=32)
    with pytest.raises(ValueError, match="hidden size 64.*32"):
        mp.transfer_from(AccuracyPredictor("tiny", quantized=False, hidden=64))
    with pytest.raises(ValueError, match="space 'apq_cifar'.*'tiny'"):
        mp.transfer_from(AccuracyPredictor("apq_cifar", quantized=False, hidden=32))
    with pytest.raises(ValueError, match="number of layers 2"):
        mp.transfer_from(AccuracyPredictor("tiny", quantized=False, hidden=32, num_layers=2))
    with pytest.raises(ValueError, match="is an MP predictor"):
        mp.transfer_from(AccuracyPredictor("tiny", quantized=True, hidden=32))
    with pytest.raises(ValueError, match="this one is FP"):
        AccuracyPredictor("tiny", quantized=False, hidden=32).transfer_from(AccuracyPredictor("tiny", False, 32))


def test_save_load_round_trip(tmp_path):
    mp = AccuracyPredictor("tiny", quantized=True, hidden=24, num_layers=2, base_acc=0.4)
    path = mp.save(tmp_path / "sub" / "mp.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["space"] == "tiny" and raw["quantized"] is True
    assert (raw["hidden"], raw["num_layers"]) == (24, 2)
    back = AccuracyPredictor.load(path)
    genomes = get_space("tiny").sample_genomes(0, 10)
    torch.testing.assert_close(back.predict(genomes), mp.predict(genomes), rtol=0, atol=0)


def test_load_and_transfer_from_a_lightning_checkpoint_layout(tmp_path):
    fp = AccuracyPredictor("tiny", quantized=False, hidden=24, base_acc=0.3)
    ckpt = {"state_dict": {f"predictor.{k}": v for k, v in fp.state_dict().items()},
            "hyper_parameters": {"space": "tiny", "quantized": False, "hidden": 24, "num_layers": 3, "lr": 1e-3},
            "epoch": 4}
    torch.save(ckpt, tmp_path / "last.ckpt")
    back = AccuracyPredictor.load(tmp_path / "last.ckpt")
    for k, v in fp.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    mp = AccuracyPredictor("tiny", quantized=True, hidden=24).transfer_from(str(tmp_path / "last.ckpt"))
    torch.testing.assert_close(mp.regressor.bias, fp.regressor.bias)
    ckpt["state_dict"] = {"model.x": torch.zeros(1)}
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="without 'predictor.\\*' weights"):
        AccuracyPredictor.load(tmp_path / "other.ckpt")


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        AccuracyPredictor.load(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt not found"):
        AccuracyPredictor.from_apq_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello, I am not a checkpoint\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("text.pt", "empty.pt"):
        with pytest.raises(ValueError, match="cannot be read"):
            AccuracyPredictor.load(tmp_path / name)
        with pytest.raises(ValueError, match="cannot be read"):
            AccuracyPredictor.from_apq_checkpoint(tmp_path / name)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="holds a Tensor, not a dict"):
        AccuracyPredictor.load(tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="holds a Tensor, not a dict"):
        AccuracyPredictor.from_apq_checkpoint(tmp_path / "tensor.pt")
    torch.save({"layers.0.0.weight": torch.zeros(4, 520)}, tmp_path / "apq.pt")
    with pytest.raises(ValueError, match="from_apq_checkpoint"):
        AccuracyPredictor.load(tmp_path / "apq.pt")
    torch.save({"foo": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a predictor checkpoint"):
        AccuracyPredictor.load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an APQ predictor state dict"):
        AccuracyPredictor.from_apq_checkpoint(tmp_path / "other.pt")


def reference_state_dict(quantized: bool, hidden: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the APQ reference's keys and shapes (apq_imagenet: 520 + 252 inputs)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"layers.0.0": (hidden, 520), "layers.1.0": (hidden, hidden), "layers.2.0": (hidden, hidden),
              "regressor": (1, hidden)}
    if quantized:
        shapes["quantize_fc"] = (hidden, 252)
    out = {}
    for name, (o, i) in shapes.items():
        out[f"{name}.weight"] = torch.randn(o, i, generator=g) / i**0.5
        out[f"{name}.bias"] = torch.randn(o, generator=g) * 0.1
    return out


def numpy_reference_forward(state: dict[str, torch.Tensor], features: np.ndarray, quantized: bool) -> np.ndarray:
    s = {k: v.double().numpy() for k, v in state.items()}
    x = features.astype(np.float64)
    h = np.maximum(x[:, :520] @ s["layers.0.0.weight"].T + s["layers.0.0.bias"], 0)
    if quantized:
        h = h + x[:, 520:] @ s["quantize_fc.weight"].T + s["quantize_fc.bias"]
    for i in (1, 2):
        h = np.maximum(h @ s[f"layers.{i}.0.weight"].T + s[f"layers.{i}.0.bias"], 0)
    return (h @ s["regressor.weight"].T + s["regressor.bias"])[:, 0]


@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module", "state_dict+module"])
def test_from_apq_checkpoint_matches_a_numpy_forward(tmp_path, quantized, wrap):
    state = reference_state_dict(quantized)
    saved: dict = {("module." + k if "module" in wrap else k): v for k, v in state.items()}
    if "state_dict" in wrap:
        saved = {"state_dict": saved, "epoch": 3}
    torch.save(saved, tmp_path / "acc.pt")
    pred = AccuracyPredictor.from_apq_checkpoint(tmp_path / "acc.pt")
    assert (pred.quantized, pred.hidden, pred.space) == (quantized, 48, "apq_imagenet")
    sp = get_space("apq_imagenet")
    specs = [sp.sample(i, quantized=True).to_apq() for i in range(16)]
    feats = np.stack([reference_features(s) for s in specs])
    want = numpy_reference_forward(state, feats, quantized)
    np.testing.assert_allclose(pred.predict(specs).double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_from_apq_checkpoint_shape_errors(tmp_path):
    state = reference_state_dict(True)
    state["layers.0.0.weight"] = torch.zeros(48, 500)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"layers.0.0.weight has shape \(48, 500\), expected \(48, 520\)"):
        AccuracyPredictor.from_apq_checkpoint(tmp_path / "bad.pt")
    state = reference_state_dict(True)
    torch.save(state, tmp_path / "cifar.pt")
    with pytest.raises(ValueError, match=r"expected \(48, 270\)"):
        AccuracyPredictor.from_apq_checkpoint(tmp_path / "cifar.pt", space="apq_cifar")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="unexpected keys.*extra.weight"):
        AccuracyPredictor.from_apq_checkpoint(tmp_path / "extra.pt")


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def brute_force_pairwise(p: torch.Tensor, t: torch.Tensor) -> float:
    score = pairs = 0.0
    for i, j in itertools.combinations(range(len(p)), 2):
        if t[i] == t[j]:
            continue
        pairs += 1
        s = (p[i] - p[j]) * (t[i] - t[j])
        score += 1.0 if s > 0 else 0.5 if s == 0 else 0.0
    return score / pairs


def test_pairwise_accuracy_equals_brute_force_with_ties():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 17, 150):
        p = torch.randint(0, 6, (n,), generator=g).float()  # many predicted ties
        t = torch.randint(0, 6, (n,), generator=g).float()  # many true ties
        if len(t.unique()) < 2:
            continue
        assert pairwise_accuracy(p, t).item() == pytest.approx(brute_force_pairwise(p, t), abs=1e-6)
        inversions = sum(1 for i, j in itertools.combinations(range(n), 2) if p[i] > p[j])
        assert count_inversions(p) == inversions


def test_pairwise_accuracy_edge_cases_and_kendall_relation():
    t = torch.arange(10.0)
    assert pairwise_accuracy(t, t).item() == 1.0
    assert pairwise_accuracy(-t, t).item() == 0.0
    assert pairwise_accuracy(torch.zeros(10), t).item() == 0.5  # predicted ties score half
    assert torch.isnan(pairwise_accuracy(t, torch.ones(10)))  # no pair with different truth
    from scipy.stats import kendalltau

    x = torch.rand(5000, generator=torch.Generator().manual_seed(1))
    y = x + 0.5 * torch.rand(5000, generator=torch.Generator().manual_seed(2))
    tau = kendalltau(x.numpy(), y.numpy()).statistic
    assert pairwise_accuracy(x, y).item() == pytest.approx((tau + 1) / 2, abs=1e-6)


def test_pairwise_metric_accumulates_batches():
    g = torch.Generator().manual_seed(3)
    p, t = torch.rand(300, generator=g), torch.rand(300, generator=g)
    metric = PairwiseAccuracy()
    for a, b in zip(p.split(64), t.split(64)):
        metric.update(a, b)
    assert metric.compute().item() == pytest.approx(pairwise_accuracy(p, t).item())


def test_predictor_metrics_are_pairwise_kendall_b_and_rmse_over_every_batch():
    """The one definition that the module logs, the scatter plot shows and the transfer study reports."""
    from scipy.stats import kendalltau

    g = torch.Generator().manual_seed(4)
    p = torch.rand(200, generator=g)
    t = p + 0.3 * torch.rand(200, generator=g)
    p[:20] = p[20:40]  # predicted ties: tau-b differs from tau-a (by ~3e-4 here)
    m = predictor_metrics(p, t)
    assert tuple(m) == PREDICTOR_METRICS
    assert m["pairwise_acc"] == pytest.approx(pairwise_accuracy(p, t).item())
    assert m["kendall_tau"] == pytest.approx(kendalltau(p.numpy(), t.numpy(), variant="b").statistic, abs=1e-5)
    assert m["rmse"] == pytest.approx(float(((p - t) ** 2).mean().sqrt()))
    metric = PredictorMetrics()
    for a, b in zip(p.split(64), t.split(64)):
        metric.update(a, b)
    assert metric.compute() == pytest.approx(m)
    one = predictor_metrics(p[:1], t[:1])
    assert np.isnan(one["pairwise_acc"]) and np.isnan(one["kendall_tau"])
    assert one["rmse"] == pytest.approx(float(abs(p[0] - t[0])))
    with pytest.raises(ValueError, match="same number of elements"):
        predictor_metrics(p, t[:3])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_WORKER = """
import json, os, sys
import numpy as np, torch, torch.distributed as dist
from apq_lightning.metrics import PairwiseAccuracy

rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
data = torch.load(os.path.join(out, "data.pt"), weights_only=True)
dist.init_process_group("gloo", rank=rank, world_size=world)
metric = PairwiseAccuracy()
# uneven shards, several updates each: what a DistributedSampler + batches would give
shard = np.array_split(np.arange(len(data["preds"])), [70])[rank]
for idx in np.array_split(shard, 3):
    metric.update(data["preds"][idx], data["target"][idx])
value = metric.compute().item()
dist.destroy_process_group()
open(os.path.join(out, f"rank{rank}.json"), "w").write(json.dumps(value))
"""


@pytest.mark.slow
def test_pairwise_metric_under_ddp_equals_single_process(tmp_path):
    """Two gloo processes (plain subprocesses: they import only torch and the metric, not this
    test module) each see part of the data; both must compute the single-process value."""
    g = torch.Generator().manual_seed(4)
    preds, target = torch.rand(150, generator=g), torch.rand(150, generator=g).round(decimals=1)
    torch.save({"preds": preds, "target": target}, tmp_path / "data.pt")
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(tmp_path)], env=env) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    want = pairwise_accuracy(preds, target).item()
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == pytest.approx(want, abs=1e-7)


def test_pairwise_ranking_loss_prefers_the_true_order():
    t = torch.tensor([0.1, 0.5, 0.3, 0.3])
    good = pairwise_ranking_loss(t * 2, t)
    bad = pairwise_ranking_loss(-t, t)
    assert good < bad
    assert pairwise_ranking_loss(torch.rand(4), torch.ones(4)) == 0  # no pair with different truth


# --------------------------------------------------------------------------------------------
# SubnetSampleDataModule
# --------------------------------------------------------------------------------------------
def test_datamodule_serves_features_and_mean(tmp_path):
    write_store(tmp_path / "fp" / "samples.rank0.jsonl", "tiny", "fp", 120)
    dm = SubnetSampleDataModule([str(tmp_path / "fp" / "samples*.jsonl")], quantized=False, batch_size=16)
    dm.setup("fit")
    assert dm.space == "tiny" and dm.supernet_hash == "abc123" and dm.feature_dim == 174
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 174) and y.shape == (16,) and x.dtype == torch.float32
    sizes = [len(dm.dataset(s)) for s in ("train", "val", "test")]
    assert sum(sizes) == 120 and min(sizes) > 0
    assert dm.train_mean == pytest.approx(float(dm.dataset("train").accs.double().mean()))
    x0, y0 = dm.dataset("val")[0]
    assert x0.shape == (174,) and y0.shape == ()


def test_split_is_by_architecture_across_fp_and_mp_stores(tmp_path):
    sp = get_space("tiny")
    archs = sp.sample_genomes(0, 60)
    write_store(tmp_path / "fp.jsonl", "tiny", "fp", 60, genomes=archs)
    for k in range(3):  # the same architectures under other policies
        g = archs.copy()
        bit_genes = slice(sp.num_stages + 2 * sp.num_blocks, None)
        g[:, bit_genes] = sp.sample_genomes(10 + k, 60)[:, bit_genes]
        write_store(tmp_path / "mp.jsonl", "tiny", "mp_arch_policies", 60, seed=k, genomes=g, start_index=100 * k)
    dm = SubnetSampleDataModule([str(tmp_path / "*.jsonl")], quantized=False, val_fraction=0.3, test_fraction=0.3)
    dm.setup("fit")
    owner: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        for g in dm.dataset(split).genomes:
            owner.setdefault(arch_key(sp.from_genome(g, quantized=False)), set()).add(split)
    assert sum(len(dm.dataset(s)) for s in ("train", "val", "test")) == 240
    assert len(owner) == 60 and all(len(v) == 1 for v in owner.values())
    again = SubnetSampleDataModule([str(tmp_path / "*.jsonl")], quantized=False, val_fraction=0.3, test_fraction=0.3)
    again.setup("fit")
    np.testing.assert_array_equal(again.dataset("val").genomes, dm.dataset("val").genomes)


def test_max_train_is_a_deterministic_nested_subset(tmp_path):
    write_store(tmp_path / "s.jsonl", "tiny", "mp_random", 200)

    def train_keys(cap: int | None) -> set[bytes]:
        dm = SubnetSampleDataModule([str(tmp_path / "s.jsonl")], quantized=True, max_train=cap)
        dm.setup("fit")
        return {g.tobytes() for g in dm.dataset("train").genomes}

    full, small, small2, large = train_keys(None), train_keys(20), train_keys(20), train_keys(60)
    assert len(small) == 20 and small == small2 and small < large < full and len(large) == 60


def test_store_refusals_name_file_line_and_values(tmp_path):
    path = tmp_path / "mix.jsonl"
    write_store(path, "tiny", "fp", 3)
    write_store(path, "apq_cifar", "fp", 1)
    where = re.escape(str(path))
    with pytest.raises(ValueError, match=rf"{where}:4: record is for space 'apq_cifar'.*first record \({where}:1\)"):
        SubnetSampleDataModule([str(path)]).setup("fit")
    with pytest.raises(ValueError, match=rf"{where}:1: record is for space 'tiny'.*data.space says space 'apq_cifar'"):
        SubnetSampleDataModule([str(path)], space="apq_cifar").setup("fit")
    hashes = tmp_path / "hashes.jsonl"
    write_store(hashes, "tiny", "fp", 2, supernet_hash="aaa")
    write_store(hashes, "tiny", "fp", 1, supernet_hash="bbb")
    where = re.escape(str(hashes))
    with pytest.raises(ValueError, match=rf"{where}:3: record was measured on supernet 'bbb'.*'aaa'"):
        SubnetSampleDataModule([str(hashes)]).setup("fit")
    with pytest.raises(ValueError, match=rf"{where}:1: .*'aaa'.*data.supernet_hash says supernet_hash 'ccc'"):
        SubnetSampleDataModule([str(hashes)], supernet_hash="ccc").setup("fit")
    fp = tmp_path / "fp.jsonl"
    write_store(fp, "tiny", "fp", 2)
    with pytest.raises(ValueError, match=rf"{re.escape(str(fp))}:1: a 'fp' record without bits, but quantized=True"):
        SubnetSampleDataModule([str(fp)], quantized=True).setup("fit")
    with pytest.raises(ValueError, match="no sample files match"):
        SubnetSampleDataModule([str(tmp_path / "nothing*.jsonl")]).setup("fit")


def test_malformed_line_fails_with_file_and_line_but_torn_tail_is_skipped(tmp_path):
    path = tmp_path / "s.jsonl"
    write_store(path, "tiny", "fp", 30)
    lines = path.read_text().splitlines(keepends=True)
    torn = tmp_path / "torn.jsonl"
    torn.write_text("".join(lines) + lines[0][:40])
    dm = SubnetSampleDataModule([str(torn)])
    with pytest.warns(TornLineWarning, match=rf"{re.escape(str(torn))}:31"):
        dm.setup("fit")
    assert sum(len(dm.dataset(s)) for s in ("train", "val", "test")) == 30
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines[:2]) + lines[2][:40] + "\n" + "".join(lines[3:]))
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}:3: malformed sample record"):
        SubnetSampleDataModule([str(bad)]).setup("fit")
    wrong = json.loads(lines[0])
    wrong["subnet"]["kernels"][0] = 4
    wrong["key"] = "0" * 12
    bad.write_text(lines[1] + json.dumps(wrong) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}:2: malformed sample record.*kernels=4"):
        SubnetSampleDataModule([str(bad)]).setup("fit")


def test_duplicate_measurements_count_once(tmp_path):
    write_store(tmp_path / "a" / "samples.rank0.jsonl", "tiny", "fp", 40)
    (tmp_path / "a" / "samples.merged.jsonl").write_text((tmp_path / "a" / "samples.rank0.jsonl").read_text())
    dm = SubnetSampleDataModule([str(tmp_path / "a" / "samples*.jsonl")])
    dm.setup("fit")
    assert sum(len(dm.dataset(s)) for s in ("train", "val", "test")) == 40


def test_follow_reads_new_lines_and_waits_for_a_torn_tail(tmp_path):
    path = tmp_path / "live.jsonl"
    write_store(path, "tiny", "mp_random", 50)
    dm = SubnetSampleDataModule([str(tmp_path / "*.jsonl")], quantized=True, follow=True, val_fraction=0,
                                test_fraction=0)
    dm.setup("fit")
    assert len(dm.train_dataloader().dataset) == 50
    more = tmp_path / "more.jsonl"
    write_store(more, "tiny", "mp_random", 30, seed=1)
    text = more.read_text()
    cut = len(text) - 25
    more.unlink()
    path.write_text(path.read_text() + text[:cut])  # a write in progress
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # following: a partial last line is normal, not a warning
        assert len(dm.train_dataloader().dataset) == 50 + 29
    with open(path, "a") as fh:
        fh.write(text[cut:])
    assert len(dm.train_dataloader().dataset) == 80
    write_store(tmp_path / "new_shard.jsonl", "tiny", "mp_random", 5, seed=2)  # a new file matching the glob
    assert len(dm.train_dataloader().dataset) == 85
    merged = tmp_path / "merged.tmp"  # merge_stores-style: a new file renamed over the old one
    merged.write_text("".join(reversed(path.read_text().splitlines(keepends=True))))
    os.replace(merged, path)
    assert len(dm.train_dataloader().dataset) == 85


def test_follow_sets_the_trainer_to_reload_dataloaders(tmp_path):
    write_store(tmp_path / "s.jsonl", "tiny", "fp", 40)
    dm = SubnetSampleDataModule([str(tmp_path / "s.jsonl")], follow=True)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=1)
    dm.trainer = trainer
    dm.setup("fit")
    assert trainer.reload_dataloaders_every_n_epochs == 1


def test_datamodule_argument_errors():
    with pytest.raises(ValueError, match="stores"):
        SubnetSampleDataModule([])
    with pytest.raises(ValueError, match="sum below 1"):
        SubnetSampleDataModule(["x"], val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"kinds \['qat'\] unknown"):
        SubnetSampleDataModule(["x"], kinds=["qat"])


# --------------------------------------------------------------------------------------------
# PredictorModule
# --------------------------------------------------------------------------------------------
def _trainer(tmp_path: Path, epochs: int) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)


def test_predictor_learns_a_synthetic_ground_truth(tmp_path, seed):
    L.seed_everything(seed)
    write_store(tmp_path / "mp.jsonl", "tiny", "mp_random", 1500)
    dm = SubnetSampleDataModule([str(tmp_path / "mp.jsonl")], quantized=True, batch_size=64)
    # one-hot bits: the synthetic truth gives every bit choice of every tensor its own random effect,
    # which a bit head on the numeric deficits cannot represent (a real store's bits are ordered)
    module = PredictorModule(space="tiny", quantized=True, hidden=128, lr=2e-3, bit_features="onehot")
    trainer = _trainer(tmp_path, 12)
    trainer.fit(module, dm)
    val = dict(trainer.callback_metrics)
    assert {"val/kendall_tau", "val/rmse", "val/loss", "train/loss"} <= set(val)
    test = trainer.test(module, dm, verbose=False)[0]
    val_acc, test_acc = float(val["val/pairwise_acc"]), test["test/pairwise_acc"]
    print(f"synthetic predictor: val pairwise {val_acc:.4f}, test {test_acc:.4f}")
    assert val["val/pairwise_acc"] >= 0.9, val
    assert test["test/pairwise_acc"] >= 0.9 and {"test/kendall_tau", "test/rmse", "test/loss"} <= set(test)


def test_base_acc_comes_from_the_training_mean(tmp_path):
    write_store(tmp_path / "fp.jsonl", "tiny", "fp", 80)
    dm = SubnetSampleDataModule([str(tmp_path / "fp.jsonl")], quantized=False)
    module = PredictorModule(space="tiny", quantized=False, hidden=16)
    _trainer(tmp_path, 0).fit(module, dm)
    assert module.predictor.regressor.bias.item() == pytest.approx(dm.train_mean, abs=1e-6)
    fixed = PredictorModule(space="tiny", quantized=False, hidden=16, base_acc=0.25)
    _trainer(tmp_path, 0).fit(fixed, dm)
    assert fixed.predictor.regressor.bias.item() == pytest.approx(0.25)


def test_ranking_loss_option_trains(tmp_path):
    write_store(tmp_path / "fp.jsonl", "tiny", "fp", 200)
    dm = SubnetSampleDataModule([str(tmp_path / "fp.jsonl")], quantized=False, batch_size=50)
    for loss in ("ranking", "mse+ranking"):
        module = PredictorModule(space="tiny", quantized=False, hidden=32, loss=loss)
        trainer = _trainer(tmp_path, 1)
        trainer.fit(module, dm)
        assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_module_refuses_mismatched_data_and_bad_arguments(tmp_path):
    write_store(tmp_path / "mp.jsonl", "tiny", "mp_random", 40)
    dm = SubnetSampleDataModule([str(tmp_path / "mp.jsonl")], quantized=True)
    with pytest.raises(ValueError, match="data.quantized=True but model.quantized=False"):
        _trainer(tmp_path, 1).fit(PredictorModule(space="tiny", quantized=False, hidden=8), dm)
    with pytest.raises(ValueError, match="space 'tiny'.*space 'apq_cifar'"):
        _trainer(tmp_path, 1).fit(PredictorModule(space="apq_cifar", quantized=True, hidden=8), dm)
    with pytest.raises(ValueError, match="set quantized=true"):
        PredictorModule(space="tiny", quantized=False, transfer_from="x.pt")
    with pytest.raises(ValueError, match="loss='l1'"):
        PredictorModule(space="tiny", loss="l1")
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):  # before any training step
        _trainer(tmp_path, 1).fit(PredictorModule(space="tiny", quantized=True, hidden=8,
                                                  transfer_from=str(tmp_path / "nope.ckpt")), dm)


def test_scatter_writes_png_and_json(tmp_path):
    preds, target = torch.rand(50), torch.rand(50)
    m = PredictorScatter(out=str(tmp_path / "plots" / "scatter.png")).write(preds, target, title="t")
    assert (tmp_path / "plots" / "scatter.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "plots" / "scatter.json").read_text())
    assert saved["metrics"]["pairwise_acc"] == pytest.approx(m["pairwise_acc"]) and len(saved["true_pred"]) == 50


# --------------------------------------------------------------------------------------------
# Recipes through the CLI
# --------------------------------------------------------------------------------------------
def _cli(recipe: str, tmp_path: Path, *extra: str) -> list[str]:
    run_dir = tmp_path / "runs" / Path(recipe).stem  # where the recipe's own runs/<name> would be
    return ["fit", "--config", str(ROOT / "recipes" / recipe), "--trainer.default_root_dir", str(run_dir),
            "--trainer.enable_progress_bar", "false", *extra]


@pytest.mark.parametrize(("recipe", "space"), [("predictor_fp_tiny.yaml", "tiny"), ("predictor_fp.yaml", "apq_cifar")])
def test_fp_recipe_fast_dev_run(tmp_path, monkeypatch, recipe, space):
    monkeypatch.chdir(tmp_path)
    write_store(tmp_path / "fp" / "samples.rank0.jsonl", space, "fp", 60)
    args = _cli(recipe, tmp_path, "--trainer.fast_dev_run", "1",
                "--data.init_args.stores", json.dumps([str(tmp_path / "fp" / "samples*.jsonl")]))
    assert cli_main(args) == 0


@pytest.mark.parametrize(("recipe", "space"), [("predictor_mp_tiny.yaml", "tiny"), ("predictor_mp.yaml", "apq_cifar")])
def test_mp_recipe_fast_dev_run_with_transfer(tmp_path, monkeypatch, recipe, space):
    monkeypatch.chdir(tmp_path)
    write_store(tmp_path / "mp" / "samples.rank0.jsonl", space, "mp_random", 60)
    fp = AccuracyPredictor(space, quantized=False).save(tmp_path / "fp.pt")
    args = _cli(recipe, tmp_path, "--trainer.fast_dev_run", "1",
                "--data.init_args.stores", json.dumps([str(tmp_path / "mp" / "samples*.jsonl")]),
                "--model.init_args.transfer_from", str(fp))
    assert cli_main(args) == 0
    assert (tmp_path / "runs" / recipe.replace(".yaml", "") / "scatter_val.png").is_file()


@pytest.mark.slow
def test_recipe_chain_fp_then_mp_from_the_lightning_checkpoint(tmp_path, monkeypatch, capsys):
    """Stage 3 then stage 5 on tiny, as documented: the MP recipe's default transfer_from is the
    FP run's last.ckpt; both checkpoints load with weights_only=True."""
    monkeypatch.chdir(tmp_path)
    write_store(tmp_path / "runs" / "collect_fp_tiny" / "samples.rank0.jsonl", "tiny", "fp", 120)
    write_store(tmp_path / "runs" / "collect_mp_tiny" / "samples.rank0.jsonl", "tiny", "mp_random", 120, seed=1)
    short = ("--trainer.max_steps", "4", "--trainer.val_check_interval", "2")
    assert cli_main(_cli("predictor_fp_tiny.yaml", tmp_path, *short)) == 0
    fp_ckpt = tmp_path / "runs" / "predictor_fp_tiny" / "checkpoints" / "last.ckpt"
    assert torch.load(fp_ckpt, weights_only=True)["hyper_parameters"]["quantized"] is False
    wandb_dir = tmp_path / "runs" / "predictor_fp_tiny" / "wandb"  # the recipe's W&B logger, offline in tests
    assert list(wandb_dir.rglob("scatter_val*.png")), "the scatter plot is not in the W&B run"
    assert cli_main(_cli("predictor_mp_tiny.yaml", tmp_path, *short)) == 0
    mp_ckpt = tmp_path / "runs" / "predictor_mp_tiny" / "checkpoints" / "last.ckpt"
    torch.load(mp_ckpt, weights_only=True)
    mp = AccuracyPredictor.load(mp_ckpt)
    assert mp.quantized and mp.space == "tiny"
    assert mp.predict(get_space("tiny").sample_genomes(0, 5)).shape == (5,)
    summary = json.loads((tmp_path / "runs" / "predictor_mp_tiny" / "summary.json").read_text())
    assert "val/pairwise_acc" in summary["metrics"]
    fp_ckpt.unlink()  # a finished MP module loads without its FP source
    reloaded = PredictorModule.load_from_checkpoint(mp_ckpt, weights_only=True)
    torch.testing.assert_close(reloaded.predictor.state_dict(), mp.state_dict())
    # `apq test --ckpt_path` re-reads the saved hyperparameters (the num_classes link target
    # among them, which a predictor does not take): the checkpoint's own predictor is tested.
    capsys.readouterr()
    test_args = _cli("predictor_mp_tiny.yaml", tmp_path, "--data.init_args.test_fraction", "0.3",
                     "--ckpt_path", str(mp_ckpt))
    assert cli_main(["test", *test_args[1:]]) == 0
    assert "test/pairwise_acc_same_arch" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Pairwise accuracy split by architecture (issue 15: does the predictor see the bits?)
# --------------------------------------------------------------------------------------------
def _brute_split(p, t, g):
    same, diff = [0.0, 0], [0.0, 0]
    for i in range(len(p)):
        for j in range(i + 1, len(p)):
            if t[i] == t[j]:
                continue
            score = 0.5 if p[i] == p[j] else float((p[i] - p[j]) * (t[i] - t[j]) > 0)
            bucket = same if g[i] == g[j] else diff
            bucket[0] += score
            bucket[1] += 1
    return same[0] / same[1], diff[0] / diff[1], same[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_split_equals_a_brute_force_count(seed):
    from apq_lightning.metrics import pairwise_split, predictor_metrics

    rng = np.random.default_rng(seed)
    n = 60
    g = torch.as_tensor(rng.integers(0, 12, n), dtype=torch.float64)  # 12 architectures, ~5 policies each
    t = torch.as_tensor(rng.integers(0, 20, n) / 20, dtype=torch.float32)  # ties in the targets
    p = torch.as_tensor(rng.integers(0, 15, n) / 15, dtype=torch.float32)  # and in the predictions
    same, diff, n_same = _brute_split(p.tolist(), t.tolist(), g.tolist())
    got = pairwise_split(p, t, g)
    assert got["pairwise_acc_same_arch"] == pytest.approx(same, abs=1e-12)
    assert got["pairwise_acc_diff_arch"] == pytest.approx(diff, abs=1e-12)
    assert got["same_arch_pairs"] == n_same
    assert predictor_metrics(p, t, g)["pairwise_acc_same_arch"] == got["pairwise_acc_same_arch"]
    assert "pairwise_acc_same_arch" not in predictor_metrics(p, t)


def test_arch_groups_are_equal_exactly_for_one_architecture():
    from apq_lightning.metrics import arch_groups

    sp = get_space("tiny")
    enc = get_encoder("tiny")
    a, b = sp.sample(0), sp.sample(1)
    subnets = [a.with_bits(4), a.with_bits(8), b.with_bits(4)]
    x = torch.as_tensor(enc.encode_genomes(np.stack([sp.to_genome(s) for s in subnets]), quantized=True))
    keys = arch_groups(x, enc.fp_dim)
    assert keys[0] == keys[1] != keys[2]


# --------------------------------------------------------------------------------------------
# A predictor that cannot memorise noise (issue 15 item 5): bit layouts, standardised targets,
# the grouped validation split, early stopping with the best weights restored, old files
# --------------------------------------------------------------------------------------------
def _randomized(pred: AccuracyPredictor, std: float = 0.1) -> AccuracyPredictor:
    with torch.no_grad():
        for p in pred.parameters():
            p.normal_(0.0, std)
    return pred


@pytest.mark.parametrize("bit_features", BIT_FEATURES)
def test_every_bit_layout_predicts_what_the_search_scores(bit_features):
    pred = _randomized(AccuracyPredictor("apq_cifar", quantized=True, hidden=32, bit_features=bit_features))
    sp, enc = get_space("apq_cifar"), get_encoder("apq_cifar")
    genomes = sp.sample_genomes(4, 40)
    want = pred.predict(genomes)
    np.testing.assert_array_equal(want.numpy(), MLPScorer(pred)(genomes).astype(np.float32))
    dense = pred(torch.from_numpy(enc.encode_genomes(genomes)))  # the training forward: another sum order
    torch.testing.assert_close(want, dense.detach(), rtol=1e-5, atol=1e-5)
    assert want.std() > 0.01  # the bits and the architecture both move the score


def test_bit_deficits_order_the_bits():
    enc = get_encoder("tiny")
    sp = enc.space
    d = enc.bit_deficits()
    assert d.shape == (enc.quant_dim, 4 * sp.num_blocks) and d.dtype == np.float32
    s = sp.sample(3)
    active = np.tile(sp.genome_active(sp.to_genome(s)[None])[0], 4).astype(np.float32)
    for bits, deficit in ((8, 0.0), (6, 0.5), (4, 1.0)):
        x = enc.encode([s.with_bits(bits)])[:, enc.fp_dim:]
        np.testing.assert_array_equal((x @ d)[0], deficit * active)  # skipped blocks: 0 at any bit width


@pytest.mark.parametrize("bit_features", ["onehot+numeric", "head"])
def test_transfer_into_every_layout_starts_as_the_fp_predictor(bit_features, tmp_path):
    fp = _randomized(AccuracyPredictor("tiny", quantized=False, hidden=32, base_acc=0.6))
    mp = AccuracyPredictor("tiny", quantized=True, hidden=32, bit_features=bit_features).transfer_from(fp)
    assert mp.bit_layers() and all((m.weight == 0).all() and (m.bias == 0).all() for m in mp.bit_layers())
    genomes = get_space("tiny").sample_genomes(0, 20)
    torch.testing.assert_close(mp.predict(genomes), fp.predict(genomes))
    back = AccuracyPredictor.load(_randomized(mp).save(tmp_path / "mp.pt"))  # the layout is in the file
    assert back.bit_features == bit_features
    torch.testing.assert_close(back.predict(genomes), mp.predict(genomes), rtol=0, atol=0)


def test_files_of_before_bit_features_load_with_the_one_hot_layout(tmp_path):
    """Old ``.pt`` files and old Lightning checkpoints carry no ``bit_features``: APQ's one-hot layout."""
    mp = _randomized(AccuracyPredictor("tiny", quantized=True, hidden=24))
    genomes = get_space("tiny").sample_genomes(1, 10)
    old = {"format": FORMAT, "space": "tiny", "quantized": True, "hidden": 24, "num_layers": 3,
           "state_dict": mp.state_dict()}
    torch.save(old, tmp_path / "old.pt")
    ckpt = {"state_dict": {f"predictor.{k}": v for k, v in mp.state_dict().items()}, "epoch": 3,
            "pytorch-lightning_version": L.__version__,
            "hyper_parameters": {"space": "tiny", "quantized": True, "hidden": 24, "num_layers": 3, "lr": 1e-3,
                                 "weight_decay": 1e-4, "loss": "mse", "cosine": True, "base_acc": None,
                                 "transfer_from": None}}
    torch.save(ckpt, tmp_path / "old.ckpt")
    for path in (tmp_path / "old.pt", tmp_path / "old.ckpt"):
        back = AccuracyPredictor.load(path)
        assert back.bit_features == "onehot"
        torch.testing.assert_close(back.predict(genomes), mp.predict(genomes), rtol=0, atol=0)
    module = PredictorModule.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True)
    assert module.hparams.bit_features == "onehot"
    torch.testing.assert_close(module.predictor.predict(genomes), mp.predict(genomes), rtol=0, atol=0)


def test_standardised_training_equals_training_on_z_scores(tmp_path):
    """The module's output layer in z units (weights x sigma, lr x sigma, eps / sigma, decay / sigma,
    none on its bias) is exactly AdamW on (y - mu) / sigma read back as mu + sigma * z."""
    from apq_lightning.study.run import EpochPermutations, fit_predictor

    g = torch.Generator().manual_seed(0)
    enc = get_encoder("tiny")
    x = torch.from_numpy(enc.encode_genomes(enc.space.sample_genomes(0, 48), quantized=False))
    y = 0.7 + 0.02 * torch.randn(48, generator=g)
    mu, sigma = float(y.double().mean()), float(y.double().std())
    torch.manual_seed(0)
    module = PredictorModule(space="tiny", quantized=False, hidden=16, base_acc=mu, target_std=sigma, cosine=False,
                             best_monitor=None)
    z_net = AccuracyPredictor("tiny", quantized=False, hidden=16)
    z_net.load_state_dict(module.predictor.state_dict())
    with torch.no_grad():
        z_net.regressor.bias.zero_()  # mu in z units
    fit_predictor(module, x, y, epochs=4, batch_size=16, seed=0, root=tmp_path)
    reg = list(z_net.regressor.parameters())
    rest = [p for p in z_net.parameters() if not any(p is q for q in reg)]
    opt = torch.optim.AdamW([{"params": rest}, {"params": [z_net.regressor.weight]},
                             {"params": [z_net.regressor.bias], "weight_decay": 0.0}], lr=1e-3, weight_decay=1e-2)
    order = EpochPermutations(len(y), 0)
    z = (y - mu) / sigma
    for _ in range(4):
        for idx in torch.tensor(list(iter(order))).split(16):
            loss = torch.nn.functional.mse_loss(z_net(x[idx]), z[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        torch.testing.assert_close(module.predictor(x), mu + sigma * z_net(x), rtol=0, atol=2e-6)
        assert float((module.predictor(x) - y).abs().max()) < 0.2  # in accuracy units, not z-scores


def test_standardised_targets_predict_in_accuracy_units(tmp_path):
    write_store(tmp_path / "fp.jsonl", "tiny", "fp", 160)
    dm = SubnetSampleDataModule([str(tmp_path / "fp.jsonl")], batch_size=32)
    module = PredictorModule(space="tiny", quantized=False, hidden=32)
    _trainer(tmp_path, 40).fit(module, dm)
    val = dm.dataset("val")
    pred = module.predictor.predict(val.genomes)
    y = val.accs
    assert abs(float(pred.mean() - y.mean())) < float(y.std())  # around the accuracies, not around 0
    assert 0.3 < float(pred.std() / y.std()) < 3.0  # their spread, not the z-scores' 1
    assert predictor_metrics(pred, y)["pairwise_acc"] > 0.7
    # what is saved is the accuracy-unit predictor: no sigma needed to read it
    back = AccuracyPredictor.load(module.predictor.save(tmp_path / "fp.pt"))
    torch.testing.assert_close(back.predict(val.genomes), pred, rtol=0, atol=0)


class _ValLog(L.Callback):
    """Every validation's loss and the predictor's weights at that moment."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.states: list[dict] = []
        self.steps: list[int] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.losses.append(float(trainer.callback_metrics["val/loss"]))
        self.states.append({k: v.clone() for k, v in pl_module.predictor.state_dict().items()})
        self.steps.append(trainer.global_step)


def test_early_stopping_stops_on_a_noisy_store_and_restores_the_best(tmp_path):
    """Labels with noise far above their signal: a from-scratch MLP memorises, the validation loss
    turns up, EarlyStopping ends the fit long before max_steps and the best weights come back."""
    from lightning.pytorch.callbacks import EarlyStopping

    write_store(tmp_path / "mp.jsonl", "tiny", "mp_random", 120, noise=0.05)
    dm = SubnetSampleDataModule([str(tmp_path / "mp.jsonl")], quantized=True, batch_size=32)
    module = PredictorModule(space="tiny", quantized=True, hidden=64, bit_features="onehot", lr=3e-3)
    log = _ValLog()
    stop = EarlyStopping("val/loss", patience=4, check_on_train_epoch_end=False)
    trainer = L.Trainer(max_steps=3000, max_epochs=-1, val_check_interval=5, check_val_every_n_epoch=None,
                        callbacks=[log, stop], num_sanity_val_steps=0, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, dm)
    assert trainer.global_step < 3000 and stop.stopped_epoch > 0
    best = int(np.argmin(log.losses))
    assert best < len(log.losses) - 1 and module._best["step"] == log.steps[best]  # stopped after the best
    for k, v in module.predictor.state_dict().items():
        torch.testing.assert_close(v, log.states[best][k], rtol=0, atol=0)
    x, y = dm.dataset("val").__getitems__(range(len(dm.dataset("val"))))
    with torch.no_grad():
        loss = torch.nn.functional.mse_loss(module.predictor(x), y) / module._sigma**2
    assert float(loss) == pytest.approx(log.losses[best], rel=1e-4)


def test_only_the_bit_part_learns_after_a_transfer(tmp_path):
    write_store(tmp_path / "mp.jsonl", "tiny", "mp_random", 80)
    dm = SubnetSampleDataModule([str(tmp_path / "mp.jsonl")], quantized=True, batch_size=16)
    fp = _randomized(AccuracyPredictor("tiny", quantized=False, hidden=32, base_acc=0.5), 0.05)
    for train_transferred in (False, True):
        module = PredictorModule(space="tiny", quantized=True, hidden=32, train_transferred=train_transferred)
        module.transfer(fp)
        _trainer(tmp_path, 2).fit(module, dm)
        assert module.predictor.bit_head.weight.abs().sum() > 0
        same = all(torch.equal(module.predictor.state_dict()[k], v) for k, v in fp.state_dict().items())
        assert same is not train_transferred


def _val_archs(dm: SubnetSampleDataModule) -> list[str]:
    from apq_lightning.data.splits import arch_keys

    return arch_keys(get_space(dm.space), dm.dataset("val").genomes)


def _cifar_like_store(path: Path) -> None:
    """The CIFAR MP store's shape on tiny: 6 architectures under 10 policies, 60 of one policy."""
    sp = get_space("tiny")
    genomes = sp.sample_genomes(5, 120)
    arch = sp.genome_slices()["pw_w"].start
    for a in range(6):
        genomes[10 * a: 10 * a + 10, :arch] = genomes[10 * a, :arch]
    write_store(path, "tiny", "mp_arch_policies", 120, genomes=genomes)


def test_val_split_meets_its_minimums_by_architecture(tmp_path):
    _cifar_like_store(tmp_path / "mp.jsonl")
    dms = {}
    for seed in range(4):
        hash_only = SubnetSampleDataModule([str(tmp_path / "mp.jsonl")], quantized=True, split_seed=seed,
                                           min_val_samples=0, min_val_archs=0)
        dm = SubnetSampleDataModule([str(tmp_path / "mp.jsonl")], quantized=True, split_seed=seed)
        archs, before = _val_archs(dm), _val_archs(hash_only)
        assert len(archs) >= 20 and len(set(archs)) >= 8, (seed, len(archs), len(set(archs)))
        assert set(before) <= set(archs) and len(dm.dataset("test")) == len(hash_only.dataset("test"))
        assert 2 * len(archs) <= len(archs) + len(dm.dataset("train"))  # never more than half of train + val
        owner: dict[str, set[str]] = {}
        for split in ("train", "val", "test"):
            from apq_lightning.data.splits import arch_keys

            for key in arch_keys(get_space("tiny"), dm.dataset(split).genomes):
                owner.setdefault(key, set()).add(split)
        assert all(len(v) == 1 for v in owner.values())
        dms[seed] = (len(before), len(set(before)))
    assert any(n < 20 or k < 8 for n, k in dms.values())  # the hash share alone falls short somewhere


def test_a_store_too_small_for_the_val_minimums_warns(tmp_path):
    from apq_lightning.data.splits import SmallValidationSplitWarning

    write_store(tmp_path / "mp.jsonl", "tiny", "mp_random", 24)
    with pytest.warns(SmallValidationSplitWarning, match=r"holds \d+ sample\(s\) of \d+ architecture\(s\), fewer than"):
        dm = SubnetSampleDataModule([str(tmp_path / "mp.jsonl")], quantized=True, val_fraction=0.2)
    assert 0 < len(dm.dataset("val")) <= len(dm.dataset("train"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallValidationSplitWarning)
        SubnetSampleDataModule([str(tmp_path / "mp.jsonl")], quantized=True, val_fraction=0.2, min_val_samples=4,
                               min_val_archs=4)
    with pytest.raises(ValueError, match="min_val_samples=-1"):
        SubnetSampleDataModule([str(tmp_path / "mp.jsonl")], min_val_samples=-1)


def test_new_module_arguments_are_checked():
    for kwargs, match in (({"optimizer": "sgd"}, "optimizer='sgd'"), ({"best_monitor": "val/acc"}, "best_monitor"),
                          ({"bit_features": "bits"}, "bit_features='bits'"), ({"target_std": 0.0}, "target_std")):
        with pytest.raises(ValueError, match=match):
            PredictorModule(space="tiny", **kwargs)


def test_recipe_early_stopping_writes_the_best_weights_as_last(tmp_path, monkeypatch):
    """The tiny FP recipe, shortened: when it ends, last.ckpt holds the restored best weights."""
    monkeypatch.chdir(tmp_path)
    write_store(tmp_path / "fp" / "samples.rank0.jsonl", "tiny", "fp", 120, noise=0.05)
    args = _cli("predictor_fp_tiny.yaml", tmp_path, "--trainer.max_steps", "60", "--trainer.val_check_interval", "5",
                "--data.init_args.stores", json.dumps([str(tmp_path / "fp" / "samples*.jsonl")]))
    assert cli_main(args) == 0
    ckpt = torch.load(tmp_path / "runs" / "predictor_fp_tiny" / "checkpoints" / "last.ckpt", weights_only=True)
    best = ckpt["predictor_best"]
    assert best["restored"] and best["step"] <= ckpt["global_step"]
    for k, v in best["state"].items():
        torch.testing.assert_close(ckpt["state_dict"][f"predictor.{k}"], v, rtol=0, atol=0)
    summary = json.loads((tmp_path / "runs" / "predictor_fp_tiny" / "summary.json").read_text())
    assert summary["metrics"]["val/loss"] == pytest.approx(best["value"])  # the numbers of the weights kept
