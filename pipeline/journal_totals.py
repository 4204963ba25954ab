"""What a journal says about money and counts: the job's totals and the spend of recent
minutes (for `max_cost_per_day`), each a few aggregate queries over its tables."""

from __future__ import annotations

import sqlite3

from pipeline.journal_file import NOW, columns
from pipeline.records import ModelTotals, Totals

# Spend paid after a time, by the minute it was paid in (its last payment's time: a bucket
# ages out when its newest spend does), oldest first; unknown costs count 0, as in the totals.
_SPEND_SINCE = """SELECT MAX(paid_at), SUM(cost_usd) FROM (
    SELECT done_at AS paid_at, cost_usd FROM results WHERE done_at > :since AND cost_usd > 0
    UNION ALL SELECT {lost_at}, cost_usd FROM lost_attempts WHERE {lost_at} > :since AND cost_usd > 0
    UNION ALL SELECT {paid_at}, cost_usd FROM {replaced} WHERE {paid_at} > :since AND cost_usd > 0
    {batches}
) GROUP BY CAST(paid_at / 60 AS INTEGER) ORDER BY 1"""
# A cost that was paid for (not a reuse's or a shared sample's known 0): with none of these,
# a job whose rows have no cost has an unknown total, not $0.
_PRICED = (
    "cost_usd IS NOT NULL AND (cost_source IS NULL OR cost_source NOT IN ('reused', 'shared'))"
)
_TOTALS = f"""SELECT COUNT(*), COALESCE(SUM(status = 'ok'), 0), COALESCE(SUM(status = 'error'), 0),
    COALESCE(SUM(CASE WHEN response_source = 'api' THEN prompt_tokens END), 0),
    COALESCE(SUM(CASE WHEN response_source = 'api' THEN completion_tokens END), 0),
    SUM(cost_usd), COALESCE(SUM(response_source = 'duplicate'), 0), COALESCE(SUM(response_source = 'cache'), 0),
    COALESCE(SUM(status = 'ok' AND cost_usd IS NULL), 0), COALESCE(SUM({_PRICED}), 0)
    FROM results WHERE {{where}}"""
_BY_MODEL = f"""SELECT response_model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_usd),
    SUM(cost_usd IS NULL), SUM({_PRICED}), COALESCE(SUM(cached_tokens), 0), {{written}}
    FROM results WHERE {{where}} AND response_source = 'api' AND status = 'ok'
    GROUP BY response_model ORDER BY response_model"""
_LOST = """SELECT COUNT(*), COALESCE(SUM(cost_usd > 0), 0), COALESCE(SUM(cost_usd), 0),
    COALESCE(SUM(cost_usd IS NULL), 0) FROM lost_attempts"""
_DEPARTED = """SELECT COUNT(*), COALESCE(SUM(cost_usd), 0),
    COALESCE(SUM(status = 'ok' AND response_source = 'api' AND cost_usd IS NULL), 0)
    FROM results WHERE position < 0"""
# Batches billed more (or less) than their answers' costs add up to: the bill is the true spend.
_BILLED_APART = (
    "cost_usd IS NOT NULL AND lines_cost_usd IS NOT NULL AND ABS(cost_usd - lines_cost_usd) > 1e-9"
)
_BATCH_BILLS = f"""SELECT COUNT(*), COALESCE(SUM(cost_usd - lines_cost_usd), 0) FROM batches
    WHERE state = 'done' AND {_BILLED_APART}"""
_BATCHES_SINCE = f"""UNION ALL SELECT finished_at, cost_usd - lines_cost_usd FROM batches
    WHERE finished_at > :since AND {_BILLED_APART}"""
_REPLACED = """SELECT COUNT(*), COALESCE(SUM(cost_usd), 0), COALESCE(SUM(cost_usd IS NULL), 0)
    FROM replaced_answers WHERE {where}"""


def spend_since(db: sqlite3.Connection, since: float) -> list[tuple[float, float]]:
    """(paid at, USD) of the spend paid after Unix time `since`, a minute at a time, oldest
    first: answers, lost attempts and replaced answers. A journal not yet upgraded (read
    only) has no times beside the last two: they count as paid now."""
    replaced = columns(db, "replaced_answers")
    query = _SPEND_SINCE.format(
        lost_at="lost_at" if "lost_at" in columns(db, "lost_attempts") else NOW,
        paid_at="paid_at" if "paid_at" in replaced else NOW,
        replaced="replaced_answers" if replaced else "(SELECT NULL AS cost_usd WHERE 0)",
        batches=_BATCHES_SINCE if "lines_cost_usd" in columns(db, "batches") else "",
    )
    return [(float(t), float(usd)) for t, usd in db.execute(query, {"since": since})]


def totals(db: sqlite3.Connection, below: int | None = None) -> Totals:
    """Counts, tokens and cost over the journal (slots under `below` only, if given).

    Tokens count answers from the API only: a reused answer was not generated again.
    """
    # Negative slots hold the answers of rows since gone from the input: spend, not rows.
    where = "position >= 0 AND position < ?" if below is not None else "position >= 0"
    args = (below,) if below is not None else ()
    row = db.execute(_TOTALS.format(where=where), args).fetchone()
    # A journal from before cache writes were kept (read only) has none.
    written = "COALESCE(SUM(cache_write_tokens), 0)"
    if "cache_write_tokens" not in columns(db, "results"):
        written = "0"
    by_model = db.execute(_BY_MODEL.format(where=where, written=written), args).fetchall()
    lost = db.execute(_LOST).fetchone()
    departed = db.execute(_DEPARTED).fetchone()
    replaced = (
        db.execute(_REPLACED.format(where=where), args).fetchone()
        if _has_table(db, "replaced_answers")  # not in a journal from before it, read-only
        else (0, 0.0, 0)
    )
    bills = (
        db.execute(_BATCH_BILLS).fetchone()
        if "lines_cost_usd" in columns(db, "batches")  # a job never run in batch mode has none
        else (0, 0.0)
    )
    rows, ok, failed, prompt, completion, cost, duplicates, cache_hits, unknown, priced = row
    return Totals(
        rows, ok, failed, prompt, completion, _cost(cost, unknown, priced), duplicates,
        cache_hits, unknown,
        by_model={
            model or "(unknown)": ModelTotals(n, p or 0, c or 0, _cost(usd, none, paid), none, read, wrote)
            for model, n, p, c, usd, none, paid, read, wrote in by_model
        },
        lost_attempts=lost[0], paid_twice_requests=lost[1],
        paid_twice_cost_usd=None if lost[3] else lost[2],  # unknown while any is unpriced
        lost_attempts_unreconciled=lost[3], replaced_answers=replaced[0],
        replaced_cost_usd=None if replaced[2] else replaced[1],
        departed_rows=departed[0], departed_cost_usd=None if departed[2] else departed[1],
        batches_billed_apart=bills[0], batch_bills_beyond_usd=bills[1],
    )  # fmt: skip


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    return db.execute(query, (name,)).fetchone() is not None


def _cost(total: float | None, unknown: int, priced: int) -> float | None:
    """A total of rows' costs: unknown when rows lack a cost and none was paid for, else the
    sum of the known ones (a lower bound while `unknown` rows have none)."""
    return None if unknown and not priced else total or 0.0
