"""`pipeline export` (the rows done so far, while a job is stopped or running) and `pipeline
status` given the output or journal path: the real CLI against the simulator."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import read_metadata
from pipeline.records import RESULT_COLUMNS
from pipeline.simulator import messages_digest
from tests.helpers import run_cli, run_command, sim_get, start_cli, wait_for, write_job

FLAGGED = "forbidden"  # the simulator refuses prompts with it (403 moderation): a failed row


pipeline = run_command


def write_input(folder: Path, n: int, flagged: tuple[int, ...] = ()) -> list[str]:
    texts = [f"item {i} {FLAGGED if i in flagged else 'fine'}" for i in range(n)]
    pl.DataFrame({"id": [f"r{i}" for i in range(n)], "text": texts}).write_csv(folder / "in.csv")
    return texts


def answers_its_prompt(row: dict[str, Any]) -> bool:
    digest = messages_digest([{"role": "user", "content": row["text"]}])
    return bool(row["completion"]) and row["completion"].startswith(f"sim:{digest} ")


def check_partial(folder: Path, texts: list[str]) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The export beside the output: every input row in order, each ok row answering its own
    prompt, failed rows as errors, the rest pending with no result; metadata that agrees."""
    path = folder / "out.partial.parquet"
    frame = pl.read_parquet(path)
    meta = read_metadata(path)
    assert frame.columns == ["id", "text", *RESULT_COLUMNS]
    assert frame["text"].to_list() == texts
    ok = frame.filter(pl.col("status") == "ok")
    assert all(answers_its_prompt(row) for row in ok.iter_rows(named=True))
    pending = frame.filter(pl.col("status") == "pending")
    results = [c for c in RESULT_COLUMNS if c != "status"]
    assert pending.select(pl.col(results).is_null().all()).row(0) == (True,) * len(results)
    failed = frame.filter(pl.col("status") == "error")
    assert set(frame["status"]) <= {"ok", "error", "pending"}
    assert meta["partial"] == {
        **meta["partial"], "rows": len(texts), "ok": ok.height, "failed": failed.height,
        "pending": pending.height, "done": ok.height + failed.height,
    }  # fmt: skip
    return frame, meta


# ---------------------------------------------------------------------------------- export


@pytest.mark.timeout(120)
def test_export_after_max_runtime_has_each_done_row_answering_its_prompt_and_the_rest_pending(
    tmp_path: Path, sim_thread: Any
) -> None:
    texts = write_input(tmp_path, 80, flagged=(0, 3))
    with sim_thread(latency=0.1, flagged_terms=(FLAGGED,)) as sim:
        config = write_job(tmp_path, sim, extra="[limits]\nconcurrency = 2\n")
        stopped = run_cli(str(config), "--max-runtime", "2s", "--quiet")
        exported = pipeline("export", str(config))
        paid = sum(e["cost"] for e in sim_get(sim, "ledger")["data"])
        finished = run_cli(str(config), "--quiet")
    assert stopped.returncode == 6, stopped.stderr
    assert exported.returncode == 0, exported.stderr
    assert "out.partial.parquet" in exported.stdout and "pending" in exported.stdout
    frame, meta = check_partial(tmp_path, texts)
    assert meta["partial"]["ok"] > 0 and meta["partial"]["pending"] > 0
    assert frame["status"][0] == "error" and frame["error_type"][0] is not None
    # Every paid attempt is counted, or, when the stop abandoned one in flight (what it cost
    # cannot be known), the true spend says unknown rather than less than was paid.
    if meta["true_cost_usd"] is None:
        assert meta["lost_attempts_unreconciled"] > 0 and meta["cost_usd"] <= paid
    else:
        assert meta["true_cost_usd"] == pytest.approx(paid)
    assert not meta["partial"]["running"]
    # The same schema as the finished job's output, so the same code reads both.
    assert finished.returncode == 3, finished.stderr
    assert pl.read_parquet(tmp_path / "out.parquet").schema == frame.schema


