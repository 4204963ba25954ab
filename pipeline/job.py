"""`run_job`: the whole job, from config to output file, as a library call the CLI wraps.

Order matters for the promise "bad input: nothing sent, nothing written": every check (input
readable, columns present, ids unique, output writable, key present, journal ours) happens
before the first request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from pipeline import __version__
from pipeline.client import OpenRouterClient
from pipeline.config import KEY_ENV, JobConfig, read_api_key
from pipeline.dispatch import Dispatcher
from pipeline.errors import ConfigError, InputError, Interrupted, JobStopped
from pipeline.journal import Journal, JournalWriter
from pipeline.limits import Limits
from pipeline.progress import Progress
from pipeline.prompts import RequestBuilder
from pipeline.records import Row
from pipeline.retry import RetryPolicy
from pipeline.sink import ParquetSink, result_names
from pipeline.source import POSITION, Source, open_source

SIMULATOR_KEY = "sk-or-v1-simulator-local-0000000000000000"
SHUTDOWN_GRACE = 1.0  # seconds in-flight requests get to finish after Ctrl-C / SIGTERM


@dataclass
class JobReport:
    """What a finished (or stopped) run did, for the summary and the exit code."""

    output: Path
    total_rows: int
    skipped: int  # settled by an earlier run
    sent_ok: int = 0
    sent_failed: int = 0
    job_totals: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0
    retries: int = 0
    rate_limited: int = 0
    written: bool = False

    @property
    def exit_code(self) -> int:
        return 3 if self.job_totals.get("failed") else 0


def run_job(
    config: JobConfig,
    *,
    limit: int | None = None,
    restart: bool = False,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
) -> JobReport:
    """Run (or resume) the job; raise a `UserError`, `JobStopped` or `Interrupted` if it cannot finish."""
    started = time.monotonic()
    source = open_source(config.input.path, config.input.format)
    builder = RequestBuilder(config, source.columns)
    names = result_names(config.output.result_prefix, source.columns)
    output = Path(config.output.path)
    _check_output(output, source, config.output.journal_path)
    total = _validate_rows(source, config, limit)
    api_key = SIMULATOR_KEY if config.request.simulate else read_api_key(config)
    if api_key is None:
        raise ConfigError(
            f"no API key: set {KEY_ENV} in the environment (or request.key_file in the config); or try --simulate"
        )
    fingerprint = {"input": source.fingerprint(), "config": config.request_fingerprint()}
    with Journal.open(config.output.journal_path, fingerprint, restart=restart) as journal:
        skipped = journal.settled_count(below=total)
        report = JobReport(output=output, total_rows=total, skipped=skipped)
        asyncio.run(_dispatch(config, source, builder, journal, api_key, report, limit, quiet, log))
        report.job_totals = journal.totals(below=total)
        _write_output(output, names, source, journal, limit, config, report)
    report.wall_seconds = time.monotonic() - started
    return report


def _check_output(output: Path, source: Source, journal: Path) -> None:
    for path, key in ((output, "output.path (--output)"), (journal, "output.journal (--journal)")):
        folder = path.parent
        if not folder.is_dir():
            raise InputError(f"{key} {path}: folder {folder} does not exist; create it first")
        if not os.access(folder, os.W_OK):
            raise InputError(f"{key} {path}: folder {folder} is not writable")
    if any(output.resolve() == p.resolve() for p in source.paths):
        raise InputError(
            f"output.path (--output) {output} is the input file; choose another output path"
        )


def _validate_rows(source: Source, config: JobConfig, limit: int | None) -> int:
    """Count the rows (checking every one can be read) and refuse duplicate ids, before sending."""
    frame = source.lazy(limit)
    id_column = config.input.id_column
    aggregates = [pl.len().alias("rows")]
    if id_column:
        ids = pl.col(id_column)
        aggregates += [
            ids.is_duplicated().any().alias("dup"),
            ids.filter(ids.is_duplicated()).first().alias("example"),
            ids.null_count().alias("nulls"),
        ]
    try:
        stats = frame.select(aggregates).collect().row(0, named=True)
    except pl.exceptions.PolarsError as exc:
        raise InputError(
            f"input {source.pattern} cannot be read: {str(exc).strip().splitlines()[0]}"
        ) from None
    if stats["rows"] == 0:
        raise InputError(f"input {source.pattern} has no rows")
    if id_column and stats["dup"]:
        raise InputError(
            f"input.id_column (--id-column) '{id_column}' has duplicate values (e.g. {stats['example']!r}); ids must be unique"
        )
    if id_column and stats["nulls"]:
        raise InputError(
            f"input.id_column (--id-column) '{id_column}' is null in {stats['nulls']} row(s); ids must be present"
        )
    return int(stats["rows"])


async def _dispatch(
    config: JobConfig,
    source: Source,
    builder: RequestBuilder,
    journal: Journal,
    api_key: str,
    report: JobReport,
    limit: int | None,
    quiet: bool,
    log: Callable[[str], None] | None,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        base_url = config.request.base_url
        if config.request.simulate:
            from pipeline.simulator import serve

            base_url = (await stack.enter_async_context(serve())).base_url
        req = config.request
        client = await stack.enter_async_context(
            OpenRouterClient(
                base_url, api_key, concurrency=config.limits.concurrency, timeout=req.timeout,
                connect_timeout=req.connect_timeout, referer=req.referer, title=req.title,
            )
        )  # fmt: skip
        limits = Limits(config.limits.requests_per_second, config.limits.tpm)
        dispatcher = Dispatcher(
            client, limits, RetryPolicy.from_config(config.retry), config.limits.concurrency
        )
        writer = JournalWriter(journal)
        progress = Progress(report.total_rows, report.skipped, quiet=quiet)
        interrupted = _on_signals(dispatcher, progress)
        flusher = asyncio.create_task(writer.run())
        try:
            async for result in dispatcher.results(_pending(source, journal, builder, limit)):
                writer.add(result)
                progress.update(result, dispatcher.retries, limits.rate_limited)
        except JobStopped:
            progress.log("stopping: no more requests will be sent")
            raise
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            await writer.flush()
            progress.close()
            report.sent_ok, report.sent_failed = progress.tally.ok, progress.tally.failed
            report.retries, report.rate_limited = dispatcher.retries, limits.rate_limited
            _restore_signals()
        if interrupted:
            raise Interrupted(interrupted[0])


async def _pending(
    source: Source, journal: Journal, builder: RequestBuilder, limit: int | None
) -> AsyncIterator[Row]:
    """Rows still to do, in input order; rows settled by an earlier run are skipped."""
    for batch in source.batches(limit):
        positions = batch[POSITION]
        settled = journal.settled_positions(positions[0], positions[-1] + 1)
        if settled:
            batch = batch.filter(~pl.col(POSITION).is_in(list(settled)))
        for row in builder.rows(batch):
            yield row
        await asyncio.sleep(0)  # let the workers start on this batch before reading the next


def _on_signals(dispatcher: Dispatcher, progress: Progress) -> list[int]:
    """SIGINT/SIGTERM stop dispatching, give in-flight requests a moment, then abandon them."""
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def handle(signum: int) -> None:
        if received:
            return  # a second Ctrl-C while stopping changes nothing: the flush must finish
        received.append(signum)
        progress.log(
            f"received {signal.Signals(signum).name}: finishing in-flight requests, then saving the journal"
        )
        dispatcher.stop()
        loop.call_later(SHUTDOWN_GRACE, dispatcher.abort)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, handle, signum)
    return received


def _restore_signals() -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(signum)


def _write_output(
    output: Path,
    names: list[str],
    source: Source,
    journal: Journal,
    limit: int | None,
    config: JobConfig,
    report: JobReport,
) -> None:
    metadata = {
        "tool": "prompt-pipeline",
        "version": __version__,
        "config_fingerprint": config.fingerprint_hash(),
        "model": config.request.model,
        **report.job_totals,
    }
    sink = ParquetSink(output, names, metadata)
    try:
        for batch in source.batches(limit):
            positions = batch[POSITION].to_list()
            stored = journal.results_between(positions[0], positions[-1] + 1)
            missing = [p for p in positions if p not in stored]
            if missing:
                raise AssertionError(f"journal has no result for input rows {missing[:5]}")
            sink.write(batch.drop(POSITION).to_arrow(), [stored[p] for p in positions])
        sink.commit()
    except BaseException:
        sink.discard()
        raise
    report.written = True
