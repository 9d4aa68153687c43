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
    assert _commands_listed(out) == ["fit", "validate", "test", "predict", "cost", "lut", "search"]
    for stage in range(1, 8):
        assert re.search(rf"^  {stage} .*apq (fit|predict|search) ", out, re.M), stage


def test_no_arguments_prints_the_overview_and_fails(capsys):
    assert main([]) == 2
    assert _commands_listed(capsys.readouterr().err) == list(COMMANDS)


def test_unknown_command_is_one_line(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown command 'frobnicate'" in err and "search" in err


def test_every_recipe_named_by_the_overview_exists():
    for _, how in PIPELINE:
        m = re.search(r"recipes/(\w+)\{([\w,]*)\}\.yaml", how)
        if m is None:
            continue
        for variant in m.group(2).split(","):
            assert (ROOT / "recipes" / f"{m.group(1)}{variant}.yaml").is_file(), how
