"""The OpenRouter simulator: an `aiohttp.web` app that a client reaches by changing its base URL.

Routes (under `/api/v1` like OpenRouter): `POST /chat/completions`, `GET /models`, `GET /key`
(and the older `/auth/key`), `GET /credits`, `GET /generation?id=`. Test hooks live under
`/_sim/`: `stats`, `ledger`, `requests` (GET) and `config`, `reset` (POST).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pipeline.simulator import bodies
from pipeline.simulator.bodies import Generation
from pipeline.simulator.catalogue import CATALOGUE, DEFAULT_MODEL, MODELS_BY_ID, SimModel
from pipeline.simulator.config import SimConfig
from pipeline.simulator.content import (
    Answer,
    compose,
    count_tokens,
    message_text,
    messages_digest,
    prompt_tokens,
)
from pipeline.simulator.faults import BILLED_FAULTS, Fault, FaultPicker, FaultSpecError, find_marker
from pipeline.simulator.limits import Limits
from pipeline.simulator.replies import Dropped, Refusal, reset_connection, send_json, send_stream

API = "/api/v1"
_CATALOGUE_CREATED = 1_702_339_200  # a fixed date, so /models is byte-for-byte stable
_PENALTY_FAULTS = {Fault.HTTP_429, Fault.HTTP_503}
_REQUEST_PARAMETERS = (
    "temperature", "top_p", "top_k", "max_tokens", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "seed", "stop", "response_format", "reasoning", "logit_bias",
)  # fmt: skip


@dataclass(slots=True)
class _Request:
    """A chat request after parsing and validation."""

    raw: bytes
    body: dict[str, Any]
    key: str
    messages: list[Any]
    digest: str
    model: SimModel
    prompt_tokens: int
    max_tokens: int | None
    fault: Fault | None


class Simulator:
    """State shared by the handlers: configuration, ledger, counters and rate windows."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.closing = asyncio.Event()
        self.reset()

    def reset(self) -> None:
        self.picker = FaultPicker(self.config.fault_rates, self.config.seed)
        self.latency_rng = random.Random(self.config.seed + 1)
        self.ledger: list[Generation] = []
        self.generations: dict[str, Generation] = {}
        self.key_usage: defaultdict[str, float] = defaultdict(float)
        self.counters: Counter[str] = Counter()
        self.requests_log: deque[tuple[str, str, Any, bytes]] = deque(
            maxlen=self.config.request_log_size
        )
        self.arrivals: deque[float] = deque()
        self.first_request_at: float | None = None
        self.last_request_at: float | None = None
        self.max_per_second = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.limits = Limits()
        self.seen_prefixes: set[tuple[str, str]] = set()

    def reconfigure(self, changes: dict[str, Any]) -> None:
        self.config = self.config.updated(changes)
        if "fault_rates" in changes or "seed" in changes:
            self.picker = FaultPicker(self.config.fault_rates, self.config.seed)

    # ----------------------------------------------------------------------------- bookkeeping

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.counters["requests"],
            "by_status": {
                k.removeprefix("status:"): v
                for k, v in self.counters.items()
                if k.startswith("status:")
            },
            "faults": {
                k.removeprefix("fault:"): v
                for k, v in self.counters.items()
                if k.startswith("fault:")
            },
            "billed": len(self.ledger),
            "billed_cost": sum(g.cost for g in self.ledger),
            "billed_tokens": sum(g.prompt_tokens + g.completion_tokens for g in self.ledger),
            "max_requests_per_second": self.max_per_second,
            "max_in_flight": self.max_in_flight,
            "retry_after_violations": self.limits.retry_after_violations,
            "first_request_at": self.first_request_at,
            "last_request_at": self.last_request_at,
        }

    def _arrive(self, now: float) -> None:
        self.counters["requests"] += 1
        if self.first_request_at is None:
            self.first_request_at = now
        self.last_request_at = now
        arrivals = self.arrivals
        arrivals.append(now)
        while arrivals[0] <= now - 1.0:
            arrivals.popleft()
        self.max_per_second = max(self.max_per_second, len(arrivals))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _log_request(self, request: web.Request, raw: bytes) -> None:
        # Kept raw and formatted only when read: logging must stay cheap on the hot path.
        self.requests_log.append((request.method, request.path, request.headers, raw))

    def logged_requests(self) -> list[dict[str, Any]]:
        """The recent requests, with the key replaced by its label: this log must not hold a usable key."""
        entries = []
        for method, path, raw_headers, raw in self.requests_log:
            headers = dict(raw_headers)
            if "Authorization" in headers:
                token = headers["Authorization"].removeprefix("Bearer ").strip()
                headers["Authorization"] = f"Bearer {bodies.key_label(token)}"
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
            entries.append({"method": method, "path": path, "headers": headers, "body": body})
        return entries

    # ---------------------------------------------------------------------------------- routes

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(f"{API}/chat/completions", self.chat_completions)
        app.router.add_get(f"{API}/models", self.models)
        app.router.add_get(f"{API}/key", self.key)
        app.router.add_get(f"{API}/auth/key", self.key)
        app.router.add_get(f"{API}/credits", self.credits)
        app.router.add_get(f"{API}/generation", self.generation)
        app.router.add_get("/_sim/stats", self.sim_stats)
        app.router.add_get("/_sim/ledger", self.sim_ledger)
        app.router.add_get("/_sim/requests", self.sim_requests)
        app.router.add_post("/_sim/config", self.sim_config)
        app.router.add_post("/_sim/reset", self.sim_reset)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        self.closing.set()

    async def models(self, request: web.Request) -> web.Response:
        data = [model.to_json(_CATALOGUE_CREATED) for model in CATALOGUE]
        if self.config.native_n:
            for entry in data:
                entry["supported_parameters"].append("n")
        return web.json_response({"data": data, "links": {"next": None}, "total_count": len(data)})

    async def key(self, request: web.Request) -> web.Response:
        try:
            key = self._authenticate(request)
        except Refusal as refusal:
            return refusal.response
        info = bodies.key_info(
            bodies.key_label(key), self.config.credit_limit, self.key_usage[key],
            management=key in self.config.management_keys,
        )  # fmt: skip
        return web.json_response({"data": info})

    async def credits(self, request: web.Request) -> web.Response:
        try:
            key = self._authenticate(request)
        except Refusal as refusal:
            return refusal.response
        if key not in self.config.management_keys:
            return web.json_response(
                bodies.error(403, "Only management keys can fetch credits"), status=403
            )
        total = self.config.credit_limit if self.config.credit_limit is not None else 100.0
        return web.json_response(
            {"data": {"total_credits": total, "total_usage": sum(self.key_usage.values())}}
        )

    async def generation(self, request: web.Request) -> web.Response:
        try:
            self._authenticate(request)
        except Refusal as refusal:
            return refusal.response
        gen = self.generations.get(request.query.get("id", ""))
        finished = gen.created + gen.latency_ms / 1000 if gen else 0.0
        if gen is None or time.time() < finished + self.config.ready_after:
            return web.json_response(bodies.error(404, "Generation not found"), status=404)
        return web.json_response({"data": gen.record()})

    async def sim_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def sim_ledger(self, request: web.Request) -> web.Response:
        offset = int(request.query.get("offset", 0))
        entries = [g.ledger_entry() for g in self.ledger[offset:]]
        return web.json_response({"data": entries, "total_cost": sum(g.cost for g in self.ledger)})

    async def sim_requests(self, request: web.Request) -> web.Response:
        return web.json_response({"data": self.logged_requests()})

    async def sim_config(self, request: web.Request) -> web.Response:
        try:
            self.reconfigure(await request.json())
        except (FaultSpecError, TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True})

    async def sim_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    # ------------------------------------------------------------------------ chat completions

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        now = time.time()
        self._arrive(now)
        try:
            response = await self._chat(request, now)
        finally:
            self.in_flight -= 1
        return response

    async def _chat(self, request: web.Request, now: float) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self._log_request(request, raw)
        try:
            req = self._validate(request, raw, body, now)
            # Picked only once the request passed every check, so a request refused for its
            # own sake (a Retry-After penalty, say) does not use up a step of a marker schedule.
            texts = (message_text(m) for m in req.messages)
            req.fault = fault = self.picker.pick(
                request.headers.get("X-Sim-Fault"), find_marker(texts), req.digest
            )
            if fault is not None:
                self.counters[f"fault:{fault}"] += 1
                await self._pre_generation_fault(request, req, fault, now)
            return await self._answer(request, req, now)
        except Refusal as refusal:
            self.counters[f"status:{refusal.status}"] += 1
            return refusal.response
        except FaultSpecError as exc:
            self.counters["status:400"] += 1
            return web.json_response(
                bodies.invalid_request(f"simulator fault request: {exc}"), status=400
            )
        except Dropped:
            return web.Response()  # never reaches the client: the transport is gone

    def _authenticate(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        key = header.removeprefix("Bearer").strip() if header.startswith("Bearer") else ""
        if not key:
            raise Refusal(401, bodies.error(401, "No auth credentials found"))
        cfg = self.config
        if (cfg.api_keys is not None and key not in cfg.api_keys) or key in cfg.disabled_keys:
            raise Refusal(401, bodies.error(401, "User not found."))
        return key

    def _validate(self, request: web.Request, raw: bytes, body: Any, now: float) -> _Request:
        key = self._authenticate(request)
        if not isinstance(body, dict):
            raise Refusal(400, bodies.invalid_request("Request body must be a JSON object"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Refusal(
                400, bodies.invalid_request("messages: expected a non-empty array of chat messages")
            )
        texts = [message_text(m) for m in messages]
        digest = messages_digest(messages)
        model = self._route(body)
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise Refusal(400, bodies.invalid_request("max_tokens: expected a positive integer"))
        tokens = prompt_tokens(messages)
        req = _Request(raw, body, key, messages, digest, model, tokens, max_tokens, fault=None)
        self.limits.check(self.config, key, model, tokens, max_tokens, self.key_usage, now)
        if tokens + (max_tokens or 0) > model.context_length:
            raise Refusal(400, bodies.error(
                400,
                f"This endpoint's maximum context length is {model.context_length} tokens. However, you "
                f"requested about {tokens + (max_tokens or 0)} tokens ({tokens} of text input, "
                f"{max_tokens or 0} in the output). Please reduce the length of either one.",
                {"error_type": "context_length_exceeded", "provider_name": model.provider},
            ))  # fmt: skip
        flagged = next(
            (t for t in self.config.flagged_terms if any(t in text for text in texts)), None
        )
        if flagged is not None:
            raise Refusal(403, bodies.moderation(model, flagged))
        return req

    def _route(self, body: dict[str, Any]) -> SimModel:
        """The model that serves the request: the first of `model`, then `models`, that is up."""
        requested = body.get("model") or DEFAULT_MODEL
        fallbacks = body.get("models") or []
        candidates = (
            [requested, *(m for m in fallbacks if m != requested)]
            if body.get("model")
            else fallbacks or [requested]
        )
        wanted = [p for p in _REQUEST_PARAMETERS if p in body]
        strict = (
            isinstance(body.get("provider"), dict)
            and body["provider"].get("require_parameters") is True
        )
        last: Refusal | None = None
        for model_id in candidates:
            model = MODELS_BY_ID.get(model_id) if isinstance(model_id, str) else None
            if model is None:
                last = Refusal(400, bodies.error(
                    400, f"{model_id} is not a valid model ID",
                    {"error_type": "invalid_request"},
                    availability={"code": "model_not_found", "retryable": False, "requested_models": [model_id]},
                ))  # fmt: skip
            elif model_id in self.config.down_models:
                last = Refusal(502, bodies.error(
                    502, "Provider returned error",
                    {"error_type": "provider_unavailable", "provider_name": model.provider, "raw": "upstream connect error"},
                ))  # fmt: skip
            elif strict and (missing := [p for p in wanted if p not in model.supported_parameters]):
                last = Refusal(404, bodies.error(
                    404, f"No endpoints found that can handle the requested parameters: {', '.join(missing)}",
                    {"error_type": "not_found"},
                    availability={"code": "constraint_filtered", "retryable": False, "requested_models": [model_id]},
                ))  # fmt: skip
            else:
                return model
        assert last is not None
        raise last

    # ----------------------------------------------------------------------------------- faults

    async def _pre_generation_fault(
        self, request: web.Request, req: _Request, fault: Fault, now: float
    ) -> None:
        """Faults that happen before any answer exists: nothing is billed."""
        if fault is Fault.RESET:
            reset_connection(request)
            raise Dropped
        if fault is Fault.HANG:
            await self.hold()
            raise Refusal(504, bodies.error(504, "Gateway timeout", {"error_type": "timeout"}))
        status = _HTTP_FAULTS.get(fault)
        if status is None:
            return
        if fault is Fault.HTTP_402:
            raise Refusal(402, bodies.payment_required(bodies.OUT_OF_CREDITS))
        if fault is Fault.HTTP_403:
            raise Refusal(403, bodies.moderation(req.model, message_text(req.messages[-1])))
        headers: dict[str, str] = {}
        message, metadata = _FAULT_MESSAGES[fault]
        metadata = {**metadata, "provider_name": req.model.provider}
        extra: dict[str, Any] = {}
        if fault in _PENALTY_FAULTS:
            retry_after = self.config.retry_after
            headers = (
                bodies.rate_limit_headers(1, now + retry_after, retry_after)
                if fault is Fault.HTTP_429
                else {"Retry-After": str(max(0, int(-(-retry_after // 1))))}
            )
            if fault is Fault.HTTP_429:
                metadata["headers"] = dict(headers)
                metadata["raw"] = json.dumps(
                    {"error": {"message": "Too many requests", "type": "rate_limit"}}
                )
            else:
                extra["availability"] = {
                    "code": "temporarily_unavailable",
                    "retryable": True,
                    "retry_after": retry_after,
                }
            if self.config.enforce_retry_after and retry_after > 0:
                self.limits.penalise(req.key, now + retry_after)
        raise Refusal(status, bodies.error(status, message, metadata, **extra), headers)

    async def hold(self) -> None:
        """Keep a connection open until `hang_seconds` pass or the server shuts down."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), self.config.hang_seconds)

    # ----------------------------------------------------------------------------------- answer

    async def _answer(self, request: web.Request, req: _Request, now: float) -> web.StreamResponse:
        body, model, fault = req.body, req.model, req.fault
        rng = random.Random(_content_seed(model.id, req.digest, body))
        # With `native_n`, one answer per choice, each drawn on from the same generator.
        answers = [self._compose(req, rng) for _ in range(self._choices(body))]
        answer = answers[0]
        cached = self._cached_tokens(req)
        empty = fault is Fault.EMPTY
        errored = fault in (Fault.CHOICE_ERROR, Fault.ERROR_BODY)
        completion_tokens = 0 if empty else sum(a.completion_tokens for a in answers)
        total, prompt_part, completion_part = model.charges(
            req.prompt_tokens, completion_tokens, cached
        )
        if empty or errored:
            total, prompt_part, completion_part = 0.0, 0.0, 0.0  # zero-completion insurance
        delay = self.config.latency.sample(self.latency_rng, completion_tokens)
        gen = Generation(
            id=bodies.generation_id(now),
            request_hash=hashlib.blake2b(req.raw, digest_size=16).hexdigest(),
            messages_digest=req.digest,
            key_label=bodies.key_label(req.key),
            model=model.id,
            provider=model.provider,
            prompt_tokens=req.prompt_tokens,
            completion_tokens=completion_tokens,
            reasoning_tokens=0 if empty else sum(a.reasoning_tokens for a in answers),
            cached_tokens=cached,
            cost=total,
            prompt_cost=prompt_part,
            completion_cost=completion_part,
            finish_reason=None if empty else answer.finish_reason,
            native_finish_reason=None if empty else answer.native_finish_reason,
            created=now,
            latency_ms=round(delay * 1000, 3),
            streamed=bool(body.get("stream")),
            outcome=str(fault) if fault in BILLED_FAULTS else "ok",
            user=body.get("user") if isinstance(body.get("user"), str) else None,
            http_referer=request.headers.get("HTTP-Referer"),
        )
        self.generations[gen.id] = gen
        if not (empty or errored):
            self.ledger.append(gen)
            self.key_usage[req.key] += total
        if empty:
            answers = [Answer("", None, 0, 0, None, None)] * len(answers)
        if fault is Fault.SCHEMA_INVALID:
            answers[0] = Answer(
                '{"oops": ' + answer.content[:12], None, answer.completion_tokens, 0, "stop", "stop"
            )
        if gen.streamed:
            return await send_stream(request, self, gen, answers[0], fault, delay)
        return await send_json(request, self, gen, answers, fault, delay)

    def _choices(self, body: dict[str, Any]) -> int:
        """How many choices to answer with: `n` when the simulator honours it, else one."""
        n = body.get("n")
        if not self.config.native_n or isinstance(n, bool) or not isinstance(n, int):
            return 1
        return max(1, min(n, 128))

    def _compose(self, req: _Request, rng: random.Random) -> Answer:
        body, model = req.body, req.model
        fmt = body.get("response_format")
        fmt = (
            fmt if isinstance(fmt, dict) and "response_format" in model.supported_parameters else {}
        )
        schema = None
        if fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema") or {"type": "object"}
        stop = body.get("stop") or []
        words = self.config.completion_words
        return compose(
            digest=req.digest,
            rng=rng,
            words=words if words is not None else 8 + int(req.digest[:4], 16) % 24,
            max_tokens=req.max_tokens,
            stop=[stop] if isinstance(stop, str) else list(stop),
            reasoning_tokens=_reasoning_budget(model, body, req.digest),
            native_length_reason=model.native_length_reason,
            response_schema=schema,
            json_object=fmt.get("type") == "json_object",
        )

    def _cached_tokens(self, req: _Request) -> int:
        """Prompt caching: a system prompt this key already sent to a caching model is read from cache."""
        first = req.messages[0]
        if (
            req.model.cache_read_price is None
            or not isinstance(first, dict)
            or first.get("role") != "system"
        ):
            return 0
        prefix = (req.key, messages_digest(first))
        if prefix not in self.seen_prefixes:
            self.seen_prefixes.add(prefix)
            return 0
        return min(count_tokens(message_text(first)) + 4, req.prompt_tokens)


# ------------------------------------------------------------------------------------- helpers

_HTTP_FAULTS = {
    Fault.HTTP_402: 402, Fault.HTTP_403: 403, Fault.HTTP_408: 408, Fault.HTTP_429: 429,
    Fault.HTTP_500: 500, Fault.HTTP_502: 502, Fault.HTTP_503: 503, Fault.HTTP_524: 524, Fault.HTTP_529: 529,
}  # fmt: skip

_FAULT_MESSAGES: dict[Fault, tuple[str, dict[str, Any]]] = {
    Fault.HTTP_408: ("Request timed out", {"error_type": "timeout"}),
    Fault.HTTP_429: (
        "Provider returned error",
        {"error_type": "rate_limit_exceeded", "limit_source": "upstream_provider_shared_pool"},
    ),
    Fault.HTTP_500: ("Internal Server Error", {"error_type": "server"}),
    Fault.HTTP_502: (
        "Provider returned error",
        {
            "error_type": "provider_unavailable",
            "raw": "upstream connect error or disconnect/reset before headers",
        },
    ),
    Fault.HTTP_503: (
        "No instances available for this model right now",
        {"error_type": "provider_overloaded"},
    ),
    Fault.HTTP_524: ("Provider timed out", {"error_type": "timeout"}),
    Fault.HTTP_529: ("Provider overloaded", {"error_type": "provider_overloaded"}),
}


def _reasoning_budget(model: SimModel, body: dict[str, Any], digest: str) -> int:
    if not model.reasoning:
        return 0
    options = body.get("reasoning")
    if not isinstance(options, dict):
        options = {}
    if (
        options.get("enabled") is False
        or options.get("effort") == "none"
        or body.get("reasoning_effort") == "none"
    ):
        return 0
    budget = 16 + int(digest[4:8], 16) % 48
    limit = options.get("max_tokens")
    return min(budget, limit) if isinstance(limit, int) and limit > 0 else budget


def _content_seed(model_id: str, digest: str, body: dict[str, Any]) -> int:
    """Same model, messages, seed and temperature -> same answer."""
    key = f"{model_id}|{digest}|{body.get('seed')}|{body.get('temperature')}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
