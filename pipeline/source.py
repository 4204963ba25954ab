"""Reading the input: CSV (or TSV), Parquet or JSONL, one file or a glob, in batches of bounded
size.

CSV columns are read as strings: batch-wise type inference could change a column's type half way
through a file, and `"007"` should stay `"007"`. Parquet and JSONL keep their own types.

The files of a glob are matched by column name into one schema (`reconcile`): the first file's
columns in its order, then columns first seen in later files; a column a file lacks is null in
its rows; a type that differs is widened where no value can change (see `_widen`), else refused
naming both files. A folder that gains a column over time (`incoming/*.parquet`) so still reads
as one table and writes as one output.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import glob
import hashlib
import io
import itertools
import json
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import ConfigError, InputError
from pipeline.options import INPUT_FORMATS, describe
from pipeline.places import is_remote
from pipeline.remote import RemoteFile, list_objects

POSITION = "__pipeline_position"
DELIMITERS = {"csv": ",", "tsv": "\t"}
POOL = pa.default_memory_pool()
T = TypeVar("T")
InputFile = Path | RemoteFile  # a local file, or an object in a store
BATCH_ROWS = 2_000  # small: the first requests wait for only one batch (the next is prepared ahead)


@dataclass(frozen=True)
class Source:
    """The input files of a job, in a stable order, with their one (reconciled) schema."""

    pattern: str
    paths: tuple[InputFile, ...]
    format: str  # csv | tsv | parquet | jsonl
    arrow: pa.Schema  # what every batch is conformed to
    delimiter: str = ","
    # The position of each file's first row, learnt as the files are read (to name a row).
    starts: dict[InputFile, int] = field(default_factory=dict, compare=False, repr=False)

    @functools.cached_property
    def schema(self) -> pl.Schema:  # asked for by every JSONL chunk: built once
        return _polars_schema(self.arrow)

    @property
    def columns(self) -> list[str]:
        return list(self.arrow.names)

    def locate(self, position: int) -> str:
        """Where the row at input `position` is: `file row N`, N counting data rows from 1."""
        # The last file starting at or before it (an empty file starts where the next does).
        path, start = next((p, s) for p, s in reversed(self.starts.items()) if s <= position)
        return f"{path} row {position - start + 1}"

    def folder_of(self, position: int) -> Path | None:
        """The folder of the local file holding the row at `position` (None for an object)."""
        path = next(p for p, s in reversed(self.starts.items()) if s <= position)
        return path.parent if isinstance(path, Path) else None

    def batches(
        self, limit: int | None = None, size: int = BATCH_ROWS, first: int | None = None
    ) -> Iterator[pl.DataFrame]:
        """The rows in input order, at most `size` at a time (`first` in the first batch), each
        with its position in POSITION."""
        for position, table in self.arrow_batches(limit, size, first):
            yield frame_of(position, table)

    def arrow_batches(
        self, limit: int | None = None, size: int = BATCH_ROWS, first: int | None = None
    ) -> Iterator[tuple[int, pa.Table]]:
        """The rows in input order as Arrow, at most `size` at a time (`first` in the first
        batch), with the position of each batch's first row.

        Pull-based: a batch is read only when asked for (polars' `collect_batches` runs the
        whole query ahead of a slow consumer, buffering a million-row file in memory). Parquet
        keeps its exact Arrow types (string, not large_string), so the output can too."""
        position = 0
        want = min(first or size, size)
        for path in self.paths:
            self.starts[path] = position
            for chunk in prefetched(self._chunks(path, size)):
                table = (
                    pa.Table.from_batches([chunk]) if isinstance(chunk, pa.RecordBatch) else chunk
                )
                if table.schema != self.arrow:
                    table = _conform(table, self.arrow)
                if limit is not None and position + table.num_rows > limit:
                    table = table.slice(0, limit - position)
                offset = 0
                while offset < table.num_rows:  # CSV comes in blocks of bytes, not rows
                    piece = table.slice(offset, want)
                    yield position + offset, piece
                    offset += piece.num_rows
                    want = size
                position += table.num_rows
                # Arrow's allocator (mimalloc) keeps freed pages for a while; over a long
                # input that grew RSS with the row count though Arrow never held more than
                # ~30 MB. Handing them back each batch keeps memory flat (benchmarks/run.py).
                del table, chunk
                POOL.release_unused()
                if limit is not None and position >= limit:
                    return

    def _chunks(self, path: InputFile, size: int) -> Iterator[pa.RecordBatch | pa.Table]:
        """One file's rows; a file that cannot be read is named, with the line where known."""
        try:
            if self.format == "parquet":
                with readable(path) as file:
                    yield from pq.ParquetFile(file).iter_batches(batch_size=size)
            elif self.format == "jsonl":
                yield from self._jsonl_chunks(path, size)
            else:
                yield from self._csv_chunks(path)
        except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as exc:
            if self.format in DELIMITERS:
                raise _csv_error(path, self.delimiter, exc) from None
            raise InputError(f"input file {path} cannot be read: {_first_line(exc)}") from None

    def _csv_chunks(self, path: InputFile) -> Iterator[pa.RecordBatch]:
        # Every column a string, an empty field null: what polars' infer_schema=False reads.
        convert = pacsv.ConvertOptions(
            column_types=dict.fromkeys(self.columns, pa.string()),
            null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=False,
        )  # fmt: skip
        # newlines_in_values: a quoted value may span lines, also across the reader's blocks
        # (without it the reader loses sync there); it costs nothing measurable read serially.
        parse = pacsv.ParseOptions(delimiter=self.delimiter, newlines_in_values=True)
        last = None
        with readable(path) as file:
            for last in pacsv.open_csv(
                file, read_options=pacsv.ReadOptions(block_size=4 << 20), parse_options=parse,
                convert_options=convert,
            ):  # fmt: skip
                yield last
        if last is not None and last.num_rows:
            _check_closed(path, last.column(last.num_columns - 1)[-1].as_py(), self.delimiter)

    def _jsonl_chunks(self, path: InputFile, size: int) -> Iterator[pa.Table]:
        # JSON Lines holds one object per line, so a run of lines is a valid smaller file.
        schema = self.schema
        line = 1
        with path.open("rb") as f:
            while lines := list(itertools.islice(f, size)):
                try:
                    frame = pl.read_ndjson(io.BytesIO(b"".join(lines)), schema=schema)
                except pl.exceptions.PolarsError as exc:
                    raise _json_error(path, lines, line, exc) from None
                yield frame.to_arrow()
                line += len(lines)

    def fingerprint(self) -> list[dict[str, Any]]:
        """Name, size and content hash of each file: a resumed job must read the same rows."""
        prints = []
        for path in self.paths:
            if isinstance(path, RemoteFile):  # its version stands for a hash: no download
                prints.append(path.fingerprint())
                continue
            with path.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            prints.append({"file": str(path), "bytes": path.stat().st_size, "sha256": digest})
        return prints


