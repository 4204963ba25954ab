"""Budgets for recurring runs: a cap per run and a rolling cap over the last 24 hours, beside the
whole job's `max_cost`; each stop names the cap, its figures and, for the rolling one, when it
frees up. The rolling window is aged by writing `done_at` into the journal, as time would."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.helpers import run_cli, sim_get, write_job
from tests.test_money import pipeline_cmd

DAY = 86_400.0


def write_rows(folder: Path, n: int) -> None:
    """`n` rows of the same length (so of about the same cost), ids r0..; a longer input keeps
    the earlier rows as they were, as a growing export does."""
    texts = [
        f"review {i:04d}: the kettle is quiet and boils fast, would buy again" for i in range(n)
    ]
    pl.DataFrame({"id": [f"r{i}" for i in range(n)], "text": texts}).write_csv(folder / "in.csv")


def billed(sim: Any) -> float:
    """What the simulator has charged so far, every attempt included."""
    return float(sim_get(sim, "ledger")["total_cost"])


def age_answers(folder: Path, paid_at: float) -> None:
    """Move every answer's payment time to `paid_at`, as if it had been paid then."""
    with sqlite3.connect(folder / "out.parquet.journal") as db:
        db.execute("UPDATE results SET done_at = ?", (paid_at,))


def events(log: str, name: str) -> list[dict[str, Any]]:
    found = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [event for event in found if event["event"] == name]


def test_a_per_run_cap_lets_a_recurring_job_keep_working_run_after_run(
    tmp_path: Path, sim_thread: Any
) -> None:
    """The job's total passes the per-run cap after the first runs, and every run still spends
    up to the cap on its own rows; the whole job's max_cost, set to the same figure, dead-ends."""
    write_rows(tmp_path, 10)
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim, extra="[limits]\nconcurrency = 4\n"))
        first = run_cli(config, "--incremental", "--max-tokens", "40")
        ten_rows = billed(sim)
        cap = f"{1.5 * ten_rows:.8f}"
        write_rows(tmp_path, 20)
        second = run_cli(config, "--incremental", "--max-tokens", "40", "--max-cost-per-run", cap)
        after_second = billed(sim)
        write_rows(tmp_path, 60)
        whole_job = run_cli(config, "--incremental", "--max-tokens", "40", "--max-cost", cap)
        after_whole_job = billed(sim)
        third = run_cli(config, "--incremental", "--max-tokens", "40", "--max-cost-per-run", cap)
        after_third = billed(sim)
        fourth = run_cli(config, "--incremental", "--max-tokens", "40", "--max-cost-per-run", cap)
        after_fourth = billed(sim)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert after_second > float(cap), "the job's total is above the per-run cap"
    assert whole_job.returncode == 4 and after_whole_job == after_second, whole_job.stderr
    assert "cost.max_cost (--max-cost)" in whole_job.stderr
    assert third.returncode == 4, third.stderr
    assert "cost.max_cost_per_run (--max-cost-per-run)" in third.stderr
    assert f"this run has spent ${after_third - after_second:.6f}" in third.stderr
    assert 0 < after_third - after_second <= float(cap)
    assert fourth.returncode == 4, fourth.stderr
    assert 0 < after_fourth - after_third <= float(cap)


