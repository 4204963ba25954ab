"""Batch mode: the job's rows through OpenRouter's Batch API, about half the price, into the same
journal and output as a sync run. `BatchRunner.run(batches, on_result)` takes the place of the
dispatcher's (`dispatch.py`), so the feed, the journal writer and the output stay as they are.

In the order a run meets them: the batches earlier runs left unfinished (`batch_submit`: looked
for in the server's list if their create was never answered, then polled); the rows still to
do, one line per distinct request and model, cut into batches of `[batch]` lines and bytes,
each recorded in the journal before its create is sent; then every batch polled, with a growing
interval, until final, and its answers handed on, saved, and only then the batch marked done.
A line that failed, or whose answer was turned down (labels, schema), is sent again in a later
batch while the retry policy allows (or in sync mode, `batch_retry = "sync"`); the lines of a
batch that expired or was cancelled before they ran are sent again. In `auto` mode a model the
Batch API does not take is sent in sync mode (`sync_lane`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace

from pipeline.answers import AnswerSpec
from pipeline.attempt import answered, judge, spend_with
from pipeline.batch_api import (
    BatchAPI,
    BatchState,
    NoBatchEndpoint,
    line_results,
    submission,
)
from pipeline.batch_config import BatchConfig
from pipeline.batch_prices import BatchEndpoint, bill, line_cost
from pipeline.batch_rows import Waiting, WaitingRows
from pipeline.batch_submit import Submitter
from pipeline.batch_wait import OpenBatch, Poller, Show
from pipeline.budget import BudgetReached
from pipeline.completions import Completion
from pipeline.errors import BatchesPending, JobStopped, UserError
from pipeline.journal import Journal
from pipeline.money import Reservations
from pipeline.records import DUPLICATE, ERROR, Result, Row
from pipeline.retry import RetryPolicy
from pipeline.sync_lane import SyncLane


class _Rows:
    """The feed's rows one at a time (each batch of them read in a thread), with room to put
    one back. Not `dispatch.RowFeed`, which prepares the next batch ahead: one prepared before
    a collection would not see that collection's answers, and would send them again."""

    def __init__(self, batches: Iterator[list[Row]]) -> None:
        self._batches = batches
        self._current: deque[Row] = deque()
        self._done = False

    async def next(self) -> Row | None:
        while not self._current and not self._done:
            rows = await asyncio.to_thread(next, self._batches, None)
            if rows is None:
                self._done = True
            else:
                self._current.extend(rows)
        return self._current.popleft() if self._current else None

    def put_back(self, row: Row) -> None:
        self._current.appendleft(row)


@dataclass
class _Chunk:
    model: str
    hashes: list[str] = field(default_factory=list)
    size: int = 0