@contextlib.contextmanager
def readable(path: InputFile) -> Iterator[Path | IO[bytes]]:
    """What the readers take: a local path (read natively), or an object opened for reading."""
    if isinstance(path, Path):
        yield path
    else:
        with path.open("rb") as file:
            yield file


def prefetched(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """`items`, made up to `depth` ahead in a thread of their own: the readers leave the GIL
    while they parse, so the next chunk is read while this one is worked on (the validation
    pass of a million CSV rows: a fifth quicker). An error reaches the consumer in order; a
    consumer that stops early stops the thread at its next chunk."""
    ready: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stopped = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stopped.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as exc:  # handed to the consumer, which raises it
            put((False, exc))

    threading.Thread(target=fill, name="input-reader", daemon=True).start()
    try:
        while True:
            ok, item = ready.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stopped.set()


_END = object()


def frame_of(position: int, table: pa.Table | pa.RecordBatch) -> pl.DataFrame:
    """An input batch starting at `position` as polars, with each row's position in POSITION."""
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame.with_row_index(POSITION, offset=position)


def open_source(pattern: str, fmt: str | None = None, delimiter: str | None = None) -> Source:
    """Find the files, check they can be read, and read and reconcile their schemas (no rows
    yet)."""
    paths = expand(pattern)
    formats = {fmt or _format_of(p) for p in paths}
    if len(formats) > 1:
        raise InputError(
            f"{describe('input.path')} {pattern} matches files of different formats ({', '.join(sorted(formats))}); use one format"
        )
    (kind,) = formats
    if delimiter is not None and kind not in DELIMITERS:
        raise ConfigError(f"{describe('input.delimiter')} applies to CSV input, not {kind}")
    delimiter = delimiter or DELIMITERS.get(kind, ",")
    for path in paths:
        if path.stat().st_size == 0:
            raise InputError(f"input file {path} is empty")
    schemas = [(path, _file_schema(path, kind, delimiter)) for path in paths]
    return Source(pattern, paths, kind, reconcile(schemas, kind), delimiter)


def reconcile(schemas: list[tuple[InputFile, pa.Schema]], kind: str) -> pa.Schema:
    """One schema for all the files: columns by name, in order of first appearance; nullable
    when some file lacks the column; types widened by `_widen` or refused naming both files."""
    fields: dict[str, tuple[pa.Field, InputFile]] = {}
    for path, schema in schemas:
        for new in schema:
            if new.name not in fields:
                fields[new.name] = (new, path)
                continue
            old, where = fields[new.name]
            widened = _widen(old.type, new.type, json_numbers=kind == "jsonl")
            if widened is None:
                raise InputError(
                    f"input files {where} and {path} disagree on column '{new.name}' "
                    f"({old.type} and {new.type}); make them one type, or read them separately"
                )
            fields[new.name] = (pa.field(new.name, widened, old.nullable or new.nullable), where)
    if len(schemas) > 1:  # a column some file lacks is null in that file's rows
        common = set.intersection(*(set(schema.names) for _, schema in schemas))
        for name, (old, where) in fields.items():
            if name not in common:
                fields[name] = (old.with_nullable(True), where)
    return pa.schema([f for f, _ in fields.values()])


def _widen(a: pa.DataType, b: pa.DataType, json_numbers: bool) -> pa.DataType | None:
    """The type that holds every value of both without changing one, or None.

    Integers widen to the wider integer (signed when either is); integers of at most 32 bits
    and floats widen to float64, which holds them exactly. A 64-bit integer with a float is
    refused for Parquet (float64 rounds past 2**53) but widened for JSONL, whose numbers are
    one type that JSON itself does not split into ints and floats."""
    t = pa.types
    if a == b:
        return a
    if t.is_null(a) or t.is_null(b):
        return b if t.is_null(a) else a
    if all(t.is_string(x) or t.is_large_string(x) for x in (a, b)):  # one of each
        return pa.large_string()
    if t.is_integer(a) and t.is_integer(b):
        if t.is_signed_integer(a) == t.is_signed_integer(b):
            return a if a.bit_width >= b.bit_width else b
        signed, unsigned = (a, b) if t.is_signed_integer(a) else (b, a)
        if signed.bit_width > unsigned.bit_width:
            return signed
        return pa.int64() if unsigned.bit_width < 64 else None
    if t.is_floating(a) and t.is_floating(b):
        return a if a.bit_width >= b.bit_width else b
    if t.is_floating(a) or t.is_floating(b):
        number = b if t.is_floating(a) else a
        if t.is_integer(number) and (number.bit_width <= 32 or json_numbers):
            return pa.float64()
    return None


def _conform(table: pa.Table, target: pa.Schema) -> pa.Table:
    """`table` (one file's rows) in the reconciled schema: columns by name, null where absent."""
    columns = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in target
    ]
    return pa.Table.from_arrays(columns, schema=target)


