"""The rows of running batches, kept out of memory until their batch is collected: every row
comes back, with its request's counts and reserve, one batch at a time."""

from __future__ import annotations

import pytest

from pipeline.batch_rows import Waiting, WaitingRows
from pipeline.errors import DiskFull
from pipeline.records import Row

pytestmark = pytest.mark.timeout(30)


def row(slot: int, request_hash: str) -> Row:
    return Row(slot, f"r{slot}", b"{}", "m", 12, 40, request_hash, digest=2**62 + slot)


def test_a_batch_s_rows_come_back_whole_and_only_once() -> None:
    rows = WaitingRows()
    first = Waiting.of(row(0, "h0"), keep_body=True)
    first.join(row(2, "h0"))  # a repeat of the same request
    first.attempts, first.invalid, first.reserved = 1, 0, 0.25
    rows.put("batch-a", [first, Waiting.of(row(1, "h1"), keep_body=True)])
    rows.put("batch-b", [Waiting.of(row(3, "h3"), keep_body=True)])
    assert (rows.batch_of("h0"), rows.batch_of("h3"), rows.batch_of("nope")) == (
        "batch-a",
        "batch-b",
        None,
    )
    rows.join("batch-a", row(4, "h1"))  # a later row asking a request already in batch-a
    taken = rows.take("batch-a")
    assert sorted(taken) == ["h0", "h1"]
    h0, h1 = taken["h0"], taken["h1"]
    assert [r.slot for r in h0.rows] == [0, 2] and [r.slot for r in h1.rows] == [1, 4]
    assert (h0.attempts, h0.invalid, h0.reserved, h1.reserved) == (1, 0, 0.25, 0.0)
    back = h0.first
    assert (back.key, back.model, back.prompt_tokens, back.max_tokens, back.digest) == (
        "r0",
        "m",
        12,
        40,
        2**62,
    )
    assert back.body is None and first.body == b"{}"  # the body stays with the batch record
    assert rows.take("batch-a") == {} and rows.batch_of("h0") is None
    assert rows.rows == 1
    rows.close()


def test_a_full_temporary_directory_is_a_clear_stop_not_a_traceback() -> None:
    rows = WaitingRows()
    rows._db.execute("PRAGMA max_page_count = 8")  # as if TMPDIR were full
    many = [Waiting.of(row(i, f"h{i}"), keep_body=False) for i in range(2000)]
    with pytest.raises(DiskFull, match=r"no room in the temporary directory .* set TMPDIR"):
        rows.put("batch-a", many)
    rows.close()
