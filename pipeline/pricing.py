"""Model prices from `GET /models` (cached on disk), costs computed from them, and the budget.

OpenRouter's own `usage.cost` is the truth and is what the output records. Prices are needed
only where that truth is missing: estimates before a run, the budget's reservation for requests
in flight, and endpoints that return no cost at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from pipeline.errors import JobStopped

DEFAULT_PRICES_TTL = 6 * 3600.0  # seconds a cached /models answer is trusted
DEFAULT_MAX_OUTPUT = 4096  # tokens reserved per request when neither max_tokens nor the model says


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's listing: context and per-token USD prices."""

    id: str
    name: str
    context_length: int | None
    max_completion_tokens: int | None
    prompt: Decimal
    completion: Decimal
    request: Decimal = Decimal(0)
    cache_read: Decimal | None = None
    supported_parameters: frozenset[str] = frozenset()

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """USD for a request: tokens x prices (cached prompt tokens at the cache-read price)."""
        cached_price = self.cache_read if self.cache_read is not None else self.prompt
        total = (
            (prompt_tokens - cached_tokens) * self.prompt
            + cached_tokens * cached_price
            + completion_tokens * self.completion
            + self.request
        )
        return float(total)

    def per_million(self, price: Decimal) -> str:
        return f"{price * 1_000_000:.4f}".rstrip("0").rstrip(".") if price else "0"

    @classmethod
    def from_listing(cls, entry: dict[str, Any]) -> ModelPrice | None:
        """Parse one `/models` entry; None if it has no usable prices (router pseudo-models)."""
        pricing = entry.get("pricing") or {}
        try:
            prompt, completion = (
                Decimal(str(pricing["prompt"])),
                Decimal(str(pricing["completion"])),
            )
            request = Decimal(str(pricing.get("request") or 0))
            cache_read = (
                Decimal(str(pricing["input_cache_read"]))
                if pricing.get("input_cache_read")
                else None
            )
        except (KeyError, InvalidOperation):
            return None
        if prompt < 0 or completion < 0:
            return None  # "-1" marks routers whose price depends on the model they pick
        top = entry.get("top_provider") or {}
        return cls(
            id=str(entry.get("id")),
            name=str(entry.get("name") or entry.get("id")),
            context_length=entry.get("context_length") or top.get("context_length"),
            max_completion_tokens=top.get("max_completion_tokens"),
            prompt=prompt,
            completion=completion,
            request=request,
            cache_read=cache_read,
            supported_parameters=frozenset(
                p for p in entry.get("supported_parameters") or () if isinstance(p, str)
            ),
        )


class Catalogue:
    """Prices by model id."""

    def __init__(self, models: list[ModelPrice], fetched_at: float) -> None:
        self.models = {m.id: m for m in models}
        self.fetched_at = fetched_at

    def get(self, model_id: str | None) -> ModelPrice | None:
        return self.models.get(model_id) if model_id else None

    def __contains__(self, model_id: str) -> bool:
        return model_id in self.models

    def search(self, text: str | None) -> list[ModelPrice]:
        found = (
            self.models.values()
            if not text
            else [m for m in self.models.values() if text.lower() in f"{m.id} {m.name}".lower()]
        )
        return sorted(found, key=lambda m: m.id)

    @classmethod
    def from_response(cls, body: Any, fetched_at: float) -> Catalogue:
        entries = body.get("data") if isinstance(body, dict) else None
        models = [
            m for e in entries or [] if isinstance(e, dict) and (m := ModelPrice.from_listing(e))
        ]
        return cls(models, fetched_at)


def cache_dir() -> Path:
    """Where prices (and nothing secret) are cached: $PIPELINE_CACHE_DIR, else the XDG cache."""
    explicit = os.environ.get("PIPELINE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prompt-pipeline"


def cached_listing(endpoint: str, ttl: float) -> tuple[Any, float] | None:
    """The cached `/models` body for `endpoint` and when it was fetched, if younger than `ttl`."""
    path = _cache_file(endpoint)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    fetched = float(stored.get("fetched_at", 0))
    if time.time() - fetched > ttl:
        return None
    return stored.get("body"), fetched


def store_listing(endpoint: str, body: Any) -> None:
    path = _cache_file(endpoint)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"endpoint": endpoint, "fetched_at": time.time(), "body": body}))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs a fetch next time


def _cache_file(endpoint: str) -> Path:
    return cache_dir() / f"models-{hashlib.sha256(endpoint.encode()).hexdigest()[:16]}.json"


class BudgetReached(JobStopped):
    """Another request could push spend past `max_cost`."""


class Budget:
    """`max_cost` for the whole job: spent so far (earlier runs included) plus a worst-case
    reservation for every request in flight must stay under the cap."""

    def __init__(self, cap: float, spent: float) -> None:
        self.cap = cap
        self.spent = spent
        self.reserved = 0.0

    def reserve(self, amount: float) -> None:
        if self.spent + self.reserved + amount > self.cap:
            raise BudgetReached(
                f"budget reached: ${self.spent:.6f} spent of max_cost ${self.cap:.6f}, and the next request "
                f"could cost up to ${amount:.6f}. Raise cost.max_cost (--max-cost) and re-run the same command "
                "to continue; nothing done so far is paid again."
            )
        self.reserved += amount

    def settle(self, reserved: float, actual: float | None) -> None:
        """Swap a reservation for what the request really cost (the reservation, if unknown)."""
        self.reserved -= reserved
        self.spent += reserved if actual is None else actual
