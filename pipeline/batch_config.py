"""`[batch]`: how batch mode (`request.mode = "batch"`) uses OpenRouter's Batch API, read from
the raw config. Apart from `config` so that module stays small; `config` re-exports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.values import RawValues


@dataclass(frozen=True, slots=True)
class BatchConfig:
    # The Batch API's base URL; unset: the chat one (`request.base_url`). OpenRouter serves
    # it under both /api/v1 and /api/beta.
    base_url: str | None = None
    max_lines: int = 10_000  # requests in one batch at most
    max_bytes: int = 50_000_000  # a batch's submission body at most
    poll_interval: float = 15.0  # seconds between polls at first, doubling up to poll_max
    poll_max: float = 60.0
    # Seconds a create whose answer was lost is looked for in the list of batches (which may
    # lag) before it is taken as not made and sent again.
    list_lag: float = 30.0
    # False (`--no-wait`): submit, collect what is final already, and exit 7 while batches
    # are still running; the next run collects them.
    wait: bool = True


def batch_config(v: RawValues) -> BatchConfig:
    """The `[batch]` section; a key left unset keeps its default."""
    base_url = v.string("batch.base_url")
    given: dict[str, Any] = {
        "base_url": base_url.rstrip("/") if base_url else None,
        "max_lines": v.integer("batch.max_lines", low=1),
        "max_bytes": v.integer("batch.max_bytes", low=1),
        "poll_interval": v.number("batch.poll_interval", low=0),
        "poll_max": v.number("batch.poll_max", low=0),
        "list_lag": v.number("batch.list_lag", low=0),
        "wait": v.flag("batch.wait") if "wait" in v.raw["batch"] else None,
    }
    return BatchConfig(**{key: value for key, value in given.items() if value is not None})
