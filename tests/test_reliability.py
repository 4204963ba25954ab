"""Nothing lost, nothing duplicated, nothing silently trusted: a fault soak, ten SIGKILLs, torn
journals, signals under slow requests, a thousand-plus connections, and concurrent runs."""

from __future__ import annotations

import contextlib
import json
import random
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import journal_file, read_metadata
from pipeline.errors import JournalError
from pipeline.simulator import messages_digest
from tests.helpers import (
    cli_env,
    journaled_positions,
    run_cli,
    sim_get,
    start_cli,
    wait_for,
    write_job,
)


def write_input(folder: Path, n: int) -> list[str]:
    texts = [f"item {i}: the lamp is bright and the switch feels solid" for i in range(n)]
    pl.DataFrame({"id": [f"k{i}" for i in range(n)], "text": texts}).write_csv(folder / "in.csv")
    return texts


def digest(text: str) -> str:
    return messages_digest([{"role": "user", "content": text}])


# --------------------------------------------------------------------------- soak

SOAK_FAULTS = {
    "429": 0.05,
    "500": 0.01,
    "502": 0.01,
    "503": 0.01,
    "reset": 0.01,
    "mid_body": 0.01,
    "error_body": 0.01,
    "hang": 0.005,
}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fault_soak_every_row_accounted_for_and_cost_matches_the_ledger(
    tmp_path: Path, sim_thread: Any
) -> None:
    rows = 3000
    write_input(tmp_path, rows)
    with sim_thread(fault_rates=SOAK_FAULTS, seed=11, retry_after=0.0) as sim:
        config = write_job(
            tmp_path,
            sim,
            extra="[retry]\nbackoff_base = 0\nmax_attempts = 6\n[limits]\nconcurrency = 32\n",
        )
        done = run_cli(str(config), "--timeout", "1", timeout=280)
        entries = sim_get(sim, "ledger")["data"]
        stats = sim_get(sim, "stats")
    assert done.returncode in (0, 3), done.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == [
        f"k{i}" for i in range(rows)
    ]  # none missing, none twice, in order
    failed = out.filter(pl.col("status") != "ok")
    assert set(out["status"]) <= {"ok", "error"}
    assert failed["error_message"].null_count() == 0 and all(
        "gave up after" in m for m in failed["error_message"]
    )
    assert out["attempts"].max() <= 6
    billed = {e["id"]: e for e in entries}
    ok = out.filter(pl.col("status") == "ok")
    for gen_id, cost, text in zip(ok["generation_id"], ok["cost_usd"], ok["text"], strict=True):
        assert billed[gen_id]["cost"] == cost and billed[gen_id]["messages_digest"] == digest(text)
    meta = read_metadata(tmp_path / "out.parquet")
    assert meta["true_cost_usd"] == pytest.approx(sum(e["cost"] for e in entries), rel=1e-12)
    assert sum(stats["faults"].values()) > 0.08 * rows  # the faults really happened
    assert (
        Counter(e["messages_digest"] for e in entries if e["outcome"] == "ok").most_common(1)[0][1]
        == 1
    )


