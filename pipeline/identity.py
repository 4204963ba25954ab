"""Before an incremental run sends anything: which answer in the journal belongs to which row of
today's input. A row is the same row when its id is the same (with `input.id_column`), else
when its request is the same, wherever it now sits; the journal's results are moved to the
rows' current slots, so everything after (the feed, the output, the totals) can go by slot.

Results of rows no longer in the input move to negative slots ("departed"): out of the output
and the row counts, still in the true spend, and back in place if the row comes back. A row
done for another request than it asks today has "changed": under `on_change = "reprocess"`
it is sent again (refused before anything is sent when over a tenth of the rows done changed,
unless `reprocess_changed`), under "keep" its answer stays, marked stale.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from pipeline.config import JobConfig
from pipeline.errors import InputError
from pipeline.journal import Journal
from pipeline.options import describe
from pipeline.plan import JobPlan
from pipeline.prompts import RequestBuilder
from pipeline.records import Slots
from pipeline.source import Source

CHANGED_SHARE_REFUSED = 0.1  # of the rows done: more changed than this is likely a re-export


@dataclass(frozen=True)
class Realignment:
    moved: int = 0  # results moved to their row's new slot
    departed: int = 0  # results whose row left the input in this run
    changed: int = 0  # rows done for another request than they ask now


def realign(plan: JobPlan, builder: RequestBuilder, journal: Journal) -> Realignment:
    """Move the journal's results to today's slots of their rows (`builder`: the plan's, or one
    that knows which models take `n`); raise `InputError`, nothing moved, when too many rows
    changed for the job's policy."""
    config, slots, limit = plan.config, builder.slots, plan.limit
    by_id = config.input.id_column is not None
    stored = journal.identities()
    if stored.is_empty():  # a first run: nothing to match, so no rows to build for it
        return Realignment()
    current = _current(plan.source, builder, limit, by_id)
    stored = stored.with_columns(
        ident=pl.col("key") if by_id else pl.col("request_hash"),
        variant=_variant(pl.col("position"), slots),
    )
    # Several rows may share a request (no id): the k-th of them keeps the k-th answer.
    current = current.with_columns(occ=pl.int_range(pl.len()).over("ident", "variant"))
    stored = stored.sort(pl.col("position") < 0, pl.col("position").abs()).with_columns(
        occ=pl.int_range(pl.len()).over("ident", "variant")
    )
    matched = stored.join(current, on=["ident", "variant", "occ"], how="inner", suffix="_now")
    active = pl.col("position") >= 0
    unmatched = stored.join(current, on=["ident", "variant", "occ"], how="anti").filter(active)
    if limit is not None:  # rows past the limit are not today's business: left where they are
        unmatched = unmatched.filter(pl.col("position") < plan.slots)

    done = matched.filter(pl.col("retry_on_resume") == 0)
    changed = done.filter(
        pl.col("request_hash").is_not_null()
        & pl.col("request_hash_now").is_not_null()
        & (pl.col("request_hash") != pl.col("request_hash_now"))
    )
    keep = config.input.on_change == "keep"
    if (
        not keep
        and not config.input.reprocess_changed
        and changed.height > CHANGED_SHARE_REFUSED * done.height
    ):
        _refuse(config, changed, done.height)

    moves = matched.filter(pl.col("position") != pl.col("slot")).select("position", "slot")
    departures = unmatched.select("position", "variant")
    journal.realign(
        moves.rows(),
        departures.rows(),
        slots.per_row,
        changed=changed["slot"].to_list(),
        keep_changed=keep,
    )
    return Realignment(
        moved=moves.filter(pl.col("position") >= 0).height,
        departed=departures.height,
        changed=changed.height,
    )


def _current(
    source: Source, builder: RequestBuilder, limit: int | None, by_id: bool
) -> pl.DataFrame:
    """Today's slots with their identity and request hash."""
    slots, idents, variants, hashes = [], [], [], []
    per_row = builder.slots.per_row
    for batch in source.batches(limit):
        for row in builder.rows(batch):
            ident = row.key if by_id else (row.request_hash if row.body is not None else None)
            for sample in range(row.samples):
                slot = row.slot + sample
                slots.append(slot)
                idents.append(ident)
                variants.append(slot % per_row)
                hashes.append(row.request_hash if row.body is not None else None)
    return pl.DataFrame(
        {"slot": slots, "ident": idents, "variant": variants, "request_hash": hashes},
        schema={
            "slot": pl.Int64,
            "ident": pl.String,
            "variant": pl.Int64,
            "request_hash": pl.String,
        },
    ).filter(pl.col("ident").is_not_null())  # a row that cannot be sent is simply done again


def _variant(position: pl.Expr, slots: Slots) -> pl.Expr:
    """A result's variant (model x sample), from its slot or its departed slot (-1 - slot)."""
    return pl.when(position >= 0).then(position).otherwise(-1 - position) % slots.per_row


def _refuse(config: JobConfig, changed: pl.DataFrame, done: int) -> None:
    example = changed.sort("slot")["key"][0]
    raise InputError(
        f"{changed.height:,} of {done:,} rows done earlier have changed since (e.g. "
        f"{describe('input.id_column')} '{config.input.id_column}' = {example!r} now asks something else), "
        "more than a tenth: was the input re-exported? --reprocess-changed sends them again "
        "(paying for each), --keep-changed keeps their earlier answers marked stale"
    )
