"""How an answer goes back on the wire: refusals, the JSON reply and its slow or broken variants,
and the stream of server-sent events.

The writers get an answer that is already composed and billed (`chat.py`); all that is left is
the wire format and, for the faults that strike after generation (`stall`, `mid_body`,
`invalid_json`, `choice_error`, `error_body`), how the bytes go wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pipeline.simulator import bodies
from pipeline.simulator.bodies import Generation
from pipeline.simulator.content import Answer
from pipeline.simulator.faults import Fault

if TYPE_CHECKING:
    from pipeline.simulator.server import Simulator

_JSON = "application/json"
# OpenRouter's SSE comment while a model is queued or thinking; clients must skip it.
_PROCESSING = b": OPENROUTER PROCESSING\n\n"


class Refusal(Exception):
    """Ends a request early with an error response (status, body and headers)."""

    def __init__(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        self.response = web.json_response(body, status=status, headers=headers)
        self.status = status


class Dropped(Exception):
    """The connection was reset on purpose; there is nothing to send."""


def reset_connection(request: web.Request) -> None:
    """Drop the TCP connection with a reset (SO_LINGER 0), as a crashed upstream would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


# ------------------------------------------------------------------------------- plain JSON


async def send_json(
    request: web.Request,
    sim: Simulator,
    gen: Generation,
    answers: list[Answer],
    fault: Fault | None,
    delay: float,
) -> web.StreamResponse:
    """The `chat.completion` body after `delay`: at once in one piece, or, when keep-alive
    newlines must precede it or a `stall`/`mid_body` fault cuts it, written as a stream."""
    headers = {"X-Generation-Id": gen.id}
    answer = answers[0]
    if fault is Fault.ERROR_BODY:
        code = random.Random(gen.id).choice((429, 502, 500))
        payload = bodies.error(
            code,
            "Provider returned error",
            {"provider_name": gen.provider, "raw": "error code: 1015"},
        )
    else:
        payload = bodies.completion(gen, answers)
        if sim.config.omit_cost:
            for name in ("cost", "cost_details", "is_byok"):
                payload["usage"].pop(name)
        if fault is Fault.CHOICE_ERROR:
            choice = payload["choices"][0]
            choice["message"]["content"] = answer.content[: len(answer.content) // 2]
            choice["finish_reason"] = choice["native_finish_reason"] = "error"
            choice["error"] = {
                "code": 502,
                "message": "Upstream provider error mid-generation",
                "metadata": {"error_type": "provider_unavailable"},
            }
    data = json.dumps(payload).encode()

    keepalive = sim.config.keepalive_interval
    if fault is Fault.STALL or fault is Fault.MID_BODY or (keepalive and delay > keepalive):
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = _JSON
        if fault is Fault.MID_BODY:
            # The full length is promised, so the client can tell the body was cut short.
            response.content_length = len(data)
        await response.prepare(request)
        await _wait(delay, response, keepalive)
        if fault is Fault.STALL:
            await sim.hold()
            reset_connection(request)
            return response
        if fault is Fault.MID_BODY:
            await response.write(data[: len(data) // 2])
            reset_connection(request)
            return response
        await response.write(data)
        await response.write_eof()
        sim.counters["status:200"] += 1
        return response

    if delay > 0:
        await asyncio.sleep(delay)
    if fault is Fault.INVALID_JSON:
        data = data[: len(data) // 2]
    sim.counters["status:200"] += 1
    return web.Response(body=data, content_type=_JSON, headers=headers)


async def _wait(
    delay: float,
    response: web.StreamResponse,
    keepalive: float | None,
    beat: bytes = b"\n",
) -> None:
    """Sleep `delay`, writing `beat` every `keepalive` seconds to keep the connection open."""
    if not keepalive:
        await asyncio.sleep(delay)
        return
    deadline = time.monotonic() + delay
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(left, keepalive))
        if deadline - time.monotonic() > 0:
            await response.write(beat)


# ------------------------------------------------------------------------------- SSE stream


async def send_stream(
    request: web.Request,
    sim: Simulator,
    gen: Generation,
    answer: Answer,
    fault: Fault | None,
    delay: float,
) -> web.StreamResponse:
    """`stream: true`: processing comments until the answer is ready, then a role chunk, the
    reasoning, the content four words a chunk, the finish reason, usage and `[DONE]`."""
    response = web.StreamResponse(
        status=200, headers={"X-Generation-Id": gen.id, "Cache-Control": "no-cache"}
    )
    response.content_type = "text/event-stream"
    await response.prepare(request)
    await response.write(_PROCESSING)
    await _wait(delay, response, sim.config.keepalive_interval or 1.0, _PROCESSING)

    words = answer.content.split(" ") if answer.content else []
    pieces = [
        " ".join(words[i : i + 4]) + (" " if i + 4 < len(words) else "")
        for i in range(0, len(words), 4)
    ]
    await response.write(_delta(gen, {"role": "assistant", "content": ""}))
    if answer.reasoning:
        await response.write(_delta(gen, {"reasoning": answer.reasoning}))
    # These faults strike while the answer is under way: only its first half is sent.
    cut = (
        len(pieces) // 2
        if fault in (Fault.MID_BODY, Fault.CHOICE_ERROR, Fault.ERROR_BODY)
        else len(pieces)
    )
    for piece in pieces[:cut]:
        await response.write(_delta(gen, {"content": piece}))
    if fault is Fault.MID_BODY or fault is Fault.STALL or fault is Fault.INVALID_JSON:
        if fault is Fault.STALL:
            await sim.hold()
        else:
            await response.write(b'data: {"id": "' + gen.id.encode())
        reset_connection(request)
        return response
    if fault in (Fault.CHOICE_ERROR, Fault.ERROR_BODY):
        error = {
            "code": 502,
            "message": "Provider disconnected mid-stream",
            "metadata": {"error_type": "provider_unavailable"},
        }
        await response.write(
            _event(
                bodies.chunk(
                    gen,
                    [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
                    error=error,
                )
            )
        )
        await response.write_eof()
        sim.counters["status:200"] += 1
        return response
    final = {
        "index": 0,
        "delta": {},
        "finish_reason": answer.finish_reason,
        "native_finish_reason": answer.native_finish_reason,
    }
    await response.write(_event(bodies.chunk(gen, [final])))
    await response.write(_event(bodies.chunk(gen, [], usage=gen.usage())))
    await response.write(_event(b"[DONE]"))
    await response.write_eof()
    sim.counters["status:200"] += 1
    return response


def _delta(gen: Generation, delta: dict[str, Any]) -> bytes:
    """The event of a chunk whose one choice carries `delta` and no finish reason yet."""
    return _event(bodies.chunk(gen, [{"index": 0, "delta": delta, "finish_reason": None}]))


def _event(payload: Any) -> bytes:
    """One server-sent event: `data: ` and the payload (JSON unless already bytes)."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return b"data: " + data + b"\n\n"
