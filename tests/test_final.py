"""Stage 7 (``apq final``: finetune, test, export, ONNX, report) and the baselines (``apq baselines``).

Everything runs on the tiny space and scikit-learn's digits, with a randomly initialised supernet
and random-weight predictors made here: these tests check the plumbing (fields, files, reloads,
budgets, held genes, exit codes), not accuracies.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from apq_lightning.cli import main as cli_main
from apq_lightning.final.report import FINAL_COLUMNS
from apq_lightning.hardware import get_cost_model
from apq_lightning.modules import QATModule
from apq_lightning.predictor import AccuracyPredictor
from apq_lightning.quant import load_quantized, quantize_subnet
from apq_lightning.quant.onnx_export import check_onnx, export_onnx, onnx_verdict
from apq_lightning.search import Budget, SearchSettings, prepare, run
from apq_lightning.search.baselines import Baselines, BaselineSettings, genomes_equal_on, hold
from apq_lightning.space import Subnet, get_space, save_subnets
from apq_lightning.supernet import Supernet

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "finetune_tiny.yaml"

pytestmark = pytest.mark.usefixtures("single_thread")


def _fast(run_dir: Path) -> list[str]:
    """Recipe overrides that make the tiny finetune a few seconds: 2 training steps, small
    evaluations, a CSV logger only (no W&B)."""
    logger = json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir)}})
    return ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.logger", logger, "--model.bn_calib_batches", "1",
            "--model.calib_batches", "1", "--model.eval_batches", "1", "--data.num_workers", "0"]


def _lively_supernet(space: str = "tiny") -> Supernet:
    """A random supernet whose blocks are not identities (BN gammas away from 0)."""
    torch.manual_seed(0)
    net = Supernet(space, 10)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    return net


def _save_supernet(net: Supernet, path: Path) -> Path:
    torch.save({"state_dict": {f"supernet.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"space": net.space.name, "num_classes": net.num_classes}}, path)
    return path


def _predictors() -> tuple[AccuracyPredictor, AccuracyPredictor]:
    torch.manual_seed(0)
    return (AccuracyPredictor("tiny", False, hidden=32, base_acc=0.8),
            AccuracyPredictor("tiny", True, hidden=32, base_acc=0.8))


def _budget_ms() -> float:
    """Between the cheapest subnet and the largest at 8 bits, so every method has to choose."""
    sp = get_space("tiny")
    return round(0.4 * get_cost_model("bitfusion", sp).costs(sp.largest(8))["latency_ms"], 3)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny supernet checkpoint, FP / MP predictor files and a search result of the MP predictor."""
    d = tmp_path_factory.mktemp("final_assets")
    fp, mp = _predictors()
    settings = SearchSettings(generations=3, population=16, top_k=2)
    budget = Budget.of({"latency_ms": _budget_ms()})
    [result] = run(prepare(mp, "bitfusion", [budget], settings), settings, [budget])
    return {"supernet": _save_supernet(_lively_supernet(), d / "supernet.ckpt"), "fp": fp.save(d / "fp.pt"),
            "mp": mp.save(d / "mp.pt"), "search": result.save(d / "result.json"), "dir": d}


@pytest.fixture(scope="module")
def final_run(assets) -> dict[str, object]:
    """One ``apq final`` run on the search result; returns its directory and report row."""
    out = assets["dir"] / "runs" / "apq_tiny"
    args = ["final", "--search", str(assets["search"]), "--supernet", str(assets["supernet"]),
            "--recipe", str(TINY_RECIPE), "--out", str(out), "--label", "apq-tiny", *_fast(out)]
    assert cli_main(args) == 0
    return {"out": out, "args": args, "row": json.loads((out / "final.json").read_text())}


