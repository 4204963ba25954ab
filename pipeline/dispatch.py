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
from typing import Any

from pipeline.errors import JobStopped, NotSent
from pipeline.records import Result, Row

Answer = Callable[[Row], Awaitable[list[Result]]]


class Dispatcher:
    """Runs rows through `concurrency` workers; at most that many rows are ever being answered,
    not counting rows waiting out a back-off (`resting`)."""

    def __init__(
        self, answer: Answer, concurrency: int, *, stopping: asyncio.Event | None = None
    ) -> None:
        self.answer = answer
        self.concurrency = concurrency
        self.stopping = stopping or asyncio.Event()
        self.stopped: JobStopped | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._live = 0  # workers taking rows, or about to
        self._resting = 0  # of them, those whose row waits (`resting`)
        self._spawn: Callable[[], None] | None = None

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

        def spawn() -> None:
            self._live += 1
            self._workers.append(asyncio.create_task(self._worker(feed, on_result)))

        self._spawn = spawn
        for _ in range(self.concurrency):
            spawn()
        try:
            outcomes: list[Any] = []
            while len(outcomes) < len(self._workers):  # a stand-in may join meanwhile
                waited = self._workers[len(outcomes) :]
                outcomes += await asyncio.gather(*waited, return_exceptions=True)
        finally:
            self._spawn = None
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

    @contextlib.contextmanager
    def resting(self) -> Iterator[None]:
        """A worker whose row must wait (its own Retry-After, a back-off) stands aside while
        it does: another worker takes rows meanwhile, so the waits of a few rows do not slow
        the rest. Workers beyond `concurrency` leave as soon as they are done with a row (the
        requests in flight are capped in `Limits` all the same)."""
        self._resting += 1
        spawn = self._spawn
        short = self._live - self._resting < self.concurrency
        if spawn is not None and short and not self.stopping.is_set():
            spawn()
        try:
            yield
        finally:
            self._resting -= 1

    async def _worker(self, feed: RowFeed, on_result: Callable[[Row, Result], None]) -> None:
        answer = self.answer
        try:
            while not self.stopping.is_set() and self._live - self._resting <= self.concurrency:
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
        finally:
            self._live -= 1


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
