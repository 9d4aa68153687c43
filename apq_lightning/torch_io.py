"""Reading torch files that a user points us at: safely, and with one-line errors.

Every loader of the project (``load_supernet``, ``load_quantized``, the CLI's resume check)
reads through :func:`read_torch_file`, which

* loads with ``weights_only=True`` only, so a file holding pickled code is refused, never run;
* turns the many ways ``torch.load`` fails on a file that is not what it should be (a
  truncated checkpoint from a killed save: ``RuntimeError``; an empty file: ``EOFError`` with
  no message; a text file: ``KeyError: 101``; pickled code: a 20-line ``UnpicklingError``)
  into one ``ValueError`` naming the file and the reason;
* checks that the file holds a dict (a bare tensor file is not a checkpoint).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch


class UnreadableFileError(ValueError):
    """A torch file that does not load (truncated, empty, not a torch file, unsafe content)."""


def read_torch_file(
    path: str | Path, what: str = "checkpoint", map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """The dict stored in ``path`` (``torch.load(weights_only=True)``), or a one-line error.

    ``what`` names the expected content in messages ("checkpoint", "quantized model file").
    ``mmap=True`` maps the tensors instead of reading them: a cheap check that a large
    checkpoint is complete (a torn zip archive has no central directory and fails at once).
    Raises ``FileNotFoundError`` for a missing path, :class:`UnreadableFileError` otherwise.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {p} not found")
    if p.is_dir():
        raise UnreadableFileError(f"{what} {p} is a directory, not a file")
    reason = _why_unreadable(p, what, map_location, mmap)
    if isinstance(reason, str):
        raise UnreadableFileError(f"{what} {p} cannot be read ({reason})")
    if not isinstance(reason, dict):
        raise UnreadableFileError(
            f"{what} {p} cannot be read (not a {what}: it holds a {type(reason).__name__}, not a dict)"
        )
    return reason


def _why_unreadable(p: Path, what: str, map_location: Any, mmap: bool) -> Any:
    """The loaded object, or a string saying why it could not be loaded."""
    size = p.stat().st_size
    if size == 0:
        return f"empty file: truncated or not a {what}"
    mmap = mmap and zipfile.is_zipfile(p)  # other files: read them to say what they are
    try:
        return torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        return _unpickling_reason(str(err), what)
    except MemoryError:
        raise
    except Exception as err:  # torch.load's failure modes on foreign bytes are many and untyped
        if not zipfile.is_zipfile(p):  # a text file gives "KeyError: 101": say what it means
            return f"truncated or not a {what}: not a torch.save archive"
        first = _first_sentence(str(err))
        return f"truncated or not a {what}: {type(err).__name__}{': ' + first if first else ''}"


def _unpickling_reason(message: str, what: str) -> str:
    """The one informative line of torch's long ``weights_only`` refusal."""
    if "Weights only load failed" in message:
        detail = next((line.strip() for line in message.splitlines()
                       if "unsupported" in line.lower() or "GLOBAL" in line), "")
        detail = _first_sentence(detail) or "objects other than tensors and plain values"
        return f"refused: it holds code or objects that weights_only loading does not allow: {detail}"
    return f"truncated or not a {what}: {_first_sentence(message)}"


def _first_sentence(message: str) -> str:
    """First line, first sentence: torch appends paragraphs of advice to its errors."""
    first = (message.strip().splitlines() or [""])[0]
    return first.split(". ")[0].rstrip(".")
