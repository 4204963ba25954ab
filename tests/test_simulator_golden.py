"""Golden transcripts of the simulator: what it sends on each route, byte for byte, so that moving
its code around cannot change a status, a header that clients read, or a body unnoticed.

    PIPELINE_UPDATE_GOLDEN=1 python -m pytest tests/test_simulator_golden.py   # rewrite, then review

Each case starts its own simulator, sends a fixed list of requests and writes one transcript to
`tests/golden/simulator/<case>.txt`: per exchange the status, the headers that matter (content
type, Content-Length against the body, Cache-Control, Retry-After, X-RateLimit-*, whether
X-Generation-Id is there) and the raw body. Only what legitimately varies between runs is masked:
generation ids, timestamps, rate-limit reset times, the request rate, the loopback port.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from pipeline.simulator import RunningSimulator
from tests import helpers
from tests.helpers import TEST_KEY, SimFactory, chat_body

MANAGEMENT_KEY = "sk-or-v1-management-0000000000000"
OTHER_KEY = "sk-or-v1-other-key-00000000000000000"
DISABLED_KEY = "sk-or-v1-disabled-key-000000000000"
SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "review",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "label": {"type": "string", "enum": ["pos", "neg"]},
                "score": {"type": "integer"},
            },
            "required": ["label", "score"],
        },
    },
}

# (pattern, replacement), applied in order to every body. Each pattern names one value that
# differs from run to run; everything else must come out the same.
_MASKS = [
    (re.compile(r"gen-\d+-[A-Za-z0-9]{20}"), "gen-<TIME>-<ID>"),
    (re.compile(r"(chatcmpl|req)-[A-Za-z0-9]{12}"), r"\1-<ID>"),
    # Not the catalogue's fixed date: /models is byte-for-byte stable.
    (re.compile(r'"created": (?!1702339200\b)\d+'), '"created": <TIME>'),
    # The error_body fault picks its code with an RNG seeded by the generation id.
    (
        re.compile(
            r'"code": (429|500|502), ("message": "Provider returned error", "metadata": \{"provider_name")'
        ),
        r'"code": <429|500|502>, \2',
    ),
    (re.compile(r'"created_at": "[^"]*"'), '"created_at": "<TIME>"'),
    (re.compile(r'"X-RateLimit-Reset": "\d+"'), '"X-RateLimit-Reset": "<RESET_MS>"'),
    (re.compile(r'"(first|last)_request_at": [\d.]+'), r'"\1_request_at": <TIME>'),
    (re.compile(r'"max_requests_per_(clock_)?second": \d+'), r'"max_requests_per_\1second": <N>'),
    (re.compile(r'"max_429s_per_clock_second": \d+'), '"max_429s_per_clock_second": <N>'),
    (re.compile(r'"Host": "127\.0\.0\.1:\d+"'), '"Host": "127.0.0.1:<PORT>"'),
    (re.compile(r'"User-Agent": "[^"]*"'), '"User-Agent": "<UA>"'),
]
_PROCESSING = b": OPENROUTER PROCESSING\n\n"


def check_golden(name: str, actual: str) -> None:
    """The convention of tests/test_golden.py, in a folder of the simulator's own."""
    helpers.check_golden(f"simulator/{name}", actual)


def masked(text: str) -> str:
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text