def _file_schema(path: InputFile, kind: str, delimiter: str) -> pa.Schema:
    """One file's schema. JSONL is inferred from every line: a key first seen late, or a float
    late in a column of ints, must not be dropped or refused half way through the run."""
    try:
        if kind == "parquet":
            with readable(path) as file:
                return pq.read_schema(file)
        if kind == "jsonl":
            with readable(path) as file:
                schema = pl.scan_ndjson(file, infer_schema_length=None).collect_schema()
            return pl.DataFrame(schema=schema).to_arrow().schema
        # polars renames a repeated header (`text_duplicated_0`); the rows are read by pyarrow,
        # which keeps the names as written: read them as written.
        names = _csv_header(path, delimiter) or _polars_header(path, delimiter)
        if repeated := sorted({n for n in names if names.count(n) > 1}):
            raise InputError(
                f"input file {path} has the column '{repeated[0]}' more than once; give each column its own name"
            )
        return pa.schema([(name, pa.string()) for name in names])
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as exc:
        if kind == "jsonl":
            with path.open("rb") as f:
                raise _json_error(path, f, 1, exc) from None
        if kind in DELIMITERS and "utf-8" in str(exc).lower():
            raise _csv_error(path, delimiter, exc) from None
        shown = "csv" if kind in DELIMITERS else kind
        raise InputError(
            f"input file {path} cannot be read as {shown}: {_first_line(exc)}"
        ) from None


def _polars_header(path: InputFile, delimiter: str) -> list[str]:
    """The header as polars reads it: its error says what is wrong with a header that is not
    UTF-8."""
    with readable(path) as file:
        return list(pl.scan_csv(file, separator=delimiter, infer_schema=False).collect_schema())


