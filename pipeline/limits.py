"""Request and token rate limits (aiolimiter), requests in flight, and what a 429 does.

- requests per second: an `AsyncLimiter` holding just over one request, so requests are
  spaced evenly (a bucket of `rate` per second would allow a burst of twice that across a
  window boundary), and a count of the last second's starts, so no one-second window holds
  more than the configured rate;
- tokens per minute: an `AsyncLimiter(tpm, 60)` charged with each request's estimate, and
  with what an answer used beyond it when the next request starts;
- a 429 from the key's own limit (`Throttle.KEY`): *every* worker waits until the server's
  reset time, and, if that wait is not zero, the request rate is lowered to a little under
  what the server accepted over the last second (never below half the rate before), then
  raised again by 25% for each second without a 429 — up to that learned rate, and past it
  towards the configured rate only after `PROBE_AFTER` quiet seconds;
- a 429 from an upstream provider, or from nobody says whom: only that row waits (its
  Retry-After, `attempt.py`); `InFlight` lowers the requests in flight when such 429s are a
  good share of the last answers (a storm) and raises them again as they stop, so a sprinkle
  holds nobody up.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from aiolimiter import AsyncLimiter

DEFAULT_COOLDOWN = 1.0  # seconds all workers pause after a 429 that names no reset time
MIN_RATE = 0.5  # requests per second the adaptive rate never goes below
RECOVERY_STEP = 1.25  # each quiet second multiplies the lowered rate by this much
KEY_HEADROOM = 0.98  # of the rate the key's limit accepted: what the rate is lowered to
PROBE_AFTER = 60.0  # quiet seconds before the rate rises past the one the key's limit accepted
# The sliding window no `rate` may be exceeded in: a little over a second, so that the jitter
# between our send and the server's clock does not put one request too many in its second.
WINDOW = 1.01


class Limits:
    """Shared by all workers of one job on one event loop."""

    def __init__(
        self,
        requests_per_second: float | None,
        tokens_per_minute: float | None,
        *,
        concurrency: int | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.ceiling = requests_per_second
        self.rate = requests_per_second
        self._requests = _spacing_limiter(requests_per_second)
        self._tokens = AsyncLimiter(tokens_per_minute, 60) if tokens_per_minute else None
        self._tokens_max = tokens_per_minute or 0.0
        self._tokens_owed = 0.0  # used beyond the estimates, paid by the next request
        self._clock = clock or asyncio.get_running_loop().time
        self._sleep = sleep
        self.in_flight = InFlight(concurrency, self._clock) if concurrency else None
        self.paused_until = 0.0
        self._last_change = float("-inf")
        self._learned: float | None = None  # the rate the key's limit accepted, a little under
        self._starts: deque[float] = deque()  # request start times over the last 2 s
        self._window: deque[float] = deque()  # request start times over the last WINDOW
        self._refused: deque[float] = deque()  # the key's 429s over the last second
        self.rate_limited = 0  # 429s seen, for the progress line

    async def acquire(self, estimated_tokens: int) -> None:
        """Wait until a request of about `estimated_tokens` may start; `release` it once
        answered (or failed), whatever happens."""
        in_flight = self.in_flight
        if in_flight is not None and not in_flight.enter_now():
            await in_flight.enter()
        try:
            now = self._clock()
            # Nothing to wait for (the usual case): no coroutine to step through, once a request.
            if self.rate is None and self._tokens is None and now >= self.paused_until:
                self._started(now)
            else:
                await self._start(estimated_tokens)
        except BaseException:
            self.release(None)
            raise

    def may_start_now(self, estimated_tokens: int) -> bool:
        """Whether a request of about `estimated_tokens` could start this moment without
        waiting (ignoring requests in flight): an `acquire` after True returns at once."""
        now = self._clock()
        if now < self.paused_until:
            return False
        if self._requests is not None and not self._requests.has_capacity():
            return False
        if self._tokens is not None:
            tokens = min(estimated_tokens + self._tokens_owed, self._tokens_max)
            if not self._tokens.has_capacity(tokens):
                return False
        return self.rate is None or self._window_room(now, self.rate)

    def release(self, throttled: bool | None) -> None:
        """The request `acquire` let start is over; `throttled`: whether an upstream
        provider's (or an unknown) 429 refused it, None if it was never sent."""
        self.rate_limited += bool(throttled)
        if self.in_flight is not None:
            self.in_flight.leave(throttled)

    async def _start(self, estimated_tokens: int) -> None:
        while (delay := self.paused_until - self._clock()) > 0:
            await self._sleep(delay)
        self._recover()
        if self._requests is not None:
            await self._requests.acquire()
        if self._tokens is not None:
            tokens, self._tokens_owed = estimated_tokens + self._tokens_owed, 0.0
            await self._tokens.acquire(min(tokens, self._tokens_max))
        if self.rate is not None:
            await self._hold_window()
        self._started(self._clock())

    def _started(self, now: float) -> None:
        starts = self._starts
        starts.append(now)
        if self.rate is not None:  # without a rate nothing trims the window: not kept
            self._window.append(now)
        while starts[0] < now - 2.0:
            starts.popleft()

    async def _hold_window(self) -> None:
        """Never more than `rate` starts in any WINDOW: the bucket's headroom (see
        `_spacing_limiter`) would otherwise let one more through after a stall. No await may
        come between this returning and the start being recorded."""
        while self.rate is not None:  # a 429 may set a rate while this waits
            now = self._clock()
            if self._window_room(now, self.rate):
                return
            await self._sleep(self._window[0] + WINDOW - now)

    def _window_room(self, now: float, rate: float) -> bool:
        """Whether the last WINDOW's starts leave room for one more under `rate`."""
        window = self._window
        while window and window[0] <= now - WINDOW:
            window.popleft()
        return len(window) < max(1, int(rate))

    def charge_extra_tokens(self, tokens: int) -> None:
        """The answer used more tokens than estimated: the next request pays the difference
        (waiting here would hold up, and a stop could cancel, an answer already received)."""
        if self._tokens is not None and tokens > 0:
            self._tokens_owed += tokens

    def key_limited(self, retry_after: float | None) -> None:
        """A 429 from the key's own limit: pause every worker until the reset time and lower
        the request rate to a little under what the limit accepted."""
        self.rate_limited += 1
        now = self._clock()
        self._refused.append(now)
        while self._refused[0] < now - 1.0:
            self._refused.popleft()
        wait = retry_after if retry_after is not None else DEFAULT_COOLDOWN
        self.paused_until = max(self.paused_until, now + wait)
        # A 429 that asks for no wait (Retry-After: 0, a reset already past) says the window has
        # already reset: our pace is not what it objects to, and lowering on every such 429 would
        # sink the rate under a server that throws them at random.
        if wait <= 0:
            return
        # One lowering per cool-down: the other 429s of the same burst were already in flight.
        if now < self._last_change + max(wait, 1.0):
            return
        current = self.rate if self.rate is not None else self.observed_rate()
        started = sum(1 for start in self._starts if start > now - 1.0)
        accepted = (started - len(self._refused)) * KEY_HEADROOM
        learned = current / 2 < accepted < current  # else too few starts to tell: halved
        self._set_rate(max(MIN_RATE, accepted if learned else current / 2))
        self._learned = self.rate if learned else None
        self._last_change = now

    def _recover(self) -> None:
        if self.rate is None or self.rate == self.ceiling:
            return
        now = self._clock()
        if now - max(self._last_change, self.paused_until) < 1.0:
            return
        raised = self.rate * RECOVERY_STEP
        learned = self._learned
        if learned is not None and now - self._last_change < PROBE_AFTER:
            if self.rate >= learned:  # as fast as the key's limit allowed: stay there a while
                return
            raised = min(raised, learned)
        if self.ceiling is not None and raised >= self.ceiling:
            self._set_rate(self.ceiling)
        elif self.ceiling is None and raised >= 4 * max(self.observed_rate(), MIN_RATE):
            self._set_rate(None)  # far above the pace we actually keep: back to no limit
        else:
            self._set_rate(raised)
        self._last_change = now

    def observed_rate(self) -> float:
        """Requests started per second over the last two seconds (or since the first start)."""
        starts = self._starts
        if len(starts) < 2:
            return MIN_RATE
        return len(starts) / max(self._clock() - starts[0], 0.25)

    def _set_rate(self, rate: float | None) -> None:
        if rate is None:
            self._window.clear()
        elif self.rate is None:  # the window was not kept: the last two seconds' starts hold it
            self._window = deque(self._starts)
        self.rate = rate
        self._requests = _spacing_limiter(rate)


