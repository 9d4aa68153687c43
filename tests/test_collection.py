"""Sample store, index -> subnet sampling, FP / MP collection through the CLI, resume, DDP,
one run per output directory, and nothing deleted that is not a torn write."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_inputs import assert_one_line, run_cli

from apq_lightning.cli import main as cli_main
from apq_lightning.collection import (
    MPSampling,
    SampleRecord,
    SampleStore,
    TornLineWarning,
    checkpoint_hash,
    fp_subnet,
    merge_stores,
    mp_kind,
    mp_subnet,
    read_samples,
    store_path,
)
from apq_lightning.data import SampleIndexDataModule
from apq_lightning.locks import RunLock, RunLockedError, run_lock
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


FAST_MP = (  # APQ's protocol (the recipe's default is qfa), short
    "--model.init_args.protocol",
    "short_qat",
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


def test_torn_last_line_is_skipped_then_moved_aside(tmp_path: Path):
    path = _write(tmp_path / "s.jsonl", [_record(0), _record(1)])
    whole = path.read_bytes()
    torn = _record(2).to_json()[:57].encode()
    path.write_bytes(whole + torn)
    with pytest.warns(TornLineWarning, match="torn last line"):
        assert [r.index for r in read_samples(path)] == [0, 1]
    store = SampleStore(path)
    with pytest.warns(TornLineWarning, match=r"moved a torn last line \(57 bytes .* to .*s\.jsonl\.torn"):
        assert store.repair() == len(torn)
    assert path.read_bytes() == whole and store.torn_path.read_bytes() == torn + b"\n"  # kept, not deleted
    # an append after a kill -9 repairs by itself, and the new record is intact
    path.write_bytes(whole + torn)
    with pytest.warns(TornLineWarning):
        _write(path, [_record(2)])
    assert [r.index for r in read_samples(path)] == [0, 1, 2]
    assert store.torn_path.read_bytes() == (torn + b"\n") * 2
    # a complete record that only lost its newline is kept
    path.write_bytes(whole + _record(5).to_json().encode())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SampleStore(path).repair() == 0
    assert [r.index for r in read_samples(path)] == [0, 1, 5]
    # killed during the very first append: the torn start of a record is all there is
    path.write_bytes(torn)
    with pytest.warns(TornLineWarning):
        assert SampleStore(path).repair() == len(torn)
    assert path.read_bytes() == b""


BINARY = bytes(range(256)) * 16  # 4 KiB, newlines included


@pytest.mark.parametrize(
    "content, fragment",
    [
        pytest.param(BINARY, "line 1 is not a sample record", id="binary"),
        pytest.param(bytes(range(11, 256)) * 17, "the last line (no line break) is not a sample record",
                     id="binary-no-newline"),
        pytest.param("WHOLE+INVALID", "the last line (no line break) is not a sample record (sample record: acc",
                     id="complete-invalid-last-record"),
        pytest.param("WHOLE+BAD+TORN", "the line before a torn last line is not a sample record",
                     id="torn-after-damage"),
        pytest.param("TEXT+WHOLE", "line 1 is not a sample record", id="other-text-first"),
        pytest.param("WHOLE+EMPTY", "the last line is not a sample record (an empty line)", id="empty-last-line"),
    ],
)
def test_never_deletes_what_it_cannot_read(tmp_path: Path, content: bytes | str, fragment: str):
    """Issue 18, item 2: repair cut a 4 KiB binary file to 0 bytes and deleted a complete but
    invalid last record; now only a torn record after whole ones is moved aside."""
    whole = _write(tmp_path / "w.jsonl", [_record(0), _record(1)]).read_bytes()
    invalid = json.dumps(_record(2).to_dict() | {"acc": 2.0}).encode()
    parts = {"WHOLE": whole, "INVALID": invalid, "BAD": invalid + b"\n", "TORN": _record(3).to_json()[:50].encode(),
             "TEXT": b"index,acc\n", "EMPTY": b"\n"}
    data = content if isinstance(content, bytes) else b"".join(parts[k] for k in content.split("+"))
    path = tmp_path / "samples.rank0.jsonl"
    path.write_bytes(data)
    store = SampleStore(path)
    for attempt in (store.check, store.repair, lambda: store.append(_record(9))):
        with pytest.raises(ValueError, match=re.escape(fragment)) as e:
            attempt()
        assert str(e.value).startswith(f"{path} is not a sample store: ") and "\n" not in str(e.value)
    store.close()
    assert path.read_bytes() == data and not store.torn_path.exists()
    with pytest.raises(ValueError, match=rf"{path.name}:\d+: (malformed sample record|empty line)"):
        read_samples(path)  # readers refuse it too, instead of skipping it as a torn line


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


# ------------------------------------------------------------------------------- one run per directory
def test_run_lock_names_its_holder_and_dies_with_it(tmp_path: Path):
    holder = rf"{re.escape(str(tmp_path))} is in use: collection by pid {os.getpid()} on host {socket.gethostname()}"
    with run_lock(tmp_path, "collection") as lock:
        assert lock.held and json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=holder) as e:
            RunLock(tmp_path, "collection").acquire()
        assert "\n" not in str(e.value)
        with RunLock(tmp_path, "pipeline"):  # another job's lock on the same directory is independent
            pass
    assert not lock.held and lock.path.read_text() == ""  # released, and names nobody
    with pytest.raises(ValueError, match="lock name 'Two words'"):
        RunLock(tmp_path, "Two words")
    # a holder killed with -9 leaves its file behind, never its lock
    code = "import sys, time; from apq_lightning.locks import RunLock; lock = RunLock(sys.argv[1], 'collection')"
    code += ".acquire(); print('held', flush=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
        with pytest.raises(RunLockedError, match=f"by pid {proc.pid} on host"):
            RunLock(tmp_path, "collection").acquire()
    finally:
        proc.kill()
        proc.wait()
    with run_lock(tmp_path, "collection"):
        pass


def test_index_datamodule_holds_its_output_dir_until_predicting_ends(tmp_path: Path):
    out = tmp_path / "fp"
    dm = SampleIndexDataModule(num_samples=2, output_dir=str(out))
    with pytest.raises(RunLockedError, match=rf"fp is in use: collection by pid {os.getpid()}"):
        SampleIndexDataModule(num_samples=2, output_dir=str(out))
    dm.teardown("predict")
    again = SampleIndexDataModule(num_samples=2, output_dir=str(out))
    again.on_exception(RuntimeError("a failed predict releases it too"))
    SampleIndexDataModule(num_samples=2, output_dir=str(out)).release()
    assert dm.store_path(1) == store_path(out, 1) == out / "samples.rank1.jsonl"


def test_index_datamodule_collects_exactly_the_given_indices(tmp_path: Path):
    dm = SampleIndexDataModule(num_samples=2, output_dir=str(tmp_path / "some"), indices=[9, 3, 3, 40])
    try:
        assert dm.plan(None) == [3, 9, 40]  # sorted, once each, num_samples ignored
    finally:
        dm.release()
    for bad in ([], [-1], [1.5], [True]):
        with pytest.raises(ValueError, match="indices must be a non-empty list of integers >= 0"):
            SampleIndexDataModule(output_dir=str(tmp_path / "bad"), indices=bad)


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


def test_top1_counts_argmax_hits_restores_the_mode_and_refuses_no_images():
    from apq_lightning.metrics import top1

    model = torch.nn.Flatten()  # logits = the three channels of a 1x1 image
    x = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 1, 5], [4, 0, 0]]).reshape(4, 3, 1, 1)
    y = torch.tensor([0, 1, 1, 0])  # the third is wrong
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    model.train()
    assert top1(model, batches) == 0.75 and model.training
    assert top1(model, batches, max_batches=1) == 1.0
    assert top1(model, iter(batches), device="cpu", channels_last=True) == 0.75
    with pytest.raises(ValueError, match="no evaluation images"):
        top1(model, [])


def test_short_qat_trains_runs_its_steps_and_asks_the_teacher_only_for_kd():
    from apq_lightning.modules.collection import ShortQAT, short_qat
    from apq_lightning.quant import quantize_subnet
    from apq_lightning.supernet import recalibrate_bn

    class Refuse(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("the teacher ran with kd_ratio = 0")

    torch.manual_seed(0)
    sub = mp_subnet("tiny", 0, 0, MPSampling())[1]
    model = Supernet("tiny", 10).extract(sub)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    recalibrate_bn(model, [x])
    quantize_subnet(model, sub, [x])
    with torch.no_grad():
        before = float(torch.nn.functional.cross_entropy(model.eval()(x), y))
    assert short_qat(model, Refuse(), [(x, y)] * 30, ShortQAT(steps=20, lr=0.05, kd_ratio=0.0), False) == 20
    assert not model.training
    with torch.no_grad():
        assert float(torch.nn.functional.cross_entropy(model(x), y)) < 0.8 * before
    assert short_qat(model, None, [(x, y)] * 3, ShortQAT(steps=20), channels_last=False) == 3  # data ran out
    with pytest.raises(ValueError, match="kd_temperature must be a number in \\(0, inf\\), got 0"):
        ShortQAT(kd_temperature=0)


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
        assert set(r.timing) == {"total_s", "bn_s", "eval_s", "qat_s", "threads"}
        assert r.timing["threads"] == torch.get_num_threads()  # collected in this process
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
        assert set(r.timing) == {"total_s", "bn_s", "calib_s", "qat_s", "eval_s", "threads"} and r.timing["qat_s"] > 0
    a, b = recs[2].to_subnet(), recs[3].to_subnet()
    assert (a.depths, a.kernels, a.widths) == (b.depths, b.kernels, b.widths) and a.bits != b.bits


def test_bad_checkpoint_and_missing_root_give_one_line_errors(tiny_ckpt: Path, tmp_path: Path):
    """The collection loads its supernet through the checked loader every module uses: errors
    start with the argument's name, which the CLI turns into the recipe key."""
    from apq_lightning.modules import FPCollectionModule, MPCollectionModule

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    for kwargs, wanted in [
        ({"supernet_ckpt": str(tmp_path / "missing.ckpt")}, r"supernet_ckpt: checkpoint .*missing.ckpt not found"),
        ({"supernet_ckpt": str(bad)}, r"supernet_ckpt: checkpoint .*bad.ckpt cannot be read"),
        ({"supernet_ckpt": str(tiny_ckpt), "num_classes": 5}, r"supernet_ckpt .*tiny.ckpt has 10 classes, but"),
        ({"supernet_ckpt": str(tiny_ckpt), "space": "apq_cifar"}, r"is for space 'tiny', but space='apq_cifar'"),
    ]:
        with pytest.raises(ValueError, match=wanted) as e:
            FPCollectionModule(**kwargs)
        assert "\n" not in str(e.value)
    for kwargs, wanted in [
        ({"momentum": 1.5}, r"momentum must be a number in \[0, 1\], got 1.5"),
        ({"lr": 0}, r"lr must be a number in \(0, inf\), got 0"),
        ({"label_smoothing": -0.1}, r"label_smoothing must be a number in \[0, 1\)"),
        ({"qat_steps": -1}, r"qat_steps must be an integer >= 0, got -1"),
        ({"calib_batch_size": 0}, r"calib_batch_size must be an integer >= 1, got 0"),
    ]:
        with pytest.raises(ValueError, match=wanted):
            MPCollectionModule(supernet_ckpt=str(tiny_ckpt), **kwargs)
    with pytest.raises(ValueError, match=r"data.init_args.root is not set"):
        SampleIndexDataModule(dataset="cifar10")


