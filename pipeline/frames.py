"""`run_frame`: a job over a DataFrame in hand (a notebook's), its output returned as a frame.

It is `run_job` with every promise of the CLI: the frame is written once as the job's Parquet
input, and the job's folder (its journal and output) is keyed by the frame's content and what
the settings ask, so running the same cell again resumes or, when it is done, sends nothing.
The job runs in a thread of its own: a notebook's event loop is already running in the main
thread, and the kernel's interrupt (a KeyboardInterrupt there) stops the run as Ctrl-C stops
the CLI's, saving the journal for the next call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from pipeline.config import SECTIONS, JobConfig, check_keys, load
from pipeline.errors import ConfigError, Interrupted
from pipeline.job import JobReport, RunOptions, StopSwitch, run_job
from pipeline.places import cache_dir

HASHED_ROWS = 65_536  # rows hashed at a time: bounded memory, the same bytes however chunked
CALLER = "run_frame"


def run_frame(
    frame: Any,
    *,
    template: str | None = None,
    config: str | os.PathLike[str] | None = None,
    journal: str | os.PathLike[str] | None = None,
    restart: bool = False,
    quiet: bool = False,
    limit: int | None = None,
    **settings: Mapping[str, Any],
) -> pl.DataFrame:
    """Run the job over `frame`'s rows and return its output: the input columns and the answer
    columns the Parquet output has, in input order.

    `frame`: a polars DataFrame or LazyFrame, or a pandas DataFrame. `template`: the prompt
    (`prompt.template`). Other settings are the config file's sections, by name, holding its
    keys: `request={"model": "...", "labels": [...]}, limits={"concurrency": 8}`, validated as
    the file is; `config` names a TOML file to start from. The job's journal is kept under the
    cache folder unless `journal` (or `output.path`, then `<output>.journal`) says where."""
    table = as_polars(frame)
    overrides = _overrides(settings, template)
    digest = content_digest(table)
    input_file = cache_dir() / "frames" / f"{digest[:32]}.parquet"
    overrides["input.path"], overrides["input.format"] = str(input_file), "parquet"
    overrides["cluster.local_inputs"] = True  # the frame is this process's: so is its file
    if journal is not None:
        overrides["output.journal"] = os.fspath(journal)
    if "output.path" not in overrides:
        probe = load(config, {**overrides, "output.path": str(input_file) + ".out"})
        folder = cache_dir() / "jobs" / job_key(digest, probe)
        folder.mkdir(parents=True, exist_ok=True)
        overrides["output.path"] = str(folder / "output.parquet")
    job = load(config, overrides)
    _write_once(table, input_file)
    report = run_in_thread(job, RunOptions(limit=limit, restart=restart, quiet=quiet,
                                           progress_bar=None if quiet else True))  # fmt: skip
    return pl.read_parquet(report.output)


def as_polars(frame: Any) -> pl.DataFrame:
    """A polars DataFrame of `frame` (a LazyFrame is collected; pandas goes through polars)."""
    if isinstance(frame, pl.DataFrame):
        return frame
    if isinstance(frame, pl.LazyFrame):
        return frame.collect()
    if type(frame).__module__.split(".")[0] == "pandas":
        return pl.from_pandas(frame)
    raise ConfigError(
        f"{CALLER} takes a polars DataFrame or LazyFrame, or a pandas DataFrame, not "
        f"{type(frame).__name__}; read a file with pipeline.run_job instead"
    )


def _overrides(settings: Mapping[str, Mapping[str, Any]], template: str | None) -> dict[str, Any]:
    """The settings by key (`"request.model"`), refused as a config file's would be."""
    for section, values in settings.items():
        if section in SECTIONS and not isinstance(values, Mapping):
            raise ConfigError(
                f"{CALLER}: {section}= takes the [{section}] section's keys as a dict, "
                f"e.g. {section}={{...}}; got {type(values).__name__}"
            )
    check_keys(settings, CALLER)
    overrides = {f"{s}.{k}": v for s, values in settings.items() for k, v in values.items()}
    for key in ("input.path", "input.format"):
        if key in overrides:
            raise ConfigError(f"{CALLER} reads its rows from the frame; leave {key} out")
    if template is not None:
        overrides["prompt.template"] = template
    return overrides


def content_digest(table: pl.DataFrame) -> str:
    """sha256 of the frame's schema and values as Arrow IPC, in slices of a fixed size: the
    same rows give the same digest however polars chunked them."""
    sink = _Hasher()
    arrow = table.to_arrow()
    with pa.ipc.new_stream(sink, arrow.schema) as stream:
        for start in range(0, arrow.num_rows, HASHED_ROWS):
            piece = arrow.slice(start, HASHED_ROWS).combine_chunks()
            for batch in piece.to_batches():
                stream.write_batch(batch)
    return sink.hash.hexdigest()


class _Hasher:
    """A write-only file that hashes what is written to it."""

    closed = False

    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return len(data)

    def flush(self) -> None:
        pass


def job_key(digest: str, config: JobConfig) -> str:
    """What makes a frame's job one job: its rows, what the requests ask, how rows are read."""
    reading = {k: v for k, v in asdict(config.input).items() if k not in ("path", "format")}
    fingerprint = {"rows": digest, "asks": config.fingerprint_hash(), "input": reading}
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:24]


def _write_once(table: pl.DataFrame, path: Path) -> None:
    """The frame as the job's input file, written once: a resume reads the very bytes the
    journal was made for (a newer polars may write the same rows differently)."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}")
    table.write_parquet(partial)
    os.replace(partial, path)


def run_in_thread(config: JobConfig, options: RunOptions) -> JobReport:
    """`run_job` in a thread of its own, so that it also runs where an event loop is already
    running (Jupyter's); a KeyboardInterrupt while it runs stops it as SIGINT would, and once
    the journal is saved raises `Interrupted`, which says how to resume."""
    switch = StopSwitch()
    options = dataclasses.replace(options, stop_switch=switch)
    outcome: dict[str, Any] = {}

    finished = threading.Event()

    def work() -> None:
        try:
            outcome["report"] = run_job(config, options)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=work, name="pipeline-job", daemon=True).start()
    # An Event, not Thread.join: a KeyboardInterrupt inside join can leave the thread looking
    # finished while it still runs.
    while not finished.is_set():
        try:
            finished.wait(0.1)
        except KeyboardInterrupt:  # the kernel's interrupt: stop, save, then say so
            switch.pull()
    error = outcome.get("error")
    if isinstance(error, Interrupted):
        raise Interrupted(
            error.exit_code - 128,
            f"interrupted: the answers so far are saved in {config.output.journal_path}; "
            "run the same call again to go on from there",
        ) from None
    if error is not None:
        raise error
    report: JobReport = outcome["report"]
    return report
