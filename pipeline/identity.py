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

import bisect
from dataclasses import dataclass

import polars as pl

from pipeline.config import JobConfig
from pipeline.digests import block_sums, check_of
from pipeline.errors import InputError
from pipeline.journal import Journal
from pipeline.journal_file import BLOCK_SLOTS
from pipeline.options import describe
from pipeline.plan import JobPlan
from pipeline.prompts import RequestBuilder
from pipeline.records import Slots
from pipeline.source import POSITION, Source

CHANGED_SHARE_REFUSED = 0.1  # of the rows done: more changed than this is likely a re-export


@dataclass(frozen=True)
class Realignment:
    moved: int = 0  # results moved to their row's new slot
    departed: int = 0  # results whose row left the input in this run
    changed: int = 0  # rows done for another request than they ask now


@dataclass(frozen=True)
class Matching:
    """The journal's results matched to today's input (`match`), before anything moves."""

    matched: pl.DataFrame  # results (`position`) and the slot of their row today (`slot`)
    departed: pl.DataFrame  # results whose row is no longer in the input (`position`, `variant`)
    changed: pl.DataFrame  # matched and settled, but done for what the row asked before
    done: int  # results settled for today's rows: those matched, and those in blocks left alone
    compared: frozenset[int] | None  # blocks matched row by row (None: all); the rest in place


