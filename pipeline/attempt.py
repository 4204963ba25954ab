"""Answering one row through the chat API: `ChatAnswerer` is the `answer(row)` the dispatcher
calls, one layer per concern, as httpx's `send` is built:

    answer      an input error, an earlier answer, or one to an identical request (in flight or
                just answered) needs no request
    _checked    an answer that breaks the labels / schema is asked again (each attempt's spend
                adds up in the row); one cut off by the length limit is an error row
    _retrying   transient failures are tried again after a back-off, under the retry policy
    _attempt    one attempt: reserve the worst case against the budget, wait for the limits,
                call, settle the budget with what it cost, tell the limits of a 429

Each layer returns results or raises a job-wide `JobStopped`; a row-level failure is a result.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, NamedTuple

from pipeline.answer_parts import label_confidence, tool_arguments
from pipeline.answers import AnswerSpec
from pipeline.client import OpenRouterClient
from pipeline.completions import Completion
from pipeline.errors import (
    JobStopped,
    Kind,
    NotSent,
    PermanentError,
    RetryableError,
    Throttle,
    Unreachable,
)
from pipeline.limits import Limits, RecentShare, round_of
from pipeline.money import Catalogue, Reservations, completion_cost
from pipeline.options import describe
from pipeline.records import ABANDONED, API, DUPLICATE, ERROR, OK, SHARED, Result, Row
from pipeline.retry import RetryPolicy

# Failures after the server accepted the request: it may have generated, and billed, an answer
# that never reached us. Their generation ids are kept for reconciliation.
LOST_ANSWER_KINDS = frozenset({Kind.TIMEOUT, Kind.CONNECTION_DROPPED, Kind.INVALID_JSON})


def abandoned_id() -> str:
    """A lost attempt's id when the request was abandoned before any id came back."""
    return f"{ABANDONED}{uuid.uuid4().hex}"


# Failures where no response came back at all (no status, no headers).
NO_RESPONSE_KINDS = frozenset(
    {Kind.CONNECTION_FAILED, Kind.CONNECTION_DROPPED, Kind.CONNECTION_ERROR, Kind.TIMEOUT}
)
# The endpoint counts as gone when a row gives up with every attempt unanswered, no request of
# the run got a response meanwhile, and at least this many attempts in a row went unanswered.
# A sprinkle of resets never meets it: other rows' answers come in between.
UNREACHABLE_STREAK = 3
SPEND_FIELDS = (
    "cost_usd",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "reasoning_tokens",
)
RECENT_ANSWERS = 10_000  # answers remembered for duplicates not yet visible in the journal

LostAttempt = tuple[str, int, str]  # (generation id, slot, kind)


class Verdict(NamedTuple):
    """Why a delivered answer is not a good one."""

    error_type: str
    message: str
    ask_again: bool  # worth another request (an invalid answer), or not (cut off)


