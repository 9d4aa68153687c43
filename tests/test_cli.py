"""The command line's overview: every command, one line each, and the recipe of every stage."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from apq_lightning.cli import COMMANDS, STAGES, main

ROOT = Path(__file__).resolve().parents[1]


def _commands_listed(text: str) -> list[str]:
    block = text.split("commands:\n", 1)[1].split("\n\n", 1)[0]
    return [line.split()[0] for line in block.splitlines()]


@pytest.mark.parametrize("argv", [["--help"], ["-h"]])
def test_help_lists_every_command_once(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    listed = _commands_listed(out)
    assert listed == list(COMMANDS) and len(set(listed)) == len(listed)
    assert listed[:7] == ["fit", "validate", "test", "predict", "cost", "lut", "search"]
    for stage in range(1, 8):  # every pipeline stage names the command that runs it
        m = re.search(rf"^  {stage} .*  apq (\w+) ", out, re.M)
        assert m is not None and m.group(1) in COMMANDS, stage


def test_no_arguments_prints_the_overview_and_fails(capsys):
    assert main([]) == 2
    assert _commands_listed(capsys.readouterr().err) == list(COMMANDS)


def test_unknown_command_is_one_line(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown command 'frobnicate'" in err and "search" in err


def test_every_recipe_named_by_the_overview_exists():
    for s in STAGES:
        for stem, variants in re.findall(r"recipes/(\w+)(?:\{([\w,]*)\})?\.yaml", s.command):
            for variant in variants.split(",") if variants else [""]:
                assert (ROOT / "recipes" / f"{stem}{variant}.yaml").is_file(), s.command


def test_readme_pipeline_table_is_the_stage_table():
    """The README's table has one row per stage, in order, each with the stage's own command on its
    tiny recipe (the driver and ``apq --help`` read the same table)."""
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (\w+) \| [^|]+ \| (.+?) \| [^|]+ \|$", text, flags=re.M)
    rows = [(n, cmd) for n, cmd in rows if n in {s.number for s in STAGES}]
    assert [n for n, _ in rows] == [s.number for s in STAGES]
    for (_, cmd), s in zip(rows, STAGES):
        verb = s.command.split()[0]
        assert f"apq {verb}" in cmd, (s.label, cmd)
        for stem, variants in re.findall(r"recipes/(\w+)(?:\{([\w,]*)\})?\.yaml", s.command):
            tiny = next((f"{stem}{v}" for v in variants.split(",") if v.endswith("tiny")), stem)
            assert f"recipes/{tiny}.yaml" in cmd, (s.label, cmd)


def _print_config(argv: list[str], capsys) -> dict:
    import yaml

    with pytest.raises(SystemExit) as done:
        main([*argv, "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


RUN_DIR_RECIPES = [("predict" if p.stem.startswith("collect_") else "fit", p.stem)
                   for p in sorted((ROOT / "recipes").glob("*.yaml"))]
"""Every recipe: the collections run through ``predict``, everything else through ``fit``."""


@pytest.mark.parametrize(("command", "recipe"), RUN_DIR_RECIPES)
def test_default_root_dir_moves_every_output_of_a_recipe(command, recipe, tmp_path, capsys):
    """(A recipe that hard-codes an output path would let a fit in a new directory resume, or
    overwrite, another run's files.)"""
    """Loggers, checkpoint dirs, summaries, plots, exports and sample stores all derive from
    ``trainer.default_root_dir``, so one override moves them (interpolation after the command line)."""
    path = ROOT / "recipes" / f"{recipe}.yaml"
    default = re.search(r"default_root_dir:\s*(\S+)", path.read_text()).group(1)
    run = str(tmp_path / "run")
    cfg = _print_config([command, "--config", str(path), "--trainer.default_root_dir", run], capsys)
    values = _strings(cfg)
    assert not [v for v in values if default in v]  # nothing left at the recipe's own run dir
    assert len([v for v in values if v.startswith(run)]) >= 2  # default_root_dir and what derives from it


def test_legacy_phase_epochs_interpolation_resolves_to_null(tmp_path, capsys):
    text = (ROOT / "recipes" / "supernet_tiny.yaml").read_text()
    text = re.sub(r"  max_epochs: null.*", "  max_epochs: ${phase_epochs:${model.init_args.phases}}", text)
    (tmp_path / "legacy.yaml").write_text(text)
    cfg = _print_config(["fit", "--config", str(tmp_path / "legacy.yaml")], capsys)
    assert cfg["trainer"]["max_epochs"] is None


@pytest.mark.parametrize("recipe", ["predictor_fp_imagenet", "predictor_mp_imagenet"])
def test_imagenet_predictor_recipes_parse_for_ddp(recipe, capsys):
    """The multi-GPU predictor recipes resolve: DDP over every device, apq_imagenet stores."""
    cfg = _print_config(["fit", "--config", str(ROOT / "recipes" / f"{recipe}.yaml")], capsys)
    assert cfg["trainer"]["strategy"] == "ddp" and cfg["trainer"]["devices"] == -1
    assert cfg["model"]["init_args"]["space"] == "apq_imagenet"
    assert all("imagenet" in s for s in cfg["data"]["init_args"]["stores"])
