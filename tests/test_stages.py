"""The pipeline driver's own logic (the stages themselves run in tests/test_demo.py; the whole pipeline under
kill -9 in benchmarks/pipeline_kill.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_inputs import assert_one_line

from apq_lightning import stages
from apq_lightning.final.results import results_rows, results_table
from apq_lightning.locks import run_lock
from apq_lightning.stages import PRESETS, main, run_pipeline


def test_run_dirs_and_stores_come_from_the_recipes():
    cifar, tiny = PRESETS["cifar"], PRESETS["tiny"]
    assert cifar.run("supernet") == Path("runs/supernet_cifar")
    assert cifar.run("collect_fp") == Path("runs/collect_fp_cifar")  # not the recipe's stem (collect_fp)
    assert cifar.stores("predictor_mp") == ["runs/collect_mp_cifar/samples*.jsonl"]
    assert tiny.stores("predictor_fp") == ["runs/collect_fp_tiny/samples*.jsonl"]
    assert Path(tiny.recipe("supernet")).is_file()  # found from any working directory


def test_recipes_resolve_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(PRESETS["tiny"].recipe("finetune")).is_file()
    assert PRESETS["tiny"].run("predictor_mp") == Path("runs/predictor_mp_tiny")


def test_overrides_are_per_stage_and_stage_names_are_checked():
    cifar = PRESETS["cifar"]
    assert cifar.args("collect_fp") == ("--model.init_args.eval_images", "2000")
    assert cifar.args("supernet") == cifar.args("collect_mp") == ()
    with pytest.raises(ValueError, match="unknown stage 'colect_fp'; stages: supernet, collect_fp"):
        cifar.args("colect_fp")


def test_cifar_needs_data_and_a_given_supernet_must_exist(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--preset", "cifar"])
    assert err.value.code == 2 and "--preset cifar needs --data PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--supernet .*nope.pt: no such file"):
        run_pipeline(PRESETS["tiny"], tmp_path / "out", [], supernet=str(tmp_path / "nope.pt"))
    with pytest.raises(SystemExit, match="--qfa-supernet .*nope.pt: no such file"):
        run_pipeline(PRESETS["tiny"], tmp_path / "out", [], qfa_supernet=str(tmp_path / "nope.pt"))


def test_results_table_rows_per_budget(tmp_path):
    p = PRESETS["tiny"]
    out = tmp_path
    ms = p.budgets[0]
    final = out / "final" / f"latency_ms={ms:g}" / "final.json"
    final.parent.mkdir(parents=True)
    final.write_text(json.dumps({"row": {"predicted_acc": 0.9, "top1": 0.95, "latency_ms": 0.4, "energy_mJ": 0.5,
                                         "bitops": 2e8, "size_bytes": 1e5, "search_wall_time_s": 1.5}}))
    base = out / "baselines" / f"latency_ms={ms:g}" / "baselines.json"
    base.parent.mkdir(parents=True)
    base.write_text(json.dumps({"rows": [
        {"method": "apq", "predicted_acc": 0.9},  # APQ's own row comes from final.json
        {"method": "fp-search@8bit", "predicted_acc": 0.8, "achieved_acc": 0.85, "latency_ms": 0.44,
         "energy_mJ": 0.6, "bitops": 3e8, "size_bytes": 2e5, "within_budget": True},
        {"method": "largest@4bit", "predicted_acc": 0.7, "feasible": False, "within_budget": False},
        {"method": "largest@8bit", "predicted_acc": 0.7, "latency_ms": 1.9, "within_budget": False},
    ]}))
    rows = results_rows(p.budgets, out)
    assert rows[0]["method"] == "APQ (joint search)" and rows[0]["achieved_acc"] == 0.95 and rows[0]["gbitops"] == 0.2
    assert [r["status"] for r in rows] == ["within", "within", "not runnable", "over"]
    json.dumps(rows)  # the rows are results.json's data: plain JSON
    lines = results_table(rows).splitlines()
    assert lines[2] == ("| APQ (joint search) | 0.45 ms | 0.900 | 0.950 | 0.400 | 0.500 | 0.200 | 100.0 | 1.50 |")
    assert lines[3].startswith("| fp-search@8bit | 0.45 ms | 0.800 | 0.850 |")
    assert lines[4].startswith("| largest@4bit | 0.45 ms (not runnable) |")
    assert lines[5].startswith("| largest@8bit | 0.45 ms (over) |")
    assert len(lines) == 6  # nothing for the second budget yet


# ------------------------------------------------------------------------------- resumed runs
class FakeApq:
    """Stands in for the stage commands (:func:`apq_lightning.stages._apq`): writes what each
    command writes; the content names the call, so a command run again changes its outputs."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, args: list[str], log: Path) -> None:
        self.calls.append(args)
        if self.fail_on in args:
            raise SystemExit(f"stage failed (exit 1): apq {' '.join(args)}")
        opt = dict(zip(args, args[1:]))
        stamp = f"call {len(self.calls)}"
        if args[0] in ("fit", "predict"):
            root = Path(yaml.safe_load(Path(opt["--config"]).read_text())["trainer"]["default_root_dir"])
            files = {root / ("checkpoints/last.ckpt" if args[0] == "fit" else "samples.rank0.jsonl"): stamp}
        elif args[0] == "transfer-study":
            files = {Path(opt["--out"]) / "transfer_study.json": "{}"}
        elif args[0] == "search":
            files = {Path(opt["--out"]): "{}", Path(opt["--plot"]): stamp}
        elif args[0] == "final":
            files = {Path(opt["--out"]) / "final.json": json.dumps({"row": {"top1": 0.5, "predicted_acc": 0.6}})}
        else:
            files = {Path(opt["--out"]) / "baselines.json": json.dumps({"rows": []})}
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    def commands(self, start: int = 0) -> list[str]:
        """What ran from call ``start`` on: the subcommand and its recipe (or its output folder)."""
        names = []
        for c in self.calls[start:]:
            opt = dict(zip(c, c[1:]))
            names.append(f"{c[0]} " + (Path(opt["--config"]).stem if "--config" in opt
                                       else f"{Path(opt['--out']).parent.name}/{Path(opt['--out']).name}"))
        return names


