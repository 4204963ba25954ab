"""The records that pass between stages: a `Row` to send and the `Result` that comes back."""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any

OK = "ok"
ERROR = "error"
API, DUPLICATE, CACHE = "api", "duplicate", "cache"  # where an answer came from
SHARED = "shared"  # cost_source of the 2nd.. answers of a request with `n`: paid in the 1st


@dataclass(slots=True)
class Row:
    """One input row, ready to send (or already known to fail: `error` set, nothing sent)."""

    position: int  # 0-based position in the input: the journal's key and the output order
    key: str  # the id column's value, else the position
    body: bytes | None  # the request body, canonical JSON, serialised once
    model: str = ""
    prompt_tokens: int = 0  # estimated from the text
    output_tokens: int = 0  # max_tokens, or an assumption when unset
    request_hash: str = ""  # of the endpoint and the body: identical requests share it
    error: str | None = None  # why the row cannot be sent (null prompt, bad messages JSON)
    reuse: Result | None = None  # an earlier answer to the same request (journal or cache)
    # Answers for slots position .. position + samples - 1 at once (a request with `n`).
    samples: int = 1

    @property
    def estimated_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


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
    # "reported" (usage.cost) | "computed" (tokens x prices) | "reused" | "shared" | None
    cost_source: str | None = None
    response_source: str | None = None  # "api" | "duplicate" (of a row in this job) | "cache"
    latency_ms: float | None = None
    attempts: int = 0
    error_type: str | None = None
    error_message: str | None = None
    # A row that failed only because its retries ran out is sent again by the next run.
    retry_on_resume: bool = False
    request_hash: str | None = None
    parsed: str | None = None  # a structured answer, checked and canonical JSON (typed columns)

    def as_tuple(self) -> tuple[Any, ...]:
        return _result_values(self)

    @classmethod
    def from_tuple(cls, values: tuple[Any, ...]) -> Result:
        return cls(**dict(zip(RESULT_FIELDS, values, strict=True)))

    def reused_for(self, row: Row, source: str) -> Result:
        """This answer, given to another row that asked the same thing: no request, no cost."""
        return dataclasses.replace(
            self, position=row.position, key=row.key, cost_usd=0.0, cost_source="reused",
            response_source=source, latency_ms=0.0, attempts=0,
        )  # fmt: skip


# Columns of the output, in order, after the input columns (names before any prefix).
RESULT_COLUMNS = (
    "completion", "finish_reason", "response_model", "provider", "generation_id",
    "prompt_tokens", "completion_tokens", "total_tokens", "reasoning_tokens", "cached_tokens",
    "cost_usd", "cost_source", "response_source", "latency_ms", "attempts", "status", "error_type",
    "error_message",
)  # fmt: skip

# A result as the journal stores it and the output takes it, in this order.
RESULT_FIELDS = ("position", "key", *RESULT_COLUMNS, "retry_on_resume", "request_hash", "parsed")
_result_values = operator.attrgetter(*RESULT_FIELDS)  # one C call for a row of values
