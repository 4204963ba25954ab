"""The two kinds of Ray actor of `--engine ray` (imported only by `pipeline.cluster`, which
imports Ray first).

- `Coordinator`, one a job, on the head node: the job's one `Limits` (request rate, token rate,
  the pause after the key's 429) and its one `Budget`, exactly as a local run holds them, for
  every worker on every node.
- `Worker`, many, spread over the nodes: each answers the rows the driver hands it with a
  `ChatAnswerer` of its own (checks, retries, re-asks), whose limits and budget are the
  Coordinator's (`RemoteLimits`, `RemoteBudget`). It journals nothing: its answers go back to
  the driver, which journals and writes them as a local run does.

A worker's budget reservations are held under the ticket of the rows it was handed, so that the
driver can release them (as spent: the requests may have been billed) when the worker dies
with them in flight. Everything else a dead worker held needs no releasing.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import defaultdict, deque
from typing import Any

import ray

from pipeline.attempt import ChatAnswerer, LostAttempt
from pipeline.budget import Budget, Cap
from pipeline.client import connect
from pipeline.errors import JobStopped, NotSent
from pipeline.limits import Limits
from pipeline.money import Reservations
from pipeline.records import Result, Row
from pipeline.retry import RetryPolicy

# A request granted by the Coordinator reaches the server a moment later (an RPC's return):
# the rate is kept a little under the limit so that the jitter never puts one too many into a
# second (+2.7% was measured over a 100 rps limit without it).
RATE_HEADROOM = 0.97

TICKET: contextvars.ContextVar[int] = contextvars.ContextVar("ticket")

# What a worker sends back for the rows it was handed: each row's results, or the stop that
# ended it (`JobStopped`, `NotSent`, with any results paid before it); the lost attempts; and
# the retries and 429s it has seen so far (since it started).
Outcome = list[Result] | JobStopped | NotSent
Reply = tuple[list[Outcome], list[LostAttempt], int, int]


class Coordinator:
    def __init__(
        self,
        requests_per_second: float | None,
        tokens_per_minute: float | None,
        job: dict[str, Any],
    ) -> None:
        self._rates = (requests_per_second, tokens_per_minute)
        self._job = job
        self._caps: list[Cap] = job["caps"]
        self._limits: Limits | None = None
        self._budget: Budget | None = None
        self._held: defaultdict[int, list[float]] = defaultdict(list)
        self._stopped = False

    def _ready(self) -> Limits:
        """Built on the first call: `Limits` takes the clock of the actor's running loop."""
        if self._limits is None:
            rps, tpm = self._rates
            self._limits = Limits(rps * RATE_HEADROOM if rps else None, tpm)
            self._budget = Budget(self._caps) if self._caps else None
        return self._limits

    async def acquire(self, estimates: list[int]) -> list[bool]:
        """Let a worker's waiting requests (of about `estimates` tokens) start: the first once
        it may, and with it each next one that may start the same moment (all of them when no
        rate binds; one a gap when it does). For each let go, whether the job is stopping
        (then every one is let go, to send nothing)."""
        limits = self._ready()
        started: list[bool] = []
        for tokens in estimates:
            if self._stopped:
                return started + [True] * (len(estimates) - len(started))
            if started and not limits.may_start_now(tokens):
                break
            await limits.acquire(tokens)
            started.append(self._stopped)
        return started

    def key_limited(self, retry_after: float | None) -> None:
        self._ready().key_limited(retry_after)

    def charge_extra_tokens(self, tokens: int) -> None:
        self._ready().charge_extra_tokens(tokens)

    async def reserve(self, asks: list[tuple[int, float, bool]]) -> list[JobStopped | None]:
        """Hold each `(ticket, amount, wait)` of a worker's waiting requests: the first once it
        fits, and with it each next one that fits this moment. For each, None or the stop if
        it does not fit (returned, not raised: it reaches the worker as itself)."""
        self._ready()
        budget = self._budget
        assert budget is not None
        replies: list[JobStopped | None] = []
        for ticket, amount, wait in asks:
            if replies and not budget.fits(amount):
                break
            try:
                await budget.reserve(amount, wait=wait)
            except JobStopped as stop:
                replies.append(stop)
                continue
            self._held[ticket].append(amount)
            replies.append(None)
        return replies

    def settle(self, settled: list[tuple[int, float, float | None]]) -> None:
        """Swap each `(ticket, reserved, actual)` reservation for what its request cost."""
        assert self._budget is not None
        for ticket, reserved, actual in settled:
            held = self._held.get(ticket)
            if held is None or reserved not in held:
                continue  # already released as lost (`forget`)
            held.remove(reserved)
            if not held:
                del self._held[ticket]
            self._budget.settle(reserved, actual)

    def forget(self, ticket: int) -> None:
        """The worker holding `ticket` died: its reservations count as spent (unknown)."""
        assert self._budget is not None or ticket not in self._held
        for amount in self._held.pop(ticket, []):
            assert self._budget is not None
            self._budget.settle(amount, None)

    def stop(self) -> None:
        """No request starts from now on: every later `acquire` says so."""
        self._stopped = True

    def job(self) -> dict[str, Any]:
        """What every worker needs of the job (its config, prices, answer checks, caps): asked
        here rather than given to each, so that a worker started again needs nothing kept."""
        return self._job

    def rate_limited(self) -> int:
        return self._limits.rate_limited if self._limits is not None else 0


