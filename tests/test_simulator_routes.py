"""The simulator's perimeter as a third-party client meets it: who a 429 holds back, the model
routes the spec has beyond `/models`, and what an unknown route or a wrong method answers.

Every body is validated against OpenRouter's published spec (tests/spec), not our own idea of it.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import aiohttp
import pytest

from pipeline.simulator import CATALOGUE, MODELS_BY_ID, RunningSimulator
from tests.helpers import SimFactory, chat_body
from tests.openapi import validate_component, validate_response

ENDPOINTS = "/models/{author}/{slug}/endpoints"


async def chat(
    http: aiohttp.ClientSession, sim: RunningSimulator, prompt: str, **body: Any
) -> tuple[int, dict[str, str], Any]:
    async with http.post(f"{sim.base_url}/chat/completions", json=chat_body(prompt, **body)) as r:
        return r.status, dict(r.headers), json.loads(await r.text())


async def get(
    http: aiohttp.ClientSession, url: str, *, auth: bool = True
) -> tuple[int, dict[str, str], Any]:
    headers = None if auth else {"Authorization": ""}
    async with http.get(url, headers=headers) as resp:
        text = await resp.text()
        return resp.status, dict(resp.headers), json.loads(text) if text else None


async def stats(http: aiohttp.ClientSession, sim: RunningSimulator) -> Any:
    return (await get(http, f"{sim.origin}/_sim/stats"))[2]


# -------------------------------------------------------------- who a 429 holds back


async def test_an_injected_429_holds_back_no_other_request_of_the_key(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    """An upstream 429 or 503 is one provider's answer to one request: OpenRouter documents no
    key-wide penalty for it, so the next prompt, sent at once, is answered (or faulted) on its
    own draw, never refused for the earlier one's Retry-After."""
    sim = await make_sim(fault_rates={"429": 0.4, "503": 0.2}, retry_after=30.0, seed=3)
    statuses = [(await chat(http, sim, f"prompt {i}"))[0] for i in range(60)]
    after_fault = [b for a, b in itertools.pairwise(statuses) if a in (429, 503)]
    assert 200 in after_fault  # answered straight after a 429/503, well inside its Retry-After
    seen = await stats(http, sim)
    # Every refusal was an injected fault: none was a penalty for an earlier one.
    assert seen["by_status"].get("429", 0) == seen["faults"].get("429", 0) > 0
    assert seen["by_status"].get("503", 0) == seen["faults"].get("503", 0) > 0
    assert seen["retry_after_violations"] == 0