# ------------------------------------------------------------------------------------ final
def test_final_writes_the_report_row_with_every_field(final_run, assets):
    row, out = final_run["row"], final_run["out"]
    search = json.loads(assets["search"].read_text())
    missing = [c for c in FINAL_COLUMNS if row.get(c) is None]
    assert not missing, f"report fields without a value: {missing}"
    assert Subnet.from_dict(row["subnet"]) == Subnet.from_dict(search["best"]["subnet"])
    assert row["predicted_acc"] == pytest.approx(search["best"]["predicted_acc"])
    assert row["prediction_error"] == pytest.approx(row["predicted_acc"] - row["top1"])
    assert row["search_wall_time_s"] == pytest.approx(search["wall_time_s"])
    assert 0.0 <= row["top1"] <= 1.0 and row["budget"] == search["settings"]["constraint"]
    for m in ("latency_ms", "energy_mJ", "bitops", "size_bytes"):  # the search's own cost numbers
        assert row[m] == pytest.approx(search["best"][m], rel=1e-9)
    assert row["onnx_ok"] is True and Path(row["onnx"]).is_file() and Path(row["quantized"]).is_file()
    # the appended table: one row for this run, in CSV and markdown
    with open(out.parent / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [str(out)] and rows[0]["method"] == "apq-tiny"
    assert "| apq-tiny |" in (out.parent / "report.md").read_text()


def test_exported_state_dict_reloads_and_matches_the_finetuned_checkpoint(final_run):
    out = final_run["out"]
    raw = torch.load(out / "quantized.pt", weights_only=True)
    assert raw["format"] == "apq-lightning/quantized-subnet"
    assert raw["metadata"]["metrics"]["test/acc"] == pytest.approx(final_run["row"]["top1"])
    loaded = load_quantized(out / "quantized.pt")
    assert loaded.subnet == Subnet.from_dict(final_run["row"]["subnet"])
    trained = QATModule.load_from_checkpoint(out / "checkpoints" / "last.ckpt", weights_only=True).eval()
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained.model.cpu()(x), rtol=0, atol=1e-6)


def test_onnx_model_matches_pytorch_on_a_batch(final_run):
    out, row = final_run["out"], final_run["row"]
    proto = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") > 0
    assert json.loads({p.key: p.value for p in proto.metadata_props}["subnet"]) == row["subnet"]
    check = row["onnx_check"]
    assert check["max_abs_diff"] <= check["tolerance"] and check["opset"] >= 13
    # independently of the run: a fresh batch through ONNX Runtime vs the reloaded model
    loaded = load_quantized(out / "quantized.pt")
    x = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 4 - 2
    again = check_onnx(out / "model.onnx", loaded, x)
    print(again)
    assert again.ok and again.top1_agreement >= 0.95


def test_final_rerun_is_skipped_and_other_inputs_refused(final_run, capsys):
    out = final_run["out"]
    stamp = (out / "final.json").stat().st_mtime_ns
    assert cli_main(final_run["args"]) == 0
    assert "already done" in capsys.readouterr().out
    assert (out / "final.json").stat().st_mtime_ns == stamp  # nothing was redone
    with open(out.parent / "report.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 1  # the row is replaced, not duplicated
    other = [a if a != "2" else "3" for a in final_run["args"]]  # limit_train_batches 2 -> 3
    assert cli_main(other) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("final: ") and "--force" in err and "\n" not in err


@pytest.mark.parametrize("per_channel", [False, True])
def test_onnx_export_of_a_mixed_policy_uses_qdq_pairs_with_clips(tmp_path, per_channel):
    sp = get_space("tiny")
    net = _lively_supernet()
    subnet = sp.sample(np.random.default_rng(3), quantized=True).with_bits(4)  # every block at 4 bits
    model = net.extract(subnet).eval()
    g = torch.Generator().manual_seed(0)
    quantize_subnet(model, subnet, [torch.randn(16, 3, 16, 16, generator=g) for _ in range(2)],
                    per_channel=per_channel)
    x = torch.randn(32, 3, 16, 16, generator=g)
    path = export_onnx(model.eval(), tmp_path / "m.onnx", x[:2])
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") > 0
    assert ops.count("Clip") >= ops.count("QuantizeLinear") // 2  # 4-bit ranges are narrower than int8
    check = check_onnx(path, model, x)
    assert check.ok, str(check)
    # A file that is not this model's graph (here: the model's logits are 1.5x the file's) fails.
    wrong = check_onnx(path, torch.nn.Sequential(model, _Scale(1.5)), x, atol=0.0, rtol=0.05)  # logits ~1e-4 here
    assert not wrong.ok and wrong.within_fraction < 0.5, str(wrong)


class _Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def test_onnx_verdict_tolerates_a_rare_flip_not_a_wrong_graph():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 10)).astype(np.float32) * 3
    assert onnx_verdict(ref.copy(), ref, 1e-4, 0.05, 0.9)[3]
    flipped = ref.copy()
    flipped[5] += 0.6 * np.abs(ref).max()  # one image past the tolerance: a rounding-tie flip deep in the net
    diff, tol, within, ok = onnx_verdict(flipped, ref, 1e-4, 0.05, 0.9)
    assert ok and diff > tol and within == pytest.approx(63 / 64)
    wrong = ref + rng.normal(size=ref.shape).astype(np.float32)  # every image off: a wrong graph
    assert not onnx_verdict(wrong, ref, 1e-4, 0.05, 0.9)[3]


