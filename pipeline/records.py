"""The records that pass between stages: a `Row` to send and the `Result` that comes back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OK = "ok"
ERROR = "error"


@dataclass(slots=True)
class Row:
    """One input row, ready to send (or already known to fail: `error` set, nothing sent)."""

    position: int  # 0-based position in the input: the journal's key and the output order
    key: str  # the id column's value, else the position
    body: bytes | None  # the request body, serialised once
    estimated_tokens: int  # prompt estimate + max output, for the tokens-per-minute limit
    error: str | None = None  # why the row cannot be sent (null prompt, bad messages JSON)


@dataclass(slots=True)
class Result:
    """What happened to one row; one of these per row ends up in the journal and the output."""

    position: int
    key: str
    status: str  # "ok" | "error"
    completion: str | None = None
    finish_reason: str | None = None
    response_model: str | None = None
    provider: str | None = None
    generation_id: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None
    attempts: int = 0
    error_type: str | None = None
    error_message: str | None = None
    # A row that failed only because its retries ran out is sent again by the next run.
    retry_on_resume: bool = False

    def as_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in RESULT_FIELDS)


# Columns of the output, in order, after the input columns (names before any prefix).
RESULT_COLUMNS = (
    "completion", "finish_reason", "response_model", "provider", "generation_id",
    "prompt_tokens", "completion_tokens", "total_tokens", "reasoning_tokens", "cached_tokens",
    "cost_usd", "latency_ms", "attempts", "status", "error_type", "error_message",
)  # fmt: skip

RESULT_FIELDS = ("position", "key", *RESULT_COLUMNS, "retry_on_resume")