def test_export_after_a_budget_stop_and_to_a_path_of_ones_choice(
    tmp_path: Path, sim_thread: Any
) -> None:
    texts = write_input(tmp_path, 40)
    with sim_thread() as sim:
        config = write_job(tmp_path, sim, extra="[limits]\nconcurrency = 2\n")
        stopped = run_cli(str(config), "--max-cost", "0.0002", "--max-tokens", "40")
        so_far = str(tmp_path / "so-far.parquet")
        exported = pipeline("export", str(config), "--max-tokens", "40", "--output", so_far)
        paid = sum(e["cost"] for e in sim_get(sim, "ledger")["data"])
    assert stopped.returncode == 4, stopped.stderr
    assert exported.returncode == 0, exported.stderr
    (tmp_path / "so-far.parquet").rename(tmp_path / "out.partial.parquet")
    _, meta = check_partial(tmp_path, texts)
    assert 0 < meta["partial"]["ok"] < 40 and meta["partial"]["pending"] > 0
    assert meta["true_cost_usd"] == pytest.approx(paid)
    assert not (tmp_path / "out.parquet").exists()  # the job's own output is not touched


@pytest.mark.timeout(120)
def test_export_and_status_while_a_run_holds_the_lock_leave_it_undisturbed(
    tmp_path: Path, sim_thread: Any
) -> None:
    texts = write_input(tmp_path, 60)
    with sim_thread(latency=0.1) as sim:
        config = write_job(tmp_path, sim, extra="[limits]\nconcurrency = 2\n")
        job = start_cli(str(config), "--quiet")
        try:
            wait_for(
                lambda: pipeline("status", str(tmp_path / "out.parquet"), "--json").stdout.find(
                    '"running": true'
                ) >= 0 and json.loads(pipeline("status", str(config), "--json").stdout)["done"] > 2,
                what="a run with some rows journaled",
            )  # fmt: skip
            exported = pipeline("export", str(config))
            by_output = json.loads(
                pipeline("status", str(tmp_path / "out.parquet"), "--json").stdout
            )
        finally:
            job.communicate(timeout=60)
        billed = Counter(e["messages_digest"] for e in sim_get(sim, "ledger")["data"])
    assert exported.returncode == 0, exported.stderr
    _, meta = check_partial(tmp_path, texts)
    assert meta["partial"]["running"] and meta["partial"]["pending"] > 0
    assert by_output["running"] and by_output["lock_holder"] == str(job.pid)
    assert job.returncode == 0  # the run went on: every row once, its output complete
    assert len(billed) == 60 and set(billed.values()) == {1}
    assert pl.read_parquet(tmp_path / "out.parquet").height == 60


def test_a_job_with_nothing_journaled_or_an_export_onto_its_own_files_is_refused(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, 5)
    with sim_thread() as sim:
        config = write_job(tmp_path, sim)
        never_ran = pipeline("export", str(config))
        assert run_cli(str(config)).returncode == 0
        before = (tmp_path / "out.parquet").read_bytes()
        onto = {
            name: pipeline("export", str(config), "--output", str(tmp_path / name))
            for name in ("out.parquet", "out.parquet.journal", "in.csv", "out.csv")
        }
    assert never_ran.returncode == 1 and not (tmp_path / "out.partial.parquet").exists()
    assert never_ran.stderr.startswith("error: ") and "journal" in never_ran.stderr
    assert len(never_ran.stderr.splitlines()) == 1
    for name, done in onto.items():
        assert done.returncode == 1, (name, done.stderr)
        assert done.stderr.startswith("error: --output") and len(done.stderr.splitlines()) == 1
    assert (tmp_path / "out.parquet").read_bytes() == before
    assert pl.read_csv(tmp_path / "in.csv").height == 5


# ---------------------------------------------------------------------------------- status


@pytest.mark.timeout(120)
def test_status_by_output_or_journal_path_reports_what_the_journal_knows(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, 60, flagged=(1,))
    with sim_thread(latency=0.1, flagged_terms=(FLAGGED,)) as sim:
        config = write_job(tmp_path, sim, extra="[limits]\nconcurrency = 2\n")
        assert run_cli(str(config), "--max-runtime", "2s", "--quiet").returncode == 6
    full = json.loads(pipeline("status", str(config), "--json").stdout)
    journal = tmp_path / "out.parquet.journal"
    for path in (tmp_path / "out.parquet", journal):
        figures = json.loads(pipeline("status", str(path), "--json").stdout)
        text = pipeline("status", str(path))
        assert text.returncode == 0, text.stderr
        for name in ("done", "ok", "failed", "cost_usd", "true_cost_usd", "running"):
            assert figures[name] == full[name], name
        assert figures["failed"] == 1 and not figures["running"]
        assert figures["journal"] == str(journal)
        # The input is not read without the config: rows in all and rows left are unknown.
        assert figures["rows"] is None and figures["remaining"] is None
        assert "unknown" in text.stdout and "config" in text.stdout
        assert f"{full['done']:,} done" in text.stdout


