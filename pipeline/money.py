"""Money: model prices from `GET /models` (cached on disk), what a request could cost at worst
and what an answer did cost, as pure functions, the budget's reservations, and the endpoint's figures for a
job (the key's credit, lost attempts priced after the run).

OpenRouter's own `usage.cost` is the truth and is what the output records. Prices are needed
only where that truth is missing: estimates before a run, the budget's reservation for requests
in flight, and endpoints that return no cost at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.budget import Budget, BudgetReached
from pipeline.errors import TrustError, Unreachable, UserError
from pipeline.options import describe
from pipeline.places import cache_dir
from pipeline.records import ABANDONED

if TYPE_CHECKING:
    from pipeline.client import OpenRouterClient
    from pipeline.completions import Completion
    from pipeline.config import JobConfig
    from pipeline.journal import Journal
    from pipeline.records import Totals


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's listing: context and per-token USD prices; `priced` False when the endpoint
    lists the model without prices (OpenAI-compatible servers), whose prices then read 0."""

    id: str
    name: str
    context_length: int | None
    max_completion_tokens: int | None
    prompt: Decimal
    completion: Decimal
    request: Decimal = Decimal(0)
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None  # listed by models with explicit caching
    supported_parameters: frozenset[str] = frozenset()
    priced: bool = True
    image: Decimal = Decimal(0)  # per input image, where the listing prices images apart
    input_modalities: frozenset[str] = frozenset()  # "text", "image", "file"; empty: unlisted

    def cost(
        self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
        written_tokens: int = 0,
    ) -> float:  # fmt: skip
        """USD for a request: tokens x prices, the prompt tokens read from the cache at the
        cache-read price and those written to it at the cache-write price."""
        read = self.cache_read if self.cache_read is not None else self.prompt
        write = self.cache_write if self.cache_write is not None else self.prompt
        total = (
            (prompt_tokens - cached_tokens - written_tokens) * self.prompt
            + cached_tokens * read
            + written_tokens * write
            + completion_tokens * self.completion
            + self.request
        )
        return float(total)

    def cache_saving(self, cached_tokens: int, written_tokens: int) -> float:
        """What reading and writing the cache saved against the uncached prompt price
        (negative when writes cost more than reads saved)."""
        read = self.cache_read if self.cache_read is not None else self.prompt
        write = self.cache_write if self.cache_write is not None else self.prompt
        return float(cached_tokens * (self.prompt - read) - written_tokens * (write - self.prompt))

    def per_million(self, price: Decimal) -> str:
        if not self.priced:
            return "?"
        return f"{price * 1_000_000:.4f}".rstrip("0").rstrip(".") if price else "0"

    @classmethod
    def from_listing(cls, entry: dict[str, Any]) -> ModelPrice | None:
        """Parse one `/models` entry (None without an id); unpriced if it lists no usable
        prices (OpenAI-compatible servers, router pseudo-models)."""
        model_id = entry.get("id")
        if not isinstance(model_id, str) or not model_id:
            return None
        pricing = entry.get("pricing")
        pricing = pricing if isinstance(pricing, dict) else {}
        try:
            prompt, completion = (
                Decimal(str(pricing["prompt"])),
                Decimal(str(pricing["completion"])),
            )
            request = Decimal(str(pricing.get("request") or 0))
            image = Decimal(str(pricing.get("image") or 0))
            cache_read, cache_write = (
                Decimal(str(pricing[name])) if pricing.get(name) else None
                for name in ("input_cache_read", "input_cache_write")
            )
            # "-1" marks routers whose price depends on the model they pick
            priced = prompt >= 0 and completion >= 0
        except (KeyError, InvalidOperation):
            priced = False
        if not priced:
            prompt = completion = request = image = Decimal(0)
            cache_read = cache_write = None
        top = entry.get("top_provider")
        top = top if isinstance(top, dict) else {}
        architecture = entry.get("architecture")
        architecture = architecture if isinstance(architecture, dict) else {}
        return cls(
            id=model_id,
            name=str(entry.get("name") or entry.get("id")),
            context_length=entry.get("context_length") or top.get("context_length"),
            max_completion_tokens=top.get("max_completion_tokens"),
            prompt=prompt,
            completion=completion,
            request=request,
            cache_read=cache_read,
            cache_write=cache_write,
            supported_parameters=frozenset(
                p for p in entry.get("supported_parameters") or () if isinstance(p, str)
            ),
            priced=priced,
            image=max(image, Decimal(0)),
            input_modalities=frozenset(
                m for m in architecture.get("input_modalities") or () if isinstance(m, str)
            ),
        )


class Catalogue:
    """Every listed model by id; `get` gives only those with prices."""

    def __init__(self, models: list[ModelPrice], fetched_at: float) -> None:
        self.models = {m.id: m for m in models}
        self.fetched_at = fetched_at

    def get(self, model_id: str | None) -> ModelPrice | None:
        """The model's prices; None if it is not listed, or listed without prices."""
        price = self.models.get(model_id) if model_id else None
        return price if price is not None and price.priced else None

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


