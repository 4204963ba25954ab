"""The worker pool: a fixed number of workers pull rows from an iterator, hand each to an
`answer(row)` callable, and pass each result to a callback as it finishes.

It knows nothing of requests, money or files: how a row is answered (the chat API, a
provider's batch API, a distributed engine's worker) is the callable's business. A job-wide
failure (`JobStopped`: 401, 402, the budget) raised by it stops every worker from taking new
rows; results already handed on stand, the rows in flight finish, and the failure is raised
once the pool has drained. A row the answer gives up on because the run is stopping
(`NotSent`) has no result now: the next run sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator

from pipeline.errors import JobStopped, NotSent
from pipeline.records import Result, Row

Answer = Callable[[Row], Awaitable[list[Result]]]


class Dispatcher:
    """Runs rows through `concurrency` workers; at most that many rows are ever being answered."""

    def __init__(
        self, answer: Answer, concurrency: int, *, stopping: asyncio.Event | None = None
    ) -> None:
        self.answer = answer
        self.concurrency = concurrency
        self.stopping = stopping or asyncio.Event()
        self.stopped: JobStopped | None = None
        self._workers: list[asyncio.Task[None]] = []

    def stop(self) -> None:
        """Take no new rows; rows being answered finish."""
        self.stopping.set()

    def abort(self) -> None:
        """Abandon the rows being answered too (they are sent again by the next run)."""
        self.stopping.set()
        for worker in self._workers:
            worker.cancel()

    async def run(
        self, batches: Iterator[list[Row]], on_result: Callable[[Row, Result], None]
    ) -> None:
        """Answer every row; `on_result` gets each result as it finishes. Returns when all are
        done; raises the job-wide failure, if one stopped the pool, once it has drained."""
        feed = RowFeed(batches)
        self._workers = [
            asyncio.create_task(self._worker(feed, on_result)) for _ in range(self.concurrency)
        ]
        try:
            outcomes = await asyncio.gather(*self._workers, return_exceptions=True)
        finally:
            for worker in self._workers:
                worker.cancel()
            await feed.aclose()
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, asyncio.CancelledError
            ):
                raise outcome
        if self.stopped is not None:
            raise self.stopped

    async def _worker(self, feed: RowFeed, on_result: Callable[[Row, Result], None]) -> None:
        answer = self.answer
        while not self.stopping.is_set():
            row = await feed.next()
            if row is None:
                return
            try:
                results = await answer(row)
            except (JobStopped, NotSent) as exc:
                for result in exc.results:  # paid for before the stop
                    on_result(row, result)
                if isinstance(exc, JobStopped):
                    if self.stopped is None:
                        self.stopped = exc
                    self.stopping.set()
                return
            for result in results:
                on_result(row, result)


class RowFeed:
    """Rows for the workers, a batch at a time. The next batch (reading, templating, journal
    look-ups) is prepared in a thread while the current one is being sent, so preparing rows
    never stalls the event loop long enough to drain the requests in flight."""

    def __init__(self, batches: Iterator[list[Row]]) -> None:
        self._batches = batches
        self._current: Iterator[Row] = iter(())
        self._ahead: asyncio.Future[list[Row] | None] | None = None
        self._refill = asyncio.Lock()
        self._done = False

    async def next(self) -> Row | None:
        while True:
            row = next(self._current, None)
            if row is not None or self._done:
                return row
            async with self._refill:
                if (row := next(self._current, None)) is not None:
                    return row  # another worker refilled while this one waited
                if self._ahead is None:
                    self._ahead = self._prepare()
                batch = await self._ahead
                if batch is None:
                    self._done = True
                    return None
                self._current = iter(batch)
                self._ahead = self._prepare()

    def _prepare(self) -> asyncio.Future[list[Row] | None]:
        return asyncio.ensure_future(asyncio.to_thread(next, self._batches, None))

    async def aclose(self) -> None:
        """Let a batch being prepared finish: its thread reads the journal, which closes next."""
        if self._ahead is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._ahead)
