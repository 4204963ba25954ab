"""One `POST /chat/completions`, from the request's bytes to the billed answer.

In the order a request meets them: parse and log it; check the key, the body and `max_tokens`;
route it to the first model of `model`/`models` that is up and can honour it; the limits
(`limits.py`); the context length and moderation. Only then is a fault picked, and the faults
that strike before generation (HTTP errors, reset, hang) end the request here. Otherwise the
answer is composed (`content.py`), billed to the ledger and handed to a writer (`replies.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pipeline.simulator import bodies, parts
from pipeline.simulator.bodies import Generation
from pipeline.simulator.catalogue import DEFAULT_MODEL, MODELS_BY_ID, SimModel
from pipeline.simulator.config import SimConfig
from pipeline.simulator.content import (
    Answer,
    compose,
    message_text,
    messages_digest,
    prompt_tokens,
)
from pipeline.simulator.faults import BILLED_FAULTS, Fault, FaultSpecError, find_marker
from pipeline.simulator.replies import Dropped, Refusal, reset_connection, send_json, send_stream

if TYPE_CHECKING:
    from pipeline.simulator.server import Simulator

# Parameters `provider.require_parameters` holds a model to: it must list each one it is sent.
_REQUEST_PARAMETERS = (
    "temperature", "top_p", "top_k", "max_tokens", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "seed", "stop", "response_format", "reasoning", "logit_bias",
    "tools", "tool_choice", "logprobs", "top_logprobs",
)  # fmt: skip
_HTTP_FAULTS = {
    Fault.HTTP_402: 402, Fault.HTTP_403: 403, Fault.HTTP_408: 408, Fault.HTTP_429: 429,
    Fault.HTTP_500: 500, Fault.HTTP_502: 502, Fault.HTTP_503: 503, Fault.HTTP_524: 524, Fault.HTTP_529: 529,
}  # fmt: skip
# The faults that ask the client to wait (Retry-After). Only that one request is refused: an
# upstream fault holds back no other request of the key (the rate limit does, `limits.py`).
_RETRY_AFTER_FAULTS = {Fault.HTTP_429, Fault.HTTP_503}
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


@dataclass(slots=True)
class ChatRequest:
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
    images: int = 0  # image parts, billed at the model's per-image price


async def complete(sim: Simulator, request: web.Request, now: float) -> web.StreamResponse:
    """Answer one chat request that arrived at `now`, counting its status in `sim.counters`."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    sim.log_request(request, raw)
    try:
        req = _validate(sim, request, raw, body, now)
        # Picked only once the request passed every check, so a request refused for its
        # own sake (the rate limit, say) does not use up a step of a marker schedule.
        texts = (message_text(m) for m in req.messages)
        req.fault = fault = sim.picker.pick(
            request.headers.get("X-Sim-Fault"), find_marker(texts), req.digest
        )
        if fault is not None:
            sim.counters[f"fault:{fault}"] += 1
            await pre_generation_fault(sim, request, req, fault, now)
        return await _answer(sim, request, req, now)
    except (Refusal, FaultSpecError, Dropped) as exc:
        return refused(sim, exc, now)


def refused(sim: Simulator, exc: Exception, now: float) -> web.Response:
    """The answer to a request turned away (`Refusal`), with a bad fault marker, or dropped,
    counted by status (a 429 by the second it came in)."""
    if isinstance(exc, Dropped):
        return web.Response()  # never reaches the client: the transport is gone
    if isinstance(exc, FaultSpecError):
        exc = Refusal(400, bodies.invalid_request(f"simulator fault request: {exc}"))
    assert isinstance(exc, Refusal)
    sim.counters[f"status:{exc.status}"] += 1
    if exc.status == 429:
        sim.refused_by_second[int(now)] += 1
    return exc.response


# ------------------------------------------------------------------------------- validation


