"""Killing the job (SIGKILL, SIGTERM, SIGINT) and running it again: every row exactly once, and
nothing paid twice except what was in flight at the kill."""

from __future__ import annotations

import json
import signal
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.simulator import messages_digest
from tests.helpers import journaled_positions, run_cli, sim_get, start_cli, wait_for, write_job

ROWS = 240
CONCURRENCY = 8
ROW_GROUP = 50  # the output is written a group at a time as groups finish, on resume too


def setup_job(folder: Path, sim: Any) -> tuple[str, list[str]]:
    texts = [f"row {i}: the kettle boils fast" for i in range(ROWS)]
    pl.DataFrame({"id": [f"k{i}" for i in range(ROWS)], "text": texts}).write_csv(folder / "in.csv")
    config = write_job(
        folder, sim, extra=f"[limits]\nconcurrency = {CONCURRENCY}\n",
        output=f"row_group_size = {ROW_GROUP}",
    )  # fmt: skip
    return str(config), texts


def assert_every_row_once_and_no_settled_row_repaid(
    folder: Path, sim: Any, texts: list[str], settled_at_kill: set[int], billed_at_kill: int
) -> None:
    out = pl.read_parquet(folder / "out.parquet")
    assert out["id"].to_list() == [f"k{i}" for i in range(ROWS)]  # every row, once, in order
    assert out["status"].to_list() == ["ok"] * ROWS
    assert pq.ParquetFile(folder / "out.parquet").num_row_groups == -(-ROWS // ROW_GROUP)
    assert not list(folder.glob(".out.parquet.tmp-*"))  # no unfinished file left behind
    billed = Counter(e["messages_digest"] for e in sim_get(sim, "ledger")["data"])
    by_digest = {messages_digest([{"role": "user", "content": t}]): i for i, t in enumerate(texts)}
    paid_twice = {by_digest[d] for d, n in billed.items() if n > 1}
    assert not paid_twice & settled_at_kill  # a row already in the journal was never sent again
    # Re-paid: only answers that arrived but were not yet committed when the process died.
    assert len(paid_twice) <= billed_at_kill - len(settled_at_kill)
    assert set(billed) == set(by_digest)


@pytest.mark.parametrize("kill_after", [20, 90, 170])
def test_sigkill_mid_run_then_rerun_finishes_every_row_exactly_once(
    tmp_path: Path, sim_thread: Any, kill_after: int
) -> None:
    with sim_thread(latency=0.02) as sim:
        config, texts = setup_job(tmp_path, sim)
        proc = start_cli(config)
        wait_for(
            lambda: len(sim_get(sim, "ledger")["data"]) >= kill_after, what=f"{kill_after} answers"
        )
        proc.kill()
        proc.communicate(timeout=10)
        settled = journaled_positions(tmp_path)
        billed_at_kill = len(sim_get(sim, "ledger")["data"])
        assert not (tmp_path / "out.parquet").exists()
        rerun = run_cli(config)
        assert rerun.returncode == 0, rerun.stderr
        assert f"({len(settled)} done by earlier runs)" in rerun.stderr
        assert_every_row_once_and_no_settled_row_repaid(
            tmp_path, sim, texts, settled, billed_at_kill
        )


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_flush_the_journal_and_exit_with_their_code(
    tmp_path: Path, sim_thread: Any, signum: int, code: int
) -> None:
    with sim_thread(latency=0.02) as sim:
        config, texts = setup_job(tmp_path, sim)
        proc = start_cli(config)
        wait_for(lambda: len(sim_get(sim, "ledger")["data"]) >= 60, what="60 answers")
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == code, stderr
        assert "Run the same command again to resume" in stderr and "Traceback" not in stderr
        assert not [*tmp_path.glob("out.parquet"), *tmp_path.glob(".out.parquet.tmp-*")]
        settled = journaled_positions(tmp_path)
        answered = len(sim_get(sim, "ledger")["data"])
        # Everything answered before the stop was flushed, except at most what the grace period cut off.
        assert len(settled) >= answered - CONCURRENCY
        rerun = run_cli(config)
        assert rerun.returncode == 0, rerun.stderr
        assert_every_row_once_and_no_settled_row_repaid(tmp_path, sim, texts, settled, answered)


def test_a_second_ctrl_c_during_the_flush_changes_nothing(tmp_path: Path, sim_thread: Any) -> None:
    with sim_thread(latency=0.02) as sim:
        config, texts = setup_job(tmp_path, sim)
        proc = start_cli(config)
        wait_for(lambda: len(sim_get(sim, "ledger")["data"]) >= 40, what="40 answers")
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 130, stderr
        settled = journaled_positions(tmp_path)
        answered = len(sim_get(sim, "ledger")["data"])
        rerun = run_cli(config)
        assert rerun.returncode == 0, rerun.stderr
        assert_every_row_once_and_no_settled_row_repaid(tmp_path, sim, texts, settled, answered)


def test_finished_row_groups_are_written_while_a_row_is_still_awaited(
    tmp_path: Path, sim_thread: Any
) -> None:
    """The output grows group by group while the job runs, so the end of a long job is not
    spent writing it; a run that stops removes its unfinished file."""
    texts = [f"row {i}" for i in range(45)]
    texts[-1] = "[[sim:hang*1]] the last row, unanswered at first"
    pl.DataFrame({"id": [f"k{i}" for i in range(45)], "text": texts}).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim, output="row_group_size = 10"))
        proc = start_cli(config)
        try:
            wait_for(lambda: len(journaled_positions(tmp_path)) == 44, what="all rows but one")
            wait_for(
                lambda: any(p.stat().st_size for p in tmp_path.glob(".out.parquet.tmp-*")),
                what="row groups on disk",
            )
            assert proc.poll() is None  # still waiting for the last row
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 143, stderr
        assert not [*tmp_path.glob("out.parquet"), *tmp_path.glob(".out.parquet.tmp-*")]
        rerun = run_cli(config)  # the last row is answered this time
    assert rerun.returncode == 0, rerun.stderr
    out = tmp_path / "out.parquet"
    assert pl.read_parquet(out)["id"].to_list() == [f"k{i}" for i in range(45)]
    assert pq.ParquetFile(out).metadata.num_row_groups == 5
    assert json.loads(pq.read_metadata(out).metadata[b"pipeline"])["ok"] == 45


