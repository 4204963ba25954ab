"""Embeddings jobs through the real CLI against the simulator: many rows a request, the same
journal, dedupe, budget and resume as chat jobs, and a typed `embedding` column."""

from __future__ import annotations

import json
import math
import signal
import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.journal import FLUSH_INTERVAL
from pipeline.simulator.catalogue import EMBEDDINGS_MODEL
from pipeline.simulator.embeddings import vector
from tests.helpers import (
    FAST_RETRY,
    journaled_positions,
    post_api,
    run_cli,
    run_command,
    sim_get,
    start_cli,
    wait_for,
)  # fmt: skip
from tests.openapi import validate_request, validate_response


def rows(folder: Path, count: int, distinct: int | None = None) -> list[str]:
    texts = [f"passage {i % (distinct or count)}: the battery lasts long" for i in range(count)]
    pl.DataFrame({"id": [f"r{i}" for i in range(count)], "text": texts}).write_parquet(
        folder / "in.parquet"
    )
    return texts


def job(
    folder: Path, sim: Any, request: str = "", limits: str = "", retry: str = FAST_RETRY
) -> str:
    config = folder / "job.toml"
    config.write_text(
        f'[input]\npath = "in.parquet"\nid_column = "id"\n\n[prompt]\ntemplate = "{{text}}"\n\n'
        f'[request]\nbase_url = "{sim.base_url}"\nmodel = "{EMBEDDINGS_MODEL.id}"\n'
        f'endpoint = "embeddings"\n{request}\n\n'
        f'[limits]\nconcurrency = 4\n{limits}\n\n[output]\npath = "out.parquet"\n\n{retry}'
    )
    return str(config)


def embedding_requests(sim: Any) -> list[dict[str, Any]]:
    return [
        e["body"] for e in sim_get(sim, "requests")["data"] if e["path"].endswith("/embeddings")
    ]


@pytest.mark.timeout(300)
def test_ten_thousand_rows_go_in_few_requests_with_vectors_typed_and_costs_adding_up(
    tmp_path: Path, sim_thread: Any
) -> None:
    texts = rows(tmp_path, 10_000, distinct=9_000)
    with sim_thread() as sim:
        done = run_cli(job(tmp_path, sim, "dimensions = 64"), timeout=280)
        sent = embedding_requests(sim)
        ledger = sim_get(sim, "ledger")["data"]
    assert done.returncode == 0, done.stderr
    assert len(sent) < 10_000 / 16  # 64 inputs a request when full; nowhere near one a row
    for body in sent[:3]:
        validate_request("/embeddings", "post", body)
        assert body["dimensions"] == 64 and body["encoding_format"] == "base64"
    # Identical inputs are asked once: 9,000 distinct passages, 9,000 inputs sent in all.
    assert sum(len(body["input"]) for body in sent) == 9_000
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out.height == 10_000 and out["status"].unique().to_list() == ["ok"]
    assert out.schema["embedding"] == pl.Array(pl.Float32, 64)
    first = out["embedding"][0].to_list()
    assert first == pytest.approx(vector(EMBEDDINGS_MODEL.id, texts[0], 64), rel=1e-6)
    assert math.sqrt(sum(v * v for v in first)) == pytest.approx(1.0, rel=1e-5)
    assert out["embedding"][9_000].to_list() == first  # the duplicate of row 0
    # Each request's bill is shared among its rows: they add up to the ledger.
    assert out["cost_usd"].sum() == pytest.approx(sum(e["cost"] for e in ledger), rel=1e-9)
    assert out["prompt_tokens"].sum() - out.filter(pl.col("response_source") == "duplicate")[
        "prompt_tokens"
    ].sum() == sum(e["prompt_tokens"] for e in ledger)


