"""Everything checked before the first request, as a frozen `JobPlan` that `run`, `status` and
`estimate` share.

Order matters for the promise "bad input: nothing sent, nothing written": the input is
readable, the columns are there, the ids unique; the output and journal take new files and
are neither the input nor each other (`check_folders`, before anything); then, once the
endpoint's `/models` is known, the models exist and a budget can hold.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import resource
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.attachments import Attachments
from pipeline.config import JobConfig
from pipeline.errors import ConfigError, InputError
from pipeline.journal import JOURNAL_SUFFIXES
from pipeline.journal_file import within
from pipeline.lock import lock_path, output_key
from pipeline.money import Catalogue, most_output_tokens, unknown_limit
from pipeline.options import describe
from pipeline.output import OutputLayout, unfinished_name
from pipeline.places import is_remote
from pipeline.prompts import RequestBuilder
from pipeline.source import POSITION, Source, expand, open_source

VALIDATION_BATCH_ROWS = 50_000  # rows per batch of the validation pass
KEPT_BYTES = 64 << 20  # of input a resume keeps from that pass for the feed, at most
# Descriptors beyond one per request in flight: the journal, input files, stdio, the loop.
OPEN_FILES_HEADROOM = 64


@dataclass(frozen=True)
class Kept:
    """The input batches of a resume that hold slots outside `settled_blocks` (the journal's,
    as the plan was made), kept from the validation pass: when those blocks are still settled
    as the run starts, the feed sends from these and reads nothing again."""

    settled_blocks: frozenset[int]
    batches: list[pl.DataFrame]


@dataclass(frozen=True)
class JobPlan:
    """A job checked and ready to send: everything that needs no network."""

    config: JobConfig
    source: Source
    builder: RequestBuilder
    layout: OutputLayout
    rows: int  # input rows (within the limit)
    prompt_chars: int | None  # summed over the rows, for the pre-flight cost check
    limit: int | None
    # Each input row's position, id (else position) and digest, read by the validation pass
    # of an incremental job for `identity.realign`.
    identities: pl.DataFrame | None = None
    kept: Kept | None = None  # input batches the feed need not read again

    @functools.cached_property
    def fingerprint(self) -> dict[str, Any]:
        """What the journal must have been made for: the input's content and what shapes the
        requests (hashing the input takes a while, so only a run or estimate asks)."""
        return {"input": self.source.fingerprint(), "config": self.config.request_fingerprint()}

    @property
    def slots(self) -> int:
        """Output rows (and journal entries) of the whole job."""
        return self.builder.slots.count(self.rows)


def plan_job(
    config: JobConfig, limit: int | None = None, settled_blocks: frozenset[int] | None = None
) -> JobPlan:
    """Every check that needs no network: input, columns, ids, output columns and path.
    `settled_blocks`: of the journal a resume will open, to keep the batches it must send."""
    source = open_source(config.input.path, config.input.format, config.input.delimiter)
    builder = RequestBuilder(config, source.schema, source.folder_of)
    layout = OutputLayout.for_job(config, builder.answers, source.columns)
    read = validate_rows(source, config, builder, limit, settled_blocks)
    if builder.attachments is not None:
        check_attachments(source, builder.attachments, limit)
    return JobPlan(
        config, source, builder, layout, read.rows, read.prompt_chars, limit, read.identities,
        read.kept,
    )  # fmt: skip


ATTACHMENT_SAMPLE = 100  # first rows whose images and files are checked before anything is sent


def check_attachments(source: Source, attachments: Attachments, limit: int | None) -> None:
    """Refuse a job whose first rows' images or files can none of them be sent (a column of
    paths relative to another folder, say): every row would be an error row."""
    size = min(limit or ATTACHMENT_SAMPLE, ATTACHMENT_SAMPLE)
    batch = next(iter(source.batches(limit, size=size)), None)
    if batch is None or batch.height == 0:
        return
    found = attachments.for_rows(batch, batch[POSITION].to_list())
    if all(row.error is not None for row in found):
        raise InputError(
            f"none of the first {batch.height:,} rows' images or files can be sent; the first: "
            f"{found[0].error} ({source.locate(batch[POSITION][0])})"
        )


def check_folders(config: JobConfig) -> None:
    """The output and journal can be written where they are named, and the run's files are
    distinct from the input and from each other (before the lock: `<journal>.lock` might be
    the input)."""
    output = config.output.local_path
    if is_remote(config.output.path):
        check_bucket(config.output.path)
        output.parent.mkdir(parents=True, exist_ok=True)
    for path, key in (
        (output, describe("output.path")),
        (config.output.journal_path, describe("output.journal")),
    ):
        _check_writable(path, key)
    check_distinct(config)  # before the name: an output that is the input says so
    if output.suffix.lower() in OTHER_FORMATS:
        raise InputError(
            f"{describe('output.path')} {config.output.path}: the output is written as Parquet, not {output.suffix}; "
            "name it .parquet or .pq"
        )


def check_bucket(url: str) -> None:
    """An object-store output can be uploaded: its store's library is installed and its bucket
    exists (before anything is sent; whether the key may write is known only by writing)."""
    from pipeline.remote import bucket_exists

    if not bucket_exists(url, describe("output.path")):
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        raise InputError(
            f"{describe('output.path')} {url}: the bucket {bucket} does not exist or cannot be "
            "seen with these credentials; create it, or name another"
        )


# Data formats the output is not written in: a name ending so is a mistake. Any other name,
# none at all included, is the user's to choose; the file is Parquet all the same.
OTHER_FORMATS = frozenset(
    {".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".txt", ".xlsx", ".xls", ".arrow", ".feather", ".avro", ".orc"}
)  # fmt: skip


def _check_writable(path: Path, key: str) -> None:
    """The file is a regular file or absent, in a folder that takes new files (tried, not
    guessed: root passes every permission check, yet a read-only or immutable folder still
    refuses)."""
    if path.is_dir():
        raise InputError(
            f"{key} {path} is a folder; name the file to write in it, e.g. {path / 'out.parquet'}"
        )
    if path.exists() and not path.is_file():
        raise InputError(f"{key} {path} is not a regular file; name a file to write")
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{key} {path}: {folder} is not a folder but a file; choose another path")
    if not folder.is_dir():
        raise InputError(f"{key} {path}: folder {folder} does not exist; create it first")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".pipeline-probe-"):
            pass
    except OSError as exc:
        raise InputError(
            f"{key} {path}: folder {folder} is not writable ({exc.strerror})"
        ) from None


def check_distinct(config: JobConfig) -> None:
    """The input files, the output and the journal (with the files each brings: lock files,
    sqlite's `-wal` / `-shm`, the unfinished output) are all different files, whatever the
    spelling: symlinks, `..` and hard links included. Otherwise `--restart` would delete the
    input, or the output overwrite the paid answers."""
    output, journal = config.output.local_path, config.output.journal_path
    out_key, journal_key = describe("output.path"), describe("output.journal")
    inputs = {file_identity(path): path for path in input_files(config.input.path)}
    out_files = {file_identity(p): p for p in (output, lock_path(output_key(output)))}
    journal_files = {
        file_identity(p): p
        for p in (*(Path(f"{journal}{s}") for s in JOURNAL_SUFFIXES), lock_path(journal))
    }
    for key, named, files in ((out_key, output, out_files), (journal_key, journal, journal_files)):
        for identity, path in files.items():
            if identity in inputs:
                what = f"{named}" if path == named else f"{named}: its file {path}"
                raise InputError(
                    f"{key} {what} is the input file {inputs[identity]}; choose another path"
                )
    for identity, path in journal_files.items():
        if identity in out_files:
            raise InputError(
                f"{journal_key} {journal} and {out_key} {output} would share the file {path}: the output "
                "would overwrite the journal of the answers paid for; choose another journal path"
            )
    # A dead run's unfinished output (`.NAME.tmp-PID`) is deleted when the next one starts.
    folder = file_identity(output.parent)
    for input_file in inputs.values():
        if fnmatch.fnmatch(input_file.name, unfinished_name(output, "*")) and (
            file_identity(input_file.parent) == folder
        ):
            raise InputError(
                f"{out_key} {output}: the input file {input_file} has the name of an unfinished output "
                "and would be deleted; rename it or choose another output path"
            )


def file_identity(path: Path) -> tuple[object, ...]:
    """What a file is: its device and inode when it exists, else its real path."""
    try:
        status = path.stat()
    except OSError:
        return (os.path.realpath(path),)
    return (status.st_dev, status.st_ino)


def input_files(pattern: str) -> tuple[Path, ...]:
    """The input's local files as far as they exist (reading them, later, says what is
    missing); objects in a store are never the files a run writes."""
    if is_remote(pattern):
        return ()
    try:
        return tuple(path for path in expand(pattern) if isinstance(path, Path))
    except InputError:
        return ()


def ensure_open_files(concurrency: int) -> None:
    """Each request in flight holds a socket: raise the soft open-file limit if it is too low for
    `concurrency`, and say so up front when even the hard limit is."""
    needed = concurrency + OPEN_FILES_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ConfigError(
            f"{describe('limits.concurrency')} {concurrency} needs about {needed} open files, but this process may "
            f"open at most {hard} (ulimit -n); lower the concurrency or raise the limit"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@dataclass(frozen=True)
class RowsRead:
    rows: int
    prompt_chars: int | None
    identities: pl.DataFrame | None
    kept: Kept | None


def validate_rows(
    source: Source,
    config: JobConfig,
    builder: RequestBuilder,
    limit: int | None,
    settled_blocks: frozenset[int] | None = None,
) -> RowsRead:
    """Count the rows (checking every one can be read), refuse duplicate or null ids, sum the
    prompt lengths for estimates, (incremental jobs) take each row's identity and (given the
    journal's `settled_blocks`) keep the batches with slots still to send, up to `KEPT_BYTES`,
    in one pass before anything is sent.

    The pass reads the input a batch at a time, so memory stays flat with the row count: ids
    are kept only as 64-bit hashes (8 bytes a row), and only when two hashes meet is the input
    read again for the actual duplicate."""
    id_column = config.input.id_column
    incremental = config.input.incremental
    # One query a batch, so the prompt is rendered once for its length and its digest.
    columns = [pl.col(POSITION)]
    if builder.prompt_expr is not None:
        columns.append(builder.prompt_expr.str.len_chars().alias("chars"))
    if id_column:
        ids = pl.col(id_column)
        columns += [
            ids.is_null().alias("null_id"),
            pl.when(ids.is_not_null()).then(ids.hash()).alias("id_hash"),
        ]
    if incremental:
        columns += [builder.key_expr.alias("key"), builder.digest_expr.alias("digest")]
    rows = chars = nulls = 0
    first_null = None
    id_hashes = []
    identities: list[pl.DataFrame] = []
    kept: list[pl.DataFrame] | None = [] if settled_blocks is not None else None
    kept_bytes, slots = 0, builder.slots
    try:
        for batch in source.batches(limit, size=VALIDATION_BATCH_ROWS):
            read = batch.lazy().select(columns).collect()
            rows += read.height
            if "chars" in read.columns:
                chars += int(read["chars"].sum() or 0)
            if id_column:
                missing = read.filter(pl.col("null_id"))[POSITION]
                nulls += missing.len()
                if first_null is None and missing.len():
                    first_null = missing[0]
                id_hashes.append(read["id_hash"].drop_nulls())
            if incremental:
                identities.append(read.select(POSITION, "key", "digest"))
            if kept is not None and settled_blocks is not None:
                low, high = slots.first(batch[POSITION][0]), slots.first(batch[POSITION][-1] + 1)
                if not within(settled_blocks, low, high):
                    kept.append(batch)
                    kept_bytes += int(batch.estimated_size())
                    kept = kept if kept_bytes <= KEPT_BYTES else None
    except pl.exceptions.PolarsError as exc:
        raise InputError(
            f"input {source.pattern} cannot be read: {str(exc).strip().splitlines()[0]}"
        ) from None
    if rows == 0:
        raise InputError(f"input {source.pattern} has no rows")
    if id_column and first_null is not None:
        raise InputError(
            f"{describe('input.id_column')} '{id_column}' is null in {nulls} row(s), the first at "
            f"{source.locate(first_null)}; ids must be present"
        )
    if id_column and id_hashes:
        hashes = pl.concat(id_hashes)
        if hashes.n_unique() < len(hashes):
            _refuse_duplicate(source, id_column, hashes.filter(hashes.is_duplicated()), limit)
    return RowsRead(
        rows,
        chars if builder.prompt_expr is not None else None,
        pl.concat(identities) if incremental else None,
        Kept(settled_blocks, kept) if kept is not None and settled_blocks is not None else None,
    )


def _refuse_duplicate(source: Source, id_column: str, twice: pl.Series, limit: int | None) -> None:
    """Read the input again for the ids whose hashes met, and name the first one given twice
    (none, when only the hashes collided)."""
    ids = pl.col(id_column)
    seen = []
    for batch in source.batches(limit, size=VALIDATION_BATCH_ROWS):
        seen.append(batch.select(ids, POSITION).filter(ids.hash().is_in(twice.implode())))
        found = pl.concat(seen).filter(ids.is_duplicated())
        if found.height:
            value = found[id_column][0]
            where = found.filter(ids == value)[POSITION][:2].to_list()
            raise InputError(
                f"{describe('input.id_column')} '{id_column}' has duplicate values (e.g. {value!r}) "
                f"at {source.locate(where[0])} and {source.locate(where[1])}); ids must be unique"
            )


def check_models(config: JobConfig, catalogue: Catalogue | None) -> None:
    """Refuse a model the endpoint does not list (when it lists any), and a budget that cannot
    hold, before anything is sent."""
    wanted = [(describe("request.model"), config.request.model)]
    wanted += [(describe("request.models"), m) for m in config.request.models or ()]
    wanted += [("request.fallback_models", m) for m in config.request.fallback_models or ()]
    if catalogue is not None and catalogue.models:
        for key, model in wanted:
            if model not in catalogue:
                raise InputError(
                    f"{key}: the endpoint has no model {model!r}; see `pipeline models --search {model.split('/')[-1][:12]}`"
                )
    needs = [
        k for k, cols in (("image", config.prompt.images), ("file", config.prompt.files)) if cols
    ]
    for key, model in wanted if needs and catalogue is not None else ():
        listing = catalogue.models.get(model) if catalogue is not None else None
        takes = listing.input_modalities if listing is not None else frozenset()
        if takes and (missing := [k for k in needs if k not in takes]):
            raise ConfigError(
                f"{key} {model!r} takes no {missing[0]} input (its /models input_modalities: "
                f"{', '.join(sorted(takes))}); choose a model that lists {missing[0]}"
            )
    if config.cost.caps:  # every cap needs prices; the message names the first one set
        cap_key = next(iter(config.cost.caps))
        for key, model in wanted:
            price = catalogue.get(model) if catalogue is not None else None
            if price is None:
                raise ConfigError(
                    f"{describe(cap_key)} needs prices, and the endpoint's /models does not price {key} {model!r}"
                )
            if most_output_tokens(price, 0, config.request.max_tokens) is None:
                raise ConfigError(unknown_limit(key, model, cap_key))
