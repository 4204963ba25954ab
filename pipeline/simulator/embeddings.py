"""`POST /embeddings`, as the spec describes it: `input` a string or a list of strings, every
vector deterministic in (model, text, dimensions) and of unit length, `usage.prompt_tokens`
counted as chat prompts are (a quarter of the characters), and the cost billed to the ledger at
the model's prompt price. `encoding_format = "base64"` sends each vector as base64 of its
little-endian float32s, as OpenAI's API does. Faults (`X-Sim-Fault`, `--fault-rate`) strike as
they do on chat requests, before anything is billed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
from array import array
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pipeline.simulator import bodies, chat
from pipeline.simulator.bodies import Generation
from pipeline.simulator.catalogue import MODELS_BY_ID, SimModel
from pipeline.simulator.content import count_tokens
from pipeline.simulator.faults import FaultSpecError
from pipeline.simulator.replies import Dropped, Refusal

if TYPE_CHECKING:
    from pipeline.simulator.server import Simulator

MAX_INPUTS = 2048  # inputs one request may carry, as OpenAI's embeddings API allows


async def embed(sim: Simulator, request: web.Request, now: float) -> web.StreamResponse:
    """Answer one embeddings request, counting its status in `sim.counters`."""
    raw = await request.read()
    sim.log_request(request, raw)
    try:
        key = sim.authenticate(request)
        body = _parsed(raw)
        model = _model(body)
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        dimensions = body.get("dimensions") or model.dimensions
        tokens = [count_tokens(text) for text in texts]
        for i, count in enumerate(tokens):
            if count > model.context_length:
                raise _invalid(
                    f"input[{i}] is {count} tokens, over this model's maximum context length of {model.context_length} tokens"
                )
        digest = hashlib.sha256(raw).hexdigest()[:16]
        sim.limits.check(sim.config, key, model, sum(tokens), 0, sim.key_usage, now)
        fault = sim.picker.pick(request.headers.get("X-Sim-Fault"), None, digest)
        if fault is not None:
            sim.counters[f"fault:{fault}"] += 1
            # As a chat request meets it; the faults that strike after generation do not apply.
            messages = [{"role": "user", "content": texts[0]}]
            asked = chat.ChatRequest(
                raw, body, key, messages, digest, model, sum(tokens), None, fault
            )
            await chat.pre_generation_fault(sim, request, asked, fault, now)
    except (Refusal, FaultSpecError, Dropped) as exc:
        return chat.refused(sim, exc, now)
    prompt_tokens = sum(tokens)
    cost, _, _ = model.charges(prompt_tokens, 0)
    gen = Generation(
        id=bodies.generation_id(now), request_hash=hashlib.blake2b(raw, digest_size=16).hexdigest(),
        messages_digest=digest, key_label=bodies.key_label(key), model=model.id,
        provider=model.provider, prompt_tokens=prompt_tokens, completion_tokens=0,
        reasoning_tokens=0, cached_tokens=0, cost=cost, prompt_cost=cost, completion_cost=0.0,
        finish_reason=None, native_finish_reason=None, created=now, latency_ms=0.0,
        streamed=False, outcome="ok",
    )  # fmt: skip
    sim.record(gen, key, billed=True)
    sim.counters["status:200"] += 1
    as_base64 = body.get("encoding_format") == "base64"
    data = [
        {"object": "embedding", "index": i, "embedding": _encoded(vector(model.id, text, dimensions), as_base64)}
        for i, text in enumerate(texts)
    ]  # fmt: skip
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "cost": cost}
    answer = {"id": gen.id, "object": "list", "model": model.id, "data": data, "usage": usage}
    return web.json_response(answer, headers={"X-Generation-Id": gen.id})


def vector(model: str, text: str, dimensions: int) -> list[float]:
    """The unit vector the simulated model gives `text`: the same every time."""
    seed = hashlib.blake2b(f"{model}|{dimensions}|{text}".encode(), digest_size=8).digest()
    rng = random.Random(seed)
    values = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _encoded(values: list[float], as_base64: bool) -> list[float] | str:
    if as_base64:
        return base64.b64encode(array("f", values).tobytes()).decode()
    return values


def _parsed(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise _invalid("Request body must be a JSON object")
    given = body.get("input")
    texts = [given] if isinstance(given, str) else given
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise _invalid(
            "input: expected a non-empty string or a non-empty array of non-empty strings"
        )
    if len(texts) > MAX_INPUTS:
        raise _invalid(f"input: at most {MAX_INPUTS} inputs per request, got {len(texts)}")
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise _invalid("dimensions: expected a positive integer")
    if body.get("encoding_format") not in (None, "float", "base64"):
        raise _invalid("encoding_format: expected float or base64")
    return body


def _model(body: dict[str, Any]) -> SimModel:
    name = body.get("model")
    model = MODELS_BY_ID.get(name) if isinstance(name, str) else None
    if model is None:
        raise _invalid(f"{body.get('model')} is not a valid model ID")
    if not model.dimensions:
        raise _invalid(f"{model.id} is not an embeddings model")
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions > model.dimensions:
        raise _invalid(f"dimensions: {model.id} gives at most {model.dimensions}")
    return model


def _invalid(message: str) -> Refusal:
    return Refusal(400, bodies.invalid_request(message))
