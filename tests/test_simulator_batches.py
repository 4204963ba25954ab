"""The simulator's Batch API, as the fact sheet describes OpenRouter's: the routes and their
refusals, a lifecycle on a clock the tests move on, line failures, expiry and provider cancel,
the read-after-create 404, settlement pending, 402, a dropped 202, and billing at the batch
price into the same ledger as chat requests."""

from __future__ import annotations

import re
from collections import Counter
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from pipeline.simulator import RunningSimulator
from pipeline.simulator.catalogue import MODELS_BY_ID
from pipeline.simulator.content import messages_digest
from tests.openapi import validate_component, validate_response

MIXTRAL = "mistralai/mixtral-8x7b-instruct"
pytestmark = pytest.mark.timeout(60)


def line(custom_id: str, text: str, **extra: Any) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": text}], **extra}
    validate_component("ChatRequest", {"model": MIXTRAL, **body})
    return {"custom_id": custom_id, "body": body}


def submission(lines: list[dict[str, Any]], model: str = MIXTRAL, **extra: Any) -> dict[str, Any]:
    return {"endpoint": "/v1/chat/completions", "model": model, **extra, "requests": lines}


class Batches:
    """The batch routes of one simulator, and its clock."""

    def __init__(self, http: aiohttp.ClientSession, sim: RunningSimulator) -> None:
        self.http, self.sim = http, sim
        self.origin = sim.base_url.removesuffix("/api/v1")

    async def call(
        self, method: str, path: str, body: Any = None, **params: Any
    ) -> tuple[int, Any]:
        async with self.http.request(
            method, f"{self.sim.base_url}{path}", json=body, params=params or None
        ) as resp:
            return resp.status, await resp.json()

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        status, batch = await self.call("POST", "/batches", body)
        assert status == 202, batch
        return batch  # type: ignore[no-any-return]

    async def get(self, batch_id: str) -> tuple[int, Any]:
        return await self.call("GET", f"/batches/{batch_id}")

    async def advance(self, seconds: float) -> None:
        async with self.http.post(f"{self.origin}/_sim/clock", json={"advance": seconds}) as resp:
            assert resp.status == 200

    async def configure(self, **changes: Any) -> None:
        async with self.http.post(f"{self.origin}/_sim/config", json=changes) as resp:
            assert resp.status == 200, await resp.text()

    async def ledger(self) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.origin}/_sim/ledger") as resp:
            return (await resp.json())["data"]  # type: ignore[no-any-return]


@pytest.fixture
async def batches(make_sim: Any, http: aiohttp.ClientSession) -> Batches:
    return Batches(http, await make_sim(batch_validating_s=10, batch_in_progress_s=100))


async def test_a_batch_validates_runs_and_completes_with_every_line_answered_at_half_price(
    batches: Batches,
) -> None:
    lines = [line(f"row-{i}", f"review {i}: works fine") for i in range(20)]
    created = await batches.create(submission(lines))
    assert re.fullmatch(r"batch-\d+-[A-Za-z0-9]{20}", created["id"])
    assert created["status"] == "validating" and created["results"] is None
    assert created["request_counts"] == {"total": 20, "completed": 0, "failed": 0}
    assert created["expires_at"] == created["created_at"] + 86_400
    assert created["provider"] == "DeepInfra" and created["usage"] is None

    await batches.advance(10 + 50)  # validated, halfway through
    _, running = await batches.get(created["id"])
    assert running["status"] == "in_progress" and running["request_counts"]["completed"] == 10
    assert running["results"] is None

    await batches.advance(50)
    status, done = await batches.get(created["id"])
    assert status == 200 and done["status"] == "completed" and done["error"] is None
    assert done["request_counts"] == {"total": 20, "completed": 20, "failed": 0}
    results = {r["custom_id"]: r for r in done["results"]}
    assert sorted(results) == sorted(f"row-{i}" for i in range(20))
    assert [r["custom_id"] for r in done["results"]] != [f"row-{i}" for i in range(20)]  # shuffled
    price = MODELS_BY_ID[MIXTRAL].prompt_price
    for item in lines:
        result = results[item["custom_id"]]
        assert result["error"] is None and result["response"]["status_code"] == 200
        body = result["response"]["body"]
        assert re.fullmatch(r"gen-batch-\d+-[0-9a-f]{20}", body["id"])
        assert body["choices"][0]["message"]["content"].startswith(
            f"sim:{messages_digest(item['body']['messages'])}"
        )
        assert "cost" not in body["usage"]  # lines carry tokens, not cost
        validate_response(
            "/chat/completions", "post", 200, {**body, "usage": {**body["usage"], "cost": 0}}
        )
    ledger = await batches.ledger()
    assert len(ledger) == 20 and {e["batch_id"] for e in ledger} == {created["id"]}
    tokens = sum(e["prompt_tokens"] + e["completion_tokens"] for e in ledger)
    assert done["usage"]["cost"] == pytest.approx(float(tokens * price / 2))  # mixtral: one price
    assert done["usage"]["cost"] == pytest.approx(sum(e["cost"] for e in ledger))


