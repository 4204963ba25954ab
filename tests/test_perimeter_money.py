"""Unknown money is never reported as $0: with no cost reported and no price listed, every total
that depends on it is null in JSON and metadata and "unknown" in text; a partly known total is a
lower bound that says how many rows it leaves out. Known zeros (duplicates) stay 0."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import read_metadata
from tests.helpers import cli_env, run_cli, sim_get, sim_post, write_job

UNKNOWN = {"omit_cost": True, "omit_prices": True}
NO_CACHED_PRICES = "[cost]\nprices_ttl = 0\n"  # each command asks /models again


def pipeline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True, text=True, env=cli_env(), timeout=60, check=False,
    )  # fmt: skip


def write_input(folder: Path, texts: list[str]) -> None:
    ids = [f"r{i}" for i in range(len(texts))]
    pl.DataFrame({"id": ids, "text": texts}).write_csv(folder / "in.csv")


def texts(n: int) -> list[str]:
    return [f"review {i}: the kettle is quiet" for i in range(n)]


def summary_event(stderr: str) -> dict[str, Any]:
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return next(e for e in events if e["event"] == "summary")


def half_priced_job(folder: Path, sim: Any, rows: int = 4) -> Path:
    """The first two rows answered with a reported cost; then the endpoint stops reporting
    costs and listing prices, so the rows sent next are answered without one."""
    write_input(folder, texts(rows))
    config = write_job(folder, sim, extra=NO_CACHED_PRICES)
    first = run_cli(str(config), "--limit", "2")
    assert first.returncode == 0, first.stderr
    sim_post(sim, "config", UNKNOWN)
    return config


# ------------------------------------------------------------------------- fully unknown


def test_run_with_no_cost_and_no_prices_reports_unknown_not_zero(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, texts(3))
    with sim_thread(**UNKNOWN) as sim:
        config = write_job(tmp_path, sim)
        done = run_cli(str(config))
        logged = run_cli(str(config), "--log-format", "json")  # all done: figures from the journal
        assert sim_get(sim, "stats")["requests"] == 3
    assert done.returncode == 0, done.stderr
    assert pl.read_parquet(tmp_path / "out.parquet")["cost_usd"].null_count() == 3
    assert "cost unknown for" in done.stderr and "$0.000000" not in done.stderr
    assert "3 rows without a cost" in done.stderr
    meta = read_metadata(tmp_path / "out.parquet")
    assert meta["cost_usd"] is None and meta["true_cost_usd"] is None
    assert meta["rows_cost_unknown"] == 3
    (model,) = meta["by_model"].values()
    assert model["cost_usd"] is None and model["rows_cost_unknown"] == 3
    assert logged.returncode == 0, logged.stderr
    summary = summary_event(logged.stderr)
    assert summary["cost_usd"] is None and summary["true_cost_usd"] is None


def test_status_of_a_job_with_unknown_cost_says_unknown(tmp_path: Path, sim_thread: Any) -> None:
    write_input(tmp_path, texts(2))
    with sim_thread(**UNKNOWN) as sim:
        config = str(write_job(tmp_path, sim))
        assert run_cli(config).returncode == 0
    text = pipeline("status", config)
    figures = json.loads(pipeline("status", config, "--json").stdout)
    assert text.returncode == 0, text.stderr
    assert "spent unknown" in text.stdout and "$0.000000" not in text.stdout
    assert figures["cost_usd"] is None and figures["true_cost_usd"] is None
    assert figures["rows_cost_unknown"] == 2


def test_pilot_with_unknown_cost_projects_unknown(tmp_path: Path, sim_thread: Any) -> None:
    write_input(tmp_path, texts(6))
    with sim_thread(**UNKNOWN) as sim:
        config = str(write_job(tmp_path, sim, extra=NO_CACHED_PRICES))
        text = pipeline("estimate", config, "--pilot", "2")
        as_json = pipeline("estimate", config, "--pilot", "2", "--json")
        requests = sim_get(sim, "stats")["requests"]
    assert text.returncode == 0, text.stderr
    (line,) = [line for line in text.stdout.splitlines() if line.startswith("pilot:")]
    assert "cost unknown" in line and "$0" not in line, line
    pilot = json.loads(as_json.stdout)["pilot"]
    assert pilot["cost_usd"] is None and pilot["rows_cost_unknown"] == 4
    assert pilot["projected_remaining_usd"] is None and pilot["projected_total_usd"] is None
    assert requests == 4


def test_duplicates_stay_known_zeros_and_leave_the_total_unknown(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, ["same question"] * 3)
    with sim_thread(**UNKNOWN) as sim:
        done = run_cli(str(write_job(tmp_path, sim)))
        assert sim_get(sim, "stats")["requests"] == 1
    assert done.returncode == 0, done.stderr
    frame = pl.read_parquet(tmp_path / "out.parquet")
    assert frame.filter(pl.col("response_source") == "duplicate")["cost_usd"].to_list() == [0.0] * 2
    meta = read_metadata(tmp_path / "out.parquet")
    assert meta["rows_cost_unknown"] == 1  # the duplicates' 0 is known; the one answer's is not
    assert meta["cost_usd"] is None and meta["true_cost_usd"] is None


# ------------------------------------------------------------------------- partly known


def test_a_partly_known_total_is_a_lower_bound_naming_the_rows_left_out(
    tmp_path: Path, sim_thread: Any
) -> None:
    with sim_thread() as sim:
        config = str(half_priced_job(tmp_path, sim))
        done = run_cli(config)
        logged = run_cli(config, "--log-format", "json")
        known = sum(e["cost"] for e in sim_get(sim, "ledger")["data"][:2])
    assert done.returncode == 0, done.stderr
    frame = pl.read_parquet(tmp_path / "out.parquet")
    assert frame["cost_usd"].null_count() == 2
    meta = read_metadata(tmp_path / "out.parquet")
    assert meta["cost_usd"] == pytest.approx(known) and known > 0
    assert meta["rows_cost_unknown"] == 2 and meta["true_cost_usd"] is None
    assert f"cost at least ${known:.6f}" in done.stderr
    assert "2 rows without a cost" in done.stderr
    summary = summary_event(logged.stderr)
    assert summary["cost_usd"] == pytest.approx(known) and summary["rows_cost_unknown"] == 2
    assert summary["true_cost_usd"] is None
    text = pipeline("status", config)
    assert f"spent at least ${known:.6f} (2 rows without a cost)" in text.stdout, text.stdout
    assert ", true unknown;" in text.stdout


def test_a_pilot_partly_without_cost_gives_a_lower_bound_and_no_projection(
    tmp_path: Path, sim_thread: Any
) -> None:
    with sim_thread() as sim:
        config = str(half_priced_job(tmp_path, sim, rows=6))
        text = pipeline("estimate", config, "--pilot", "2")
        known = sum(e["cost"] for e in sim_get(sim, "ledger")["data"][:2])
    assert text.returncode == 0, text.stderr
    (line,) = [line for line in text.stdout.splitlines() if line.startswith("pilot:")]
    assert f"at least ${known:.6f} (2 rows without a cost)" in line, line
    assert "projected for the rest: unknown" in line, line


def test_spend_whose_answer_never_arrived_and_is_not_priced_yet_is_unknown(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, [f"{texts(1)[0]} [[sim:mid_body]]", "another row"])
    with sim_thread(ready_after=3600) as sim:
        config = str(write_job(tmp_path, sim, extra="[cost]\nreconcile_timeout = 0.3\n"))
        done = run_cli(config)
    assert done.returncode == 0, done.stderr
    meta = read_metadata(tmp_path / "out.parquet")
    assert meta["lost_attempts_unreconciled"] == 1
    assert meta["cost_usd"] > 0  # the rows' own cost is known ...
    assert meta["paid_twice_cost_usd"] is None and meta["true_cost_usd"] is None  # ... not all
    assert "true spend unknown" in done.stderr, done.stderr


# How journals before unknown replaced costs were kept held them: such a journal is upgraded.
OLDER_REPLACED_ANSWERS = """
DROP TRIGGER keep_replaced_spend;
DROP TABLE replaced_answers;
CREATE TABLE replaced_answers (position INTEGER NOT NULL, generation_id TEXT, cost_usd REAL NOT NULL);
CREATE TRIGGER keep_replaced_spend BEFORE DELETE ON results
    WHEN OLD.cost_usd > 0 AND OLD.response_source = 'api'
