"""The records that pass between stages: a `Row` to send, the `Result` that comes back, the
`Slots` that place results in the output, and the job's `Totals`.

`Result` is the one declaration of the result schema: its fields, in order, are the journal's
columns and (those marked as output columns) the output's result columns, each with its Arrow
type; the journal's SQL types follow from the Arrow ones.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import Kind

OK = "ok"
ERROR = "error"
API, DUPLICATE, CACHE = "api", "duplicate", "cache"  # where an answer came from
SHARED = "shared"  # cost_source of the 2nd.. answers of a request with `n`: paid in the 1st
REUSED = "reused"  # cost_source of an answer given to another row that asked the same thing
ABANDONED = "abandoned-"  # the id prefix of a lost attempt abandoned before any generation id


@dataclass(slots=True)
class Row:
    """One request to send for one or more slots (or a row already known to fail: `error` set,
    nothing sent)."""

    slot: int  # the first output slot this request answers (see Slots)
    key: str  # the id column's value, else the input position
    body: bytes | None  # the request body, canonical JSON, serialised once
    model: str = ""
    prompt_tokens: int = 0  # estimated from the text
    max_tokens: int | None = None  # the request's cap on output tokens per answer; None: unset
    request_hash: str = ""  # of the endpoint and the body: identical requests share it
    error: str | None = None  # why the row cannot be sent (null prompt, bad messages JSON)
    reuse: Result | None = None  # an earlier answer to the same request (journal or cache)
    # Answers for slots `slot` .. `slot + samples - 1` at once (a request with `n`).
    samples: int = 1
    digest: int | None = None  # of what the request is made of (`digests.digest_of`)
    images: int = 0  # image parts in the request, priced per image (`money.ModelPrice.image`)

    @property
    def estimated_tokens(self) -> int:
        """Tokens this request is expected to take, for the token rate: the prompt and, without
        `max_tokens`, an answer of typical length (the budget uses the worst case instead)."""
        answer = TYPICAL_ANSWER_TOKENS if self.max_tokens is None else self.max_tokens
        return self.prompt_tokens + answer * self.samples


TYPICAL_ANSWER_TOKENS = 256  # an answer's length assumed for rate estimates when unset


def _column(
    arrow_type: str, default: Any = None, *, not_null: bool = False, output: bool = True
) -> Any:
    """A field of the result with its Arrow type: an output column, or (`output=False`) one
    the journal keeps but the output does not show."""
    return field(
        default=default, metadata={"type": arrow_type, "output": output, "not_null": not_null}
    )


@dataclass(slots=True)
class Result:
    """What happened to one slot; one of these per slot ends up in the journal and the output."""

    position: int  # the slot (named `position` in the journal, which is keyed by it)
    key: str
    completion: str | None = _column("string")
    finish_reason: str | None = _column("string")
    response_model: str | None = _column("string")
    provider: str | None = _column("string")
    generation_id: str | None = _column("string")
    prompt_tokens: int | None = _column("int64")
    completion_tokens: int | None = _column("int64")
    total_tokens: int | None = _column("int64")
    reasoning_tokens: int | None = _column("int64")
    cached_tokens: int | None = _column("int64")  # of the prompt's, read from the cache
    cache_write_tokens: int | None = _column("int64")  # written to it, where reported
    cost_usd: float | None = _column("float64")
    # "reported" (usage.cost) | "computed" (tokens x prices) | "reused" | "shared" | None
    cost_source: str | None = _column("string")
    response_source: str | None = _column("string")  # "api" | "duplicate" | "cache"
    latency_ms: float | None = _column("float64")
    attempts: int = _column("int32", 0)
    status: str = _column("string", ERROR, not_null=True)  # "ok" | "error"
    error_type: str | None = _column("string")
    error_message: str | None = _column("string")
    # A row that failed only because its retries ran out is sent again by the next run.
    retry_on_resume: bool = _column("bool", False, not_null=True, output=False)
    request_hash: str | None = _column("string", output=False)
    parsed: str | None = _column(
        "string", output=False
    )  # a structured answer, checked, as canonical JSON
    # Kept under `on_change = "keep"` although its row asks something else now.
    stale: bool = _column("bool", False, not_null=True, output=False)
    digest: int | None = _column("int64", output=False)  # of the row's inputs (`digests`)
    # The answer's parts the output shows when the job asks for them (`answer_parts`).
    reasoning: str | None = _column("string", output=False)
    tool_calls: str | None = _column("string", output=False)  # JSON text
    label_confidence: float | None = _column("float64", output=False)
    embedding: bytes | None = _column("binary", output=False)  # float32s, little-endian (`embed`)

    def as_tuple(self) -> tuple[Any, ...]:
        return _result_values(self)

    @classmethod
    def from_tuple(cls, values: tuple[Any, ...]) -> Result:
        return cls(*values)

    @classmethod
    def unsendable(cls, row: Row) -> Result:
        """The error row of a row that cannot be sent (`row.error` says why)."""
        return cls(
            row.slot, row.key, status=ERROR, error_type=Kind.INPUT, error_message=row.error,
            digest=row.digest,
        )  # fmt: skip

    def reused_for(self, row: Row, source: str) -> Result:
        """This answer, given to another row that asked the same thing: no request, no cost."""
        return dataclasses.replace(
            self, position=row.slot, key=row.key, cost_usd=0.0, cost_source=REUSED,
            response_source=source, latency_ms=0.0, attempts=0, stale=False, digest=row.digest,
        )  # fmt: skip


_FIELDS = dataclasses.fields(Result)
# A result as the journal stores it and the output takes it, in this order.
RESULT_FIELDS = tuple(f.name for f in _FIELDS)
# Columns of the output, in order, after the input columns (names before any prefix).
RESULT_COLUMNS = tuple(f.name for f in _FIELDS if f.metadata.get("output"))
# The Arrow type of each field after `position` and `key`, and whether it may be null.
RESULT_TYPES = {f.name: f.metadata["type"] for f in _FIELDS if "type" in f.metadata}
NOT_NULL = frozenset(f.name for f in _FIELDS if f.metadata.get("not_null"))
_result_values = operator.attrgetter(*RESULT_FIELDS)  # one C call for a row of values


@dataclass(frozen=True, slots=True)
class Slots:
    """Where results go: each input row becomes one output row per variant (model x sample),
    at slot `position * per_row + variant`. The one place that knows this arithmetic; with one
    variant a slot is the input position."""

    per_row: int = 1

    def first(self, position: int) -> int:
        """The slot of an input row's first variant."""
        return position * self.per_row

    def of(self, position: int, variant: int) -> int:
        return position * self.per_row + variant

    def input_row(self, slot: int) -> int:
        """The input position a slot belongs to."""
        return slot // self.per_row

    def count(self, rows: int) -> int:
        """Slots of `rows` input rows."""
        return rows * self.per_row