def _validate(
    sim: Simulator, request: web.Request, raw: bytes, body: Any, now: float
) -> ChatRequest:
    key = sim.authenticate(request)
    if not isinstance(body, dict):
        raise Refusal(400, bodies.invalid_request("Request body must be a JSON object"))
    if sim.config.strict_openai and (unknown := sorted(set(body) - bodies.OPENAI_CHAT_FIELDS)):
        raise Refusal(400, bodies.unrecognized_argument(unknown[0]))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Refusal(
            400, bodies.invalid_request("messages: expected a non-empty array of chat messages")
        )
    texts = [message_text(m) for m in messages]
    digest = messages_digest(messages)
    try:
        images, files = parts.attached(messages)
    except ValueError as exc:
        raise Refusal(400, bodies.invalid_request(str(exc))) from None
    model = _route(sim.config, body)
    for kind, count in (("image", images), ("file", files)):
        if count and kind not in model.input_modalities:
            raise Refusal(404, bodies.error(
                404, f"No endpoints found that support {kind} input",
                {"error_type": "not_found", "provider_name": model.provider},
            ))  # fmt: skip
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise Refusal(400, bodies.invalid_request("max_tokens: expected a positive integer"))
    tokens = prompt_tokens(messages)
    req = ChatRequest(
        raw, body, key, messages, digest, model, tokens, max_tokens, fault=None, images=images
    )
    sim.limits.check(sim.config, key, model, tokens, max_tokens, sim.key_usage, now)
    if tokens + (max_tokens or 0) > model.context_length:
        raise Refusal(400, bodies.error(
            400,
            f"This endpoint's maximum context length is {model.context_length} tokens. However, you "
            f"requested about {tokens + (max_tokens or 0)} tokens ({tokens} of text input, "
            f"{max_tokens or 0} in the output). Please reduce the length of either one.",
            {"error_type": "context_length_exceeded", "provider_name": model.provider},
        ))  # fmt: skip
    flagged = next((t for t in sim.config.flagged_terms if any(t in text for text in texts)), None)
    if flagged is not None:
        raise Refusal(403, bodies.moderation(model, flagged))
    return req


def _route(config: SimConfig, body: dict[str, Any]) -> SimModel:
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
        elif model.dimensions:
            last = Refusal(400, bodies.error(
                400, f"{model_id} is an embeddings model: send its requests to /embeddings",
                {"error_type": "invalid_request"},
            ))  # fmt: skip
        elif model_id in config.down_models:
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


