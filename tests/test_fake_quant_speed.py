"""benchmarks/fake_quant_speed.py: every way it times computes the op's values, and its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _benchmarks import load_benchmark

fqs = load_benchmark("fake_quant_speed")


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_report_has_every_way_at_one_thread_and_no_loop_at_two(tmp_path: Path, threads) -> None:
    out1, out2 = tmp_path / "one.json", tmp_path / "two.json"
    fqs.main(["--shapes", "3x8x16x16", "--bits", "4", "--repeats", "2", "--out", str(out1)])
    fqs.main(["--shapes", "3x8x16x16", "--bits", "4", "--repeats", "2", "--threads", "2", "--out", str(out2)])
    one, two = json.loads(out1.read_text()), json.loads(out2.read_text())
    assert list(one[0]["median_s"]) == list(fqs.WAYS) and one[0]["threads"] == 1
    assert list(two[0]["median_s"]) == ["op", "passes", "passes_inplace"]  # the code never loops on 2 threads
    assert all(t > 0 for t in one[0]["median_s"].values())
    assert one[0]["speedup_vs_passes"]["passes"] == pytest.approx(1.0)


def test_a_way_that_differs_from_the_op_is_refused(monkeypatch, threads) -> None:
    real = fqs._way

    def off_by_one_step(name, scale, qmin, qmax):
        fn = real(name, scale, qmin, qmax)
        return fn if name == "op" else (lambda x: fn(x) + scale)

    monkeypatch.setattr(fqs, "_way", off_by_one_step)
    with pytest.raises(AssertionError, match="differs from torch.fake_quantize_per_tensor_affine"):
        fqs.measure((2, 4, 8, 8), 4, 1, repeats=1)
