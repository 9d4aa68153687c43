"""Every user-facing failure is one named line (issue 11, items 3-5).

One table per entry point: input -> exit code (or exception) and a fragment of the message.
The commands are run in-process through ``apq_lightning.cli.main``; a failure must print
exactly one line to stderr, never a traceback, and exit with code 2.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from apq_lightning.cli import main as cli_main
from apq_lightning.hardware import load_table
from apq_lightning.modules import SupernetModule, load_supernet
from apq_lightning.quant.export import load_quantized
from apq_lightning.space import Subnet, get_space, make_divisible

ROOT = Path(__file__).resolve().parents[1]
TINY = get_space("tiny")
GOOD = TINY.largest(8).to_dict()
GOOD_APQ = {**TINY.largest(8).to_apq(), "space": "tiny"}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``apq <argv>``, whether it returns a code or raises SystemExit."""
    try:
        code = cli_main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert fragment in lines[-1], lines[-1]
    # what precedes the error (if anything) is Lightning's info chatter, never more of the error
    assert all(fragment not in line for line in lines[:-1])


def changed(base: dict, **kv) -> dict:
    """``base`` with keys replaced; ``bits_X=`` replaces one bit list of the project format."""
    d = copy.deepcopy(base)
    for k, v in kv.items():
        if k.startswith("bits_"):
            d["bits"][k[5:]] = v
        elif v is DELETE:
            del d[k]
        else:
            d[k] = v
    return d


DELETE = object()
N = TINY.num_blocks

