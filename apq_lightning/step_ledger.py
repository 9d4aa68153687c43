"""The pipeline driver's ledger: which ``apq`` commands a run folder finished, and with what.

:class:`Step` is one command with the files that show it done; :class:`DoneLedger` records each
finished step with digests of its inputs and outputs, so that a rerun of the driver skips it
while neither changed (:mod:`apq_lightning.stages` runs the steps).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from apq_lightning.outputs import write_json


@dataclass(frozen=True)
class Step:
    """One ``apq`` command of a stage and the files that tell whether an earlier run finished it.

    ``outputs``: files or glob patterns the command writes (each must match a file once it is
    done). ``inputs``: files or patterns it reads that its arguments do not name (the stores a
    predictor recipe lists); every existing file its arguments name (recipe, checkpoints, search
    result, data archive) is an input already.
    """

    args: tuple[str, ...]
    outputs: tuple[str, ...]
    inputs: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return shlex.join(self.args)


class DoneLedger:
    """``<out>/stages_done.json``: each command a run of this folder finished, with a digest of its
    inputs (the command line and the content of every input file) and of its outputs.

    Why: rerunning a finished command costs a process start and a data setup (seconds to minutes)
    for nothing, and some commands (the baselines' searches) are not idempotent. A command is
    skipped only while both digests still match: new inputs (a changed recipe, a retrained
    predictor, more samples) or a changed or missing output run it again, and the command's own
    resume decides what is left to do.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256

    def _digest(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._digests:
            h = hashlib.sha256()
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            self._digests[key] = h.hexdigest()
        return self._digests[key]

    @staticmethod
    def _matches(pattern: str) -> list[Path]:
        path = Path(pattern)
        if not any(c in pattern for c in "*?["):
            return [path] if path.is_file() else []
        return sorted(p for p in path.parent.glob(path.name) if p.is_file())

    def key(self, step: Step) -> str:
        written = {p for pattern in step.outputs for p in self._matches(pattern)}
        named = [Path(a) for a in step.args if not a.startswith("-") and Path(a).is_file()]
        files = [p for p in named if p not in written] + [p for pat in step.inputs for p in self._matches(pat)]
        text = json.dumps({"args": list(step.args), "files": {str(p): self._digest(p) for p in files}})
        return hashlib.sha256(text.encode()).hexdigest()

    def outputs(self, step: Step) -> dict[str, str] | None:
        """Digest of every output, or None while one of the patterns matches nothing."""
        found = {pattern: self._matches(pattern) for pattern in step.outputs}
        if not all(found.values()):
            return None
        return {str(p): self._digest(p) for paths in found.values() for p in paths}

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return {}  # none yet, or unreadable: every command runs (and resumes by itself)

    def done(self, step: Step, key: str) -> bool:
        outputs = self.outputs(step)
        return outputs is not None and self._read().get(step.text) == {"key": key, "outputs": outputs}

    def record(self, step: Step, key: str) -> None:
        outputs = self.outputs(step)
        if outputs is None:
            raise SystemExit(f"stage command ended without its outputs {', '.join(step.outputs)}: apq {step.text}")
        write_json(self.path, {**self._read(), step.text: {"key": key, "outputs": outputs}})