class ChatAnswerer:
    """`answer(row)` over the synchronous chat API, shared by every worker of one run."""

    def __init__(
        self,
        client: OpenRouterClient,
        limits: Limits,
        policy: RetryPolicy,
        *,
        catalogue: Catalogue | None = None,
        reservations: Reservations | None = None,
        answers: AnswerSpec | None = None,
        invalid_retries: int = 0,
        stopping: asyncio.Event | None = None,
        on_lost: Callable[[LostAttempt], None] = lambda lost: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.client = client
        self.limits = limits
        self.policy = policy
        self.catalogue = catalogue
        self.reservations = reservations
        self.answers = answers
        self.invalid_retries = invalid_retries
        self.stopping = stopping or asyncio.Event()  # once set, invalid answers are not re-asked
        self.on_lost = on_lost
        self._sleep = sleep
        # While a row waits out a back-off: the dispatcher's `resting`, once there is one.
        self.resting: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
        self.retries = 0
        self._responses = 0  # attempts the endpoint answered (with anything, even an error)
        self._unanswered = 0  # attempts in a row, across rows, it did not
        # Of the last attempts, those that failed and may retry.
        in_flight = limits.in_flight.ceiling if limits.in_flight is not None else 0
        self._failing = RecentShare(round_of(in_flight))
        self._inflight: dict[str, asyncio.Future[Result] | None] = {}
        self._recent: OrderedDict[str, Result] = OrderedDict()

    async def __call__(self, row: Row) -> list[Result]:
        """The results of one row, one per slot it answers for: from an identical request if
        there is one, else from the API."""
        if row.body is None:
            return [Result.unsendable(row)]
        if row.reuse is not None:
            return [row.reuse]
        if row.samples > 1:
            return await self._checked(row)  # several answers at once: shared with no other row
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
            (result,) = await self._checked(row)
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

    def ask(self, row: Row) -> Awaitable[list[Result]]:
        """The row's answers from the API, checked and retried: `__call__` without its reuse
        of identical requests (which a cluster's driver has done before handing it on)."""
        return self._checked(row)

    async def again(
        self, row: Row, *, attempts: int, invalid: int, rejected: Result | None
    ) -> list[Result]:
        """Ask a row again that was asked elsewhere before (a batch line that failed, or was
        answered and turned down): `attempts` count toward the retry policy, `invalid` toward
        `invalid_retries`, and the spend of `rejected` is the row's too."""
        return await self._checked(row, attempts=attempts, invalid=invalid, rejected=rejected)

    async def _checked(
        self, row: Row, *, attempts: int = 0, invalid: int = 0, rejected: Result | None = None
    ) -> list[Result]:
        """Answers that pass the checks, or error rows saying why not; an answer turned down is
        asked again (one bad answer of several asks for them all: they came as one request).
        `rejected`: the last answer turned down, with the spend of all so far."""
        started = asyncio.get_running_loop().time()
        turned_down: list[Result] = []  # the last answers turned down, as error rows
        while True:
            try:
                results = await self._retrying(row, attempts, started)
            except (JobStopped, NotSent) as exc:
                # The answers turned down were paid for: they are journaled, retried next run.
                exc.results = tuple(replace(r, retry_on_resume=True) for r in turned_down)
                raise
            results[0] = spend_with(results[0], rejected)
            if results[0].status != OK:
                return results
            answers = self.answers
            verdicts = [judge(result, answers) for result in results]
            if not any(verdicts):
                return results
            turned_down = [
                replace(
                    result, status=ERROR, error_type=verdict.error_type,
                    error_message=verdict.message, parsed=None,
                ) if verdict else result
                for result, verdict in zip(results, verdicts, strict=True)
            ]  # fmt: skip
            again = any(verdict.ask_again for verdict in verdicts if verdict)
            if not again or invalid >= self.invalid_retries or self.stopping.is_set():
                return turned_down
            rejected, attempts, invalid = results[0], results[0].attempts, invalid + 1
            self.retries += 1

    async def _retrying(self, row: Row, attempts: int, started: float) -> list[Result]:
        """The row's answers, trying again after transient failures until the policy gives up;
        `attempts` were made before (answers turned down), since `started`."""
        clock = asyncio.get_running_loop().time
        responses = self._responses  # unchanged: no attempt anywhere got a response since
        failed = 0  # attempts of this call that failed
        due = clock()  # the back-off schedule: no retry before it (a Retry-After apart)
        while True:
            attempts += 1
            try:
                results = await self._attempt(row, attempts)
                self._failing.add(False)
                return results
            except RetryableError as exc:
                self._failing.add(True)
                failed += 1
                if exc.retry_after is not None:
                    delay = exc.retry_after
                else:
                    # The first failure of a row among requests that mostly succeed is a fault,
                    # not an overload: tried again at once. Else the row's retries keep to an
                    # exponential schedule from its first send, so the time it already spent
                    # (in an attempt that hung, in a Retry-After) counts toward its back-off.
                    if failed > 1 or self._failing.storm:
                        due += self.policy.delay(attempts, None)
                    delay = max(0.0, due - clock())
                elapsed = clock() - started
                if self.policy.gives_up(attempts, elapsed, delay):
                    if self._responses == responses and self._unanswered >= UNREACHABLE_STREAK:
                        raise self._gone(exc) from None
                    message = f"gave up after {attempts} attempt{'s' if attempts > 1 else ''} in {elapsed:.1f}s; last: {exc.message}"
                    return _failed(row, exc.kind, message, attempts, retry_on_resume=True)
                self.retries += 1
                # After the key's own 429 the limits make every worker wait; else this row waits
                # (and another worker takes rows meanwhile).
                if exc.throttle is not Throttle.KEY and delay > 0:
                    with self.resting():
                        await self._sleep(delay)
            except PermanentError as exc:
                self._failing.add(False)  # the endpoint answered: this request is at fault
                return _failed(row, exc.kind, exc.message, attempts, retry_on_resume=False)

    async def _attempt(self, row: Row, attempt: int) -> list[Result]:
        """One request for the row, under the budget and the limits."""
        assert row.body is not None
        reservations = self.reservations
        reserved = 0.0
        if reservations is not None:
            reserved = await self._reserve(row)
        try:
            await self.limits.acquire(row.estimated_tokens)
        except BaseException:
            if reservations is not None:  # nothing was sent
                reservations.settle(reserved, 0.0)
            raise
        throttled: bool | None = None  # not sent
        try:
            # The budget or the limits may have held this back while the run began to stop.
            if self.stopping.is_set():
                if reservations is not None:
                    reservations.settle(reserved, 0.0)
                raise NotSent
            sent = time.perf_counter()
            throttled = False
            try:
                response = await self._call(row)
            except RetryableError as exc:
                self._heard(not _unanswered(exc))
                lost = exc.generation_id is not None and exc.kind in LOST_ANSWER_KINDS
                if lost:
                    self.on_lost((exc.generation_id or "", row.slot, exc.kind))
                if reservations is not None:
                    reservations.settle(reserved, None if lost else 0.0)
                # Only the key's own limit holds every request back; a provider's 429 (or one
                # in a 200 body) concerns this one, and only many of them lower the pace.
                if exc.throttle is Throttle.KEY:
                    self.limits.key_limited(exc.retry_after)
                else:
                    throttled = exc.kind == Kind.HTTP_429
                raise
            except PermanentError:
                self._heard(True)
                if reservations is not None:
                    reservations.settle(reserved, 0.0)
                raise
            except BaseException:
                if reservations is not None:  # stopped or cancelled mid-request: assume billed
                    reservations.settle(reserved, None)
                # Abandoned in flight (a stop's grace ran out): the provider may have billed
                # it, and with no generation id nothing can say what it cost. Journaled as a
                # lost attempt of unknown cost, so the true spend reads unknown, not too low.
                self.on_lost((abandoned_id(), row.slot, Kind.ABANDONED))
                raise
        finally:
            self.limits.release(throttled)
        self._heard(True)
        latency_ms = (time.perf_counter() - sent) * 1000
        cost, source = self._priced(row, response)
        if reservations is not None:
            reservations.settle(reserved, cost)
        total_tokens = self._outcome(response).total_tokens
        if total_tokens and total_tokens > row.estimated_tokens:
            self.limits.charge_extra_tokens(total_tokens - row.estimated_tokens)
        return self._results(row, response, attempt, latency_ms, cost, source)

    # What one attempt sends and makes of the answer: an embeddings answerer (`embed`) asks
    # another route and splits one answer among many rows.

    async def _reserve(self, row: Row) -> float:
        assert self.reservations is not None
        return await self.reservations.reserve(
            row.model, row.prompt_tokens, row.max_tokens, row.samples, images=row.images
        )

    async def _call(self, row: Row) -> Any:
        assert row.body is not None
        return await self.client.complete(row.body)

    def _priced(self, row: Row, response: Any) -> tuple[float | None, str | None]:
        return completion_cost(response, self.catalogue, row.model)

    def _outcome(self, response: Any) -> Completion:
        return response  # type: ignore[no-any-return]

    def _results(
        self, row: Row, response: Any, attempt: int, latency_ms: float, cost: float | None,
        source: str | None,
    ) -> list[Result]:  # fmt: skip
        return answered(row, response, attempt, latency_ms, cost, source, self.answers)

    def _heard(self, answered: bool) -> None:
        """Count an attempt the endpoint answered, or one it did not."""
        if answered:
            self._responses += 1
            self._unanswered = 0
        else:
            self._unanswered += 1

    def _gone(self, exc: RetryableError) -> Unreachable:
        """The job-wide stop for an endpoint that answers nothing any more."""
        count = self._unanswered
        what = (
            exc.message
            if exc.kind == Kind.CONNECTION_FAILED
            else f"{self.client.base_url} answered no request: {exc.message}"
        )
        check = f"{describe('request.base_url')} and that the endpoint is up"
        if exc.kind == Kind.TIMEOUT:  # perhaps only slow: every answer takes longer than allowed
            check += f", or raise {describe('request.timeout')}"
        return Unreachable(
            f"{what} ({count} attempts in a row unanswered); stopped with the journal saved. Check "
            f"{check}, then re-run the same command to resume: rows done are not sent again",
            exc.message,
            connected=exc.kind != Kind.CONNECTION_FAILED,
        )


def judge(result: Result, answers: AnswerSpec | None) -> Verdict | None:
    """Why a delivered answer is not a good one; None if it is good. A good structured
    answer gets its canonical JSON in `parsed`."""
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
        return Verdict(
            Kind.LENGTH,
            f"no answer: the length limit ran out{spent}{reasoning}; "
            f"raise {describe('request.max_tokens')} or lower the reasoning budget (request.reasoning)",
            ask_again=False,
        )
    if answers is None:
        return None
    answer = result.completion
    if answers.tool is not None:
        answer = tool_arguments(result.tool_calls, answers.tool)
        if answer is None:
            return Verdict(
                Kind.INVALID_ANSWER, f"the answer made no call of function {answers.tool}", True
            )
    parsed, problem = answers.check(answer)
    if problem is None:
        result.parsed = parsed
        return None
    if cut_off:  # mid-answer: asking again cuts it off again
        return Verdict(
            Kind.LENGTH,
            f"{problem}; the answer was cut off at the length limit (request.max_tokens)",
            ask_again=False,
        )
    return Verdict(Kind.INVALID_ANSWER, problem, ask_again=True)


def _unanswered(exc: RetryableError) -> bool:
    """True when the endpoint gave no response at all: no status, no headers."""
    return exc.kind in NO_RESPONSE_KINDS and exc.status is None and exc.generation_id is None


def answered(
    row: Row, c: Completion, attempts: int, latency_ms: float, cost: float | None,
    source: str | None, answers: AnswerSpec | None = None,
) -> list[Result]:  # fmt: skip
    """One result per slot of the row. With several answers in one request, the first carries
    the request's usage and cost; the others are marked as paid for there."""
    # In field order, by position: 17 keywords made this call 1.5 us slower, once a row.
    first = Result(
        row.slot, row.key,
        c.content, c.finish_reason, c.model, c.provider, c.generation_id,
        c.prompt_tokens, c.completion_tokens, c.total_tokens, c.reasoning_tokens, c.cached_tokens,
        c.cache_write_tokens, cost, source, API, round(latency_ms, 3), attempts, OK,
        request_hash=row.request_hash, digest=row.digest,
    )  # fmt: skip
    if c.reasoning is not None or c.tool_calls is not None:
        first.reasoning, first.tool_calls = c.reasoning, c.tool_calls
    if c.logprobs is not None and answers is not None and answers.labels:
        first.label_confidence = label_confidence(c.logprobs, answers.label_of(c.content))
    if row.samples == 1:
        return [first]
    others = [
        replace(
            first, position=row.slot + i, completion=content, finish_reason=finish,
            prompt_tokens=None, completion_tokens=None, total_tokens=None, reasoning_tokens=None,
            cached_tokens=None, cache_write_tokens=None, cost_usd=0.0, cost_source=SHARED,
        )
        for i, (content, finish) in enumerate(c.choices[1 : row.samples], start=1)
    ]  # fmt: skip
    # Fewer choices than asked for: the slots left over fail, to be asked again next run.
    short = f"the answer held {len(c.choices)} of {row.samples} choices"
    missing = _failed(row, Kind.NO_CHOICES, short, attempts, retry_on_resume=True)
    return [first, *others, *missing[1 + len(others) :]]


def spend_with(result: Result, earlier: Result | None) -> Result:
    """`result` with the cost and tokens of the answers rejected before it added in: a row's
    cost is everything it took."""
    if earlier is None:
        return result
    summed: dict[str, Any] = {
        name: _plus(getattr(result, name), getattr(earlier, name)) for name in SPEND_FIELDS
    }
    return replace(result, **summed)


def _plus(a: float | None, b: float | None) -> float | None:
    """A sum where unknown plus unknown stays unknown."""
    return None if a is None and b is None else (a or 0) + (b or 0)


def _failed(
    row: Row, kind: str, message: str, attempts: int, *, retry_on_resume: bool
) -> list[Result]:
    """The same failure for every slot of the row."""
    return [
        Result(
            row.slot + i, row.key, status=ERROR, response_source=API, attempts=attempts,
            error_type=kind, error_message=message, retry_on_resume=retry_on_resume,
            request_hash=row.request_hash, digest=row.digest,
        )
        for i in range(row.samples)
    ]  # fmt: skip
