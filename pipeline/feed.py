"""Which rows still need an answer, a batch at a time, in input order: rows an earlier run
settled are left out (in an incremental job, `identity.realign` has put each earlier answer
at its row's slot first, and marked changed rows to be sent again), and a row whose request
was already answered (earlier in the job, or in the shared cache) carries that answer instead
of being sent.

Runs in the row feed's thread (see `dispatch.RowFeed`), a batch ahead of the workers.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterator

import polars as pl

from pipeline.cache import ResponseCache
from pipeline.journal import Journal
from pipeline.journal_file import within
from pipeline.plan import JobPlan
from pipeline.prompts import RequestBuilder
from pipeline.records import CACHE, DUPLICATE, Row
from pipeline.source import BATCH_ROWS, POSITION, frame_of

# The slots in [low, high) that an earlier run settled.
Settled = Callable[[int, int], set[int]]


ATTACHED_BATCH_ROWS = 16  # input rows per batch of a job that sends images or files


class Feed:
    """The rows of a plan still to do, given what an earlier run `settled`."""

    def __init__(
        self,
        plan: JobPlan,
        builder: RequestBuilder,
        settled: Settled,
        settled_blocks: frozenset[int] = frozenset(),
    ) -> None:
        self.plan = plan
        self.builder = builder  # the plan's, or one that knows which models take `n`
        self.settled = settled
        self.settled_blocks = settled_blocks  # blocks of slots settled throughout (`digests`)

    def batches(self) -> Iterator[tuple[list[Row], int]]:
        """The rows to send, a batch at a time, each with the slot the batch ends before."""
        plan, slots = self.plan, self.builder.slots
        # The first requests wait for the first batch: one row per worker is enough to start them.
        first = max(plan.config.limits.concurrency // slots.per_row, 1)
        for start, rows, batch in self._input(first):
            low, high = slots.first(start), slots.first(start + rows)
            if not rows or within(self.settled_blocks, low, high):
                # Nothing to ask, build or convert: how a resume passes a million rows.
                yield [], high
                continue
            frame = batch() if callable(batch) else batch
            done = self.settled(low, high)
            if done:  # drop the input rows whose every variant is done
                per_row = Counter(slots.input_row(slot) for slot in done)
                finished = [p for p, count in per_row.items() if count == slots.per_row]
                frame = frame.filter(~pl.col(POSITION).is_in(finished))
            if self.builder.attachments is None:
                yield self.builder.rows(frame, done), high
                continue
            # Rows with images or files hold their bytes in their bodies: built a few at a
            # time, so a batch prepared ahead holds megabytes, not gigabytes.
            for piece in frame.iter_slices(ATTACHED_BATCH_ROWS):
                end = slots.first(piece[POSITION][-1] + 1)
                yield self.builder.rows(piece, done), min(end, high)
            yield [], high

    def _input(self, first: int) -> Iterator[tuple[int, int, Batch]]:
        """The input a batch at a time (`first` rows first): (start, rows, the batch or how to
        make it). From the batches the plan kept, when the journal's blocks settled then are
        settled still (every other batch is done), else read again."""
        plan = self.plan
        kept = plan.kept
        if kept is None or not kept.settled_blocks <= self.settled_blocks:
            for start, table in plan.source.arrow_batches(plan.limit, first=first):
                yield start, table.num_rows, functools.partial(frame_of, start, table)
            return
        want = first
        for frame in kept.batches:
            offset, start = 0, frame[POSITION][0]
            while offset < frame.height:
                piece = frame.slice(offset, want)
                yield start + offset, piece.height, piece
                offset, want = offset + piece.height, BATCH_ROWS
        yield plan.rows, 0, pl.DataFrame()  # passed every row


# An input batch, or how to convert it (only when it holds rows to send).
Batch = pl.DataFrame | Callable[[], pl.DataFrame]


def with_earlier_answers(
    batches: Iterator[tuple[list[Row], int]], journal: Journal, cache: ResponseCache | None
) -> Iterator[tuple[list[Row], int]]:
    """The same batches, each row whose request was answered before carrying that answer. A
    request with `n` (several samples at once) is never reused: the journal and the cache
    give one answer a request, and it has several."""
    for rows, passed in batches:
        hashes = list(
            {row.request_hash for row in rows if row.body is not None and row.samples == 1}
        )
        answered = journal.answers(hashes)
        cached = cache.lookup([h for h in hashes if h not in answered]) if cache else {}
        for row in rows:
            if (earlier := answered.get(row.request_hash)) is not None:
                row.reuse = earlier.reused_for(row, DUPLICATE)
            elif (stored := cached.get(row.request_hash)) is not None:
                row.reuse = stored.reused_for(row, CACHE)
        yield rows, passed