# ---------------------------------------------------------------- what a request costs

REPORTED, COMPUTED = "reported", "computed"  # cost_source of an answer's cost
# The prompt-token estimate (about four characters a token) can be this far under the truth.
PROMPT_ESTIMATE_MARGIN = 1.25


def most_output_tokens(price: ModelPrice, prompt_tokens: int, max_tokens: int | None) -> int | None:
    """The most output tokens one answer can take: the request's `max_tokens`, else the model's
    completion limit, else what its context leaves after the prompt; None when nothing says."""
    if max_tokens is not None:
        return max_tokens
    if price.max_completion_tokens:
        return int(price.max_completion_tokens)
    if price.context_length:
        return max(int(price.context_length) - prompt_tokens, 1)
    return None


def worst_case_cost(
    price: ModelPrice, prompt_tokens: int, max_tokens: int | None, samples: int = 1
) -> float | None:
    """The most a request could cost (None when its output has no known limit): the prompt
    estimate with its margin, and the longest answer allowed, once per sample."""
    output = most_output_tokens(price, prompt_tokens, max_tokens)
    if output is None:
        return None
    prompt = int(prompt_tokens * PROMPT_ESTIMATE_MARGIN) + 1
    # A cache write can cost more than the prompt price: at worst the whole prompt is written.
    written = prompt if price.cache_write is not None and price.cache_write > price.prompt else 0
    return price.cost(prompt, output * samples, written_tokens=written)


def completion_cost(
    completion: Completion, catalogue: Catalogue | None, model: str
) -> tuple[float | None, str | None]:
    """What an answer cost and how that is known: the endpoint's own `usage.cost`, else its
    tokens times the listed prices, else unknown (None, never a made-up 0)."""
    if completion.cost is not None:
        return completion.cost, REPORTED
    price = catalogue.get(completion.model or model) if catalogue is not None else None
    if price is None or completion.prompt_tokens is None or completion.completion_tokens is None:
        return None, None
    cost = price.cost(
        completion.prompt_tokens, completion.completion_tokens, completion.cached_tokens or 0,
        completion.cache_write_tokens or 0,
    )  # fmt: skip
    return cost, COMPUTED


def cache_saving(totals: Totals, catalogue: Catalogue | None) -> float | None:
    """What the job's cached and cache-written prompt tokens saved against the listed
    uncached prices; None when a model that used the cache has no listed prices."""
    saving = 0.0
    for model, used in totals.by_model.items():
        if not (used.cached_tokens or used.cache_write_tokens):
            continue
        price = catalogue.get(model) if catalogue is not None else None
        if price is None or not price.priced:
            return None
        saving += price.cache_saving(used.cached_tokens, used.cache_write_tokens)
    return saving


def unknown_limit(key: str, model: str, cap_key: str = "cost.max_cost") -> str:
    """Why a budget cannot hold for `model`: what to set instead."""
    return (
        f"{describe(cap_key)} needs the most a request could cost, and the endpoint's /models gives "
        f"{key} {model!r} neither a completion limit nor a context length; set {describe('request.max_tokens')}"
    )


class Reservations:
    """The budget's side of each attempt: before it, reserve the worst case of its request over
    every model that may serve it (the row's, then the fallbacks); after it, settle."""

    def __init__(self, budget: Budget, catalogue: Catalogue | None, fallbacks: tuple[str, ...]):
        self.budget = budget
        self.catalogue = catalogue
        self.fallbacks = fallbacks

    async def reserve(
        self, model: str, prompt_tokens: int, max_tokens: int | None, samples: int,
        *, wait: bool = True, images: int = 0,
    ) -> float:  # fmt: skip
        worst = 0.0
        cap_key = self.budget.caps[0].key
        for model_id in (model, *self.fallbacks):
            price = self.catalogue.get(model_id) if self.catalogue is not None else None
            if price is None:
                raise BudgetReached(
                    f"{describe(cap_key)} needs the price of {model_id}, which the endpoint's /models does not list"
                )
            cost = worst_case_cost(price, prompt_tokens, max_tokens, samples)
            if cost is None:
                raise BudgetReached(unknown_limit("model", model_id, cap_key))
            worst = max(worst, cost + images * float(price.image))
        await self.budget.reserve(worst, wait=wait)
        return worst

    def settle(self, reserved: float, actual: float | None) -> None:
        self.budget.settle(reserved, actual)


# ------------------------------------------------------------------ from the endpoint