def test_a_second_collection_on_a_directory_is_refused_by_name(tiny_ckpt: Path, tmp_path: Path, capsys):
    """Issue 18, item 3: two ``apq predict`` on one output_dir both measured every index."""
    out = tmp_path / "fp"
    with run_lock(out, "collection"):  # what a running collection holds
        code, err = run_cli(_cli_args("collect_fp_tiny.yaml", tiny_ckpt, out, 2), capsys)
    assert_one_line(code, err, f"{out} is in use: collection by pid {os.getpid()} on host {socket.gethostname()}")
    assert err.splitlines()[-1].startswith("predict: ") and not list(out.glob("samples*"))


def test_collection_refuses_a_rank_file_that_is_not_a_store(tiny_ckpt: Path, tmp_path: Path, capsys):
    out = tmp_path / "fp"
    out.mkdir()
    bad = out / "samples.rank1.jsonl"
    bad.write_bytes(BINARY)
    code, err = run_cli(_cli_args("collect_fp_tiny.yaml", tiny_ckpt, out, 2), capsys)
    assert_one_line(code, err, f"{bad} is not a sample store: line 1 is not a sample record")
    assert bad.read_bytes() == BINARY and not (out / "samples.rank0.jsonl").exists()


# ------------------------------------------------------------------------------- processes
def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def tiny_qfa_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_ckpt`` as a quantized-for-all supernet file (batch-range quantizers, running ranges
    from a few training-mode batches): what a supernet with a quant phase exports."""
    from apq_lightning.quant.supernet import quantize_supernet
    from apq_lightning.supernet_io import load_supernet, save_supernet_weights

    net = quantize_supernet(load_supernet(str(tiny_ckpt)), ranges="batch").train()
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            net.set_active(get_space("tiny").sample(0, quantized=True))
            net(torch.randn(16, 3, 16, 16))
    return save_supernet_weights(net, tmp_path_factory.mktemp("qfa") / "tiny_qfa.pt", torch.float32)


def test_qfa_protocol_scores_inside_the_supernet_and_needs_a_quant_phase(tiny_ckpt, tiny_qfa_ckpt, tmp_path, capsys):
    out = tmp_path / "mp"
    _collect(*_cli_args("collect_mp_tiny.yaml", tiny_qfa_ckpt, out, 4, "--model.init_args.protocol", "qfa"))
    recs = read_samples(out)
    assert [r.index for r in recs] == [0, 1, 2, 3] and all(r.protocol["protocol"] == "qfa" for r in recs)
    sampling = MPSampling(**recs[0].protocol["sampling"])
    assert sampling.policy_sampler == "spread"
    assert all(r.timing["qat_s"] == 0 and r.to_subnet() == mp_subnet("tiny", 0, r.index, sampling)[1] for r in recs)
    code, err = run_cli(_cli_args("collect_mp_tiny.yaml", tiny_ckpt, tmp_path / "x", 2, "--model.init_args.protocol",
                                  "qfa"), capsys)
    assert_one_line(code, err, "protocol qfa needs a quantized-for-all supernet")


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "sig"), [("fp", signal.SIGKILL), ("mp_qfa", signal.SIGKILL), ("fp", signal.SIGTERM)])
def test_kill_9_then_rerun_loses_and_duplicates_nothing(tiny_ckpt: Path, tiny_qfa_ckpt: Path, tmp_path: Path,
                                                        kind: str, sig: int):
    """kill -9 at a random moment; and a plain ``kill`` (SIGTERM), which must stop the collection
    after the sample in progress (Lightning's predict loop alone would run on)."""
    out, n = tmp_path / kind, 40 if kind == "fp" else 10  # a tiny FP sample takes tens of ms: more of them
    args = (_cli_args("collect_fp_tiny.yaml", tiny_ckpt, out, n) if kind == "fp" else
            _cli_args("collect_mp_tiny.yaml", tiny_qfa_ckpt, out, n, "--model.init_args.protocol", "qfa"))
    cmd = [sys.executable, "-m", "apq_lightning.cli", *args]
    store = out / "samples.rank0.jsonl"
    rng = random.Random()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        target = rng.randint(2, 4)  # kill after 2-4 finished samples, at a random moment within the next one
        deadline, first, done = time.time() + 300, None, 0
        while time.time() < deadline and proc.poll() is None:
            done = store.read_bytes().count(b"\n") if store.is_file() else 0
            if done and first is None:
                first = (time.time(), done)
            if done >= target:
                break
            time.sleep(0.005)
        # within one sample's time, as measured on this machine (a fixed sleep outlasts the whole run on a fast one)
        per_sample = (time.time() - first[0]) / max(done - first[1], 1) if first else 0.1
        time.sleep(rng.uniform(0.0, min(per_sample, 0.5)))
        proc.send_signal(sig)
        if sig == signal.SIGTERM:
            proc.wait(timeout=60)  # stops by itself
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    before = store.read_bytes().count(b"\n") if store.is_file() else 0
    assert 0 < before < n, f"the run was not interrupted mid-way ({before} of {n} samples)"
    if sig == signal.SIGKILL:
        with open(store, "ab") as fh:  # what a kill in the middle of a write leaves behind
            fh.write(b'{"key":"0123')
    else:
        assert store.read_bytes().endswith(b"\n")  # stopped between records
    done = subprocess.run(cmd, cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    recs = read_samples(out)
    indices = [r.index for r in recs]
    assert sorted(indices) == list(range(n)), indices
    if kind == "fp":
        assert all(r.to_subnet() == fp_subnet("tiny", 0, r.index) for r in recs)
    else:
        sampling = MPSampling(**recs[0].protocol["sampling"])
        assert all(r.to_subnet() == mp_subnet("tiny", 0, r.index, sampling)[1] for r in recs)


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


@pytest.mark.slow
def test_two_launches_on_one_directory_measure_every_index_once(tiny_ckpt: Path, tmp_path: Path):
    out, n = tmp_path / "fp", 150  # long enough (~0.1 s a sample) to still run when the second one starts
    cmd = [sys.executable, "-m", "apq_lightning.cli", *_cli_args("collect_fp_tiny.yaml", tiny_ckpt, out, n)]
    first = subprocess.Popen(cmd, cwd=ROOT, env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        lock = out / ".collection.lock"
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and not (lock.is_file() and lock.read_text()):
            time.sleep(0.05)
        second = subprocess.run(cmd, cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=600)
        assert first.poll() is None, "the first collection ended before the second started: nothing was tested"
    finally:
        _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is in use: collection by pid {first.pid}" in second.stderr.splitlines()[-1]
    assert sorted(r.index for r in read_samples(out)) == list(range(n))  # each index once
