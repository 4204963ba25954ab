"""Shared fixtures: a real simulator on loopback and a plain aiohttp client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from pipeline.simulator import RunningSimulator, SimConfig, serve
from tests.helpers import FAST, TEST_KEY, SimFactory


@pytest.fixture(autouse=True)
def private_price_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test (and every CLI it starts) caches `/models` in a folder of its own: simulators
    reuse ports, and a listing cached by an earlier test's simulator must not stand in for this
    one's (one with `native_n` lists other parameters)."""
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path_factory.mktemp("price-cache")))


@pytest.fixture
async def make_sim() -> AsyncIterator[SimFactory]:
    """`sim = await make_sim(rate_limit=5)` starts a simulator that stops after the test."""
    stack: list[Any] = []

    async def factory(**overrides: Any) -> RunningSimulator:
        context = serve(SimConfig().updated({**FAST, **overrides}))
        running = await context.__aenter__()
        stack.append(context)
        return running

    yield factory
    for context in reversed(stack):
        await context.__aexit__(None, None, None)


@pytest.fixture
async def sim(make_sim: SimFactory) -> RunningSimulator:
    return await make_sim()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=timeout
    ) as session:
        yield session


@pytest.fixture
def sim_thread() -> Any:
    """`with sim_thread(**config) as sim:` — a simulator in a thread, for tests that run the CLI."""
    from pipeline.simulator import SimulatorThread

    def factory(**overrides: Any) -> SimulatorThread:
        return SimulatorThread(SimConfig().updated({**FAST, **overrides}))

    return factory
