"""Output files: checked before the work, strict JSON (no ``Infinity``), atomic writes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from apq_lightning.outputs import check_output_file, to_json_text, write_json


def test_json_refuses_non_finite_numbers_and_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"non-finite number \(at row.latency_ms\)"):
        write_json(tmp_path / "r.json", {"row": {"top1": 0.9, "latency_ms": math.inf}})
    with pytest.raises(ValueError, match=r"at rows\[1\]"):
        to_json_text({"rows": [1.0, np.float32("nan")]})
    assert not (tmp_path / "r.json").exists() and not list(tmp_path.iterdir())  # nothing half-written
    p = write_json(tmp_path / "sub" / "r.json", {"a": np.float64(0.5), "b": None})
    assert json.loads(p.read_text()) == {"a": 0.5, "b": None}


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="--out .*: is a directory"):
        check_output_file(tmp_path)
    with pytest.raises(ValueError, match="afile is a file, not a folder"):
        check_output_file(tmp_path / "afile" / "deeper" / "r.json")
    assert check_output_file(tmp_path / "new" / "r.json") == tmp_path / "new" / "r.json"
    assert not (tmp_path / "new").exists()  # checking creates nothing
