"""Batch mode through the real CLI against the simulator: the same output as a sync run at the
batch price, failed lines sent again in a later batch, a lost create found rather than sent
twice, and a run killed while waiting resumed by the next without a second batch."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.helpers import run_cli, run_command, sim_get, sim_post, start_cli, wait_for, write_job

pytestmark = pytest.mark.timeout(120)
# Polls every few milliseconds: the simulator's batches finish at once unless a test says not.
QUICK = "[batch]\npoll_interval = 0.01\npoll_max = 0.05\nlist_lag = 0.2\n"
INSTANT = {"batch_validating_s": 0, "batch_in_progress_s": 0}
IGNORED = ["generation_id", "latency_ms", "cost_usd", "cost_source"]


def job(folder: Path, sim: Any, texts: list[str], mode: str = "batch") -> Path:
    folder.mkdir(exist_ok=True)
    ids = [f"r{i}" for i in range(len(texts))]
    pl.DataFrame({"id": ids, "text": texts}).write_csv(folder / "in.csv")
    config = write_job(folder, sim, extra=QUICK)
    config.write_text(config.read_text().replace("[request]\n", f'[request]\nmode = "{mode}"\n'))
    return config


def polled(folder: Path) -> int | None:
    """How many lines of its batch the run last saw done (from its journal, read from outside)."""
    with sqlite3.connect(folder / "out.parquet.journal") as db:
        try:
            row = db.execute("SELECT completed FROM batches").fetchone()
        except sqlite3.OperationalError:
            return None
    return row[0] if row else None


def batches(sim: Any) -> list[dict[str, Any]]:
    return sim_get(sim, "batches")["data"]  # type: ignore[no-any-return]


def test_a_batch_job_gives_the_sync_output_at_the_batch_price(
    tmp_path: Path, sim_thread: Any
) -> None:
    texts = [f"review {i}: it works" for i in range(30)] + ["review 0: it works"]  # one repeat
    with sim_thread(**INSTANT) as sim:
        done = run_cli(str(job(tmp_path / "batch", sim, texts)))
        ledger = sim_get(sim, "ledger")["data"]
        synced = run_cli(str(job(tmp_path / "sync", sim, texts, mode="sync")))
        made = batches(sim)
    assert done.returncode == 0, done.stderr
    assert synced.returncode == 0, synced.stderr
    batch = pl.read_parquet(tmp_path / "batch" / "out.parquet")
    sync = pl.read_parquet(tmp_path / "sync" / "out.parquet")
    assert batch.drop(IGNORED).equals(sync.drop(IGNORED))
    assert len(made) == 1 and len(made[0]["custom_ids"]) == 30  # the repeat sent once
    assert batch["cost_source"].value_counts(sort=True).rows() == [
        ("batch_price", 30),
        ("reused", 1),
    ]
    assert batch["cost_usd"].sum() == pytest.approx(sync["cost_usd"].sum() / 2)
    assert batch["cost_usd"].sum() == pytest.approx(sum(e["cost"] for e in ledger))
    assert {e.get("batch_id") for e in ledger} == {made[0]["id"]}


def test_a_failed_line_is_sent_again_in_a_later_batch(tmp_path: Path, sim_thread: Any) -> None:
    texts = ["fine", "flaky [[sim:500]]", "also fine"]
    with sim_thread(**INSTANT) as sim:
        done = run_cli(str(job(tmp_path, sim, texts)))
        made = batches(sim)
    assert done.returncode == 0, done.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 3
    assert out["attempts"].to_list() == [1, 2, 1]
    assert [len(b["custom_ids"]) for b in made] == [3, 1]


def test_a_create_whose_answer_was_lost_is_found_not_sent_twice(
    tmp_path: Path, sim_thread: Any
) -> None:
    with sim_thread(**INSTANT, batch_create_faults=["drop"]) as sim:
        done = run_cli(str(job(tmp_path, sim, [f"review {i}" for i in range(5)])))
        made = batches(sim)
    assert done.returncode == 0, done.stderr
    assert len(made) == 1  # found in the list, not submitted again
    assert pl.read_parquet(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 5


def test_a_run_killed_while_waiting_is_resumed_without_a_second_batch(
    tmp_path: Path, sim_thread: Any
) -> None:
    texts = [f"review {i}" for i in range(12)]
    with sim_thread(batch_validating_s=0, batch_in_progress_s=3600) as sim:
        config = job(tmp_path, sim, texts)
        running = start_cli(str(config))
        wait_for(lambda: len(batches(sim)) == 1, what="the batch to be submitted")
        running.send_signal(signal.SIGKILL)
        running.communicate(timeout=30)
        sim_post(sim, "clock", {"advance": 3600})
        done = run_cli(str(config))
        made = batches(sim)
        ledger = sim_get(sim, "ledger")["data"]
    assert done.returncode == 0, done.stderr
    assert len(made) == 1 and len(ledger) == 12  # one batch, every line paid once
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 12


def test_no_wait_submits_and_exits_7_then_a_later_run_collects(
    tmp_path: Path, sim_thread: Any
) -> None:
    with sim_thread(batch_validating_s=0, batch_in_progress_s=3600) as sim:
        config = str(job(tmp_path, sim, [f"review {i}" for i in range(6)]))
        first = run_cli(config, "--no-wait")
        written = (tmp_path / "out.parquet").exists()
        shown = run_command("status", config).stdout
        sim_post(sim, "clock", {"advance": 3600})
        second = run_cli(config, "--no-wait")
        made = batches(sim)
    assert first.returncode == 7, first.stderr
    assert "results pending" in first.stderr and "error:" not in first.stderr
    assert not written  # the output appears once the job is complete
    (line,) = [line for line in shown.splitlines() if line.startswith("batch ")]
    assert f"batch {made[0]['id']}: in_progress, 6 requests for" in line
    assert "0 answered, 0 failed" in line and "expires in 24.0h" in line
    assert second.returncode == 0, second.stderr
    assert len(made) == 1
    assert pl.read_parquet(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 6


def test_hourly_no_wait_runs_over_a_growing_input(tmp_path: Path, sim_thread: Any) -> None:
    with sim_thread(batch_validating_s=0, batch_in_progress_s=3000) as sim:
        codes = []
        for hour in range(1, 4):
            config = str(job(tmp_path, sim, [f"review {i}" for i in range(4 * hour)]))
            codes.append(run_cli(config, "--incremental", "--no-wait").returncode)
            sim_post(sim, "clock", {"advance": 3600})
        last = run_cli(config, "--incremental", "--no-wait")
        made = batches(sim)
        ledger = sim_get(sim, "ledger")["data"]
    assert codes == [7, 7, 7] and last.returncode == 0, last.stderr
    assert [len(b["custom_ids"]) for b in made] == [4, 4, 4]  # each row in one batch
    assert len(ledger) == 12
    assert pl.read_parquet(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 12


def test_a_batch_that_fails_validation_names_the_reason_in_every_row(
    tmp_path: Path, sim_thread: Any
) -> None:
    with sim_thread(**INSTANT) as sim:
        config = job(tmp_path, sim, ["a", "b"])
        config.write_text(
            config.read_text().replace(
                "[request]\n", '[request]\nextra = {plugins = [{id = "web"}]}\n'
            )
        )
        done = run_cli(str(config))
        billed = sim_get(sim, "ledger")["data"]
    assert done.returncode == 3, done.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["error", "error"]
    assert all("web search" in m for m in out["error_message"].to_list())
    assert billed == []


def test_lines_a_batch_expired_before_running_are_sent_again(
    tmp_path: Path, sim_thread: Any
) -> None:
    # The first batch expires a quarter of the way through; the second runs to the end.
    with sim_thread(batch_validating_s=0, batch_in_progress_s=100, batch_expire_after_s=25) as sim:
        running = start_cli(str(job(tmp_path, sim, [f"review {i}" for i in range(8)])))
        wait_for(lambda: len(batches(sim)) == 1, what="the first batch")
        sim_post(sim, "clock", {"advance": 30})
        wait_for(lambda: len(batches(sim)) == 2, what="the lines sent again")
        sim_post(sim, "config", {"batch_expire_after_s": None})
        sim_post(sim, "clock", {"advance": 100})
        running.communicate(timeout=60)
        made = batches(sim)
        ledger = sim_get(sim, "ledger")["data"]
    assert running.returncode == 0
    assert [b["status"] for b in made] == ["expired", "completed"]
    assert (len(made[0]["custom_ids"]), len(made[1]["custom_ids"])) == (8, 6)
    assert len(ledger) == 8  # the two finished lines paid once, the rest in the second batch
    assert pl.read_parquet(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 8


def test_the_budget_holds_then_a_higher_cap_finishes_paying_nothing_twice(
    tmp_path: Path, sim_thread: Any
) -> None:
    texts = [f"review {i}: {'words ' * 40}" for i in range(20)]
    with sim_thread(**INSTANT) as sim:
        config = str(job(tmp_path, sim, texts))
        capped = run_cli(config, "--max-cost", "0.0004", "--max-tokens", "20")
        spent = sum(e["cost"] for e in sim_get(sim, "ledger")["data"])
        finished = run_cli(config, "--max-cost", "1", "--max-tokens", "20")
        ledger = sim_get(sim, "ledger")["data"]
    assert capped.returncode == 4, capped.stderr
    assert 0 < spent <= 0.0004
    assert finished.returncode == 0, finished.stderr
    assert len(ledger) == 20 and len({e["messages_digest"] for e in ledger}) == 20


def test_not_yet_readable_settling_and_402_are_waited_out_or_resumed(
    tmp_path: Path, sim_thread: Any
) -> None:
    with sim_thread(
        **INSTANT, batch_visible_after_s=0.2, batch_settlement_polls=2, batch_payment_required=True
    ) as sim:
        config = str(job(tmp_path, sim, [f"review {i}" for i in range(4)]))
        withheld = run_cli(config)
        sim_post(sim, "config", {"batch_payment_required": False})
        collected = run_cli(config)
        made = batches(sim)
        ledger = sim_get(sim, "ledger")["data"]
    assert withheld.returncode == 4, withheld.stderr
    assert "credits" in withheld.stderr
    assert collected.returncode == 0, collected.stderr
    assert len(made) == 1 and len(ledger) == 4  # collected, not run again


def test_a_model_without_a_batch_endpoint_is_refused_by_name(
    tmp_path: Path, sim_thread: Any
) -> None:
    with sim_thread(**INSTANT) as sim:
        config = str(job(tmp_path, sim, ["a", "b"]))
        first = run_cli(config, "--model", "mistralai/mistral-7b-instruct")
        again = run_cli(config, "--model", "mistralai/mistral-7b-instruct")
        made = batches(sim)
    assert first.returncode == 1
    assert (
        "does not have a :batch endpoint" in first.stderr
        and 'request.mode = "sync"' in first.stderr
    )
    assert again.returncode == 1 and "looking for it" not in again.stderr  # nothing left open
    assert made == []


def test_a_waiting_run_shows_each_batch_s_counts_and_an_eta(
    tmp_path: Path, sim_thread: Any
) -> None:
    with sim_thread(batch_validating_s=0, batch_in_progress_s=3600) as sim:
        config = str(job(tmp_path, sim, [f"review {i}" for i in range(12)]))
        running = start_cli(config, "--log-format", "json")
        wait_for(lambda: len(batches(sim)) == 1, what="the batch to be submitted")
        for seen in (4, 8):  # a third of the lines each time, seen by the run before the next
            sim_post(sim, "clock", {"advance": 1200})
            wait_for(lambda n=seen: polled(tmp_path) == n, what=f"the run to see {seen} lines done")
        sim_post(sim, "clock", {"advance": 1200})
        _, stderr = running.communicate(timeout=60)
    assert running.returncode == 0, stderr
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    shown = [e["batches"][0] for e in events if e["event"] == "batches"]
    assert shown and all(b["total"] == 12 and b["status"] == "in_progress" for b in shown)
    assert [b["completed"] for b in shown] == sorted(b["completed"] for b in shown)
    paced = [b for b in shown if b["completed"] > 0]
    assert paced and all(b["eta_s"] is not None and b["eta_s"] >= 0 for b in paced)
    assert all(b["expires_in_s"] > 0 for b in shown)


def test_lines_billed_in_a_batch_that_returned_no_answers_count_in_the_true_spend(
    tmp_path: Path, sim_thread: Any
) -> None:
    # The first batch expires a quarter of the way through and withholds what did run: those
    # two lines are billed without an answer and have to be sent again.
    with sim_thread(
        batch_validating_s=0, batch_in_progress_s=100, batch_expire_after_s=25,
        batch_expired_results=False,
    ) as sim:  # fmt: skip
        config = str(job(tmp_path, sim, [f"review {i}" for i in range(8)]))
        running = start_cli(config)
        wait_for(lambda: len(batches(sim)) == 1, what="the first batch")
        sim_post(sim, "clock", {"advance": 30})
        wait_for(lambda: len(batches(sim)) == 2, what="the lines sent again")
        sim_post(sim, "config", {"batch_expire_after_s": None})
        sim_post(sim, "clock", {"advance": 100})
        _, stderr = running.communicate(timeout=60)
        ledger = sim_get(sim, "ledger")["data"]
        made = batches(sim)
        status = json.loads(run_command("status", config, "--json").stdout)
    assert running.returncode == 0, stderr
    assert [len(b["custom_ids"]) for b in made] == [8, 8] and len(ledger) == 10
    billed = sum(e["cost"] for e in ledger)
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 8
    assert out["cost_usd"].sum() < billed  # two lines were paid for twice ...
    assert status["true_cost_usd"] == pytest.approx(billed)  # ... and the true spend says so
    assert "its answers' costs add up to $0.000000: the true spend counts the bill" in stderr
    assert "1 batch(es) billed $" in stderr and "more than their answers' costs" in stderr


def test_ctrl_c_while_waiting_leaves_the_batch_to_the_next_run_without_a_traceback(
    tmp_path: Path, sim_thread: Any
) -> None:
    with sim_thread(batch_validating_s=0, batch_in_progress_s=3600) as sim:
        config = str(job(tmp_path, sim, [f"review {i}" for i in range(5)]))
        running = start_cli(config)
        wait_for(lambda: polled(tmp_path) is not None, what="the batch to be polled")
        running.send_signal(signal.SIGINT)
        _, stderr = running.communicate(timeout=30)
        sim_post(sim, "clock", {"advance": 3600})
        done = run_cli(config)
        made = batches(sim)
        ledger = sim_get(sim, "ledger")["data"]
    assert running.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr.lower()
    assert done.returncode == 0, done.stderr
    assert len(made) == 1 and len(ledger) == 5  # collected by the next run, not sent again


def test_a_request_already_in_a_running_batch_is_not_sent_again_by_a_later_run(
    tmp_path: Path, sim_thread: Any
) -> None:
    # The second hour's input repeats a request of the first hour's batch, still running.
    first, second = ["alpha", "beta"], ["alpha", "beta", "alpha", "gamma"]
    with sim_thread(batch_validating_s=0, batch_in_progress_s=3000) as sim:
        config = str(job(tmp_path, sim, first))
        pending = run_cli(config, "--incremental", "--no-wait")
        job(tmp_path, sim, second)
        grown = run_cli(config, "--incremental", "--no-wait")
        sim_post(sim, "clock", {"advance": 3600})
        done = run_cli(config, "--incremental", "--no-wait")
        made = batches(sim)
        ledger = sim_get(sim, "ledger")["data"]
    assert (pending.returncode, grown.returncode, done.returncode) == (7, 7, 0), done.stderr
    assert [len(b["custom_ids"]) for b in made] == [2, 1]  # only "gamma" in the second batch
    assert len(ledger) == 3
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 4
    assert out["completion"][2] == out["completion"][0]
    assert out["response_source"].to_list() == ["api", "api", "duplicate", "api"]
