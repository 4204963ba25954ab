"""OpenRouter's Batch API, one call at a time: submit a batch, read one, list those created since
a moment, and read a result row as the `Completion` a chat request would have given. What a
status means for the job, and what to do about an answer, is the caller's (`batch_mode`).

A create that may have reached the server but whose answer did not come back is `Ambiguous`:
there is no idempotency key, so it must be looked for in the list, never blindly sent again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.completions import RETRYABLE_STATUSES, Completion, parse_completion
from pipeline.errors import (
    AuthError,
    CreditsError,
    JobStopped,
    PipelineError,
    RequestError,
    Unreachable,
)
from pipeline.json_stream import loads_with

if TYPE_CHECKING:
    from pipeline.client import OpenRouterClient

FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
CHAT_ENDPOINT = "/v1/chat/completions"
# The chat API's transient statuses, less 409 (the Batch API's "not final yet", for a delete)
# and 425 (a chat-side early-data refusal).
_RETRY = RETRYABLE_STATUSES - {409, 425}


class BatchError(PipelineError):
    """A Batch API call failed; `retry`: whether the same call may simply be made again."""

    def __init__(self, message: str, status: int, *, retry: bool) -> None:
        super().__init__(message)
        self.status = status
        self.retry = retry


class NoBatchEndpoint(BatchError):
    """The model has no `:batch` endpoint (whatever the catalogue says): send it in sync mode."""


class Ambiguous(BatchError):
    """The create may have been accepted: a timeout, a dropped connection or a 5xx after the
    body was sent."""


@dataclass(frozen=True, slots=True)
class BatchState:
    """A batch as the server reports it."""

    id: str
    status: str
    created_at: float
    model: str | None
    total: int
    completed: int
    failed: int
    expires_at: float | None
    provider: str | None
    cost: float | None  # `usage.cost` once final: what OpenRouter charges for the batch
    results: list[dict[str, Any]] | None
    error: str | None

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @classmethod
    def from_json(cls, data: Any) -> BatchState:
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise BatchError("the Batch API answered without a batch object", 200, retry=True)
        counts, usage, error = (
            _dict(data.get(name)) for name in ("request_counts", "usage", "error")
        )
        cost = usage.get("cost")
        results = data.get("results")
        return cls(
            id=data["id"],
            status=str(data.get("status") or "unknown"),
            created_at=_number(data.get("created_at")) or 0.0,
            model=data.get("model") if isinstance(data.get("model"), str) else None,
            total=int(_number(counts.get("total")) or 0),
            completed=int(_number(counts.get("completed")) or 0),
            failed=int(_number(counts.get("failed")) or 0),
            expires_at=_number(data.get("expires_at")),
            provider=data.get("provider") if isinstance(data.get("provider"), str) else None,
            cost=float(cost)
            if isinstance(cost, int | float) and not isinstance(cost, bool)
            else None,
            results=results if isinstance(results, list) else None,
            error=error.get("message") if isinstance(error.get("message"), str) else None,
        )


@dataclass(frozen=True, slots=True)
class LineResult:
    """One result row: the answer (as a chat request's), or why the line failed."""

    custom_id: str
    completion: Completion | None
    error_type: str | None
    error_message: str | None


def submission(
    model: str, lines: list[tuple[str, bytes]], provider_only: list[str] | None = None
) -> bytes:
    """The create body, each line's body embedded as the bytes it was built as. The server
    parses it as a stream: `endpoint` and `model` (and `provider`, `completion_window`) must
    come before `requests`."""
    head: dict[str, Any] = {"endpoint": CHAT_ENDPOINT, "model": model, "completion_window": "24h"}
    if provider_only:
        head["provider"] = {"only": provider_only}
    parts = [json.dumps(head)[:-1].encode(), b', "requests": [']
    parts.append(
        b", ".join(
            b'{"custom_id": %s, "body": %s}' % (json.dumps(cid).encode(), body)
            for cid, body in lines
        )
    )
    parts.append(b"]}")
    return b"".join(parts)


class BatchAPI:
    """The Batch API at `base_url` (`…/api/v1` or `…/api/beta`), through the job's client."""

    def __init__(self, client: OpenRouterClient, base_url: str) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")

    async def create(self, body: bytes) -> BatchState:
        try:
            status, data = await self.client.fetch_json("/batches", post=body, base=self.base_url)
        except Unreachable as exc:
            if exc.connected:
                raise Ambiguous(f"submitting a batch: {exc.cause}", 0, retry=False) from None
            raise BatchError(f"submitting a batch: {exc.cause}", 0, retry=True) from None
        if status in (200, 201, 202):
            return BatchState.from_json(data)
        message = _message(data, status)
        if status >= 500:
            raise Ambiguous(f"submitting a batch: {message}", status, retry=False)
        if status == 400 and ":batch endpoint" in message:
            raise NoBatchEndpoint(message, status, retry=False)
        raise _refusal(f"submitting a batch: {message}", status)

    async def get(self, batch_id: str) -> BatchState:
        """The batch now. A 402 (results withheld until credits are added) stops the job; a
        404 is `BatchError(status=404)`: right after a create it may only mean "not yet"."""
        status, data = await self._get(f"/batches/{batch_id}", decode=_with_line_results)
        if status == 200:
            return BatchState.from_json(data)
        raise _refusal(f"reading batch {batch_id}: {_message(data, status)}", status)

    async def created_since(self, moment: float) -> list[BatchState]:
        """Every batch created after `moment` (unix seconds), newest first, page by page."""
        found: list[BatchState] = []
        after: str | None = None
        while True:
            params = {"limit": "100", "created_after": str(int(moment) - 1)}
            if after:
                params["after"] = after
            status, data = await self._get("/batches", params)
            if status != 200:
                raise _refusal(f"listing batches: {_message(data, status)}", status)
            page = [BatchState.from_json(item) for item in data.get("data") or []]
            found += [b for b in page if b.created_at >= int(moment)]
            if not data.get("has_more") or not page:
                return found
            after = page[-1].id

    async def _get(
        self, path: str, params: dict[str, str] | None = None,
        decode: Callable[[bytes], Any] = json.loads,
    ) -> tuple[int, Any]:  # fmt: skip
        try:
            return await self.client.fetch_json(
                path, params=params, base=self.base_url, decode=decode
            )
        except Unreachable as exc:
            raise BatchError(f"{path}: {exc.cause}", 0, retry=True) from None


def _with_line_results(raw: bytes) -> Any:
    """A batch object whose results are decoded a line at a time (`line_result`): a big
    batch's results as parsed JSON would be most of a batch run's peak memory."""
    return loads_with(raw, "results", line_result)


def line_results(rows: list[Any]) -> dict[str, LineResult]:
    """The result rows (as JSON, or already `line_result`'s) by custom_id."""
    found: dict[str, LineResult] = {}
    for row in rows:
        line = row if isinstance(row, LineResult) else line_result(row)
        if line is not None:
            found[line.custom_id] = line
    return found


def line_result(row: Any) -> LineResult | None:
    """A result row decoded on its own: one that cannot be read is a failed line, not a
    failed batch; None for a row without a custom_id (it answers no line)."""
    custom_id = row.get("custom_id") if isinstance(row, dict) else None
    if not isinstance(custom_id, str):
        return None
    response, error = _dict(row.get("response")), row.get("error")
    body, code = response.get("body"), response.get("status_code", 200 if response else None)
    if (
        not isinstance(error, dict)
        and isinstance(body, dict)
        and isinstance(code, int)
        and code < 400
    ):
        try:
            return LineResult(custom_id, parse_completion(body, body.get("id")), None, None)
        except (RequestError, JobStopped) as exc:
            error = {"type": "invalid_response", "message": str(exc)}
    error = error or {"type": "unknown", "message": f"result row without an answer (status {code})"}
    return LineResult(
        custom_id, None, str(error.get("type") or "unknown"), str(error.get("message") or "")
    )


def _refusal(message: str, status: int) -> BatchError:
    """The error for a refused call; the key's own failures stop the job."""
    if status == 401:
        raise AuthError(f"{message}: check OPENROUTER_API_KEY")
    if status == 402:
        raise CreditsError(f"{message}: add credits, then run again (nothing is sent twice)")
    return BatchError(message, status, retry=status in _RETRY or status == 0)


def _message(data: Any, status: int) -> str:
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return f"HTTP {status}: {message}" if message else f"HTTP {status}"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