def _spacing_limiter(rate: float | None) -> AsyncLimiter | None:
    """Evenly spaced requests at `rate` per second, never more than `rate` in any one second.

    A bucket of exactly one request loses every timer's lateness (epoll rounds waits up to whole
    milliseconds: at 100 rps a 10 ms gap becomes 11 and the pace 90). A little headroom `h`
    absorbs that lateness; draining at `rate - h` keeps the pace just under `rate`, and
    `Limits._hold_window` trims the one extra start the headroom can let into a second."""
    if not rate:
        return None
    headroom = min(0.5, 0.005 * rate)
    return AsyncLimiter(1 + headroom, (1 + headroom) / (rate - headroom))


# Upstream 429s among the last answers that make a storm (the requests in flight are halved),
# and few enough to raise them again; judged over at least MIN_OUTCOMES of the last OUTCOMES.
STORM_SHARE = 0.25
CALM_SHARE = 0.10
OUTCOMES = 100
MIN_OUTCOMES = 20
SETTLE = 1.0  # seconds between two changes, so each is judged by answers sent after it


def round_of(in_flight: int) -> int:
    """How many answers make a round of `in_flight` requests, for `RecentShare.least`."""
    return min(OUTCOMES, max(MIN_OUTCOMES, in_flight))


class RecentShare:
    """The share of the last `OUTCOMES` events that were of a kind (a 429, a failure), and
    whether there are enough of them to call them a storm: the answers to a whole round of
    requests (`least`: as many as may be in flight). A refusal comes back at once and an answer
    after its latency, so the first answers to any round are its refusals, and fewer would
    take a sprinkle of them for a storm.

    Most events are not hits, so only the hits are kept (by their event number): adding any
    other event, once a request, is one addition."""

    def __init__(self, least: int = MIN_OUTCOMES) -> None:
        self._count = 0  # events since the last clear
        self._hits: deque[int] = deque()  # the number of each hit among the last OUTCOMES
        self.least = least

    def add(self, hit: bool) -> None:
        if hit:
            hits = self._hits
            hits.append(self._count)
            while hits[0] <= self._count - OUTCOMES:
                hits.popleft()
        self._count += 1

    def clear(self) -> None:
        self._count = 0
        self._hits.clear()

    @property
    def known(self) -> bool:
        return self._count >= self.least

    @property
    def share(self) -> float:
        hits, oldest = self._hits, self._count - OUTCOMES
        while hits and hits[0] < oldest:
            hits.popleft()
        return len(hits) / min(self._count, OUTCOMES) if self._count else 0.0

    @property
    def storm(self) -> bool:
        return self.known and self.share >= STORM_SHARE