async def test_the_batch_routes_answer_under_the_beta_prefix_too(batches: Batches) -> None:
    url = batches.sim.base_url.removesuffix("/v1") + "/beta/batches"
    async with batches.http.post(url, json=submission([line("a", "hello")])) as resp:
        assert resp.status == 202
        batch_id = (await resp.json())["id"]
    status, _ = await batches.get(batch_id)
    assert status == 200


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"requests": [line("a", "x")], "endpoint": "/v1/chat/completions", "model": MIXTRAL}, 400,
         "must appear before requests"),
        (submission([]), 400, "requests must contain at least one item."),
        (submission([line("a", "x"), line("a", "y")]), 422, "line 2 has a duplicate custom_id 'a'"),
        (submission([{"body": {"messages": []}}]), 400, "line 1 must have a string custom_id"),
        (submission([line("a", "x")], model="mistralai/mistral-7b-instruct"), 400,
         "Model 'mistralai/mistral-7b-instruct' does not have a :batch endpoint."),
        (submission([line("a", "x", model="openai/gpt-4o-mini")]), 400, "not the batch's"),
        (submission([line("a", "x")], provider={"only": ["together"]}), 404,
         "does not have an eligible :batch endpoint matching provider.only: together."),
        (submission([line("a", "x")], provider={"order": ["deepinfra"]}), 400, "provider.only"),
        (submission([line("a", "x")], completion_window="1h"), 400, "24h"),
        (submission([line("a b", "x")], model="anthropic/claude-sonnet-4"), 422, "custom_id 'a b'"),
    ],
)  # fmt: skip
async def test_a_submission_refused_at_once_names_what_is_wrong(
    batches: Batches, body: dict[str, Any], status: int, message: str
) -> None:
    got, answer = await batches.call("POST", "/batches", body)
    assert got == status and message in answer["error"]["message"]
    _, listed = await batches.call("GET", "/batches")
    assert listed["data"] == []  # nothing was created


async def test_size_caps_and_a_model_the_catalogue_lists_but_submit_refuses(
    batches: Batches,
) -> None:
    await batches.configure(batch_max_lines=3, batch_refused_models=["openai/gpt-4o-mini"])
    status, answer = await batches.call(
        "POST", "/batches", submission([line(str(i), "x") for i in range(4)])
    )
    assert status == 413
    status, answer = await batches.call(
        "POST", "/batches", submission([line("a", "x")], model="openai/gpt-4o-mini")
    )
    assert status == 400 and "does not have a :batch endpoint" in answer["error"]["message"]