async def pre_generation_fault(
    sim: Simulator, request: web.Request, req: ChatRequest, fault: Fault, now: float
) -> None:
    """Faults that happen before any answer exists: nothing is billed."""
    if fault is Fault.RESET:
        reset_connection(request)
        raise Dropped
    if fault is Fault.HANG:
        await sim.hold()
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
    if fault in _RETRY_AFTER_FAULTS:
        retry_after = sim.config.retry_after
        # Whole seconds, rounded up. An upstream 429 has no X-RateLimit-* headers: those are
        # OpenRouter's own limits' (`limits.py`); it names the provider and its raw error.
        headers = {"Retry-After": str(max(0, int(-(-retry_after // 1))))}
        if fault is Fault.HTTP_429:
            metadata["provider_code"] = "429"
            metadata["raw"] = json.dumps(
                {"error": {"message": "Too many requests", "type": "rate_limit"}}
            )
        else:
            extra["availability"] = {
                "code": "temporarily_unavailable",
                "retryable": True,
                "retry_after": retry_after,
            }
    raise Refusal(status, bodies.error(status, message, metadata, **extra), headers)


# ----------------------------------------------------------------------------------- answer


async def _answer(
    sim: Simulator, request: web.Request, req: ChatRequest, now: float
) -> web.StreamResponse:
    body, model, fault = req.body, req.model, req.fault
    rng = random.Random(_content_seed(model.id, req.digest, body))
    # With `native_n`, one answer per choice, each drawn on from the same generator.
    answers = [_compose(sim.config, req, rng) for _ in range(_choices(sim.config, body))]
    answer = answers[0]
    session = body.get("session_id")
    if not isinstance(session, str):
        session = request.headers.get("x-session-id")
    cache = sim.prompt_cache.serve(req.key, model, body, session, now)
    empty = fault is Fault.EMPTY
    errored = fault in (Fault.CHOICE_ERROR, Fault.ERROR_BODY)
    completion_tokens = 0 if empty else sum(a.completion_tokens for a in answers)
    total, prompt_part, completion_part = model.charges(
        req.prompt_tokens, completion_tokens, cache.cached_tokens, cache.written_tokens
    )
    if req.images:  # OpenRouter's `image` price: per input image, billed with the prompt
        extra = float(req.images * model.image_price)
        total, prompt_part = total + extra, prompt_part + extra
    if empty or errored:
        total, prompt_part, completion_part = 0.0, 0.0, 0.0  # zero-completion insurance
    delay = sim.config.latency.sample(sim.latency_rng, completion_tokens)
    gen = Generation(
        id=bodies.generation_id(now),
        request_hash=hashlib.blake2b(req.raw, digest_size=16).hexdigest(),
        messages_digest=req.digest,
        key_label=bodies.key_label(req.key),
        model=model.id,
        provider=cache.provider,
        prompt_tokens=req.prompt_tokens,
        completion_tokens=completion_tokens,
        reasoning_tokens=0 if empty else sum(a.reasoning_tokens for a in answers),
        cached_tokens=cache.cached_tokens,
        # Reported only by models that price cache writes (OAS `ChatUsage`).
        cache_write_tokens=cache.written_tokens if model.cache_write_price is not None else None,
        uncached_cost=model.charges(req.prompt_tokens, completion_tokens)[0],
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
    sim.record(gen, req.key, billed=not (empty or errored))
    if empty:
        answers = [Answer("", None, 0, 0, None, None)] * len(answers)
    if fault is Fault.SCHEMA_INVALID:
        answers[0] = Answer(
            '{"oops": ' + answer.content[:12], None, answer.completion_tokens, 0, "stop", "stop"
        )
    if gen.streamed:
        return await send_stream(request, sim, gen, answers[0], fault, delay)
    return await send_json(request, sim, gen, answers, fault, delay)


def _choices(config: SimConfig, body: dict[str, Any]) -> int:
    """How many choices to answer with: `n` when the simulator honours it, else one."""
    n = body.get("n")
    if not config.native_n or isinstance(n, bool) or not isinstance(n, int):
        return 1
    return max(1, min(n, 128))


def _compose(config: SimConfig, req: ChatRequest, rng: random.Random) -> Answer:
    body, model = req.body, req.model
    fmt = body.get("response_format")
    fmt = fmt if isinstance(fmt, dict) and "response_format" in model.supported_parameters else {}
    schema = None
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {"type": "object"}
    stop = body.get("stop") or []
    words = config.completion_words
    answer = compose(
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
    if "tools" in model.supported_parameters:
        answer = parts.tool_answer(body, req.digest, rng, answer) or answer
    if body.get("logprobs") is True and "logprobs" in model.supported_parameters:
        top = body.get("top_logprobs")
        top = top if isinstance(top, int) and not isinstance(top, bool) else 0
        found = parts.logprobs(answer.content, schema, req.digest, top)
        answer = dataclasses.replace(answer, logprobs=found)
    return answer


def _reasoning_budget(model: SimModel, body: dict[str, Any], digest: str) -> int:
    """Reasoning tokens a reasoning model spends: 16-63 by the digest, unless turned off or capped."""
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


# ------------------------------------------------------------------------------ batch lines


def answer_line(
    sim: Simulator, key: str, model: SimModel, priced: SimModel, body: dict[str, Any],
    now: float, fault: Fault | None,
) -> tuple[Generation, dict[str, Any]]:  # fmt: skip
    """One line of a batch, answered as a chat request to `model` would be, billed at the
    prices of `priced` (the model's batch row): its generation and `chat.completion` body."""
    messages = body["messages"]
    raw = json.dumps(body).encode()
    digest = messages_digest(messages)
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    req = ChatRequest(
        raw, body, key, messages, digest, model, prompt_tokens(messages), max_tokens, fault
    )
    answer = _compose(sim.config, req, random.Random(_content_seed(model.id, digest, body)))
    if fault is Fault.EMPTY:
        answer = Answer("", None, 0, 0, None, None)
    elif fault is Fault.SCHEMA_INVALID:
        answer = Answer(
            '{"oops": ' + answer.content[:12], None, answer.completion_tokens, 0, "stop", "stop"
        )
    total, prompt_part, completion_part = priced.charges(
        req.prompt_tokens, answer.completion_tokens
    )
    gen = Generation(
        id=bodies.generation_id(now, batch=True),
        request_hash=hashlib.blake2b(raw, digest_size=16).hexdigest(),
        messages_digest=digest,
        key_label=bodies.key_label(key),
        model=model.id,
        provider=model.provider,
        prompt_tokens=req.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        reasoning_tokens=answer.reasoning_tokens,
        cached_tokens=0,
        cost=total,
        prompt_cost=prompt_part,
        completion_cost=completion_part,
        finish_reason=answer.finish_reason,
        native_finish_reason=answer.native_finish_reason,
        created=now,
        latency_ms=0.0,
        streamed=False,
        outcome="ok",
        user=body.get("user") if isinstance(body.get("user"), str) else None,
    )
    return gen, bodies.completion(gen, [answer])
