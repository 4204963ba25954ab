"""What a model costs through OpenRouter's Batch API: the price of its `:batch` endpoint, which
`GET /models/{id}:batch/endpoints` lists apart from the model's own (typically half of it). A
model without one answers 404 there: batch mode cannot send it, and `auto` mode sends it in
sync mode instead. Also what a batch's line costs, and its bill beside its lines' costs."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline.errors import Unreachable
from pipeline.money import REPORTED, ModelPrice

if TYPE_CHECKING:
    from pipeline.client import OpenRouterClient
    from pipeline.completions import Completion

BATCH_PRICE = "batch_price"  # cost_source: tokens times the model's `:batch` price


class BatchEndpoint(NamedTuple):
    listed: bool | None  # whether the model lists a `:batch` endpoint; None: no answer
    price: ModelPrice | None  # the cheapest one's, as OpenRouter picks by default


async def batch_endpoint(client: OpenRouterClient, model_id: str) -> BatchEndpoint:
    try:
        status, body = await client.fetch_json(f"/models/{model_id}:batch/endpoints")
    except Unreachable:
        return BatchEndpoint(None, None)
    data = body.get("data") if isinstance(body, dict) else None
    endpoints = data.get("endpoints") if isinstance(data, dict) else None
    if status == 404 or (status == 200 and endpoints == []):
        return BatchEndpoint(False, None)
    if status != 200 or not isinstance(endpoints, list):
        return BatchEndpoint(None, None)
    prices = [_endpoint_price(model_id, e) for e in endpoints if isinstance(e, dict)]
    priced = [p for p in prices if p is not None and p.priced]
    cheapest = min(priced, key=lambda p: p.prompt + p.completion) if priced else None
    return BatchEndpoint(True, cheapest)


async def batch_prices(
    client: OpenRouterClient, model_ids: list[str]
) -> dict[str, ModelPrice | None]:
    found = await asyncio.gather(*(batch_endpoint(client, m) for m in model_ids))
    return {model: endpoint.price for model, endpoint in zip(model_ids, found, strict=True)}


def _endpoint_price(model_id: str, endpoint: dict[str, Any]) -> ModelPrice | None:
    return ModelPrice.from_listing(
        {"id": f"{model_id}:batch", "pricing": endpoint.get("pricing"),
         "context_length": endpoint.get("context_length")}
    )  # fmt: skip


def line_cost(completion: Completion, price: ModelPrice | None) -> tuple[float | None, str | None]:
    """A line's cost and how it was obtained: its own `usage.cost` when it has one, else its
    tokens at the model's `:batch` price; (None, None) when neither is known."""
    if completion.cost is not None:
        return completion.cost, REPORTED
    prompt, output = completion.prompt_tokens, completion.completion_tokens
    if price is None or prompt is None or output is None:
        return None, None
    cached, written = completion.cached_tokens or 0, completion.cache_write_tokens or 0
    return price.cost(prompt, output, cached, written), BATCH_PRICE


def bill(billed: float | None, lines: float | None) -> str:
    """What a batch was billed, beside what its answers' costs add up to when they differ:
    the bill is the true spend."""
    if billed is None:
        return "its bill not reported" + (f" (its answers: ${lines:.6f})" if lines else "")
    if lines is None or abs(billed - lines) <= max(1e-9, 1e-6 * billed):
        return f"cost ${billed:.6f}"
    return f"billed ${billed:.6f}, its answers' costs add up to ${lines:.6f}: the true spend counts the bill"