@dataclass(frozen=True, slots=True)
class ModelTotals:
    rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # None when no row's cost is known; else a lower bound if `rows_cost_unknown`.
    cost_usd: float | None = 0.0
    rows_cost_unknown: int = 0
    cached_tokens: int = 0  # prompt tokens read from the provider's cache
    cache_write_tokens: int = 0  # and written to it


@dataclass(frozen=True, slots=True)
class Totals:
    """The whole job's figures, from its journal: counts, tokens (of answers from the API), the
    rows' cost and the spend that is in no row (lost attempts, replaced answers).

    Money that cannot be known is None, never a made-up 0: `cost_usd` is None when no row's
    cost is known, and only a lower bound while `rows_cost_unknown` rows have none;
    `paid_twice_cost_usd` is None while a lost attempt is not priced yet, and `true_cost_usd`
    is None when any of its parts is unknown."""

    rows: int = 0
    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0
    duplicates_reused: int = 0
    cache_hits: int = 0
    rows_cost_unknown: int = 0
    by_model: dict[str, ModelTotals] = field(default_factory=dict)
    lost_attempts: int = 0
    paid_twice_requests: int = 0
    paid_twice_cost_usd: float | None = 0.0
    lost_attempts_unreconciled: int = 0
    replaced_answers: int = 0
    replaced_cost_usd: float | None = 0.0  # None while any replaced answer had no cost
    departed_rows: int = 0  # answers of rows since gone from the input (incremental jobs)
    departed_cost_usd: float | None = 0.0  # what they cost; None while any had no cost
    # Batches whose bill (`usage.cost`) differs from what their answers' costs add up to, and
    # by how much in all (their lines that ran yet came back with no answer, say).
    batches_billed_apart: int = 0
    batch_bills_beyond_usd: float = 0.0
    # What prompt caching saved against the uncached prices (`money.cache_saving`); None
    # when a model with cached tokens has no listed prices.
    cache_saving_usd: float | None = 0.0

    @property
    def cached_tokens(self) -> int:
        return sum(m.cached_tokens for m in self.by_model.values())

    @property
    def cache_write_tokens(self) -> int:
        return sum(m.cache_write_tokens for m in self.by_model.values())

    @property
    def true_cost_usd(self) -> float | None:
        """Everything the job was billed: its rows, lost attempts, replaced answers, the
        answers of rows since gone from the input, and batches' bills beyond their answers."""
        if self.rows_cost_unknown or None in self._spend:
            return None
        return self.known_spend_usd

    @property
    def known_spend_usd(self) -> float:
        """What is known to be spent (the budget's starting point): unknown parts count 0."""
        return sum(part or 0.0 for part in self._spend)

    @property
    def _spend(self) -> tuple[float | None, ...]:
        return (
            self.cost_usd, self.paid_twice_cost_usd, self.replaced_cost_usd, self.departed_cost_usd,
            self.batch_bills_beyond_usd,
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        """As the output's metadata and the JSON summary hold them."""
        cached = self.cached_tokens
        return {
            **dataclasses.asdict(self), "true_cost_usd": self.true_cost_usd,
            "cached_tokens": cached, "cache_write_tokens": self.cache_write_tokens,
            "cached_share": cached / self.prompt_tokens if self.prompt_tokens else 0.0,
        }  # fmt: skip