async def load_catalogue(
    client: OpenRouterClient, config: JobConfig, *, refresh: bool = False, required: bool = False
) -> Catalogue | None:
    """Prices from `/models`: from the disk cache when fresh, else fetched (and cached). An
    endpoint that cannot be reached raises `Unreachable`: every request would fail too. One
    without a model list gives None, or with `required` a `UserError` saying why."""
    endpoint = "(simulator)" if config.request.simulate else config.request.base_url
    # Embeddings models have a list of their own (OpenRouter's `/embeddings/models`).
    route = "/embeddings/models" if config.request.endpoint == "embeddings" else "/models"
    endpoint += route.removesuffix("/models")
    if not refresh and (cached := cached_listing(endpoint, config.cost.prices_ttl)) is not None:
        body, fetched_at = cached
        return Catalogue.from_response(body, fetched_at)
    url = f"{client.base_url}{route}"

    def refuse(why: object) -> UserError:
        return UserError(f"{url} did not answer with a model list: {why}")

    try:
        status, body = await client.fetch_json(route)
    except TrustError as exc:
        if required:
            raise refuse(exc) from None
        raise
    except Unreachable as exc:
        if required:
            raise refuse(exc.cause) from None
        if exc.connected:
            return None  # connected, but no answer: the requests themselves will tell
        raise Unreachable(
            f"{exc}; nothing was sent. Check {describe('request.base_url')} and that the endpoint "
            "is up, then re-run the same command.",
            exc.cause, connected=False,
        ) from None  # fmt: skip
    listed = isinstance(body, dict) and isinstance(body.get("data"), list)
    if status == 404 and await _no_chat_route(client):
        raise UserError(
            f"{client.base_url} answers 404 to both /models and /chat/completions, so it is not "
            f"the root of an OpenAI-compatible API: {describe('request.base_url')} usually ends "
            "in its API path (OpenRouter: https://openrouter.ai/api/v1; most servers: .../v1)"
        )
    if status != 200 or not listed:
        if required:
            raise refuse(_answer(status, body))
        return None
    store_listing(endpoint, body)
    return Catalogue.from_response(body, time.time())


async def _no_chat_route(client: OpenRouterClient) -> bool:
    """Whether the endpoint has no chat route either: an empty body is refused (400, never
    billed) where the route exists, and a wrong API path answers 404 to it too."""
    try:
        status, _ = await client.fetch_json("/chat/completions", post=b"{}")
    except Unreachable:
        return False  # the requests themselves will tell
    return status == 404


def _answer(status: int, body: Any) -> str:
    """What an endpoint said instead of a model list, in one line."""
    if status != 200:
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        return f"HTTP {status}: {message}" if message else f"HTTP {status}"
    return "HTTP 200 without a `data` list of models"


async def credit_warning(
    client: OpenRouterClient, prices: list[ModelPrice | None], prompt_tokens: float,
    output_tokens: float,
) -> str | None:  # fmt: skip
    """A warning when the work left could cost more than the key has left (`GET /key`)."""
    if any(price is None for price in prices):
        return None
    body = await client.get_json("/key")
    data = body.get("data") if isinstance(body, dict) else None
    remaining = data.get("limit_remaining") if isinstance(data, dict) else None
    if not isinstance(remaining, int | float):
        return None
    estimate = sum(
        price.cost(int(prompt_tokens), int(output_tokens)) for price in prices if price is not None
    )
    if estimate > remaining:
        return f"this job could cost up to ${estimate:.4f} but the key has ${remaining:.4f} left (GET /key limit_remaining); it will stop with exit 4 when the credit runs out"
    return None


async def key_figures(client: OpenRouterClient) -> str:
    """The key's usage and limits, for the message of a 402."""
    body = await client.get_json("/key")
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        return ""
    parts = [
        f"{name} ${data[name]:.4f}"
        for name in ("usage", "limit", "limit_remaining")
        if isinstance(data.get(name), int | float)
    ]
    return f" (key: {', '.join(parts)})" if parts else ""


async def reconcile(
    client: OpenRouterClient, journal: Journal, log: Callable[[str], None] | None = None,
    patience: float = 60.0,
) -> None:  # fmt: skip
    """Ask `/generation` what the lost attempts cost. It may answer 404 for a while after a
    generation, so poll with back-off; what is still unknown after `patience` seconds waits for
    a later run."""
    # An attempt abandoned before any generation id came back cannot be looked up.
    pending = {g for g in journal.unreconciled() if not g.startswith(ABANDONED)}
    if not pending:
        return
    if log is not None:
        log(f"reconciling {len(pending)} attempt(s) whose answer never arrived (GET /generation)")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    delay = 0.5
    gate = asyncio.Semaphore(8)

    async def look_up(generation_id: str) -> tuple[str, float | None, bool]:
        async with gate:
            status, body = await client.get_status_json("/generation", id=generation_id)
        data = body.get("data") if isinstance(body, dict) else None
        if (
            status == 200
            and isinstance(data, dict)
            and isinstance(data.get("total_cost"), int | float)
        ):
            return generation_id, float(data["total_cost"]), True
        # 404: not known yet; 0, 429, 5xx: ask again; any other answer will not change.
        return generation_id, None, status not in (404, 0, 429) and status < 500

    while pending:
        found = await asyncio.gather(*(look_up(g) for g in pending))
        journal.reconcile({g: cost for g, cost, _ in found if cost is not None})
        pending -= {g for g, cost, final in found if cost is not None or final}
        if not pending or loop.time() + delay > deadline:
            break
        await asyncio.sleep(delay)
        delay = min(delay * 2, 8.0)
