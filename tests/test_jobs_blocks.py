"""The journal's block summary, which lets an incremental run over a large input compare only
the blocks of slots that changed: it must always equal a recount of the results (whatever
writes, replaces, moves or redoes them), a block is passed over only when it holds exactly the
answers of today's rows there, and a journal without digests (older, or of another polars) is
matched the slow way once and then has them."""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import identity
from pipeline.config import load
from pipeline.errors import InputError
from pipeline.feed import Feed
from pipeline.identity import _dirty_blocks, _identities, realign
from pipeline.job import settled_blocks
from pipeline.journal import Journal
from pipeline.journal_file import BLOCK_SLOTS
from pipeline.plan import JobPlan, plan_job
from pipeline.records import OK, Result
from pipeline.settings import transport
from pipeline.source import POSITION
from tests.helpers import run_cli, run_command, sim_get, write_job
from tests.test_jobs_identity import (
    answers,
    assert_each_row_answers_its_own_prompt,
    billed,
    edited,
    frame,
)

RECOUNT = f"""SELECT position / {BLOCK_SLOTS}, COUNT(*), SUM(retry_on_resume = 0),
    SUM(ident_check IS NULL), COALESCE(SUM(ident_check % 2147483648), 0),
    COALESCE(SUM(ident_check / 2147483648), 0)
    FROM results WHERE position >= 0 GROUP BY 1 ORDER BY 1"""


def summary_and_recount(journal: Path) -> tuple[list[Any], list[Any]]:
    with sqlite3.connect(journal) as db:
        kept = db.execute(
            "SELECT block, rows, settled, unknown, low, high FROM blocks WHERE rows > 0 ORDER BY 1"
        ).fetchall()
        return kept, db.execute(RECOUNT).fetchall()


def forget_digests(journal: Path) -> None:
    """Make the journal look as one written before digests (or by another polars)."""
    with sqlite3.connect(journal) as db:
        db.execute("UPDATE results SET digest = NULL, ident_check = NULL")
        db.execute("UPDATE meta SET value = ? WHERE name = 'digests'", (json.dumps("polars 0"),))


def test_the_summary_always_equals_a_recount(tmp_path: Path, sim_thread: Any) -> None:
    journal = tmp_path / "out.parquet.journal"
    ids = list(range(30))
    frame(ids).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        steps = [
            ("first run", ids, ()),
            ("re-sorted, rows inserted and deleted", [5, 3, 100, *range(10, 30), 101], ()),
            ("an edit, sent again", [5, 3, 100, *range(10, 30), 101], ("--reprocess-changed",)),
            ("rows back from departure", [*range(30), 100], ()),
            ("a redo", [*range(30), 100], ("--redo-where", "status = 'ok'")),
        ]
        for step, order, flags in steps:
            edited(order, {12} if step.startswith("an edit") else set()).write_csv(
                tmp_path / "in.csv"
            )
            done = run_cli(config, "--incremental", *flags)
            assert done.returncode == 0, (step, done.stderr)
            kept, recount = summary_and_recount(journal)
            assert kept == recount, step
            assert_each_row_answers_its_own_prompt(tmp_path)


@pytest.mark.parametrize("id_column", ["id", None], ids=["with an id", "without an id"])
def test_a_journal_without_digests_is_matched_by_request_then_gets_them(
    tmp_path: Path, sim_thread: Any, id_column: str | None
) -> None:
    journal = tmp_path / "out.parquet.journal"
    frame(list(range(12))).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim, id_column=id_column))
        assert run_cli(config, "--incremental").returncode == 0
        forget_digests(journal)
        order = [7, 3, 11, 0, 200, 1, 2, 4, 5, 6, 8, 9, 10]
        frame(order).write_csv(tmp_path / "in.csv")
        sim_get(sim, "ledger")  # the first run's requests
        before = sum(billed(sim).values())
        again = run_cli(config, "--incremental")
        sent = sum(billed(sim).values()) - before
    assert again.returncode == 0, again.stderr
    assert sent == 1  # the one new row; the others were matched by their requests
    assert_each_row_answers_its_own_prompt(tmp_path)
    with sqlite3.connect(journal) as db:
        (unknown,) = db.execute("SELECT COUNT(*) FROM results WHERE digest IS NULL").fetchone()
    assert unknown == 0
    kept, recount = summary_and_recount(journal)
    assert kept == recount and all(block[3] == 0 for block in kept)


