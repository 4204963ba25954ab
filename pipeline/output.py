"""The output file: each input row (once per variant) with its leading columns and the result
the journal holds for it, a row group at a time, in input order.

A group is written while the job still runs, as soon as every slot in it is final, so that when
the last answer arrives only the last group is left to write (on a million rows, ~14 s less
after the last answer). A slot is final once the row feed has passed it and, if this run sends
it, its result is committed: a slot settled by an earlier run may still be sent again (a failed
row retried, a changed row reprocessed), so "in the journal" is not enough.

The results this run commits are kept, a few groups ahead, until their group is written: reading
them back from the journal cost about a third of the writing. A group with any slot not kept
(settled by an earlier run, or far ahead of the writing) is read from the journal instead.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pyarrow as pa

from pipeline.journal import Journal, every
from pipeline.records import RESULT_COLUMNS, RESULT_FIELDS, Row
from pipeline.sink import ParquetSink

if TYPE_CHECKING:
    from pipeline.config import JobConfig
    from pipeline.job import Prepared
    from pipeline.prompts import RequestBuilder

WRITE_AHEAD_INTERVAL = 0.2  # seconds between looks for a group that has become final
# Committed results are kept for this many groups past the last one written: the memory for a
# row held up by retries while later rows keep arriving stays bounded.
GROUPS_KEPT = 4
POSITION, PARSED = RESULT_FIELDS.index("position"), RESULT_FIELDS.index("parsed")


class FinalSlots:
    """Which slots can no longer change in this run: all below `upto()`. Told by the row feed
    (in its thread) what it hands out, and by the journal writer (in its thread) what it
    committed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._passed = 0  # every slot below this was handed out, or needs no sending
        self._open: set[int] = set()  # handed out, result not committed yet

    def fed(self, rows: list[Row], passed: int) -> None:
        """`rows` are to be sent; with them, the feed has passed every slot below `passed`."""
        with self._lock:
            self._open.update(s for row in rows for s in range(row.slot, row.slot + row.samples))
            self._passed = passed

    def committed(self, stored: Iterable[tuple[Any, ...]]) -> None:
        """`stored`: results as the journal committed them (`RESULT_FIELDS` tuples)."""
        with self._lock:
            self._open.difference_update(row[POSITION] for row in stored)

    def upto(self) -> int:
        with self._lock:
            return min(self._open, default=self._passed)


class OutputWriter:
    """Writes the output aside, group by group, and moves it into place on `finish()`."""

    def __init__(self, job: Prepared, journal: Journal, path: Path) -> None:
        self.job = job
        self.journal = journal
        self.sink = ParquetSink(path, job.names)
        self.cpu_seconds = 0.0  # spent writing, in all (CPU time of the writing thread)
        self.final_seconds = 0.0  # spent in `finish()`: what writing adds after the last answer
        group_rows = max(job.config.output.row_group_size // job.variants, 1)
        self._groups = job.source.arrow_batches(job.limit, size=group_rows)
        self._next: tuple[int, pa.Table] | None = None  # the group to write next, once final
        self._failed: Exception | None = None
        self._kept: dict[int, tuple[Any, ...]] = {}  # slot -> committed result, not yet written
        self._keep_below = GROUPS_KEPT * group_rows * job.variants  # slots kept: those below this
        self._reach = self._keep_below  # how far past the last group written slots are kept
        self._lock = threading.Lock()  # `committed` runs in the journal writer's thread

    def committed(self, stored: Iterable[tuple[Any, ...]]) -> None:
        """Keep the results of a journal commit (`RESULT_FIELDS` tuples), those near enough, to
        write them from memory."""
        with self._lock:
            for row in stored:
                if row[POSITION] < self._keep_below:
                    self._kept[row[POSITION]] = row

    async def write_ahead(self, final: FinalSlots, stopped: asyncio.Event) -> None:
        """Until `stopped`, write (in a thread) each group as soon as it is final. A failure
        (a full disk) stops only this: the job goes on, and `finish()` raises it."""
        written_upto = 0
        async for _ in every(WRITE_AHEAD_INTERVAL, stopped):
            upto = final.upto()
            if upto > written_upto:
                try:
                    await asyncio.to_thread(self.write_until, upto)
                except Exception as exc:
                    self._failed = exc
                    break
                written_upto = upto

    def write_until(self, final: int) -> None:
        """Write each group, in order, whose slots all lie below `final`."""
        variants = self.job.variants
        while True:
            if self._next is None:
                self._next = next(self._groups, None)
                if self._next is None:
                    return
            start, inputs = self._next
            if (start + inputs.num_rows) * variants > final:
                return
            self._write(start, inputs)
            self._next = None

    def finish(self, metadata: dict[str, Any]) -> None:
        """Write what is left, then the job's `metadata`, and move the file into place."""
        if self._failed is not None:
            raise self._failed
        started = time.monotonic()
        self.write_until(self.job.slots)
        cpu = time.thread_time()
        self.sink.commit(metadata)
        self.cpu_seconds += time.thread_time() - cpu
        self.final_seconds = time.monotonic() - started

    def discard(self) -> None:
        self.sink.discard()

    def _write(self, start: int, inputs: pa.Table) -> None:
        cpu = time.thread_time()  # wall time in a thread would count waits for the GIL
        variants = self.job.variants
        low, high = start * variants, (start + inputs.num_rows) * variants
        with self._lock:
            kept = [self._kept.pop(slot, None) for slot in range(low, high)]
            self._keep_below = high + self._reach
        stored = cast(list[tuple[Any, ...]], kept)
        if None in kept:  # some were settled by an earlier run, or not kept
            stored = self.journal.results_between(low, high)
            if [row[0] for row in stored] != list(range(low, high)):
                raise AssertionError(
                    f"the journal lacks results for some of input rows {start}..{start + inputs.num_rows - 1}"
                )
        if variants > 1:  # each input row once per variant
            inputs = inputs.take([i for i in range(inputs.num_rows) for _ in range(variants)])
        self.sink.write(inputs, leading_arrays(self.job, inputs.num_rows, stored), stored)
        self.cpu_seconds += time.thread_time() - cpu


def leading_columns(config: JobConfig, builder: RequestBuilder, inputs: list[str]) -> list[str]:
    """The output columns between the input's and the results: the requested `model` of a
    fan-out over models, `sample_index` with n > 1, then `label` or one per schema property
    (`answer_<name>` when the name is taken)."""
    names = (["model"] if config.request.models else []) + (
        ["sample_index"] if config.request.n > 1 else []
    )
    taken = {*inputs, *RESULT_COLUMNS, *names}
    if builder.answers is not None:
        names += [
            f"answer_{name}" if name in taken else name for name in builder.answers.column_types()
        ]
    return names


def leading_arrays(job: Prepared, rows: int, stored: list[tuple[Any, ...]]) -> list[pa.Array]:
    """The values of `leading_columns` for `rows` output rows (whole input rows' variants)."""
    request = job.config.request
    variants = job.builder.variants
    arrays = []
    if request.models:
        arrays.append(pa.array([model for model, _ in variants] * (rows // len(variants))))
    if request.n > 1:
        samples = [sample for _, sample in variants] * (rows // len(variants))
        arrays.append(pa.array(samples, type=pa.int32()))
    if job.builder.answers is not None:
        arrays += job.builder.answers.columns([row[PARSED] for row in stored])
    return arrays