@dataclass
class Transcript:
    """Requests sent to one simulator and what came back, as text."""

    sim: RunningSimulator
    session: aiohttp.ClientSession
    lines: list[str] = field(default_factory=list)
    generation_id: str = ""  # of the last answer that carried X-Generation-Id

    async def send(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        key: str | None = TEST_KEY,
        headers: dict[str, str] | None = None,
        note: str = "",
        vary: tuple[str, ...] = (),
    ) -> Any:
        """Send one request and write down the answer; returns the parsed body (or None).

        `vary` names headers whose value depends on the wall clock (Retry-After until midnight).
        """
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        if json_body is not None:
            data = json.dumps(json_body).encode()
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        root = self.sim.origin if path.startswith("/_sim/") else self.sim.base_url
        extra = "".join(f" {k}: {v}" for k, v in (headers or {}).items())
        self.lines.append(f"=== {method} {masked(path)}{extra}{'  # ' + note if note else ''}")
        try:
            async with self.session.request(method, root + path, data=data, headers=sent) as resp:
                self._head(resp, vary)
                raw, dropped = await self._read(resp)
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            # Reset before any response: aiohttp reports it as one of two errors, by timing.
            self.lines.append("connection dropped before a response")
            return None
        length = resp.headers.get("Content-Length")
        if length is not None:
            self.lines.append(
                "content-length: = body" if int(length) == len(raw) else f"content-length: {length}"
            )
        body = self._body(raw)
        if "Retry-After" in vary:
            body = re.sub(r'"Retry-After": "\d+"', '"Retry-After": "<VARIES>"', body)
        self.lines.append(body)
        if dropped:
            self.lines.append("then the connection dropped")
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def _head(self, resp: aiohttp.ClientResponse, vary: tuple[str, ...]) -> None:
        self.lines.append(f"status: {resp.status}")
        for name in ("Content-Type", "Cache-Control", "Transfer-Encoding", "Retry-After"):
            if name in resp.headers:
                value = "<VARIES>" if name in vary else resp.headers[name]
                self.lines.append(f"{name.lower()}: {value}")
        for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
            if name in resp.headers:
                value = "<RESET_MS>" if name.endswith("Reset") else resp.headers[name]
                self.lines.append(f"{name.lower()}: {value}")
        if "X-Generation-Id" in resp.headers:
            assert re.fullmatch(r"gen-\d{10}-[A-Za-z0-9]{20}", resp.headers["X-Generation-Id"])
            self.lines.append("x-generation-id: present")
            self.generation_id = resp.headers["X-Generation-Id"]

    async def _read(self, resp: aiohttp.ClientResponse) -> tuple[bytes, bool]:
        chunks = []
        try:
            async for chunk in resp.content.iter_any():
                chunks.append(chunk)
        except aiohttp.ClientError:
            return b"".join(chunks), True
        return b"".join(chunks), False

    def _body(self, raw: bytes) -> str:
        # Keep-alive beats are sent on a timer, so how many arrive depends on scheduling: a
        # run of them is shown as one marker (only the keep-alive case has more than one).
        lead = ""
        if raw.startswith(b"\n"):
            lead, raw = "<keep-alive newlines>", raw.lstrip(b"\n")
        beats = 0
        while raw.startswith(_PROCESSING, beats * len(_PROCESSING)):
            beats += 1
        if beats > 1:
            lead, raw = "<processing comments>", raw[(beats - 1) * len(_PROCESSING) :]
        text = masked(raw.decode(errors="replace"))
        # A stream is easier to review one event a line; JSON bodies hold no raw newline.
        return "body: " + lead + text.replace("\n\n", "\\n\\n\n")

    async def chat(self, body: dict[str, Any] | None = None, **kw: Any) -> Any:
        return await self.send("POST", "/chat/completions", json_body=body or chat_body(), **kw)

    async def fault(self, fault: str, body: dict[str, Any] | None = None, **kw: Any) -> Any:
        return await self.chat(body, headers={"X-Sim-Fault": fault}, **kw)

    async def get(self, path: str, **kw: Any) -> Any:
        return await self.send("GET", path, **kw)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


Case = Callable[[Transcript], Awaitable[None]]
CASES: dict[str, tuple[dict[str, Any], Case]] = {}


def case(name: str, **config: Any) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[name] = (config, fn)
        return fn

    return register


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # No default Authorization header: each request says which key it sends, if any.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        yield http


# ---------------------------------------------------------------------------------- answers


@case("plain")
async def _plain(t: Transcript) -> None:
    await t.chat()
    await t.chat(chat_body("Summarise: the hotel was clean", temperature=0.2, seed=7))
    await t.chat(chat_body(max_tokens=3), note="cut by max_tokens")
    await t.chat(chat_body("Count to ten", stop=["three"]), note="a stop sequence")
    cached = {
        "model": "openai/gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You label reviews. " * 20},
            {"role": "user", "content": "great"},
        ],
    }
    await t.chat(cached, note="first sight of the system prompt")
    await t.chat(cached, note="read from cache")
    await t.chat({"messages": [{"role": "user", "content": "no model"}]}, note="default model")
    await t.get("/_sim/ledger")
    await t.get("/_sim/ledger?offset=5")
    await t.get("/_sim/stats")
    await t.get("/_sim/requests")
    # The raw log the golden request-bytes test reads: (method, path, headers, raw bytes).
    for method, path, headers, raw in t.sim.simulator.requests_log:
        t.lines.append(f"log: {method} {path} {headers['Authorization'] == f'Bearer {TEST_KEY}'}")
        t.lines.append(f"log body: {raw.decode()}")


