"""What the model routes list, all from the one catalogue: `GET /models` (which
`supported_parameters` filters), `GET /models/user` (the same: the simulator keeps no provider
preferences to filter by) and `GET /models/{author}/{slug}/endpoints`, the route every model's
`links.details` names (OAS `ListEndpointsResponse`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pipeline.simulator.catalogue import CATALOGUE, MODELS_BY_ID, SimModel
from pipeline.simulator.config import SimConfig

CATALOGUE_CREATED = 1_702_339_200  # a fixed date, so /models is byte-for-byte stable


def models(
    config: SimConfig,
    query: Mapping[str, str] | None = None,
    listed: tuple[SimModel, ...] = CATALOGUE,
) -> dict[str, Any]:
    """The body of `GET /models` (or, `listed` the embeddings models, `/embeddings/models`):
    every model that supports each of the comma-separated `supported_parameters` in `query`
    (all of them when it names none)."""
    wanted = [p.strip() for p in (query or {}).get("supported_parameters", "").split(",")]
    data = [
        entry
        for entry in (_entry(config, model) for model in listed)
        if all(p in entry["supported_parameters"] for p in wanted if p)
    ]
    return {"data": data, "links": {"next": None}, "total_count": len(data)}


def endpoints(config: SimConfig, model_id: str) -> dict[str, Any] | None:
    """The body of `GET /models/{model_id}/endpoints`, or None for a model not in the catalogue.

    Each simulated model has one endpoint, its provider, priced and limited as `/models` lists
    it; it is always up, and no latency or throughput is measured (null, as the spec allows).
    `<model>:batch` is the model's Batch API row, at `batch_discount` of its prices."""
    base = model_id.removesuffix(":batch")
    model = MODELS_BY_ID.get(base)
    if model is None or (base != model_id and not model.batch):
        return None
    if base != model_id:
        model = dataclasses.replace(
            model.batch_row(config.batch_discount), id=model_id, name=f"{model.name} (batch)"
        )
    entry = _entry(config, model)
    endpoint = {
        "name": f"{model.provider} | {model.id}",
        "model_id": model.id,
        "model_name": model.name,
        # The spec has no null for it here: `omit_context_length` shortens only the listing.
        "context_length": model.context_length,
        "pricing": entry["pricing"],
        "provider_name": model.provider,
        "tag": model.provider.lower(),
        "quantization": None,
        "max_completion_tokens": entry["top_provider"]["max_completion_tokens"],
        "max_prompt_tokens": None,
        "supported_parameters": entry["supported_parameters"],
        "status": 0,
        "uptime_last_30m": 100.0,
        "uptime_last_5m": 100.0,
        "uptime_last_1d": 100.0,
        "supports_implicit_caching": model.cache_read_price is not None,
        "latency_last_30m": None,
        "throughput_last_30m": None,
    }
    return {
        "data": {
            "id": model.id,
            "name": model.name,
            "created": CATALOGUE_CREATED,
            "description": entry["description"],
            "architecture": entry["architecture"],
            "endpoints": [endpoint],
        }
    }


def _entry(config: SimConfig, model: SimModel) -> dict[str, Any]:
    """A model as `/models` lists it: with `n` among the parameters under `native_n`, the
    limits `omit_max_completion` / `omit_context_length` leave out as null, and the prices
    `omit_prices` leaves unknown."""
    entry = model.to_json(CATALOGUE_CREATED)
    if config.native_n:
        entry["supported_parameters"].append("n")
    if config.omit_max_completion:
        entry["top_provider"]["max_completion_tokens"] = None
    if config.omit_context_length:
        entry["context_length"] = entry["top_provider"]["context_length"] = None
    if config.omit_prices:
        entry["pricing"] = {**entry["pricing"], "prompt": "-1", "completion": "-1"}
    return entry