@pytest.fixture
def fake_apq(tmp_path, monkeypatch) -> FakeApq:
    monkeypatch.chdir(tmp_path)  # the tiny recipes write under runs/ of the working directory
    fake = FakeApq()
    monkeypatch.setattr(stages, "_apq", fake)
    return fake


def test_a_rerun_skips_what_an_earlier_run_finished(fake_apq, tmp_path):
    p, out = PRESETS["tiny"], tmp_path / "out"
    run_pipeline(p, out, [])
    first = fake_apq.commands()
    assert len(first) == 14 and first[:5] == ["fit supernet_tiny_qfa", "predict collect_fp_tiny",
                                              "fit predictor_fp_tiny", "predict collect_mp_tiny",
                                              "fit predictor_mp_tiny"]
    times = run_pipeline(p, out, [])
    assert fake_apq.commands(14) == []  # nothing started again
    assert set(times) == {label for label in json.loads((out / "stage_times.json").read_text())
                          if not label.startswith(("5b", "6 "))}  # (5b and 6 are skipped when their files exist)
    log = (out / "pipeline.log").read_text().split("# pipeline run of preset tiny")
    assert len(log) == 3 and "== stage 3 FP predictor: done by an earlier run, skipped" in log[2]
    # more FP samples: stage 2, and what reads its store or a checkpoint trained on it, run again
    p = dataclasses.replace(p, fp_samples=300)
    run_pipeline(p, out, [])
    baselines = [f"baselines {kind}/latency_ms={ms:g}" for ms in p.budgets for kind in ("baselines",
                                                                                   "baselines_predicted")]
    assert fake_apq.commands(14) == ["predict collect_fp_tiny", "fit predictor_fp_tiny", "fit predictor_mp_tiny",
                                     *baselines]
    # an output gone: its command runs again (and resumes by itself)
    (tmp_path / "runs" / "predictor_mp_tiny" / "checkpoints" / "last.ckpt").unlink()
    n = len(fake_apq.calls)
    run_pipeline(p, out, [])
    assert fake_apq.commands(n) == ["fit predictor_mp_tiny", *baselines]


def test_a_failed_command_is_not_recorded_and_runs_again(fake_apq, tmp_path):
    p, out = PRESETS["tiny"], tmp_path / "out"
    fake_apq.fail_on = str(Path(p.recipe("collect_mp")))
    with pytest.raises(SystemExit, match="stage failed"):
        run_pipeline(p, out, [])
    assert fake_apq.commands()[-1] == "predict collect_mp_tiny"
    fake_apq.fail_on = None
    run_pipeline(p, out, [])
    assert fake_apq.commands(4)[:2] == ["predict collect_mp_tiny", "fit predictor_mp_tiny"]  # stages 1-3 skipped
    assert any("collect_mp_tiny" in command for command in json.loads((out / "stages_done.json").read_text()))


def test_a_second_driver_on_a_folder_is_refused_with_one_line(fake_apq, tmp_path, capsys):
    out = tmp_path / "out"
    with run_lock(out, "pipeline"):
        code = main(["--preset", "tiny", "--out", str(out)])
    assert_one_line(code, capsys.readouterr().err,
                    f"pipeline: {out} is in use: pipeline by pid {os.getpid()} on host {socket.gethostname()}")
    assert fake_apq.calls == [] and not (out / "pipeline.log").exists()


def test_a_driver_killed_with_9_leaves_no_lock(fake_apq, tmp_path, capsys):
    out = tmp_path / "out"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "apq_lightning.stages", "--preset", "tiny", "--out", str(out)],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        lock, deadline = out / ".pipeline.lock", time.time() + 120
        while time.time() < deadline and driver.poll() is None and not (lock.is_file() and lock.read_text()):
            time.sleep(0.05)
        assert main(["--preset", "tiny", "--out", str(out)]) == 2  # held by the running driver
        assert f"in use: pipeline by pid {driver.pid} on host" in capsys.readouterr().err
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the stage-1 fit it started
        driver.wait()
    assert lock.read_text()  # the dead driver's name is still in the file, its lock is not
    assert main(["--preset", "tiny", "--out", str(out)]) == 0
    assert len(fake_apq.calls) == 14 and (out / "results.md").is_file()


def test_stage_4_scores_in_the_qfa_supernet_and_the_rest_use_the_float_one(fake_apq, tmp_path):
    """``--supernet`` (float: FP samples, finetunes, baselines) and ``--qfa-supernet`` (stage 4)."""
    float_net, qfa_net = tmp_path / "float.pt", tmp_path / "qfa.pt"
    float_net.write_bytes(b"f")
    qfa_net.write_bytes(b"q")
    run_pipeline(PRESETS["tiny"], tmp_path / "out", [], supernet=str(float_net), qfa_supernet=str(qfa_net))
    used = {}
    for c in fake_apq.calls:
        opt = dict(zip(c, c[1:]))
        name = Path(opt["--config"]).stem if "--config" in opt else c[0]
        ckpt = opt.get("--model.init_args.supernet_ckpt", opt.get("--supernet"))
        if ckpt:
            used.setdefault(name, set()).add(ckpt)
    assert used.pop("collect_mp_tiny") == {str(qfa_net)}
    assert set(used) >= {"collect_fp_tiny", "final", "baselines"} and all(v == {str(float_net)} for v in used.values())