@case("formats")
async def _formats(t: Transcript) -> None:
    await t.chat(chat_body(response_format=SCHEMA_FORMAT), note="json_schema")
    await t.chat(chat_body(response_format={"type": "json_object"}), note="json_object")
    await t.chat(
        chat_body(model="mistralai/mistral-7b-instruct", response_format=SCHEMA_FORMAT),
        note="a model without structured outputs ignores the format",
    )


@case("stream")
async def _stream(t: Transcript) -> None:
    await t.chat(chat_body("stream me", stream=True))
    await t.chat(
        chat_body("stream me", stream=True, model="deepseek/deepseek-r1"), note="reasoning"
    )
    await t.chat(chat_body("", stream=True, max_tokens=1), note="a tiny answer")
    await t.get("/_sim/ledger")


@case("native-n", native_n=True)
async def _native_n(t: Transcript) -> None:
    await t.chat(chat_body("three of them", n=3))
    await t.chat(chat_body("n is not an int", n="3"))
    await t.chat(chat_body("n is a bool", n=True))
    await t.chat(chat_body("n is capped", n=500, max_tokens=1))
    await t.fault("empty", chat_body("empty, twice", n=2))
    await t.get("/models")


@case("n-ignored")
async def _n_ignored(t: Transcript) -> None:
    await t.chat(chat_body("three of them", n=3))


@case("reasoning")
async def _reasoning(t: Transcript) -> None:
    r1 = "deepseek/deepseek-r1"
    await t.chat(chat_body(model=r1))
    await t.chat(chat_body(model=r1, max_tokens=4), note="reasoning spends the whole budget")
    await t.chat(chat_body(model=r1, reasoning={"max_tokens": 5}))
    await t.chat(chat_body(model=r1, reasoning={"enabled": False}))
    await t.chat(chat_body(model=r1, reasoning={"effort": "none"}))
    await t.chat(chat_body(model=r1, reasoning_effort="none"))
    await t.chat(chat_body(model=r1, response_format=SCHEMA_FORMAT))


@case("keepalive", latency=0.025, keepalive_interval=0.01)
async def _keepalive(t: Transcript) -> None:
    await t.chat(note="newlines before the JSON body")
    await t.chat(chat_body(stream=True), note="processing comments before the first chunk")


# ----------------------------------------------------------------------------------- faults


@case("faults-http")
async def _faults_http(t: Transcript) -> None:
    await t.fault("402")
    await t.fault("403", chat_body("something flagged"))
    await t.fault("403", chat_body("x" * 150), note="a long input is excerpted")
    for code in ("408", "500", "502", "524", "529"):
        await t.fault(code)
    await t.fault("bogus", note="an unknown fault")
    await t.fault("429", chat_body("a free model", model="meta-llama/llama-3.3-70b-instruct:free"))
    await t.get("/_sim/ledger")
    await t.get("/_sim/stats")


@case("fault-429", retry_after=2.0)
async def _fault_429(t: Transcript) -> None:
    await t.fault("429")
    await t.chat(note="retried before Retry-After: an upstream 429 holds nothing back")
    await t.chat(key=OTHER_KEY, note="another key")
    await t.get("/_sim/stats")


@case("fault-503", retry_after=1.5)
async def _fault_503(t: Transcript) -> None:
    await t.fault("503")
    await t.chat(note="retried before Retry-After: answered")


@case("faults-200")
async def _faults_200(t: Transcript) -> None:
    await t.fault("error_body")
    await t.fault("choice_error")
    await t.fault("empty")
    await t.fault("schema_invalid", chat_body(response_format=SCHEMA_FORMAT))
    await t.fault("schema_invalid", note="without a format")
    await t.fault("invalid_json")
    await t.chat(chat_body("marked [[sim:500*1,empty]]"), note="a marker schedule, step 1")
    await t.chat(chat_body("marked [[sim:500*1,empty]]"), note="step 2")
    await t.chat(chat_body("marked [[sim:500*1,empty]]"), note="step 3: done")
    await t.get("/_sim/ledger")
    await t.get("/_sim/stats")


