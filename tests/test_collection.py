"""Sample store, index -> subnet sampling, FP / MP collection through the CLI, resume, DDP."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from apq_lightning.cli import main as cli_main
from apq_lightning.collection import (
    MPSampling,
    SampleIndexDataModule,
    SampleRecord,
    SampleStore,
    TornLineWarning,
    checkpoint_hash,
    fp_subnet,
    merge_stores,
    mp_kind,
    mp_subnet,
    read_samples,
)
from apq_lightning.space import get_space
from apq_lightning.supernet import Supernet

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------- helpers
def _record(
    index: int, kind: str = "fp", acc: float = 0.5, space: str = "tiny", h: str = "abc123", seed: int = 0
) -> SampleRecord:
    sp = get_space(space)
    if kind == "fp":
        subnet = fp_subnet(sp, seed, index)
    else:
        subnet = sp.sample(np.random.default_rng([seed, index]), quantized=True)
    return SampleRecord.measured(subnet, acc, index, seed, kind, h, {"bn_batches": 1}, {"total_s": 0.1})


def _write(path: Path, records: list[SampleRecord]) -> Path:
    with SampleStore(path) as store:
        for r in records:
            store.append(r)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny supernet in the checkpoint layout ``load_supernet`` reads (nothing trained)."""
    torch.manual_seed(0)
    net = Supernet("tiny", 10)
    for m in net.modules():  # residual blocks that are not identities, so subnets differ
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save(
        {
            "state_dict": {f"supernet.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": {"space": "tiny", "num_classes": 10, "dropout": 0.0},
        },
        path,
    )
    return path


def _cli_args(recipe: str, ckpt: Path, out: Path, n: int, *extra: str) -> list[str]:
    return [
        "predict",
        "--config",
        str(ROOT / "recipes" / recipe),
        "--model.init_args.supernet_ckpt",
        str(ckpt),
        "--data.init_args.output_dir",
        str(out),
        "--data.init_args.num_samples",
        str(n),
        "--trainer.default_root_dir",
        str(out),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.accelerator",
        "cpu",
        *extra,
    ]


FAST_MP = (
    "--model.init_args.qat_steps",
    "2",
    "--model.init_args.qat_batch_size",
    "16",
    "--model.init_args.calib_batches",
    "1",
    "--model.init_args.calib_batch_size",
    "64",
    "--model.init_args.eval_images",
    "64",
    "--model.init_args.policies_per_arch",
    "2",
)


def _collect(*args: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli_main(list(args))


# ------------------------------------------------------------------------------- store
def test_store_round_trip_and_done_indices(tmp_path: Path):
    recs = [_record(i, acc=i / 10) for i in range(3)] + [_record(3, kind="mp_random")]
    path = _write(tmp_path / "s.jsonl", recs)
    assert path.read_text().count("\n") == 4
    back = SampleStore(path).records()
    assert back == recs
    assert SampleStore(path).done_indices() == {0, 1, 2, 3}
    assert SampleStore(path).done_indices(kinds=["mp_random"]) == {3}
    assert read_samples(path) == recs and read_samples(tmp_path) == recs  # a file or its directory
    line = json.loads(path.read_text().splitlines()[0])
    assert list(line) == [
        "key",
        "subnet",
        "acc",
        "index",
        "seed",
        "kind",
        "space",
        "supernet_hash",
        "protocol",
        "timing",
    ]
    assert "bits" not in line["subnet"] and "bits" in json.loads(path.read_text().splitlines()[3])["subnet"]
    assert recs[0].to_subnet() == fp_subnet("tiny", 0, 0)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"acc": 1.5}, "acc must be a number in"),
        ({"kind": "int8"}, "kind='int8' is not allowed"),
        ({"index": -1}, "index must be an integer"),
        ({"key": "000000000000"}, "does not match its subnet"),
        ({"space": "apq_cifar"}, "differs from the record's space"),
        ({"timing": {"total_s": "x"}}, "timing"),
    ],
)
def test_record_validation(change: dict, match: str):
    d = _record(0).to_dict() | change
    with pytest.raises(ValueError, match=match):
        SampleRecord.from_dict(d)
    mp = _record(1, kind="mp_random").to_dict()
    with pytest.raises(ValueError, match="kind 'fp' must have a float subnet"):
        SampleRecord.from_dict(mp | {"kind": "fp"})


