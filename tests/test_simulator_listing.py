"""`/models` as endpoints that list less serve it: `omit_max_completion` and `omit_context_length`
null those fields (OpenRouter's spec allows it) and change nothing else, not even the checks."""

from __future__ import annotations

import copy
from typing import Any

import aiohttp

from pipeline.simulator import MODELS_BY_ID, RunningSimulator, SimConfig
from tests.helpers import SimFactory, chat_body
from tests.openapi import validate_response


async def listing(http: aiohttp.ClientSession, sim: RunningSimulator) -> dict[str, Any]:
    async with http.get(f"{sim.base_url}/models") as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
    validate_response("/models", "get", 200, body)
    return body


def without(body: dict[str, Any], *paths: tuple[str, ...]) -> dict[str, Any]:
    """A copy of the listing with the fields at `paths` (in every model) set to None."""
    body = copy.deepcopy(body)
    for entry in body["data"]:
        for path in paths:
            node = entry
            for name in path[:-1]:
                node = node[name]
            node[path[-1]] = None
    return body


async def test_omit_max_completion_nulls_only_the_top_providers_maximum(
    sim: RunningSimulator, make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    full = await listing(http, sim)
    assert all(e["top_provider"]["max_completion_tokens"] for e in full["data"])
    short = await listing(http, await make_sim(omit_max_completion=True))
    assert short == without(full, ("top_provider", "max_completion_tokens"))


async def test_omit_context_length_nulls_both_lengths_but_requests_are_still_checked(
    sim: RunningSimulator, make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    full = await listing(http, sim)
    short_sim = await make_sim(omit_context_length=True)
    short = await listing(http, short_sim)
    assert short == without(full, ("context_length",), ("top_provider", "context_length"))
    # The listing no longer says so, but the model's context is what it was.
    context = MODELS_BY_ID["mistralai/mixtral-8x7b-instruct"].context_length
    url = f"{short_sim.base_url}/chat/completions"
    async with http.post(url, json=chat_body(max_tokens=context)) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["metadata"]["error_type"] == "context_length_exceeded"
        assert f"maximum context length is {context} tokens" in error["message"]
    async with http.post(url, json=chat_body(max_tokens=context - 100)) as resp:
        assert resp.status == 200


async def test_both_options_are_off_by_default_and_settable_while_running(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    defaults = SimConfig()
    assert defaults.omit_max_completion is False and defaults.omit_context_length is False
    changed = defaults.updated({"omit_max_completion": True, "omit_context_length": True})
    assert changed.omit_max_completion is True and changed.omit_context_length is True

    full = await listing(http, sim)
    changes = {"omit_max_completion": True, "omit_context_length": True}
    async with http.post(f"{sim.origin}/_sim/config", json=changes) as resp:
        assert resp.status == 200
    both = await listing(http, sim)
    assert both == without(
        full,
        ("context_length",),
        ("top_provider", "context_length"),
        ("top_provider", "max_completion_tokens"),
    )
    off = {"omit_max_completion": False, "omit_context_length": False}
    async with http.post(f"{sim.origin}/_sim/config", json=off) as resp:
        assert resp.status == 200
    assert await listing(http, sim) == full