class BatchRunner:
    """Answers rows through the Batch API; `run` returns once every batch it waits for is
    final and collected (or the run is stopping). With a `sync` lane, `mode = "auto"` sends
    the models without a batch endpoint there, and `retry_in_sync` the lines to ask again."""

    def __init__(
        self, api: BatchAPI, journal: Journal, settings: BatchConfig, policy: RetryPolicy,
        endpoint: Callable[[str], Awaitable[BatchEndpoint]], *,
        flush: Callable[[], Awaitable[None]], sync: SyncLane | None = None, auto: bool = False,
        retry_in_sync: bool = False, answers: AnswerSpec | None = None, invalid_retries: int = 0,
        reservations: Reservations | None = None, stopping: asyncio.Event | None = None,
        log: Callable[[str], None] = lambda line: None, show: Show = lambda batches: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self.journal, self.settings, self.policy = journal, settings, policy
        self.submitter = Submitter(
            api, journal.batches, settings, policy, say=log, sleep=sleep, clock=clock
        )
        self.flush, self.sync, self.auto = flush, sync, auto
        self.retry_in_sync = retry_in_sync and sync is not None
        self.answers, self.invalid_retries, self.reservations = (
            answers,
            invalid_retries,
            reservations,
        )
        self.log, self._clock = log, clock
        self.stopping = stopping or asyncio.Event()
        self.poller = Poller(
            api, journal.batches, settings, self.stopping, say=log, show=show, sleep=sleep,
            clock=clock,
        )  # fmt: skip
        self.stopped: JobStopped | None = None
        self._endpoint = endpoint
        self._endpoints: dict[str, BatchEndpoint] = {}
        self._retries = 0
        self._waiting: dict[str, Waiting] = {}  # of the batches being made and collected
        self._spilled = WaitingRows()  # of the batches running
        self._pending = False  # whether earlier runs left batches running
        self._open: list[OpenBatch] = []
        self._on_result: Callable[[Row, Result], None] = lambda row, result: None

    @property
    def retries(self) -> int:
        return self._retries + (self.sync.retries if self.sync is not None else 0)

    def stop(self) -> None:
        self.stopping.set()

    def abort(self) -> None:
        self.stopping.set()
        if self.sync is not None:
            self.sync.abort()

    async def run(
        self, batches: Iterator[list[Row]], on_result: Callable[[Row, Result], None]
    ) -> None:
        self._on_result = on_result
        log = self.journal.batches
        for record in await asyncio.to_thread(log.unfinished):
            if (server_id := await self.submitter.resume(record)) is not None:
                self._pending = True
                self._open.append(
                    OpenBatch(record.local_id, server_id, record.model, record.created_after)
                )
        rows = _Rows(batches)
        try:
            while True:
                chunks: dict[str, _Chunk] = {}
                while self.stopped is None and not self.stopping.is_set():
                    row = await rows.next()
                    if row is None:
                        break
                    if not await self._take(row, chunks):
                        rows.put_back(row)  # the budget had no room for it
                for chunk in chunks.values():
                    if self.stopping.is_set():  # a signal or the deadline: nothing more sent
                        self._release(chunk)
                    else:
                        await self._submit(chunk)
                await self.poller.wait(self._open, self._collect)
                if self.sync is not None:
                    await self.sync.drain()
                if self._open and not self.settings.wait and not self.stopping.is_set():
                    count = len(self._open)
                    raise BatchesPending(
                        f"{count} batch{'es' if count > 1 else ''} submitted, results pending: run "
                        "the same command again to collect them (rows saved are not sent again)"
                    )
                if not self._budget_room_again() or not await self._room_again(rows):
                    break
        finally:
            if self.sync is not None:
                self.sync.abort()  # only when something failed: it is drained otherwise
            self._spilled.close()
        if self.stopped is not None:
            raise self.stopped

    def _budget_room_again(self) -> bool:
        """Whether to look again, once the batches are collected, for room the budget lacked."""
        return isinstance(self.stopped, BudgetReached) and not self.stopping.is_set()

    async def _room_again(self, rows: _Rows) -> bool:
        """Whether, the batches collected at what they really cost, the budget now has room
        for the row it had none for; if not, the stop is made again with today's figures."""
        row = await rows.next()
        if row is None:  # what it had no room for was a row's second try, or a sync request
            return False
        assert self.reservations is not None
        rows.put_back(row)
        try:
            reserved = await self.reservations.reserve(
                row.model, row.prompt_tokens, row.max_tokens, 1, wait=False, images=row.images
            )
        except BudgetReached as exc:
            self.stopped = exc
            return False
        self.reservations.settle(reserved, 0.0)
        self.stopped = None
        return True

    def stopped_by(self, exc: JobStopped) -> None:
        """A job-wide failure from the sync lane: a budget stop as the batches' own, anything
        else (401, 402) stops the run."""
        if self.stopped is None:
            self.stopped = exc
        if not isinstance(exc, BudgetReached):
            self.stopping.set()

    # --------------------------------------------------------------------------------- rows

    async def _take(self, row: Row, chunks: dict[str, _Chunk]) -> bool:
        """Answer the row, or add it to a batch; False when the budget has no room for it."""
        if row.body is None:
            self._on_result(row, Result.unsendable(row))
            return True
        if row.reuse is not None:
            self._on_result(row, row.reuse)
            return True
        key = row.request_hash
        if (waiting := self._waiting.get(key)) is not None:
            waiting.join(row)  # an identical request: one line for all
            return True
        if (running := self._running_batch_of(key)) is not None:
            row.body = None
            self._spilled.join(running, row)
            return True
        if self.stopping.is_set() or self.stopped is not None:
            return True
        if row.samples > 1 and not self.auto:
            raise UserError(
                "batch mode sends one answer per request: several answers in one request (n with a native-n server) are sync mode's"
            )
        chunk = chunks.setdefault(row.model, _Chunk(row.model))
        size = len(row.body) + 64
        if chunk.hashes and (
            len(chunk.hashes) >= self.settings.max_lines
            or chunk.size + size > self.settings.max_bytes
        ):
            chunks[row.model] = _Chunk(row.model)
            await self._submit(chunk)
            chunk = chunks[row.model]
        if row.samples > 1 or not await self._batchable(row.model):
            await self._send_sync(row)
            return True
        reserved = 0.0
        if self.reservations is not None:
            try:  # a submitted batch cannot be cancelled: its worst case is reserved first
                reserved = await self.reservations.reserve(
                    row.model, row.prompt_tokens, row.max_tokens, 1, wait=False, images=row.images
                )
            except BudgetReached as exc:  # what was reserved is still sent
                self.stopped = exc
                return False
        waiting = self._waiting[key] = Waiting.of(row, keep_body=True)
        waiting.reserved = reserved
        chunk.hashes.append(key)
        chunk.size += size
        return True

    def _running_batch_of(self, key: str) -> str | None:
        """The running batch whose line answers this request: this run's, or one an earlier
        run submitted (its body on disk)."""
        local_id = self._spilled.batch_of(key)
        if local_id is None and self._pending:
            local_id = self.journal.batches.pending_batch_of(key)
        return local_id

    async def _lookup(self, model: str) -> BatchEndpoint:
        if model not in self._endpoints:
            self._endpoints[model] = found = await self._endpoint(model)
            if self.auto and found.listed is False:
                self.log(f"{model} lists no :batch endpoint; its rows are sent in sync mode")
        return self._endpoints[model]

    async def _batchable(self, model: str) -> bool:
        """Whether the model's rows go into batches: always in batch mode (a model the Batch
        API does not take is refused by name); in auto mode, unless it lists no `:batch`
        endpoint or its submit was refused for want of one."""
        return not self.auto or (await self._lookup(model)).listed is not False

    async def _send_sync(self, row: Row) -> None:
        assert self.sync is not None
        await self.sync.send(row, lambda results: self._from_sync(row, results))

    def _from_sync(self, row: Row, results: list[Result]) -> None:
        for result in results:
            self._on_result(row, result)

    # ------------------------------------------------------------------------------- submit

    async def _submit(self, chunk: _Chunk) -> None:
        if not chunk.hashes:
            return
        # A request hash is a valid custom_id.
        lines = [(key, key, self._body(key)) for key in chunk.hashes]
        body = submission(chunk.model, [(key, line) for key, _, line in lines])
        record = await self.submitter.begin(chunk.model, lines)
        try:
            state = await self.submitter.create(record, body)
        except NoBatchEndpoint as exc:
            if not self.auto:
                raise UserError(
                    f'{exc}; send {record.model} in sync mode (request.mode = "sync" or "auto")'
                ) from None
            self.log(f"{exc}; its rows are sent in sync mode")
            self._endpoints[chunk.model] = BatchEndpoint(False, None)
            for key, _, line in lines:
                await self._resend_sync(key, line)
            return
        running = []  # their rows leave memory until the batch is collected
        for key in chunk.hashes:
            waiting = self._waiting[key]
            waiting.body = None  # on disk now, with the record
            if waiting.rejected is None:  # else kept here, with the answer turned down
                running.append(self._waiting.pop(key))
        await asyncio.to_thread(self._spilled.put, record.local_id, running)
        self._open.append(OpenBatch(record.local_id, state.id, record.model, record.created_after))

    def _release(self, chunk: _Chunk) -> None:
        """Rows that will not be sent this run: their reservations go back to the budget."""
        for key in chunk.hashes:
            waiting = self._waiting.pop(key)
            if self.reservations is not None:
                self.reservations.settle(waiting.reserved, 0.0)

    def _body(self, key: str) -> bytes:
        body = self._waiting[key].body
        assert body is not None
        return body

    async def _resend_sync(self, key: str, body: bytes) -> None:
        """Ask a line of a batch again in sync mode; the sync answerer reserves its own cost."""
        assert self.sync is not None
        waiting = self._waiting[key]
        if self.reservations is not None:
            self.reservations.settle(waiting.reserved, 0.0)
            waiting.reserved = 0.0
        row = replace(waiting.rows[0], body=body)
        await self.sync.send_again(
            row, lambda results: self._answered_in_sync(key, results),
            attempts=waiting.attempts, invalid=waiting.invalid, rejected=waiting.rejected,
        )  # fmt: skip

    def _answered_in_sync(self, key: str, results: list[Result]) -> None:
        waiting = self._waiting.pop(key)
        if results:  # none: the run stopped before it was sent, and the next run sends it
            (result,) = results
            self._hand_on(waiting, result)

    # ------------------------------------------------------------------------------ collect

    async def _collect(self, batch: OpenBatch, state: BatchState) -> None:
        lines = await asyncio.to_thread(self.journal.batches.lines, batch.local_id)
        self._waiting.update(await asyncio.to_thread(self._spilled.take, batch.local_id))
        results = line_results(state.results or [])
        price = (await self._lookup(batch.model)).price
        costs = {
            custom_id: line_cost(line.completion, price)
            for custom_id, line in results.items()
            if line.completion is not None
        }
        latency_ms = max(0.0, self._clock() - batch.created_after) * 1000  # submit to collect
        again: list[str] = []  # to ask again
        for custom_id, key in lines.items():
            waiting = self._waiting.get(key)
            if waiting is None:
                continue  # settled before this run
            waiting.attempts += 1
            line = results.get(custom_id)
            if line is not None and line.completion is not None:
                cost, source = costs[custom_id]
                if not await self._answered(waiting, line.completion, cost, source, latency_ms):
                    again.append(key)
                continue
            if state.status == "failed":  # the whole batch refused: sent again, it would be again
                message = f"batch {state.id} failed: {state.error or 'no reason given'}"
                self._failed(waiting, "batch_failed", message, retry_on_resume=False)
                continue
            kind = line.error_type if line is not None else state.status
            message = (
                (line.error_message or kind or "no reason given")
                if line is not None
                else f"the batch was {state.status} before this request ran"
            )
            if waiting.attempts >= self.policy.max_attempts or self.stopping.is_set():
                attempts = f"{waiting.attempts} batch attempt{'s' if waiting.attempts > 1 else ''}"
                self._failed(waiting, f"batch_{kind}", f"gave up after {attempts}; last: {message}")
                continue
            self._retries += 1
            again.append(key)
        await self.flush()  # the answers are saved before the batch counts as done
        known = [cost for cost, _ in costs.values()]
        lines_cost = None if None in known else sum(c for c in known if c is not None)
        await asyncio.to_thread(
            self.journal.batches.done, batch.local_id, state.status, state.cost, lines_cost,
            self._clock(),
        )  # fmt: skip
        self.log(
            f"batch {state.id}: {state.status}, {state.completed:,} answered, {state.failed:,} "
            f"failed; {bill(state.cost, lines_cost)}"
        )
        if again:  # their bodies, from the record of the batch they were in
            custom_ids = {key: custom_id for custom_id, key in lines.items()}
            found = await asyncio.to_thread(
                self.journal.batches.bodies, batch.local_id, [custom_ids[k] for k in again]
            )
            if self.retry_in_sync:
                for key in again:
                    await self._resend_sync(key, found[custom_ids[key]])
                return
            chunk = _Chunk(batch.model, again)
            for key in again:
                self._waiting[key].body = found[custom_ids[key]]
            await self._submit(chunk)

    async def _answered(
        self, waiting: Waiting, completion: Completion, cost: float | None, source: str | None,
        latency_ms: float,
    ) -> bool:  # fmt: skip
        """The answer to a line, given to every row that asked it; False when it was turned
        down (labels, schema) and is to be asked again."""
        if self.reservations is not None:
            self.reservations.settle(waiting.reserved, cost)
            waiting.reserved = 0.0
        (result,) = answered(
            waiting.rows[0], completion, waiting.attempts, latency_ms, cost, source, self.answers
        )
        result = spend_with(result, waiting.rejected)
        if (verdict := judge(result, self.answers)) is not None:
            if verdict.ask_again and await self._ask_again(waiting):
                waiting.invalid += 1
                waiting.rejected = result
                self._retries += 1
                return False
            result = replace(
                result, status=ERROR, error_type=verdict.error_type, error_message=verdict.message,
                parsed=None, retry_on_resume=verdict.ask_again,
            )  # fmt: skip
        self._hand_on(waiting, result)
        return True

    async def _ask_again(self, waiting: Waiting) -> bool:
        """Whether an answer turned down is asked again: within `invalid_retries`, and with
        room in the budget for the worst case of the line's next batch."""
        if waiting.invalid >= self.invalid_retries or self.stopping.is_set():
            return False
        if self.reservations is None or self.retry_in_sync:
            return True
        row = waiting.rows[0]
        try:
            waiting.reserved = await self.reservations.reserve(
                row.model, row.prompt_tokens, row.max_tokens, 1, wait=False, images=row.images
            )
        except BudgetReached as exc:
            self.stopped = self.stopped or exc
            return False
        return True

    def _hand_on(self, waiting: Waiting, result: Result) -> None:
        first, *others = waiting.rows
        self._on_result(first, result)
        for row in others:
            self._on_result(row, result.reused_for(row, DUPLICATE))
        self._waiting.pop(first.request_hash, None)

    def _failed(
        self, waiting: Waiting, kind: str, message: str, *, retry_on_resume: bool = True
    ) -> None:
        if self.reservations is not None:
            self.reservations.settle(waiting.reserved, 0.0)
        for row in waiting.rows:
            self._on_result(row, Result(
                row.slot, row.key, status=ERROR, error_type=kind, error_message=message,
                attempts=waiting.attempts, request_hash=row.request_hash, digest=row.digest,
                retry_on_resume=retry_on_resume,
            ))  # fmt: skip
        self._waiting.pop(waiting.rows[0].request_hash, None)