def test_a_rolling_cap_refuses_at_the_cap_names_when_it_frees_up_and_allows_once_spend_ages_out(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_rows(tmp_path, 10)
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim, extra="[limits]\nconcurrency = 4\n"))
        first = run_cli(config, "--incremental", "--max-tokens", "40")
        day_spend = billed(sim)
        cap = f"{day_spend:.10f}"
        paid_at = int(time.time() - 20 * 3600)  # 20 h ago: frees up in 4 h
        age_answers(tmp_path, paid_at)
        write_rows(tmp_path, 40)
        flags = ("--incremental", "--max-tokens", "40", "--max-cost-per-day", cap)
        refused = run_cli(config, *flags)
        logged = run_cli(config, *flags, "--log-format", "json")
        status = pipeline_cmd("status", config, "--json", "--max-cost-per-day", cap)
        after_refusals = billed(sim)
        age_answers(tmp_path, time.time() - 25 * 3600)  # aged out of the last 24 h
        started = time.time()
        allowed = run_cli(config, *flags, "--log-format", "json")
        ended = time.time()
        spent_today = billed(sim) - after_refusals
    assert first.returncode == 0, first.stderr
    assert refused.returncode == 4, refused.stderr
    assert after_refusals == day_spend, "nothing is sent while the last 24 h are at the cap"
    assert "cost.max_cost_per_day (--max-cost-per-day)" in refused.stderr
    frees = datetime.fromtimestamp(paid_at + DAY).astimezone().isoformat(timespec="seconds")
    assert f"frees up at {frees}" in refused.stderr
    stop = events(logged.stderr, "stopping")[0]
    assert stop["cap"] == "cost.max_cost_per_day" and stop["frees_at_unix"] == paid_at + DAY
    assert stop["spent_usd"] == pytest.approx(day_spend) and stop["cap_usd"] == float(cap)
    assert f"frees up at {frees}" in events(logged.stderr, "error")[0]["message"]
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["spent_last_24h_usd"] == pytest.approx(day_spend)

    # 30 rows to do cost about three times the cap: it spends up to the cap, and no further.
    assert allowed.returncode == 4, allowed.stderr
    assert 0 < spent_today <= float(cap)
    stop = events(allowed.stderr, "stopping")[0]
    assert stop["cap"] == "cost.max_cost_per_day"
    assert started + DAY <= stop["frees_at_unix"] <= ended + DAY


def test_a_journal_from_before_payment_times_dates_lost_and_replaced_spend_by_its_slot(
    tmp_path: Path, sim_thread: Any
) -> None:
    """An older journal has no time beside lost attempts and replaced answers: their spend
    stays in the rolling cap, dated by the answer now in their slot (which came later)."""
    write_rows(tmp_path, 4)
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        first = run_cli(config, "--max-tokens", "40")
        rows_spend = billed(sim)
        paid_at = int(time.time() - 20 * 3600)
        with sqlite3.connect(tmp_path / "out.parquet.journal") as db:
            db.executescript(
                f"""UPDATE results SET done_at = {paid_at};
                DROP TABLE lost_attempts; DROP TABLE replaced_answers;
                CREATE TABLE lost_attempts (generation_id TEXT PRIMARY KEY,
                    position INTEGER NOT NULL, kind TEXT NOT NULL, cost_usd REAL);
                INSERT INTO lost_attempts VALUES ('gen-lost', 0, 'timeout', 0.5);
                CREATE TABLE replaced_answers (position INTEGER NOT NULL, generation_id TEXT,
                    cost_usd REAL NOT NULL);
                INSERT INTO replaced_answers VALUES (1, 'gen-old', 0.25);"""
            )
        day_spend = rows_spend + 0.75
        status = pipeline_cmd("status", config, "--json", "--max-cost-per-day", "10")
        write_rows(tmp_path, 8)
        cap = f"{day_spend:.10f}"
        refused = run_cli(config, "--incremental", "--max-tokens", "40", "--max-cost-per-day", cap)
        sent = sim_get(sim, "stats")["requests"]
    assert first.returncode == 0, first.stderr
    figures = json.loads(status.stdout)
    assert figures["spent_last_24h_usd"] == pytest.approx(day_spend)
    assert figures["true_cost_usd"] == pytest.approx(day_spend)
    assert refused.returncode == 4 and sent == 4, refused.stderr
    frees = datetime.fromtimestamp(paid_at + DAY).astimezone().isoformat(timespec="seconds")
    assert f"frees up at {frees}" in refused.stderr


def test_every_cap_needs_prices_and_is_refused_up_front_without_them(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_rows(tmp_path, 4)
    with sim_thread(omit_max_completion=True, omit_context_length=True) as sim:
        config = str(write_job(tmp_path, sim))
        per_run = run_cli(config, "--max-cost-per-run", "1")
        per_day = run_cli(config, "--max-cost-per-day", "1")
        sent = sim_get(sim, "stats")["requests"]
    assert (
        per_run.returncode == 1 and "cost.max_cost_per_run (--max-cost-per-run)" in per_run.stderr
    )
    assert (
        per_day.returncode == 1 and "cost.max_cost_per_day (--max-cost-per-day)" in per_day.stderr
    )
    assert sent == 0


def test_a_negative_cap_is_refused_naming_the_option(tmp_path: Path) -> None:
    write_rows(tmp_path, 2)
    refused = run_cli(str(write_job(tmp_path, None)), "--simulate", "--max-cost-per-day", "-1")
    assert refused.returncode == 1 and refused.stderr.startswith("error: cost.max_cost_per_day")
    assert "Traceback" not in refused.stderr
