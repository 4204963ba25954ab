"""`run_job`: the whole job, from config to output file, as a library call the CLI wraps.

Order matters for the promise "bad input: nothing sent, nothing written": every check (input
readable, columns present, ids unique, output writable, key present, models known, journal
ours) happens before the first completion request.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import resource
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from pipeline import __version__
from pipeline.attempt import ChatAnswerer
from pipeline.cache import ResponseCache
from pipeline.client import OpenRouterClient
from pipeline.config import KEY_ENV, JobConfig, read_api_key
from pipeline.dispatch import Dispatcher
from pipeline.errors import (
    ConfigError,
    CreditsError,
    InputError,
    Interrupted,
    JobStopped,
    OutOfTime,
)
from pipeline.journal import JobLock, Journal, JournalWriter
from pipeline.limits import Limits
from pipeline.money import (
    Budget,
    Catalogue,
    Reservations,
    cached_listing,
    most_output_tokens,
    store_listing,
    unknown_limit,
)
from pipeline.output import FinalSlots, OutputLayout, OutputWriter
from pipeline.progress import LogSettings, Progress
from pipeline.prompts import MESSAGE_OVERHEAD_TOKENS, RequestBuilder
from pipeline.records import CACHE, DUPLICATE, OK, Result, Row, Totals
from pipeline.retry import RetryPolicy
from pipeline.source import POSITION, Source, open_source

SIMULATOR_KEY = "sk-or-v1-simulator-local-0000000000000000"
VALIDATION_BATCH_ROWS = 50_000  # rows per batch of the validation pass
OPEN_FILES_HEADROOM = (
    64  # descriptors beyond one per request: journal, input files, stdio, the loop
)
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
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 3 if self.job_totals.failed else 0


@dataclass
class Prepared:
    """A job checked and ready to send: everything that does not need the network."""

    config: JobConfig
    source: Source
    builder: RequestBuilder
    layout: OutputLayout
    total: int  # input rows
    prompt_chars: int | None  # sum over rows, for the pre-flight cost check
    api_key: str
    fingerprint: dict[str, Any]
    limit: int | None
    changed: int = 0  # settled rows of an incremental job whose input changed since

    @property
    def variants(self) -> int:
        """Output rows per input row: models x samples."""
        return len(self.builder.variants)

    @property
    def slots(self) -> int:
        """Output rows (and journal entries) of the whole job."""
        return self.total * self.variants


def prepare(config: JobConfig, limit: int | None = None) -> Prepared:
    """Every check that needs no network: input, columns, ids, output folder, API key."""
    source = open_source(config.input.path, config.input.format)
    builder = RequestBuilder(config, source.columns)
    layout = OutputLayout.for_job(config, builder.answers, source.columns)
    output = Path(config.output.path)
    if any(output.resolve() == p.resolve() for p in source.paths):
        raise InputError(
            f"output.path (--output) {output} is the input file; choose another output path"
        )
    total, prompt_chars = validate_rows(source, config, builder, limit)
    api_key = SIMULATOR_KEY if config.request.simulate else read_api_key(config)
    if api_key is None:
        raise ConfigError(
            f"no API key: set {KEY_ENV} in the environment (or request.key_file in the config); or try --simulate"
        )
    fingerprint = {"input": source.fingerprint(), "config": config.request_fingerprint()}
    return Prepared(
        config, source, builder, layout, total, prompt_chars, api_key, fingerprint, limit
    )


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


def run_job(config: JobConfig, options: RunOptions | None = None) -> JobReport:
    """Run (or resume) the job; raise a `UserError`, `JobStopped`, `OutOfTime` or `Interrupted`
    if it cannot finish."""
    options = options or RunOptions()
    started = options.started
    check_folders(config)
    with JobLock(config.output.journal_path):
        ensure_open_files(config.limits.concurrency)
        job = prepare(config, options.limit)
        report = asyncio.run(_run(job, options))
    report.wall_seconds = time.monotonic() - started
    return report


def check_folders(config: JobConfig) -> None:
    """The output and journal folders exist and take new files (tried, not guessed: root passes
    every permission check, yet a read-only or immutable folder still refuses)."""
    for path, key in (
        (Path(config.output.path), "output.path (--output)"),
        (config.output.journal_path, "output.journal (--journal)"),
    ):
        folder = path.parent
        if not folder.is_dir():
            raise InputError(f"{key} {path}: folder {folder} does not exist; create it first")
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".pipeline-probe-"):
                pass
        except OSError as exc:
            raise InputError(
                f"{key} {path}: folder {folder} is not writable ({exc.strerror})"
            ) from None


def ensure_open_files(concurrency: int) -> None:
    """Each request in flight holds a socket: raise the soft open-file limit if it is too low for
    `concurrency`, and say so up front when even the hard limit is."""
    needed = concurrency + OPEN_FILES_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ConfigError(
            f"limits.concurrency (--concurrency) {concurrency} needs about {needed} open files, but this process may "
            f"open at most {hard} (ulimit -n); lower the concurrency or raise the limit"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@contextlib.asynccontextmanager
async def connect(config: JobConfig, api_key: str) -> AsyncIterator[OpenRouterClient]:
    """A client for the job's endpoint; with `request.simulate`, a simulator started for it."""
    async with contextlib.AsyncExitStack() as stack:
        base_url = config.request.base_url
        if config.request.simulate:
            from pipeline.simulator import serve

            base_url = (await stack.enter_async_context(serve())).base_url
        req = config.request
        yield await stack.enter_async_context(
            OpenRouterClient(
                base_url, api_key, concurrency=config.limits.concurrency, timeout=req.timeout,
                connect_timeout=req.connect_timeout, referer=req.referer, title=req.title,
            )
        )  # fmt: skip


