"""Limits (with a fake clock), the retry policy, and config loading."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random
from pathlib import Path

import pytest

from pipeline import ConfigError, load_config
from pipeline.limits import KEY_HEADROOM, PROBE_AFTER, Limits
from pipeline.retry import RetryPolicy
from tests.fastclock import run_fast


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


async def test_a_429_pauses_every_worker_until_the_reset_and_halves_the_rate() -> None:
    clock = FakeClock()
    limits = Limits(1000, None, clock=clock.time, sleep=clock.sleep)
    await limits.acquire(10)
    limits.key_limited(3.0)
    limits.key_limited(3.0)  # the rest of the same burst does not lower the rate again
    assert limits.rate == 500 and limits.paused_until == 3.0 and limits.rate_limited == 2
    await asyncio.gather(*(limits.acquire(10) for _ in range(4)))  # four workers
    assert clock.now >= 3.0  # nobody started before the reset time


async def test_a_429_that_asks_for_no_wait_does_not_lower_the_rate() -> None:
    clock = FakeClock()
    limits = Limits(1000, None, clock=clock.time, sleep=clock.sleep)
    for _ in range(5):
        clock.now += 2.0
        limits.key_limited(0.0)  # Retry-After: 0, e.g. a provider's random upstream 429
    assert limits.rate == 1000 and limits.rate_limited == 5


async def test_the_rate_recovers_gradually_to_the_configured_ceiling() -> None:
    clock = FakeClock()
    limits = Limits(1000, None, clock=clock.time, sleep=clock.sleep)
    limits.key_limited(0.5)
    seen = []
    for _ in range(12):
        clock.now += 1.0
        await limits.acquire(1)
        seen.append(limits.rate)
    assert seen[:2] == [
        500,
        pytest.approx(625),
    ]  # a second after the pause, +25%: not straight back
    assert all(a <= b for a, b in itertools.pairwise(seen))
    assert seen[-1] == 1000


async def test_a_key_limit_sets_the_rate_under_what_it_accepted_and_probes_past_it_later() -> None:
    clock = FakeClock()
    limits = Limits(None, None, clock=clock.time, sleep=clock.sleep)
    for _ in range(41):
        await limits.acquire(1)
        clock.now += 0.05  # 20 starts a second
    limits.key_limited(None)  # the last of them refused
    limits.key_limited(None)  # the rest of the same burst: no second lowering
    # About 19 started in the last second, one refused: a little under the 18 let through.
    assert limits.rate == pytest.approx(18 * KEY_HEADROOM, abs=KEY_HEADROOM)
    assert limits.paused_until == pytest.approx(clock.now + 1.0)  # no Retry-After: 1 s
    learned, seen = limits.rate, []
    for _ in range(int(PROBE_AFTER) + 5):
        clock.now += 1.0
        await limits.acquire(1)
        seen.append(limits.rate)
    assert seen[: int(PROBE_AFTER) - 2] == [learned] * (int(PROBE_AFTER) - 2)  # held there
    assert seen[-1] is None or seen[-1] > learned  # then faster: the limit may have gone


def test_without_a_rate_limit_only_the_last_seconds_of_starts_are_remembered() -> None:
    """A run of millions of rows keeps no record per request (it did: one float each). When a
    429 then sets a rate, the rate holds from the first start after the pause."""

    async def run() -> tuple[int, list[float], float | None]:
        loop = asyncio.get_running_loop()
        limits = Limits(None, None)
        for _ in range(5_000):
            await limits.acquire(1)
            await asyncio.sleep(0.001)  # 1,000 starts a second
        remembered = len(limits._starts) + len(limits._window)
        limits.key_limited(None)  # a rate from the pace the limit accepted: ~980 a second
        starts = []
        for _ in range(1_000):
            await limits.acquire(1)
            starts.append(loop.time())
            assert len(limits._window) <= limits.rate  # type: ignore[operator]
        return remembered, starts, limits.rate

    remembered, starts, rate = run_fast(run())
    assert remembered <= 2_001
    assert bisect.bisect_right(starts, starts[0] + 1.0) <= rate < 1_000  # the new rate holds


def test_retry_policy_caps_attempts_and_time_and_honours_retry_after() -> None:
    policy = RetryPolicy(max_attempts=5, max_elapsed=30, backoff_base=1, backoff_max=8)
    rng = random.Random(4)
    delays = [policy.delay(attempt, None, rng) for attempt in range(1, 8)]
    assert all(0 <= d <= min(8, 2 ** (a - 1)) for a, d in enumerate(delays, start=1))
    assert policy.delay(2, 12.5) == 12.5
    assert policy.gives_up(5, 1.0, 0.0) and not policy.gives_up(4, 1.0, 0.0)
    assert policy.gives_up(2, 25.0, 6.0)  # would pass the 30 s cap
    assert RetryPolicy(3, 10, 0, 0).delay(2, None) == 0.0


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flags_override_the_file_and_paths_are_relative_to_it(tmp_path: Path) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    toml = write(
        folder / "job.toml",
        '[input]\npath = "../in.csv"\n[prompt]\ntemplate = "{x}"\n[limits]\nconcurrency = 4\n[output]\npath = "out.parquet"\n',
    )
    config = load_config(toml, {"limits.concurrency": 32, "request.model": "openai/gpt-4o-mini"})
    assert config.input.path == str(tmp_path / "in.csv")
    assert config.output.path == str(folder / "out.parquet")
    assert config.limits.concurrency == 32 and config.request.model == "openai/gpt-4o-mini"
    assert config.output.journal_path == Path(str(folder / "out.parquet") + ".journal")


def test_fingerprint_covers_what_shapes_requests_only(tmp_path: Path) -> None:
    base = {"input.path": "in.csv", "output.path": "o.parquet", "prompt.template": "{x}"}
    one = load_config(None, base)
    assert (
        one.fingerprint_hash()
        == load_config(
            None, {**base, "limits.concurrency": 99, "request.timeout": 5}
        ).fingerprint_hash()
    )
    assert (
        one.fingerprint_hash()
        != load_config(None, {**base, "request.temperature": 0.5}).fingerprint_hash()
    )
    assert (
        one.fingerprint_hash()
        != load_config(None, {**base, "prompt.template": "Q: {x}"}).fingerprint_hash()
    )
    simulated = load_config(
        None, {**base, "request.simulate": True, "request.base_url": "http://127.0.0.1:1/api/v1"}
    )
    assert (
        simulated.fingerprint_hash()
        == load_config(None, {**base, "request.simulate": True}).fingerprint_hash()
    )


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[inputs]\npath = 'x'\n", "unknown section [inputs]; did you mean [input]?"),
        (
            "[input]\npath = 'x'\nmodel = 'y'\n",
            "unknown key input.model; did you mean request.model?",
        ),
        ("[limits]\nconcurency = 3\n", "did you mean limits.concurrency?"),
        ("[input\n", "is not valid TOML"),
    ],
)
def test_config_file_errors_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("?", r"\?")):
        load_config(write(tmp_path / "job.toml", toml), {})


def test_requests_are_spaced_so_no_one_second_window_exceeds_the_rate() -> None:
    async def starts() -> list[float]:
        loop = asyncio.get_running_loop()
        limits = Limits(20, None)
        times = []
        for _ in range(100):
            await limits.acquire(1)
            times.append(loop.time())
        return times

    times = run_fast(starts())
    busiest = max(sum(1 for u in times if t - 1 < u <= t) for t in times)
    assert busiest == 20
    assert 99 / (times[-1] - times[0]) == pytest.approx(20, rel=0.01)  # and no slower than the rate


def test_even_with_stalls_and_send_jitter_no_one_second_window_exceeds_the_rate() -> None:
    async def starts() -> list[float]:
        loop = asyncio.get_running_loop()
        limits = Limits(100, None)
        times: list[float] = []

        async def worker() -> None:
            while len(times) < 1_000:
                await limits.acquire(1)
                times.append(loop.time())
                if len(times) % 150 == 0:
                    loop._now += STALL  # type: ignore[attr-defined]  # the loop blocks

        await asyncio.gather(*(worker() for _ in range(8)))
        return times

    STALL = 0.05
    times = run_fast(starts())
    # A server sees our sends up to a few ms late or early: count windows of 1 s + 10 ms.
    busiest = max(sum(1 for u in times if t - 1.01 < u <= t) for t in times)
    assert busiest <= 100
    running = times[-1] - times[0] - STALL * (len(times) // 150)
    assert (len(times) - 1) / running >= 98


def test_token_budget_waits_for_estimates_and_for_usage_beyond_them() -> None:
    async def elapsed() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        limits = Limits(None, 600)  # 10 tokens per second
        start = loop.time()
        await limits.acquire(600)  # a full minute's budget at once
        await limits.acquire(300)  # must wait for 300 tokens to drain: 30 s
        after_estimates = loop.time() - start
        limits.charge_extra_tokens(300)  # the answer was 300 tokens longer than estimated
        await limits.acquire(0)  # the next request pays for them: 30 s more
        return after_estimates, loop.time() - start

    after_estimates, total = run_fast(elapsed())
    assert after_estimates == pytest.approx(30, abs=0.01)
    assert total == pytest.approx(60, abs=0.01)