def test_each_output_row_is_its_journaled_result_when_rows_finish_far_out_of_order(
    tmp_path: Path, sim_thread: Any
) -> None:
    """Groups are written from the results kept in memory, or, for rows that finished far ahead
    of the writing (here: all after a first row that hangs), read back from the journal; either
    way every output row holds exactly what the journal holds for it."""
    texts = ["[[sim:hang*1]] the first row, answered on its second attempt"]
    texts += [f"row {i}" for i in range(1, 60)]
    pl.DataFrame({"id": [f"k{i}" for i in range(60)], "text": texts}).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim, output="row_group_size = 2"))
        done = run_cli(config, "--timeout", "1")
    assert done.returncode == 0, done.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    with sqlite3.connect(tmp_path / "out.parquet.journal") as db:
        journaled = pl.read_database(
            "SELECT key AS id, completion, generation_id, cost_usd, attempts, status FROM results "
            "ORDER BY position",
            db,
        )
    assert out.select(journaled.columns).equals(journaled)
    assert out["attempts"].to_list() == [2] + [1] * 59  # the first row did finish last
    assert pq.ParquetFile(tmp_path / "out.parquet").metadata.num_row_groups == 30


async def test_stopping_the_writer_waits_for_a_commit_under_way(tmp_path: Path) -> None:
    """The end of a run must not read the journal while the last periodic commit is still in
    its thread: that left the output write without the last rows ("journal lacks results")."""
    import asyncio
    import threading

    from pipeline.journal import Journal
    from pipeline.records import OK, Result
    from pipeline.writer import JournalWriter

    with Journal.open(tmp_path / "j", {}) as journal:
        write, started, release = journal.write, threading.Event(), threading.Event()

        def slow_write(results: list[Result]) -> None:
            started.set()
            release.wait(10)
            write(results)

        journal.write = slow_write  # type: ignore[method-assign]
        writer = JournalWriter(journal, interval=0.001)
        flusher = asyncio.create_task(writer.run())
        writer.add(Result(0, "a", status=OK, completion="x"))
        await asyncio.to_thread(started.wait, 10)  # a periodic commit is now in its thread
        asyncio.get_running_loop().call_later(0.05, release.set)
        writer.stop()
        await flusher
        await writer.flush()
        assert journal.results_between(0, 1) != []  # landed before the run moves on
        release.set()


