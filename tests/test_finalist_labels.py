"""benchmarks/finalist_labels.py: every finalist of a run scored by the `qfa` protocol."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _benchmarks import load_benchmark

from apq_lightning.quant.supernet import quantize_supernet
from apq_lightning.space import get_space
from apq_lightning.space.policy_sampling import sample_policy
from apq_lightning.supernet import Supernet
from apq_lightning.supernet_io import save_supernet_weights

fl = load_benchmark("finalist_labels")

TINY = get_space("tiny")


def test_every_finalist_is_scored_like_an_mp_sample(tmp_path):
    torch.manual_seed(0)
    net = quantize_supernet(Supernet("tiny", 10), ranges="batch")
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, TINY.image_size, TINY.image_size))  # running ranges: a quant phase's weights
    weights = save_supernet_weights(net, tmp_path / "qfa.pt", dtype=torch.float32)
    rng = np.random.default_rng(0)
    apq, fixed = (TINY.sample(rng).with_bits(sample_policy(TINY, rng)) for _ in range(2))
    run = tmp_path / "run"
    (run / "search").mkdir(parents=True)
    (run / "search" / "latency_ms=0.45.json").write_text(json.dumps(
        {"best": {"subnet": json.loads(apq.to_json()), "predicted_acc": 0.9}}))
    (run / "baselines" / "latency_ms=0.45").mkdir(parents=True)
    (run / "baselines" / "latency_ms=0.45" / "baselines.json").write_text(json.dumps({"rows": [
        {"method": "apq", "subnet": json.loads(apq.to_json())},  # the baselines' own APQ row: not twice
        {"method": "fp-search@8bit", "subnet": json.loads(fixed.to_json()), "predicted_acc": 0.8}]}))
    out = tmp_path / "labels.json"
    args = ["--run", str(run), "--data", "digits", "--qfa-supernet", str(weights), "--eval-images", "100",
            "--eval-batch-size", "50", "--bn-batches", "1", "--bn-batch-size", "64", "--out", str(out)]
    assert fl.main(args) == 0
    doc = json.loads(out.read_text())
    got = doc["budgets"]["latency_ms=0.45"]
    assert set(got) == {fl.APQ, "fp-search@8bit"} and doc["eval_images"] == 100
    assert got[fl.APQ]["predicted"] == 0.9 and got["fp-search@8bit"]["predicted"] == 0.8
    assert all(0.0 <= v["qfa_label"] <= 1.0 for v in got.values())
    assert fl.main(args) == 0 and json.loads(out.read_text()) == doc  # fixed images: the same labels again
    with pytest.raises(SystemExit):
        fl.main(["--run", str(tmp_path / "empty"), "--data", "digits", "--qfa-supernet", str(weights)])
    float_weights = save_supernet_weights(Supernet("tiny", 10), tmp_path / "float.pt")
    with pytest.raises(SystemExit):
        fl.main([*args[:4], "--qfa-supernet", str(float_weights)])