async def test_an_injected_429_does_not_hold_back_another_model(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(retry_after=30.0)
    async with http.post(
        f"{sim.base_url}/chat/completions", json=chat_body(), headers={"X-Sim-Fault": "429"}
    ) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "30"
    status, _, _ = await chat(http, sim, "another prompt", model="openai/gpt-4o-mini")
    assert status == 200
    assert (await chat(http, sim, "Label the sentiment: great phone"))[0] == 200  # nor itself


async def test_the_key_level_rate_limit_still_refuses_and_counts_an_early_retry(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    """`--rate-limit` is the simulator's own limit on the key: there, a request sent before the
    429's Retry-After elapsed is refused again and counted, so a client that ignores it shows."""
    sim = await make_sim(rate_limit=2, rate_window=60)
    assert [(await chat(http, sim, f"r{i}"))[0] for i in range(2)] == [200, 200]
    status, headers, body = await chat(http, sim, "r2")
    assert status == 429 and int(headers["Retry-After"]) > 50
    assert (await stats(http, sim))["retry_after_violations"] == 0  # the first 429 is no violation
    status, headers, body = await chat(http, sim, "another prompt")  # did not wait
    assert status == 429 and "Retry-After" in body["error"]["message"]
    assert headers["X-RateLimit-Limit"] == "2" and int(headers["Retry-After"]) > 50
    validate_response("/chat/completions", "post", 429, body)
    assert (await stats(http, sim))["retry_after_violations"] == 1


async def test_without_enforcement_the_rate_limit_counts_no_violation(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(rate_limit=1, rate_window=60, enforce_retry_after=False)
    assert [(await chat(http, sim, f"r{i}"))[0] for i in range(3)] == [200, 429, 429]
    assert (await stats(http, sim))["retry_after_violations"] == 0


# ---------------------------------------------------------------------- /models/user


async def test_models_user_is_the_listing_for_a_key_and_needs_one(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    status, headers, body = await get(http, f"{sim.base_url}/models/user")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    validate_response("/models/user", "get", 200, body)
    # The simulator has no provider preferences, so nothing is filtered out.
    assert body == (await get(http, f"{sim.base_url}/models", auth=False))[2]
    status, _, body = await get(http, f"{sim.base_url}/models/user", auth=False)
    assert status == 401 and body["error"]["code"] == 401
    validate_response("/models/user", "get", 401, body)


# ----------------------------------------------------- /models/{author}/{slug}/endpoints


@pytest.mark.parametrize("model", [m.id for m in CATALOGUE])
async def test_each_models_endpoints_match_the_spec_and_its_listing(
    sim: RunningSimulator, http: aiohttp.ClientSession, model: str
) -> None:
    status, _, body = await get(http, f"{sim.base_url}/models/{model}/endpoints", auth=False)
    assert status == 200
    validate_response(ENDPOINTS, "get", 200, body)
    data, entry = body["data"], MODELS_BY_ID[model]
    assert data["id"] == model and data["name"] == entry.name
    [endpoint] = data["endpoints"]
    assert endpoint["model_id"] == model and endpoint["provider_name"] == entry.provider
    assert endpoint["context_length"] == entry.context_length
    assert endpoint["max_completion_tokens"] == entry.max_completion_tokens
    assert endpoint["supported_parameters"] == list(entry.supported_parameters)
    assert endpoint["supports_implicit_caching"] is (entry.cache_read_price is not None)
    listed = next(
        m for m in (await get(http, f"{sim.base_url}/models"))[2]["data"] if m["id"] == model
    )
    assert endpoint["pricing"] == listed["pricing"]  # one price, wherever a client reads it


async def test_every_link_the_listing_gives_leads_to_a_route_that_answers(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    _, _, listing = await get(http, f"{sim.base_url}/models")
    for entry in listing["data"]:
        link = entry["links"]["details"]
        assert link.startswith("/api/v1/")
        status, _, body = await get(http, sim.origin + link)
        assert status == 200 and body["data"]["id"] == entry["id"], link


async def test_an_unknown_model_has_no_endpoints_and_says_so_in_json(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    status, headers, body = await get(http, f"{sim.base_url}/models/acme/no-such-model/endpoints")
    assert status == 404 and headers["Content-Type"].startswith("application/json")
    assert body["error"]["code"] == 404 and "acme/no-such-model" in body["error"]["message"]
    validate_response(ENDPOINTS, "get", 404, body)


# ------------------------------------------------------------ unknown routes, methods


@pytest.mark.parametrize(
    "path", ["/api/v1/nope", "/api/v1/models/acme", "/api/v1/chat/completion", "/", "/_sim/nope"]
)
async def test_an_unknown_route_answers_a_json_404(
    sim: RunningSimulator, http: aiohttp.ClientSession, path: str
) -> None:
    status, headers, body = await get(http, sim.origin + path)
    assert status == 404 and headers["Content-Type"].startswith("application/json")
    assert body["error"]["code"] == 404 and body["error"]["message"]
    validate_component("NotFoundResponse", body)


async def test_a_wrong_method_answers_a_json_405_with_allow(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    status, headers, body = await get(http, f"{sim.base_url}/chat/completions")
    assert status == 405 and headers["Content-Type"].startswith("application/json")
    assert body["error"]["code"] == 405 and "GET" in body["error"]["message"]
    assert headers["Allow"] == "POST"
    async with http.delete(f"{sim.base_url}/models") as resp:
        assert resp.status == 405 and (await resp.json())["error"]["code"] == 405


# ------------------------------------------------------------ /models?supported_parameters


async def test_models_filters_by_every_supported_parameter_named(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    async def ids(query: str) -> list[str]:
        status, _, body = await get(http, f"{sim.base_url}/models?{query}")
        assert status == 200
        validate_response("/models", "get", 200, body)
        assert body["total_count"] == len(body["data"])
        return [m["id"] for m in body["data"]]

    everything = [m.id for m in CATALOGUE]
    assert await ids("supported_parameters=") == everything
    assert await ids("supported_parameters=temperature") == everything
    structured = [m.id for m in CATALOGUE if "response_format" in m.supported_parameters]
    assert await ids("supported_parameters=response_format,seed") == structured
    assert await ids("supported_parameters=reasoning, response_format") == ["deepseek/deepseek-r1"]
    logprobs = ["mistralai/mixtral-8x7b-instruct", "openai/gpt-4o-mini"]
    assert await ids("supported_parameters=tools,logprobs") == logprobs
    assert await ids("supported_parameters=logprobs,reasoning") == []  # no model has both


async def test_the_filter_sees_the_parameters_the_listing_shows(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(native_n=True)
    _, _, body = await get(http, f"{sim.base_url}/models?supported_parameters=n")
    assert [m["id"] for m in body["data"]] == [m.id for m in CATALOGUE]


# ------------------------------------------------------------------------ the transcript


async def test_the_routes_transcript(make_sim: SimFactory) -> None:
    """Byte for byte, as tests/test_simulator_golden.py keeps the other routes."""
    from tests.test_simulator_golden import Transcript, check_golden

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        t = Transcript(await make_sim(), session)
        await t.get("/models?supported_parameters=reasoning,response_format", key=None)
        await t.get("/models?supported_parameters=tools,logprobs", key=None, note="none has both")
        await t.get("/models/user")
        await t.get("/models/user", key=None)
        await t.get("/models/deepseek/deepseek-r1/endpoints", key=None)
        await t.get("/models/openai/gpt-4o-mini/endpoints", note="implicit caching")
        await t.get("/models/acme/no-such-model/endpoints", key=None)
        await t.get("/no-such-route", key=None)
        await t.get("/chat/completions", note="a wrong method")
        await t.send("POST", "/models", key=None, note="a wrong method")
    check_golden("routes.txt", t.text())