def _final_error(args: list[str], capsys) -> str:
    assert cli_main(["final", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("final: "), err
    return err


def test_final_bad_input_is_one_line_and_exit_2(assets, tmp_path, capsys):
    sup, search, recipe = str(assets["supernet"]), str(assets["search"]), str(TINY_RECIPE)
    out = ["--out", str(tmp_path / "run")]
    assert "supernet checkpoint not found" in _final_error(
        ["--search", search, "--supernet", str(tmp_path / "none.ckpt"), "--recipe", recipe, *out], capsys)
    assert "search result not found" in _final_error(
        ["--search", str(tmp_path / "none.json"), "--supernet", sup, "--recipe", recipe, *out], capsys)
    assert "recipe not found" in _final_error(
        ["--search", search, "--supernet", sup, "--recipe", str(tmp_path / "none.yaml"), *out], capsys)
    no_best = tmp_path / "no_best.json"
    no_best.write_text(json.dumps({"results": [], "history": [0.5]}))
    assert "no 'best'" in _final_error(["--search", str(no_best), "--supernet", sup, "--recipe", recipe, *out], capsys)
    cifar = tmp_path / "cifar_subnet.json"
    save_subnets(cifar, [get_space("apq_cifar").sample(np.random.default_rng(0), quantized=True)])
    err = _final_error(["--subnet", str(cifar), "--supernet", sup, "--recipe", recipe, *out], capsys)
    assert "'apq_cifar'" in err and "'tiny'" in err
    assert "SupernetModule checkpoint" in _final_error(
        ["--search", search, "--supernet", str(assets["mp"]), "--recipe", recipe, *out], capsys)
    assert "model.init_args.lr" in _final_error(
        ["--search", search, "--supernet", sup, "--recipe", recipe, *out, "--model.lr", "-1"], capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


# ------------------------------------------------------------------------------------ baselines
@pytest.fixture(scope="module")
def baseline_rows():
    fp, mp = _predictors()
    budget = Budget.of({"latency_ms": _budget_ms()})
    settings = BaselineSettings("bitfusion", budget, SearchSettings(generations=3, population=16, top_k=1))
    return Baselines(fp, mp, settings).run(), budget, settings


def test_every_searched_baseline_meets_the_budget(baseline_rows):
    rows, budget, _ = baseline_rows
    cost = get_cost_model("bitfusion", "tiny")
    assert [r.method for r in rows] == ["apq", "largest@8bit", "largest@6bit", "largest@4bit", "fp-search@8bit",
                                        "fp-search@6bit", "fp-search@4bit", "sequential", "random"]
    for r in rows:
        assert r.subnet is not None and r.subnet.bits is not None, r.method
        c = cost.evaluate_subnets([r.subnet])
        assert r.within_budget == bool(budget.admissible(c)[0]), r.method
        assert r.predicted_acc == pytest.approx(float(_predictors()[1].predict([r.subnet])[0]), abs=1e-6)
        if not r.method.startswith("largest"):
            assert r.within_budget, f"{r.method} breaks the budget: {r.latency_ms} ms"
    assert not any(r.within_budget for r in rows if r.method.startswith("largest"))  # the budget is below them
    for r in rows:
        if r.method.startswith(("fp-search", "largest")):
            bits = int(r.method.split("@")[1][0])
            active = r.subnet.active_blocks
            assert {r.subnet.bits.get(f)[i] for f in ("pw_w", "pw_a", "dw_w", "dw_a") for i in active} == {bits}
    by = {r.method: r for r in rows}
    assert by["random"].predictor_calls == by["apq"].predictor_calls > 0  # equal predictor calls


def test_sequential_stages_hold_what_they_should(baseline_rows):
    rows, _, _ = baseline_rows
    seq = next(r for r in rows if r.method == "sequential")
    arch, width, bits = (Subnet.from_dict(s["subnet"]) for s in seq.stages)
    assert [s["stage"] for s in seq.stages] == ["architecture", "width", "bits"]
    sp = get_space("tiny")
    level = seq.stages[0]["width_level"]
    assert all(arch.widths[i] == sp.blocks[i].width_choices[round(level * (len(sp.blocks[i].width_choices) - 1))]
               for i in arch.active_blocks)
    for s in (arch, width):  # NAS and pruning at 8 bits
        assert {v for f in ("pw_w", "pw_a", "dw_w", "dw_a") for i in s.active_blocks for v in [s.bits.get(f)[i]]} == {8}
    assert genomes_equal_on(sp, arch, width, ("depths", "kernels"))
    assert genomes_equal_on(sp, width, bits, ("depths", "kernels", "widths"))
    assert bits == seq.subnet and seq.predictor_calls == sum(s["predictor_calls"] for s in seq.stages)


def test_hold_fixes_genes_in_the_evolution():
    """The restricted searches are the evolution with held genes: no held gene ever changes."""
    sp = get_space("tiny")
    _, mp = _predictors()
    anchor = sp.sample(np.random.default_rng(5), quantized=True)
    fixed = hold(sp, anchor, ("depths", "kernels", "widths"))
    settings = SearchSettings(generations=4, population=16, top_k=4)
    budget = Budget.of({"latency_ms": 10.0})
    [result] = run(prepare(mp, "bitfusion", [budget], settings, fixed=fixed), settings, [budget])
    for c in result.results:
        assert genomes_equal_on(sp, anchor, c.subnet, ("depths", "kernels", "widths"))


def test_baselines_command_writes_one_row_per_method(assets, tmp_path, capsys):
    out = tmp_path / "bl"
    args = ["baselines", "--fp-predictor", str(assets["fp"]), "--mp-predictor", str(assets["mp"]),
            "--constraint", f"latency_ms={_budget_ms()}", "--generations", "2", "--population", "12",
            "--out", str(out)]
    assert cli_main(args) == 0
    doc = json.loads((out / "baselines.json").read_text())
    methods = [r["method"] for r in doc["rows"]]
    assert len(methods) == len(set(methods)) == 9
    table = (out / "baselines.md").read_text()
    assert all(f"| {m} |" in table for m in methods)
    assert doc["budget"] == {"latency_ms": _budget_ms()}


def _baselines_error(args: list[str], capsys) -> str:
    assert cli_main(["baselines", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("baselines: "), err
    return err


def test_baselines_bad_input_is_one_line_and_exit_2(assets, tmp_path, capsys):
    fp, mp = str(assets["fp"]), str(assets["mp"])
    ok = ["--constraint", "latency_ms=1", "--out", str(tmp_path / "bl")]
    assert "not found" in _baselines_error(["--fp-predictor", str(tmp_path / "x.pt"), "--mp-predictor", mp, *ok],
                                           capsys)
    assert "FP predictor" in _baselines_error(["--fp-predictor", mp, "--mp-predictor", mp, *ok], capsys)
    assert "one budget" in _baselines_error(["--fp-predictor", fp, "--mp-predictor", mp, "--constraint",
                                             "latency_ms=1,2"], capsys)
    assert "cheapest" in _baselines_error(["--fp-predictor", fp, "--mp-predictor", mp, "--constraint",
                                           "latency_ms=0.001"], capsys)
    cifar = _save_supernet(Supernet("apq_cifar", 10), tmp_path / "cifar.ckpt")
    assert "'apq_cifar'" in _baselines_error(["--fp-predictor", fp, "--mp-predictor", mp, *ok, "--finetune",
                                              "--supernet", str(cifar), "--recipe", str(TINY_RECIPE)], capsys)
    assert "unknown key" in _baselines_error(["--fp-predictor", fp, "--mp-predictor", mp, *ok, "--finetune",
                                              "--supernet", str(assets["supernet"]), "--recipe", str(TINY_RECIPE),
                                              "--model.nope", "1"], capsys)
    assert not (tmp_path / "bl").exists()  # every error came before any search or finetune


def test_baselines_finetune_seeds_are_checked_before_any_search(assets, tmp_path, capsys):
    base = ["baselines", "--fp-predictor", str(assets["fp"]), "--mp-predictor", str(assets["mp"]), "--constraint",
            "latency_ms=1", "--out", str(tmp_path / "bl")]
    tune = ["--finetune", "--supernet", str(assets["supernet"]), "--recipe", str(TINY_RECIPE)]
    for extra, message in ((["--finetune-seeds", "0,1"], "need --finetune"),
                           (["--float-reference"], "need --finetune"),
                           ([*tune, "--finetune-seeds", "0,x"], "expected comma-separated integers"),
                           ([*tune, "--finetune-seeds", "1,1"], "give distinct seeds"),
                           ([*tune, "--finetune-seeds", "0,1", "--seed_everything", "3"], "give one or the other")):
        with pytest.raises(SystemExit) as err:
            cli_main([*base, *extra])
        assert err.value.code == 2 and message in capsys.readouterr().err, extra
    assert not (tmp_path / "bl").exists()


@pytest.mark.slow
def test_baselines_finetune_adds_achieved_accuracy(assets, tmp_path):
    out = tmp_path / "bl"
    args = ["baselines", "--fp-predictor", str(assets["fp"]), "--mp-predictor", str(assets["mp"]),
            "--constraint", f"latency_ms={_budget_ms()}", "--generations", "2", "--population", "12",
            "--methods", "apq,sequential", "--out", str(out), "--finetune", "--supernet", str(assets["supernet"]),
            "--recipe", str(TINY_RECIPE), "--no-onnx", "--weights", "best", *_fast(out)]
    assert cli_main(args) == 0
    doc = json.loads((out / "baselines.json").read_text())
    assert [r["method"] for r in doc["rows"]] == ["apq", "sequential"]
    for r in doc["rows"]:
        assert 0.0 <= r["achieved_acc"] <= 1.0 and r["achieved_accs"] == [] and r["float_acc"] is None
        final = json.loads((Path(r["final_run"]) / "final.json").read_text())
        assert final["top1"] == r["achieved_acc"] and final["predicted_acc"] == pytest.approx(r["predicted_acc"])
        assert final["weights"] == "best" and final["onnx"] is None
    assert "achieved_acc" in (out / "baselines.md").read_text()
    with open(out / "final" / "report.csv", newline="") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["apq", "sequential"]
    # two seeds and the float reference
    seeded = tmp_path / "seeded"
    args[args.index("--out") + 1] = str(seeded)
    assert cli_main([*args[:args.index("--methods")], "--methods", "sequential",
                     *args[args.index("--methods") + 2:], "--finetune-seeds", "0,1", "--float-reference"]) == 0
    row = json.loads((seeded / "baselines.json").read_text())["rows"][0]
    runs = [seeded / "final" / name / "final.json" for name in ("sequential", "sequential.seed1", "sequential.float")]
    seed0, seed1, flt = (json.loads(p.read_text()) for p in runs)
    assert row["achieved_accs"] == [seed0["top1"], seed1["top1"]]
    assert row["achieved_acc"] == pytest.approx((seed0["top1"] + seed1["top1"]) / 2) and row["float_acc"] == flt["top1"]
    assert seed0["inputs"]["overrides"][-2:] == ["--seed_everything", "0"]
    assert seed1["inputs"]["overrides"][-2:] == ["--seed_everything", "1"]
    assert flt["inputs"]["overrides"][-2:] == ["--model.policy", "float"] and flt["method"] == "sequential (float)"
    table = (seeded / "baselines.md").read_text()
    assert "achieved_std" in table and "float_acc" in table
    # The pipeline's added seeds finetune a baseline's subnet again through `apq final --subnet`;
    # that pairs with the baseline's own runs only if the same seed gives the same network.
    again = tmp_path / "again"
    assert cli_main(["final", "--subnet", str(seeded / "final" / "sequential" / "subnet.json"), "--supernet",
                     str(assets["supernet"]), "--recipe", str(TINY_RECIPE), "--out", str(again), "--label",
                     "sequential", "--no-onnx", "--weights", "best", *_fast(again), "--seed_everything", "1"]) == 0
    rerun = json.loads((again / "final.json").read_text())
    assert rerun["top1"] == seed1["top1"] and rerun["subnet"] == seed1["subnet"]
    a, b = (torch.load(d / "quantized.pt", weights_only=True)["state_dict"] for d in
            (again, seeded / "final" / "sequential.seed1"))
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # nested: weights and quantizer ranges


def test_final_refuses_an_unrunnable_or_over_budget_subnet_before_training(assets, tmp_path, capsys):
    """(It used to finetune for minutes, exit 0 and write ``Infinity`` into final.json.)"""
    sp = get_space("tiny")
    cost = get_cost_model("bitfusion", sp)
    unrunnable = next(s for s in (sp.sample(np.random.default_rng(i), quantized=True) for i in range(500))
                      if not cost.costs(s)["feasible"])
    (tmp_path / "bad.json").write_text(json.dumps(unrunnable.to_dict()))
    out = tmp_path / "run"
    args = ["final", "--subnet", str(tmp_path / "bad.json"), "--supernet", str(assets["supernet"]),
            "--recipe", str(TINY_RECIPE), "--hardware", "bitfusion", "--out", str(out), *_fast(out)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot run on bitfusion" in err
    assert not (out / "checkpoints").exists()  # refused before any training
    # a searched subnet over its own budget (the search result edited) is refused too
    doc = json.loads(assets["search"].read_text())
    doc["settings"]["constraint"] = {"latency_ms": doc["best"]["latency_ms"] / 2}
    (tmp_path / "over.json").write_text(json.dumps(doc))
    args = ["final", "--search", str(tmp_path / "over.json"), "--supernet", str(assets["supernet"]),
            "--recipe", str(TINY_RECIPE), "--out", str(out), *_fast(out)]
    assert cli_main(args) == 2
    assert "over the search's budget" in capsys.readouterr().err