@case("faults-connection", hang_seconds=0.0)
async def _faults_connection(t: Transcript) -> None:
    await t.fault("reset")
    await t.fault("hang", note="held for hang_seconds, then 504")
    await t.fault("stall", note="held for hang_seconds, then reset")
    await t.fault("mid_body")
    await t.get("/_sim/ledger")
    await t.get("/_sim/stats")


@case("faults-stream", hang_seconds=0.0)
async def _faults_stream(t: Transcript) -> None:
    body = chat_body("a longer answer to cut in half", stream=True)
    for fault in ("mid_body", "stall", "invalid_json", "choice_error", "error_body", "empty"):
        await t.fault(fault, body)
    await t.fault("schema_invalid", chat_body(stream=True, response_format=SCHEMA_FORMAT))
    await t.fault("429", body)
    await t.get("/_sim/ledger")


# --------------------------------------------------------------------------------- refusals


@case(
    "refusals",
    api_keys=[TEST_KEY, DISABLED_KEY, MANAGEMENT_KEY],
    disabled_keys=[DISABLED_KEY],
    down_models=["openai/gpt-4o-mini"],
    flagged_terms=["forbidden"],
)
async def _refusals(t: Transcript) -> None:
    await t.chat(key=None, note="no key")
    await t.chat(key="", note="an empty bearer")
    await t.chat(key=OTHER_KEY, note="an unknown key")
    await t.chat(key=DISABLED_KEY, note="a disabled key")
    await t.send("POST", "/chat/completions", data=b"not json", note="not JSON")
    await t.send("POST", "/chat/completions", json_body=[1, 2], note="not an object")
    await t.chat({"model": "openai/gpt-4o-mini"}, note="no messages")
    await t.chat(chat_body(messages=[]), note="empty messages")
    await t.chat(chat_body(max_tokens=0))
    await t.chat(chat_body(max_tokens="10"))
    await t.chat(chat_body(max_completion_tokens=2), note="max_completion_tokens is honoured")
    await t.chat(chat_body(model="no/such-model"))
    await t.chat(chat_body(model="openai/gpt-4o-mini"), note="a down model")
    await t.chat(
        chat_body(model="openai/gpt-4o-mini", models=["no/such-model", "deepseek/deepseek-r1"]),
        note="fallbacks",
    )
    await t.chat(
        {"models": ["openai/gpt-4o-mini"], "messages": [{"role": "user", "content": "hi"}]},
        note="only models, all down",
    )
    await t.chat(
        chat_body(
            model="mistralai/mistral-7b-instruct",
            response_format=SCHEMA_FORMAT,
            provider={"require_parameters": True},
        ),
        note="require_parameters",
    )
    await t.chat(chat_body(max_tokens=40_000), note="over the context length")
    await t.chat(chat_body("this is forbidden talk"), note="flagged")
    await t.chat(chat_body("[[sim:nope]]"), note="a bad marker")
    await t.get("/_sim/stats")


@case("limits-rate", rate_limit=2, rate_window=60)
async def _limits_rate(t: Transcript) -> None:
    for i in range(3):
        await t.chat(chat_body(f"r{i}"))
    await t.chat(chat_body("r3"), note="sent before Retry-After: refused and counted")
    await t.get("/_sim/stats")


@case("limits-rate-not-enforced", rate_limit=1, rate_window=60, enforce_retry_after=False)
async def _limits_rate_lenient(t: Transcript) -> None:
    await t.chat(chat_body("r0"))
    await t.chat(chat_body("r1"))
    await t.chat(chat_body("r2"), note="the window refuses it, no violation is counted")
    await t.get("/_sim/stats")


@case("limits-free-minute", free_requests_per_minute=2)
async def _limits_free_minute(t: Transcript) -> None:
    free = "meta-llama/llama-3.3-70b-instruct:free"
    for i in range(3):
        await t.chat(chat_body(f"f{i}", model=free))
    await t.chat(chat_body("f3", model=free), key=OTHER_KEY, note="each key has its own minute")
    await t.chat(chat_body("f4"), note="a paid model is not capped")


