"""The output file: each input row (once per variant) with its leading columns and the result
the journal holds for it, a row group at a time, in input order.

Every input column comes unchanged and in input order, then the columns of a fan-out and of a
structured answer (`model`, `sample_index`, `label` or one per schema property), then the
result columns, all with explicit types. The file is written beside the target and renamed
into place, so it is either complete or absent; the job's totals go into its key-value
metadata under `pipeline` at the end, once they are known.

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
import contextlib
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.answer_parts import embedding_array
from pipeline.answers import AnswerSpec
from pipeline.errors import DiskFull, InputError, JobStopped, disk_full_message, is_disk_full
from pipeline.journal import Journal
from pipeline.options import describe
from pipeline.records import RESULT_COLUMNS, RESULT_FIELDS, RESULT_TYPES, Row, Slots
from pipeline.writer import every

if TYPE_CHECKING:
    from pipeline.config import JobConfig

WRITE_AHEAD_INTERVAL = 0.2  # seconds between looks for a group that has become final
# Committed results are kept for this many groups past the last one written: the memory for a
# row held up by retries while later rows keep arriving stays bounded.
GROUPS_KEPT = 4
POSITION, PARSED = RESULT_FIELDS.index("position"), RESULT_FIELDS.index("parsed")
STALE = RESULT_FIELDS.index("stale")
# The answer's parts a job may ask to see (`answer_parts`), each a column of its own type.
PARTS = {
    "label_confidence": (RESULT_FIELDS.index("label_confidence"), pa.float64()),
    "tool_calls": (RESULT_FIELDS.index("tool_calls"), pa.string()),
    "reasoning": (RESULT_FIELDS.index("reasoning"), pa.string()),
    "embedding": (RESULT_FIELDS.index("embedding"), pa.list_(pa.float32())),  # or fixed-size
}
Groups = Iterator[tuple[int, pa.Table]]  # input rows as Arrow, with each group's first position


@dataclass(frozen=True)
class OutputLayout:
    """The columns the output adds after the input's, and how input rows become output rows."""

    names: list[str]  # of the leading and result columns, prefix included
    variants: list[tuple[str | None, int]]  # (model asked, sample index) of each output row
    fan_out_models: bool  # a `model` column: the job asks several models
    samples: int  # a `sample_index` column when above one
    answers: AnswerSpec | None  # `label` or one column per schema property
    row_group_size: int  # output rows per Parquet row group
    stale: bool = False  # a `stale` column: an incremental job keeps changed rows' answers
    parts: tuple[str, ...] = ()  # of `PARTS`, in that order
    dimensions: int | None = None  # of an embedding, when the job says

    @classmethod
    def for_job(
        cls, config: JobConfig, answers: AnswerSpec | None, inputs: list[str]
    ) -> OutputLayout:
        """The layout of a job's output; a name the input already uses is refused up front."""
        request = config.request
        leading = (["model"] if request.models else []) + (
            ["sample_index"] if request.n > 1 else []
        )
        taken = {*inputs, *RESULT_COLUMNS, *leading}
        if answers is not None:
            leading += [
                f"answer_{name}" if name in taken else name for name in answers.column_types()
            ]
        asked_for = {
            "label_confidence": bool(request.labels and request.logprobs),
            "tool_calls": request.tools is not None,
            "reasoning": config.output.keep_reasoning,
            "embedding": request.endpoint == "embeddings",
        }
        parts = tuple(name for name in PARTS if asked_for[name])
        leading += [f"answer_{name}" if name in taken else name for name in parts]
        stale = config.input.incremental and config.input.on_change == "keep"
        leading += ["stale"] if stale else []
        names = result_names(config.output.result_prefix, inputs, leading)
        return cls(
            names, request.variants, bool(request.models), request.n, answers,
            config.output.row_group_size, stale, parts, request.dimensions,
        )  # fmt: skip

    @property
    def slots(self) -> Slots:
        return Slots(len(self.variants))

    @property
    def group_rows(self) -> int:
        """Input rows per row group."""
        return max(self.row_group_size // len(self.variants), 1)

    def leading_arrays(self, rows: int, stored: list[tuple[Any, ...]]) -> list[pa.Array]:
        """The values of the leading columns for `rows` output rows (whole input rows' variants)."""
        arrays = []
        repeats = rows // len(self.variants)
        if self.fan_out_models:
            arrays.append(pa.array([model for model, _ in self.variants] * repeats))
        if self.samples > 1:
            arrays.append(
                pa.array([sample for _, sample in self.variants] * repeats, type=pa.int32())
            )
        if self.answers is not None:
            arrays += self.answers.columns([row[PARSED] for row in stored])
        for name in self.parts:
            index, kind = PARTS[name]
            values = [row[index] for row in stored]
            if name == "embedding":
                arrays.append(embedding_array(values, self.dimensions))
            else:
                arrays.append(pa.array(values, type=kind))
        if self.stale:
            arrays.append(pa.array([bool(row[STALE]) for row in stored], type=pa.bool_()))
        return arrays


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

    def __init__(
        self, layout: OutputLayout, groups: Groups, slots: int, journal: Journal, path: Path
    ) -> None:
        """`groups`: the input, `layout.group_rows` rows at a time; `slots`: output rows in all."""
        self.layout = layout
        self.slots = slots
        self.journal = journal
        self.sink = ParquetSink(path, layout.names)
        self.cpu_seconds = 0.0  # spent writing, in all (CPU time of the writing thread)
        self.final_seconds = 0.0  # spent in `finish()`: what writing adds after the last answer
        self._groups = groups
        self._next: tuple[int, pa.Table] | None = None  # the group to write next, once final
        self._failed: Exception | None = None
        self._kept: dict[int, tuple[Any, ...]] = {}  # slot -> committed result, not yet written
        self._keep_below = layout.slots.count(
            GROUPS_KEPT * layout.group_rows
        )  # slots kept: those below this
        self._reach = self._keep_below  # how far past the last group written slots are kept
        self._lock = threading.Lock()  # `committed` runs in the journal writer's thread

    def committed(self, stored: Iterable[tuple[Any, ...]]) -> None:
        """Keep the results of a journal commit (`RESULT_FIELDS` tuples), those near enough, to
        write them from memory."""
        with self._lock:
            for row in stored:
                if row[POSITION] < self._keep_below:
                    self._kept[row[POSITION]] = row

    async def write_ahead(
        self, final: FinalSlots, stopped: asyncio.Event, begun: threading.Event
    ) -> None:
        """Until `stopped`, write (in a thread) each group as soon as it is final, once `begun`
        (the first requests are on their way: on a resume, groups done before are final at
        once, and writing them first would hold the first request back). A failure (a full
        disk) stops only this: the job goes on, and `finish()` raises it."""
        written_upto = 0
        async for _ in every(WRITE_AHEAD_INTERVAL, stopped):
            if not begun.is_set():
                continue
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
        slots = self.layout.slots
        while True:
            if self._next is None:
                self._next = next(self._groups, None)
                if self._next is None:
                    return
            start, inputs = self._next
            if slots.first(start + inputs.num_rows) > final:
                return
            self._write(start, inputs)
            self._next = None

    def finish(self, metadata: dict[str, Any]) -> None:
        """Write what is left, then the job's `metadata`, and move the file into place."""
        if self._failed is not None:
            raise self._failed
        started = time.monotonic()
        self.write_until(self.slots)
        cpu = time.thread_time()
        self.sink.commit(metadata)
        self.cpu_seconds += time.thread_time() - cpu
        self.final_seconds = time.monotonic() - started

    def discard(self) -> None:
        self.sink.discard()

    def _write(self, start: int, inputs: pa.Table) -> None:
        cpu = time.thread_time()  # wall time in a thread would count waits for the GIL
        slots = self.layout.slots
        low, high = slots.first(start), slots.first(start + inputs.num_rows)
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
        if slots.per_row > 1:  # each input row once per variant
            inputs = inputs.take([i for i in range(inputs.num_rows) for _ in range(slots.per_row)])
        self.sink.write(inputs, self.layout.leading_arrays(inputs.num_rows, stored), stored)
        self.cpu_seconds += time.thread_time() - cpu


# ----------------------------------------------------------------------------- the file

RESULT_ARROW_TYPES: dict[str, pa.DataType] = {
    name: getattr(pa, "bool_" if kind == "bool" else kind)() for name, kind in RESULT_TYPES.items()
}
_FIELD_INDEX = {name: RESULT_FIELDS.index(name) for name in RESULT_COLUMNS}
# Result columns whose values nearly all differ. Parquet's writer would build a dictionary for
# each, in every row group, only to find it too big and drop it: a third of the writing time.
_NO_DICTIONARY = frozenset({"completion", "generation_id", "cost_usd", "latency_ms"})


def result_names(
    prefix: str, input_columns: Iterable[str], leading: Iterable[str] = ()
) -> list[str]:
    """Names of the `leading` and result columns with `prefix`; a clash with an input column is
    an error naming both."""
    names = [prefix + column for column in (*leading, *RESULT_COLUMNS)]
    clashes = sorted(set(names) & set(input_columns))
    if clashes:
        raise InputError(
            f"the input already has column{'s' if len(clashes) > 1 else ''} {', '.join(clashes)}, which the output adds; "
            f"set {describe('output.result_prefix')}, e.g. 'llm_'"
        )
    return names


ANSWERS_KEPT = "every answer is saved in the journal: free some space and run the same command again (nothing is paid again)"


def unfinished_name(output: Path, run: str) -> str:
    """The name an output has while `run` (a pid, or a glob's `*`) writes it."""
    return f".{output.name}.tmp-{run}"


class ParquetSink:
    """Writes the output file aside and renames it into place on `commit()`."""

    def __init__(self, path: Path, names: list[str]) -> None:
        self.path = path
        self.names = names
        self.tmp = path.with_name(unfinished_name(path, str(os.getpid())))
        results = zip(names[-len(RESULT_COLUMNS) :], RESULT_COLUMNS, strict=True)
        self._plain = {name for name, column in results if column in _NO_DICTIONARY}
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        _remove_dead_parts(path)

    def write(
        self, inputs: pa.Table, leading: list[pa.Array], results: list[tuple[Any, ...]]
    ) -> None:
        """Append a batch: `inputs` rows, their `leading` columns and their stored results
        (`RESULT_FIELDS` tuples), in the same order."""
        fields = list(zip(*results, strict=True))  # one tuple per field, transposed in C
        columns = leading + [
            pa.array(fields[_FIELD_INDEX[c]], type=RESULT_ARROW_TYPES[c]) for c in RESULT_COLUMNS
        ]
        table = inputs
        for name, column in zip(self.names, columns, strict=True):
            table = table.append_column(pa.field(name, column.type), column)
        with self._stops_on_failure():
            if self._writer is None:
                self._schema = table.schema
                dictionary = [name for name in self._schema.names if name not in self._plain]
                self._writer = pq.ParquetWriter(
                    self.tmp, self._schema, compression="zstd", use_dictionary=dictionary
                )
            elif table.schema != self._schema:
                table = table.cast(self._schema)
            self._writer.write_table(table)

    def commit(self, metadata: dict[str, Any]) -> None:
        """Finish the file with `metadata`, make it durable, then move it into place."""
        if self._writer is None:
            raise InputError("the input has no rows to write")
        with self._stops_on_failure():
            self._writer.add_key_value_metadata({"pipeline": json.dumps(metadata, sort_keys=True)})
            self._writer.close()
            self._writer = None
            with open(self.tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(self.tmp, self.path)

    @contextlib.contextmanager
    def _stops_on_failure(self) -> Iterator[None]:
        """The output could not be written (a full disk, most likely): every answer is in the
        journal, so the job stops resumable, and the next run writes the file without sending.
        The message leaves the journal's part (`ANSWERS_KEPT`) to `job`, which knows whether
        anything was sent."""
        try:
            yield
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFull(disk_full_message("output", self.path, exc)) from None
            reason = exc.strerror or str(exc).strip().splitlines()[0]
            raise JobStopped(f"cannot write output {self.path} ({reason})") from None

    def discard(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        self.tmp.unlink(missing_ok=True)


def _remove_dead_parts(path: Path) -> None:
    """Delete unfinished files a killed run left beside `path` (named for its process id)."""
    for part in path.parent.glob(unfinished_name(path, "*")):
        pid = part.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            part.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, and someone else's
    return True


def read_metadata(path: Path) -> dict[str, Any]:
    """The `pipeline` metadata of an output file written by this tool."""
    meta = pq.read_metadata(path).metadata or {}
    return json.loads(meta.get(b"pipeline", b"{}"))  # type: ignore[no-any-return]