@pytest.mark.timeout(120)
def test_a_simulator_answer_matches_the_spec(tmp_path: Path, sim_thread: Any) -> None:
    body = {"model": EMBEDDINGS_MODEL.id, "input": ["one", "two"], "dimensions": 8}
    validate_request("/embeddings", "post", body)
    with sim_thread() as sim:
        answer = post_api(sim, "/embeddings", body)
        with urllib.request.urlopen(f"{sim.base_url}/embeddings/models", timeout=10) as resp:
            listed = json.load(resp)
        with urllib.request.urlopen(f"{sim.base_url}/models", timeout=10) as resp:
            chat_models = json.load(resp)
    validate_response("/embeddings/models", "get", 200, listed)
    assert [m["id"] for m in listed["data"]] == [EMBEDDINGS_MODEL.id]
    assert listed["data"][0]["architecture"]["output_modalities"] == ["embeddings"]
    assert EMBEDDINGS_MODEL.id not in [m["id"] for m in chat_models["data"]]
    validate_response("/embeddings", "post", 200, answer)
    assert [item["index"] for item in answer["data"]] == [0, 1]
    assert answer["data"][1]["embedding"] == pytest.approx(vector(EMBEDDINGS_MODEL.id, "two", 8))
    assert answer["usage"]["cost"] == pytest.approx(
        EMBEDDINGS_MODEL.charges(answer["usage"]["prompt_tokens"], 0)[0]
    )


@pytest.mark.timeout(300)
def test_a_sigkill_mid_run_then_a_resume_sends_only_what_was_in_flight(
    tmp_path: Path, sim_thread: Any
) -> None:
    rows(tmp_path, 10_000, distinct=9_000)  # rows 9,000.. repeat the first 1,000 passages
    with sim_thread(latency=0.05) as sim:
        config = job(tmp_path, sim, limits="inputs_per_request = 16")
        proc = start_cli(config)
        wait_for(lambda: len(journaled_positions(tmp_path)) >= 2_000, timeout=120, what="rows")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        kept = journaled_positions(tmp_path)
        sent_before = sum(len(b["input"]) for b in embedding_requests(sim))
        stats = sim_get(sim, "stats")
        sim_elapsed = stats["last_request_at"] - stats["first_request_at"]
        done = run_cli(config)
        sent_after = sum(len(b["input"]) for b in embedding_requests(sim)) - sent_before
    assert done.returncode == 0, done.stderr
    assert 2_000 <= len(kept) < 10_000
    # The resume asks, once each, for the passages no journaled row answers.
    answered = {p % 9_000 for p in kept}
    assert sent_after == len({p % 9_000 for p in range(10_000)} - answered)
    # What the kill cost: the answers not yet committed (a commit interval's) and the
    # requests in flight (4 of 16 inputs), never a re-run.
    rate = sent_before / max(sim_elapsed, 1e-9)
    assert sent_before + sent_after - 9_000 <= rate * (FLUSH_INTERVAL + 0.5) + 4 * 16
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out.height == 10_000 and out["status"].unique().to_list() == ["ok"]
    assert out["embedding"].null_count() == 0
    assert out["embedding"][9_999].to_list() == out["embedding"][999].to_list()
    with sqlite3.connect(tmp_path / "out.parquet.journal") as db:
        (stored,) = db.execute(
            "SELECT COUNT(*) FROM results WHERE embedding IS NOT NULL"
        ).fetchone()
    assert stored == 10_000


@pytest.mark.timeout(120)
def test_failed_requests_are_retried_whole_and_every_row_is_answered(
    tmp_path: Path, sim_thread: Any
) -> None:
    rows(tmp_path, 1_000)
    # 35% of attempts fail: with 4 attempts one of the 50 requests runs out about half the
    # time (0.35**4 each), whichever arrivals the seeded faults land on; with 12, ~1 run in 6,000.
    retry = "[retry]\nbackoff_base = 0\nmax_attempts = 12\n"
    with sim_thread(fault_rates={"502": 0.2, "429": 0.1, "reset": 0.05}, seed=3) as sim:
        done = run_cli(job(tmp_path, sim, limits="inputs_per_request = 20", retry=retry))
        stats = sim_get(sim, "stats")
    assert done.returncode == 0, done.stderr
    assert sum(stats["faults"].values()) > 0
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].unique().to_list() == ["ok"] and out["embedding"].null_count() == 0
    assert out["attempts"].max() > 1  # type: ignore[operator]


