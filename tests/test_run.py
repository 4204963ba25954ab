"""`pipeline run` end to end: the real CLI in a subprocess, real files, the simulator on loopback."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from itertools import accumulate
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.records import RESULT_COLUMNS
from pipeline.simulator import messages_digest
from pipeline.source import open_source
from tests.helpers import TEST_KEY, run_cli, sim_get, sim_post, write_job
from tests.openapi import validate_component

RESULT_DTYPES = {
    "completion": pl.String, "finish_reason": pl.String, "response_model": pl.String, "provider": pl.String,
    "generation_id": pl.String, "prompt_tokens": pl.Int64, "completion_tokens": pl.Int64, "total_tokens": pl.Int64,
    "reasoning_tokens": pl.Int64, "cached_tokens": pl.Int64, "cache_write_tokens": pl.Int64, "cost_usd": pl.Float64, "cost_source": pl.String, "response_source": pl.String, "latency_ms": pl.Float64,
    "attempts": pl.Int32, "status": pl.String, "error_type": pl.String, "error_message": pl.String,
}  # fmt: skip


def reviews(n: int = 30) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "id": [f"r{i:03d}" for i in range(n)],
            "text": [f"Review number {i}: works fine, ünïcödé ✓ {i * 7}" for i in range(n)],
        }
    )


def digest_of(prompt: str) -> str:
    return messages_digest([{"role": "user", "content": prompt}])


def output(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(folder / "out.parquet")


def ledger(sim: Any) -> list[dict[str, Any]]:
    return sim_get(sim, "ledger")["data"]  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_every_format_gives_the_same_rows_in_order_each_answering_its_prompt(
    tmp_path: Path, sim_thread: Any, fmt: str
) -> None:
    frame = reviews()
    name = f"in.{fmt}"
    {"csv": frame.write_csv, "parquet": frame.write_parquet, "jsonl": frame.write_ndjson}[fmt](
        tmp_path / name
    )
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim, input_name=name)))
    assert done.returncode == 0, done.stderr
    out = output(tmp_path)
    assert out.columns == ["id", "text", *RESULT_COLUMNS]
    assert {c: out.schema[c] for c in RESULT_COLUMNS} == RESULT_DTYPES
    assert out.select("id", "text").equals(frame)  # input columns unchanged, input order
    assert out["status"].to_list() == ["ok"] * len(frame)
    for text, completion in zip(out["text"], out["completion"], strict=True):
        assert completion.startswith(f"sim:{digest_of(text)} ")
    assert out["attempts"].to_list() == [1] * len(frame)
    assert out["response_model"].unique().to_list() == ["mistralai/mixtral-8x7b-instruct"]
    assert (out["total_tokens"] == out["prompt_tokens"] + out["completion_tokens"]).all()


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_input_is_read_in_bounded_batches_the_first_one_small(tmp_path: Path, fmt: str) -> None:
    """The first requests wait only for a first batch (one row per worker); every batch stays
    within the size asked for, whatever each format reads at once (CSV: 1 MB blocks)."""
    frame = reviews(1000)
    path = tmp_path / f"in.{fmt}"
    {"csv": frame.write_csv, "parquet": frame.write_parquet, "jsonl": frame.write_ndjson}[fmt](path)
    batches = list(open_source(str(path)).arrow_batches(size=300, first=50))
    sizes = [table.num_rows for _, table in batches]
    assert sizes[0] == 50 and max(sizes) <= 300 and sum(sizes) == len(frame)
    assert [position for position, _ in batches] == list(accumulate([0, *sizes[:-1]]))
    ids = [i for _, table in batches for i in table["id"].to_pylist()]
    assert ids == frame["id"].to_list()


def test_cost_column_equals_the_ledger_and_metadata_has_totals(
    tmp_path: Path, sim_thread: Any
) -> None:
    reviews().write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim)))
        billed = {e["id"]: e["cost"] for e in ledger(sim)}
    assert done.returncode == 0
    out = output(tmp_path)
    assert sorted(out["generation_id"]) == sorted(billed)
    assert out["cost_usd"].sum() == pytest.approx(sum(billed.values()), rel=1e-12)
    from pipeline import read_metadata

    meta = read_metadata(tmp_path / "out.parquet")
    assert meta["rows"] == meta["ok"] == 30 and meta["failed"] == 0
    assert meta["cost_usd"] == pytest.approx(out["cost_usd"].sum())
    assert meta["prompt_tokens"] == out["prompt_tokens"].sum() and meta["version"]
    assert "done: 30 rows: 30 ok, 0 failed" in done.stderr


# ----------------------------------------------------------------------------- faults

RETRYABLE = [
    "408",
    "429",
    "500",
    "502",
    "503",
    "524",
    "529",
    "error_body",
    "choice_error",
    "empty",
    "invalid_json",
    "reset",
    "mid_body",
]


def test_every_retryable_fault_is_retried_and_ends_ok(tmp_path: Path, sim_thread: Any) -> None:
    texts = [f"row {i} [[sim:{fault}]]" for i, fault in enumerate(RETRYABLE)] + ["clean row"]
    pl.DataFrame({"id": [str(i) for i in range(len(texts))], "text": texts}).write_csv(
        tmp_path / "in.csv"
    )
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim)))
        billed = {e["id"]: e["cost"] for e in ledger(sim)}
        faults = sim_get(sim, "stats")["faults"]
    assert done.returncode == 0, done.stderr
    out = output(tmp_path)
    assert out["status"].to_list() == ["ok"] * len(texts)
    assert out["attempts"].to_list() == [2] * len(RETRYABLE) + [1]
    assert faults == dict.fromkeys(RETRYABLE, 1)
    # The output's cost is exactly what the server billed for the answers it delivered.
    assert out["cost_usd"].sum() == pytest.approx(
        sum(billed[g] for g in out["generation_id"]), rel=1e-12
    )


def test_client_timeouts_on_stalls_and_hangs_are_retried(tmp_path: Path, sim_thread: Any) -> None:
    pl.DataFrame({"id": ["a", "b"], "text": ["[[sim:stall]] a", "[[sim:hang]] b"]}).write_csv(
        tmp_path / "in.csv"
    )
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim)), "--timeout", "0.5")
    assert done.returncode == 0, done.stderr
    assert output(tmp_path)["attempts"].to_list() == [2, 2]


def test_permanent_failures_are_error_rows_and_exit_3(tmp_path: Path, sim_thread: Any) -> None:
    texts = ["fine", "[[sim:403*]] flagged", "word " * 40_000, "[[sim:500*]] always down", None]
    pl.DataFrame(
        {"id": ["ok", "moderated", "too-long", "exhausted", "null"], "text": texts}
    ).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim)))
        requests = sim_get(sim, "stats")["requests"]
    assert done.returncode == 3, done.stderr
    out = output(tmp_path)
    assert out["status"].to_list() == ["ok", "error", "error", "error", "error"]
    assert out["error_type"].to_list() == [None, "http_403", "http_400", "http_500", "input"]
    assert out["attempts"].to_list() == [1, 1, 1, 4, 0]  # max_attempts = 4 in the test config
    assert "gave up after 4 attempts" in out["error_message"][3]
    assert "column 'text' is null" in out["error_message"][4]
    assert requests == 1 + 1 + 1 + 4  # the null row was never sent
    assert "1 ok, 4 failed" in done.stderr


# ----------------------------------------------------------------------------- resume


def test_limit_runs_a_trial_and_the_full_run_reuses_it(tmp_path: Path, sim_thread: Any) -> None:
    reviews(20).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        trial = run_cli(config, "--limit", "5")
        assert trial.returncode == 0 and output(tmp_path).height == 5
        full = run_cli(config)
        again = run_cli(config)
        billed = Counter(e["messages_digest"] for e in ledger(sim))
    assert full.returncode == 0 and "(5 done by earlier runs)" in full.stderr
    assert again.returncode == 0 and "(20 done by earlier runs)" in again.stderr
    assert output(tmp_path).height == 20
    assert len(billed) == 20 and set(billed.values()) == {1}  # nothing paid twice


def test_changed_input_or_template_is_refused_on_resume_until_restart(
    tmp_path: Path, sim_thread: Any
) -> None:
    reviews(10).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        assert run_cli(config).returncode == 0
        changed_template = run_cli(config, "--template", "Summarise: {text}")
        reviews(11).write_csv(tmp_path / "in.csv")
        changed_input = run_cli(config)
        restarted = run_cli(config, "--restart")
        requests = sim_get(sim, "stats")["requests"]
    assert changed_template.returncode == 1 and "prompt.template changed" in changed_template.stderr
    assert (
        changed_input.returncode == 1
        and "input file" in changed_input.stderr
        and "changed" in changed_input.stderr
    )
    assert "--restart" in changed_input.stderr
    assert restarted.returncode == 0 and output(tmp_path).height == 11
    assert requests == 10 + 11  # the refused runs sent nothing


# ------------------------------------------------------------------------ job-wide stops


def test_bad_key_stops_at_once_with_exit_4_and_resume_works_with_the_right_key(
    tmp_path: Path, sim_thread: Any
) -> None:
    reviews(40).write_csv(tmp_path / "in.csv")
    with sim_thread(api_keys=[TEST_KEY]) as sim:
        config = str(write_job(tmp_path, sim, extra="[limits]\nconcurrency = 4\n"))
        refused = run_cli(config, key="sk-or-v1-wrong-key-000000000000000000")
        sent_with_bad_key = sim_get(sim, "stats")["requests"]
        wrote_nothing = not (tmp_path / "out.parquet").exists()
        fixed = run_cli(config)
    assert refused.returncode == 4
    assert "OPENROUTER_API_KEY" in refused.stderr and "Traceback" not in refused.stderr
    assert sent_with_bad_key <= 4  # at most `concurrency` requests once the key is refused
    assert wrote_nothing
    assert fixed.returncode == 0 and output(tmp_path)["status"].to_list() == ["ok"] * 40


def test_out_of_credits_stops_with_exit_4_and_resumes_without_paying_twice(
    tmp_path: Path, sim_thread: Any
) -> None:
    reviews(60).write_csv(tmp_path / "in.csv")
    with sim_thread(credit_limit=0.0002) as sim:
        config = str(write_job(tmp_path, sim, extra="[limits]\nconcurrency = 4\n"))
        stopped = run_cli(config)
        stats = sim_get(sim, "stats")
        paid_before = len(ledger(sim))
        sim_post(sim, "config", {"credit_limit": None})
        resumed = run_cli(config)
        billed = Counter(e["messages_digest"] for e in ledger(sim))
    assert stopped.returncode == 4 and "credits" in stopped.stderr
    assert 0 < paid_before < 60
    assert stats["by_status"]["402"] <= 4
    assert resumed.returncode == 0 and output(tmp_path).height == 60
    assert len(billed) == 60 and max(billed.values()) == 1


# --------------------------------------------------------------------------- requests


def test_requests_carry_parameters_and_attribution_and_match_the_spec(
    tmp_path: Path, sim_thread: Any
) -> None:
    reviews(3).write_csv(tmp_path / "in.csv")
    extra = (
        'temperature = 0.2\ntop_p = 0.9\nmax_tokens = 64\nseed = 7\nstop = ["###"]\nreferer = "https://example.org/labels"\n'
        'title = "labeler"\nfallback_models = ["mistralai/mixtral-8x7b-instruct", "openai/gpt-4o-mini"]\n'
        'provider = { allow_fallbacks = true, data_collection = "deny" }\n'
        'extra = { user = "batch-7", repetition_penalty = 1.05 }\n'
    )
    with sim_thread() as sim:
        config = write_job(tmp_path, sim, prompt='template = "{text}"\nsystem = "Answer tersely."')
        config.write_text(config.read_text().replace("[request]\n", "[request]\n" + extra))
        done = run_cli(str(config))
        logged = sim_get(sim, "requests")["data"]
    assert done.returncode == 0, done.stderr
    assert len(logged) == 3
    for entry in logged:
        body, headers = entry["body"], entry["headers"]
        validate_component("ChatRequest", body)
        assert body["messages"][0] == {"role": "system", "content": "Answer tersely."}
        assert (
            body["temperature"] == 0.2
            and body["max_tokens"] == 64
            and body["seed"] == 7
            and body["stop"] == ["###"]
        )
        assert body["provider"] == {"allow_fallbacks": True, "data_collection": "deny"}
        assert body["models"] == ["mistralai/mixtral-8x7b-instruct", "openai/gpt-4o-mini"]
        assert body["user"] == "batch-7" and body["repetition_penalty"] == 1.05
        assert headers["HTTP-Referer"] == "https://example.org/labels"
        assert headers["X-Title"] == headers["X-OpenRouter-Title"] == "labeler"


def test_messages_column_and_per_row_model(tmp_path: Path, sim_thread: Any) -> None:
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    frame = pl.DataFrame({
        "id": ["a", "b", "c"],
        "messages": [json.dumps(convo), "not json", json.dumps([{"role": "user", "content": "Yo"}])],
        "model": ["openai/gpt-4o-mini", None, ""],
    })  # fmt: skip
    frame.write_parquet(tmp_path / "in.parquet")
    with sim_thread() as sim:
        config = write_job(
            tmp_path,
            sim,
            input_name="in.parquet",
            prompt='messages_column = "messages"\nmodel_column = "model"',
        )
        done = run_cli(str(config))
    assert done.returncode == 3
    out = output(tmp_path)
    assert out["status"].to_list() == ["ok", "error", "ok"]
    assert out["response_model"].to_list() == [
        "openai/gpt-4o-mini",
        None,
        "mistralai/mixtral-8x7b-instruct",
    ]
    assert out["completion"][0].startswith(f"sim:{messages_digest(convo)}")
    assert "not valid JSON" in out["error_message"][1]


def test_the_key_appears_in_no_output_journal_or_log(tmp_path: Path, sim_thread: Any) -> None:
    texts = [f"row {i} [[sim:500]]" for i in range(5)]
    pl.DataFrame({"id": [str(i) for i in range(5)], "text": texts}).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim)), "--quiet")
    assert done.returncode == 0
    artifacts = [p for p in tmp_path.iterdir() if p.is_file()]
    assert any(p.name.startswith("out.parquet.journal") for p in artifacts)
    for path in artifacts:
        assert TEST_KEY.encode() not in path.read_bytes(), path
    assert TEST_KEY not in done.stdout + done.stderr
    with sqlite3.connect(tmp_path / "out.parquet.journal") as db:
        dump = "\n".join(db.iterdump())
    assert TEST_KEY not in dump


def test_a_429_pauses_every_worker_so_nobody_retries_before_retry_after(
    tmp_path: Path, sim_thread: Any
) -> None:
    texts = [f"row {i}" for i in range(60)]
    pl.DataFrame({"id": [str(i) for i in range(60)], "text": texts}).write_csv(tmp_path / "in.csv")
    # The key may send 30 requests a second: the 31st gets the rate limit's 429, whose
    # Retry-After runs until the window has room for all 30 rows left.
    with sim_thread(rate_limit=30, rate_window=1.0, latency=0.005) as sim:
        done = run_cli(str(write_job(tmp_path, sim, extra="[limits]\nconcurrency = 8\n")))
        stats = sim_get(sim, "stats")
    assert done.returncode == 0, done.stderr
    assert output(tmp_path)["status"].to_list() == ["ok"] * 60
    # The simulator answers 429 (and counts a violation) to anything the key sends before that
    # Retry-After elapses. Only requests sent before the first 429 came back may do so: at most
    # one per other worker. Had any worker gone on, every request it sent would count.
    assert stats["retry_after_violations"] <= 7
    assert stats["by_status"]["429"] == 1 + stats["retry_after_violations"]


def test_a_terminal_gets_a_progress_bar_and_a_pipe_gets_plain_lines(
    tmp_path: Path, sim_thread: Any
) -> None:
    import os
    import pty
    import subprocess
    import sys

    from tests.helpers import cli_env

    reviews(30).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        leader, follower = pty.openpty()
        with subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", config],
            stderr=follower,
            stdout=subprocess.DEVNULL,
            env=cli_env(),
        ) as proc:
            os.close(follower)
            chunks = []
            while True:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # the terminal closed: the process ended
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            proc.wait(timeout=60)
        os.close(leader)
        piped = run_cli(config, "--restart")
    screen = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "30/30" in screen and "row/s" in screen and "\r" in screen  # a tqdm bar, redrawn
    assert "$" in screen and "retries" in screen and "errors" in screen  # the postfix
    assert "\r" not in piped.stderr and "\x1b[" not in piped.stderr
    assert "done: 30 rows" in piped.stderr
