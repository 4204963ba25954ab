"""`pipeline estimate`: what a job (or its remaining rows) will cost, before sending anything.

Prompt tokens are estimated at four characters per token plus 4 per message. Real tokenizers
land within about 25% of that on English prose and can be further off on code and non-Latin
scripts, so the range spans 0.75x to 1.25x. Output tokens come from `cost.expected_output_tokens`
(0.5x to 1.5x of it, capped by max_tokens), else from 1 to `max_tokens`. `--pilot N` instead
runs N rows for real (journaled, so never paid again) and extrapolates from what they cost.
With `--redo`, the rows it would send again count as to do, under the current settings.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from pipeline.attachments import IMAGE_TOKENS
from pipeline.batch_prices import batch_prices
from pipeline.client import connect
from pipeline.config import JobConfig
from pipeline.feed import Feed
from pipeline.identity import SettledToday, match
from pipeline.job import RunOptions, run_job
from pipeline.journal import Journal
from pipeline.keys import api_key, read_api_key
from pipeline.money import Catalogue, ModelPrice, load_catalogue
from pipeline.plan import JobPlan, plan_job
from pipeline.prompts import RequestBuilder
from pipeline.records import TYPICAL_ANSWER_TOKENS, Totals
from pipeline.redo import Redo
from pipeline.settings import describe_changes, simulated

PROMPT_LOW, PROMPT_HIGH = 0.75, 1.25
OUTPUT_LOW, OUTPUT_HIGH = 0.5, 1.5
UNIQUE_COUNT_LIMIT = 2_000_000  # beyond this many rows, duplicates are not counted (memory)


@dataclass
class ModelEstimate:
    rows: int = 0
    prompt_tokens: int = 0
    output_low: int = 0
    output_high: int = 0
    images: int = 0  # image parts, priced per image where the listing says
    cost_low: float | None = None
    cost_high: float | None = None
    # The same rows through the Batch API, at the model's `:batch` price; None: no such endpoint.
    batch_cost_low: float | None = None
    batch_cost_high: float | None = None


@dataclass
class Estimate:
    total_rows: int
    done_rows: int
    todo_rows: int
    unique_requests: int | None
    by_model: dict[str, ModelEstimate]
    method: str
    notes: list[str] = field(default_factory=list)
    pilot: dict[str, Any] | None = None

    @property
    def cost_low(self) -> float | None:
        return _sum(m.cost_low for m in self.by_model.values())

    @property
    def cost_high(self) -> float | None:
        return _sum(m.cost_high for m in self.by_model.values())

    @property
    def batch_cost_low(self) -> float | None:
        return _sum(m.batch_cost_low for m in self.by_model.values())

    @property
    def batch_cost_high(self) -> float | None:
        return _sum(m.batch_cost_high for m in self.by_model.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_rows": self.total_rows, "done_rows": self.done_rows, "todo_rows": self.todo_rows,
            "unique_requests": self.unique_requests, "cost_low_usd": self.cost_low, "cost_high_usd": self.cost_high,
            "batch_cost_low_usd": self.batch_cost_low, "batch_cost_high_usd": self.batch_cost_high,
            "by_model": {k: vars(v) for k, v in self.by_model.items()}, "method": self.method,
            "notes": self.notes, "pilot": self.pilot,
        }  # fmt: skip


def _sum(values: Any) -> float | None:
    items = list(values)
    return None if any(v is None for v in items) else sum(items)


def estimate(
    config: JobConfig,
    *,
    limit: int | None = None,
    pilot: int | None = None,
    redo: Redo | None = None,
) -> Estimate:
    """Estimate the rows still to do (with `redo`, those it sends again too); with `pilot`,
    first run that many rows for real."""
    pilot_report = None
    plan = plan_job(config, limit)  # the pilot changes the journal, not the plan
    if pilot:
        done, _ = _settled_rows(config, plan)
        pilot_limit = done + pilot if limit is None else min(limit, done + pilot)
        pilot_report = run_job(
            config, RunOptions(limit=pilot_limit, quiet=True, write_output=False)
        )
    done, redone = _settled_rows(config, plan, redo)
    today = _settled_today(config, plan) if done else None
    if today is not None:
        done = today.count - len(redone)
    # Only `/models` is asked, which needs no key: one is sent only if set (the pilot's run
    # above needs it, and asks for it).
    key = api_key(config) if config.request.simulate else read_api_key(config) or ""
    try:
        result = asyncio.run(_estimate(plan, key, done, redone, today))
    finally:
        if today is not None:
            today.journal.close()
    if pilot_report is not None:
        result.pilot = _extrapolate(pilot_report.job_totals, result)
    return result


def _settled_rows(
    config: JobConfig, plan: JobPlan, redo: Redo | None = None
) -> tuple[int, frozenset[int]]:
    """Rows an earlier run of this same job settled (0 if there is no journal, or it is another
    job's, or simulated answers a real run starts over from), less those `redo` sends again;
    and the slots it sends again. A redo accepts a changed question, not a changed input.

    Read without the lock, so an estimate works while the job runs."""
    journal = Journal.read_only(config.output.journal_path)
    if journal is None:
        return 0, frozenset()
    try:
        with journal:
            meta = journal.meta()
            changed = describe_changes(
                meta, plan.fingerprint, compare_config=redo is None,
                compare_input=not config.input.incremental,
            )  # fmt: skip
            if changed or simulated(meta.get("config", {})) != config.request.simulate:
                return 0, frozenset()
            chosen = frozenset(redo.choose(journal, plan.slots)) if redo else frozenset()
            return journal.settled_count(below=plan.slots) - len(chosen), chosen
    except sqlite3.Error:
        return 0, frozenset()


def _settled_today(config: JobConfig, plan: JobPlan) -> SettledToday | None:
    """For an incremental job, which of today's rows a run would find settled, matched by
    identity as the run matches them (`identity.match`); None otherwise, or when the journal
    cannot tell (read-only, from before this version: counted by position)."""
    if not config.input.incremental:
        return None
    journal = Journal.read_only(config.output.journal_path)
    if journal is None:
        return None
    try:
        found = match(plan, plan.builder.seeded(journal.hash_seed), journal)
        if found is not None:
            keep = config.input.on_change == "keep"
            return SettledToday(journal, found, keep, plan.slots)
    except sqlite3.Error:
        pass
    journal.close()
    return None


async def _estimate(
    plan: JobPlan, key: str, done: int, redone: frozenset[int], today: SettledToday | None
) -> Estimate:
    config = plan.config
    async with connect(config, key) as client:
        catalogue = await load_catalogue(client, config)
        estimate = _count(plan, catalogue, done, redone, today)
        # The same rows through the Batch API, where the endpoint is OpenRouter's (which
        # takes chat requests only).
        if (
            config.request.is_openrouter
            and catalogue is not None
            and not estimate.builder.embeddings
        ):
            prices = await batch_prices(client, list(estimate.by_model))
            for model_id, m in estimate.by_model.items():
                price, batch = catalogue.get(model_id), prices.get(model_id)
                if price is not None and batch is not None:
                    prefix = _cached_prefix(estimate.builder, model_id, price) if m.rows > 1 else 0
                    m.batch_cost_low, m.batch_cost_high = _cost_range(m, batch, prefix)
                elif price is not None:
                    estimate.result.notes.append(
                        f"{model_id} lists no :batch endpoint: the Batch API does not take it"
                    )
    if estimate.builder.embeddings:
        per_request = config.limits.inputs_per_request
        for model_id, m in estimate.by_model.items():
            estimate.result.notes.append(
                f"{model_id}: the {m.rows:,} inputs go up to {per_request} a request "
                f"(at least {-(-m.rows // per_request):,} requests); embeddings have no output tokens"
            )
    return estimate.result


@dataclass
class _Counted:
    result: Estimate
    builder: RequestBuilder

    @property
    def by_model(self) -> dict[str, ModelEstimate]:
        return self.result.by_model


def _count(
    plan: JobPlan, catalogue: Catalogue | None, done: int, redone: frozenset[int],
    today: SettledToday | None,
) -> _Counted:  # fmt: skip
    """The rows still to do, their tokens and their cost at the listed prices."""
    config = plan.config
    builder = plan.builder.for_catalogue(catalogue)
    max_tokens = config.request.max_tokens
    expected = config.cost.expected_output_tokens
    notes = []
    if builder.embeddings:
        out_low = out_high = 0  # an embedding is billed by its input alone
    elif expected:
        out_low, out_high = int(expected * OUTPUT_LOW), int(expected * OUTPUT_HIGH)
        if max_tokens:
            out_high = min(out_high, max_tokens)
    elif max_tokens:
        out_low, out_high = 1, max_tokens
    else:
        out_low, out_high = 1, TYPICAL_ANSWER_TOKENS * 4
        notes.append(
            f"no request.max_tokens or cost.expected_output_tokens: assumed answers of 1 to {out_high} tokens; set either for a tighter range"
        )

    by_model: dict[str, ModelEstimate] = defaultdict(ModelEstimate)
    unique: set[str] | None = set() if plan.slots - done <= UNIQUE_COUNT_LIMIT else None
    todo = 0
    journal = Journal.read_only(config.output.journal_path) if done else None

    def settled(low: int, high: int) -> set[int]:
        if today is not None:
            return today(low, high) - redone
        found = journal.settled_slots(low, high) if journal is not None else set()
        return found - redone

    try:
        for row in (r for rows, _ in Feed(plan, builder, settled).batches() for r in rows):
            if row.body is None:
                continue
            todo += row.samples
            if unique is not None:
                if row.request_hash in unique:
                    continue
                unique.add(row.request_hash)
            model = by_model[row.model]
            model.rows += row.samples  # a request with `n` answers several rows
            model.prompt_tokens += row.prompt_tokens
            model.output_low += out_low * row.samples
            model.output_high += out_high * row.samples
            model.images += row.images
    finally:
        if journal is not None:
            journal.close()
    caching = False
    for model_id, m in by_model.items():
        price = catalogue.get(model_id) if catalogue else None
        if price is None:
            notes.append(f"no price for {model_id}: the endpoint's /models does not list it")
            continue
        prefix = _cached_prefix(builder, model_id, price) if m.rows > 1 else 0
        m.cost_low, m.cost_high = _cost_range(m, price, prefix)
        caching = caching or prefix > 0
        if m.images and not price.image:
            notes.append(
                f"{model_id} lists no per-image price: its {m.images:,} images are counted as "
                f"~{IMAGE_TOKENS} prompt tokens each, which its provider may bill otherwise"
            )
    method = (
        "prompt tokens ~ characters/4 + 4 per message, range x0.75-x1.25 (tokenizers differ; code and "
        "non-Latin scripts can fall outside); output tokens "
        + (
            f"{out_low}-{out_high} per row (from cost.expected_output_tokens)"
            if expected
            else f"{out_low}-{out_high} per row"
        )
        + "; prices from /models; duplicates counted once"
        + (
            "; the system prompt read from the prompt cache after the first row at best, never at worst"
            if caching
            else ""
        )
    )
    result = Estimate(
        plan.slots, done, todo, len(unique) if unique is not None else None, dict(by_model),
        method, notes,
    )  # fmt: skip
    return _Counted(result, builder)


def _cost_range(m: ModelEstimate, price: ModelPrice, prefix: int) -> tuple[float, float]:
    """The rows' cost at `price`. With a cached prefix: at best read from the cache after the
    first row (written once); at worst never read, and (where a write costs more) written by
    every row."""
    low = int(prefix * PROMPT_LOW)  # as the prompt tokens are counted low
    dearer = price.cache_write is not None and price.cache_write > price.prompt
    cheapest = price.cost(
        int(m.prompt_tokens * PROMPT_LOW), m.output_low, cached_tokens=low * (m.rows - 1),
        written_tokens=low if price.cache_write is not None else 0,
    )  # fmt: skip
    dearest = price.cost(
        int(m.prompt_tokens * PROMPT_HIGH), m.output_high,
        written_tokens=int(prefix * PROMPT_HIGH) * m.rows if dearer else 0,
    )  # fmt: skip
    images = m.images * float(price.image)
    return cheapest + images, dearest + images


IMPLICIT_CACHE_TOKENS = 1_024  # the least a provider caching by itself caches (OpenAI's)


def _cached_prefix(builder: RequestBuilder, model: str, price: ModelPrice) -> int:
    """Tokens of the system prompt a provider may cache for each row: marked for caching, or
    long enough for a model that caches by itself; 0 if neither."""
    if price.cache_read is None or not builder.system_prompt:
        return 0
    tokens = builder.system_tokens
    if builder.mark_every_model or model in builder.cache_marked:
        return tokens
    return tokens if price.cache_write is None and tokens >= IMPLICIT_CACHE_TOKENS else 0


def _extrapolate(totals: Totals, after: Estimate) -> dict[str, Any]:
    """From what the pilot rows really cost, the cost of the rows still to do: unknown when
    any of the pilot's spend is (its `cost_usd` is then what is known of it, if anything)."""
    rows = sum(m.rows for m in totals.by_model.values())
    cost = totals.true_cost_usd
    per_row = cost / rows if cost is not None and rows else None
    remaining = sum(m.rows for m in after.by_model.values())
    projected = per_row * remaining if per_row is not None else None
    return {
        "rows": rows,
        "cost_usd": cost if cost is not None else totals.cost_usd,
        "rows_cost_unknown": totals.rows_cost_unknown,
        "cost_per_row_usd": per_row,
        "completion_tokens_per_row": totals.completion_tokens / rows if rows else None,
        "projected_remaining_usd": projected,
        "projected_total_usd": cost + projected
        if cost is not None and projected is not None
        else None,
    }