def job_of(config: Path) -> Any:
    return load(
        config, {"input.incremental": True, "request.base_url": "http://127.0.0.1:9/api/v1"}
    )


@contextlib.contextmanager
def opened(
    config: Path, settled: frozenset[int] | None = None
) -> Iterator[tuple[JobPlan, Journal]]:
    """The job's plan (`settled`: the blocks to keep input for) and its journal, opened as a
    run opens them."""
    job = job_of(config)
    plan = plan_job(job, None, settled)
    with Journal.open(
        job.output.journal_path, plan.fingerprint, incremental=True, transport=transport(job),
        keyed=True,
    ) as journal:  # fmt: skip
        yield plan, journal


def realigned(plan: JobPlan, journal: Journal) -> Any:
    return realign(plan, plan.builder.seeded(journal.hash_seed), journal)


def write_done_journal(folder: Path, rows: int) -> Path:
    """A job over `rows` rows with every row answered, written straight to its journal."""
    frame(list(range(rows))).write_csv(folder / "in.csv")
    config = write_job(folder, None)
    with opened(config) as (plan, journal):
        assert plan.identities is not None
        journal.write([
            Result(position, key, completion=f"answer {key}", status=OK, digest=digest)
            for position, key, digest in plan.identities.iter_rows()
        ])  # fmt: skip
    return config


@pytest.mark.timeout(120)
def test_rows_moved_between_blocks_keep_their_answers(tmp_path: Path) -> None:
    rows = BLOCK_SLOTS + 5_000  # two blocks
    config = write_done_journal(tmp_path, rows)
    order = list(range(rows))
    order[5], order[BLOCK_SLOTS + 10] = order[BLOCK_SLOTS + 10], order[5]  # across blocks
    del order[100]  # departs
    order.insert(30_000, rows + 1)  # new, mid-file
    order += [rows + 2, rows + 3]  # new, at the end
    frame(order).write_csv(tmp_path / "in.csv")

    with opened(config) as (plan, journal):
        builder = plan.builder.seeded(journal.hash_seed)
        moved = realign(plan, builder, journal)
        # Every answer sits at the slot of the row it answers; the departed one is out.
        with sqlite3.connect(tmp_path / "out.parquet.journal") as db:
            stored = dict(db.execute("SELECT position, key FROM results WHERE position >= 0"))
        current = dict(enumerate(f"r{i}" for i in order))
        assert all(current[slot] == key for slot, key in stored.items())
        assert set(current.values()) - set(stored.values()) == {
            f"r{i}" for i in (rows + 1, rows + 2, rows + 3)
        }
        assert moved.departed == 1 and moved.changed == 0
        # Once the new rows are answered, the summary shows every block as it is: the next
        # run compares nothing row by row.
        assert plan.identities is not None
        new = plan.identities.filter(
            pl.col("key").is_in([f"r{i}" for i in (rows + 1, rows + 2, rows + 3)])
        )
        journal.write([Result(p, k, status=OK, digest=d) for p, k, d in new.iter_rows()])
        assert _dirty_blocks(journal.blocks(), _identities(plan, builder, True)) == []
    kept, recount = summary_and_recount(tmp_path / "out.parquet.journal")
    assert kept == recount


@pytest.mark.timeout(120)
def test_an_untouched_block_is_not_read_row_by_row(tmp_path: Path) -> None:
    rows = BLOCK_SLOTS + 2_000
    config = write_done_journal(tmp_path, rows)
    frame([*range(rows), rows + 1]).write_csv(tmp_path / "in.csv")  # one row appended
    with opened(config) as (plan, journal):
        read: list[Any] = []
        original = journal.identities

        def identities(blocks: list[int] | None = None, *, hashes: bool = True) -> pl.DataFrame:
            read.append(blocks)
            return original(blocks, hashes=hashes)

        journal.identities = identities  # type: ignore[method-assign]
        realigned(plan, journal)
    assert read == [[1]]  # block 0 matched as a whole; only the block with the new row read


