"""What OpenRouter refuses before it routes a request anywhere: more requests than the server's
window allows (`--rate-limit`) and, after such a 429, any request the key sends before its
Retry-After elapsed; the free models' per-minute and per-day caps; and a key without the credit
for the request's worst case.

Only the simulator's own rate limit holds a key to its Retry-After. An injected upstream 429 or
503 (`faults.py`) is one provider's answer to one request and holds nothing back: OpenRouter
documents no key-wide penalty for it.

(This is the server's side; the client's own limiter is `pipeline/limits.py`.)
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict, deque

from pipeline.simulator import bodies
from pipeline.simulator.catalogue import SimModel
from pipeline.simulator.config import SimConfig
from pipeline.simulator.replies import Refusal


class Limits:
    """The rate windows and the rate limit's Retry-After; a fresh one forgets every request seen."""

    def __init__(self) -> None:
        self.retry_after_violations = 0
        self._window: deque[float] = deque()  # arrivals in the server-wide rate window
        self._free_minute: dict[str, deque[float]] = {}
        self._free_day: Counter[str] = Counter()
        self._penalty_until: dict[str, float] = {}

    def check(
        self,
        config: SimConfig,
        key: str,
        model: SimModel,
        prompt_tokens: int,
        max_tokens: int | None,
        usage: defaultdict[str, float],
        now: float,
    ) -> None:
        """Raise `Refusal` (429 or 402) if the request may not go on; otherwise count it.

        Checked in this order: a rate-limit 429's Retry-After, the server's rate window,
        free-model caps, then credit against `usage`, what each key has spent.
        """
        penalty = self._penalty_until.get(key, 0.0)
        if now < penalty:
            # Told by the rate limit to wait, the key sent another request (any prompt) sooner.
            self.retry_after_violations += 1
            raise _rate_limited(
                "Rate limit exceeded: retried before Retry-After elapsed.",
                int(config.rate_limit or 1),
                penalty,
            )
        if config.rate_limit is not None:
            window = self._window
            while window and window[0] <= now - config.rate_window:
                window.popleft()
            if len(window) >= config.rate_limit:
                reset_at = window[0] + config.rate_window
                if config.enforce_retry_after:
                    self._penalty_until[key] = reset_at
                raise _rate_limited(
                    "Rate limit exceeded: requests-per-window.", int(config.rate_limit), reset_at
                )
            window.append(now)
        if model.is_free:
            minute = self._free_minute.setdefault(key, deque())
            while minute and minute[0] <= now - 60:
                minute.popleft()
            if len(minute) >= config.free_requests_per_minute:
                raise _rate_limited(
                    "Rate limit exceeded: free-models-per-min.",
                    config.free_requests_per_minute,
                    minute[0] + 60,
                )
            if self._free_day[key] >= config.free_requests_per_day:
                midnight = (now // 86_400 + 1) * 86_400
                raise _rate_limited(
                    "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model requests per day",
                    config.free_requests_per_day, midnight, limit_source="openrouter_free_tier_daily",
                )  # fmt: skip
            minute.append(now)
            self._free_day[key] += 1
        if config.credit_limit is not None:
            remaining = config.credit_limit - usage[key]
            if remaining <= 0:
                raise Refusal(402, bodies.payment_required(bodies.OUT_OF_CREDITS))
            worst = model.charges(prompt_tokens, max_tokens or 0)[0]
            if max_tokens and worst > remaining:
                affordable = (
                    int(remaining / float(model.completion_price)) if model.completion_price else 0
                )
                raise Refusal(402, bodies.payment_required(
                    f"This request requires more credits, or fewer max_tokens. You requested up to "
                    f"{max_tokens} tokens, but can only afford {affordable}. To increase, visit "
                    "https://openrouter.ai/settings/credits and add more credits"
                ))  # fmt: skip


def _rate_limited(
    message: str, limit: int, reset_at: float, limit_source: str = "openrouter_shared_capacity"
) -> Refusal:
    """A 429 whose headers (repeated in its metadata, as OpenRouter does) say when to retry."""
    retry_after = max(reset_at - time.time(), 0.0)
    headers = bodies.rate_limit_headers(limit, reset_at, retry_after)
    metadata = {
        "headers": dict(headers),
        "limit_source": limit_source,
        "error_type": "rate_limit_exceeded",
    }
    return Refusal(429, bodies.error(429, message, metadata), headers)
