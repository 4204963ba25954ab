"""Rows a batch run sends one request each, through the chat API: in `auto` mode those of
models the Batch API does not take, and with `batch_retry = "sync"` the lines a batch failed or
answered badly. Rows are pushed in (`send` waits for a free place, so the feed does not run
ahead), at most `concurrency` in flight, each result handed to the row's own callback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pipeline.errors import JobStopped, NotSent
from pipeline.records import Result, Row

if TYPE_CHECKING:
    from pipeline.attempt import ChatAnswerer


class SyncLane:
    def __init__(
        self, answer: ChatAnswerer, concurrency: int, on_stop: Callable[[JobStopped], None]
    ) -> None:
        self.answer = answer
        self.on_stop = on_stop  # a job-wide failure (401, 402, the budget) from an answer
        self._places = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def retries(self) -> int:
        return self.answer.retries

    async def send(self, row: Row, then: Callable[[list[Result]], None]) -> None:
        """Answer `row` in the background; `then` gets its results (none when the run stopped
        before it was sent: the next run sends it)."""
        await self._start(lambda: self.answer(row), then)

    async def send_again(
        self, row: Row, then: Callable[[list[Result]], None], *, attempts: int, invalid: int,
        rejected: Result | None,
    ) -> None:  # fmt: skip
        """Ask again a row asked before elsewhere (`ChatAnswerer.again`)."""
        again = self.answer.again
        await self._start(
            lambda: again(row, attempts=attempts, invalid=invalid, rejected=rejected), then
        )

    async def _start(
        self, ask: Callable[[], Awaitable[list[Result]]], then: Callable[[list[Result]], None]
    ) -> None:
        await self._places.acquire()
        task = asyncio.create_task(self._one(ask, then))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one(
        self, ask: Callable[[], Awaitable[list[Result]]], then: Callable[[list[Result]], None]
    ) -> None:
        try:
            try:
                results = await ask()
            except (JobStopped, NotSent) as exc:
                results = list(exc.results)  # paid for before the stop
                if isinstance(exc, JobStopped):
                    self.on_stop(exc)
            then(results)
        finally:
            self._places.release()

    async def drain(self) -> None:
        """Wait for every row sent; a row's unexpected failure is raised here."""
        while self._tasks:
            tasks = list(self._tasks)
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
            for outcome in outcomes:
                if isinstance(outcome, BaseException) and not isinstance(
                    outcome, asyncio.CancelledError
                ):
                    raise outcome

    def abort(self) -> None:
        """Abandon the rows in flight (the next run sends them again)."""
        for task in self._tasks:
            task.cancel()
