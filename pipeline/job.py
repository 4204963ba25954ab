"""`run_job`: the whole job, from config to output file, as a library call the CLI wraps (the
run itself, what sends, is in `run`).

Order matters for the promise "bad input: nothing sent, nothing written": every check (folders,
the lock, input, columns, ids, output path, key, models, budget, journal) happens before the
first completion request.
"""

from __future__ import annotations

import asyncio
import importlib
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import JobConfig
from pipeline.journal import Journal
from pipeline.journal_file import precheck
from pipeline.keys import api_key
from pipeline.lock import job_locks
from pipeline.plan import check_folders, ensure_open_files, plan_job
from pipeline.progress import LogSettings
from pipeline.records import Totals
from pipeline.redo import Redo

SHUTDOWN_GRACE = 1.0  # seconds in-flight requests get to finish after Ctrl-C / SIGTERM


@dataclass
class JobReport:
    """What a finished (or stopped) run did, for the summary and the exit code."""

    output: Path
    total_rows: int
    skipped: int  # settled by an earlier run
    job_totals: Totals = field(default_factory=Totals)
    wall_seconds: float = 0.0
    retries: int = 0
    write_seconds: float = 0.0  # spent writing the output at the end (the rest ran alongside)
    write_cpu_seconds: float = 0.0  # spent writing the output, in all
    changed: int = 0  # rows done earlier whose input changed (incremental jobs)
    departed: int = 0  # rows done earlier that this run found gone from the input
    warnings: list[str] = field(default_factory=list)
    uploaded_to: str | None = None  # the object-store URL the output was uploaded to

    @property
    def exit_code(self) -> int:
        return 3 if self.job_totals.failed else 0


@dataclass(frozen=True)
class RunOptions:
    """How one run behaves, beside what the job is."""

    limit: int | None = None
    restart: bool = False
    quiet: bool = False
    write_output: bool = True
    logs: LogSettings = field(default_factory=LogSettings)
    stream: Any = None  # where progress and log events go (default: stderr)
    started: float = field(default_factory=time.monotonic)  # --max-runtime counts from here
    redo: Redo | None = None  # rows done before to send again under this run's settings
    # Stops the run from another thread as SIGINT would (signals reach only the main thread).
    stop_switch: StopSwitch | None = None
    progress_bar: bool | None = None  # None: on a terminal; True: also elsewhere (a notebook)


class StopSwitch:
    """Stops a run from another thread, as a signal stops one in the main thread: a notebook
    runs the job in a thread of its own, and its kernel interrupt reaches the waiting one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop: Callable[[int], object] | None = None
        self.pulled: int | None = None  # the signal it stands for, once pulled

    def pull(self, signum: int = signal.SIGINT) -> None:
        with self._lock:
            self.pulled = signum
            if self._stop is not None:
                self._stop(signum)

    def attach(self, stop: Callable[[int], object] | None) -> None:
        """What pulling it does (None: nothing, between runs); pulled before, it stops at once."""
        with self._lock:
            self._stop = stop
            if stop is not None and self.pulled is not None:
                stop(self.pulled)


@dataclass(frozen=True)
class Stop:
    """Why a run stopped taking rows before its end."""

    reason: str  # "SIGINT", "SIGTERM" or "max_runtime"
    message: str
    signum: int | None = None


def run_job(config: JobConfig, options: RunOptions | None = None) -> JobReport:
    """Run (or resume) the job; raise a `UserError`, `JobStopped`, `OutOfTime` or `Interrupted`
    if it cannot finish."""
    options = options or RunOptions()
    check_folders(config)
    with job_locks(config.output.journal_path, config.output.local_path):
        ensure_open_files(config.limits.concurrency)
        # Beside the input's pass (which leaves the GIL to polars): the journal's integrity
        # check, and loading what sends (aiohttp and the rest, a third of a second).
        sending = threading.Thread(
            target=importlib.import_module, args=("pipeline.run",), daemon=True
        )
        sending.start()
        settled = None
        if not options.restart:
            precheck(config.output.journal_path)
            settled = settled_blocks(config.output.journal_path)
        plan = plan_job(config, options.limit, settled)
        key = api_key(config)
        sending.join()
        from pipeline.run import run_plan

        report = asyncio.run(run_plan(plan, key, options))
    report.wall_seconds = time.monotonic() - options.started
    return report


def settled_blocks(path: Path) -> frozenset[int] | None:
    """The blocks a resume's journal has settled, for the plan to keep the rest of the input
    (None: no journal, or one this version has not opened yet)."""
    journal = Journal.read_only(path)
    if journal is None:
        return None
    with journal:
        try:
            return journal.settled_blocks()
        except sqlite3.Error:  # damaged, or older: opening it says so, or brings it up to date
            return None