# --------------------------------------------------------------------------------------
# Subnet.from_dict (and so every command that reads a subnet)
# --------------------------------------------------------------------------------------
SUBNET_CASES = [
    pytest.param(changed(GOOD, bits_pw_w=[4.7] * N), "bits.pw_w[0] must be an integer, got float 4.7", id="bits-4.7"),
    pytest.param(changed(GOOD, bits_dw_a=[8.9] * N), "bits.dw_a[0] must be an integer, got float 8.9", id="bits-8.9"),
    pytest.param(changed(GOOD, bits_pw_a=["4"] * N), "bits.pw_a[0] must be an integer, got str '4'", id="bits-str"),
    pytest.param(changed(GOOD, bits_pw_w="8" * N), "bits.pw_w must be a list of integers, got str", id="bits-21-chars"),
    pytest.param(changed(GOOD, bits_pw_w=None), "bits.pw_w must be a list of integers, got NoneType",
                 id="bits-field-null"),
    pytest.param(changed(GOOD, bits_pw_w=[[4]] * N), "bits.pw_w[0] must be an integer, got list", id="bits-nested"),
    pytest.param(changed(GOOD, bits_pw_w=[True] * N), "bits.pw_w[0] must be an integer, got bool", id="bits-bool"),
    pytest.param(changed(GOOD, bits=None), "bits is null; omit 'bits' for a full-precision subnet", id="bits-null"),
    pytest.param(changed(GOOD, bits=[[4]]), "bits must be a mapping", id="bits-list"),
    pytest.param(changed(GOOD, bits={"pw_w": [8] * N}), "missing keys", id="bits-missing-keys"),
    pytest.param(changed(GOOD, depths=[3.5] * 6), "depths[0] must be an integer, got float 3.5", id="depth-3.5"),
    pytest.param(changed(GOOD, depths="444441"), "depths must be a list of integers, got str", id="depth-str"),
    pytest.param(changed(GOOD, kernels=["3"] * N), "kernels[0] must be an integer, got str '3'", id="kernel-str"),
    pytest.param(changed(GOOD, widths=None), "widths must be a list of integers, got NoneType", id="widths-null"),
    pytest.param(changed(GOOD, widths=[float("nan")] * N), "widths[0] must be an integer, got float nan",
                 id="widths-nan"),
    pytest.param(changed(GOOD, space=["tiny"]), "space must be the name of a search space", id="space-list"),
    pytest.param(changed(GOOD, space={}), "space must be the name of a search space", id="space-dict"),
    pytest.param(changed(GOOD, space="nope"), "unknown search space 'nope'", id="space-unknown"),
    pytest.param(changed(GOOD, colour=1), "unknown keys ['colour']", id="unknown-key"),
    pytest.param([GOOD], "a subnet must be a JSON object, got list", id="not-an-object"),
    # the APQ reference format
    pytest.param(changed(GOOD_APQ, e=[None] * N), "APQ spec: e[0] must be a finite number > 0, got NoneType",
                 id="apq-e-null"),
    pytest.param(changed(GOOD_APQ, e=[math.inf] * N), "APQ spec: e[0] must be a finite number > 0, got float inf",
                 id="apq-e-inf"),
    pytest.param(changed(GOOD_APQ, e=[math.nan] * N), "APQ spec: e[0] must be a finite number > 0, got float nan",
                 id="apq-e-nan"),
    pytest.param(changed(GOOD_APQ, e=["abc"] * N), "APQ spec: e[0] must be a finite number > 0, got str 'abc'",
                 id="apq-e-abc"),
    pytest.param(changed(GOOD_APQ, e=["6"] * N), "APQ spec: e[0] must be a finite number > 0, got str '6'",
                 id="apq-e-str"),
    pytest.param(changed(GOOD_APQ, e=[-4.0] * N), "APQ spec: e[0] must be a finite number > 0, got float -4.0",
                 id="apq-e-neg"),
    pytest.param(changed(GOOD_APQ, e=None), "APQ spec: e must be a list of numbers, got NoneType",
                 id="apq-e-list-null"),
    pytest.param(changed(GOOD_APQ, d=None), "APQ spec: d must be a list of integers, got NoneType", id="apq-d-null"),
    pytest.param(changed(GOOD_APQ, d=[3.9] * 6), "APQ spec: d[0] must be an integer, got float 3.9", id="apq-d-3.9"),
    pytest.param(changed(GOOD_APQ, ks=[5.5] * N), "APQ spec: ks[0] must be an integer, got float 5.5", id="apq-ks-5.5"),
    pytest.param(changed(GOOD_APQ, pw_w_bits_setting=[4.7] * N), "APQ spec: pw_w_bits_setting[0] must be an integer",
                 id="apq-bits-4.7"),
    pytest.param(changed(GOOD_APQ, dw_a_bits_setting=DELETE), "has ['pw_w_bits_setting', 'pw_a_bits_setting', "
                 "'dw_w_bits_setting'] but not ['dw_a_bits_setting']; give all four", id="apq-three-bit-keys"),
    pytest.param(changed(GOOD_APQ, d=DELETE), "APQ spec: missing key 'd'", id="apq-missing-d"),
]


@pytest.mark.parametrize("data, fragment", SUBNET_CASES)
def test_subnet_from_dict_refuses(data, fragment):
    with pytest.raises(ValueError) as err:
        Subnet.from_dict(data)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_integer_valued_floats_are_integers():
    """The integer rule refuses 4.7 and "4" but keeps JSON's 4.0 (the same number)."""
    d = changed(GOOD, bits_pw_w=[4.0] * N, depths=[float(x) for x in GOOD["depths"]])
    assert Subnet.from_dict(d) == Subnet.from_dict(changed(GOOD, bits_pw_w=[4] * N))
    apq = changed(GOOD_APQ, d=[float(x) for x in GOOD_APQ["d"]], e=[6] * N)
    assert Subnet.from_dict(apq) == Subnet.from_dict(GOOD_APQ)


def test_make_divisible_equals_timms():
    """The local rule (kept torch-free) is timm's ``make_divisible`` on many values."""
    from timm.layers import make_divisible as timm_make_divisible

    values = np.concatenate([np.linspace(0.01, 3000, 40_001), np.arange(0, 2000) + 0.5, np.arange(1, 2000)])
    for divisor in (8, 4, 16):
        assert [make_divisible(float(v), divisor) for v in values] == [
            timm_make_divisible(float(v), divisor) for v in values
        ]
    for blk in get_space("apq_imagenet").blocks:  # every APQ ratio on every block
        for e in np.arange(2.0, 7.01, 0.05):
            assert make_divisible(e * blk.in_channels, 8) == timm_make_divisible(e * blk.in_channels, 8)