@case("limits-free-day", free_requests_per_day=2)
async def _limits_free_day(t: Transcript) -> None:
    free = "meta-llama/llama-3.3-70b-instruct:free"
    for i in range(3):
        await t.chat(chat_body(f"f{i}", model=free), vary=("Retry-After",))


@case("limits-credit", credit_limit=0.00002)
async def _limits_credit(t: Transcript) -> None:
    await t.chat(chat_body(max_tokens=10_000), note="cannot afford max_tokens")
    await t.chat(chat_body(model="meta-llama/llama-3.3-70b-instruct:free", max_tokens=1000))
    await t.chat(chat_body("spend it " * 10))
    await t.chat(chat_body("spend it " * 10, temperature=1))
    await t.chat(note="nothing left")
    await t.get("/key")


# --------------------------------------------------------------------------- the small GETs


@case("models")
async def _models(t: Transcript) -> None:
    await t.get("/models", key=None)


@case("key-and-credits", management_keys=[MANAGEMENT_KEY], credit_limit=5.0)
async def _key_and_credits(t: Transcript) -> None:
    await t.get("/key")
    await t.chat()
    await t.get("/key", note="usage grows")
    await t.get("/auth/key")
    await t.get("/key", key=MANAGEMENT_KEY)
    await t.get("/key", key="short")
    await t.get("/key", key=None)
    await t.get("/credits")
    await t.get("/credits", key=MANAGEMENT_KEY)
    await t.get("/credits", key=None)


@case("credits-unlimited", management_keys=[MANAGEMENT_KEY])
async def _credits_unlimited(t: Transcript) -> None:
    await t.get("/key")
    await t.get("/credits", key=MANAGEMENT_KEY)


@case("generation", ready_after=0.0)
async def _generation(t: Transcript) -> None:
    await t.get("/generation?id=gen-0-unknown")
    await t.get("/generation")
    body = chat_body(user="user-42")
    answer = await t.chat(body, headers={"HTTP-Referer": "https://example.org"})
    await t.get(f"/generation?id={answer['id']}")
    await t.get(f"/generation?id={answer['id']}", key=None)
    answer = await t.chat(chat_body(model="deepseek/deepseek-r1"))
    await t.get(f"/generation?id={answer['id']}")
    await t.chat(chat_body(stream=True))
    await t.get(f"/generation?id={t.generation_id}", note="a streamed one")
    await t.fault("empty")
    await t.get(f"/generation?id={t.generation_id}", note="an empty one: not billed")
    await t.fault("invalid_json")
    await t.get(f"/generation?id={t.generation_id}", note="billed, never seen")


@case("generation-not-ready", ready_after=3600.0)
async def _generation_not_ready(t: Transcript) -> None:
    answer = await t.chat()
    await t.get(f"/generation?id={answer['id']}")


@case("sim-hooks")
async def _sim_hooks(t: Transcript) -> None:
    await t.chat()
    await t.send("POST", "/_sim/config", json_body={"credit_limit": 0}, key=None)
    await t.chat(note="credit limit 0")
    await t.send("POST", "/_sim/config", json_body={"no_such": 1}, key=None)
    await t.send("POST", "/_sim/config", json_body={"fault_rates": "429=2"}, key=None)
    await t.send("POST", "/_sim/config", json_body={"latency": "slow"}, key=None)
    await t.send("POST", "/_sim/config", data=b"{", key=None, note="not JSON")
    await t.send("POST", "/_sim/config", json_body={"fault_rates": {"500": 1.0}}, key=None)
    await t.send("POST", "/_sim/config", json_body={"credit_limit": None}, key=None)
    await t.chat(note="every request a 500")
    await t.get("/_sim/stats", key=None)
    await t.send("POST", "/_sim/reset", key=None)
    await t.get("/_sim/stats", key=None)
    await t.get("/_sim/ledger", key=None)
    await t.get("/_sim/requests", key=None)


# ------------------------------------------------------------------------------- the test


@pytest.mark.parametrize("name", list(CASES))
async def test_simulator_transcript(
    make_sim: SimFactory, session: aiohttp.ClientSession, name: str
) -> None:
    config, run = CASES[name]
    transcript = Transcript(await make_sim(**config), session)
    await run(transcript)
    check_golden(f"{name}.txt", transcript.text())
