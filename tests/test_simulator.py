"""The simulator, observed through a plain aiohttp client: what OpenRouter would send, it sends."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from pipeline.simulator import MODELS_BY_ID, RunningSimulator, messages_digest
from tests.helpers import TEST_KEY, SimFactory, chat_body

MIXTRAL = "mistralai/mixtral-8x7b-instruct"
GEN_ID = re.compile(r"^gen-\d{10}-[A-Za-z0-9]{20}$")


async def post(
    http: aiohttp.ClientSession, sim: RunningSimulator, body: dict[str, Any], **kw: Any
) -> tuple[int, dict[str, str], Any]:
    async with http.post(f"{sim.base_url}/chat/completions", json=body, **kw) as resp:
        text = await resp.text()
        return resp.status, dict(resp.headers), json.loads(text)


async def ledger(http: aiohttp.ClientSession, sim: RunningSimulator) -> list[dict[str, Any]]:
    async with http.get(f"{sim.origin}/_sim/ledger") as resp:
        return (await resp.json())["data"]  # type: ignore[no-any-return]


async def stats(http: aiohttp.ClientSession, sim: RunningSimulator) -> dict[str, Any]:
    async with http.get(f"{sim.origin}/_sim/stats") as resp:
        return await resp.json()  # type: ignore[no-any-return]


def expected_cost(model_id: str, prompt_tokens: int, completion_tokens: int) -> float:
    model = MODELS_BY_ID[model_id]
    return float(prompt_tokens * model.prompt_price + completion_tokens * model.completion_price)


# ------------------------------------------------------------------------------ happy path


async def test_completion_has_openrouter_shape_and_exact_cost(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    body = chat_body("Is this review positive? 'Battery died in a day.'")
    status, headers, data = await post(http, sim, body)

    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert GEN_ID.match(data["id"]) and headers["X-Generation-Id"] == data["id"]
    assert data["object"] == "chat.completion" and data["model"] == MIXTRAL and data["provider"]
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["native_finish_reason"] == "stop"
    # The answer quotes a digest of the prompt it answers, so a test can match rows to answers.
    assert choice["message"]["content"].startswith(f"sim:{messages_digest(body['messages'])} ")
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0
    assert usage["cost"] == expected_cost(
        MIXTRAL, usage["prompt_tokens"], usage["completion_tokens"]
    )
    details = usage["cost_details"]
    assert details["upstream_inference_cost"] is None
    assert details["upstream_inference_prompt_cost"] + details[
        "upstream_inference_completions_cost"
    ] == pytest.approx(usage["cost"])

    (entry,) = await ledger(http, sim)
    assert entry["id"] == data["id"] and entry["cost"] == usage["cost"] and entry["outcome"] == "ok"
    assert entry["messages_digest"] == messages_digest(body["messages"])


async def test_answers_are_deterministic_per_request(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    first = await post(http, sim, chat_body("same prompt", seed=1))
    again = await post(http, sim, chat_body("same prompt", seed=1))
    other_seed = await post(http, sim, chat_body("same prompt", seed=2))
    content = [r[2]["choices"][0]["message"]["content"] for r in (first, again, other_seed)]
    assert content[0] == content[1]
    assert content[0] != content[2]
    assert first[2]["id"] != again[2]["id"]  # every generation has its own id


async def test_max_tokens_cuts_the_answer_with_finish_reason_length(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    _, _, data = await post(http, sim, chat_body(max_tokens=3))
    assert data["usage"]["completion_tokens"] == 3
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["choices"][0]["native_finish_reason"] == "length"
    assert len(data["choices"][0]["message"]["content"].split()) == 3


async def test_stop_sequence_truncates(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(completion_words=40)
    _, _, full = await post(http, sim, chat_body("stop test"))
    words = full["choices"][0]["message"]["content"].split()
    _, _, cut = await post(http, sim, chat_body("stop test", stop=[words[3]]))
    content = cut["choices"][0]["message"]["content"]
    assert words[3] not in content.split()[3:] and len(content) < len(" ".join(words))
    assert cut["choices"][0]["finish_reason"] == "stop"


async def test_json_schema_answer_satisfies_the_schema(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "aspects": {"type": "array", "items": {"type": "string"}},
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
            "meta": {
                "type": "object",
                "properties": {"spam": {"type": "boolean"}},
                "required": ["spam"],
            },
        },
        "required": ["label", "confidence", "aspects", "stars", "meta"],
        "additionalProperties": False,
    }
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "review", "strict": True, "schema": schema},
    }
    _, _, data = await post(http, sim, chat_body(response_format=fmt))
    jsonschema.validate(json.loads(data["choices"][0]["message"]["content"]), schema)


async def test_reasoning_model_bills_reasoning_and_can_spend_the_whole_budget(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    _, _, full = await post(http, sim, chat_body(model="deepseek/deepseek-r1"))
    usage = full["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] > 0
    assert full["choices"][0]["message"]["reasoning"]
    assert usage["cost"] == expected_cost(
        "deepseek/deepseek-r1", usage["prompt_tokens"], usage["completion_tokens"]
    )

    _, _, starved = await post(http, sim, chat_body(model="deepseek/deepseek-r1", max_tokens=5))
    assert starved["choices"][0]["message"]["content"] == ""
    assert starved["choices"][0]["finish_reason"] == "length"
    assert starved["choices"][0]["native_finish_reason"] == "max_tokens"
    assert starved["usage"]["completion_tokens_details"]["reasoning_tokens"] == 5
    assert starved["usage"]["cost"] > 0  # the reasoning was billed although no content came back


async def test_repeated_system_prompt_is_read_from_cache_at_the_cache_price(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    model = "openai/gpt-4o-mini"
    messages = [
        {"role": "system", "content": "You label reviews. " * 20},
        {"role": "user", "content": "ok"},
    ]
    _, _, first = await post(http, sim, {"model": model, "messages": messages})
    _, _, second = await post(http, sim, {"model": model, "messages": messages})
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0
    m = MODELS_BY_ID[model]
    u = second["usage"]
    price = (
        (u["prompt_tokens"] - cached) * m.prompt_price
        + cached * (m.cache_read_price or Decimal(0))
        + u["completion_tokens"] * m.completion_price
    )
    assert u["cost"] == float(price) < first["usage"]["cost"] + 1e-12


async def test_streaming_sends_processing_comments_chunks_and_usage_last(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    _, _, plain = await post(http, sim, chat_body("stream me"))
    async with http.post(
        f"{sim.base_url}/chat/completions", json=chat_body("stream me", stream=True)
    ) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        gen_id = resp.headers["X-Generation-Id"]
        lines = (await resp.text()).split("\n")
    assert ": OPENROUTER PROCESSING" in lines
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["id"] == gen_id and c["object"] == "chat.completion.chunk" for c in chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["cost"] > 0
    assert sum("usage" in c for c in chunks) == 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


# ------------------------------------------------------------------------- refusals


async def test_auth_missing_unknown_and_disabled_keys_get_401(make_sim: SimFactory) -> None:
    sim = await make_sim(
        api_keys=[TEST_KEY, "sk-or-v1-disabled-key-000000000000"],
        disabled_keys=["sk-or-v1-disabled-key-000000000000"],
    )
    async with aiohttp.ClientSession() as anon:
        async with anon.post(f"{sim.base_url}/chat/completions", json=chat_body()) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == {
                "code": 401,
                "message": "No auth credentials found",
            }
        for key in ("sk-or-v1-unknown-000000000000000000", "sk-or-v1-disabled-key-000000000000"):
            async with anon.post(
                f"{sim.base_url}/chat/completions",
                json=chat_body(),
                headers={"Authorization": f"Bearer {key}"},
            ) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["code"] == 401
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {TEST_KEY}"}) as ok,
        ok.post(f"{sim.base_url}/chat/completions", json=chat_body()) as resp,
    ):
        assert resp.status == 200


async def test_unknown_model_and_bad_messages_get_400(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    status, _, data = await post(http, sim, chat_body(model="nobody/no-such-model"))
    assert status == 400 and data["error"]["code"] == 400
    assert data["error"]["metadata"]["error_type"] == "invalid_request"
    assert data["error"]["availability"]["code"] == "model_not_found"
    status, _, data = await post(http, sim, {"model": MIXTRAL, "messages": []})
    assert status == 400 and "messages" in data["error"]["message"]


async def test_prompt_over_the_context_length_gets_400(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    status, _, data = await post(http, sim, chat_body("word " * 30_000))
    assert status == 400 and data["error"]["metadata"]["error_type"] == "context_length_exceeded"
    assert await ledger(http, sim) == []


async def test_require_parameters_filters_a_model_without_structured_outputs(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    fmt = {"type": "json_object"}
    status, _, data = await post(
        http,
        sim,
        chat_body(
            model="mistralai/mistral-7b-instruct",
            response_format=fmt,
            provider={"require_parameters": True},
        ),
    )
    assert status == 404 and data["error"]["availability"]["code"] == "constraint_filtered"
    # Without require_parameters the provider silently ignores response_format, like OpenRouter.
    status, _, data = await post(
        http, sim, chat_body(model="mistralai/mistral-7b-instruct", response_format=fmt)
    )
    assert status == 200 and data["choices"][0]["message"]["content"].startswith("sim:")


async def test_models_fallback_answers_from_the_next_model_at_its_price(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(down_models=[MIXTRAL])
    status, _, data = await post(http, sim, chat_body(models=[MIXTRAL, "openai/gpt-4o-mini"]))
    assert status == 200 and data["model"] == "openai/gpt-4o-mini" and data["provider"] == "OpenAI"
    u = data["usage"]
    assert u["cost"] == expected_cost(
        "openai/gpt-4o-mini", u["prompt_tokens"], u["completion_tokens"]
    )
    status, _, data = await post(http, sim, chat_body(models=[MIXTRAL]))
    assert status == 502 and data["error"]["metadata"]["error_type"] == "provider_unavailable"


async def test_credit_limit_gives_402_and_key_usage_grows(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(credit_limit=0.0001)
    async with http.get(f"{sim.base_url}/key") as resp:
        before = (await resp.json())["data"]
    assert before["usage"] == 0 and before["limit_remaining"] == 0.0001
    status, _, data = await post(http, sim, chat_body(max_tokens=100_000 // 4))
    assert status == 402 and "can only afford" in data["error"]["message"]
    spent = 0.0
    for i in range(20):
        status, _, data = await post(http, sim, chat_body(f"spend {i} " + "x" * 400))
        if status == 402:
            break
        spent += data["usage"]["cost"]
    assert status == 402 and data["error"]["message"].startswith("Insufficient credits")
    async with http.get(f"{sim.base_url}/key") as resp:
        after = (await resp.json())["data"]
    assert after["usage"] == pytest.approx(spent) and after["limit_remaining"] == pytest.approx(
        0.0001 - spent
    )
    # A negative balance blocks free models too.
    status, _, _ = await post(http, sim, chat_body(model="meta-llama/llama-3.3-70b-instruct:free"))
    assert status == 402


async def test_flagged_prompt_gets_403_moderation(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(flagged_terms=["forbidden topic"])
    status, _, data = await post(http, sim, chat_body("tell me about the forbidden topic"))
    assert status == 403
    meta = data["error"]["metadata"]
    assert (
        meta["reasons"]
        and "forbidden topic" in meta["flagged_input"]
        and meta["model_slug"] == MIXTRAL
    )
    assert await ledger(http, sim) == []


# ----------------------------------------------------------------------- other endpoints


async def test_models_catalogue_has_string_prices_per_token(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{sim.base_url}/models") as resp:
        data = await resp.json()
    assert data["links"] == {"next": None} and data["total_count"] == len(data["data"])
    by_id = {m["id"]: m for m in data["data"]}
    mixtral = by_id[MIXTRAL]
    assert mixtral["context_length"] == 32_768
    assert mixtral["pricing"]["prompt"] == mixtral["pricing"]["completion"] == "0.00000054"
    assert {"temperature", "top_p", "max_tokens", "seed", "stop", "response_format"} <= set(
        mixtral["supported_parameters"]
    )
    assert any(m.endswith(":free") and by_id[m]["pricing"]["prompt"] == "0" for m in by_id)
    assert any("reasoning" in m["supported_parameters"] for m in data["data"])
    assert any("response_format" not in m["supported_parameters"] for m in data["data"])


async def test_generation_is_404_until_ready_then_the_full_record(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    slow = await make_sim(ready_after=3600)
    _, _, data = await post(http, slow, chat_body())
    async with http.get(f"{slow.base_url}/generation", params={"id": data["id"]}) as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == 404

    ready = await make_sim(ready_after=0)
    _, _, data = await post(http, ready, chat_body())
    async with http.get(f"{ready.base_url}/generation", params={"id": data["id"]}) as resp:
        record = (await resp.json())["data"]
    assert record["id"] == data["id"] and record["total_cost"] == data["usage"]["cost"]
    assert (
        record["tokens_prompt"] == data["usage"]["prompt_tokens"]
        and record["finish_reason"] == "stop"
    )
    async with http.get(f"{ready.base_url}/generation", params={"id": "gen-0-unknown"}) as resp:
        assert resp.status == 404


async def test_credits_needs_a_management_key(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(management_keys=["sk-or-v1-management-0000000000000"])
    async with http.get(f"{sim.base_url}/credits") as resp:
        assert resp.status == 403
    async with http.get(
        f"{sim.base_url}/credits",
        headers={"Authorization": "Bearer sk-or-v1-management-0000000000000"},
    ) as resp:
        assert resp.status == 200 and set((await resp.json())["data"]) == {
            "total_credits",
            "total_usage",
        }


async def test_request_log_keeps_attribution_headers_but_not_the_key(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    await post(
        http,
        sim,
        chat_body(),
        headers={"HTTP-Referer": "https://example.org", "X-Title": "labeler"},
    )
    async with http.get(f"{sim.origin}/_sim/requests") as resp:
        (logged,) = (await resp.json())["data"]
    assert (
        logged["headers"]["HTTP-Referer"] == "https://example.org"
        and logged["headers"]["X-Title"] == "labeler"
    )
    assert logged["headers"]["Authorization"].startswith("Bearer sk-or-v1-")
    assert TEST_KEY not in json.dumps(logged)


async def test_keepalive_newlines_precede_a_slow_json_body(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(latency=0.06, keepalive_interval=0.02)
    async with http.post(f"{sim.base_url}/chat/completions", json=chat_body()) as resp:
        raw = await resp.text()
    assert resp.status == 200 and raw.startswith("\n") and json.loads(raw)["choices"]
