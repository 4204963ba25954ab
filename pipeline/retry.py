"""Which failures retry and how long to wait: capped attempts *and* capped total time, full
jitter, and `Retry-After` honoured when the server gives one. Back-off 0 switches waiting off
(tests use it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipeline.config import RetryConfig

_JITTER = random.Random()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    max_elapsed: float
    backoff_base: float
    backoff_max: float

    @classmethod
    def from_config(cls, config: RetryConfig) -> RetryPolicy:
        return cls(config.max_attempts, config.max_elapsed, config.backoff_base, config.backoff_max)

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random = _JITTER) -> float:
        """Seconds to wait before attempt `attempt + 1`, after `attempt` failures."""
        if retry_after is not None:
            return retry_after
        if self.backoff_base <= 0:
            return 0.0
        return rng.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)))

    def gives_up(self, attempt: int, elapsed: float, next_delay: float) -> bool:
        """True when another attempt would exceed the attempt cap or the time cap."""
        return attempt >= self.max_attempts or elapsed + next_delay > self.max_elapsed