async def load_catalogue(
    client: OpenRouterClient, config: JobConfig, *, refresh: bool = False
) -> Catalogue | None:
    """Prices from `/models`: from the disk cache when fresh, else fetched (and cached)."""
    endpoint = "(simulator)" if config.request.simulate else config.request.base_url
    if not refresh and (cached := cached_listing(endpoint, config.cost.prices_ttl)) is not None:
        body, fetched_at = cached
        return Catalogue.from_response(body, fetched_at)
    body = await client.get_json("/models")
    if body is None:
        return None
    store_listing(endpoint, body)
    return Catalogue.from_response(body, time.time())


async def _run(job: Prepared, options: RunOptions) -> JobReport:
    config = job.config
    async with connect(config, job.api_key) as client:
        catalogue = await load_catalogue(client, config)
        _check_models(config, catalogue)
        job.builder.use_native_n(catalogue)
        with contextlib.ExitStack() as stack:
            journal = stack.enter_context(
                Journal.open(
                    config.output.journal_path,
                    job.fingerprint,
                    restart=options.restart,
                    incremental=config.input.incremental,
                )
            )
            cache = ResponseCache(Path(config.request.cache)) if config.request.cache else None
            if cache is not None:
                stack.callback(cache.close)
            output = None
            if options.write_output:
                groups = job.source.arrow_batches(job.limit, size=job.layout.group_rows)
                output = OutputWriter(
                    job.layout, groups, job.slots, journal, Path(config.output.path)
                )
                stack.callback(output.discard)  # the unfinished file, if the run stops
            report = JobReport(
                output=Path(config.output.path),
                total_rows=job.slots,
                skipped=journal.settled_count(below=job.slots),
            )
            budget = None
            if config.cost.max_cost is not None:
                budget = Budget(config.cost.max_cost, journal.totals(below=job.slots).true_cost_usd)
            progress = Progress(
                job.slots, report.skipped, quiet=options.quiet, budget=budget,
                stream=options.stream, logs=options.logs,
            )  # fmt: skip
            progress.event(
                "start", rows=job.slots, already_done=report.skipped, output=str(report.output),
                models=list(config.request.models or (config.request.model,)),
                pid=os.getpid(), version=__version__,
            )  # fmt: skip
            warning = await _preflight(client, config, catalogue, job, report.skipped)
            if warning:
                report.warnings.append(warning)
                progress.event("warning", message=f"warning: {warning}")
            try:
                with _event_loop_first():
                    await _dispatch(
                        job, client, catalogue, budget, journal, cache, output, report,
                        progress, options.started,
                    )  # fmt: skip
            except CreditsError as exc:
                raise CreditsError(f"{exc}{await _key_figures(client)}") from None
            await reconcile(client, journal, progress, patience=config.cost.reconcile_timeout)
            report.job_totals = journal.totals(below=job.slots)
            report.changed = job.changed
            if output is not None:
                output.finish(
                    {
                        "tool": "prompt-pipeline", "version": __version__,
                        "config_fingerprint": config.fingerprint_hash(),
                        "model": config.request.model, **report.job_totals.as_dict(),
                    }
                )  # fmt: skip
                report.write_seconds = output.final_seconds
                report.write_cpu_seconds = output.cpu_seconds
    return report