def test_torn_last_line_is_skipped_then_repaired(tmp_path: Path):
    path = _write(tmp_path / "s.jsonl", [_record(0), _record(1)])
    whole = path.read_bytes()
    torn = _record(2).to_json()[:57]
    path.write_bytes(whole + torn.encode())
    with pytest.warns(TornLineWarning, match="torn last line"):
        assert [r.index for r in read_samples(path)] == [0, 1]
    with pytest.warns(TornLineWarning, match="removed a torn last line"):
        assert SampleStore(path).repair() == len(torn)
    assert path.read_bytes() == whole
    # an append after a kill -9 repairs by itself, and the new record is intact
    path.write_bytes(whole + torn.encode())
    with pytest.warns(TornLineWarning):
        _write(path, [_record(2)])
    assert [r.index for r in read_samples(path)] == [0, 1, 2]
    # a complete record that only lost its newline is kept
    path.write_bytes(whole + _record(5).to_json().encode())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SampleStore(path).repair() == 0
    assert [r.index for r in read_samples(path)] == [0, 1, 5]


def test_malformed_middle_line_names_file_and_line(tmp_path: Path):
    path = _write(tmp_path / "s.jsonl", [_record(0), _record(1), _record(2)])
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:40]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{path.name}:2: malformed sample record"):
        read_samples(path)
    path.write_text("\n".join([lines[0], json.dumps(_record(1).to_dict() | {"acc": 2.0}), lines[2]]) + "\n")
    with pytest.raises(ValueError, match=r":2: malformed sample record: .*acc"):
        read_samples(path)


def test_other_space_or_supernet_is_refused(tmp_path: Path):
    a = _write(tmp_path / "a.jsonl", [_record(0), _record(1)])
    with pytest.raises(ValueError, match=r"a.jsonl:1: record is for space 'tiny'.*'apq_cifar'"):
        read_samples(a, space="apq_cifar")
    with pytest.raises(ValueError, match=r"measured on supernet 'abc123'.*'fff'"):
        read_samples(a, supernet_hash="fff")
    _write(tmp_path / "b.jsonl", [_record(2, h="other")])
    with pytest.raises(ValueError, match=r"b.jsonl:1: .*supernet 'other'.*a.jsonl:1.*'abc123'"):
        read_samples(tmp_path / "*.jsonl")
    c = _write(tmp_path / "c.jsonl", [_record(2, space="apq_cifar")])
    with pytest.raises(ValueError, match=r"c.jsonl:1: record is for space 'apq_cifar'.*'tiny'"):
        read_samples([a, c])
    with pytest.raises(ValueError, match="no sample files match"):
        read_samples(tmp_path / "nothing*.jsonl")


def test_merge_is_deterministic_and_deduplicates(tmp_path: Path):
    r = [_record(i) for i in range(4)] + [_record(i, kind="mp_random") for i in range(2)]
    a = _write(tmp_path / "a.jsonl", [r[3], r[0], r[4], r[1]])
    b = _write(tmp_path / "b.jsonl", [r[5], r[1], r[2], r[0]])  # r[0], r[1] in both
    assert merge_stores([a, b], tmp_path / "ab.jsonl") == 6
    assert merge_stores([b, a], tmp_path / "ba.jsonl") == 6
    assert (tmp_path / "ab.jsonl").read_bytes() == (tmp_path / "ba.jsonl").read_bytes()
    merged = read_samples(tmp_path / "ab.jsonl")
    assert [(m.kind, m.index) for m in merged] == [
        ("fp", 0),
        ("fp", 1),
        ("fp", 2),
        ("fp", 3),
        ("mp_random", 0),
        ("mp_random", 1),
    ]
    # the same measurement stored twice with different timings: one survives, whichever input came first
    c = _write(tmp_path / "c.jsonl", [SampleRecord.from_dict(r[2].to_dict() | {"timing": {"total_s": 9.0}})])
    assert merge_stores([a, b, c], tmp_path / "abc.jsonl") == 6
    assert merge_stores([c, b, a], tmp_path / "cba.jsonl") == 6
    assert (tmp_path / "abc.jsonl").read_bytes() == (tmp_path / "cba.jsonl").read_bytes()


def test_checkpoint_hash(tmp_path: Path):
    p = tmp_path / "x.ckpt"
    p.write_bytes(b"weights")
    h = checkpoint_hash(p)
    assert len(h) == 16 and int(h, 16) >= 0 and h == checkpoint_hash(str(p))
    with pytest.raises(ValueError, match=r"supernet checkpoint '.*nope.ckpt' does not exist"):
        checkpoint_hash(tmp_path / "nope.ckpt")


