"""Report tables: rows kept in a CSV (the record), rendered to markdown beside it.

A final run appends one row per subnet to ``report.csv`` / ``report.md``; running it again
replaces its own row (rows are keyed by their ``run`` directory) instead of adding a duplicate,
so a resumed or repeated command leaves one row per run.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FINAL_COLUMNS: tuple[str, ...] = (
    "method", "top1", "predicted_acc", "prediction_error", "latency_ms", "energy_mJ", "bitops", "size_bytes",
    "search_wall_time_s", "finetune_wall_time_s", "fp_acc", "ptq_acc", "val_acc", "onnx_max_abs_diff", "space",
    "hardware", "subnet_key", "run",
)
"""Columns of the final report table (the JSON row holds more: the subnet, paths, the ONNX check)."""

_SCALE = {"bitops": (1e9, "GBitOps"), "size_bytes": (1e6, "size MB")}
_DIGITS = {"top1": 4, "predicted_acc": 4, "prediction_error": 4, "achieved_acc": 4, "fp_acc": 4, "ptq_acc": 4,
           "val_acc": 4, "latency_ms": 4, "energy_mJ": 4, "bitops": 3, "size_bytes": 3, "GBitOps": 3,
           "size_MB": 3, "search_wall_time_s": 3, "finetune_wall_time_s": 1}


def format_cell(column: str, value: Any) -> str:
    """Markdown cell: rounded numbers, ``-`` for missing values, ``yes``/``no`` for booleans."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    scale = _SCALE.get(column)
    if scale is not None and isinstance(value, (int, float)):
        value = value / scale[0]
    if isinstance(value, float):
        digits = _DIGITS.get(column, 4)
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2e}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` (missing keys as ``-``)."""
    head = [_SCALE[c][1] if c in _SCALE else c for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(format_cell(c, r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _from_csv(text: str) -> Any:
    """CSV cells back to numbers / booleans / None, so a re-rendered table formats alike."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:  # not this kind of number: try the next, else keep the text
            pass
    return text


def append_row(stem: str | Path, row: Mapping[str, Any], columns: Sequence[str] = FINAL_COLUMNS,
               key: str = "run", title: str = "Final models") -> tuple[Path, Path]:
    """Add ``row`` to ``<stem>.csv`` (replacing a row with the same ``key``) and rewrite
    ``<stem>.md`` from it. Returns (csv path, markdown path)."""
    stem = Path(stem)
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    rows: list[dict[str, Any]] = []
    if csv_path.is_file():
        with open(csv_path, newline="") as f:
            rows = [{k: _from_csv(v) for k, v in r.items()} for r in csv.DictReader(f)]
    rows = [r for r in rows if str(r.get(key)) != str(row.get(key))]
    rows.append({c: row.get(c) for c in columns})
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_name(f".{csv_path.name}.{os.getpid()}.partial")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})
    os.replace(tmp, csv_path)
    md_path.write_text(f"# {title}\n\n" + markdown_table(rows, columns))
    return csv_path, md_path


__all__ = ["FINAL_COLUMNS", "append_row", "format_cell", "markdown_table"]