@contextlib.contextmanager
def _event_loop_first() -> Iterator[None]:
    """Keep pauses out of the event loop while requests are being sent; a paused loop holds back
    sends and then lets them out in a bunch, one too many for the server's rate window
    (benchmarks/run.py, rate precision).

    - Everything made so far (the modules of polars, pyarrow, aiohttp...) lives to the end:
      frozen, it is no longer scanned by each full garbage collection, a ~30 ms pause.
    - The threads that prepare the next batch and commit the journal share the GIL with the
      loop, which at the default 5 ms switch interval could wait that long for it, time after
      time: the first sends of a run reached the server 15 ms late. At 0.5 ms, 4 ms."""
    gc.freeze()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def validate_rows(
    source: Source, config: JobConfig, builder: RequestBuilder, limit: int | None
) -> tuple[int, int | None]:
    """Count the rows (checking every one can be read), refuse duplicate or null ids, and sum
    the prompt lengths for estimates, in one pass before anything is sent.

    The pass reads the input a batch at a time, so memory stays flat with the row count: ids
    are kept only as 64-bit hashes (8 bytes a row), and only when two hashes meet is the input
    searched for the actual duplicate."""
    id_column = config.input.id_column
    aggregates = [pl.len().alias("rows")]
    if builder.prompt_expr is not None:
        aggregates.append(builder.prompt_expr.str.len_chars().sum().alias("chars"))
    if id_column:
        aggregates.append(pl.col(id_column).null_count().alias("nulls"))
    rows = chars = nulls = 0
    id_hashes = []
    try:
        for batch in source.batches(limit, size=VALIDATION_BATCH_ROWS):
            stats = batch.select(aggregates).row(0, named=True)
            rows += stats["rows"]
            chars += stats.get("chars") or 0
            if id_column:
                nulls += stats["nulls"]
                id_hashes.append(batch[id_column].drop_nulls().hash())
    except pl.exceptions.PolarsError as exc:
        raise InputError(
            f"input {source.pattern} cannot be read: {str(exc).strip().splitlines()[0]}"
        ) from None
    if rows == 0:
        raise InputError(f"input {source.pattern} has no rows")
    if id_column and id_hashes and pl.concat(id_hashes).n_unique() < rows - nulls:
        ids = pl.col(id_column)
        example = source.lazy(limit).select(ids.filter(ids.is_duplicated()).first()).collect()
        if example.height and example.item() is not None:  # not just two hashes colliding
            raise InputError(
                f"input.id_column (--id-column) '{id_column}' has duplicate values (e.g. {example.item()!r}); ids must be unique"
            )
    if nulls:
        raise InputError(
            f"input.id_column (--id-column) '{id_column}' is null in {nulls} row(s); ids must be present"
        )
    return rows, chars if builder.prompt_expr is not None else None


