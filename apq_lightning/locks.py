"""One process per run directory: an advisory lock that names its holder and dies with it.

Why: two ``apq predict`` on one output directory each read the same finished indices and then
both measured every missing one (twice the compute, every sample stored twice). Whatever writes
a run directory takes :func:`run_lock` on it first; a second launch is refused with one line
naming the holder (pid, host, command, start time).

The lock is ``fcntl.flock`` on a small file in the directory (``.<what>.lock``): the kernel drops
it when the holding process ends, however it ends (``kill -9`` included), so a lock left behind
by a killed run never blocks the next one. The file's text only names the holder for the
refusal; it is emptied on release and never deleted (deleting a lock file races with a process
that has just opened it). Locks of different ``what`` in one directory are independent, so a
driver may hold ``pipeline`` while the command it runs takes ``collection``. Linux/macOS only;
on network file systems ``flock`` may not exclude other hosts.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

__all__ = ["RunLock", "RunLockedError", "run_lock"]


class RunLockedError(ValueError):
    """The directory is locked by another process (a ValueError: the CLI prints it as one line)."""


class RunLock:
    """An exclusive, non-blocking lock on ``directory`` for one kind of job (``what``).

    ``acquire`` (idempotent) raises :class:`RunLockedError` naming the holder; ``release``
    (idempotent) frees it. Also a context manager. The lock belongs to this object's open file:
    a second ``RunLock`` on the same directory is refused even in the same process.
    """

    def __init__(self, directory: str | os.PathLike[str], what: str) -> None:
        self._fd: int | None = None
        if not isinstance(what, str) or not re.fullmatch(r"[a-z][a-z0-9_-]*", what):
            raise ValueError(f"lock name {what!r}: must be a lower-case word (letters, digits, '-', '_')")
        self.directory = Path(directory)
        self.what = what
        self.path = self.directory / f".{what}.lock"

    def __repr__(self) -> str:
        return f"RunLock({str(self.directory)!r}, {self.what!r}, held={self.held})"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.directory} is in use: {self.what} by {holder}; wait for it to end, or use another "
                f"directory (lock file {self.path})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        _write_holder(fd, self.what)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # a lock file left behind names nobody
        finally:
            os.close(fd)  # closing the descriptor drops the flock

    def __del__(self) -> None:  # a lock object dropped without release() (an error between the two)
        self.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


@contextmanager
def run_lock(directory: str | os.PathLike[str], what: str) -> Iterator[RunLock]:
    """``with run_lock(run_dir, "collection"):`` -- hold the directory for one job (see the module)."""
    lock = RunLock(directory, what).acquire()
    try:
        yield lock
    finally:
        lock.release()


def _write_holder(fd: int, what: str) -> None:
    info = {
        "what": what,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else "",
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _read_holder(fd: int) -> str:
    """``pid 4242 on host gpu1 since 2025-01-01 12:00:00 (apq predict --config ...)``."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        text = f"pid {int(info['pid'])} on host {info['host']} since {info['since']}"
        return text + (f" ({info['command']})" if info.get("command") else "")
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its name yet
        return "another process"
