"""What a run waiting for batches shows: each batch's state and counts, and an ETA from the
pace its lines have been finishing at (on a fake clock here; through the CLI in
`test_batch_mode`)."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.batch_api import BatchState
from pipeline.batch_wait import OpenBatch
from pipeline.progress import batches_line

pytestmark = pytest.mark.timeout(30)


def state(
    completed: int, failed: int = 0, total: int = 1000, status: str = "in_progress"
) -> BatchState:
    return BatchState(
        "batch-1", status, 0.0, "m", total, completed, failed, 86_400.0, "P", None, None, None
    )


def test_the_eta_follows_the_pace_since_the_batch_was_first_seen_running() -> None:
    batch = OpenBatch("l1", "batch-1", "m", created_after=0.0)
    assert batch.eta(state(0), now=100.0) is None  # no pace yet
    assert batch.eta(state(0), now=160.0) is None  # none finished since
    # 250 lines (200 answered, 50 failed) in 100 s: the other 750 take 300 s.
    assert batch.eta(state(200, 50), now=200.0) == pytest.approx(300.0)
    assert batch.eta(state(500), now=300.0) == pytest.approx(200.0)


def test_a_batch_first_seen_part_done_has_its_pace_from_then() -> None:
    batch = OpenBatch("l1", "batch-1", "m", created_after=0.0)
    assert batch.eta(state(400), now=1000.0) is None  # a resumed run: 400 done before it looked
    assert batch.eta(state(500), now=1100.0) == pytest.approx(500.0)


def view(id_: str, done: int, total: int, eta: float | None) -> dict[str, Any]:
    return {"id": id_, "status": "in_progress", "completed": done, "failed": 0, "total": total,
            "eta_s": eta}  # fmt: skip


def test_a_few_batches_are_shown_each_and_many_as_a_sum() -> None:
    few = [view("b1", 1200, 10_000, 840.0), view("b2", 0, 5_000, None)]
    assert (
        batches_line(few)
        == "batch b1 in_progress 1,200/10,000, eta 14m; batch b2 in_progress 0/5,000"
    )
    many = [view(f"b{i}", 100 * i, 1_000, 3600.0 * i) for i in range(1, 6)]
    assert batches_line(many) == "5 batches 1,500/5,000 requests done, eta 5.0h"