class InFlight:
    """How many requests may be in flight: the job's concurrency, halved while upstream
    providers refuse a good share of the last answers with 429s (a storm: a provider's pool
    is saturated, and more requests only add 429s), raised again by an eighth of it each
    second once they are few (additive increase, multiplicative decrease)."""

    def __init__(self, ceiling: int, clock: Callable[[], float]) -> None:
        self.ceiling = self.cap = ceiling
        self.count = 0
        self._clock = clock
        self._throttled = RecentShare(round_of(ceiling))  # of the last answers, upstream 429s
        self._changed = float("-inf")
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._woken = 0  # waiters woken for a free slot that have not taken it yet

    def enter_now(self) -> bool:
        """Take a slot if one is free and nobody waits for one (else `enter`)."""
        if self.count + self._woken < self.cap and not self._waiting:
            self.count += 1
            return True
        return False

    async def enter(self) -> None:
        while self.count + self._woken >= self.cap or self._waiting:
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
                elif not waiter.cancelled():  # woken, then cancelled: the slot goes to the next
                    self._woken -= 1
                    self._wake()
                raise
            self._woken -= 1
            if self.count < self.cap:
                break
        self.count += 1

    def leave(self, throttled: bool | None) -> None:
        self.count -= 1
        if throttled is not None:
            if throttled or self.cap < self.ceiling:
                self._judge(throttled)
            else:  # at the ceiling, a good answer changes nothing but the share
                self._throttled.add(False)
        if self._waiting:
            self._wake()

    def _wake(self) -> None:
        """Wake as many waiting workers, first come first served, as there are free slots."""
        while self._waiting and self.count + self._woken < self.cap:
            self._waiting.popleft().set_result(None)
            self._woken += 1

    def _judge(self, throttled: bool) -> None:
        recent = self._throttled
        recent.add(throttled)
        now = self._clock()
        if not recent.known or now < self._changed + SETTLE:
            return
        if recent.storm and self.cap > 1:
            self.cap = max(1, self.cap // 2)
            recent.clear()  # the next change is judged by answers at the new cap
        elif recent.share <= CALM_SHARE and self.cap < self.ceiling:
            self.cap = min(self.ceiling, self.cap + max(1, self.ceiling // 8))
        else:
            return
        recent.least = round_of(self.cap)
        self._changed = now