# ------------------------------------------------------------------------------- sampling
def test_index_to_subnet_is_a_function_of_seed_and_index():
    assert fp_subnet("tiny", 3, 7) == fp_subnet("tiny", 3, 7)
    assert fp_subnet("tiny", 3, 7) != fp_subnet("tiny", 4, 7) and fp_subnet("tiny", 3, 7).bits is None
    s = MPSampling(arch_policies_fraction=0.5, policies_per_arch=4)
    kinds = [mp_kind(i, s) for i in range(400)]
    assert kinds[:8] == ["mp_random"] * 4 + ["mp_arch_policies"] * 4
    assert kinds.count("mp_arch_policies") == 200
    subs = [mp_subnet("tiny", 0, i, s)[1] for i in range(4, 8)]
    assert len({(x.depths, x.kernels, x.widths) for x in subs}) == 1  # one architecture ...
    assert len({x.bits for x in subs}) == 4  # ... under four policies
    randoms = [mp_subnet("tiny", 0, i, s)[1] for i in range(4)]
    assert len({(x.depths, x.kernels, x.widths) for x in randoms}) == 4
    assert all(k == "mp_arch_policies" for k in map(lambda i: mp_kind(i, MPSampling(1.0, 3)), range(9)))
    u = mp_subnet("tiny", 0, 5, MPSampling(0.5, 4, uniform_bits=4))
    assert u[0] == "mp_random" and set(v for f in u[1].bits.to_dict().values() for v in f if v) == {4}
    with pytest.raises(ValueError, match="arch_policies_fraction"):
        MPSampling(arch_policies_fraction=2)


# ------------------------------------------------------------------------------- measurement
def test_fp_measurement_in_the_supernet_equals_the_extracted_copy(tiny_ckpt: Path):
    from apq_lightning.collection import measure_fp
    from apq_lightning.modules import load_supernet

    net = load_supernet(str(tiny_ckpt))
    g = torch.Generator().manual_seed(0)
    bn = [torch.randn(32, 3, 16, 16, generator=g) for _ in range(2)]
    ev = [(torch.randn(40, 3, 16, 16, generator=g), torch.randint(0, 10, (40,), generator=g))]
    for i in range(3):
        sub = fp_subnet("tiny", 0, i)
        a = measure_fp(net, sub, bn, ev, "extract", channels_last=False)
        b = measure_fp(net, sub, bn, ev, "inplace", channels_last=False)
        assert abs(a.acc - b.acc) <= 1 / 40 and a.total_s >= a.bn_s + a.eval_s - 1e-6  # rounding may flip one argmax
    with pytest.raises(ValueError, match="takes a float subnet"):
        measure_fp(net, sub.with_bits(8), bn, ev)


# ------------------------------------------------------------------------------- collection
def test_fp_collection_writes_records_resumes_and_is_deterministic(tiny_ckpt: Path, tmp_path: Path):
    out = tmp_path / "fp"
    _collect(*_cli_args("collect_fp_tiny.yaml", tiny_ckpt, out, 3))
    recs = read_samples(out / "samples.rank0.jsonl")
    assert [r.index for r in recs] == [0, 1, 2]
    for r in recs:
        assert r.kind == "fp" and r.space == "tiny" and r.seed == 0 and 0 <= r.acc <= 1
        assert r.supernet_hash == checkpoint_hash(tiny_ckpt)
        assert r.to_subnet() == fp_subnet("tiny", 0, r.index)
        assert r.protocol["bn_batches"] == 1 and r.protocol["eval_images"] == r.protocol["heldout_images"] > 0
        assert set(r.timing) == {"total_s", "bn_s", "eval_s", "qat_s"}
    assert len({r.acc for r in recs}) > 1
    # rerun: nothing left; more samples: only the new indices
    _collect(*_cli_args("collect_fp_tiny.yaml", tiny_ckpt, out, 3))
    assert len(read_samples(out)) == 3
    _collect(*_cli_args("collect_fp_tiny.yaml", tiny_ckpt, out, 5))
    assert [r.index for r in read_samples(out)] == [0, 1, 2, 3, 4]
    # determinism: index 2 measured first in a fresh process-state gives the same record
    other = tmp_path / "fp2"
    other.mkdir()
    lines = (out / "samples.rank0.jsonl").read_text().splitlines()
    (other / "samples.rank0.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n")
    _collect(*_cli_args("collect_fp_tiny.yaml", tiny_ckpt, other, 3))
    again = {r.index: r for r in read_samples(other)}
    assert again[2].key == recs[2].key and again[2].acc == recs[2].acc
    # another protocol in the same output_dir is refused, not mixed
    with pytest.raises(ValueError, match=r"another protocol.*bn_batches"):
        _collect(*_cli_args("collect_fp_tiny.yaml", tiny_ckpt, out, 6, "--model.init_args.bn_batches", "2"))