async def test_a_line_breaking_a_rule_checked_after_the_202_fails_the_whole_batch(
    batches: Batches,
) -> None:
    created = await batches.create(submission([line("a", "x"), line("b", "y", stream=True)]))
    await batches.advance(10)
    _, failed = await batches.get(created["id"])
    assert failed["status"] == "failed" and failed["results"] is None
    assert failed["error"]["message"] == "Batch requests do not support stream: true."
    assert failed["usage"]["cost"] == 0 and await batches.ledger() == []


async def test_failed_lines_are_error_rows_and_succeed_when_sent_again(batches: Batches) -> None:
    lines = [line("ok", "fine"), line("bad", "flaky [[sim:500]]")]
    first = await batches.create(submission(lines))
    await batches.advance(110)
    _, done = await batches.get(first["id"])
    assert done["status"] == "completed" and done["request_counts"]["failed"] == 1
    bad = next(r for r in done["results"] if r["custom_id"] == "bad")
    assert bad["response"] is None and bad["error"]["type"] == "server"
    assert bad["id"] == "deepinfra-bad"
    again = await batches.create(submission([lines[1]]))
    await batches.advance(110)
    _, done = await batches.get(again["id"])
    assert done["results"][0]["error"] is None and done["request_counts"]["completed"] == 1
    assert len(await batches.ledger()) == 2  # failed lines cost nothing