# --------------------------------------------------------------------------- crashes


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ten_sigkills_at_random_points_lose_nothing_and_repay_only_what_was_in_flight(
    tmp_path: Path, sim_thread: Any
) -> None:
    rng = random.Random(20261126)
    rows = 1500
    texts = write_input(tmp_path, rows)
    by_digest = {digest(t): i for i, t in enumerate(texts)}
    exposed: set[int] = set()  # rows answered but not yet journaled at some kill
    with sim_thread(latency=0.02) as sim:
        config = str(write_job(tmp_path, sim, extra="[limits]\nconcurrency = 8\n"))
        for _ in range(10):
            target = len(sim_get(sim, "ledger")["data"]) + rng.randint(20, 110)
            proc = start_cli(config)
            wait_for(
                lambda t=target, p=proc: (
                    len(sim_get(sim, "ledger")["data"]) >= t or p.poll() is not None
                ),
                what="progress",
            )
            proc.kill()
            proc.communicate(timeout=10)
            billed_rows = {by_digest[e["messages_digest"]] for e in sim_get(sim, "ledger")["data"]}
            exposed |= billed_rows - journaled_positions(tmp_path)
        final = run_cli(config)
        entries = sim_get(sim, "ledger")["data"]
    assert final.returncode == 0, final.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == [f"k{i}" for i in range(rows)] and set(out["status"]) == {"ok"}
    bills = Counter(by_digest[e["messages_digest"]] for e in entries)
    assert set(bills) == set(range(rows))
    repaid = {row for row, n in bills.items() if n > 1}
    print(
        f"10 kills: {rows} rows, {len(entries)} bills, {len(repaid)} rows re-paid, {len(exposed)} exposed at kills"
    )
    assert repaid <= exposed  # paid twice only if in flight (answered, uncommitted) at a kill


def crash_half_way(folder: Path, sim: Any) -> str:
    write_input(folder, 400)
    config = str(write_job(folder, sim, extra="[limits]\nconcurrency = 4\n"))
    proc = start_cli(config)
    wait_for(lambda: len(journaled_positions(folder)) >= 100, what="100 journaled rows")
    proc.kill()
    proc.communicate(timeout=10)
    return config


def test_a_torn_wal_is_repaired_safely_by_sqlite(tmp_path: Path, sim_thread: Any) -> None:
    with sim_thread(latency=0.01) as sim:
        config = crash_half_way(tmp_path, sim)
        wal = tmp_path / "out.parquet.journal-wal"
        assert wal.exists() and wal.stat().st_size > 10_000  # the kill left uncheckpointed frames
        with wal.open("r+b") as f:
            f.truncate(wal.stat().st_size - 3000)  # a torn last write
        done = run_cli(config)
    assert done.returncode == 0, done.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == [f"k{i}" for i in range(400)] and set(out["status"]) == {"ok"}