def test_an_edit_in_a_block_is_found(tmp_path: Path) -> None:
    rows = 2_000
    config = write_done_journal(tmp_path, rows)
    edited(list(range(rows)), {1500}).write_csv(tmp_path / "in.csv")
    with opened(config) as (plan, journal):
        moved = realigned(plan, journal)
        with sqlite3.connect(tmp_path / "out.parquet.journal") as db:
            again = db.execute("SELECT key FROM results WHERE retry_on_resume = 1").fetchall()
    assert moved.changed == 1 and again == [("r1500",)]


def test_shuffled_rows_within_a_block_are_all_found(tmp_path: Path) -> None:
    rows = 3_000
    config = write_done_journal(tmp_path, rows)
    order = list(range(rows))
    random.Random(3).shuffle(order)
    frame(order).write_csv(tmp_path / "in.csv")
    with opened(config) as (plan, journal):
        moved = realigned(plan, journal)
    with sqlite3.connect(tmp_path / "out.parquet.journal") as db:
        stored = dict(db.execute("SELECT position, key FROM results"))
    assert moved.changed == 0 and moved.departed == 0
    assert stored == dict(enumerate(f"r{i}" for i in order))


def to_layout_before_blocks(journal: Path) -> None:
    """Make the journal look as the previous version left it: no digests, checks or blocks."""
    with sqlite3.connect(journal) as db:
        for trigger in ("blocks_insert", "blocks_delete", "blocks_update"):
            db.execute(f"DROP TRIGGER {trigger}")
        db.execute("DROP TABLE blocks")
        db.execute("DROP INDEX results_stale")
        db.execute("ALTER TABLE results DROP COLUMN ident_check")
        db.execute("ALTER TABLE results DROP COLUMN digest")
        db.execute("DELETE FROM meta WHERE name = 'digests'")


def test_a_journal_from_before_the_blocks_is_brought_up_to_date(
    tmp_path: Path, sim_thread: Any
) -> None:
    journal = tmp_path / "out.parquet.journal"
    frame(list(range(10))).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        assert run_cli(config, "--incremental").returncode == 0
        to_layout_before_blocks(journal)
        frame([9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 10]).write_csv(tmp_path / "in.csv")
        again = run_cli(config, "--incremental")
        paid = sum(billed(sim).values())
    assert again.returncode == 0, again.stderr
    assert paid == 11  # ten, then only the new one
    assert_each_row_answers_its_own_prompt(tmp_path)
    kept, recount = summary_and_recount(journal)
    assert kept == recount and kept[0][1:4] == (11, 11, 0)


@pytest.mark.timeout(120)
def test_a_resume_passes_settled_blocks_without_reading_them(tmp_path: Path) -> None:
    rows = BLOCK_SLOTS + 2_000
    config = write_done_journal(tmp_path, rows)
    frame([*range(rows), rows + 1]).write_csv(tmp_path / "in.csv")
    settled = settled_blocks(tmp_path / "out.parquet.journal")
    assert settled == frozenset({0})
    asked: list[tuple[int, int]] = []
    with opened(config, settled) as (plan, journal):
        assert plan.kept is not None and plan.kept.batches[0][POSITION][0] >= BLOCK_SLOTS - 50_000
        builder = plan.builder.seeded(journal.hash_seed)
        realign(plan, builder, journal)

        def settled_slots(low: int, high: int) -> set[int]:
            asked.append((low, high))
            return journal.settled_slots(low, high)

        (tmp_path / "in.csv").unlink()  # the feed reads nothing again
        feed = Feed(plan, builder, settled_slots, journal.settled_blocks())
        sent = [row.key for rows, _ in feed.batches() for row in rows]
    assert sent == [f"r{rows + 1}"]
    # Only the batches reaching into block 1 were asked about, not the 65,536 slots of block 0.
    assert asked and sum(high - low for low, high in asked) < 5_000


def test_a_journal_the_previous_version_wrote_can_be_exported_before_any_run(
    tmp_path: Path, sim_thread: Any
) -> None:
    # export opens the journal read-only: nothing brings it up to date first.
    frame(list(range(10))).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        assert run_cli(config, "--incremental").returncode == 0
    to_layout_before_blocks(tmp_path / "out.parquet.journal")
    frame([9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 10]).write_csv(tmp_path / "in.csv")
    exported = run_command("export", config, "--incremental")
    assert exported.returncode == 0, exported.stderr
    out = assert_each_row_answers_its_own_prompt(tmp_path, "out.partial.parquet", rows=10)
    assert out["status"].to_list() == ["ok"] * 10 + ["pending"]


