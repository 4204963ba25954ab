"""The journal's record of provider batches: a batch is on disk before its create is sent,
survives a SIGKILL at any point, and is marked done in the transaction that journals its
answers, so a re-run neither loses nor pays twice for any of them."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.config import load
from pipeline.journal import Journal
from pipeline.journal_batches import DONE, SUBMITTED, SUBMITTING
from pipeline.records import OK, Result

pytestmark = pytest.mark.timeout(60)
# What a journal is opened for: any one job's fingerprint, the same each time.
CONFIG = {"input.path": "in.csv", "output.path": "out.parquet", "prompt.template": "{text}"}
JOB = {"input": [], "config": load(None, CONFIG).request_fingerprint()}
LINES = [("h0", "h0", b"{}"), ("h1", "h1", b"{}"), ("h2", "h2", b"{}")]


def answer(position: int, request_hash: str) -> Result:
    return Result(
        position, str(position), completion="ok", status=OK, cost_usd=0.001,
        request_hash=request_hash,
    )  # fmt: skip


def tables(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        db.close()


def pending(journal: Journal) -> list[str | None]:
    """The running batch each of the three lines is in."""
    return [journal.batches.pending_batch_of(h) for h in ("h0", "h1", "h2")]


def test_a_job_never_sent_in_batch_mode_keeps_its_journal_as_it_was(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "j", JOB) as journal:
        journal.write([answer(0, "h0")])
        assert journal.batches.unfinished() == []
        assert journal.batches.pending_batch_of("h0") is None
    assert "batches" not in tables(tmp_path / "j")


def test_a_batch_is_on_disk_before_it_is_sent_and_its_server_id_after(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "j", JOB) as journal:
        record = journal.batches.begin("m", LINES, created_after=1000.0, reserved_usd=0.5)
    with Journal.open(tmp_path / "j", JOB) as journal:
        (found,) = journal.batches.unfinished()
        assert (found.local_id, found.state, found.lines, found.server_id) == (
            record.local_id, SUBMITTING, 3, None,
        )  # fmt: skip
        assert found.created_after == 1000.0 and found.reserved_usd == 0.5
        assert journal.batches.lines(record.local_id) == {c: h for c, h, _ in LINES}
        assert journal.batches.bodies(record.local_id, ["h1"]) == {"h1": b"{}"}
        assert pending(journal) == [record.local_id] * 3
        journal.batches.submitted(record.local_id, "batch-1-x", "validating")
    with Journal.open(tmp_path / "j", JOB) as journal:
        (found,) = journal.batches.unfinished()
        assert (found.state, found.server_id, found.status) == (
            SUBMITTED,
            "batch-1-x",
            "validating",
        )
        assert journal.batches.server_ids() == {"batch-1-x"}


def test_answers_and_the_batch_being_done_are_committed_together(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "j", JOB) as journal:
        log = journal.batches
        record = log.begin("m", LINES, created_after=1000.0)
        log.submitted(record.local_id, "batch-1-x", "validating")
        answers = [answer(i, f"h{i}") for i in range(3)]

        def broken(db: sqlite3.Connection) -> None:
            log.finishing(record.local_id, "completed", 0.003, 0.003, 2000.0)(db)
            raise OSError("disk gone mid-commit")

        with pytest.raises(OSError, match="disk gone"):
            journal.write(answers, then=broken)
        assert journal.settled_count(below=3) == 0  # neither the answers...
        assert [r.state for r in log.unfinished()] == [SUBMITTED]  # ...nor the batch's end
        journal.write(
            answers, then=log.finishing(record.local_id, "completed", 0.003, 0.003, 2000.0)
        )
        assert journal.settled_count(below=3) == 3
        assert log.unfinished() == [] and pending(journal) == [None] * 3
    db = sqlite3.connect(tmp_path / "j")
    assert db.execute("SELECT state, status, cost_usd FROM batches").fetchall() == [
        (DONE, "completed", 0.003)
    ]
    db.close()


@pytest.mark.parametrize("moment", ["after_begin", "after_submitted"])
def test_a_sigkill_leaves_the_batch_recorded(tmp_path: Path, moment: str) -> None:
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from pipeline.config import load
        from pipeline.journal import Journal
        job = {{"input": [], "config": load(None, {CONFIG!r}).request_fingerprint()}}
        journal = Journal.open(Path({str(tmp_path / "j")!r}), job)
        record = journal.batches.begin("m", {LINES!r}, created_after=1000.0)
        if {moment!r} == "after_submitted":
            journal.batches.submitted(record.local_id, "batch-1-x", "validating")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", script], timeout=30)
    assert killed.returncode == -9
    with Journal.open(tmp_path / "j", JOB) as journal:
        (found,) = journal.batches.unfinished()
        assert found.state == (SUBMITTED if moment == "after_submitted" else SUBMITTING)
        assert pending(journal) == [found.local_id] * 3