@pytest.mark.parametrize("damage", ["scribble", "truncate"])
def test_a_damaged_journal_is_refused_with_a_clear_message(
    tmp_path: Path, sim_thread: Any, damage: str
) -> None:
    with sim_thread(latency=0.01) as sim:
        config = crash_half_way(tmp_path, sim)
        journal = tmp_path / "out.parquet.journal"
        with sqlite3.connect(journal) as db:  # fold the WAL in, so the damage hits real pages
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = journal.stat().st_size
        with journal.open("r+b") as f:
            if damage == "truncate":
                f.truncate(size // 2)
            else:
                f.seek(size // 2)
                f.write(b"\x00garbage\xff" * 400)
        before = sim_get(sim, "stats")["requests"]
        done = run_cli(config)
        after = sim_get(sim, "stats")["requests"]
    assert done.returncode == 1, done.stderr
    assert f"journal {journal} is damaged" in done.stderr and "--restart" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and after == before


def test_a_journal_check_left_unused_is_not_trusted_by_a_later_opening(tmp_path: Path) -> None:
    # In one process (the library used from a notebook), a run that stopped before opening
    # its journal leaves a verdict on the journal as it was then.
    path = tmp_path / "out.parquet.journal"
    with contextlib.closing(journal_file.connect(path)) as db:
        db.execute("CREATE TABLE filler (x BLOB)")
        db.executemany("INSERT INTO filler VALUES (?)", [(bytes(500),)] * 400)
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    journal_file.precheck(path)
    journal_file._CHECKS[str(path)].join()  # "ok", never used
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size // 2)
        f.write(b"\x00garbage\xff" * 400)
    journal_file.precheck(path)  # the next run
    with pytest.raises(JournalError, match="is damaged"):
        journal_file.connect(path).close()


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_with_slow_requests_in_flight_exits_within_two_seconds(
    tmp_path: Path, sim_thread: Any, signum: int, code: int
) -> None:
    write_input(tmp_path, 40)
    with sim_thread(latency=30.0) as sim:
        proc = start_cli(str(write_job(tmp_path, sim, extra="[limits]\nconcurrency = 4\n")))
        wait_for(lambda: sim_get(sim, "stats")["requests"] >= 4, what="4 requests in flight")
        sent = time.monotonic()
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=10)
        took = time.monotonic() - sent
    assert proc.returncode == code, stderr
    assert took < 2.5
    with sqlite3.connect(tmp_path / "out.parquet.journal") as db:
        assert db.execute("PRAGMA quick_check").fetchone() == ("ok",)


# ----------------------------------------------------------------------- concurrent runs


def test_a_second_run_exits_at_once_and_touches_nothing(tmp_path: Path, sim_thread: Any) -> None:
    write_input(tmp_path, 20)
    with sim_thread(latency=0.2) as sim:
        config = str(write_job(tmp_path, sim, extra="[limits]\nconcurrency = 1\n"))
        first = start_cli(config)
        try:
            wait_for(
                lambda: len(journaled_positions(tmp_path)) >= 2,
                what="the first run to journal rows",
            )
            first.send_signal(
                signal.SIGSTOP
            )  # freeze it, so any change to the journal is the second run's
            files = {
                p: p.read_bytes()
                for p in tmp_path.glob("out.parquet.journal*")
                if not p.name.endswith(".lock")
            }
            started = time.monotonic()
            second = run_cli(config)
            took = time.monotonic() - started
            after = {
                p: p.read_bytes()
                for p in tmp_path.glob("out.parquet.journal*")
                if not p.name.endswith(".lock")
            }
        finally:
            first.send_signal(signal.SIGCONT)
        first.communicate(timeout=60)
    assert second.returncode == 5
    assert "another run is using journal" in second.stderr and f"pid {first.pid}" in second.stderr
    assert after == files and took < 5
    assert first.returncode == 0


# ------------------------------------------------------------------------------- load


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_thousand_requests_in_flight(tmp_path: Path, sim_thread: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4500:
        pytest.fail(
            f"this machine allows only {hard} open files; the load test needs 4,500 (server and client)"
        )
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (max(soft, 4500), hard)
    )  # the simulator lives in this process
    write_input(tmp_path, 4000)
    with sim_thread(latency=1.0) as sim:
        started = time.monotonic()
        done = run_cli(
            str(write_job(tmp_path, sim, extra="[limits]\nconcurrency = 2000\n")), timeout=280
        )
        took = time.monotonic() - started
        stats = sim_get(sim, "stats")
    assert done.returncode == 0, done.stderr
    assert pl.read_parquet(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 4000
    assert stats["max_in_flight"] >= 1500 and stats["requests"] == 4000
    assert took < 60


def test_concurrency_beyond_the_open_file_limit_is_refused_up_front(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, 3)

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    with sim_thread() as sim:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", str(write_job(tmp_path, sim)), "--concurrency", "1000"],
            capture_output=True, text=True, env=cli_env(), timeout=60, preexec_fn=low_limit, check=False,
        )  # fmt: skip
        sent = sim_get(sim, "stats")["requests"]
    assert done.returncode == 1 and sent == 0
    assert "needs about 1064 open files" in done.stderr and "at most 256" in done.stderr


def test_metadata_is_json_where_the_readme_says(tmp_path: Path, sim_thread: Any) -> None:
    write_input(tmp_path, 3)
    with sim_thread() as sim:
        assert run_cli(str(write_job(tmp_path, sim))).returncode == 0
    import pyarrow.parquet as pq

    path = tmp_path / "out.parquet"
    assert json.loads(pq.read_metadata(path).metadata[b"pipeline"])["rows"] == 3
    assert json.loads(pl.read_parquet_metadata(path)["pipeline"])["ok"] == 3