async def test_a_batch_whose_every_line_failed_completes_with_an_error_and_costs_nothing(
    batches: Batches,
) -> None:
    created = await batches.create(submission([line(str(i), "x [[sim:502*]]") for i in range(3)]))
    await batches.advance(110)
    _, done = await batches.get(created["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    assert done["error"]["message"].startswith("All 3 request(s) in this batch failed upstream")
    assert done["usage"]["cost"] == 0


@pytest.mark.parametrize(("knob", "status", "kind"), [
    ("batch_expire_after_s", "expired", "expired"),
    ("batch_cancel_after_s", "cancelled", "canceled"),
])  # fmt: skip
async def test_a_batch_stopped_early_returns_and_bills_only_its_finished_lines(
    batches: Batches, knob: str, status: str, kind: str
) -> None:
    await batches.configure(**{knob: 10 + 25})  # a quarter of the way through
    created = await batches.create(submission([line(str(i), f"x {i}") for i in range(8)]))
    await batches.advance(40)
    _, stopped = await batches.get(created["id"])
    assert stopped["status"] == status
    assert stopped["request_counts"] == {"total": 8, "completed": 2, "failed": 6}
    kinds = Counter(r["error"]["type"] if r["error"] else "ok" for r in stopped["results"])
    assert kinds == {"ok": 2, kind: 6}
    assert len(await batches.ledger()) == 2


async def test_read_after_create_404_settlement_pending_and_402(batches: Batches) -> None:
    await batches.configure(
        batch_visible_after_s=5, batch_settlement_polls=2, batch_payment_required=True
    )
    created = await batches.create(submission([line("a", "x")]))
    status, missing = await batches.get(created["id"])
    assert status == 404 and missing["error"]["message"] == f"Batch job {created['id']} not found."
    await batches.advance(110)
    for _ in range(2):
        status, pending = await batches.get(created["id"])
        assert status == 200 and pending["status"] == "completed" and pending["results"] is None
    status, withheld = await batches.get(created["id"])
    assert status == 402 and withheld["results"] is None and withheld["id"] == created["id"]
    await batches.configure(batch_payment_required=False)
    status, done = await batches.get(created["id"])
    assert status == 200 and len(done["results"]) == 1
    assert len(await batches.ledger()) == 1  # unlocked, not run again


async def test_a_dropped_202_leaves_a_batch_the_list_shows(batches: Batches) -> None:
    await batches.configure(batch_create_faults=["drop", "accepted_500", "500"])
    with pytest.raises(aiohttp.ClientError):
        await batches.call("POST", "/batches", submission([line("a", "x")]))
    for _ in range(2):
        status, _ = await batches.call("POST", "/batches", submission([line("a", "x")]))
        assert status == 500
    _, listed = await batches.call("GET", "/batches")
    assert len(listed["data"]) == 2  # the 500 before acceptance created nothing


async def test_the_list_is_newest_first_paged_filtered_and_scoped_to_the_key(
    batches: Batches, make_sim: Any
) -> None:
    ids = []
    for i in range(5):
        ids.append((await batches.create(submission([line("a", f"x{i}")])))["id"])
        await batches.advance(1)
    _, page = await batches.call("GET", "/batches", limit=2)
    assert [b["id"] for b in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    assert all(b["results"] is None for b in page["data"])
    _, rest = await batches.call("GET", "/batches", limit=10, after=page["last_id"])
    assert [b["id"] for b in rest["data"]] == ids[::-1][2:] and rest["has_more"] is False
    _, since = await batches.call(
        "GET", "/batches", created_after=str(page["data"][1]["created_at"] - 0.5)
    )
    assert len(since["data"]) >= 2
    _, validating = await batches.call("GET", "/batches", status="completed")
    assert validating["data"] == []
    status, _ = await batches.call("GET", "/batches", status="finalizing")
    assert status == 400
    async with batches.http.get(
        f"{batches.sim.base_url}/batches", headers={"Authorization": "Bearer sk-or-v1-another"}
    ) as resp:
        assert (await resp.json())["data"] == []


async def test_the_list_lags_behind_a_new_batch(batches: Batches) -> None:
    await batches.configure(batch_list_lag_s=10)
    await batches.create(submission([line("a", "x")]))
    _, listed = await batches.call("GET", "/batches")
    assert listed["data"] == []
    await batches.advance(10)
    _, listed = await batches.call("GET", "/batches")
    assert len(listed["data"]) == 1


async def test_only_a_finished_batch_can_be_deleted_and_there_is_no_cancel(
    batches: Batches,
) -> None:
    created = await batches.create(submission([line("a", "x")]))
    status, _ = await batches.call("DELETE", f"/batches/{created['id']}")
    assert status == 409
    status, _ = await batches.call("POST", f"/batches/{created['id']}/cancel")
    assert status == 404
    await batches.advance(110)
    status, deleted = await batches.call("DELETE", f"/batches/{created['id']}")
    assert status == 200 and deleted["deletion"]["openrouter"] == "deleted"
    status, _ = await batches.get(created["id"])
    assert status == 404


async def test_results_a_page_at_a_time_where_the_route_exists(batches: Batches) -> None:
    created = await batches.create(submission([line(str(i), f"x {i}") for i in range(7)]))
    await batches.advance(110)
    status, _ = await batches.call("GET", f"/batches/{created['id']}/results")
    assert status == 404  # not in every generation of the API
    await batches.configure(batch_results_route=True)
    seen, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        status, page = await batches.call("GET", f"/batches/{created['id']}/results", **params)
        assert status == 200
        seen += [r["custom_id"] for r in page["data"]]
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert sorted(seen) == sorted(str(i) for i in range(7))


async def test_the_batch_row_of_a_model_lists_its_price_at_the_discount(batches: Batches) -> None:
    status, row = await batches.call("GET", f"/models/{MIXTRAL}:batch/endpoints")
    assert status == 200
    validate_response("/models/{author}/{slug}/endpoints", "get", 200, row)
    price = row["data"]["endpoints"][0]["pricing"]["prompt"]
    assert Decimal(price) == MODELS_BY_ID[MIXTRAL].prompt_price / 2
    status, _ = await batches.call("GET", "/models/mistralai/mistral-7b-instruct:batch/endpoints")
    assert status == 404


async def test_a_batch_of_ten_thousand_lines_runs_to_completion(batches: Batches) -> None:
    created = await batches.create(
        submission([line(f"r{i}", f"review {i}") for i in range(10_000)])
    )
    await batches.advance(110)
    _, done = await batches.get(created["id"])
    assert done["request_counts"]["completed"] == 10_000 and len(done["results"]) == 10_000
