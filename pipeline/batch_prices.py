"""What a model costs through OpenRouter's Batch API: the price of its `:batch` endpoint, which
`GET /models/{id}:batch/endpoints` lists apart from the model's own (typically half of it). A
model without one answers 404 there: batch mode cannot send it."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pipeline.errors import Unreachable
from pipeline.money import ModelPrice

if TYPE_CHECKING:
    from pipeline.client import OpenRouterClient


async def batch_price(client: OpenRouterClient, model_id: str) -> ModelPrice | None:
    """The model's `:batch` endpoint price (the cheapest, as OpenRouter picks by default), or
    None when it lists none."""
    try:
        status, body = await client.fetch_json(f"/models/{model_id}:batch/endpoints")
    except Unreachable:
        return None
    data = body.get("data") if isinstance(body, dict) else None
    endpoints = data.get("endpoints") if isinstance(data, dict) else None
    if status != 200 or not isinstance(endpoints, list):
        return None
    prices = [_endpoint_price(model_id, e) for e in endpoints if isinstance(e, dict)]
    priced = [p for p in prices if p is not None and p.priced]
    return min(priced, key=lambda p: p.prompt + p.completion) if priced else None


async def batch_prices(
    client: OpenRouterClient, model_ids: list[str]
) -> dict[str, ModelPrice | None]:
    found = await asyncio.gather(*(batch_price(client, m) for m in model_ids))
    return dict(zip(model_ids, found, strict=True))


def _endpoint_price(model_id: str, endpoint: dict[str, Any]) -> ModelPrice | None:
    return ModelPrice.from_listing(
        {"id": f"{model_id}:batch", "pricing": endpoint.get("pricing"),
         "context_length": endpoint.get("context_length")}
    )  # fmt: skip