def _check_models(config: JobConfig, catalogue: Catalogue | None) -> None:
    """Refuse a model the endpoint does not list (when it lists any), before anything is sent."""
    wanted = [("request.model (--model)", config.request.model)]
    wanted += [("request.models (--models)", m) for m in config.request.models or ()]
    wanted += [("request.fallback_models", m) for m in config.request.fallback_models or ()]
    if catalogue is not None and catalogue.models:
        for key, model in wanted:
            if model not in catalogue:
                raise InputError(
                    f"{key}: the endpoint has no model {model!r}; see `pipeline models --search {model.split('/')[-1][:12]}`"
                )
    if config.cost.max_cost is not None:
        for key, model in wanted:
            price = catalogue.get(model) if catalogue is not None else None
            if price is None:
                raise ConfigError(
                    f"cost.max_cost (--max-cost) needs prices, and the endpoint's /models does not price {key} {model!r}"
                )
            if most_output_tokens(price, 0, config.request.max_tokens) is None:
                raise ConfigError(unknown_limit(key, model))


async def _preflight(
    client: OpenRouterClient,
    config: JobConfig,
    catalogue: Catalogue | None,
    job: Prepared,
    settled: int,
) -> str | None:
    """Warn when the job could cost more than the key has left (`GET /key` -> limit_remaining)."""
    models = config.request.models or (config.request.model,)
    prices = [catalogue.get(model) for model in models] if catalogue else [None]
    if job.prompt_chars is None or any(price is None for price in prices):
        return None
    body = await client.get_json("/key")
    remaining = (
        (body or {}).get("data", {}).get("limit_remaining") if isinstance(body, dict) else None
    )
    if not isinstance(remaining, int | float):
        return None
    left = max(job.slots - settled, 0) / job.slots
    samples = config.request.n
    prompt_tokens = (job.prompt_chars / 4 + MESSAGE_OVERHEAD_TOKENS * job.total) * left * samples
    output_tokens = (
        (config.request.max_tokens or config.cost.expected_output_tokens or 256)
        * job.total
        * left
        * samples
    )
    estimate = sum(
        price.cost(int(prompt_tokens), int(output_tokens)) for price in prices if price is not None
    )
    if estimate > remaining:
        return f"this job could cost up to ${estimate:.4f} but the key has ${remaining:.4f} left (GET /key limit_remaining); it will stop with exit 4 when the credit runs out"
    return None


async def _key_figures(client: OpenRouterClient) -> str:
    body = await client.get_json("/key")
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        return ""
    parts = [
        f"{name} ${data[name]:.4f}"
        for name in ("usage", "limit", "limit_remaining")
        if isinstance(data.get(name), int | float)
    ]
    return f" (key: {', '.join(parts)})" if parts else ""


