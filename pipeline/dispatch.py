"""The async engine: a fixed pool of workers pulls rows from an async iterator, sends each under
the limits with the retry policy, and yields results as they finish.

It knows nothing about files or journals: rows in, results out. A job-wide failure (401, 402)
stops every worker from taking new rows; results already yielded stand, the rows in flight are
dropped (a resumed run sends them), and the failure is raised once the pool has drained.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

from pipeline.client import Completion, OpenRouterClient
from pipeline.errors import JobStopped, PermanentError, RetryableError
from pipeline.limits import Limits
from pipeline.records import ERROR, OK, Result, Row
from pipeline.retry import RetryPolicy


class Dispatcher:
    """Runs rows through `concurrency` workers; at most that many requests are ever in flight."""

    def __init__(
        self,
        client: OpenRouterClient,
        limits: Limits,
        policy: RetryPolicy,
        concurrency: int,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.client = client
        self.limits = limits
        self.policy = policy
        self.concurrency = concurrency
        self._sleep = sleep
        self.stopping = asyncio.Event()
        self.stopped: JobStopped | None = None
        self.retries = 0
        self._workers: list[asyncio.Task[None]] = []

    def stop(self) -> None:
        """Take no new rows; requests in flight finish."""
        self.stopping.set()

    def abort(self) -> None:
        """Abandon the requests in flight too (their rows are sent again by the next run)."""
        self.stopping.set()
        for worker in self._workers:
            worker.cancel()

    async def results(self, rows: AsyncIterable[Row]) -> AsyncIterator[Result]:
        source = aiter(rows)
        take = asyncio.Lock()
        finished: asyncio.Queue[Result | None] = asyncio.Queue()
        self._workers = [
            asyncio.create_task(self._worker(source, take, finished))
            for _ in range(self.concurrency)
        ]
        running = len(self._workers)
        try:
            while running:
                result = await finished.get()
                if result is None:
                    running -= 1
                else:
                    yield result
        finally:
            for worker in self._workers:
                worker.cancel()
            outcomes = await asyncio.gather(*self._workers, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, asyncio.CancelledError
            ):
                raise outcome
        if self.stopped is not None:
            raise self.stopped

    async def _worker(
        self, source: AsyncIterator[Row], take: asyncio.Lock, finished: asyncio.Queue[Result | None]
    ) -> None:
        try:
            while not self.stopping.is_set():
                async with take:
                    row = await anext(source, None)
                if row is None:
                    return
                try:
                    result = await self.process(row)
                except JobStopped as exc:
                    if self.stopped is None:
                        self.stopped = exc
                    self.stopping.set()
                    return
                finished.put_nowait(result)
        finally:
            finished.put_nowait(None)

    async def process(self, row: Row) -> Result:
        """Send one row, retrying transient failures; return its result (never raises for a row)."""
        if row.body is None:
            return Result(row.position, row.key, ERROR, error_type="input", error_message=row.error)
        clock = asyncio.get_running_loop().time
        started = clock()
        attempt = 0
        while True:
            attempt += 1
            await self.limits.acquire(row.estimated_tokens)
            sent = time.perf_counter()
            try:
                completion = await self.client.complete(row.body)
            except RetryableError as exc:
                rate_limited = exc.status == 429
                if rate_limited:
                    self.limits.rate_limited_for(exc.retry_after)
                delay = self.policy.delay(attempt, exc.retry_after)
                elapsed = clock() - started
                if self.policy.gives_up(attempt, elapsed, delay):
                    message = f"gave up after {attempt} attempt{'s' if attempt > 1 else ''} in {elapsed:.1f}s; last: {exc.message}"
                    return self._failed(row, exc.kind, message, attempt, retry_on_resume=True)
                self.retries += 1
                if not rate_limited and delay > 0:  # after a 429 the limits make every worker wait
                    await self._sleep(delay)
                continue
            except PermanentError as exc:
                return self._failed(row, exc.kind, exc.message, attempt, retry_on_resume=False)
            latency_ms = (time.perf_counter() - sent) * 1000
            if completion.total_tokens and completion.total_tokens > row.estimated_tokens:
                await self.limits.charge_extra_tokens(
                    completion.total_tokens - row.estimated_tokens
                )
            return _succeeded(row, completion, attempt, latency_ms)

    @staticmethod
    def _failed(
        row: Row, kind: str, message: str, attempts: int, *, retry_on_resume: bool
    ) -> Result:
        return Result(
            row.position,
            row.key,
            ERROR,
            attempts=attempts,
            error_type=kind,
            error_message=message,
            retry_on_resume=retry_on_resume,
        )


def _succeeded(row: Row, c: Completion, attempts: int, latency_ms: float) -> Result:
    return Result(
        row.position,
        row.key,
        OK,
        completion=c.content,
        finish_reason=c.finish_reason,
        response_model=c.model,
        provider=c.provider,
        generation_id=c.generation_id,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        total_tokens=c.total_tokens,
        reasoning_tokens=c.reasoning_tokens,
        cached_tokens=c.cached_tokens,
        cost_usd=c.cost,
        latency_ms=round(latency_ms, 3),
        attempts=attempts,
    )
