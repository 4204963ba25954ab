"""Embeddings jobs (`request.endpoint = "embeddings"`): each row's prompt text is one input of a
`POST /embeddings` request that carries many rows' inputs at once.

The dispatcher hands rows to `EmbeddingAnswerer` one at a time, as it does to the chat
answerer, so the journal, the dedupe of identical inputs, the budget, the retries and resuming
all work as they do for chat rows. Rows wait here, per model, until `inputs_per_request` of them
are gathered (or a moment passes with no more coming); then one request asks for them all,
under the limits and the budget like one chat request, retried as a whole. Its cost and tokens
are shared among its rows in proportion to their estimated tokens, so the rows add up to what
was billed.

A vector is kept as its little-endian float32 bytes (the journal's `embedding` BLOB) and
becomes the output's `embedding` column of `list[float32]` (a fixed-size list when
`request.dimensions` says the size). Vectors are asked for as base64, which is those bytes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from array import array
from dataclasses import dataclass, replace
from typing import Any

from pipeline.attempt import ChatAnswerer
from pipeline.completions import Completion, parse_usage
from pipeline.errors import Kind, RetryableError
from pipeline.money import completion_cost
from pipeline.records import API, OK, Result, Row

LINGER = 0.005  # seconds rows wait for more to join a request that is not full
TOKENS_PER_REQUEST = 250_000  # a request's inputs stop growing here (OpenAI allows 300,000)


@dataclass(slots=True)
class Embedded:
    """An embeddings response: one vector (float32 bytes) per input, in input order."""

    vectors: list[bytes]
    completion: Completion  # its model, provider, id, tokens and cost, as a chat answer's


def parse_embeddings(data: dict[str, Any], generation_id: str | None, inputs: int) -> Embedded:
    """The vectors of a 200 body, or a `RetryableError` when it does not hold one per input."""
    items = data.get("data")
    if not isinstance(items, list) or len(items) != inputs:
        got = len(items) if isinstance(items, list) else "no"
        raise RetryableError(
            Kind.NO_CHOICES, f"the answer held {got} embeddings for {inputs} inputs", status=200,
            generation_id=data.get("id") or generation_id,
        )  # fmt: skip
    vectors: list[bytes | None] = [None] * inputs
    for place, item in enumerate(items):
        index = item.get("index", place) if isinstance(item, dict) else None
        value = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < inputs or vectors[index] is not None:
            raise RetryableError(
                Kind.INVALID_JSON, f"embedding {place} has no valid index", status=200
            )
        vectors[index] = _as_bytes(value, place)
    completion = parse_usage(data, generation_id)
    return Embedded([v for v in vectors if v is not None], completion)


def _as_bytes(value: Any, place: int) -> bytes:
    if isinstance(value, str):
        raw = base64.b64decode(value)
        if len(raw) % 4 == 0:
            return raw if sys.byteorder == "little" else _swapped(raw)
    elif isinstance(value, list) and all(isinstance(v, int | float) for v in value):
        return (
            array("f", value).tobytes()
            if sys.byteorder == "little"
            else _swapped(array("f", value).tobytes())
        )
    raise RetryableError(
        Kind.INVALID_JSON, f"embedding {place} is not a list of numbers", status=200
    )


def _swapped(raw: bytes) -> bytes:
    values = array("f", raw)
    values.byteswap()
    return values.tobytes()


class _Gathering:
    """Rows of one model waiting to be asked for together."""

    def __init__(self) -> None:
        self.rows: list[tuple[Row, asyncio.Future[Result]]] = []
        self.tokens = 0
        self.task: asyncio.Task[None] | None = None


class EmbeddingAnswerer(ChatAnswerer):
    """`answer(row)` for embeddings rows: rows gathered into requests of many inputs."""

    def __init__(self, *args: Any, inputs_per_request: int, params: bytes, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inputs_per_request = inputs_per_request
        self._params = params  # the job's parameters as a JSON object (`embedding_params`)
        self._open: dict[str, _Gathering] = {}
        self._weights: dict[int, list[int]] = {}  # by a request's first slot: its rows' tokens
        self._sending: set[asyncio.Task[None]] = set()

    async def _checked(
        self, row: Row, *, attempts: int = 0, invalid: int = 0, rejected: Result | None = None
    ) -> list[Result]:
        """This row's result, once the request it joins is answered. An input longer than
        the model takes fails alone, not the request it would have joined."""
        listing = self.catalogue.get(row.model) if self.catalogue is not None else None
        if (
            listing is not None
            and listing.context_length
            and row.prompt_tokens > listing.context_length
        ):
            row.error = (
                f"the text is about {row.prompt_tokens:,} tokens, over {row.model}'s "
                f"{listing.context_length:,}-token input limit"
            )
            return [Result.unsendable(row)]
        gathering = self._open.get(row.model)
        if gathering is None:
            gathering = self._open[row.model] = _Gathering()
            asyncio.get_running_loop().call_later(LINGER, self._close, row.model, gathering)
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        gathering.rows.append((row, future))
        gathering.tokens += row.prompt_tokens
        if len(gathering.rows) >= self.inputs_per_request or gathering.tokens >= TOKENS_PER_REQUEST:
            self._close(row.model, gathering)
        try:
            return [await asyncio.shield(future)]
        except asyncio.CancelledError:
            # The worker is being stopped: once no row of its request still waits, abandon it.
            if gathering.task is not None and all(
                f.done() or f is future for _, f in gathering.rows
            ):
                gathering.task.cancel()
            raise

    def _close(self, model: str, gathering: _Gathering) -> None:
        """Send the rows gathered (once: a full request closes before its timer fires)."""
        if self._open.get(model) is not gathering:
            return
        del self._open[model]
        gathering.task = asyncio.create_task(self._send(gathering))
        self._sending.add(gathering.task)
        gathering.task.add_done_callback(self._sending.discard)

    async def _send(self, gathering: _Gathering) -> None:
        rows = [row for row, _ in gathering.rows]
        futures = [future for _, future in gathering.rows]
        first = rows[0]
        inputs = b",".join(row.body or b'""' for row in rows)
        model = json.dumps(first.model).encode()
        body = b'{"input":[%s],"model":%s,%s' % (inputs, model, self._params[1:])
        request = Row(
            first.slot, first.key, body, first.model, gathering.tokens, 0, samples=len(rows)
        )
        self._weights[first.slot] = [row.prompt_tokens for row in rows]
        try:
            results = await self._retrying(request, 0, asyncio.get_running_loop().time())
        except BaseException as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(
                        exc if isinstance(exc, Exception) else asyncio.CancelledError()
                    )
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._weights.pop(first.slot, None)
        for row, future, result in zip(rows, futures, results, strict=True):
            if not future.done():
                future.set_result(
                    replace(
                        result,
                        position=row.slot,
                        key=row.key,
                        request_hash=row.request_hash,
                        digest=row.digest,
                    )
                )

    async def _call(self, row: Row) -> Any:
        assert row.body is not None
        data, generation_id = await self.client.post_json("/embeddings", row.body)
        return parse_embeddings(data, generation_id, row.samples)

    async def _reserve(self, row: Row) -> float:
        assert self.reservations is not None
        return await self.reservations.reserve(row.model, row.prompt_tokens, 0, 1)

    def _outcome(self, response: Any) -> Completion:
        return response.completion  # type: ignore[no-any-return]

    def _results(
        self, row: Row, response: Any, attempt: int, latency_ms: float, cost: float | None,
        source: str | None,
    ) -> list[Result]:  # fmt: skip
        weights = self._weights.get(row.slot) or [1] * row.samples
        return shared(row, response, weights, attempt, latency_ms, cost, source)

    def _priced(self, row: Row, response: Any) -> tuple[float | None, str | None]:
        return completion_cost(response.completion, self.catalogue, row.model)


def shared(
    request: Row, embedded: Embedded, weights: list[int], attempts: int, latency_ms: float,
    cost: float | None, source: str | None,
) -> list[Result]:  # fmt: skip
    """One result per input, the request's tokens and cost shared among them by their
    estimated tokens (the last takes what rounding leaves, so they add up to the bill)."""
    c = embedded.completion
    tokens, whole = c.prompt_tokens, sum(weights) or 1
    results = []
    given_tokens, given_cost = 0, 0.0
    for i, vector in enumerate(embedded.vectors):
        share, last = weights[i] / whole, i == len(weights) - 1
        row_tokens = row_cost = None
        if tokens is not None:
            row_tokens = tokens - given_tokens if last else round(tokens * share)
            given_tokens += row_tokens
        if cost is not None:
            row_cost = cost - given_cost if last else cost * share
            given_cost += row_cost
        results.append(Result(
            request.slot + i, request.key, None, None, c.model, c.provider, c.generation_id,
            row_tokens, 0, row_tokens, None, None, None, row_cost, source, API,
            round(latency_ms, 3), attempts, OK, embedding=vector,
        ))  # fmt: skip
    return results
