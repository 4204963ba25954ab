"""The simulator's prompt caching: each provider caches prefixes of its own, explicit models
only up to a `cache_control` mark, writes and reads billed at the model's cache prices, and
routing that sticks to a provider (except under `provider.order`)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from pipeline.simulator import RunningSimulator
from pipeline.simulator.catalogue import MODELS_BY_ID
from tests.openapi import validate_component, validate_response

CLAUDE = MODELS_BY_ID["anthropic/claude-sonnet-4"]
INSTRUCTIONS = "Label the review as positive, negative or neutral. " + "Guidelines follow. " * 700


def labeling(review: str, *, marked: bool = True, **extra: Any) -> dict[str, Any]:
    system: dict[str, Any] = {"type": "text", "text": INSTRUCTIONS}
    if marked:
        system["cache_control"] = {"type": "ephemeral"}
    return {
        "model": CLAUDE.id,
        "messages": [
            {"role": "system", "content": [system]},
            {"role": "user", "content": review},
        ],
        **extra,
    }


async def ask(http: aiohttp.ClientSession, sim: RunningSimulator, body: dict[str, Any]) -> Any:
    validate_component("ChatRequest", body)
    async with http.post(f"{sim.base_url}/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    validate_response("/chat/completions", "post", 200, answer)
    return answer


def price(tokens: int, per_token: Decimal | None) -> float:
    assert per_token is not None
    return float(tokens * per_token)


async def test_an_explicit_prefix_is_written_once_then_read_at_the_cache_price(
    make_sim: Any, http: aiohttp.ClientSession
) -> None:
    sim: RunningSimulator = await make_sim()
    answers = [
        await ask(http, sim, labeling(f"review {i}: fine", session_id="job-1")) for i in range(4)
    ]
    details = [a["usage"]["prompt_tokens_details"] for a in answers]
    written = details[0]["cache_write_tokens"]
    assert written >= 2_000 and details[0]["cached_tokens"] == 0
    assert all(d["cached_tokens"] == written and d["cache_write_tokens"] == 0 for d in details[1:])
    first, later = answers[0]["usage"], answers[1]["usage"]
    plain = later["prompt_tokens"] - written
    assert first["cost"] == pytest.approx(
        price(written, CLAUDE.cache_write_price)
        + price(first["prompt_tokens"] - written, CLAUDE.prompt_price)
        + price(first["completion_tokens"], CLAUDE.completion_price)
    )
    assert later["cost"] == pytest.approx(
        price(written, CLAUDE.cache_read_price)
        + price(plain, CLAUDE.prompt_price)
        + price(later["completion_tokens"], CLAUDE.completion_price)
    )
    assert len({a["provider"] for a in answers}) == 1  # the session stuck to one provider
    async with http.get(f"{sim.origin}/_sim/ledger") as resp:
        ledger = (await resp.json())["data"]
    assert [e["cost"] for e in ledger] == [a["usage"]["cost"] for a in answers]
    assert [e["cached_tokens"] for e in ledger] == [0, written, written, written]


async def test_without_a_mark_or_below_the_minimum_nothing_is_cached(
    make_sim: Any, http: aiohttp.ClientSession
) -> None:
    sim: RunningSimulator = await make_sim()
    for i in range(3):
        unmarked = await ask(http, sim, labeling(f"r{i}", marked=False, session_id="s"))
        short = labeling(f"r{i}", session_id="s")
        short["messages"][0]["content"][0]["text"] = "Label the review."
        too_short = await ask(http, sim, short)
        for answer in (unmarked, too_short):
            assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            assert answer["usage"]["prompt_tokens_details"]["cache_write_tokens"] == 0


async def test_each_provider_warms_its_own_cache_unless_the_order_names_one(
    make_sim: Any, http: aiohttp.ClientSession
) -> None:
    sim: RunningSimulator = await make_sim()
    spread = [await ask(http, sim, labeling(f"review {i}")) for i in range(6)]
    # Rows of different reviews take turns over the three providers: each writes once.
    providers = [a["provider"] for a in spread]
    assert providers[:3] == list(CLAUDE.providers) and set(providers[3:]) <= set(CLAUDE.providers)
    writes = [a["usage"]["prompt_tokens_details"]["cache_write_tokens"] > 0 for a in spread]
    assert writes == [True, True, True, False, False, False]

    sim = await make_sim()
    ordered = [
        await ask(http, sim, labeling(f"review {i}", provider={"order": ["amazon bedrock"]}))
        for i in range(4)
    ]
    assert {a["provider"] for a in ordered} == {"Amazon Bedrock"}
    writes = [a["usage"]["prompt_tokens_details"]["cache_write_tokens"] > 0 for a in ordered]
    assert writes == [True, False, False, False]


async def test_a_prefix_leaves_the_cache_after_its_ttl(
    make_sim: Any, http: aiohttp.ClientSession
) -> None:
    sim: RunningSimulator = await make_sim(cache_ttl=0.0)  # gone as soon as it is written
    answers = [await ask(http, sim, labeling(f"r{i}", session_id="s")) for i in range(3)]
    assert all(a["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 for a in answers)
    assert all(a["usage"]["prompt_tokens_details"]["cache_write_tokens"] > 0 for a in answers)


async def test_the_listing_prices_cache_reads_and_writes(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{sim.base_url}/models") as resp:
        models = {m["id"]: m for m in (await resp.json())["data"]}
    pricing = models[CLAUDE.id]["pricing"]
    assert Decimal(pricing["input_cache_read"]) == CLAUDE.cache_read_price
    assert Decimal(pricing["input_cache_write"]) == CLAUDE.cache_write_price
    assert "input_cache_write" not in models["openai/gpt-4o-mini"]["pricing"]  # implicit, free
