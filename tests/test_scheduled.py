"""Scheduled runs: incremental jobs over a growing input, --max-runtime, JSON logs and
`pipeline status` — the real CLI against the simulator, as cron would run it."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import read_metadata
from pipeline.simulator import messages_digest
from tests.helpers import run_cli, sim_get, start_cli, status, wait_for, write_job


def rows(start: int, stop: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "id": [f"r{i}" for i in range(start, stop)],
            "text": [f"item {i}" for i in range(start, stop)],
        }
    )


def append_csv(path: Path, frame: pl.DataFrame) -> None:
    with path.open("a") as f:
        f.write(frame.write_csv(include_header=not path.exists() or path.stat().st_size == 0))


def billed(sim: Any) -> Counter[str]:
    return Counter(entry["messages_digest"] for entry in sim_get(sim, "ledger")["data"])


# ------------------------------------------------------------------------- incremental


def test_three_runs_over_a_growing_file_bill_each_row_once_and_output_them_all(
    tmp_path: Path, sim_thread: Any
) -> None:
    source = tmp_path / "in.csv"
    with sim_thread() as sim:
        config = write_job(tmp_path, sim)
        summaries = []
        for start, stop in ((0, 10), (10, 25), (25, 26)):
            append_csv(source, rows(start, stop))
            done = run_cli(str(config), "--incremental")
            assert done.returncode == 0, done.stderr
            summaries.append(done.stderr)
            assert pl.read_parquet(tmp_path / "out.parquet")["id"].to_list() == [
                f"r{i}" for i in range(stop)
            ]
        counts = billed(sim)
    assert len(counts) == 26 and set(counts.values()) == {1}
    assert (
        "(10 done by earlier runs)" in summaries[1] and "(25 done by earlier runs)" in summaries[2]
    )
    assert read_metadata(tmp_path / "out.parquet")["ok"] == 26


def test_new_files_in_a_glob_are_picked_up_and_a_non_incremental_run_refuses_the_change(
    tmp_path: Path, sim_thread: Any
) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    rows(0, 5).write_parquet(incoming / "2026-11-01.parquet")
    with sim_thread() as sim:
        config = write_job(tmp_path, sim, input_name="incoming/*.parquet")
        assert run_cli(str(config), "--incremental").returncode == 0
        rows(5, 8).write_parquet(incoming / "2026-11-02.parquet")
        refused = run_cli(str(config))
        done = run_cli(str(config), "--incremental")
        counts = billed(sim)
    assert refused.returncode == 1 and "the input was 1 file(s) and is now 2" in refused.stderr
    assert done.returncode == 0, done.stderr
    assert pl.read_parquet(tmp_path / "out.parquet").height == 8
    assert len(counts) == 8 and set(counts.values()) == {1}


def test_a_changed_row_kept_then_reprocessed_never_shows_its_stale_answer_mid_write(
    tmp_path: Path, sim_thread: Any
) -> None:
    source = tmp_path / "in.csv"
    rows(0, 6).write_csv(source)
    # The edited row's first attempt times out: meanwhile its row group must not be written
    # with the answer it had before.
    edited = "[[sim:hang*1]] item 2, edited"
    with sim_thread() as sim:
        config = write_job(tmp_path, sim, output="row_group_size = 2")
        assert run_cli(str(config), "--incremental").returncode == 0
        changed = rows(0, 6).with_columns(
            pl.when(pl.col("id") == "r2")
            .then(pl.lit(edited))
            .otherwise(pl.col("text"))
            .alias("text")
        )
        changed.write_csv(source)
        kept = run_cli(str(config), "--incremental", "--keep-changed")
        after_kept = billed(sim)
        stale = pl.read_parquet(tmp_path / "out.parquet")["stale"].to_list()
        redone = run_cli(str(config), "--incremental", "--reprocess-changed", "--timeout", "1")
        after_redone = billed(sim)
        spent = sum(entry["cost"] for entry in sim_get(sim, "ledger")["data"])
    assert kept.returncode == 0 and "1 row(s) changed since they were done: kept" in kept.stderr
    assert stale == [False, False, True, False, False, False]
    assert sum(after_kept.values()) == 6  # nothing sent
    assert redone.returncode == 0 and "sent again" in redone.stderr
    assert sum(after_redone.values()) == 7  # only the edited row
    frame = pl.read_parquet(tmp_path / "out.parquet").filter(pl.col("id") == "r2")
    assert frame["text"].item() == edited
    digest = messages_digest([{"role": "user", "content": edited}])
    assert frame["completion"].item().startswith(f"sim:{digest}")
    # The answer the edited row had before was paid for too: the job's spend keeps it.
    meta = read_metadata(tmp_path / "out.parquet")
    assert meta["replaced_answers"] == 1 and meta["replaced_cost_usd"] > 0
    assert meta["true_cost_usd"] == pytest.approx(spent, rel=1e-9)
    assert "1 earlier answer(s), since replaced by a new one, cost $" in redone.stderr


# ------------------------------------------------------------------------ max runtime


@pytest.mark.timeout(120)
def test_max_runtime_stops_in_time_with_the_journal_intact_and_the_next_run_finishes(
    tmp_path: Path, sim_thread: Any
) -> None:
    rows(0, 120).write_csv(tmp_path / "in.csv")
    with sim_thread(latency=0.1) as sim:
        config = write_job(tmp_path, sim, extra="[limits]\nconcurrency = 2\n")
        started = time.monotonic()
        stopped = run_cli(str(config), "--max-runtime", "3s", "--log-format", "json")
        took = time.monotonic() - started
        first = sum(billed(sim).values())
        journaled = status(config)["done"]
        written = (tmp_path / "out.parquet").exists()
        finished = run_cli(str(config))
        counts = billed(sim)
    assert stopped.returncode == 6, stopped.stderr
    assert took < 3 + 1.5  # the limit counts from the start of the job; start-up and exit on top
    events = [json.loads(line) for line in stopped.stderr.splitlines()]
    assert events[-1]["event"] == "exit" and events[-1]["exit_code"] == 6
    assert any(e["event"] == "stopping" and e["reason"] == "max_runtime" for e in events)
    assert 0 < journaled == first < 120  # every answer that was paid for is in the journal
    assert not written  # the output appears only when every row is done
    assert finished.returncode == 0, finished.stderr
    assert pl.read_parquet(tmp_path / "out.parquet").height == 120
    assert len(counts) == 120 and set(counts.values()) == {1}


# ---------------------------------------------------------------------- logs and status


def test_json_logs_parse_carry_the_summary_and_keep_prompts_out_unless_asked(
    tmp_path: Path, sim_thread: Any
) -> None:
    frame = rows(0, 12).with_columns(
        pl.when(pl.col("id") == "r3")
        .then(pl.lit("secret plan [[sim:403*]]"))
        .otherwise(pl.col("text"))
        .alias("text")
    )
    frame.write_csv(tmp_path / "in.csv")
    log = tmp_path / "job.log"
    with sim_thread() as sim:
        config = write_job(tmp_path, sim)
        quiet = run_cli(str(config), "--log-format", "json", "--log-file", str(log))
        text = log.read_text()
        verbose = run_cli(str(config), "--restart", "--log-format", "json", "--log-prompts")
    assert quiet.returncode == 3 and quiet.stderr == ""
    events = [json.loads(line) for line in text.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "summary"
    failure = next(e for e in events if e["event"] == "row_failed")
    assert (
        failure["key"] == "r3" and failure["error_type"] == "http_403" and "prompt" not in failure
    )
    assert "secret plan" not in text and "\x1b" not in text and "\r" not in text
    summary = events[-1]
    output = pl.read_parquet(tmp_path / "out.parquet")
    assert summary["exit_code"] == 3 and summary["ok"] == 11 and summary["failed"] == 1
    assert summary["cost_usd"] == pytest.approx(output["cost_usd"].sum())
    logged = [json.loads(line) for line in verbose.stderr.splitlines()]
    assert (
        next(e for e in logged if e["event"] == "row_failed")["prompt"]
        == "secret plan [[sim:403*]]"
    )


def test_a_429_storm_is_logged_as_it_starts(tmp_path: Path, sim_thread: Any) -> None:
    rows(0, 8).with_columns(pl.col("text") + " [[sim:429*2]]").write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim)), "--log-format", "json")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines()]
    storm = next(e for e in events if e["event"] == "rate_limited")
    assert storm["responses_429"] >= 1 and storm["since_last"] == storm["responses_429"]
    assert events.index(storm) < len(events) - 1 and events[-1]["event"] == "summary"


def test_a_journal_from_an_earlier_version_still_reports_and_resumes(
    tmp_path: Path, sim_thread: Any
) -> None:
    rows(0, 6).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = write_job(tmp_path, sim)
        assert run_cli(str(config), "--limit", "3").returncode == 0
        # As versions before replaced_answers left it: `status` opens it read-only, as it is.
        with contextlib.closing(sqlite3.connect(tmp_path / "out.parquet.journal")) as db:
            db.executescript("DROP TRIGGER keep_replaced_spend; DROP TABLE replaced_answers;")
        earlier = status(config)
        resumed = run_cli(str(config))
        after = status(config)
    assert earlier["done"] == 3 and earlier["true_cost_usd"] == pytest.approx(earlier["cost_usd"])
    assert resumed.returncode == 0, resumed.stderr
    assert after["done"] == 6 and after["true_cost_usd"] == pytest.approx(after["cost_usd"])


def test_status_agrees_with_the_output_and_sees_a_running_job(
    tmp_path: Path, sim_thread: Any
) -> None:
    rows(0, 40).write_csv(tmp_path / "in.csv")
    with sim_thread(latency=0.2) as sim:
        config = write_job(tmp_path, sim, extra="[limits]\nconcurrency = 2\n")
        before = status(config)
        job = start_cli(str(config), "--quiet")
        try:
            wait_for(lambda: status(config)["done"] > 0, what="a first journaled row")
            during = status(config)
        finally:
            job.communicate(timeout=60)
        after = status(config)
    assert before["done"] == 0 and before["remaining"] == 40 and not before["running"]
    assert during["running"] and during["lock_holder"] == str(job.pid), during
    assert during["remaining"] > 0
    assert job.returncode == 0
    output = pl.read_parquet(tmp_path / "out.parquet")
    assert not after["running"] and after["output_exists"]
    assert after["rows"] == after["done"] == output.height == 40 and after["remaining"] == 0
    assert after["ok"] == (output["status"] == "ok").sum()
    assert after["cost_usd"] == pytest.approx(output["cost_usd"].sum())
    assert after["rows_per_s_last_minute"] > 0
