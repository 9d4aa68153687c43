"""The command line's overview: every command, one line each, and the recipe of every stage."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from apq_lightning.cli import COMMANDS, PIPELINE, main

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
    for _, how in PIPELINE:
        for stem, variants in re.findall(r"recipes/(\w+)(?:\{([\w,]*)\})?\.yaml", how):
            for variant in variants.split(",") if variants else [""]:
                assert (ROOT / "recipes" / f"{stem}{variant}.yaml").is_file(), how