def _csv_header(path: InputFile, delimiter: str) -> list[str] | None:
    """The header's names as written (None if it is not UTF-8: the read says where)."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        try:
            return next(csv.reader(f, delimiter=delimiter), None)
        except (UnicodeDecodeError, csv.Error):
            return None


def _polars_schema(arrow: pa.Schema) -> pl.Schema:
    frame = pl.from_arrow(arrow.empty_table())
    assert isinstance(frame, pl.DataFrame)
    return frame.schema


def expand(pattern: str) -> tuple[InputFile, ...]:
    if is_remote(pattern):
        return list_objects(pattern, describe("input.path"))
    if glob.has_magic(pattern):
        paths = tuple(
            Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()
        )
        if not paths:
            raise InputError(f"{describe('input.path')} {pattern} matches no files")
        return paths
    path = Path(pattern)
    if not path.exists():
        raise InputError(f"input file {pattern} does not exist (input.path / --input)")
    if not path.is_file():
        raise InputError(
            f"{describe('input.path')} {pattern} is not a file; use a glob such as {pattern.rstrip('/')}/*.parquet for a folder"
        )
    return (path,)


def _format_of(path: InputFile) -> str:
    kind = INPUT_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InputError(
            f"input file {path}: cannot tell the format from '{path.suffix}'; set {describe('input.format')} to csv, tsv, parquet or jsonl"
        )
    return kind


# ----------------------------------------------------------- naming the line that is wrong
# These run only once reading has failed, so they may take their time.


def _check_closed(path: InputFile, last_value: Any, delimiter: str) -> None:
    """Refuse a quote still open at the end of the file. The CSV reader accepts it, and the
    value then holds every line after the quote. Only the last value of the last row can be
    such a value (elsewhere the row comes out a field short, which the reader refuses), and it
    is one when the file ends with it, quoted but unclosed, at the start of a field."""
    if not isinstance(last_value, str):
        return
    tail = b'"' + last_value.encode().replace(b'"', b'""')
    size = path.stat().st_size
    start = size - len(tail)
    if start < 0:
        return
    with path.open("rb") as f:
        f.seek(max(start - 1, 0))
        before = f.read(1) if start > 0 else b"\n"
        if f.read() != tail or before not in (delimiter.encode(), b"\n", b"\r"):
            return
        f.seek(0)
        line = f.read(start).count(b"\n") + 1
    raise InputError(
        f"input file {path}:{line}: a quote opened here is never closed, so every line after "
        'it would be one value; close it (a quote inside a quoted value is written "")'
    )


def _csv_error(path: InputFile, delimiter: str, exc: BaseException) -> InputError:
    """The first record the CSV reader stumbled on, by line: not UTF-8, or the wrong number of
    fields. Found with Python's csv module, which reads quotes as the Arrow reader does."""
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, [])
        line = reader.line_num + 1
        for record in reader:
            for name, value in zip(header, record, strict=False):
                if any("\udc80" <= ch <= "\udcff" for ch in value):
                    return InputError(
                        f"input file {path}:{line} cannot be read: column '{name}' is not UTF-8; re-encode the "
                        f"file, e.g. `iconv -f latin1 -t utf-8 {path} > utf8.csv`"
                    )
            if len(record) != len(header):
                return InputError(
                    f"input file {path}:{line} is not valid CSV: {len(record)} fields where the "
                    f"header has {len(header)}; check its quotes and delimiters"
                )
            line = reader.line_num + 1
    if any("\udc80" <= ch <= "\udcff" for ch in "".join(header)):
        return InputError(f"input file {path}:1: the header is not UTF-8; re-encode the file")
    return InputError(f"input file {path} cannot be read as csv: {_first_line(exc)}")


def _json_error(
    path: InputFile, lines: Any, first: int, exc: BaseException
) -> InputError:  # lines: an iterable of bytes
    """The first of `lines` (numbered from `first`) that is not one JSON object."""
    for number, raw in enumerate(lines, start=first):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except UnicodeDecodeError:
            return InputError(
                f"input file {path}:{number} is not UTF-8; re-encode the file, e.g. "
                f"`iconv -f latin1 -t utf-8 {path} > utf8.jsonl`"
            )
        except json.JSONDecodeError as error:
            return InputError(
                f"input file {path}:{number} is not valid JSON: {error.msg} at character {error.colno}"
            )
        if not isinstance(value, dict):
            return InputError(f"input file {path}:{number} is not a JSON object, one per line")
    return InputError(f"input file {path} cannot be read as jsonl: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