@pytest.mark.timeout(120)
def test_edits_crowded_into_one_block_are_measured_against_every_row_done(
    tmp_path: Path,
) -> None:
    rows = BLOCK_SLOTS + 5_000
    config = write_done_journal(tmp_path, rows)
    ids = list(range(rows))
    # 2,000 edits: two fifths of the second block, a thirty-fifth of the rows done.
    second_block = set(range(BLOCK_SLOTS, BLOCK_SLOTS + 2_000))
    edited(ids, second_block).write_csv(tmp_path / "in.csv")
    with opened(config) as (plan, journal):
        assert realigned(plan, journal).changed == 2_000
    # 8,000 more (those 2,000 are no longer done): over a tenth of the 68,536 done.
    edited(ids, second_block | set(range(8_000))).write_csv(tmp_path / "in.csv")
    refused = pytest.raises(InputError, match="8,000 of 68,536 rows done earlier have changed")
    with opened(config) as (plan, journal), refused:
        realigned(plan, journal)


@pytest.mark.parametrize("id_column", ["id", None], ids=["with an id", "without an id"])
def test_a_journal_without_digests_is_matched_the_slow_way_only_once_though_rows_departed(
    tmp_path: Path, sim_thread: Any, id_column: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = tmp_path / "out.parquet.journal"
    frame(list(range(12))).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = write_job(tmp_path, sim, id_column=id_column)
        assert run_cli(str(config), "--incremental").returncode == 0
    forget_digests(journal)
    frame([11, 3, 0, 1, 2, 4, 5, 6, 7, 8, 9]).write_csv(tmp_path / "in.csv")  # r10 departs
    slow: list[int] = []
    original = identity._request_hashes

    def request_hashes(*args: Any) -> pl.DataFrame:
        slow.append(1)
        return original(*args)

    monkeypatch.setattr(identity, "_request_hashes", request_hashes)
    for _ in range(2):
        with opened(config) as (plan, journal_):
            moved = realigned(plan, journal_)
    assert slow == [1]  # the second run found every row's digest
    assert moved.departed == 0 and moved.changed == 0
    with sqlite3.connect(journal) as db:
        stored = dict(db.execute("SELECT position, completion FROM results WHERE position >= 0"))
        (departed,) = db.execute("SELECT COUNT(*) FROM results WHERE position < 0").fetchone()
    assert departed == 1
    texts = frame([11, 3, 0, 1, 2, 4, 5, 6, 7, 8, 9])["text"]
    assert sorted(stored) == list(range(11))
    for slot, completion in stored.items():  # every answer at the row it answers
        assert answers(texts[slot], completion), (slot, completion)
    # The row that left comes back: answered from the journal, nothing paid.
    frame(list(range(12))).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        back = run_cli(str(write_job(tmp_path, sim, id_column=id_column)), "--incremental")
        paid = sum(billed(sim).values())
    assert back.returncode == 0, back.stderr
    assert paid == 0
    assert_each_row_answers_its_own_prompt(tmp_path)


def test_an_estimate_does_not_trust_digests_another_polars_made(
    tmp_path: Path, sim_thread: Any
) -> None:
    # A run forgets such digests as it opens the journal; an estimate only reads it.
    journal = tmp_path / "out.parquet.journal"
    frame(list(range(12))).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        assert run_cli(config, "--incremental").returncode == 0
        with sqlite3.connect(journal) as db:  # as another polars would have hashed the rows
            db.execute("UPDATE results SET digest = digest + 1, ident_check = ident_check + 1")
            db.execute(
                "UPDATE meta SET value = ? WHERE name = 'digests'", (json.dumps("polars 0"),)
            )
        frame([*reversed(range(12)), 12]).write_csv(tmp_path / "in.csv")
        estimated = run_command("estimate", config, "--incremental", "--json")
    assert estimated.returncode == 0, estimated.stderr
    assert json.loads(estimated.stdout)["todo_rows"] == 1  # the new row, nothing "changed"
