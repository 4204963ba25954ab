"""Prompt caching, as OpenRouter and its providers do it (OpenRouter's prompt-caching guide):

- Each provider of a model keeps its own cache of prompt prefixes, per key, for `cache_ttl`
  seconds, refreshed by every hit. A request whose prefix a provider holds reads it at the
  model's `input_cache_read` price (`cached_tokens`); one that misses writes it, at the
  `input_cache_write` price where the model lists one (`cache_write_tokens`). Both counts are
  part of `prompt_tokens`.
- Models with explicit caching (Anthropic's, here) cache only up to the last content part
  marked `cache_control`, and only a prefix of at least `min_cache_tokens`; the others (OpenAI
  style, implicit) cache a leading system message by themselves.
- Routing: a model with several providers spreads requests over them in turn, so each has to
  warm its own cache, unless routing is sticky: after a cache hit (or any answer, given a
  `session_id`), requests with the same routing key go to the same provider until 10 minutes
  pass without one. The key is the `session_id` (body or `x-session-id`), else
  `prompt_cache_key`, else the first system and first other message. `provider.order` turns
  stickiness off: the first provider listed that serves the model answers.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pipeline.simulator.catalogue import SimModel
from pipeline.simulator.content import MESSAGE_OVERHEAD_TOKENS, count_tokens, message_text

STICKY_SECONDS = 600.0  # a sticky route lapses after this long without a request on it


@dataclass(frozen=True, slots=True)
class CacheUse:
    """Where a request went and what of its prompt the provider's cache read or wrote."""

    provider: str
    cached_tokens: int = 0
    written_tokens: int = 0


class PromptCache:
    """Every provider's prompt cache and the sticky routes, for one simulator."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[tuple[str, str, str], float] = {}  # (key, provider, prefix) -> expiry
        self._sticky: dict[tuple[str, str, str], tuple[str, float]] = {}  # -> (provider, expiry)
        self._turns: Counter[str] = Counter()  # requests routed per model, for taking turns

    def serve(
        self, key: str, model: SimModel, body: dict[str, Any], session: str | None, now: float
    ) -> CacheUse:
        """Route one request and look its prefix up in that provider's cache."""
        messages = body.get("messages") or []
        providers = model.providers or (model.provider,)
        order = _provider_order(body, providers)
        cheaper = model.cache_read_price is not None and model.cache_read_price < model.prompt_price
        # Only a route among several providers, to a cheaper cache, is worth keeping.
        sticky = cheaper and order is None and len(providers) > 1
        route = (key, model.id, session or _route_key(body, messages)) if sticky else None
        kept = self._sticky.get(route) if route is not None else None
        if order is not None:
            provider = order
        elif kept is not None and kept[1] > now:
            provider = kept[0]
        else:
            provider = providers[self._turns[model.id] % len(providers)]
            self._turns[model.id] += 1
        use = CacheUse(provider)
        prefix = _prefix(model, messages) if model.cache_read_price is not None else None
        if prefix is not None:
            digest, tokens = prefix
            entry = (key, provider, digest)
            if self._entries.get(entry, float("-inf")) > now:
                use = CacheUse(provider, cached_tokens=tokens)
            else:
                use = CacheUse(provider, written_tokens=tokens if model.explicit_cache else 0)
            self._entries[entry] = now + self.ttl
        # Made by a hit (or any answer in a session); each request on it renews it.
        renewed = kept is not None and kept[0] == provider
        if route is not None and (use.cached_tokens or session is not None or renewed):
            self._sticky[route] = (provider, now + STICKY_SECONDS)
        return use


def _provider_order(body: dict[str, Any], providers: tuple[str, ...]) -> str | None:
    """The first provider of `provider.order` among the model's `providers` (its first when
    none listed is), or None without an order."""
    preferences = body.get("provider")
    order = preferences.get("order") if isinstance(preferences, dict) else None
    if not isinstance(order, list) or not order:
        return None
    by_name = {name.lower(): name for name in providers}
    for wanted in order:
        if isinstance(wanted, str) and wanted.lower() in by_name:
            return by_name[wanted.lower()]
    return providers[0]


def _route_key(body: dict[str, Any], messages: list[Any]) -> str:
    cache_key = body.get("prompt_cache_key")
    if isinstance(cache_key, str):
        return cache_key
    system = next((m for m in messages if _role(m) in ("system", "developer")), None)
    other = next((m for m in messages if _role(m) not in ("system", "developer")), None)
    return _digest([system, other])


def _prefix(model: SimModel, messages: list[Any]) -> tuple[str, int] | None:
    """The cacheable prefix of a prompt (its digest and tokens), or None."""
    if not model.explicit_cache:  # implicit: a leading system message
        first = messages[0] if messages else None
        if _role(first) != "system":
            return None
        return _digest([first]), count_tokens(message_text(first)) + MESSAGE_OVERHEAD_TOKENS
    marked = [
        (i, j)
        for i, message in enumerate(messages)
        for j, part in enumerate(_parts(message))
        if isinstance(part, dict) and part.get("cache_control")
    ]
    if not marked:
        return None
    last, upto = marked[-1]
    head = [*messages[:last], {**messages[last], "content": _parts(messages[last])[: upto + 1]}]
    tokens = sum(count_tokens(message_text(m)) + MESSAGE_OVERHEAD_TOKENS for m in head)
    return (_digest(head), tokens) if tokens >= model.min_cache_tokens else None


def _parts(message: Any) -> list[Any]:
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, list) else []


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=12).hexdigest()