def test_mp_collection_writes_both_kinds(tiny_ckpt: Path, tmp_path: Path):
    out = tmp_path / "mp"
    _collect(*_cli_args("collect_mp_tiny.yaml", tiny_ckpt, out, 4, *FAST_MP))
    recs = read_samples(out)
    assert [r.index for r in recs] == [0, 1, 2, 3]
    assert [r.kind for r in recs] == ["mp_random", "mp_random", "mp_arch_policies", "mp_arch_policies"]
    sampling = MPSampling(0.5, 2)
    for r in recs:
        assert r.subnet["bits"] and r.to_subnet() == mp_subnet("tiny", 0, r.index, sampling)[1]
        assert r.protocol["qat_steps"] == 2 and r.protocol["eval_images"] == 64 and r.protocol["fixed_bits"] == 8
        assert set(r.timing) == {"total_s", "bn_s", "calib_s", "qat_s", "eval_s"} and r.timing["qat_s"] > 0
    a, b = recs[2].to_subnet(), recs[3].to_subnet()
    assert (a.depths, a.kernels, a.widths) == (b.depths, b.kernels, b.widths) and a.bits != b.bits


def test_bad_checkpoint_and_missing_root_give_one_line_errors(tmp_path: Path):
    from apq_lightning.modules import FPCollectionModule

    with pytest.raises(ValueError, match=r"supernet checkpoint '.*missing.ckpt' does not exist") as e:
        FPCollectionModule(supernet_ckpt=str(tmp_path / "missing.ckpt"))
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"supernet checkpoint '.*bad.ckpt' is unreadable") as e:
        FPCollectionModule(supernet_ckpt=str(bad))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"data.init_args.root is not set"):
        SampleIndexDataModule(dataset="cifar10")


# ------------------------------------------------------------------------------- processes
def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}


@pytest.mark.slow
def test_kill_9_then_rerun_loses_and_duplicates_nothing(tiny_ckpt: Path, tmp_path: Path):
    out, n = tmp_path / "fp", 10
    cmd = [sys.executable, "-m", "apq_lightning.cli", *_cli_args("collect_fp_tiny.yaml", tiny_ckpt, out, n)]
    store = out / "samples.rank0.jsonl"
    rng = random.Random()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        target = rng.randint(1, 4)  # kill after 1-4 finished samples, at a random moment within the next one
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if store.is_file() and store.read_bytes().count(b"\n") >= target:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = store.read_bytes().count(b"\n") if store.is_file() else 0
    assert 0 < before < n, f"the run was not interrupted mid-way ({before} of {n} samples)"
    with open(store, "ab") as fh:  # what a kill in the middle of a write leaves behind
        fh.write(b'{"key":"0123')
    done = subprocess.run(cmd, cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    recs = read_samples(out)
    indices = [r.index for r in recs]
    assert sorted(indices) == list(range(n)), indices
    assert all(r.to_subnet() == fp_subnet("tiny", 0, r.index) for r in recs)


@pytest.mark.slow
def test_ddp_two_processes_shard_without_overlap(tiny_ckpt: Path, tmp_path: Path):
    out, n = tmp_path / "ddp", 7
    cmd = [
        sys.executable,
        "-m",
        "apq_lightning.cli",
        *_cli_args("collect_fp_tiny.yaml", tiny_ckpt, out, n, "--trainer.strategy", "ddp", "--trainer.devices", "2"),
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    r0 = read_samples(out / "samples.rank0.jsonl")
    r1 = read_samples(out / "samples.rank1.jsonl")
    i0, i1 = {r.index for r in r0}, {r.index for r in r1}
    assert i0 and i1 and not i0 & i1 and i0 | i1 == set(range(n))
    assert len(r0) + len(r1) == n
    assert all(r.to_subnet() == fp_subnet("tiny", 0, r.index) for r in r0 + r1)
