"""`pipeline export`: the rows a job has done so far, from its journal, as a file with the
output's schema, while the job is stopped (exit 4, 6, a crash) or still running.

The journal is read without the job's lock, in one read snapshot: a run going on meanwhile is
never held up, and the file is one consistent moment of the job. Every input row is in it, in
input order, with every input column and the output's result columns, typed as in the output:
a row done is as the output will have it (`ok`, or `error` with its reason); a row not done yet
has `status = "pending"` and every other result column null. A row whose input changed since it
was done (an incremental job) is pending too: its answer is to another request. The metadata
holds the job's totals, as the output's does, and under `partial` the counts of this file.

The file is written aside and renamed into place, like the output, and is never one of the
job's own files (its output, journal, lock files or input).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from pipeline import __version__
from pipeline.config import JobConfig
from pipeline.errors import InputError, JournalError
from pipeline.identity import match
from pipeline.journal import JOURNAL_FORMAT, JOURNAL_SUFFIXES, Journal
from pipeline.lock import lock_holder, lock_path
from pipeline.output import ParquetSink
from pipeline.plan import OTHER_FORMATS, JobPlan, file_identity, input_files, plan_job
from pipeline.prompts import RequestBuilder
from pipeline.records import ERROR, OK, RESULT_FIELDS, Row
from pipeline.settings import describe_changes
from pipeline.source import POSITION

PENDING = "pending"  # the status of a row not done yet; never in a finished job's output
OPTION = "--output"
_FIELD = {name: index for index, name in enumerate(RESULT_FIELDS)}


@dataclass(frozen=True)
class Export:
    """What an export wrote."""

    path: Path
    rows: int
    ok: int
    failed: int
    pending: int
    running: str | None  # the pid of the run holding the job's lock, if one does

    def summary(self) -> str:
        running = f"; a run (pid {self.running}) is still going" if self.running else ""
        return (
            f"exported {self.rows:,} rows to {self.path}: {self.ok:,} ok, {self.failed:,} failed, "
            f"{self.pending:,} pending{running}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "done": self.ok + self.failed, "ok": self.ok,
            "failed": self.failed, "pending": self.pending, "running": self.running is not None,
        }  # fmt: skip


def default_path(output: Path) -> Path:
    """`data/out.parquet` -> `data/out.partial.parquet`: beside the output, never the output."""
    return output.with_name(f"{output.stem if output.suffix else output.name}.partial.parquet")


def export(config: JobConfig, target: Path | None = None, limit: int | None = None) -> Export:
    """Write the rows done so far to `target` (default: `default_path` of the job's output)."""
    target = target or default_path(config.output.local_path)
    check_target(config, target)
    path = config.output.journal_path
    journal = Journal.read_only(path)
    if journal is None:
        raise JournalError(
            f"no journal at {path}: the job has not done any rows yet, so there is nothing to export"
        )
    with journal, _readable(path):
        plan = plan_job(config, limit)
        _check_same_job(journal, plan)
        running = lock_holder(path)
        sink = ParquetSink(target, plan.layout.names)
        try:
            with journal.snapshot():
                counts = _write(plan, journal, sink)
                totals = journal.totals(below=plan.slots)
            result = Export(target, plan.slots, *counts, running=running)
            # The job's totals, as the output's metadata has them, and this file's own counts.
            sink.commit(
                {
                    "tool": "prompt-pipeline", "version": __version__,
                    "config_fingerprint": config.fingerprint_hash(), "model": config.request.model,
                    **totals.as_dict(), "partial": {**result.as_dict(), "exported_at": _now()},
                }
            )  # fmt: skip
        finally:
            sink.discard()  # the unfinished file, if it did not get into place
    return result


def check_target(config: JobConfig, target: Path) -> None:
    """The export is a Parquet file of its own, in a folder that exists: not the job's output,
    journal, lock files or input (whatever the spelling), which it would overwrite."""
    output, journal = config.output.local_path, config.output.journal_path
    own = {
        "the job's output": [output, lock_path(output)],
        "the job's journal": [*(Path(f"{journal}{s}") for s in JOURNAL_SUFFIXES), lock_path(journal)],
        "an input file of the job": list(input_files(config.input.path)),
    }  # fmt: skip
    wanted = file_identity(target)
    for what, paths in own.items():
        if any(file_identity(path) == wanted for path in paths):
            raise InputError(
                f"{OPTION} {target} is {what}; choose another path, e.g. {default_path(output)}"
            )
    if target.suffix.lower() in OTHER_FORMATS:
        raise InputError(
            f"{OPTION} {target}: the export is written as Parquet, not {target.suffix}; name it .parquet"
        )
    if target.is_dir():
        raise InputError(f"{OPTION} {target} is a folder; name the file to write in it")
    if not target.parent.is_dir():
        raise InputError(
            f"{OPTION} {target}: folder {target.parent} does not exist; create it first"
        )


def _check_same_job(journal: Journal, plan: JobPlan) -> None:
    """The journal was written for this config and input, as a run would check; else its rows
    would be shown beside rows they do not answer."""
    meta = journal.meta()
    if meta.get("format") != JOURNAL_FORMAT:
        raise JournalError(
            f"journal {journal.path} was written by prompt-pipeline {meta.get('version', '?')}, whose "
            "journal layout this version cannot read; export it with that version"
        )
    changes = describe_changes(
        meta, plan.fingerprint, compare_input=not plan.config.input.incremental
    )
    if changes:
        raise JournalError(
            f"journal {journal.path} belongs to a different job: {'; '.join(changes)}. "
            "Export with the config and input the job ran with"
        )


def _write(plan: JobPlan, journal: Journal, sink: ParquetSink) -> tuple[int, int, int]:
    """Write every input row with its result or as pending; the counts (ok, failed, pending)."""
    layout, slots = plan.layout, plan.layout.slots
    incremental = plan.config.input.incremental
    builder = plan.builder.seeded(journal.hash_seed)
    moved = _moved(plan, builder, journal) if incremental else {}
    ok = failed = pending = 0
    for start, inputs, expected in _groups(plan, builder):
        low, high = slots.first(start), slots.first(start + inputs.num_rows)
        stored = {row[0]: row for row in journal.results_between(low, high)}
        here = {moved[slot]: slot for slot in range(low, high) if slot in moved}
        for answer in journal.results_at(list(here)):  # a run moves these to these slots
            stored[here[answer[0]]] = (here[answer[0]], *answer[1:])
        results = []
        for slot in range(low, high):
            row = stored.get(slot)
            if row is None or not _answers(row, expected[slot], incremental):
                row = _pending(slot, expected[slot][0])
            results.append(row)
        statuses = [row[_FIELD["status"]] for row in results]
        ok, failed = ok + statuses.count(OK), failed + statuses.count(ERROR)
        pending += statuses.count(PENDING)
        if slots.per_row > 1:  # each input row once per variant
            inputs = inputs.take([i for i in range(inputs.num_rows) for _ in range(slots.per_row)])
        sink.write(inputs, layout.leading_arrays(inputs.num_rows, results), results)
    return ok, failed, pending


Expected = dict[int, tuple[str, set[str | None]]]  # slot -> (key, request hashes it may have)


def _moved(plan: JobPlan, builder: RequestBuilder, journal: Journal) -> dict[int, int]:
    """Today's slots whose answer the journal holds at another slot (a row that moved since
    the last run, which moves it as it starts): slot -> where its answer is."""
    found = match(plan, builder, journal)
    if found is None:
        return {}
    matched = found.matched.filter(pl.col("position") != pl.col("slot"))
    return dict(matched.select("slot", "position").rows())


def _groups(plan: JobPlan, builder: RequestBuilder) -> Iterator[tuple[int, pa.Table, Expected]]:
    """The input a row group at a time, with what each slot's answer must have been for: its
    row's id and request (either way a run may send it when it asks for `n` samples, or
    marks the system prompt for caching: neither is known here, without the listing)."""
    builders = [builder]
    models = frozenset(plan.config.request.models or (plan.config.request.model,))
    if plan.config.request.n > 1:
        native = copy.copy(builder)
        native.native_n = models
        builders.append(native)
    if plan.config.prompt.cache_prefix == "auto" and builder.system_prompt:
        for unmarked in list(builders):
            marked = copy.copy(unmarked)
            marked.mark_every_model = True
            builders.append(marked)
    for start, inputs in plan.source.arrow_batches(plan.limit, size=plan.layout.group_rows):
        frame = pl.from_arrow(inputs)
        assert isinstance(frame, pl.DataFrame)
        frame = frame.with_row_index(POSITION, offset=start)
        expected: Expected = {}
        for builder in builders:
            for row in builder.rows(frame):
                for slot in range(row.slot, row.slot + row.samples):
                    _, hashes = expected.setdefault(slot, (row.key, set()))
                    hashes.add(_hash(row))
        yield start, inputs, expected


def _hash(row: Row) -> str | None:
    return row.request_hash if row.body is not None else None


def _answers(
    stored: tuple[Any, ...], expected: tuple[str, set[str | None]], incremental: bool
) -> bool:
    """Whether a journaled result is this row's: done for its id and (when the input may have
    changed, in an incremental job) for the request it asks now. A run matches the journal to
    today's input as it starts (`identity.realign`); until then a row moved since is pending."""
    key, hashes = expected
    if stored[_FIELD["key"]] != key:
        return False
    request_hash = stored[_FIELD["request_hash"]]
    return not incremental or request_hash is None or None in hashes or request_hash in hashes


def _pending(slot: int, key: str) -> tuple[Any, ...]:
    values: list[Any] = [None] * len(RESULT_FIELDS)
    values[_FIELD["position"]], values[_FIELD["key"]] = slot, key
    values[_FIELD["status"]], values[_FIELD["retry_on_resume"]] = PENDING, False
    return tuple(values)


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """A file that is not a journal, or a damaged one, is named, never a traceback."""
    try:
        yield
    except sqlite3.Error as exc:
        raise JournalError(f"journal {path} cannot be read: {exc}") from None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