async def _dispatch(
    job: Prepared,
    client: OpenRouterClient,
    catalogue: Catalogue | None,
    budget: Budget | None,
    journal: Journal,
    cache: ResponseCache | None,
    output: OutputWriter | None,
    report: JobReport,
    progress: Progress,
    started: float,
) -> None:
    config = job.config
    limits = Limits(config.limits.requests_per_second, config.limits.tpm)
    stopping = asyncio.Event()
    reservations = (
        Reservations(budget, catalogue, config.request.fallback_models or ())
        if budget is not None
        else None
    )
    answerer = ChatAnswerer(
        client, limits, RetryPolicy.from_config(config.retry), catalogue=catalogue,
        reservations=reservations, answers=job.builder.answers,
        invalid_retries=config.retry.invalid_retries, stopping=stopping,
        on_lost=lambda lost: writer.add_lost([lost]),
    )  # fmt: skip
    dispatcher = Dispatcher(answerer, config.limits.concurrency, stopping=stopping)
    final = FinalSlots()

    def committed(stored: list[tuple[Any, ...]]) -> None:  # in the journal writer's thread
        if output is not None:
            output.committed(stored)  # before the slots are final: the group is written from them
        final.committed(stored)

    writer = JournalWriter(journal, cache, on_commit=committed)
    interrupted = _on_signals(dispatcher, progress)
    out_of_time = _on_deadline(dispatcher, progress, started, config.limits.max_runtime)
    flusher = asyncio.create_task(writer.run())
    writing_done = asyncio.Event()
    writing = asyncio.create_task(output.write_ahead(final, writing_done)) if output else None
    log_prompts = progress.logs.prompts
    try:

        def finished(row: Row, result: Result) -> None:
            writer.add(result)
            prompt = _prompt_text(row) if log_prompts and result.status != OK else None
            progress.update(result, answerer.retries, limits.rate_limited, prompt)

        await dispatcher.run(_pending(job, journal, cache, final), finished)
    except JobStopped as exc:
        progress.event(
            "stopping", reason=type(exc).__name__, message="stopping: no more requests will be sent"
        )
        raise
    finally:
        writer.stop()
        await flusher
        await writer.flush()
        writing_done.set()
        if writing is not None:
            await writing
        progress.close()
        report.retries = answerer.retries
        _restore_signals()
    if interrupted:
        raise Interrupted(interrupted[0])
    left = job.slots - journal.settled_count(below=job.slots) if out_of_time else 0
    if left:
        raise OutOfTime(
            f"--max-runtime reached: stopped sending and saved the journal, {left:,} row(s) left; the next run resumes"
        )


def _on_deadline(
    dispatcher: Dispatcher, progress: Progress, started: float, max_runtime: float | None
) -> list[bool]:
    """With a runtime limit: stop taking rows a grace period before it (10% of the limit, at
    most a minute), abandon what is still in flight halfway through the grace (those rows are
    sent again next run), and leave the rest of it to flush the journal and exit."""
    fired: list[bool] = []
    if max_runtime is None:
        return fired
    loop = asyncio.get_running_loop()
    grace = min(60.0, 0.1 * max_runtime)
    stop_at = started + max_runtime - grace  # time.monotonic() is the loop's clock

    def stop() -> None:
        fired.append(True)
        progress.event(
            "stopping", reason="max_runtime",
            message=f"--max-runtime: {grace:.0f}s left, finishing in-flight requests, then saving the journal",
        )  # fmt: skip
        dispatcher.stop()
        loop.call_later(grace / 2, dispatcher.abort)

    loop.call_at(stop_at, stop)
    return fired


def _prompt_text(row: Row) -> str | None:
    """The last message of a row's request, for `--log-prompts`."""
    if row.body is None:
        return None
    content = json.loads(row.body)["messages"][-1].get("content")
    return content if isinstance(content, str) else json.dumps(content)


Settled = Callable[[int, int], dict[int, tuple[str, str | None]]]