def match(plan: JobPlan, builder: RequestBuilder, journal: Journal) -> Matching | None:
    """Match the journal's results to today's rows, reading only (None: the journal has none).

    Blocks of slots whose summary equals the journal's hold their answers in place and are
    left alone (`digests`); the others, and every departed result, are matched row by row, by
    id or digest. A journal whose digests are unknown (older, or of another polars) is matched
    by request hash instead, rebuilding every request."""
    config, slots = plan.config, builder.slots
    by_id = config.input.id_column is not None
    summary = journal.blocks()
    if summary.is_empty() and not journal.has_results():  # a first run: nothing to match
        return None
    current = _identities(plan, builder, by_id)
    dirty = _dirty_blocks(summary, current)
    stored = journal.identities(dirty, hashes=False)
    compared: frozenset[int] | None = frozenset(dirty)
    in_reach = (pl.col("position") >= 0) & (pl.col("position") < plan.slots)
    if stored.filter(in_reach)["digest"].null_count() == 0:
        current = current.filter((pl.col("slot") // BLOCK_SLOTS).is_in(dirty))
        ident, asks = ("key" if by_id else "digest"), "digest"
        # What the slow way left without a digest (rows departed, or past a --limit) stays
        # where it is: a departed row that comes back is answered from the journal by its
        # request hash (`feed.with_earlier_answers`), never matched blindly.
        stored = stored.filter(pl.col("digest").is_not_null())
    else:  # the slow way, once
        stored, compared = journal.identities(), None
        hashes = _request_hashes(plan.source, builder, plan.limit)
        current = current.join(hashes, on="slot", how="left")
        if not by_id:  # a row that cannot be sent is simply done again
            current = current.filter(pl.col("request_hash_now").is_not_null())
        ident, asks = ("key" if by_id else "request_hash"), "request_hash"
    # Several rows may share a request (no id): the k-th of them keeps the k-th answer.
    on = ["ident", "variant", "occ"]
    current = current.with_columns(ident=pl.col(f"{ident}_now")).with_columns(
        occ=pl.int_range(pl.len()).over("ident", "variant")
    )
    stored = stored.with_columns(ident=pl.col(ident), variant=_variant(pl.col("position"), slots))
    stored = stored.sort(pl.col("position") < 0, pl.col("position").abs()).with_columns(
        occ=pl.int_range(pl.len()).over("ident", "variant")
    )
    matched = stored.join(current, on=on, how="inner")
    unmatched = stored.join(current, on=on, how="anti").filter(pl.col("position") >= 0)
    if plan.limit is not None:  # rows past the limit are not today's business: left where they are
        unmatched = unmatched.filter(pl.col("position") < plan.slots)
    done = matched.filter(pl.col("retry_on_resume") == 0)
    differs = pl.col(asks).is_not_null() & pl.col(f"{asks}_now").is_not_null()
    changed = done.filter(differs & (pl.col(asks) != pl.col(f"{asks}_now")))
    departed = unmatched.select("position", "variant")
    left_alone = summary.filter(~pl.col("block").is_in(dirty))  # settled in place, if compared
    in_place = 0 if compared is None else int(left_alone["settled"].sum())
    return Matching(matched, departed, changed, done.height + in_place, compared)


def realign(plan: JobPlan, builder: RequestBuilder, journal: Journal) -> Realignment:
    """Move the journal's results to today's slots of their rows (`builder`: the plan's, or one
    that knows which models take `n`), and give those that moved (or had none) today's
    digests; raise `InputError`, nothing moved, when too many rows changed for the job's
    policy."""
    config, slots = plan.config, builder.slots
    found = match(plan, builder, journal)
    if found is None:
        return Realignment()
    matched, changed = found.matched, found.changed
    keep = config.input.on_change == "keep"
    if (
        not keep
        and not config.input.reprocess_changed
        and changed.height > CHANGED_SHARE_REFUSED * found.done
    ):
        _refuse(config, changed, found.done)
    moves = matched.filter(pl.col("position") != pl.col("slot")).select("position", "slot")
    # Answers at a new slot, or whose check is not today's (unknown before): today's check.
    renewed = matched.join(changed, on="slot", how="anti").filter(
        (pl.col("position") != pl.col("slot")) | pl.col("ident_check").ne_missing(pl.col("check"))
    )
    journal.realign(
        moves.rows(),
        found.departed.rows(),
        slots.per_row,
        changed=changed["slot"].to_list(),
        keep_changed=keep,
        identified=renewed.select("digest_now", "check", "slot").rows(),
    )
    return Realignment(
        moved=moves.filter(pl.col("position") >= 0).height,
        departed=found.departed.height,
        changed=changed.height,
    )


class SettledToday:
    """Which of today's slots an earlier run settled, as a run would find after `realign`,
    without moving anything (for `pipeline estimate` of an incremental job): a callable
    (low, high) -> slots, and how many in all."""

    def __init__(self, journal: Journal, found: Matching, keep_changed: bool, below: int) -> None:
        self.journal = journal
        self.compared = found.compared
        settled = found.matched.filter(pl.col("retry_on_resume") == 0)
        if not keep_changed:
            settled = settled.join(found.changed, on="slot", how="anti")
        self._slots = sorted(settled["slot"].filter(settled["slot"] < below).to_list())
        self.count = len(self._slots)
        if self.compared is not None:  # and those in place in the other blocks
            in_compared = sum(
                len(journal.settled_slots(b * BLOCK_SLOTS, min((b + 1) * BLOCK_SLOTS, below)))
                for b in self.compared
            )
            self.count += journal.settled_count(below) - in_compared

    def __call__(self, low: int, high: int) -> set[int]:
        first, last = bisect.bisect_left(self._slots, low), bisect.bisect_left(self._slots, high)
        found = set(self._slots[first:last])
        if self.compared is not None:  # the blocks not compared hold their answers in place
            found |= {
                slot
                for slot in self.journal.settled_slots(low, high)
                if slot // BLOCK_SLOTS not in self.compared
            }
        return found


def _identities(plan: JobPlan, builder: RequestBuilder, by_id: bool) -> pl.DataFrame:
    """Today's slots with their row's id (else its position), variant, digest and check (from
    what the plan's validation pass read)."""
    rows = plan.identities
    assert rows is not None, "an incremental job's plan reads each row's identity"
    per_row = builder.slots.per_row
    if per_row == 1:  # a slot is the input position
        current = rows.with_columns(slot=pl.col(POSITION).cast(pl.Int64), variant=pl.lit(0))
    else:
        variants = pl.DataFrame({"variant": range(per_row)}, schema={"variant": pl.Int64})
        current = rows.join(variants, how="cross").with_columns(
            slot=pl.col(POSITION).cast(pl.Int64) * per_row + pl.col("variant")
        )
    checked = pl.col("key") if by_id else pl.lit("")
    return current.select(
        "slot", "variant", key_now="key", digest_now="digest",
        check=check_of(pl.col("slot"), checked, pl.col("digest")),
    )  # fmt: skip


def _dirty_blocks(summary: pl.DataFrame, current: pl.DataFrame) -> list[int]:
    """The blocks whose results the journal's summary does not show at their rows exactly."""
    now = block_sums(current)
    compared = summary.join(now, on="block", how="full", coalesce=True, suffix="_now")
    same = (
        (pl.col("rows") == pl.col("rows_now"))
        & (pl.col("unknown") == 0)
        & (pl.col("low") == pl.col("low_now"))
        & (pl.col("high") == pl.col("high_now"))
    )
    dirty = compared.filter(~same.fill_null(False))["block"]
    return sorted(dirty.drop_nulls().to_list())


def _request_hashes(source: Source, builder: RequestBuilder, limit: int | None) -> pl.DataFrame:
    """Today's slots with their request hash (null for a row that cannot be sent): every request
    built, as a journal without digests is matched."""
    slots, hashes = [], []
    for batch in source.batches(limit):
        for row in builder.rows(batch):
            for sample in range(row.samples):
                slots.append(row.slot + sample)
                hashes.append(row.request_hash if row.body is not None else None)
    return pl.DataFrame(
        {"slot": slots, "request_hash_now": hashes},
        schema={"slot": pl.Int64, "request_hash_now": pl.String},
    )


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
