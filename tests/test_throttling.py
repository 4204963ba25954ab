"""429s at the provider's edge: whose limit each one is, and what it holds back. The key's own
limit pauses every worker until its reset; an upstream provider's 429 (or one nobody names)
makes only its row wait its Retry-After, and only a storm of them lowers the requests in
flight. The adaptive tests run on a fast-forward clock against an endpoint at the client's
seam (`complete(body)`), which keeps the time of every request."""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from pipeline.attempt import ChatAnswerer
from pipeline.client import OpenRouterClient, throttled_by
from pipeline.completions import Completion
from pipeline.dispatch import Dispatcher
from pipeline.errors import Kind, RetryableError, Throttle
from pipeline.limits import MIN_OUTCOMES, OUTCOMES, Limits, RecentShare
from pipeline.records import OK, Result, Row
from pipeline.retry import RetryPolicy
from pipeline.simulator import RunningSimulator
from tests.fastclock import run_fast
from tests.helpers import TEST_KEY, chat_body

NO_BACKOFF = RetryPolicy(max_attempts=50, max_elapsed=600, backoff_base=0, backoff_max=0)

# ------------------------------------------------------------------------- classification

FREE_DAILY = {
    "code": 429,
    "message": "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model requests per day",
    "metadata": {
        "headers": {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1788220800000"},
        "limit_source": "openrouter_free_tier_daily",
    },
}  # fmt: skip
UPSTREAM = {
    "code": 429,
    "message": "Provider returned error",
    "metadata": {"raw": '{"error":{"message":"Too many requests"}}', "provider_name": "DeepInfra"},
}


@pytest.mark.parametrize(
    ("error", "headers", "throttle"),
    [
        (FREE_DAILY, {}, Throttle.KEY),
        ({"code": 429, "message": "High demand", "metadata": {"limit_source": "openrouter_shared_capacity"}}, {}, Throttle.KEY),
        ({"code": 429, "message": "Rate limit exceeded"}, {"X-RateLimit-Remaining": "0"}, Throttle.KEY),
        ({"code": 429, "message": "slow down"}, {"x-ratelimit-remaining-requests": "0"}, Throttle.KEY),
        (UPSTREAM, {"Retry-After": "1"}, Throttle.UPSTREAM),
        ({**UPSTREAM, "metadata": {"limit_source": "upstream_provider_shared_pool"}}, {}, Throttle.UPSTREAM),
        ({"code": 429, "message": "Too Many Requests"}, {"Retry-After": "2"}, Throttle.UNKNOWN),
        (None, {"X-RateLimit-Remaining": "7"}, Throttle.UNKNOWN),
    ],
    ids=["free daily cap", "shared capacity", "nothing remaining", "openai style", "upstream",
         "upstream pool", "a bare 429", "not json"],
)  # fmt: skip
def test_each_429_is_told_apart_by_whose_limit_it_is(
    error: Any, headers: dict[str, str], throttle: Throttle
) -> None:
    assert throttled_by(error, headers) is throttle


async def test_the_client_classifies_the_simulators_429s(make_sim: Any) -> None:
    sim: RunningSimulator = await make_sim(rate_limit=2, rate_window=60)
    async with OpenRouterClient(
        sim.base_url, TEST_KEY, concurrency=2, timeout=10, connect_timeout=5
    ) as client:
        upstream = await _refusal(client, chat_body("[[sim:429*1]] busy"))
        await client.complete(json.dumps(chat_body("fine")).encode())  # the one the window holds
        key = await _refusal(client, chat_body("one too many"))
    assert upstream.throttle is Throttle.UPSTREAM and upstream.retry_after is not None
    assert key.throttle is Throttle.KEY and key.retry_after is not None


async def _refusal(client: OpenRouterClient, body: dict[str, Any]) -> RetryableError:
    with pytest.raises(RetryableError) as refused:
        await client.complete(json.dumps(body).encode())
    assert refused.value.kind == Kind.HTTP_429
    return refused.value


# ------------------------------------------------------------------ the adaptive behaviour

MIXTRAL = "mistralai/mixtral-8x7b-instruct"
LATENCY = 0.05


@dataclass
class Endpoint:
    """What the client's `complete(body)` talks to, on the loop's (fast) clock: each request
    takes LATENCY, unless `refuse(key, now)` returns a 429 for it (answered at once, as a
    provider refusing at the door, or after `hold(key)` seconds, as one that hangs first).
    Keeps when each request came and how many were in flight."""

    refuse: Callable[[str, float], RetryableError | None]
    hold: Callable[[str], float] = lambda key: 0.0
    sent: list[tuple[float, str]] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: list[tuple[float, int]] = field(default_factory=list)
    refused: list[tuple[float, str, RetryableError]] = field(default_factory=list)

    async def complete(self, body: bytes) -> Completion:
        now = asyncio.get_running_loop().time()
        key = json.loads(body)["messages"][0]["content"]
        self.sent.append((now, key))
        refusal = self.refuse(key, now)
        if refusal is not None:
            self.refused.append((now, key, refusal))
            if hold := self.hold(key):
                await asyncio.sleep(hold)
            raise refusal
        self.in_flight += 1
        self.most_in_flight.append((now, self.in_flight))
        try:
            await asyncio.sleep(LATENCY)
        finally:
            self.in_flight -= 1
        return Completion(
            content="ok", finish_reason="stop", model=MIXTRAL, provider="Sim",
            generation_id=f"gen-{len(self.sent)}", prompt_tokens=5, completion_tokens=1,
            total_tokens=6, reasoning_tokens=0, cached_tokens=0, cost=0.0,
        )  # fmt: skip


def upstream_429(retry_after: float) -> RetryableError:
    return RetryableError(
        Kind.HTTP_429, "HTTP 429: Provider returned error", status=429,
        retry_after=retry_after, throttle=Throttle.UPSTREAM,
    )  # fmt: skip


def run_job(
    endpoint: Endpoint, rows: int, concurrency: int, policy: RetryPolicy = NO_BACKOFF
) -> tuple[list[Result], float, Limits]:
    """Every row through the answerer and the worker pool: results, fake seconds, limits."""

    async def job() -> tuple[list[Result], float, Limits]:
        loop = asyncio.get_running_loop()
        limits = Limits(None, None, concurrency=concurrency)
        answer = ChatAnswerer(endpoint, limits, policy)  # type: ignore[arg-type]
        batch = [
            Row(i, f"r{i}", json.dumps(chat_body(f"r{i}")).encode(), MIXTRAL, request_hash=f"h{i}")
            for i in range(rows)
        ]
        results: list[Result] = []
        started = loop.time()
        dispatcher = Dispatcher(answer, concurrency)
        answer.resting = dispatcher.resting
        await dispatcher.run(iter([batch]), lambda _, r: results.append(r))
        return results, loop.time() - started, limits

    return run_fast(job())


def early_retries(endpoint: Endpoint) -> list[str]:
    """Rows sent again before the Retry-After of their own last 429 had passed."""
    told: dict[str, float] = {}
    early = []
    refusals = iter(endpoint.refused)
    pending = next(refusals, None)
    for when, key in endpoint.sent:
        if key in told and when < told[key] - 1e-9:
            early.append(key)
        if pending is not None and pending[0] == when and pending[1] == key:
            told[key] = when + (pending[2].retry_after or 0.0)
            pending = next(refusals, None)
    return early


@pytest.mark.timeout(30)
def test_a_sprinkle_of_upstream_429s_holds_back_only_the_rows_refused() -> None:
    first_tries: Counter[str] = Counter()

    def refuse(key: str, now: float) -> RetryableError | None:
        first_tries[key] += 1
        # One row in twenty is refused once, with Retry-After: 1.
        return upstream_429(1.0) if first_tries[key] == 1 and int(key[1:]) % 20 == 7 else None

    endpoint = Endpoint(refuse)
    results, seconds, limits = run_job(endpoint, 400, 20)
    assert [r.status for r in results] == [OK] * 400
    assert early_retries(endpoint) == []  # each refused row waited its own Retry-After
    # 20 rows at a time, 50 ms each: 1 s, plus one Retry-After for the last refused rows. A
    # pause of every worker for each of the twenty 429s would take over 20 s.
    assert seconds < 1.0 + 1.0 + 0.5
    assert limits.in_flight is not None and limits.in_flight.cap == 20  # never lowered
    assert max(n for _, n in endpoint.most_in_flight) == 20


@pytest.mark.timeout(30)
def test_refusals_answered_before_any_success_are_not_taken_for_a_storm() -> None:
    # A 429 comes back at once and an answer after its latency, so the first answers of a job
    # are all the first round's 429s: 5 of the first 20 for a 5% sprinkle at concurrency 100.
    first_tries: Counter[str] = Counter()

    def refuse(key: str, now: float) -> RetryableError | None:
        first_tries[key] += 1
        return upstream_429(1.0) if first_tries[key] == 1 and int(key[1:]) % 20 == 7 else None

    endpoint = Endpoint(refuse)
    results, _, limits = run_job(endpoint, 2_000, 100)
    assert [r.status for r in results] == [OK] * 2_000
    assert early_retries(endpoint) == []
    early_on = [n for when, n in endpoint.most_in_flight if 0.2 <= when - 1000.0 < 0.8]
    assert max(early_on) == 100  # every worker kept going
    assert limits.in_flight is not None and limits.in_flight.cap == 100


@pytest.mark.timeout(30)
def test_a_storm_of_upstream_429s_backs_everyone_off_then_lets_them_back() -> None:
    storm = (2.0, 6.0)  # fake seconds from the start during which the provider is saturated
    tries: Counter[str] = Counter()

    def refuse(key: str, now: float) -> RetryableError | None:
        tries[key] += 1
        in_storm = storm[0] <= now - 1000.0 < storm[1]  # the fast clock starts at 1000
        return upstream_429(0.5) if in_storm and tries[key] % 5 != 0 else None  # 80% refused

    endpoint = Endpoint(refuse)
    results, seconds, limits = run_job(endpoint, 10_000, 40)
    assert [r.status for r in results] == [OK] * 10_000  # nothing lost
    assert early_retries(endpoint) == []

    def busiest(low: float, high: float) -> int:
        return max(n for when, n in endpoint.most_in_flight if low <= when - 1000.0 < high)

    assert busiest(0.0, storm[0]) == 40  # before: every worker
    assert busiest(storm[1] - 1.0, storm[1]) <= 10  # late in the storm: backed off, all of them
    requests = Counter(int(when - 1000.0) for when, _ in endpoint.sent)
    assert requests[storm[1] - 1] < requests[storm[0] - 1] / 4  # and fewer requests sent
    assert limits.in_flight is not None and limits.in_flight.cap == 40  # recovered after
    assert busiest(seconds - 1.0, seconds) == 40


@dataclass
class KeyLimit:
    """The key may send `limit` requests in any `window` seconds; past that, a 429 whose
    Retry-After is the time to the reset, rounded up (whole seconds, as headers carry it)."""

    limit: int
    window: float
    starts: list[float] = field(default_factory=list)
    reset: float = 0.0
    told: list[float] = field(default_factory=list)  # when each 429 was answered
    early: int = 0  # requests sent after a 429 was answered, before its reset

    def __call__(self, key: str, now: float) -> RetryableError | None:
        if any(told <= now < self.reset for told in self.told):
            self.early += 1
        recent = [s for s in self.starts if s > now - self.window]
        if len(recent) >= self.limit:
            self.reset = max(self.reset, recent[0] + self.window)
            self.told.append(now)
            return RetryableError(
                Kind.HTTP_429, "HTTP 429: Rate limit exceeded", status=429,
                retry_after=math.ceil(self.reset - now), throttle=Throttle.KEY,
            )  # fmt: skip
        self.starts.append(now)
        return None


@pytest.mark.timeout(60)
def test_the_keys_own_limit_pauses_every_worker_until_its_reset() -> None:
    limit = KeyLimit(limit=50, window=1.0)
    endpoint = Endpoint(limit)
    results, seconds, _ = run_job(endpoint, 1_500, 40)
    assert [r.status for r in results] == [OK] * 1_500
    assert limit.early == 0  # no worker sent anything between a 429 and its reset
    # At most one 429 per worker each time the limit is reached: those already in flight.
    refusals_per_window = Counter(int(when - 1000.0) for when, _, _ in endpoint.refused)
    assert max(refusals_per_window.values()) <= 40
    assert 1_500 / seconds >= 0.8 * 50  # close to the limit's 50 a second


def server_error() -> RetryableError:
    return RetryableError(Kind.http(500), "HTTP 500: Internal Server Error", status=500)


def retry_gaps(endpoint: Endpoint) -> list[float]:
    """For each failed request, the time until its row was sent again."""
    failed = {(when, key) for when, key, _ in endpoint.refused}
    last: dict[str, float] = {}
    gaps = []
    for when, key in endpoint.sent:
        if key in last:
            gaps.append(when - last.pop(key))
        if (when, key) in failed:
            last[key] = when
    return gaps


@pytest.mark.timeout(30)
def test_a_rare_server_error_is_retried_at_once_and_a_broad_failure_backs_off() -> None:
    policy = RetryPolicy(max_attempts=20, max_elapsed=600, backoff_base=1.0, backoff_max=30)
    tries: Counter[str] = Counter()

    def rare(key: str, now: float) -> RetryableError | None:
        tries[key] += 1
        return server_error() if tries[key] == 1 and int(key[1:]) % 25 == 3 else None

    sprinkle = Endpoint(rare)
    results, _, _ = run_job(sprinkle, 500, 20, policy)
    assert [r.status for r in results] == [OK] * 500
    assert retry_gaps(sprinkle) == [0.0] * 20  # each one alone in a sea of answers: no wait

    broad_tries: Counter[str] = Counter()

    def broad(key: str, now: float) -> RetryableError | None:
        broad_tries[key] += 1
        return server_error() if broad_tries[key] <= 2 else None  # every row fails twice

    outage = Endpoint(broad)
    results, _, _ = run_job(outage, 200, 20, policy)
    assert [r.status for r in results] == [OK] * 200
    gaps = retry_gaps(outage)
    assert len(gaps) == 400 and sum(g > 0 for g in gaps) >= 150  # most retries waited


@pytest.mark.timeout(30)
def test_the_time_a_row_spent_waiting_counts_toward_its_back_off() -> None:
    # A few rows hang 10 s and fail, then fail again at once, then succeed. The back-off after
    # the second failure (at most 1 s + 2 s) has long passed since the row was first sent.
    policy = RetryPolicy(max_attempts=20, max_elapsed=600, backoff_base=1.0, backoff_max=30)
    tries: Counter[str] = Counter()

    def twice(key: str, now: float) -> RetryableError | None:
        tries[key] += 1
        return server_error() if tries[key] <= 2 and int(key[1:]) % 50 == 3 else None

    hung = Endpoint(twice, hold=lambda key: 10.0 if tries[key] == 1 else 0.0)
    results, _, _ = run_job(hung, 500, 20, policy)
    assert [r.status for r in results] == [OK] * 500
    gaps = sorted(round(g, 3) for g in retry_gaps(hung))
    assert gaps == [0.0] * 10 + [10.0] * 10  # the second failure sent again at once


def test_the_recent_share_is_that_of_the_last_answers() -> None:
    recent, window = RecentShare(), deque[bool](maxlen=OUTCOMES)
    draw = random.Random(7)
    for _ in range(5_000):
        hit = draw.random() < 0.3
        recent.add(hit)
        window.append(hit)
        if draw.random() < 0.01:
            recent.clear()
            window.clear()
        assert recent.share == pytest.approx(sum(window) / len(window) if window else 0.0)
        assert recent.known == (len(window) >= MIN_OUTCOMES)
