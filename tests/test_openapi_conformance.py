"""The simulator against OpenRouter's own OpenAPI spec: a check that nobody on this team wrote.

Every body the simulator sends is validated against the schema OpenRouter publishes for that
route and status. Fields the spec omits but real responses carry (`provider`,
`native_finish_reason`) are allowed because the spec's objects are open.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from pipeline.simulator import RunningSimulator
from tests.helpers import SimFactory, chat_body
from tests.openapi import validate_component, validate_response

SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "review",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": ["pos", "neg"]}},
            "required": ["label"],
        },
    },
}


async def completion(
    http: aiohttp.ClientSession,
    sim: RunningSimulator,
    body: dict[str, Any],
    fault: str | None = None,
) -> tuple[int, Any]:
    headers = {"X-Sim-Fault": fault} if fault else {}
    async with http.post(f"{sim.base_url}/chat/completions", json=body, headers=headers) as resp:
        return resp.status, json.loads(await resp.text())


@pytest.mark.parametrize(
    ("body", "fault"),
    [
        (chat_body(), None),
        (chat_body(model="deepseek/deepseek-r1"), None),
        (chat_body(model="deepseek/deepseek-r1", max_tokens=4), None),
        (chat_body(response_format=SCHEMA_FORMAT), None),
        (chat_body(max_tokens=2), None),
        (chat_body(), "choice_error"),
        (chat_body(), "empty"),
    ],
    ids=[
        "plain",
        "reasoning",
        "reasoning-starved",
        "json-schema",
        "length",
        "choice-error",
        "empty",
    ],
)
async def test_chat_results_match_chat_result(
    sim: RunningSimulator, http: aiohttp.ClientSession, body: dict[str, Any], fault: str | None
) -> None:
    validate_component("ChatRequest", body)
    status, data = await completion(http, sim, body, fault)
    assert status == 200
    validate_response("/chat/completions", "post", 200, data)


@pytest.mark.parametrize("fault", ["402", "403", "408", "429", "500", "502", "503", "524", "529"])
async def test_error_bodies_match_the_documented_status_schema(
    sim: RunningSimulator, http: aiohttp.ClientSession, fault: str
) -> None:
    status, data = await completion(http, sim, chat_body(), fault)
    assert status == int(fault)
    validate_response("/chat/completions", "post", status, data)


async def test_refusals_match_their_status_schema(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(api_keys=["sk-or-v1-someone-else-000000000000"])
    status, data = await completion(http, sim, chat_body())
    assert status == 401
    validate_response("/chat/completions", "post", 401, data)

    sim = await make_sim()
    for body, expected in [
        (chat_body(model="nobody/nothing"), 400),
        (
            chat_body(
                model="mistralai/mistral-7b-instruct",
                response_format=SCHEMA_FORMAT,
                provider={"require_parameters": True},
            ),
            404,
        ),
    ]:
        status, data = await completion(http, sim, body)
        assert status == expected
        validate_response("/chat/completions", "post", status, data)


async def test_200_error_body_matches_an_error_schema(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    _, data = await completion(http, sim, chat_body(), "error_body")
    validate_response("/chat/completions", "post", data["error"]["code"], data)


async def test_stream_chunks_match_chat_stream_chunk(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    for fault in (None, "choice_error"):
        headers = {"X-Sim-Fault": fault} if fault else {}
        async with http.post(
            f"{sim.base_url}/chat/completions",
            json=chat_body(model="deepseek/deepseek-r1", stream=True),
            headers=headers,
        ) as resp:
            events = [
                line[6:] for line in (await resp.text()).split("\n") if line.startswith("data: ")
            ]
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        assert chunks
        for chunk in chunks:
            validate_component("ChatStreamChunk", chunk)


async def test_models_key_credits_and_generation_match(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(credit_limit=5.0, management_keys=["sk-or-v1-management-0000000000000"])
    async with http.get(f"{sim.base_url}/models") as resp:
        validate_response("/models", "get", 200, await resp.json())
    _, data = await completion(http, sim, chat_body())
    async with http.get(f"{sim.base_url}/key") as resp:
        validate_response("/key", "get", 200, await resp.json())
    async with http.get(
        f"{sim.base_url}/credits",
        headers={"Authorization": "Bearer sk-or-v1-management-0000000000000"},
    ) as resp:
        validate_response("/credits", "get", 200, await resp.json())
    async with http.get(f"{sim.base_url}/generation", params={"id": data["id"]}) as resp:
        validate_response("/generation", "get", 200, await resp.json())
    async with http.get(f"{sim.base_url}/generation", params={"id": "gen-missing"}) as resp:
        assert resp.status == 404
        validate_response("/generation", "get", 404, await resp.json())


def test_validator_rejects_a_body_that_breaks_the_spec() -> None:
    """The conformance check can fail: a result without `choices` is not a ChatResult."""
    with pytest.raises(AssertionError, match="choices"):
        validate_response(
            "/chat/completions",
            "post",
            200,
            {
                "id": "x",
                "created": 1,
                "model": "m",
                "object": "chat.completion",
                "system_fingerprint": None,
            },
        )
