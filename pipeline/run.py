"""`Run`, which owns one run's live parts (the client, journal, cache, output, progress and
the dispatcher), why it stopped, and the order they shut down in: so that what was paid for is
saved whatever stops it. `run_job` (in `job`) makes every check first, then calls `run_plan`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import __version__
from pipeline.attempt import ChatAnswerer
from pipeline.budget import Budget, BudgetReached, Cap
from pipeline.cache import ResponseCache
from pipeline.client import OpenRouterClient, connect
from pipeline.cluster import check_engine
from pipeline.dispatch import Dispatcher
from pipeline.errors import CreditsError, DiskFull, Interrupted, JobStopped, OutOfTime, UserError
from pipeline.feed import Feed, with_earlier_answers
from pipeline.identity import Realignment, realign
from pipeline.job import SHUTDOWN_GRACE, JobReport, RunOptions, Stop
from pipeline.journal import Journal
from pipeline.limits import Limits
from pipeline.money import (
    Catalogue,
    Reservations,
    cache_saving,
    credit_warning,
    key_figures,
    load_catalogue,
    reconcile,
)
from pipeline.options import describe
from pipeline.output import ANSWERS_KEPT, FinalSlots, OutputWriter
from pipeline.places import is_remote
from pipeline.plan import JobPlan, check_models
from pipeline.progress import Progress
from pipeline.prompts import MESSAGE_OVERHEAD_TOKENS
from pipeline.records import OK, TYPICAL_ANSWER_TOKENS, Result, Row
from pipeline.retry import RetryPolicy
from pipeline.settings import transport
from pipeline.writer import JournalWriter

if TYPE_CHECKING:
    from pipeline.batch_mode import BatchRunner
    from pipeline.cluster import Cluster


async def run_plan(plan: JobPlan, key: str, options: RunOptions) -> JobReport:
    """Send what the plan still has to do and write its output."""
    check_engine(plan.config)
    async with connect(plan.config, key) as client:
        catalogue = await load_catalogue(client, plan.config)
        check_models(plan.config, catalogue)
        with Run(plan, client, catalogue, options, key=key) as run:
            return await run.execute()


class Run:
    """One run of a planned job: opens the journal, the cache, the output and the progress
    display; sends the rows still to do; stops on a signal, the deadline or a job-wide failure;
    and shuts down in order (no new rows, the requests in flight, the journal's last commit,
    the output's groups, the display), so that what was paid for is saved whatever stops it."""

    def __init__(
        self,
        plan: JobPlan,
        client: OpenRouterClient,
        catalogue: Catalogue | None,
        options: RunOptions,
        *,
        key: str | None = None,  # for the workers of `--engine ray`
    ) -> None:
        self.plan = plan
        self.key = key
        self.config = plan.config
        self.client = client
        self.catalogue = catalogue
        self.options = options
        self.builder = plan.builder.for_catalogue(catalogue)
        self.stopped: Stop | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Run:
        config, plan, options = self.config, self.plan, self.options
        with self._stack as stack:
            ray = None
            if config.cluster.engine == "ray":  # first: what it refuses leaves nothing written
                from pipeline.cluster import join_cluster

                ray = stack.enter_context(join_cluster(config, plan.source.paths))
            self.journal = stack.enter_context(
                Journal.open(
                    config.output.journal_path, plan.fingerprint, restart=options.restart,
                    incremental=config.input.incremental, transport=transport(config),
                    redo=options.redo is not None, keyed=config.input.id_column is not None,
                )
            )  # fmt: skip
            self.builder = self.builder.seeded(self.journal.hash_seed)
            self.realignment = (
                realign(plan, self.builder, self.journal)
                if config.input.incremental
                else Realignment()
            )
            redone = options.redo.choose(self.journal, plan.slots) if options.redo else []
            self.journal.redo(redone)
            self._redone = redone
            self.cache = ResponseCache(Path(config.request.cache)) if config.request.cache else None
            if self.cache is not None:
                stack.callback(self.cache.close)
            self.output = None
            if options.write_output:
                groups = plan.source.arrow_batches(plan.limit, size=plan.layout.group_rows)
                self.output = OutputWriter(
                    plan.layout, groups, plan.slots, self.journal, config.output.local_path
                )
                stack.callback(self.output.discard)  # the unfinished file, if the run stops
            self.report = JobReport(
                output=config.output.local_path,
                total_rows=plan.slots,
                skipped=self.journal.settled_count(below=plan.slots),
            )
            caps = Cap.for_job(config.cost, self.journal, plan.slots, time.time())
            self.budget = Budget(caps) if caps else None
            self.cluster: Cluster | None = None
            if ray is not None:
                from pipeline.cluster import start_actors

                assert self.key is not None
                self.cluster = start_actors(
                    ray, config, self.key, self.catalogue, self.builder.answers, caps
                )
            self.progress = Progress(
                plan.slots, self.report.skipped, quiet=options.quiet, budget=self.budget,
                stream=options.stream, logs=options.logs, bar=options.progress_bar,
            )  # fmt: skip
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def stop(self, stop: Stop, grace: float) -> None:
        """Take no more rows; abandon the requests still in flight after `grace` seconds (their
        rows are sent again by the next run). A signal overrides the deadline's stop (its
        shorter grace, its exit code: a scheduler's SIGTERM is followed by SIGKILL); a second
        signal changes nothing, as the journal's flush must finish."""
        if self.stopped is not None and (self.stopped.signum is not None or stop.signum is None):
            return
        self.stopped = stop
        self.progress.event("stopping", reason=stop.reason, message=stop.message)
        self.dispatcher.stop()
        asyncio.get_running_loop().call_later(grace, self.dispatcher.abort)

    async def execute(self) -> JobReport:
        config, plan, report = self.config, self.plan, self.report
        self.progress.event(
            "start", rows=plan.slots, already_done=report.skipped, output=str(report.output),
            models=list(config.request.models or (config.request.model,)),
            pid=os.getpid(), version=__version__,
        )  # fmt: skip
        for name, message, fields in self.journal.notices:
            self.progress.event(name, message=message, **fields)
        if self.options.redo is not None:
            count = len(self._redone)
            self.progress.event(
                "redo", rows=count, message=f"--redo: {count:,} row(s) done before are sent again"
            )
        warnings = (
            await self._credit_warning(),
            self._sticky_routing_warning(),
            self._logprobs_warning(),
        )
        for warning in warnings:
            if warning:
                report.warnings.append(warning)
                self.progress.event("warning", message=f"warning: {warning}")
        try:
            with _event_loop_first():
                await self._send()
        except CreditsError as exc:
            raise CreditsError(f"{exc}{await key_figures(self.client)}") from None
        await reconcile(
            self.client, self.journal, self.progress.log, patience=config.cost.reconcile_timeout
        )
        totals = self.journal.totals(below=plan.slots)
        saving = cache_saving(totals, self.catalogue)
        report.job_totals = dataclasses.replace(totals, cache_saving_usd=saving)
        report.changed = self.realignment.changed
        report.departed = self.realignment.departed
        if self.output is not None:
            try:
                self.output.finish(
                    {
                        "tool": "prompt-pipeline", "version": __version__,
                        "config_fingerprint": config.fingerprint_hash(),
                        "model": config.request.model, **report.job_totals.as_dict(),
                        "changed_rows": report.changed,
                        "rows_by_settings": self.journal.rows_by_settings(below=plan.slots),
                    }
                )  # fmt: skip
            except JobStopped as exc:  # the output cannot be written: resumable once sending began
                if self.progress.tally.done:
                    raise type(exc)(f"{exc}; {ANSWERS_KEPT}") from None
                raise UserError(f"{exc}. Nothing was sent; {ANSWERS_KEPT}") from None
            report.write_seconds = self.output.final_seconds
            report.write_cpu_seconds = self.output.cpu_seconds
            if is_remote(config.output.path):  # complete: only now does the object appear
                from pipeline.remote import publish

                publish(config.output.local_path, config.output.path, describe("output.path"))
                report.uploaded_to = config.output.path
        return report

    def _logprobs_warning(self) -> str | None:
        """Said once when a model of the job does not list `logprobs`: it is asked without."""
        models = self.config.request.models or (self.config.request.model,)
        lacking = [m for m in models if m in self.builder.without_logprobs]
        if not lacking:
            return None
        what = "its label_confidence stays null" if self.config.request.labels else "none are kept"
        return (
            f"{', '.join(lacking)} does not list logprobs among its supported parameters: it is "
            f"asked without {describe('request.logprobs')}, and {what}"
        )

    def _sticky_routing_warning(self) -> str | None:
        """Said once when `provider.order` keeps OpenRouter from routing a job that would read
        its system prompt from a provider's cache to the provider holding it."""
        config, catalogue = self.config, self.catalogue
        order = (config.request.provider or {}).get("order")
        if not order or not self.builder.system_prompt or catalogue is None:
            return None
        models = config.request.models or (config.request.model,)
        caching = [
            m for m in models if (price := catalogue.get(m)) and price.cache_read is not None
        ]
        if not caching:
            return None
        return (
            f"{describe('request.provider')} sets an order, which turns off OpenRouter's sticky "
            f"routing for {caching[0]}: its requests read the cached system prompt only while "
            "the first provider listed serves them (each other one pays to cache it again); "
            "leave out the order to let OpenRouter keep them where the prompt is cached"
        )

    async def _credit_warning(self) -> str | None:
        """Warn when the rows left could cost more than the key has left."""
        config, plan = self.config, self.plan
        if plan.prompt_chars is None:
            return None
        models = config.request.models or (config.request.model,)
        prices = [self.catalogue.get(m) if self.catalogue else None for m in models]
        left = max(plan.slots - self.report.skipped, 0) / plan.slots * config.request.n
        prompt_tokens = (plan.prompt_chars / 4 + MESSAGE_OVERHEAD_TOKENS * plan.rows) * left
        answer = config.request.max_tokens or config.cost.expected_output_tokens
        output_tokens = (answer or TYPICAL_ANSWER_TOKENS) * plan.rows * left
        return await credit_warning(self.client, prices, prompt_tokens, output_tokens)

    async def _send(self) -> None:
        """Send the rows still to do, each result to the journal as it comes, until done or
        stopped; then shut down in order."""
        config = self.config
        limits = Limits(
            config.limits.requests_per_second,
            config.limits.tpm,
            concurrency=config.limits.concurrency,
        )
        stopping = asyncio.Event()
        self.writer = JournalWriter(
            self.journal, self.cache, on_commit=self._committed, on_failure=self._journal_full
        )
        answering: dict[str, Any] = {
            "catalogue": self.catalogue,
            "reservations": Reservations(self.budget, self.catalogue, config.request.fallback_models or ())
            if self.budget is not None else None,
            "answers": self.builder.answers, "invalid_retries": config.retry.invalid_retries,
            "stopping": stopping, "on_lost": lambda lost: self.writer.add_lost([lost]),
        }  # fmt: skip
        policy, workers = RetryPolicy.from_config(config.retry), config.limits.concurrency
        if self.builder.embeddings:
            from pipeline.embed import EmbeddingAnswerer

            per_request = config.limits.inputs_per_request
            answerer: ChatAnswerer = EmbeddingAnswerer(
                self.client, limits, policy, inputs_per_request=per_request,
                params=self.builder.embedding_params, **answering,
            )  # fmt: skip
            workers *= per_request  # rows waiting to join requests; `limits` caps the requests
        elif self.cluster is not None:
            from pipeline.cluster import ClusterAnswerer

            answerer = ClusterAnswerer(
                self.cluster, self.client, limits, policy,
                unit_rows=config.cluster.unit_rows, **answering,
            )  # fmt: skip
        else:
            answerer = ChatAnswerer(self.client, limits, policy, **answering)
        sender: BatchRunner | Dispatcher
        if config.request.mode in ("batch", "auto"):
            sender = counted = self._batch_runner(answerer, stopping)
        else:
            sender = Dispatcher(answerer, workers, stopping=stopping)
            answerer.resting = sender.resting
            counted = answerer  # type: ignore[assignment]
        self.dispatcher = sender
        self.final = FinalSlots()
        self._fed = threading.Event()  # the first rows to send are fed (or there are none)
        journal = self.journal
        self.feed = Feed(self.plan, self.builder, journal.settled_slots, journal.settled_blocks())
        self._on_signals()
        deadline = self._on_deadline()
        flusher = asyncio.create_task(self.writer.run())
        writing_done = asyncio.Event()
        writing = (
            asyncio.create_task(self.output.write_ahead(self.final, writing_done, self._fed))
            if self.output is not None
            else None
        )
        progress, log_prompts = self.progress, self.progress.logs.prompts

        def finished(row: Row, result: Result) -> None:
            self.writer.add(result)
            prompt = _prompt_text(row) if log_prompts and result.status != OK else None
            progress.update(result, counted.retries, limits.rate_limited, prompt)

        try:
            await self.dispatcher.run(self._rows(), finished)
        except JobStopped as exc:
            progress.event(
                "stopping", reason=type(exc).__name__,
                message="stopping: no more requests will be sent",
                **(exc.details if isinstance(exc, BudgetReached) else {}),
            )  # fmt: skip
            raise
        finally:  # what was answered is saved, whatever ended the sending
            if deadline is not None:
                deadline.cancel()
            self.writer.stop()
            await flusher
            await self.writer.flush()
            writing_done.set()
            if writing is not None:
                await writing
            progress.close()
            self.report.retries = counted.retries
            _restore_signals(self._outer_signals)
            if self.options.stop_switch is not None:
                self.options.stop_switch.attach(None)
        self._raise_if_stopped()

    def _batch_runner(self, answerer: ChatAnswerer, stopping: asyncio.Event) -> BatchRunner:
        """Batch mode's sender: the Batch API at `[batch] base_url` (else the chat one), each
        model's `:batch` price for the cost of its answers, and the chat API for what is sent
        in sync mode (`auto`'s models without a batch endpoint, `batch_retry = "sync"`)."""
        # Imported here: a sync run does not load batch mode.
        from pipeline.batch_api import BatchAPI
        from pipeline.batch_mode import BatchRunner
        from pipeline.batch_prices import batch_endpoint
        from pipeline.sync_lane import SyncLane

        config, client = self.config, self.client
        sync = SyncLane(answerer, config.limits.concurrency, on_stop=lambda exc: None)
        runner = BatchRunner(
            BatchAPI(client, config.batch.base_url or client.base_url), self.journal,
            config.batch, RetryPolicy.from_config(config.retry),
            lambda model: batch_endpoint(client, model), flush=self.writer.flush, sync=sync,
            auto=config.request.mode == "auto", retry_in_sync=config.request.batch_retry == "sync",
            answers=self.builder.answers, invalid_retries=config.retry.invalid_retries,
            reservations=answerer.reservations, stopping=stopping, log=self.progress.log,
            show=self.progress.batches,
        )  # fmt: skip
        sync.on_stop = runner.stopped_by
        return runner

    def _journal_full(self, _failure: DiskFull) -> None:
        """A commit found no room: send nothing more (its answers could not be saved); the
        results wait in memory, and each later flush tries them again."""
        message = "stopping: the journal cannot be written, no more requests will be sent"
        self.stop(Stop("disk_full", message), SHUTDOWN_GRACE)

    def _raise_if_stopped(self) -> None:
        if self.stopped is not None and self.stopped.signum is not None:
            raise Interrupted(self.stopped.signum)
        left = self.plan.slots - self.journal.settled_count(below=self.plan.slots)
        failure, unsaved = self.writer.failure, self.writer.unsaved
        if failure is not None and (unsaved or left):
            lost = (
                f"{unsaved:,} answer(s) could not be saved and will be sent again; "
                if unsaved
                else ""
            )
            raise DiskFull(
                f"{failure}; stopped sending. {lost}the journal keeps every other answer: free some "
                "space and run the same command again (rows saved are not paid again)"
            )
        if self.stopped is not None and left:
            raise OutOfTime(
                f"--max-runtime reached: stopped sending and saved the journal, {left:,} row(s) left; the next run resumes"
            )

    def _rows(self) -> Iterator[list[Row]]:
        """The rows still to do, a batch at a time (in the row feed's thread)."""
        try:
            for rows, passed in with_earlier_answers(self.feed.batches(), self.journal, self.cache):
                self.final.fed(rows, passed)
                if rows:
                    self._fed.set()
                yield rows
        finally:
            self._fed.set()

    def _committed(self, stored: list[tuple[Any, ...]]) -> None:
        """A journal commit (in the writer's thread): the output keeps the results to write its
        group from them, before the slots count as final."""
        if self.output is not None:
            self.output.committed(stored)
        self.final.committed(stored)

    def _on_signals(self) -> None:
        """SIGINT/SIGTERM stop the run, give in-flight requests a moment, then abandon them."""
        loop = asyncio.get_running_loop()

        def handle(signum: int) -> None:
            name = signal.Signals(signum).name
            message = f"received {name}: finishing in-flight requests, then saving the journal"
            self.stop(Stop(name, message, signum), SHUTDOWN_GRACE)

        self._outer_signals: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():  # signals reach no other
            self._outer_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for signum in self._outer_signals:
            loop.add_signal_handler(signum, handle, signum)
        if self.options.stop_switch is not None:
            self.options.stop_switch.attach(
                lambda signum: loop.call_soon_threadsafe(handle, signum)
            )

    def _on_deadline(self) -> asyncio.TimerHandle | None:
        """With a runtime limit: stop taking rows a grace period before it (10% of the limit, at
        most a minute), abandon what is still in flight halfway through the grace (those rows
        are sent again next run), and leave the rest of it to flush the journal and exit."""
        max_runtime = self.config.limits.max_runtime
        if max_runtime is None:
            return None
        grace = min(60.0, 0.1 * max_runtime)
        message = f"--max-runtime: {grace:.3g}s left, finishing in-flight requests, then saving the journal"
        stop = Stop("max_runtime", message)
        # time.monotonic() is the loop's clock
        stop_at = self.options.started + max_runtime - grace
        return asyncio.get_running_loop().call_at(stop_at, self.stop, stop, grace / 2)


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


def _prompt_text(row: Row) -> str | None:
    """The last message of a row's request, for `--log-prompts`."""
    if row.body is None:
        return None
    content = json.loads(row.body)["messages"][-1].get("content")
    return content if isinstance(content, str) else json.dumps(content)


def _restore_signals(handlers: dict[signal.Signals, Any]) -> None:
    """Give the signals back to the handlers they had before the run (the CLI's)."""
    loop = asyncio.get_running_loop()
    for signum, handler in handlers.items():
        loop.remove_signal_handler(signum)
        if handler is not None:
            signal.signal(signum, handler)
