"""Reading the input: CSV, Parquet or JSONL, one file or a glob, in batches of bounded size.

CSV columns are read as strings: batch-wise type inference could change a column's type half way
through a file, and `"007"` should stay `"007"`. Parquet and JSONL keep their own types.
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.options import describe

POSITION = "__pipeline_position"
FORMATS = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
POOL = pa.default_memory_pool()
BATCH_ROWS = 2_000  # small: the first requests wait for only one batch (the next is prepared ahead)


@dataclass(frozen=True)
class Source:
    """The input files of a job, in a stable order, with their schema."""

    pattern: str
    paths: tuple[Path, ...]
    format: str
    schema: pl.Schema

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names())

    def lazy(self, limit: int | None = None) -> pl.LazyFrame:
        frame = _scan(self.paths, self.format)
        if limit is not None:
            frame = frame.head(limit)
        return frame

    def batches(
        self, limit: int | None = None, size: int = BATCH_ROWS, first: int | None = None
    ) -> Iterator[pl.DataFrame]:
        """The rows in input order, at most `size` at a time (`first` in the first batch), each
        with its position in POSITION."""
        for position, table in self.arrow_batches(limit, size, first):
            frame = pl.from_arrow(table)
            assert isinstance(frame, pl.DataFrame)
            yield frame.with_row_index(POSITION, offset=position)

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
        try:
            for chunk in self._chunks(size):
                table = (
                    pa.Table.from_batches([chunk]) if isinstance(chunk, pa.RecordBatch) else chunk
                )
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
        except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as exc:
            raise InputError(f"input {self.pattern} cannot be read: {_first_line(exc)}") from None

    def _chunks(self, size: int) -> Iterator[pa.RecordBatch | pa.Table]:
        for path in self.paths:
            if self.format == "parquet":
                yield from pq.ParquetFile(path).iter_batches(batch_size=size)
            elif self.format == "csv":
                yield from self._csv_chunks(path)
            else:
                yield from self._jsonl_chunks(path, size)

    def _csv_chunks(self, path: Path) -> Iterator[pa.RecordBatch]:
        # Every column a string, an empty field null: what polars' infer_schema=False reads.
        convert = pacsv.ConvertOptions(
            column_types=dict.fromkeys(self.columns, pa.string()),
            null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=False,
        )  # fmt: skip
        yield from pacsv.open_csv(
            path, read_options=pacsv.ReadOptions(block_size=1 << 20), convert_options=convert
        )

    def _jsonl_chunks(self, path: Path, size: int) -> Iterator[pa.Table]:
        # JSON Lines holds one object per line, so a run of lines is a valid smaller file.
        with path.open("rb") as f:
            while lines := list(itertools.islice(f, size)):
                yield pl.read_ndjson(io.BytesIO(b"".join(lines)), schema=self.schema).to_arrow()

    def fingerprint(self) -> list[dict[str, Any]]:
        """Name, size and content hash of each file: a resumed job must read the same rows."""
        prints = []
        for path in self.paths:
            with path.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            prints.append({"file": str(path), "bytes": path.stat().st_size, "sha256": digest})
        return prints


def open_source(pattern: str, fmt: str | None = None) -> Source:
    """Find the files, check they can be read, and read their schema (no rows yet)."""
    paths = _expand(pattern)
    formats = {fmt or _format_of(p) for p in paths}
    if len(formats) > 1:
        raise InputError(
            f"{describe('input.path')} {pattern} matches files of different formats ({', '.join(sorted(formats))}); use one format"
        )
    (kind,) = formats
    for path in paths:
        if path.stat().st_size == 0:
            raise InputError(f"input file {path} is empty")
    try:
        schema = _scan(paths, kind).collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(
            f"input file {_culprit(paths, kind)} cannot be read as {kind}: {_first_line(exc)}"
        ) from None
    return Source(pattern, paths, kind, schema)


def _expand(pattern: str) -> tuple[Path, ...]:
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


def _format_of(path: Path) -> str:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InputError(
            f"input file {path}: cannot tell the format from '{path.suffix}'; set {describe('input.format')} to csv, parquet or jsonl"
        )
    return kind


def _scan(paths: tuple[Path, ...], kind: str) -> pl.LazyFrame:
    sources = [str(p) for p in paths]
    if kind == "csv":
        return pl.scan_csv(sources, infer_schema=False)
    if kind == "parquet":
        return pl.scan_parquet(sources)
    return pl.scan_ndjson(sources, infer_schema_length=1000)


def _culprit(paths: tuple[Path, ...], kind: str) -> Path:
    """With several files, find the one that fails to read."""
    for path in paths:
        try:
            _scan((path,), kind).collect_schema()
        except (pl.exceptions.PolarsError, OSError):
            return path
    return paths[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