BEGIN
    INSERT INTO replaced_answers VALUES (OLD.position, OLD.generation_id, OLD.cost_usd);
END;
"""


@pytest.mark.parametrize("journal", ["current", "older"])
def test_an_answer_of_unknown_cost_that_a_new_one_replaced_leaves_the_true_spend_unknown(
    tmp_path: Path, sim_thread: Any, journal: str
) -> None:
    write_input(tmp_path, texts(2))
    with sim_thread(**UNKNOWN) as sim:
        config = str(write_job(tmp_path, sim, extra=NO_CACHED_PRICES))
        assert run_cli(config, "--incremental").returncode == 0
        if journal == "older":
            with contextlib.closing(sqlite3.connect(tmp_path / "out.parquet.journal")) as db:
                db.executescript(OLDER_REPLACED_ANSWERS)
        sim_post(sim, "config", {"omit_cost": False, "omit_prices": False})
        write_input(tmp_path, [f"{text}, edited" for text in texts(2)])
        redone = run_cli(config, "--incremental", "--reprocess-changed")
    assert redone.returncode == 0, redone.stderr
    meta = read_metadata(tmp_path / "out.parquet")
    assert meta["replaced_answers"] == 2
    assert meta["replaced_cost_usd"] is None  # paid for, at a price nobody told us
    assert meta["cost_usd"] > 0 and meta["rows_cost_unknown"] == 0  # today's rows are known ...
    assert meta["true_cost_usd"] is None  # ... the job's spend is not
    assert "2 earlier answer(s), since replaced by a new one, cost unknown" in redone.stderr
