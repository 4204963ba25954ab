"""`[cost]`: the caps on spend and what estimates and prices need, read from the raw config.

Apart from `config` so that module stays small; `config` re-exports `CostConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.values import RawValues

DEFAULT_RECONCILE_TIMEOUT = 60.0
DEFAULT_PRICES_TTL = 6 * 3600.0  # seconds a cached /models answer is trusted
# The caps on spend; all of them hold at once.
CAP_KEYS = ("cost.max_cost", "cost.max_cost_per_run", "cost.max_cost_per_day")


@dataclass(frozen=True, slots=True)
class CostConfig:
    max_cost: float | None = None  # USD for the whole job, earlier runs included
    max_cost_per_run: float | None = None  # USD this run may spend (a recurring job's cap)
    max_cost_per_day: float | None = None  # USD over any 24 h, from the journal's payment times
    expected_output_tokens: int | None = None  # typical answer length, for estimates
    prices_ttl: float = DEFAULT_PRICES_TTL  # seconds a cached /models answer is trusted
    # Seconds to wait for /generation to price attempts whose answer never arrived.
    reconcile_timeout: float = DEFAULT_RECONCILE_TIMEOUT

    @property
    def caps(self) -> dict[str, float]:
        """The caps set, by key: each needs prices to hold."""
        caps = {key: getattr(self, key.split(".")[1]) for key in CAP_KEYS}
        return {key: cap for key, cap in caps.items() if cap is not None}


def cost_config(v: RawValues) -> CostConfig:
    """The `[cost]` section; a key left unset keeps its default."""
    given: dict[str, Any] = {
        "max_cost": v.number("cost.max_cost", low=0),
        "max_cost_per_run": v.number("cost.max_cost_per_run", low=0),
        "max_cost_per_day": v.number("cost.max_cost_per_day", low=0),
        "expected_output_tokens": v.integer("cost.expected_output_tokens", low=1),
        "prices_ttl": v.number("cost.prices_ttl", low=0),
        "reconcile_timeout": v.number("cost.reconcile_timeout", low=0),
    }
    return CostConfig(**{key: value for key, value in given.items() if value is not None})