class Together:
    """Calls of one Coordinator method from a worker's requests, sent together: one round trip
    at a time carries every call waiting (a round trip a request would bound the whole cluster
    at what one actor answers a second), and its reply answers the first of them, as many as
    the Coordinator could answer at once; the rest go with the next."""

    def __init__(self, method: Any) -> None:
        self.method = method
        self._waiting: deque[tuple[Any, asyncio.Future[Any]]] = deque()
        self._asking: asyncio.Task[None] | None = None

    async def __call__(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._asking is None or self._asking.done():
            self._asking = asyncio.create_task(self._ask())
        return await future

    async def _ask(self) -> None:
        waiting = self._waiting
        try:
            while waiting:
                while waiting and waiting[0][1].done():  # its row was cancelled meanwhile
                    waiting.popleft()
                if not waiting:
                    return
                replies = await self.method.remote([item for item, _ in waiting])
                assert replies, "the Coordinator answers at least the first call"
                for reply in replies:
                    _, future = waiting.popleft()
                    if not future.done():
                        future.set_result(reply)
        except BaseException as exc:  # the Coordinator is gone (the driver died): none goes on
            while waiting:
                _, future = waiting.popleft()
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise


class RemoteLimits:
    """`Limits` as the worker's answerer uses them, kept by the Coordinator. A 429 and extra
    tokens are told without waiting; the next `acquire` comes after them."""

    in_flight = None  # the driver caps the rows in flight, for the whole job

    def __init__(self, coordinator: Any, stopping: asyncio.Event, tokens_limited: bool) -> None:
        self.coordinator = coordinator
        self.stopping = stopping
        self.tokens_limited = tokens_limited
        self.rate_limited = 0
        self._acquire = Together(coordinator.acquire)

    async def acquire(self, estimated_tokens: int) -> None:
        if await self._acquire(estimated_tokens):
            self.stopping.set()  # the answerer then sends nothing (`NotSent`)

    def release(self, throttled: bool | None) -> None:
        self.rate_limited += bool(throttled)

    def key_limited(self, retry_after: float | None) -> None:
        self.rate_limited += 1
        self.coordinator.key_limited.remote(retry_after)

    def charge_extra_tokens(self, tokens: int) -> None:
        if tokens > 0 and self.tokens_limited:
            self.coordinator.charge_extra_tokens.remote(tokens)


class RemoteBudget:
    """`Budget` as `Reservations` uses it, kept by the Coordinator under the rows' ticket."""

    def __init__(self, coordinator: Any, caps: list[Cap]) -> None:
        self.coordinator = coordinator
        self.caps = caps  # only for the cap's name in messages
        self._reserve = Together(coordinator.reserve)
        self._settled: list[tuple[int, float, float | None]] = []

    async def reserve(self, amount: float, *, wait: bool = True) -> None:
        stop = await self._reserve((TICKET.get(), amount, wait))
        if stop is not None:
            raise stop

    def settle(self, reserved: float, actual: float | None) -> None:
        """Told with the others settled in the same turn of the loop: one message for all."""
        if not self._settled:
            asyncio.get_running_loop().call_soon(self._tell_settled)
        self._settled.append((TICKET.get(), reserved, actual))

    def _tell_settled(self) -> None:
        settled, self._settled = self._settled, []
        self.coordinator.settle.remote(settled)


class Worker:
    def __init__(self, key: str, coordinator: str) -> None:
        self._key = key
        self._coordinator_name = coordinator
        self._coordinator: Any = None
        self._answerer: ChatAnswerer | None = None
        self._lost: defaultdict[int, list[LostAttempt]] = defaultdict(list)
        self._starting = asyncio.Lock()

    async def _ready(self) -> ChatAnswerer:
        """The answerer and its HTTP session, made on the first rows (in the actor's loop)."""
        async with self._starting:
            if self._answerer is None:
                self._coordinator = ray.get_actor(self._coordinator_name)
                job = await self._coordinator.job.remote()
                self._session = connect(job["config"], self._key)
                client = await self._session.__aenter__()
                stopping = asyncio.Event()
                caps = job["caps"]
                reservations = (
                    Reservations(
                        RemoteBudget(self._coordinator, caps),  # type: ignore[arg-type]
                        job["catalogue"],
                        job["fallbacks"],
                    )
                    if caps
                    else None
                )
                self._answerer = ChatAnswerer(
                    client,
                    RemoteLimits(self._coordinator, stopping, bool(job["config"].limits.tpm)),  # type: ignore[arg-type]
                    RetryPolicy.from_config(job["config"].retry), catalogue=job["catalogue"],
                    reservations=reservations, answers=job["answers"],
                    invalid_retries=job["config"].retry.invalid_retries, stopping=stopping,
                    on_lost=lambda lost: self._lost[TICKET.get()].append(lost),
                )  # fmt: skip
        return self._answerer

    async def answer(self, ticket: int, rows: list[Row]) -> Reply:
        """Answer `rows` at once, each under the job's limits and budget."""
        answerer = await self._ready()

        async def one(row: Row) -> Outcome:
            TICKET.set(ticket)
            try:
                return await answerer.ask(row)
            except (JobStopped, NotSent) as stop:
                return stop

        outcomes = await asyncio.gather(*map(one, rows))
        return (
            list(outcomes),
            self._lost.pop(ticket, []),
            answerer.retries,
            answerer.limits.rate_limited,
        )


# The actors (typed Any: a class made an actor is not one mypy can follow).
CoordinatorActor: Any = ray.remote(num_cpus=0, max_concurrency=10_000)(Coordinator)
# A worker that dies is started again (on another node if its own is gone); its rows, handed to
# another worker meanwhile, are not retried by Ray.
WorkerActor: Any = ray.remote(max_concurrency=10_000, max_restarts=-1, max_task_retries=0)(Worker)
