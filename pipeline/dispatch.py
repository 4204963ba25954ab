"""The async engine: a fixed pool of workers pulls rows from an iterator, sends each under the
limits, the budget and the retry policy, and hands each result to a callback as it finishes.

It knows nothing about files or journals: rows in, results out. A job-wide failure (401, 402,
budget) stops every worker from taking new rows; results already yielded stand, the rows in
flight finish, and the failure is raised once the pool has drained.

Identical requests are sent once: a row whose request is already in flight waits for that
answer, and one whose request was answered recently reuses it.

An answer is checked before it counts: empty because the length limit ran out is an error
row, and with labels or a schema an answer that breaks them is asked again (each attempt's cost
and tokens add up in the row) and, when retries run out, recorded as an error row.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from pipeline.answers import AnswerSpec
from pipeline.client import Completion, OpenRouterClient
from pipeline.errors import JobStopped, PermanentError, RetryableError
from pipeline.limits import Limits
from pipeline.pricing import Budget, BudgetReached, Catalogue
from pipeline.records import API, DUPLICATE, ERROR, OK, SHARED, Result, Row
from pipeline.retry import RetryPolicy

# Failures after the server accepted the request: it may have generated, and billed, an answer
# that never reached us. Their generation ids are kept for reconciliation.
LOST_ANSWER_KINDS = frozenset({"timeout", "connection_dropped", "invalid_json"})
SPEND_FIELDS = (
    "cost_usd",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "reasoning_tokens",
)
RECENT_ANSWERS = 10_000  # answers remembered for duplicates not yet visible in the journal
PROMPT_ESTIMATE_MARGIN = 1.25  # the prompt-token estimate can be this far under (see estimate)


class Dispatcher:
    """Runs rows through `concurrency` workers; at most that many requests are ever in flight."""

    def __init__(
        self,
        client: OpenRouterClient,
        limits: Limits,
        policy: RetryPolicy,
        concurrency: int,
        *,
        catalogue: Catalogue | None = None,
        budget: Budget | None = None,
        fallback_models: tuple[str, ...] = (),
        answers: AnswerSpec | None = None,
        invalid_retries: int = 0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.client = client
        self.limits = limits
        self.policy = policy
        self.concurrency = concurrency
        self.catalogue = catalogue
        self.budget = budget
        self.fallback_models = fallback_models
        self.answers = answers
        self.invalid_retries = invalid_retries
        self._sleep = sleep
        self.stopping = asyncio.Event()
        self.stopped: JobStopped | None = None
        self.retries = 0
        self.lost: list[
            tuple[str, int, str]
        ] = []  # (generation id, position, kind), drained by the job
        self._workers: list[asyncio.Task[None]] = []
        self._inflight: dict[str, asyncio.Future[Result] | None] = {}
        self._recent: OrderedDict[str, Result] = OrderedDict()

    def stop(self) -> None:
        """Take no new rows; requests in flight finish."""
        self.stopping.set()

    def abort(self) -> None:
        """Abandon the requests in flight too (their rows are sent again by the next run)."""
        self.stopping.set()
        for worker in self._workers:
            worker.cancel()

    async def run(
        self, batches: Iterator[list[Row]], on_result: Callable[[Row, Result], None]
    ) -> None:
        """Send every row; `on_result` gets each result as it finishes. Returns when all are
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
        while not self.stopping.is_set():
            row = await feed.next()
            if row is None:
                return
            try:
                results = await self.process(row)
            except JobStopped as exc:
                if self.stopped is None:
                    self.stopped = exc
                self.stopping.set()
                return
            for result in results:
                on_result(row, result)

    async def process(self, row: Row) -> list[Result]:
        """The results of one row, one per slot it answers for: from an identical request if
        there is one, else from the API."""
        if row.body is None:
            return [
                Result(row.slot, row.key, status=ERROR, error_type="input", error_message=row.error)
            ]
        if row.reuse is not None:
            return [row.reuse]
        if row.samples > 1:
            return await self._send(row)  # several answers at once: shared with no other row
        key = row.request_hash
        while key in self._inflight:
            # An identical request is in flight: wait for its answer (a future is made only now,
            # for the rare duplicate, not for every request).
            pending = self._inflight[key]
            if pending is None:
                pending = self._inflight[key] = asyncio.get_running_loop().create_future()
            try:
                original = await asyncio.shield(pending)
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this worker itself is being cancelled
                continue  # the original was abandoned: send this one ourselves
            return [original.reused_for(row, DUPLICATE)]
        if (earlier := self._recent.get(key)) is not None:
            return [earlier.reused_for(row, DUPLICATE)]

        self._inflight[key] = None
        try:
            (result,) = await self._send(row)
        except BaseException:
            waiting = self._inflight.pop(key, None)
            if waiting is not None:
                waiting.cancel()
            raise
        waiting = self._inflight.pop(key, None)
        if waiting is not None:
            waiting.set_result(result)
        if result.status == OK:
            self._recent[key] = result
            if len(self._recent) > RECENT_ANSWERS:
                self._recent.popitem(last=False)
        return [result]

    async def _send(self, row: Row) -> list[Result]:
        """Send one row, retrying transient failures; never raises for a row-level failure.
        One result per slot of the row."""
        assert row.body is not None
        clock = asyncio.get_running_loop().time
        started = clock()
        attempt = 0
        rejected: Result | None = None  # the last answer turned down, with the spend of all so far
        invalid = 0  # answers turned down
        while True:
            attempt += 1
            reservation = self._reserve(row)
            await self.limits.acquire(row.estimated_tokens)
            sent = time.perf_counter()
            try:
                completion = await self.client.complete(row.body)
            except RetryableError as exc:
                lost = exc.generation_id is not None and exc.kind in LOST_ANSWER_KINDS
                if lost:
                    self.lost.append((exc.generation_id or "", row.slot, exc.kind))
                self._settle(reservation, None if lost else 0.0)
                # Only the endpoint's own 429 judges our pace; a 429 inside a 200 body is an
                # upstream provider throttling one answer, which a retry of that row gets past.
                rate_limited = exc.kind == "http_429"
                if rate_limited:
                    self.limits.rate_limited_for(exc.retry_after)
                delay = self.policy.delay(attempt, exc.retry_after)
                elapsed = clock() - started
                if self.policy.gives_up(attempt, elapsed, delay):
                    message = f"gave up after {attempt} attempt{'s' if attempt > 1 else ''} in {elapsed:.1f}s; last: {exc.message}"
                    return _failed(row, exc.kind, message, attempt, retry_on_resume=True)
                self.retries += 1
                if not rate_limited and delay > 0:  # after a 429 the limits make every worker wait
                    await self._sleep(delay)
                continue
            except PermanentError as exc:
                self._settle(reservation, 0.0)
                return _failed(row, exc.kind, exc.message, attempt, retry_on_resume=False)
            except BaseException:
                self._settle(
                    reservation, None
                )  # stopped or cancelled mid-request: assume it was billed
                raise
            latency_ms = (time.perf_counter() - sent) * 1000
            first, *others = self._succeeded(row, completion, attempt, latency_ms)
            self._settle(reservation, first.cost_usd)
            results = [_spend_with(first, rejected), *others]
            if completion.total_tokens and completion.total_tokens > row.estimated_tokens:
                await self.limits.charge_extra_tokens(
                    completion.total_tokens - row.estimated_tokens
                )
            problems = [self._judge(result) for result in results]
            if not any(problems):
                return results
            # One bad answer of several asks for them all again: they came as one request.
            again = any(problem[2] for problem in problems if problem)
            if again and invalid < self.invalid_retries and not self.stopping.is_set():
                rejected, invalid = results[0], invalid + 1
                self.retries += 1
                continue
            return [
                dataclasses.replace(
                    result,
                    status=ERROR,
                    error_type=problem[0],
                    error_message=problem[1],
                    parsed=None,
                )
                if problem
                else result
                for result, problem in zip(results, problems, strict=True)
            ]

    def _judge(self, result: Result) -> tuple[str, str, bool] | None:
        """Why a delivered answer is not a good one: (error type, message, worth asking again);
        None if it is good. A good structured answer gets its canonical JSON in `parsed`."""
        cut_off = result.finish_reason == "length"
        if cut_off and not (result.completion or "").strip():
            reasoning = (
                f" ({result.reasoning_tokens} of them reasoning)" if result.reasoning_tokens else ""
            )
            spent = (
                f" after {result.completion_tokens} completion tokens"
                if result.completion_tokens is not None
                else ""
            )
            return (
                "length",
                f"no answer: the length limit ran out{spent}{reasoning}; "
                "raise request.max_tokens (--max-tokens) or lower the reasoning budget (request.reasoning)",
                False,
            )
        if self.answers is None:
            return None
        parsed, problem = self.answers.check(result.completion)
        if problem is None:
            result.parsed = parsed
            return None
        if cut_off:  # mid-answer: asking again cuts it off again
            return (
                "length",
                f"{problem}; the answer was cut off at the length limit (request.max_tokens)",
                False,
            )
        return "invalid_answer", problem, True

    def _reserve(self, row: Row) -> float:
        """Reserve the most this attempt could cost against the budget (0 without a budget)."""
        if self.budget is None:
            return 0.0
        worst = 0.0
        for model_id in (row.model, *self.fallback_models):
            price = self.catalogue.get(model_id) if self.catalogue else None
            if price is None:
                raise BudgetReached(
                    f"cost.max_cost (--max-cost) needs the price of {model_id}, which the endpoint's /models does not list"
                )
            output = row.estimated_tokens - row.prompt_tokens
            worst = max(
                worst, price.cost(int(row.prompt_tokens * PROMPT_ESTIMATE_MARGIN) + 1, output)
            )
        self.budget.reserve(worst)
        return worst

    def _settle(self, reservation: float, actual: float | None) -> None:
        if self.budget is not None:
            self.budget.settle(reservation, actual)

    def _succeeded(self, row: Row, c: Completion, attempts: int, latency_ms: float) -> list[Result]:
        """One result per slot of the row. With several answers in one request, the first
        carries the request's usage and cost; the others are marked as paid for there."""
        cost: float | None = c.cost
        source: str | None = "reported"
        if cost is None:
            price = self.catalogue.get(c.model or row.model) if self.catalogue else None
            if (
                price is not None
                and c.prompt_tokens is not None
                and c.completion_tokens is not None
            ):
                cost, source = (
                    price.cost(c.prompt_tokens, c.completion_tokens, c.cached_tokens or 0),
                    "computed",
                )
            else:
                source = None  # unknown, never 0
        # In field order, by position: 17 keywords made this call 1.5 us slower, once a row.
        first = Result(
            row.slot, row.key,
            c.content, c.finish_reason, c.model, c.provider, c.generation_id,
            c.prompt_tokens, c.completion_tokens, c.total_tokens, c.reasoning_tokens, c.cached_tokens,
            cost, source, API, round(latency_ms, 3), attempts, OK,
            request_hash=row.request_hash,
        )  # fmt: skip
        if row.samples == 1:
            return [first]
        others = [
            dataclasses.replace(
                first,
                position=row.slot + i,
                completion=content,
                finish_reason=finish,
                prompt_tokens=None,
                completion_tokens=None,
                total_tokens=None,
                reasoning_tokens=None,
                cached_tokens=None,
                cost_usd=0.0,
                cost_source=SHARED,
            )
            for i, (content, finish) in enumerate(c.choices[1 : row.samples], start=1)
        ]
        # Fewer choices than asked for: the slots left over fail, to be asked again next run.
        short = f"the answer held {len(c.choices)} of {row.samples} choices"
        missing = _failed(row, "no_choices", short, attempts, retry_on_resume=True)
        return [first, *others, *missing[1 + len(others) :]]


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


def _spend_with(result: Result, earlier: Result | None) -> Result:
    """`result` with the cost and tokens of the answers rejected before it added in: a row's
    cost is everything it took."""
    if earlier is None:
        return result
    summed: dict[str, Any] = {
        name: _plus(getattr(result, name), getattr(earlier, name)) for name in SPEND_FIELDS
    }
    return dataclasses.replace(result, **summed)


def _plus(a: float | None, b: float | None) -> float | None:
    """A sum where unknown plus unknown stays unknown."""
    return None if a is None and b is None else (a or 0) + (b or 0)


def _failed(
    row: Row, kind: str, message: str, attempts: int, *, retry_on_resume: bool
) -> list[Result]:
    """The same failure for every slot of the row."""
    return [
        Result(
            row.slot + i,
            row.key,
            status=ERROR,
            response_source=API,
            attempts=attempts,
            error_type=kind,
            error_message=message,
            retry_on_resume=retry_on_resume,
            request_hash=row.request_hash,
        )
        for i in range(row.samples)
    ]
