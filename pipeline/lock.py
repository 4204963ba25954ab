"""One run at a time per job, and one job at a time per output: an exclusive `flock` on
`<journal>.lock` and one on `<output>.lock`, held for the life of a run and taken before
anything else, so a second run exits at once touching nothing; and who holds the job's, for
`pipeline status`.

A lock file exists only while a run holds it (or after a crash): the holder deletes it on the
way out, while still holding the flock. A taker may have opened the file just before that
deletion; so after its flock it checks the path still names the file it locked, and starts
again if not. Without that re-check two runs could each hold a lock on a different file."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO, Any

from pipeline.errors import JournalError, Locked


def lock_path(path: Path) -> Path:
    """The lock file of a journal or an output."""
    return Path(f"{path}.lock")


def output_key(output: Path) -> Path:
    """What an output's lock is keyed on: its real path, so two spellings of one file meet."""
    return Path(os.path.realpath(output))


def lock_holder(journal: Path) -> str | None:
    """The pid of the run holding this job's lock, or None when no run does (checked by
    trying the lock, never by trusting the pid file)."""
    try:
        handle = lock_path(journal).open("r")
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "unknown"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


class FileLock:
    """An exclusive `flock` on `<path>.lock` while in `with`; `busy` is the message (with
    `{pid}`) of the `Locked` error when another run holds it."""

    def __init__(self, path: Path, busy: str) -> None:
        self.path = lock_path(path)
        self.busy = busy
        self._file: IO[str] | None = None

    def __enter__(self) -> FileLock:
        while self._file is None:
            try:
                handle = self.path.open("a+")
            except OSError as exc:
                raise JournalError(
                    f"cannot create the lock file {self.path}: {exc.strerror}"
                ) from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise Locked(self.busy.replace("{pid}", holder)) from None
            if not _names(self.path, handle):  # its holder deleted it as we opened it
                handle.close()
                continue
            with contextlib.suppress(OSError):  # the pid is for people; a full disk may refuse it
                handle.seek(0)
                handle.truncate()
                handle.write(str(os.getpid()))
                handle.flush()
            self._file = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            if _names(self.path, self._file):  # deleted while still locked: see the module's doc
                with contextlib.suppress(OSError):
                    self.path.unlink()
            self._file.close()
            self._file = None


def _names(path: Path, handle: Any) -> bool:
    """Whether `path` still names the open file `handle`."""
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def job_locks(journal: Path, output: Path) -> contextlib.ExitStack:
    """The locks of a run: its job's (the journal's), then its output's, keyed on the output's
    real path so that two spellings of one file meet."""
    stack = contextlib.ExitStack()
    with stack:
        stack.enter_context(
            FileLock(journal, f"another run is using journal {journal} (pid {{pid}}); this run changed nothing")
        )  # fmt: skip
        stack.enter_context(
            FileLock(
                output_key(output),
                f"another job (pid {{pid}}) is writing output {output}; this run changed nothing. "
                "Give each job its own output path",
            )
        )
        return stack.pop_all()