def test_status_of_a_path_with_no_journal_is_a_one_line_error(tmp_path: Path) -> None:
    # An output of this tool whose journal is gone (or elsewhere), and one not written yet.
    table = pa.table({"id": ["a"]}).replace_schema_metadata({"pipeline": "{}"})
    pq.write_table(table, tmp_path / "moved.parquet")
    for path in (tmp_path / "missing.parquet", tmp_path / "moved.parquet"):
        done = pipeline("status", str(path))
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
        assert f"{path}.journal" in done.stderr
    with sqlite3.connect(tmp_path / "other.db") as db:  # a database, but no job's journal
        db.execute("CREATE TABLE notes (text TEXT)")
    other = pipeline("status", str(tmp_path / "other.db"))
    assert other.returncode == 1 and len(other.stderr.splitlines()) == 1
    assert other.stderr.startswith(f"error: journal {tmp_path / 'other.db'} cannot be read")
    with_flags = pipeline("status", str(tmp_path / "missing.parquet"), "--limit", "3")
    assert with_flags.returncode == 2 and with_flags.stderr.startswith("error: --limit needs")


def test_a_row_edited_since_its_answer_is_pending_in_the_export_not_paired_with_it(
    tmp_path: Path, sim_thread: Any
) -> None:
    texts = write_input(tmp_path, 6)
    with sim_thread() as sim:
        config = write_job(tmp_path, sim)
        assert run_cli(str(config), "--incremental").returncode == 0
        texts[2] = "item 2, edited by a reviewer"
        pl.DataFrame({"id": [f"r{i}" for i in range(6)], "text": texts}).write_csv(
            tmp_path / "in.csv"
        )
        exported = pipeline("export", str(config), "--incremental")
    assert exported.returncode == 0, exported.stderr
    frame, meta = check_partial(tmp_path, texts)  # every ok row answers its prompt as it is now
    assert frame["status"].to_list() == ["ok", "ok", "pending", "ok", "ok", "ok"]
    assert meta["partial"]["pending"] == 1


def test_an_export_of_a_resorted_input_shows_each_answer_at_its_own_row(
    tmp_path: Path, sim_thread: Any
) -> None:
    texts = write_input(tmp_path, 8)
    with sim_thread() as sim:
        config = write_job(tmp_path, sim)
        assert run_cli(str(config), "--incremental").returncode == 0
        order = [5, 2, 7, 0, 1, 6, 3, 4]
        resorted = [texts[i] for i in order] + ["a new row"]
        ids = [f"r{i}" for i in order] + ["r100"]
        pl.DataFrame({"id": ids, "text": resorted}).write_csv(tmp_path / "in.csv")
        exported = pipeline("export", str(config), "--incremental")
    assert exported.returncode == 0, exported.stderr
    frame, meta = check_partial(tmp_path, resorted)  # every ok row answers its prompt
    assert frame["status"].to_list() == ["ok"] * 8 + ["pending"]
    assert meta["partial"]["pending"] == 1


@pytest.mark.timeout(120)
def test_requests_abandoned_at_max_runtime_leave_the_true_spend_unknown_not_too_low(
    tmp_path: Path, sim_thread: Any
) -> None:
    # Each answer takes a second; the deadline abandons the requests then in flight, which the
    # simulator (like a provider) has already billed.
    write_input(tmp_path, 20)
    with sim_thread(latency=1.0) as sim:
        config = write_job(tmp_path, sim, extra="[limits]\nconcurrency = 2\n")
        stopped = run_cli(str(config), "--max-runtime", "2s", "--quiet")
        billed = len(sim_get(sim, "ledger")["data"])
        figures = json.loads(run_command("status", str(config), "--json").stdout)
    assert stopped.returncode == 6, stopped.stderr
    answered = figures["ok"] + figures["failed"]
    assert billed > answered  # some requests were paid for but never answered
    assert figures["true_cost_usd"] is None  # unknown, never the known part alone
