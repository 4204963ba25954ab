"""One run at a time per job: an exclusive `flock` on `<journal>.lock`, held for the life of a
run and taken before anything else, so a second run exits at once touching nothing; and who
holds it, for `pipeline status`."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from pipeline.errors import JournalError, Locked


def lock_holder(journal: Path) -> str | None:
    """The pid of the run holding this job's lock, or None when no run does (checked by
    trying the lock, never by trusting the pid file)."""
    path = Path(f"{journal}.lock")
    try:
        handle = path.open("r")
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "unknown"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


class JobLock:
    """An exclusive `flock` on `<journal>.lock` for the life of a run. Taken before anything else,
    so a second run exits at once, touching neither the input nor the journal."""

    def __init__(self, journal: Path) -> None:
        self.path = Path(f"{journal}.lock")
        self.journal = journal
        self._file: Any = None

    def __enter__(self) -> JobLock:
        try:
            handle = self.path.open("a+")
        except OSError as exc:
            raise JournalError(f"cannot create the lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise Locked(
                f"another run is using journal {self.journal} (pid {holder}); this run changed nothing"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