@pytest.mark.timeout(120)
def test_a_budget_stops_an_embeddings_job_and_a_higher_one_finishes_it(
    tmp_path: Path, sim_thread: Any
) -> None:
    rows(tmp_path, 2_000)
    with sim_thread() as sim:
        whole = 2_000 * 10 * float(EMBEDDINGS_MODEL.prompt_price)  # ~10 tokens a row
        config = job(tmp_path, sim)
        stopped = run_cli(config, "--max-cost", f"{whole / 2:.8f}")
        spent = sum(e["cost"] for e in sim_get(sim, "ledger")["data"])
        finished = run_cli(config, "--max-cost", f"{whole * 3:.8f}")
        inputs = sum(len(b["input"]) for b in embedding_requests(sim))
    assert stopped.returncode == 4, stopped.stderr
    assert spent <= whole / 2
    assert finished.returncode == 0, finished.stderr
    assert inputs == 2_000  # nothing asked twice
    assert pl.read_parquet(tmp_path / "out.parquet")["status"].unique().to_list() == ["ok"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("request_keys", "message"),
    [
        ("labels = ['a', 'b']", "request.labels (--labels) has no place in an embeddings job"),
        ("max_tokens = 5", "request.max_tokens (--max-tokens) has no place in an embeddings job"),
        ('endpoint = "chat"\ndimensions = 8', "request.dimensions sizes embeddings"),
    ],
)  # fmt: skip
def test_what_an_embeddings_job_cannot_send_is_refused_up_front(
    tmp_path: Path, sim_thread: Any, request_keys: str, message: str
) -> None:
    rows(tmp_path, 3)
    with sim_thread() as sim:
        config = job(tmp_path, sim, request_keys)
        text = Path(config).read_text()
        if 'endpoint = "chat"' in request_keys:
            Path(config).write_text(text.replace('endpoint = "embeddings"\n', "", 1))
        done = run_cli(config)
        sent = sim_get(sim, "requests")["data"]
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert sent == [] and "Traceback" not in done.stderr


@pytest.mark.timeout(60)
def test_an_input_over_the_model_s_limit_fails_alone(tmp_path: Path, sim_thread: Any) -> None:
    texts = ["short passage"] * 5 + ["word " * 10_000]
    pl.DataFrame({"id": [f"r{i}" for i in range(6)], "text": texts}).write_parquet(
        tmp_path / "in.parquet"
    )
    with sim_thread() as sim:
        done = run_cli(job(tmp_path, sim))
        sent = embedding_requests(sim)
    assert done.returncode in (0, 3), done.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 5 + ["error"]
    assert "over openai/text-embedding-3-small's 8,192-token input limit" in out["error_message"][5]
    assert all(len(text) < 100 for body in sent for text in body["input"])


@pytest.mark.timeout(60)
def test_an_estimate_counts_inputs_a_request_and_offers_no_batch_mode(
    tmp_path: Path, sim_thread: Any
) -> None:
    rows(tmp_path, 200)
    with sim_thread() as sim:
        done = run_command("estimate", job(tmp_path, sim, "openrouter = true"))
        sent = sim_get(sim, "requests")["data"]
    assert done.returncode == 0, done.stderr
    # The Batch API takes chat requests only: it is neither priced nor blamed on the model.
    assert "batch" not in done.stdout.lower(), done.stdout
    assert "the 200 inputs go up to 64 a request (at least 4 requests)" in done.stdout
    assert not [e for e in sent if e["path"].endswith(("/embeddings", "/chat/completions"))]


@pytest.mark.timeout(60)
def test_pipeline_embed_runs_a_job_as_an_embeddings_job(tmp_path: Path, sim_thread: Any) -> None:
    rows(tmp_path, 100)
    with sim_thread() as sim:
        config = Path(job(tmp_path, sim, "dimensions = 8"))
        config.write_text(config.read_text().replace('endpoint = "embeddings"\n', ""))
        done = run_command("embed", str(config))
        sent = embedding_requests(sim)
    assert done.returncode == 0, done.stderr
    assert 2 <= len(sent) < 100  # many rows a request
    assert pl.read_parquet(tmp_path / "out.parquet").schema["embedding"] == pl.Array(pl.Float32, 8)
