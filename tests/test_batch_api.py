"""The Batch API calls against the simulator: a submission the server accepts (fields before
`requests`), a create whose answer is lost reported as ambiguous rather than failed, the list
since a moment, a model without a batch endpoint, and result rows read one by one."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from pipeline.batch_api import (
    Ambiguous,
    BatchAPI,
    BatchError,
    NoBatchEndpoint,
    line_results,
    submission,
)
from pipeline.client import OpenRouterClient
from pipeline.errors import AuthError
from pipeline.simulator import RunningSimulator
from tests.helpers import TEST_KEY, chat_body

MIXTRAL = "mistralai/mixtral-8x7b-instruct"
pytestmark = pytest.mark.timeout(60)


def lines(n: int, text: str = "review") -> list[tuple[str, bytes]]:
    return [(f"r{i}", json.dumps(chat_body(f"{text} {i}")).encode()) for i in range(n)]


async def advance(sim: RunningSimulator, seconds: float) -> None:
    origin = sim.base_url.removesuffix("/api/v1")
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{origin}/_sim/clock", json={"advance": seconds}) as resp,
    ):
        assert resp.status == 200


async def configure(sim: RunningSimulator, **changes: Any) -> None:
    origin = sim.base_url.removesuffix("/api/v1")
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{origin}/_sim/config", json=changes) as resp,
    ):
        assert resp.status == 200, await resp.text()


def client(sim: RunningSimulator, key: str = TEST_KEY) -> OpenRouterClient:
    return OpenRouterClient(sim.base_url, key, concurrency=4, timeout=10, connect_timeout=5)


async def test_a_submitted_batch_is_read_back_and_its_results_decoded(make_sim: Any) -> None:
    sim = await make_sim(batch_validating_s=1, batch_in_progress_s=1)
    async with client(sim) as http:
        api = BatchAPI(http, sim.base_url)
        created = await api.create(submission(MIXTRAL, lines(3)))
        assert created.status == "validating" and created.total == 3 and not created.final
        await advance(sim, 5)
        done = await api.get(created.id)
        assert done.final and done.status == "completed" and done.cost is not None and done.cost > 0
        assert done.results is not None
        results = line_results(done.results)
        assert sorted(results) == ["r0", "r1", "r2"]
        completion = results["r1"].completion
        assert completion is not None and completion.content and completion.prompt_tokens
        assert completion.cost is None  # lines carry tokens only: the cost is worked out
        assert completion.generation_id and completion.generation_id.startswith("gen-batch-")


async def test_the_beta_base_url_works_alike(make_sim: Any) -> None:
    sim = await make_sim()
    async with client(sim) as http:
        api = BatchAPI(http, sim.base_url.removesuffix("/v1") + "/beta")
        created = await api.create(submission(MIXTRAL, lines(1)))
        assert (await api.get(created.id)).id == created.id


@pytest.mark.parametrize("fault", ["drop", "accepted_500"])
async def test_a_create_whose_answer_is_lost_is_ambiguous_and_found_in_the_list(
    make_sim: Any, fault: str
) -> None:
    sim = await make_sim()
    await configure(sim, batch_create_faults=[fault])
    async with client(sim) as http:
        api = BatchAPI(http, sim.base_url)
        before = await sim_now(sim)
        with pytest.raises(Ambiguous):
            await api.create(submission(MIXTRAL, lines(4)))
        found = await api.created_since(before)
        assert [(b.total, b.model) for b in found] == [(4, MIXTRAL)]


async def sim_now(sim: RunningSimulator) -> float:
    origin = sim.base_url.removesuffix("/api/v1")
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{origin}/_sim/clock", json={"advance": 0}) as resp,
    ):
        return float((await resp.json())["now"])


async def test_a_refusal_before_acceptance_may_simply_be_retried(make_sim: Any) -> None:
    sim = await make_sim()
    await configure(sim, batch_create_faults=["429"])
    async with client(sim) as http:
        api = BatchAPI(http, sim.base_url)
        with pytest.raises(BatchError) as refused:
            await api.create(submission(MIXTRAL, lines(1)))
        assert refused.value.retry and not isinstance(refused.value, Ambiguous)
        assert (await api.create(submission(MIXTRAL, lines(1)))).total == 1


async def test_a_model_without_a_batch_endpoint_and_a_bad_key(make_sim: Any) -> None:
    sim = await make_sim(api_keys=[TEST_KEY])
    async with client(sim) as http:
        with pytest.raises(NoBatchEndpoint):
            await BatchAPI(http, sim.base_url).create(
                submission("mistralai/mistral-7b-instruct", lines(1))
            )
    async with client(sim, key="sk-or-v1-unknown") as http:
        with pytest.raises(AuthError):
            await BatchAPI(http, sim.base_url).create(submission(MIXTRAL, lines(1)))


async def test_the_list_is_read_page_by_page(make_sim: Any) -> None:
    sim = await make_sim()
    async with client(sim) as http:
        api = BatchAPI(http, sim.base_url)
        before = await sim_now(sim)
        ids = {(await api.create(submission(MIXTRAL, lines(1)))).id for _ in range(105)}
        assert {b.id for b in await api.created_since(before)} == ids


def test_result_rows_are_read_one_by_one() -> None:
    good = {"custom_id": "a", "response": {"status_code": 200, "body": {
        "id": "gen-batch-1-00", "model": MIXTRAL, "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}}, "error": None}  # fmt: skip
    failed = {"custom_id": "b", "response": None, "error": {"type": "server", "message": "boom"}}
    broken = {
        "custom_id": "c",
        "response": {"status_code": 200, "body": {"choices": []}},
        "error": None,
    }
    refused = {"custom_id": "d", "response": {"status_code": 500, "body": {}}, "error": None}
    results = line_results([good, failed, broken, refused, {"no": "id"}, "junk"])
    assert sorted(results) == ["a", "b", "c", "d"]
    assert results["a"].completion is not None and results["a"].completion.content == "hi"
    assert (results["b"].error_type, results["b"].error_message) == ("server", "boom")
    assert results["c"].completion is None and results["c"].error_type == "invalid_response"
    assert results["d"].completion is None and "500" in (results["d"].error_message or "")