def test_a_commit_of_any_size_stores_every_result_and_a_replaced_one_keeps_its_spend(
    tmp_path: Path,
) -> None:
    """Results go in many rows to a statement, the rest one by one: none may be lost, reordered
    or mixed up, and a paid answer that a later result replaces still counts in the spend."""
    from pipeline.journal import ROWS_PER_INSERT, Journal
    from pipeline.records import API, OK, Result

    def result(position: int, cost: float) -> Result:
        return Result(
            position, f"k{position}", status=OK, completion=f"answer {position}", cost_usd=cost,
            response_source=API, retry_on_resume=position % 2 == 0, request_hash=f"h{position}",
        )  # fmt: skip

    count = 2 * ROWS_PER_INSERT + 7
    with Journal.open(tmp_path / "j", {}) as journal:
        journal.write([result(p, 0.5) for p in range(count)])
        journal.write([result(p, 0.25) for p in range(3, 3 + ROWS_PER_INSERT)])  # sent again
        stored = journal.results_between(0, count)
        totals = journal.totals()
    expected = [result(p, 0.25 if 3 <= p < 3 + ROWS_PER_INSERT else 0.5) for p in range(count)]
    assert stored == [r.as_tuple() for r in expected]
    assert totals.replaced_answers == ROWS_PER_INSERT
    assert totals.true_cost_usd == pytest.approx(0.5 * count + 0.25 * ROWS_PER_INSERT)


# Request hashes made by earlier versions (before the shared JSON encoder): journals and response
# caches look answers up by them, so a change in how bodies are encoded would silently re-bill
# every resumed or cached row.
EARLIER_HASHES = {
    "plain": ["c6bcacb930b940f40b74e866e71aec3e", "e7784341b8e3d691a54617f0eeb0f705"],
    "labels, system, seed, n = 2, two models": [
        "16ac8382f9a8949d94586af7fe513c24", "3715beed9e461ec66fa6a284a366612c",
        "888f7a2ed85e0292618309fc1e1353c5", "1d249e5d3c0eeb72e43e963f5290f157",
        "7391ea670da767a8f716df6ebb8eca37", "2abedd38598c9560b88493bff80edbde",
        "1629d4bc4d172047af62ebcf43f40e1b", "54955241f375a2fc2e606d1512b91f12",
    ],
}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("plain", {"prompt.template": "{text}"}),
        (
            "labels, system, seed, n = 2, two models",
            {
                "prompt.template": 'Say {text} ü "q"',
                "prompt.system": "sys",
                "request.labels": ["a", "b"],
                "request.n": 2,
                "request.seed": 3,
                "request.models": ["m/a", "m/b"],
            },
        ),
    ],
)
def test_request_bodies_hash_as_earlier_versions_did(name: str, overrides: dict[str, Any]) -> None:
    from pipeline import config
    from pipeline.prompts import RequestBuilder
    from pipeline.source import POSITION

    job = config.load(None, {"input.path": "in.parquet", "output.path": "out.parquet", **overrides})
    batch = pl.DataFrame({POSITION: [0, 1], "text": ['héllo\n"x"', "b"]}).with_columns(
        pl.col(POSITION).cast(pl.Int64)
    )
    rows = RequestBuilder(job, batch.schema).rows(batch)
    assert [row.request_hash for row in rows] == EARLIER_HASHES[name]


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_the_usual_request_is_encoded_as_the_general_encoder_does(text: str) -> None:
    """One user message of text takes a shortcut past the JSON encoder; its bytes (and so its
    request hash) must be the encoder's, whatever the text holds."""
    from pipeline.prompts import _encode, _encode_messages

    messages = [{"role": "user", "content": text}]
    assert _encode_messages(messages) == _encode(messages)
    assert _encode_messages([*messages, *messages]) == _encode([*messages, *messages])