def test_cost_on_apq_spec_stays_torch_free(tmp_path):
    """Parsing an APQ spec must not import torch (it did, through timm: 5.6 s and 1 GB)."""
    import subprocess
    import sys

    spec = tmp_path / "apq.json"
    spec.write_text(json.dumps(get_space("apq_imagenet").largest(8).to_apq()))
    code = ("import sys; from apq_lightning.space import load_subnets; "
            f"load_subnets({str(spec)!r}); print('torch' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False False", out.stderr


# --------------------------------------------------------------------------------------
# `cost`
# --------------------------------------------------------------------------------------
def _write(path: Path, content: str | bytes) -> Path:
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def _table(tmp: Path, name: str = "t.json", **meta_and_fixed) -> Path:
    """A small valid measured table for ``tiny``, with ``__meta__`` / head / tail changed."""
    from apq_lightning.hardware.geometry import distinct_block_convs
    from apq_lightning.hardware.table import format_key

    data: dict = {"__meta__": {"space": "tiny", "batch": 1, "num_classes": 10}, "head": {"latency": 0.1},
                  "tail": {"latency": 0.1}}
    data.update({format_key(s, 32, 32): {"latency": 0.01} for s, _ in distinct_block_convs(TINY)})
    for k, v in meta_and_fixed.items():
        if k in ("head", "tail"):
            data[k] = v
        else:
            data["__meta__"][k] = v
    return _write(tmp / name, json.dumps(data))


COST_FILE_CASES = [
    pytest.param("dir", "is a directory; expected a subnet file", id="subnet-is-a-directory"),
    pytest.param(b"\x80\x81\x00\xff" * 100, "not a text (UTF-8 JSON) subnet file", id="binary"),
    pytest.param("[" * 100_000 + "]" * 100_000, "JSON nested too deeply", id="deep-nesting"),
    pytest.param("", "not valid JSON", id="empty"),
    pytest.param("missing", "subnet file not found", id="missing"),
    pytest.param(json.dumps(changed(GOOD, bits_pw_w=[4.7] * N)), "bits.pw_w[0] must be an integer", id="bits-4.7"),
    pytest.param(json.dumps(changed(GOOD_APQ, e=["abc"] * N)), "APQ spec: e[0] must be a finite number",
                 id="apq-e-abc"),
    pytest.param(json.dumps(changed(GOOD, space=["tiny"])), "space must be the name", id="space-list"),
]


@pytest.mark.parametrize("content, fragment", COST_FILE_CASES)
def test_cost_refuses_subnet_file(tmp_path, capsys, content, fragment):
    path = tmp_path / "s.json"
    if content == "dir":
        path.mkdir()
    elif content != "missing":
        _write(path, content)
    code, err = run_cli(["cost", "--hardware", "bitops", "--subnet", str(path)], capsys)
    assert_one_line(code, err, fragment)
    assert str(path) in err


def test_cost_jsonl_names_the_line(tmp_path, capsys):
    path = _write(tmp_path / "s.jsonl", json.dumps(GOOD) + "\n" + json.dumps(changed(GOOD, depths=[3.5] * 6)) + "\n")
    code, err = run_cli(["cost", "--hardware", "bitops", "--subnet", str(path)], capsys)
    assert_one_line(code, err, f"{path}:2: depths[0] must be an integer")


@pytest.mark.parametrize("args, fragment", [
    pytest.param(["--num-classes", "-5"], "argument --num-classes: must be an integer >= 1, got -5", id="classes--5"),
    pytest.param(["--num-classes", "0"], "argument --num-classes: must be an integer >= 1, got 0", id="classes-0"),
    pytest.param(["--num-classes", "ten"], "argument --num-classes: must be an integer >= 1, got 'ten'",
                 id="classes-str"),
    pytest.param(["--hardware", "tpu"], "unknown hardware 'tpu'", id="hardware-unknown"),
    pytest.param(["--space", "nope"], "unknown search space 'nope'", id="space-unknown"),
])
def test_cost_refuses_options(tmp_path, capsys, args, fragment):
    path = _write(tmp_path / "s.json", json.dumps(GOOD))
    code, err = run_cli(["cost", "--hardware", "bitops", "--subnet", str(path), *args], capsys)
    assert_one_line(code, err, fragment)


@pytest.mark.parametrize("table, fragment", [
    pytest.param("dir", "is a directory, not a cost table file", id="table-is-a-directory"),
    pytest.param("missing", "cost table file not found", id="table-missing"),
    pytest.param({"num_classes": -5}, "__meta__.num_classes must be an integer >= 1, got -5", id="num-classes--5"),
    pytest.param({"num_classes": 2.5}, "__meta__.num_classes must be an integer >= 1, got 2.5", id="num-classes-2.5"),
    pytest.param({"batch": 0}, "__meta__.batch must be an integer >= 1, got 0", id="batch-0"),
    pytest.param({"head": {"latency": 1e308}}, "entry 'head' has latency 1e+308; allowed: 0 to 1e+06", id="head-1e308"),
    pytest.param({"tail": {"latency": 0.1, "energy": 1e300}}, "entry 'tail' has energy 1e+300", id="tail-energy-1e300"),
    pytest.param({"head": {"latency": -1}}, "entry 'head' has latency -1", id="head-negative"),
    pytest.param({"head": {"latency": 10**400}}, "entry 'head' has latency", id="head-huge-int"),
    pytest.param(b"PK\x03\x04 a zip, or a torch file", "not a JSON cost table", id="binary"),
    pytest.param("[" * 100_000 + "]" * 100_000, "nested too deeply", id="deep-nesting"),
])
def test_cost_refuses_table(tmp_path, capsys, table, fragment):
    path = tmp_path / "t.json"
    if table == "dir":
        path.mkdir()
    elif isinstance(table, dict):
        path = _table(tmp_path, **table)
    elif table != "missing":
        _write(path, table)
    sub = _write(tmp_path / "s.json", json.dumps(GOOD))
    code, err = run_cli(["cost", "--hardware", f"lut:{path}", "--subnet", str(sub)], capsys)
    assert_one_line(code, err, fragment)


def test_valid_table_costs_and_stays_finite(tmp_path, capsys):
    sub = _write(tmp_path / "s.json", json.dumps(GOOD))
    code = cli_main(["cost", "--hardware", f"lut:{_table(tmp_path, head={'latency': 9e5})}", "--subnet", str(sub)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["feasible"] is True and out["latency_ms"] > 9e5


def test_table_is_validated_when_written(tmp_path):
    table = load_table(_table(tmp_path))
    table.meta["num_classes"] = -5
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        table.save(tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()
    with pytest.raises(ValueError, match="is a directory"):
        load_table(_table(tmp_path)).save(tmp_path)


# --------------------------------------------------------------------------------------
# `lut build`
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    pytest.param(["--batch", "0"], "argument --batch: must be an integer >= 1, got 0", id="batch-0"),
    pytest.param(["--batch", "-1"], "argument --batch: must be an integer >= 1, got -1", id="batch--1"),
    pytest.param(["--batch", "2.5"], "argument --batch: must be an integer >= 1, got '2.5'", id="batch-2.5"),
    pytest.param(["--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0", id="repeats-0"),
    pytest.param(["--warmup", "-1"], "argument --warmup: must be an integer >= 0, got -1", id="warmup--1"),
    pytest.param(["--threads", "0"], "argument --threads: must be an integer >= 1, got 0", id="threads-0"),
    pytest.param(["--num-classes", "-5"], "argument --num-classes: must be an integer >= 1", id="classes--5"),
    pytest.param(["--stat", "mean"], "argument --stat: invalid choice", id="stat"),
    pytest.param(["--out", "DIR"], "is a directory; give a table file path such as", id="out-is-a-directory"),
    pytest.param(["--space", "nope"], "unknown search space 'nope'", id="space-unknown"),
    pytest.param(["--device", "foo"], "device 'foo' is not a torch device", id="device-unknown"),
    pytest.param(["--out", "GARBAGE"], "not a JSON cost table", id="out-is-not-a-table"),
])
def test_lut_build_refuses(tmp_path, capsys, args, fragment):
    args = [str(tmp_path) if a == "DIR" else str(_write(tmp_path / "g.json", "garbage")) if a == "GARBAGE" else a
            for a in args]
    base = {"--space": "tiny", "--out": str(tmp_path / "lut.json")}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["lut", "build", "--no-progress", "--repeats", "1", *[x for kv in base.items() for x in kv]]
    code, err = run_cli(argv, capsys)
    assert_one_line(code, err, fragment)
    assert not (tmp_path / "lut.json").exists()


def test_build_table_refuses_meaningless_settings(tmp_path):
    from apq_lightning.hardware.measure import build_table

    for kw, match in (({"batch": 0}, "batch must be an integer >= 1, got 0"),
                      ({"batch": -1}, "batch must be an integer >= 1, got -1"),
                      ({"num_classes": 0}, "num_classes must be an integer >= 1, got 0"),
                      ({"repeats": 2.5}, "repeats must be an integer >= 1, got 2.5")):
        with pytest.raises(ValueError, match=match):
            build_table("tiny", tmp_path / "lut.json", progress=False, **kw)
    with pytest.raises(ValueError, match="is a directory"):
        build_table("tiny", tmp_path, progress=False)


# --------------------------------------------------------------------------------------
# torch files: load_supernet, load_quantized, and `fit --ckpt_path`
# --------------------------------------------------------------------------------------
class Exploit:
    """Unpickling this creates a file: proof that a loader executed pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_torch_file(tmp: Path, kind: str) -> Path:
    """A file of the given kind, named ``<kind>.ckpt``."""
    path = tmp / f"{kind}.ckpt"
    if kind == "text":
        path.write_text("this is a text file\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "tensor":
        torch.save(torch.ones(3), path)
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.randn(64, 64)}, "epoch": 1}, path)
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "pickled-code":
        torch.save({"state_dict": {}, "epoch": 0, "x": Exploit(tmp / "EXPLOITED")}, path)
    elif kind == "plain-pickle":
        import pickle

        path.write_bytes(pickle.dumps({"x": Exploit(tmp / "EXPLOITED")}))
    elif kind == "directory":
        path.mkdir()
    elif kind == "other-dict":
        torch.save({"hello": 1}, path)
    return path


TORCH_FILE_CASES = [
    pytest.param("text", "not a torch.save archive", id="text"),
    pytest.param("empty", "empty file", id="empty"),
    pytest.param("tensor", "it holds a Tensor, not a dict", id="bare-tensor"),
    pytest.param("truncated", "truncated", id="truncated"),
    pytest.param("pickled-code", "refused: it holds code", id="pickled-code"),
    pytest.param("plain-pickle", "refused: it holds code", id="plain-pickle"),
    pytest.param("directory", "is a directory", id="directory"),
]


@pytest.mark.parametrize("kind, fragment", TORCH_FILE_CASES + [
    pytest.param("other-dict", "not a SupernetModule checkpoint", id="other-dict"),
])
def test_load_supernet_refuses(tmp_path, kind, fragment):
    path = _bad_torch_file(tmp_path, kind)
    with pytest.raises(ValueError) as err:
        load_supernet(str(path))
    assert fragment in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "EXPLOITED").exists()


@pytest.mark.parametrize("kind, fragment", TORCH_FILE_CASES + [
    pytest.param("other-dict", "not a quantized subnet file", id="other-dict"),
])
def test_load_quantized_refuses(tmp_path, kind, fragment):
    path = _bad_torch_file(tmp_path, kind)
    with pytest.raises(ValueError) as err:
        load_quantized(path)
    assert fragment in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "EXPLOITED").exists()


def test_loaders_name_missing_files(tmp_path):
    for load in (load_supernet, load_quantized):
        with pytest.raises(FileNotFoundError, match="nope.ckpt not found"):
            load(str(tmp_path / "nope.ckpt"))


def test_damaged_supernet_checkpoint_is_named(tmp_path):
    net_ckpt = {"state_dict": {"supernet.nope": torch.ones(1)},
                "hyper_parameters": {"space": "tiny", "num_classes": 10}}
    torch.save(net_ckpt, tmp_path / "d.ckpt")
    with pytest.raises(ValueError, match=r"d.ckpt: damaged SupernetModule checkpoint \(Error\(s\) in loading"):
        load_supernet(str(tmp_path / "d.ckpt"))
    torch.save({**net_ckpt, "hyper_parameters": {"space": "nope", "num_classes": 10}}, tmp_path / "s.ckpt")
    with pytest.raises(ValueError, match="s.ckpt: damaged SupernetModule checkpoint.*unknown search space 'nope'"):
        load_supernet(str(tmp_path / "s.ckpt"))


@pytest.mark.parametrize("kind", ["pickled-code", "plain-pickle"])
def test_table_loader_never_unpickles(tmp_path, kind):
    path = _bad_torch_file(tmp_path, kind)
    with pytest.raises(ValueError, match="not a JSON cost table"):
        load_table(path)
    assert not (tmp_path / "EXPLOITED").exists()


# --------------------------------------------------------------------------------------
# `fit` (LightningCLI): recipe values, the command line, checkpoints
# --------------------------------------------------------------------------------------
TINY_RECIPE = ROOT / "recipes" / "supernet_tiny.yaml"


def _recipe_with(tmp: Path, old: str, new: str) -> Path:
    text = TINY_RECIPE.read_text()
    assert old in text
    return _write(tmp / "recipe.yaml", text.replace(old, new))


PHASES = "      - {name: full, epochs: 4}\n"
FIT_CASES = [
    # command-line values
    pytest.param(["--model.init_args.phases", "[{name: full, epochs: three}]"],
                 "model.init_args.phases.epochs: expected int, got 'three'", id="epochs-three"),
    pytest.param(["--model.init_args.phases", "full"], "model.init_args.phases: expected list, got 'full'",
                 id="phases-str"),
    pytest.param(["--model.init_args.phases", "[]"], "model.init_args.phases is empty, which trains nothing",
                 id="phases-empty"),
    pytest.param(["--model.init_args.phases", "[{name: full, epochs: 0}]"],
                 "model.init_args.phases: phase 'full' has epochs=0; must be an integer >= 1", id="epochs-0"),
    pytest.param(["--model.init_args.phases", "[{name: fool, epochs: 1}]"],
                 "model.init_args.phases.name: expected one of", id="phase-name"),
    pytest.param(["--data.init_args.batch_size", "-3"], "data.init_args.batch_size must be an integer >= 1, got -3",
                 id="batch-size-negative"),
    pytest.param(["--model.init_args.subnets_per_step", "0"],
                 "model.init_args.subnets_per_step must be an integer >= 1, got 0", id="subnets-per-step-0"),
    pytest.param(["--model.init_args.lr", "-0.1"], "model.init_args.lr must be a number in (0, inf), got -0.1",
                 id="lr-negative"),
    pytest.param(["--model.init_args.momentum", "2"], "model.init_args.momentum must be a number in [0, 1]",
                 id="momentum-2"),
    pytest.param(["--model.init_args.bn_calib_batches", "0"],
                 "model.init_args.bn_calib_batches must be an integer >= 1", id="bn-calib-0"),
    pytest.param(["--model.init_args.space", "nope"], "model.init_args.space: unknown search space 'nope'",
                 id="space-unknown"),
    pytest.param(["--model.init_args.kd_ratoi", "1"], "model.init_args.kd_ratoi: unknown key", id="unknown-key"),
    pytest.param(["--trainer.max_epochs", "x"], "trainer.max_epochs: expected int, got 'x'", id="max-epochs-str"),
    pytest.param(["--trainer.devices", "0"], "trainer: `Trainer(devices='0')`", id="devices-0"),
    pytest.param(["--bogus", "1"], "unrecognized arguments: --bogus 1", id="unknown-option"),
    # values in the recipe file
    pytest.param(("epochs: 4}", "epochs: three}"), "model.init_args.phases.epochs: expected int, got 'three'",
                 id="recipe-epochs-three"),
    pytest.param((PHASES, "      - {name: full, epochs: -2}\n"), "phase 'full' has epochs=-2",
                 id="recipe-epochs-negative"),
    pytest.param(("kd_ratio: 1.0", "kd_ratoi: 1.0"), "kd_ratoi", id="recipe-unknown-key"),
    pytest.param(("batch_size: 64", "batch_size: -1"), "data.init_args.batch_size must be an integer >= 1",
                 id="recipe-batch-size"),
    pytest.param("binary", "recipe.yaml", id="binary-recipe"),
    pytest.param("missing", "missing.yaml", id="missing-recipe"),
]


@pytest.mark.parametrize("change, fragment", FIT_CASES)
def test_fit_refuses(tmp_path, capsys, monkeypatch, change, fragment):
    monkeypatch.chdir(tmp_path)  # the recipe's relative runs/ paths land in tmp_path
    recipe, extra = TINY_RECIPE, []
    if isinstance(change, list):
        extra = change
    elif isinstance(change, tuple):
        recipe = _recipe_with(tmp_path, *change)
    elif change == "binary":
        recipe = _write(tmp_path / "recipe.yaml", bytes(range(256)) * 8)
    elif change == "missing":
        recipe = tmp_path / "missing.yaml"
    code, err = run_cli(["fit", "--config", str(recipe), "--trainer.logger", "false", *extra], capsys)
    assert_one_line(code, err, fragment)
    assert err.splitlines()[-1].startswith("fit: ")


@pytest.mark.parametrize("kind, fragment", TORCH_FILE_CASES + [
    pytest.param("other-dict", "not a Lightning training checkpoint", id="other-dict"),
    pytest.param("missing", "not found", id="missing"),
])
def test_fit_refuses_unreadable_ckpt_path(tmp_path, capsys, monkeypatch, kind, fragment):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "missing.ckpt" if kind == "missing" else _bad_torch_file(tmp_path, kind)
    code, err = run_cli(["fit", "--config", str(TINY_RECIPE), "--trainer.logger", "false", "--ckpt_path", str(path)],
                        capsys)
    assert_one_line(code, err, fragment)
    assert f"checkpoint {path}" in err
    assert not (tmp_path / "EXPLOITED").exists()


def test_max_epochs_warning_uses_rank_zero_warn():
    import lightning as L

    module = SupernetModule(space="tiny", phases=[{"name": "full", "epochs": 3}], num_random_eval=0)
    for max_epochs, match in ((2, "ends before the phases' 3 epochs"), (5, "continues for 2 more")):
        module.trainer = L.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=False,
                                   enable_progress_bar=False, enable_model_summary=False)
        with pytest.warns(UserWarning, match=match):
            module.on_fit_start()


def test_supernet_module_refuses_empty_phases():
    with pytest.raises(ValueError, match="phases is empty"):
        SupernetModule(space="tiny", phases=[])
    with pytest.raises(ValueError, match="phases must be a list"):
        SupernetModule(space="tiny", phases="full")


@pytest.mark.parametrize("option, value, fragment", [
    pytest.param("subnet", "DIR", "model.init_args.subnet: {DIR} is a directory", id="subnet-is-a-directory"),
    pytest.param("subnet", "BITS47", "model.init_args.subnet: {BITS47}: bits.pw_w[0] must be an integer",
                 id="bits-4.7"),
    pytest.param("supernet_ckpt", "TEXT", "model.init_args.supernet_ckpt: checkpoint {TEXT} cannot be read",
                 id="supernet-ckpt-text"),
    pytest.param("supernet_ckpt", "EXPLOIT", "model.init_args.supernet_ckpt: checkpoint {EXPLOIT} cannot be read "
                 "(refused: it holds code", id="supernet-ckpt-pickled-code"),
    pytest.param("lr", "0", "model.init_args.lr must be a number in (0, inf), got 0", id="lr-0"),
])
def test_finetune_refuses(tmp_path, capsys, monkeypatch, option, value, fragment):
    monkeypatch.chdir(tmp_path)
    files = {"DIR": tmp_path / "sub",
             "BITS47": _write(tmp_path / "s.json", json.dumps(changed(GOOD, bits_pw_w=[4.7] * N))),
             "TEXT": _bad_torch_file(tmp_path, "text"), "EXPLOIT": _bad_torch_file(tmp_path, "pickled-code")}
    files["DIR"].mkdir()
    value = str(files.get(value, value))
    code, err = run_cli(["fit", "--config", str(ROOT / "recipes" / "finetune_tiny.yaml"), "--trainer.logger", "false",
                         f"--model.init_args.{option}", value], capsys)
    assert_one_line(code, err, fragment.format(**{k: str(v) for k, v in files.items()}))
    assert not (tmp_path / "EXPLOITED").exists()


# --------------------------------------------------------------------------------------
# `fit` of a predictor on sample stores it cannot learn from (issue 18, item 4)
# --------------------------------------------------------------------------------------
PREDICTOR_STORE_CASES = [
    pytest.param("empty", "no samples in the stores", id="empty-store"),
    pytest.param(1, "only 1 sample in", id="one-sample"),
    pytest.param(2, "the val split of", id="two-samples"),
    pytest.param(3, "the val split of", id="three-samples"),
    pytest.param("equal", "all 40 sample(s) in", id="all-equal-accuracies"),
    pytest.param("binary", "samples.rank0.jsonl:1: malformed sample record", id="binary-store"),
]


def _predictor_store(tmp: Path, content: str | int) -> Path:
    from _stores import write_store

    store = tmp / "fp" / "samples.rank0.jsonl"
    store.parent.mkdir()
    if content == "empty":
        store.write_bytes(b"")
    elif content == "binary":
        store.write_bytes(bytes(range(256)) * 16)
    else:
        write_store(store, "tiny", "fp", 40 if content == "equal" else int(content))
    if content == "equal":
        lines = [json.loads(line) | {"acc": 0.5} for line in store.read_text().splitlines()]
        store.write_text("".join(json.dumps(d) + "\n" for d in lines))
    return store


@pytest.mark.parametrize("content, fragment", PREDICTOR_STORE_CASES)
def test_predictor_fit_refuses_stores(tmp_path, capsys, monkeypatch, content, fragment):
    monkeypatch.chdir(tmp_path)
    store = _predictor_store(tmp_path, content)
    recipe = str(ROOT / "recipes" / "predictor_fp_tiny.yaml")
    code, err = run_cli(["fit", "--config", recipe, "--trainer.logger", "false",
                         "--data.init_args.stores", json.dumps([str(store)])], capsys)
    assert_one_line(code, err, fragment)
    assert err.splitlines()[-1].startswith("fit: data.init_args: ")


def test_predictor_fits_three_samples_without_validation(tmp_path, monkeypatch):
    """The sensible fit on a tiny store: no held-out splits asked for, none refused."""
    monkeypatch.chdir(tmp_path)
    store = _predictor_store(tmp_path, 3)
    code = cli_main(["fit", "--config", str(ROOT / "recipes" / "predictor_fp_tiny.yaml"), "--trainer.max_epochs", "2",
                     "--trainer.enable_progress_bar", "false",
                     "--data.init_args.stores", json.dumps([str(store)]), "--data.init_args.val_fraction", "0",
                     "--data.init_args.test_fraction", "0"])
    assert code == 0
    assert (tmp_path / "runs" / "predictor_fp_tiny" / "checkpoints" / "last.ckpt").is_file()
