"""Every fault the simulator injects, as a plain aiohttp client sees it, plus its ledger trace."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from pipeline.simulator import RunningSimulator
from tests.helpers import SimFactory, chat_body


async def call(
    http: aiohttp.ClientSession, sim: RunningSimulator, fault: str | None = None, **body: Any
) -> tuple[int, dict[str, str], str]:
    headers = {"X-Sim-Fault": fault} if fault else {}
    async with http.post(
        f"{sim.base_url}/chat/completions", json=chat_body(**body), headers=headers
    ) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def sim_json(http: aiohttp.ClientSession, sim: RunningSimulator, path: str) -> Any:
    async with http.get(f"{sim.origin}/_sim/{path}") as resp:
        return await resp.json()


@pytest.mark.parametrize(
    ("fault", "status", "error_type"),
    [
        ("408", 408, "timeout"),
        ("500", 500, "server"),
        ("502", 502, "provider_unavailable"),
        ("503", 503, "provider_overloaded"),
        ("524", 524, "timeout"),
        ("529", 529, "provider_overloaded"),
    ],
)
async def test_http_error_faults_have_matching_code_and_bill_nothing(
    sim: RunningSimulator, http: aiohttp.ClientSession, fault: str, status: int, error_type: str
) -> None:
    got, headers, text = await call(http, sim, fault)
    error = json.loads(text)["error"]
    assert got == status == error["code"]
    assert error["metadata"]["error_type"] == error_type
    if status == 503:
        assert "Retry-After" in headers and error["availability"]["retryable"] is True
    assert (await sim_json(http, sim, "ledger"))["data"] == []
    counters = await sim_json(http, sim, "stats")
    assert counters["faults"] == {fault: 1} and counters["by_status"] == {str(status): 1}


async def test_an_upstream_429_names_the_provider_and_carries_retry_after_only(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(retry_after=2.0)
    status, headers, text = await call(http, sim, "429")
    assert status == 429
    assert headers["Retry-After"] == "2"
    assert not any(name.lower().startswith("x-ratelimit") for name in headers)  # not the key's
    metadata = json.loads(text)["error"]["metadata"]
    assert metadata["error_type"] == "rate_limit_exceeded" and metadata["provider_name"]
    assert metadata["limit_source"] == "upstream_provider_shared_pool"
    assert json.loads(metadata["raw"])["error"] and metadata["provider_code"] == "429"


async def test_an_injected_429_refuses_only_its_own_request(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    """An upstream 429 holds back no retry; only `rate_limit` holds a key to its Retry-After
    (tests/test_simulator_routes.py)."""
    sim = await make_sim(retry_after=30.0)
    assert (await call(http, sim, "429"))[0] == 429
    assert (await call(http, sim))[0] == 200  # retried at once
    assert (await sim_json(http, sim, "stats"))["retry_after_violations"] == 0


async def test_402_and_403_faults(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    status, _, text = await call(http, sim, "402")
    assert (
        status == 402 and json.loads(text)["error"]["metadata"]["error_type"] == "payment_required"
    )
    status, _, text = await call(http, sim, "403", prompt="something flagged")
    meta = json.loads(text)["error"]["metadata"]
    assert status == 403 and meta["flagged_input"] == "something flagged" and meta["reasons"]


async def test_200_with_error_body_has_no_choices_and_is_not_billed(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    status, _, text = await call(http, sim, "error_body")
    body = json.loads(text)
    assert status == 200 and "choices" not in body
    assert body["error"]["code"] in (429, 500, 502) and body["error"]["message"]
    assert (await sim_json(http, sim, "ledger"))["data"] == []


async def test_200_with_choice_error_has_partial_text_and_zero_cost(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    _, _, whole = await call(http, sim)
    status, _, text = await call(http, sim, "choice_error")
    choice = json.loads(text)["choices"][0]
    assert status == 200 and choice["finish_reason"] == "error" and choice["error"]["code"] == 502
    full = json.loads(whole)["choices"][0]["message"]["content"]
    assert full.startswith(choice["message"]["content"]) and len(
        choice["message"]["content"]
    ) < len(full)
    assert json.loads(text)["usage"]["cost"] == 0
    assert len((await sim_json(http, sim, "ledger"))["data"]) == 1  # only the whole answer


async def test_empty_answer_has_no_completion_tokens_and_costs_nothing(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    status, _, text = await call(http, sim, "empty")
    body = json.loads(text)
    assert status == 200 and body["choices"][0]["message"]["content"] == ""
    assert body["choices"][0]["finish_reason"] is None
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["cost"] == 0


async def test_invalid_json_is_billed_but_unparseable(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    status, headers, text = await call(http, sim, "invalid_json")
    assert status == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    (entry,) = (await sim_json(http, sim, "ledger"))["data"]
    assert (
        entry["id"] == headers["X-Generation-Id"]
        and entry["outcome"] == "invalid_json"
        and entry["cost"] > 0
    )


async def test_schema_invalid_answer_is_well_formed_but_not_json(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    fmt = {
        "type": "json_schema",
        "json_schema": {
            "name": "x",
            "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
        },
    }
    status, _, text = await call(http, sim, "schema_invalid", response_format=fmt)
    content = json.loads(text)["choices"][0]["message"]["content"]
    assert status == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(content)


async def test_reset_before_response_bills_nothing(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
        await call(http, sim, "reset")
    assert (await sim_json(http, sim, "ledger"))["data"] == []
    assert (await sim_json(http, sim, "stats"))["faults"] == {"reset": 1}


async def test_mid_body_close_after_headers_is_billed(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    generation_id = None
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(
            f"{sim.base_url}/chat/completions",
            json=chat_body(),
            headers={"X-Sim-Fault": "mid_body"},
        ) as resp:
            generation_id = resp.headers["X-Generation-Id"]  # the id arrives before the body
            await resp.read()
    (entry,) = (await sim_json(http, sim, "ledger"))["data"]
    assert entry["id"] == generation_id and entry["outcome"] == "mid_body"


async def test_stall_sends_headers_then_nothing_and_is_billed(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    generation_id = None
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(f"{sim.base_url}/chat/completions", json=chat_body(), headers={"X-Sim-Fault": "stall"},
                             timeout=aiohttp.ClientTimeout(sock_read=0.2)) as resp:  # fmt: skip
            generation_id = resp.headers["X-Generation-Id"]
            await resp.read()
    (entry,) = (await sim_json(http, sim, "ledger"))["data"]
    assert entry["id"] == generation_id and entry["outcome"] == "stall"


async def test_hang_never_answers_and_bills_nothing(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(call(http, sim, "hang"), 0.2)
    assert (await sim_json(http, sim, "ledger"))["data"] == []


@pytest.mark.parametrize("fault", ["mid_body", "choice_error"])
async def test_stream_faults(
    sim: RunningSimulator, http: aiohttp.ClientSession, fault: str
) -> None:
    body = chat_body(stream=True)
    if fault == "mid_body":
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.post(
                f"{sim.base_url}/chat/completions", json=body, headers={"X-Sim-Fault": fault}
            ) as resp:
                await resp.read()
        return
    async with http.post(
        f"{sim.base_url}/chat/completions", json=body, headers={"X-Sim-Fault": fault}
    ) as resp:
        events = [line[6:] for line in (await resp.text()).split("\n") if line.startswith("data: ")]
    last = json.loads(events[-1])
    assert last["error"]["code"] == 502 and last["choices"][0]["finish_reason"] == "error"
    assert "[DONE]" not in events


# ------------------------------------------------------------------ deterministic schedules


async def test_marker_fails_a_request_twice_then_succeeds(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    prompt = "row 7 [[sim:429*2]]"
    statuses = [(await call(http, sim, prompt=prompt))[0] for _ in range(4)]
    assert statuses == [429, 429, 200, 200]
    # Other prompts are untouched by row 7's schedule.
    assert (await call(http, sim, prompt="row 8"))[0] == 200


async def test_marker_schedules_chain_and_repeat_forever(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    chained = [(await call(http, sim, prompt="[[sim:500,502]] a"))[0] for _ in range(3)]
    forever = [(await call(http, sim, prompt="[[sim:403*]] b"))[0] for _ in range(4)]
    assert chained == [500, 502, 200]
    assert forever == [403, 403, 403, 403]


async def test_unknown_fault_name_is_a_clear_400(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    status, _, text = await call(http, sim, "bogus")
    assert status == 400 and "unknown fault 'bogus'" in json.loads(text)["error"]["message"]


async def test_random_faults_follow_the_rate_and_the_seed(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    async def statuses(seed: int) -> list[int]:
        sim = await make_sim(fault_rates={"500": 0.3, "502": 0.2}, seed=seed)
        return [(await call(http, sim, prompt=f"p{i}"))[0] for i in range(200)]

    first, again, other = await statuses(7), await statuses(7), await statuses(8)
    assert first == again and first != other
    assert 40 <= first.count(500) <= 80 and 20 <= first.count(502) <= 60  # 30% and 20% of 200


# -------------------------------------------------------------------------- rate limits


async def test_server_rate_limit_answers_429_past_the_window(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(rate_limit=5, rate_window=60)
    before = time.time()
    results = [await call(http, sim, prompt=f"r{i}") for i in range(8)]
    assert [r[0] for r in results] == [200] * 5 + [429] * 3
    _, headers, text = results[-1]
    assert headers["X-RateLimit-Limit"] == "5" and int(headers["Retry-After"]) > 50
    assert headers["X-RateLimit-Remaining"] == "0"
    reset_ms = int(headers["X-RateLimit-Reset"])
    assert before * 1000 < reset_ms <= (time.time() + 60.01) * 1000  # epoch milliseconds
    error = json.loads(text)["error"]
    assert error["metadata"]["headers"]["X-RateLimit-Reset"] == headers["X-RateLimit-Reset"]
    counters = await sim_json(http, sim, "stats")
    assert (
        counters["by_status"] == {"200": 5, "429": 3} and counters["max_requests_per_second"] >= 1
    )
    assert 2 <= counters["max_429s_per_clock_second"] <= 3


async def test_free_model_per_minute_cap(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(free_requests_per_minute=3)
    free = "meta-llama/llama-3.3-70b-instruct:free"
    results = [await call(http, sim, prompt=f"f{i}", model=free) for i in range(4)]
    assert [r[0] for r in results] == [200, 200, 200, 429]
    assert "free-models-per-min" in json.loads(results[-1][2])["error"]["message"]
    assert all(json.loads(r[2])["usage"]["cost"] == 0 for r in results[:3])


async def test_max_requests_per_second_counts_a_burst(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    await asyncio.gather(*(call(http, sim, prompt=f"b{i}") for i in range(30)))
    counters = await sim_json(http, sim, "stats")
    assert counters["requests"] == 30 and counters["max_requests_per_second"] == 30
    assert counters["billed"] == 30 and counters["max_in_flight"] >= 1
    # In whole seconds of the clock, the burst may straddle two of them.
    assert 15 <= counters["max_requests_per_clock_second"] <= 30


async def test_config_can_change_while_running(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{sim.origin}/_sim/config", json={"credit_limit": 0}) as resp:
        assert resp.status == 200
    assert (await call(http, sim))[0] == 402
    async with http.post(f"{sim.origin}/_sim/config", json={"credit_limit": None}) as resp:
        assert resp.status == 200
    assert (await call(http, sim))[0] == 200
    async with http.post(f"{sim.origin}/_sim/config", json={"no_such": 1}) as resp:
        assert resp.status == 400
