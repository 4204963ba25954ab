"""The final Parquet file: every input column unchanged and in input order, then the columns
of a fan-out and of a structured answer (`model`, `sample_index`, `label` or one per schema
property), then the result columns, all with explicit types. Written batch by batch beside the
target, then renamed into place, so the file is either complete or absent. The job's totals
go into the file's key-value metadata under `pipeline` at the end, once they are known.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.records import RESULT_COLUMNS, RESULT_FIELDS

RESULT_TYPES: dict[str, pa.DataType] = {
    "completion": pa.string(),
    "finish_reason": pa.string(),
    "response_model": pa.string(),
    "provider": pa.string(),
    "generation_id": pa.string(),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "total_tokens": pa.int64(),
    "reasoning_tokens": pa.int64(),
    "cached_tokens": pa.int64(),
    "cost_usd": pa.float64(),
    "cost_source": pa.string(),
    "response_source": pa.string(),
    "latency_ms": pa.float64(),
    "attempts": pa.int32(),
    "status": pa.string(),
    "error_type": pa.string(),
    "error_message": pa.string(),
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
            "set output.result_prefix (--result-prefix), e.g. 'llm_'"
        )
    return names


class ParquetSink:
    """Writes the output file aside and renames it into place on `commit()`."""

    def __init__(self, path: Path, names: list[str]) -> None:
        self.path = path
        self.names = names
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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
            pa.array(fields[_FIELD_INDEX[c]], type=RESULT_TYPES[c]) for c in RESULT_COLUMNS
        ]
        table = inputs
        for name, column in zip(self.names, columns, strict=True):
            table = table.append_column(pa.field(name, column.type), column)
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
        self._writer.add_key_value_metadata({"pipeline": json.dumps(metadata, sort_keys=True)})
        self._writer.close()
        self._writer = None
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        self.tmp.unlink(missing_ok=True)


def _remove_dead_parts(path: Path) -> None:
    """Delete unfinished files a killed run left beside `path` (named for its process id)."""
    for part in path.parent.glob(f".{path.name}.tmp-*"):
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
