"""The cluster's limits without a cluster: the Coordinator's `acquire` on a fast-forward loop,
and a worker's `RemoteLimits` against a stand-in for the Coordinator's handle. One round trip
lets many requests start only as far as the job's limits let them start together."""

from __future__ import annotations

import asyncio
from collections import deque
from types import SimpleNamespace
from typing import Any

import pytest

from tests.fastclock import run_fast

pytest.importorskip("ray")  # in the [test] extra; the module imports it

from pipeline.budget import BudgetReached, Cap
from pipeline.cluster_actors import Coordinator, RemoteLimits

JOB: dict[str, Any] = {"caps": []}


def test_one_round_trip_lets_every_waiting_request_start_when_no_rate_binds() -> None:
    async def main() -> tuple[int, bool]:
        return await Coordinator(None, None, JOB).acquire([10] * 50)

    assert run_fast(main()) == [False] * 50


def test_under_a_rate_a_round_trip_lets_one_start_and_no_second_holds_more_than_the_rate() -> None:
    async def main() -> list[float]:
        coordinator, loop, starts = Coordinator(100, None, JOB), asyncio.get_running_loop(), []
        waiting = 300
        while waiting:
            started = len(await coordinator.acquire([10] * waiting))
            starts += [loop.time()] * started
            waiting -= started
        return starts

    starts = run_fast(main())
    busiest = max(sum(1 for s in starts if t <= s < t + 1.0) for t in starts)
    assert busiest <= 100
    assert len(set(starts)) == 300  # one a gap: none bunched into one send


def test_a_429_pause_holds_the_whole_round_trip_and_a_stop_lets_none_start() -> None:
    async def main() -> tuple[list[bool], float, list[bool]]:
        coordinator, loop = Coordinator(None, None, JOB), asyncio.get_running_loop()
        await coordinator.acquire([1])
        coordinator.key_limited(2.0)
        began = loop.time()
        after_pause = await coordinator.acquire([1] * 5)
        waited = loop.time() - began
        coordinator.stop()
        return after_pause, waited, await coordinator.acquire([1] * 5)

    after_pause, waited, after_stop = run_fast(main())
    # None before the reset time (and the 429 set a rate, which then spaces the rest).
    assert after_pause and not any(after_pause) and waited >= 2.0
    assert after_stop == [True] * 5  # each let go, to send nothing


def test_one_token_rate_holds_for_every_worker_and_their_answers_longer_than_estimated() -> None:
    async def main() -> tuple[float, float]:
        coordinator, loop = Coordinator(None, 600, JOB), asyncio.get_running_loop()  # 10/s
        began = loop.time()
        waiting = 9  # 900 tokens from any workers: a minute's 600 at once, then 30 s more
        while waiting:
            waiting -= len(await coordinator.acquire([100] * waiting))
        estimated = loop.time() - began
        coordinator.charge_extra_tokens(300)  # an answer 300 tokens longer than estimated
        await coordinator.acquire([0])  # the next request pays for them: 30 s more
        return estimated, loop.time() - began

    estimated, total = run_fast(main())
    assert estimated == pytest.approx(30, abs=0.1)
    assert total == pytest.approx(60, abs=0.1)


def test_a_worker_tells_extra_tokens_only_when_the_job_has_a_token_rate() -> None:
    told: list[int] = []
    handle = SimpleNamespace(acquire=None, charge_extra_tokens=SimpleNamespace(remote=told.append))
    for limited in (False, True):
        RemoteLimits(handle, asyncio.Event(), limited).charge_extra_tokens(40)
    assert told == [40]


class Handle:
    """The Coordinator as a worker sees it (`handle.acquire.remote(...)`), answering from a
    script of replies and keeping what it was asked."""

    def __init__(self, replies: list[list[Any]]) -> None:
        self.asked: list[list[int]] = []
        self._replies = deque(replies)
        self.acquire = self

    def remote(self, estimates: list[int]) -> Any:
        self.asked.append(list(estimates))
        reply = self._replies.popleft()

        async def answer() -> list[Any]:
            await asyncio.sleep(0.001)  # a round trip
            return reply

        return answer()


def test_a_worker_s_waiting_requests_ask_together_one_round_trip_at_a_time() -> None:
    async def main() -> tuple[Handle, bool]:
        handle, stopping = Handle([[False] * 20, [False] * 3, [False] * 7]), asyncio.Event()
        limits = RemoteLimits(handle, stopping, tokens_limited=False)
        first = [asyncio.ensure_future(limits.acquire(10)) for _ in range(20)]
        await asyncio.sleep(0)  # the first round trip goes with these twenty
        later = [asyncio.ensure_future(limits.acquire(5)) for _ in range(10)]
        await asyncio.gather(*first, *later)
        return handle, stopping.is_set()

    handle, stopped = run_fast(main())
    assert [len(asked) for asked in handle.asked] == [20, 10, 7]  # 10 waited; 3 started, then 7
    assert not stopped


def test_a_stopping_job_lets_every_waiting_request_go_on_to_send_nothing() -> None:
    async def main() -> tuple[Handle, bool]:
        handle, stopping = Handle([[False, True, True, True, True, True]]), asyncio.Event()
        limits = RemoteLimits(handle, stopping, tokens_limited=False)
        await asyncio.gather(*(limits.acquire(10) for _ in range(6)))
        return handle, stopping.is_set()

    handle, stopped = run_fast(main())
    assert len(handle.asked) == 1 and stopped  # all six return; the answerer then sends none


def test_one_round_trip_holds_every_reservation_that_fits_and_the_next_waits_its_turn() -> None:
    async def main() -> tuple[list[Any], list[Any], float]:
        coordinator = Coordinator(None, None, {"caps": [Cap("cost.max_cost", 1.0)]})
        fitting = await coordinator.reserve([(7, 0.3, True)] * 5)  # 3 fit, the 4th does not
        coordinator.settle([(7, 0.3, 0.1)])  # an answer cheaper than its worst case frees room
        rest = await coordinator.reserve([(7, 0.3, True)] * 2)
        assert coordinator._budget is not None
        return fitting, rest, coordinator._budget.reserved

    fitting, rest, reserved = run_fast(main())
    assert fitting == [None] * 3 and rest == [None]  # 0.9 held, then 0.6 + 0.1 spent + 0.3
    assert reserved == pytest.approx(0.9)


def test_a_reservation_that_can_never_fit_gets_the_budget_s_stop() -> None:
    async def main() -> list[Any]:
        coordinator = Coordinator(None, None, {"caps": [Cap("cost.max_cost", 0.5)]})
        return await coordinator.reserve([(1, 0.8, True), (1, 0.1, True)])

    stop, then = run_fast(main())
    assert isinstance(stop, BudgetReached) and "cost.max_cost" in str(stop)
    assert then is None  # the next one, which fits, is held
