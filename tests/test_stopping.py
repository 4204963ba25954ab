"""How a run stops: nothing new is sent once it is stopping, what was paid for is journaled
whatever stopped it, and a signal overrides the deadline's stop."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import polars as pl
import pytest

import pipeline
from pipeline.answers import AnswerSpec
from pipeline.attempt import ChatAnswerer
from pipeline.budget import Budget, BudgetReached, Cap
from pipeline.client import OpenRouterClient
from pipeline.dispatch import Dispatcher
from pipeline.errors import NotSent
from pipeline.limits import Limits
from pipeline.money import Catalogue, Reservations
from pipeline.records import ERROR, Result, Row
from pipeline.retry import RetryPolicy
from pipeline.simulator import RunningSimulator
from tests.helpers import TEST_KEY, chat_body

MIXTRAL = "mistralai/mixtral-8x7b-instruct"
NO_BACKOFF = RetryPolicy(max_attempts=3, max_elapsed=60, backoff_base=0, backoff_max=0)


def row(prompt: str, max_tokens: int = 20) -> Row:
    body = json.dumps(chat_body(prompt, max_tokens=max_tokens)).encode()
    return Row(0, "r0", body, MIXTRAL, prompt_tokens=8, max_tokens=max_tokens, request_hash="h0")


async def answerer_for(
    sim: RunningSimulator, client: OpenRouterClient, budget: Budget, **options: Any
) -> ChatAnswerer:
    catalogue = Catalogue.from_response(await client.get_json("/models"), 0.0)
    return ChatAnswerer(
        client, Limits(None, None), NO_BACKOFF, catalogue=catalogue,
        reservations=Reservations(budget, catalogue, ()), **options,
    )  # fmt: skip


def client_for(sim: RunningSimulator) -> OpenRouterClient:
    return OpenRouterClient(sim.base_url, TEST_KEY, concurrency=4, timeout=10, connect_timeout=5)


async def sim_json(http: aiohttp.ClientSession, sim: RunningSimulator, what: str) -> Any:
    async with http.get(f"{sim.origin}/_sim/{what}") as resp:
        return await resp.json()


async def test_a_row_waiting_for_the_budget_when_the_run_stops_is_not_sent(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    """The budget holds a request back while another is in flight; when that one settles
    after the run began to stop, the waiting one gives up instead of sending."""
    budget = Budget([Cap("cost.max_cost", 0.001)])
    stopping = asyncio.Event()
    async with client_for(sim) as client:
        answer = await answerer_for(sim, client, budget, stopping=stopping)
        await budget.reserve(0.00099)  # a request in flight holds nearly all of the cap
        waiting = asyncio.create_task(answer(row("hello")))
        for _ in range(5):  # let it reach the budget and wait there
            await asyncio.sleep(0)
        assert not waiting.done()
        stopping.set()
        budget.settle(0.00099, 0.0001)
        with pytest.raises(NotSent):
            await waiting
    assert (await sim_json(http, sim, "stats"))["requests"] == 0
    assert budget.reserved == pytest.approx(0.0) and budget.spent == pytest.approx(0.0001)


async def test_answers_turned_down_before_a_budget_stop_are_kept(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    """An invalid answer is asked again; the budget cannot take the re-ask, which stops the
    job, and the answer turned down (paid for) goes to the journal with the stop."""
    async with client_for(sim) as client:
        catalogue = Catalogue.from_response(await client.get_json("/models"), 0.0)
        price = catalogue.get(MIXTRAL)
        assert price is not None
        worst = price.cost(int(8 * 1.25) + 1, 20)
        answer = await answerer_for(
            sim, client, Budget([Cap("cost.max_cost", worst * 1.01)]),
            answers=AnswerSpec.for_labels(["yes", "no"]), invalid_retries=2,
        )  # fmt: skip
        with pytest.raises(BudgetReached) as stopped:
            await answer(row("[[sim:schema_invalid*1]] yes or no?"))
    (kept,) = stopped.value.results
    (billed,) = (await sim_json(http, sim, "ledger"))["data"]
    assert (kept.status, kept.error_type, kept.retry_on_resume) == (ERROR, "invalid_answer", True)
    assert kept.cost_usd == billed["cost"] and kept.generation_id == billed["id"]


async def test_the_pool_journals_what_a_stopping_row_had() -> None:
    paid = Result(0, "r0", status=ERROR, cost_usd=0.5, retry_on_resume=True)

    async def answer(row: Row) -> list[Result]:
        stop = BudgetReached("budget reached")
        stop.results = (paid,)
        raise stop

    seen: list[Result] = []
    with pytest.raises(BudgetReached):
        await Dispatcher(answer, 1).run(
            iter([[Row(0, "r0", b"{}")]]), lambda r, res: seen.append(res)
        )
    assert seen == [paid]


class _Watch(io.StringIO):
    """A log stream that sends this process SIGTERM when the deadline's stop is logged."""

    def write(self, text: str) -> int:
        if '"stopping"' in text and '"max_runtime"' in text:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().write(text)


@pytest.mark.timeout(30)
def test_a_signal_during_the_deadline_stop_takes_over(
    tmp_path: Path, sim_thread: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline's stop leaves in-flight requests half its grace (30 s at most); a SIGTERM
    that follows (a scheduler about to SIGKILL) abandons them after the signal's 1 s, and the
    run ends as interrupted (143), journal saved."""
    monkeypatch.setenv("OPENROUTER_API_KEY", TEST_KEY)
    pl.DataFrame({"id": ["a", "b"], "text": ["one", "two"]}).write_csv(tmp_path / "in.csv")
    with sim_thread(latency=20.0) as sim:
        config = pipeline.load_config(
            None, {"input.path": str(tmp_path / "in.csv"), "prompt.column": "text",
                   "output.path": str(tmp_path / "out.parquet"), "request.base_url": sim.base_url,
                   "limits.max_runtime": 600},
        )  # fmt: skip
        # "Started" 539 s ago: the deadline's stop (60 s of grace before 600 s) comes in about
        # a second, with both requests (20 s each) in flight.
        started = time.monotonic() - 539  # the event loop's clock
        options = pipeline.RunOptions(
            quiet=True, logs=pipeline.LogSettings(json=True), stream=_Watch(), started=started
        )
        with pytest.raises(pipeline.Interrupted) as interrupted:
            pipeline.run_job(config, options)
    assert interrupted.value.exit_code == 143
