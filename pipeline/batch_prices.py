"""What a model costs through OpenRouter's Batch API: the price of its `:batch` endpoint, which
`GET /models/{id}:batch/endpoints` lists apart from the model's own (typically half of it). A
model without one answers 404 there: batch mode cannot send it, and `auto` mode sends it in
sync mode instead."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline.errors import Unreachable
from pipeline.money import ModelPrice

if TYPE_CHECKING:
    from pipeline.client import OpenRouterClient


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
