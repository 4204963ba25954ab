"""Request and token rate limits (aiolimiter) and the shared 429 cool-down.

Requests in flight are capped elsewhere, by the size of the worker pool. Here:

- requests per second: an `AsyncLimiter` holding just over one request, so requests are
  spaced evenly (a bucket of `rate` per second would allow a burst of twice that across a
  window boundary), and a count of the last second's starts, so no one-second window holds
  more than the configured rate;
- tokens per minute: an `AsyncLimiter(tpm, 60)` charged with each request's estimate, and
  with what an answer used beyond it when the next request starts;
- on a 429, *every* worker waits until the server's reset time, and, if that wait is not zero,
  the request rate is halved (from the configured rate, or from the rate actually achieved when
  none is configured), then raised again by 25% for each second without a 429, back up to the
  configured rate.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from aiolimiter import AsyncLimiter

DEFAULT_COOLDOWN = 1.0  # seconds all workers pause after a 429 that names no reset time
MIN_RATE = 0.5  # requests per second the adaptive rate never goes below
RECOVERY_STEP = 1.25  # each quiet second multiplies the lowered rate by this much
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
        self.paused_until = 0.0
        self._last_change = float("-inf")
        self._starts: deque[float] = deque()  # request start times over the last 2 s
        self._window: deque[float] = deque()  # request start times over the last WINDOW
        self.rate_limited = 0  # 429s seen, for the progress line

    async def acquire(self, estimated_tokens: int) -> None:
        """Wait until a request of about `estimated_tokens` may start."""
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
        now = self._clock()
        self._starts.append(now)
        if self.rate is not None:  # without a rate nothing trims the window: not kept
            self._window.append(now)
        while self._starts[0] < now - 2.0:
            self._starts.popleft()

    async def _hold_window(self) -> None:
        """Never more than `rate` starts in any WINDOW: the bucket's headroom (see
        `_spacing_limiter`) would otherwise let one more through after a stall. No await may
        come between this returning and the start being recorded."""
        window = self._window
        while self.rate is not None:  # a 429 may set a rate while this waits
            now = self._clock()
            while window and window[0] <= now - WINDOW:
                window.popleft()
            if len(window) < max(1, int(self.rate)):
                return
            await self._sleep(window[0] + WINDOW - now)

    def charge_extra_tokens(self, tokens: int) -> None:
        """The answer used more tokens than estimated: the next request pays the difference
        (waiting here would hold up, and a stop could cancel, an answer already received)."""
        if self._tokens is not None and tokens > 0:
            self._tokens_owed += tokens

    def rate_limited_for(self, retry_after: float | None) -> None:
        """A 429: pause every worker until the reset time and lower the request rate."""
        self.rate_limited += 1
        now = self._clock()
        wait = retry_after if retry_after is not None else DEFAULT_COOLDOWN
        self.paused_until = max(self.paused_until, now + wait)
        # A 429 that asks for no wait (Retry-After: 0, a reset already past) says the window has
        # already reset: our pace is not what it objects to, and halving on every such 429 would
        # sink the rate under a provider that throws them at random.
        if wait <= 0:
            return
        # One lowering per cool-down: the other 429s of the same burst were already in flight.
        if now < self._last_change + max(wait, 1.0):
            return
        current = self.rate if self.rate is not None else self.observed_rate()
        self._set_rate(max(MIN_RATE, current / 2))
        self._last_change = now

    def _recover(self) -> None:
        if self.rate is None or self.rate == self.ceiling:
            return
        now = self._clock()
        if now - max(self._last_change, self.paused_until) < 1.0:
            return
        raised = self.rate * RECOVERY_STEP
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
