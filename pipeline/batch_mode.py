"""Batch mode: the job's rows through OpenRouter's Batch API, about half the price, into the same
journal and output as a sync run. `BatchRunner.run(batches, on_result)` takes the place of the
dispatcher's (`dispatch.py`), so the feed, the journal writer and the output stay as they are.

In the order a run meets them: the batches earlier runs left unfinished (`journal_batches`:
looked for in the server's list if their create was never answered, then polled); the rows
still to do, one line per distinct request and model, cut into batches of `[batch]` lines and
bytes, each recorded in the journal before its create is sent; then every batch polled, with a
growing interval, until final, and its answers handed on, saved, and only then the batch marked
done. A line that failed is sent again in a later batch while the retry policy allows; the
lines of a batch that expired or was cancelled before they ran are sent again.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace

from pipeline.answers import AnswerSpec
from pipeline.attempt import answered, judge
from pipeline.batch_api import (
    Ambiguous,
    BatchAPI,
    BatchError,
    BatchState,
    NoBatchEndpoint,
    line_results,
    submission,
)
from pipeline.batch_config import BatchConfig
from pipeline.budget import BudgetReached
from pipeline.client import Completion
from pipeline.errors import BatchesPending, UserError
from pipeline.journal import Journal
from pipeline.journal_batches import SUBMITTING, BatchRecord
from pipeline.money import REPORTED, ModelPrice, Reservations
from pipeline.records import DUPLICATE, ERROR, Result, Row
from pipeline.retry import RetryPolicy

BATCH_PRICE = "batch_price"  # cost_source: tokens times the model's `:batch` price
# Seconds after its create in which a batch that reads 404 is taken as not readable yet (the
# record is written asynchronously); a 404 later means it is gone, which needs a person.
UNSEEN_GRACE = 600.0


@dataclass
class _Open:
    """A submitted batch this run waits for."""

    local_id: str
    server_id: str
    model: str
    lines: dict[str, str]  # request hash by custom id
    created_after: float


@dataclass
class _Waiting:
    """A request of this run that has no answer yet: its rows and attempts, and its body until
    its batch is recorded (the journal keeps it from then on)."""

    rows: list[Row]
    body: bytes | None
    model: str
    attempts: int = 0
    reserved: float = 0.0


class _Rows:
    """The feed's rows one at a time (each batch of them read in a thread), with room to put
    one back."""

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
    final and collected (or the run is stopping)."""

    def __init__(
        self, api: BatchAPI, journal: Journal, settings: BatchConfig, policy: RetryPolicy,
        prices: dict[str, ModelPrice | None], *, flush: Callable[[], Awaitable[None]],
        answers: AnswerSpec | None = None, reservations: Reservations | None = None,
        log: Callable[[str], None] = lambda line: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self.api, self.journal, self.settings, self.policy = api, journal, settings, policy
        self.prices, self.flush, self.answers, self.reservations = (
            prices,
            flush,
            answers,
            reservations,
        )
        self.log, self._sleep, self._clock = log, sleep, clock
        self.stopping = asyncio.Event()
        self.stopped: BudgetReached | None = None
        self.retries = 0
        self._waiting: dict[str, _Waiting] = {}
        self._open: list[_Open] = []
        self._on_result: Callable[[Row, Result], None] = lambda row, result: None

    def stop(self) -> None:
        self.stopping.set()

    def abort(self) -> None:
        self.stopping.set()

    async def run(
        self, batches: Iterator[list[Row]], on_result: Callable[[Row, Result], None]
    ) -> None:
        self._on_result = on_result
        log = self.journal.batches
        for record in await asyncio.to_thread(log.unfinished):
            await self._resume(record)
        pending = await asyncio.to_thread(log.pending_hashes)  # of the batches still open
        rows = _Rows(batches)
        while True:
            chunks: dict[str, _Chunk] = {}
            while self.stopped is None and not self.stopping.is_set():
                row = await rows.next()
                if row is None:
                    break
                if not await self._take(row, pending, chunks):
                    rows.put_back(row)  # the budget had no room for it
            for chunk in chunks.values():
                if self.stopping.is_set():  # a signal or the deadline: nothing more submitted
                    self._release(chunk)
                else:
                    await self._submit(chunk)
            await self._wait()
            if self.stopped is None or self.stopping.is_set() or not await self._room_again(rows):
                break
        if self.stopped is not None:
            raise self.stopped

    async def _room_again(self, rows: _Rows) -> bool:
        """Whether, the batches collected at what they really cost, the budget now has room
        for the row it had none for; if not, the stop is made again with today's figures."""
        row = await rows.next()
        assert row is not None
        assert self.reservations is not None
        rows.put_back(row)
        try:
            reserved = await self.reservations.reserve(
                row.model, row.prompt_tokens, row.max_tokens, 1, wait=False
            )
        except BudgetReached as exc:
            self.stopped = exc
            return False
        self.reservations.settle(reserved, 0.0)
        self.stopped = None
        return True

    # --------------------------------------------------------------------------------- rows

    async def _take(self, row: Row, pending: set[str], chunks: dict[str, _Chunk]) -> bool:
        """Answer the row, or add it to a batch; False when the budget has no room for it."""
        if row.body is None:
            self._on_result(row, Result.unsendable(row))
            return True
        if row.reuse is not None:
            self._on_result(row, row.reuse)
            return True
        if row.samples > 1:
            raise UserError(
                "batch mode sends one answer per request: several answers in one request (n with a native-n server) are sync mode's"
            )
        key = row.request_hash
        if (waiting := self._waiting.get(key)) is not None:
            waiting.rows.append(replace(row, body=None))  # an identical request: one line for all
            return True
        if key in pending:  # its line is in a batch an earlier run submitted (body on disk)
            self._waiting[key] = _Waiting([replace(row, body=None)], None, row.model)
            return True
        if self.stopping.is_set() or self.stopped is not None:
            return True
        reserved = 0.0
        if self.reservations is not None:
            try:  # a submitted batch cannot be cancelled: its worst case is reserved first
                reserved = await self.reservations.reserve(
                    row.model, row.prompt_tokens, row.max_tokens, 1, wait=False
                )
            except BudgetReached as exc:  # what was reserved is still sent
                self.stopped = exc
                return False
        self._waiting[key] = _Waiting(
            [replace(row, body=None)], row.body, row.model, reserved=reserved
        )
        chunk = chunks.setdefault(row.model, _Chunk(row.model))
        size = len(row.body) + 64
        if chunk.hashes and (
            len(chunk.hashes) >= self.settings.max_lines
            or chunk.size + size > self.settings.max_bytes
        ):
            await self._submit(chunk)
            chunk = chunks[row.model] = _Chunk(row.model)
        chunk.hashes.append(key)
        chunk.size += size
        return True

    # ------------------------------------------------------------------------------- submit

    async def _submit(self, chunk: _Chunk) -> None:
        if not chunk.hashes:
            return
        # A request hash is a valid custom_id.
        lines = [(key, key, self._body(key)) for key in chunk.hashes]
        body = submission(chunk.model, [(key, line) for key, _, line in lines])
        record = await asyncio.to_thread(
            self.journal.batches.begin, chunk.model, lines, self._clock()
        )
        for key in chunk.hashes:
            self._waiting[key].body = None  # on disk now, with the record
        await self._create(record, body, {key: key for key in chunk.hashes})

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

    async def _create(self, record: BatchRecord, body: bytes, lines: dict[str, str]) -> None:
        """Send the create; an answer lost on the way is looked for before sending it again."""
        delay = 1.0
        for _ in range(self.policy.max_attempts):
            try:
                state = await self.api.create(body)
            except NoBatchEndpoint as exc:
                await asyncio.to_thread(self.journal.batches.abandon, record.local_id)
                raise UserError(
                    f'{exc}; send {record.model} in sync mode (request.mode = "sync")'
                ) from None
            except Ambiguous as exc:
                self.log(f"batch create unanswered ({exc}); looking for it before sending it again")
                found = await self._find(record)
                if found is None:
                    continue
                state = found
            except BatchError as exc:
                if not exc.retry:  # refused: nothing was made
                    await asyncio.to_thread(self.journal.batches.abandon, record.local_id)
                    raise UserError(
                        f"the Batch API refused a batch of {record.lines:,} requests for {record.model}: {exc}"
                    ) from None
                await self._sleep(delay)
                delay = min(delay * 2, self.settings.poll_max)
                continue
            await asyncio.to_thread(
                self.journal.batches.submitted, record.local_id, state.id, state.status
            )
            self._open.append(
                _Open(record.local_id, state.id, record.model, lines, record.created_after)
            )
            self.log(f"batch {state.id}: {record.lines:,} requests for {record.model} submitted")
            return
        # Every attempt was refused, or lost and then not found: nothing was made.
        await asyncio.to_thread(self.journal.batches.abandon, record.local_id)
        raise UserError(
            f"could not submit a batch for {record.model} after {self.policy.max_attempts} attempts; run again to resume"
        )

    async def _find(self, record: BatchRecord) -> BatchState | None:
        """The server's batch for a create whose answer never came: one of the same model and
        size created since, not claimed by another record. The list may lag behind a new
        batch, so it is asked again for `list_lag` seconds before giving up."""
        known = await asyncio.to_thread(self.journal.batches.server_ids)
        waited, delay = 0.0, 1.0
        while True:
            try:
                listed = await self.api.created_since(record.created_after)
            except BatchError:
                listed = []
            for state in reversed(listed):  # the oldest first: ours came before any retry's
                if (
                    state.model == record.model
                    and state.total == record.lines
                    and state.id not in known
                ):
                    return state
            if waited >= self.settings.list_lag:
                return None
            await self._sleep(delay)
            waited += delay
            delay = min(delay * 2, self.settings.poll_max)

    async def _resume(self, record: BatchRecord) -> None:
        lines = await asyncio.to_thread(self.journal.batches.lines, record.local_id)
        server_id = record.server_id
        if record.state == SUBMITTING:
            found = await self._find(record)
            if found is None:  # never made: its lines are sent again, as new
                await asyncio.to_thread(self.journal.batches.abandon, record.local_id)
                return
            server_id = found.id
            await asyncio.to_thread(
                self.journal.batches.submitted, record.local_id, found.id, found.status
            )
        assert server_id is not None
        self._open.append(
            _Open(record.local_id, server_id, record.model, lines, record.created_after)
        )

    # ------------------------------------------------------------------------------ collect

    async def _wait(self) -> None:
        """Poll every open batch, the interval doubling up to `poll_max`, and collect each
        once final; a stopping run leaves the rest to the next (they are journaled), and so
        does one that does not wait, after one look."""
        delay = self.settings.poll_interval
        while self._open and not self.stopping.is_set():
            for batch in list(self._open):
                try:
                    state = await self.api.get(batch.server_id)
                except BatchError as exc:
                    # Right after its create a batch may not be readable yet; 5xx, 429 and
                    # dropped connections pass.
                    young = self._clock() - batch.created_after < UNSEEN_GRACE
                    if exc.retry or (exc.status == 404 and young):
                        self.log(f"batch {batch.server_id}: {exc}; asking again")
                        continue
                    raise UserError(
                        f"batch {batch.server_id}: {exc}; its rows are kept for the next run, "
                        "which asks for it again"
                    ) from None
                await asyncio.to_thread(
                    self.journal.batches.seen, batch.local_id, state.status, state.completed,
                    state.failed, state.expires_at,
                )  # fmt: skip
                # Completed but without results: the charge is settling, they come later.
                if state.final and (state.results is not None or state.status != "completed"):
                    await self._collect(batch, state)
                else:
                    done = state.completed + state.failed
                    self.log(f"batch {state.id}: {state.status}, {done:,} of {state.total:,} done")
            if self._open and not self.settings.wait:
                count = len(self._open)
                raise BatchesPending(
                    f"{count} batch{'es' if count > 1 else ''} submitted, results pending: run the "
                    "same command again to collect them (rows saved are not sent again)"
                )
            if self._open:
                await self._pause(delay)
                delay = min(delay * 2, self.settings.poll_max)

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or less if the run is told to stop."""
        waits = [
            asyncio.ensure_future(self.stopping.wait()),
            asyncio.ensure_future(self._sleep(seconds)),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _collect(self, batch: _Open, state: BatchState) -> None:
        results = line_results(state.results or [])
        price = self.prices.get(batch.model)
        latency_ms = max(0.0, self._clock() - batch.created_after) * 1000  # submit to collect
        resend: dict[str, _Chunk] = {}
        for custom_id, key in batch.lines.items():
            waiting = self._waiting.get(key)
            if waiting is None:
                continue  # settled before this run
            waiting.attempts += 1
            line = results.get(custom_id)
            if line is not None and line.completion is not None:
                self._answered(key, waiting, line.completion, price, latency_ms)
                continue
            if state.status == "failed":  # the whole batch refused: sent again, it would be again
                message = f"batch {state.id} failed: {state.error or 'no reason given'}"
                self._failed(key, waiting, "batch_failed", message, retry_on_resume=False)
                continue
            kind = line.error_type if line is not None else state.status
            message = (
                (line.error_message or kind or "no reason given")
                if line is not None
                else f"the batch was {state.status} before this request ran"
            )
            if waiting.attempts >= self.policy.max_attempts or self.stopping.is_set():
                attempts = f"{waiting.attempts} batch attempt{'s' if waiting.attempts > 1 else ''}"
                self._failed(
                    key, waiting, f"batch_{kind}", f"gave up after {attempts}; last: {message}"
                )
                continue
            self.retries += 1
            resend.setdefault(waiting.model, _Chunk(waiting.model)).hashes.append(key)
        await self.flush()  # the answers are saved before the batch counts as done
        cost = state.cost
        await asyncio.to_thread(
            self.journal.batches.done, batch.local_id, state.status, cost, self._clock()
        )
        self._open.remove(batch)
        self.log(
            f"batch {state.id}: {state.status}, {state.completed:,} answered, {state.failed:,} failed; cost ${cost or 0:.6f}"
        )
        if resend:  # their bodies, from the record of the batch they were in
            keys = {key: custom_id for custom_id, key in batch.lines.items()}
            wanted = [keys[key] for chunk in resend.values() for key in chunk.hashes]
            found = await asyncio.to_thread(self.journal.batches.bodies, batch.local_id, wanted)
            for chunk in resend.values():
                for key in chunk.hashes:
                    self._waiting[key].body = found[keys[key]]
                await self._submit(chunk)

    def _answered(
        self, key: str, waiting: _Waiting, completion: Completion, price: ModelPrice | None,
        latency_ms: float,
    ) -> None:  # fmt: skip
        """The answer to a line, given to every row that asked it."""
        cost: float | None = completion.cost  # a line may carry its cost
        source: str | None = REPORTED
        prompt, output = completion.prompt_tokens, completion.completion_tokens
        if cost is None and price is not None and prompt is not None and output is not None:
            cost = price.cost(
                prompt, output, completion.cached_tokens or 0, completion.cache_write_tokens or 0
            )
            source = BATCH_PRICE
        elif cost is None:
            source = None
        first, *others = waiting.rows
        (result,) = answered(first, completion, waiting.attempts, latency_ms, cost, source)
        if (verdict := judge(result, self.answers)) is not None:
            # Not asked again in this run: a later run sends it again (`retry_on_resume`).
            result = replace(
                result, status=ERROR, error_type=verdict.error_type, error_message=verdict.message,
                parsed=None, retry_on_resume=verdict.ask_again,
            )  # fmt: skip
        if self.reservations is not None:
            self.reservations.settle(waiting.reserved, cost)
        self._on_result(first, result)
        for row in others:
            self._on_result(row, result.reused_for(row, DUPLICATE))
        del self._waiting[key]

    def _failed(
        self, key: str, waiting: _Waiting, kind: str, message: str, *, retry_on_resume: bool = True
    ) -> None:
        if self.reservations is not None:
            self.reservations.settle(waiting.reserved, 0.0)
        for row in waiting.rows:
            self._on_result(row, Result(
                row.slot, row.key, status=ERROR, error_type=kind, error_message=message,
                attempts=waiting.attempts, request_hash=row.request_hash, digest=row.digest,
                retry_on_resume=retry_on_resume,
            ))  # fmt: skip
        del self._waiting[key]