def pending_batches(job: Prepared, settled: Settled) -> Iterator[tuple[list[Row], int]]:
    """The rows still to do, a batch at a time, in input order, each with the slot the batch
    ends before; `settled(low, high)` gives the slots in [low, high) that an earlier run
    finished, with the id and request they were for."""
    variants = job.variants
    # The first requests wait for the first batch: one row per worker is enough to start them.
    first = max(job.config.limits.concurrency // variants, 1)
    for batch in job.source.batches(job.limit, first=first):
        positions = batch[POSITION]
        low, high = positions[0] * variants, (positions[-1] + 1) * variants
        done = settled(low, high)
        if job.config.input.incremental:
            yield _new_or_changed(job, job.builder.rows(batch), done), high
            continue
        if done:  # drop the input rows whose every variant is done
            per_row = Counter(slot // variants for slot in done)
            finished = [p for p, count in per_row.items() if count == variants]
            batch = batch.filter(~pl.col(POSITION).is_in(finished))
        yield job.builder.rows(batch, set(done)), high


def _new_or_changed(
    job: Prepared, rows: list[Row], done: dict[int, tuple[str, str | None]]
) -> list[Row]:
    """An incremental job's rows to send: those not done, and (with `reprocess_changed`) those
    done for another id or another request than they would be now; the others are counted."""
    todo = []
    for row in rows:
        earlier = done.get(row.slot)
        if earlier is None:
            todo.append(row)
            continue
        key, request_hash = earlier
        if key == row.key and (
            request_hash is None or row.body is None or request_hash == row.request_hash
        ):
            continue
        job.changed += 1
        if job.config.input.reprocess_changed:
            todo.append(row)
    return todo


def _pending(
    job: Prepared, journal: Journal, cache: ResponseCache | None, final: FinalSlots
) -> Iterator[list[Row]]:
    """Rows still to do, a batch at a time. Those whose request was already answered (earlier in
    this job, or in the shared cache) carry that answer. Runs in a thread (see RowFeed)."""
    for rows, passed in pending_batches(job, journal.settled_requests):
        hashes = list({row.request_hash for row in rows if row.body is not None})
        answered = journal.answers(hashes)
        cached = cache.lookup([h for h in hashes if h not in answered]) if cache else {}
        for row in rows:
            if (earlier := answered.get(row.request_hash)) is not None:
                row.reuse = earlier.reused_for(row, DUPLICATE)
            elif (stored := cached.get(row.request_hash)) is not None:
                row.reuse = stored.reused_for(row, CACHE)
        final.fed(rows, passed)
        yield rows


async def reconcile(
    client: OpenRouterClient,
    journal: Journal,
    progress: Progress | None = None,
    patience: float = 60.0,
) -> None:
    """Ask `/generation` what the lost attempts cost. It may answer 404 for a while after a
    generation, so poll with back-off; what is still unknown after `patience` seconds waits for a later run."""
    pending = set(journal.unreconciled())
    if not pending:
        return
    if progress is not None:
        progress.log(
            f"reconciling {len(pending)} attempt(s) whose answer never arrived (GET /generation)"
        )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    delay = 0.5
    gate = asyncio.Semaphore(8)

    async def look_up(generation_id: str) -> tuple[str, float | None, bool]:
        async with gate:
            status, body = await client.get_status_json("/generation", id=generation_id)
        data = body.get("data") if isinstance(body, dict) else None
        if (
            status == 200
            and isinstance(data, dict)
            and isinstance(data.get("total_cost"), int | float)
        ):
            return generation_id, float(data["total_cost"]), True
        return (
            generation_id,
            None,
            status not in (404, 0, 429) and status < 500,
        )  # give up on other errors

    while pending:
        found = await asyncio.gather(*(look_up(g) for g in pending))
        costs = {g: cost for g, cost, _ in found if cost is not None}
        journal.reconcile(costs)
        pending -= {g for g, cost, final in found if cost is not None or final}
        if not pending or loop.time() + delay > deadline:
            break
        await asyncio.sleep(delay)
        delay = min(delay * 2, 8.0)


def _on_signals(dispatcher: Dispatcher, progress: Progress) -> list[int]:
    """SIGINT/SIGTERM stop dispatching, give in-flight requests a moment, then abandon them."""
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def handle(signum: int) -> None:
        if received:
            return  # a second Ctrl-C while stopping changes nothing: the flush must finish
        received.append(signum)
        progress.event(
            "stopping", reason=signal.Signals(signum).name,
            message=f"received {signal.Signals(signum).name}: finishing in-flight requests, then saving the journal",
        )  # fmt: skip
        dispatcher.stop()
        loop.call_later(SHUTDOWN_GRACE, dispatcher.abort)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, handle, signum)
    return received


def _restore_signals() -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(signum)
