"""Prompt caching through the real CLI against the simulator: a labeling job whose long
system prompt is marked for caching on a model that needs breakpoints is billed at the cache
rate for all but its first rows, the output and summary say what it saved, `provider.order`
gets a warning, and jobs that do not use it send the same requests as before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import read_metadata
from pipeline.simulator.catalogue import MODELS_BY_ID
from tests.helpers import FAST_RETRY, run_cli, run_command, sim_get
from tests.openapi import validate_component

CLAUDE = MODELS_BY_ID["anthropic/claude-sonnet-4"]
GUIDE = "Positive means the buyer would recommend it; negative means they would not. " * 110


def labeling_job(folder: Path, sim: Any, model: str, rows: int, extra: str = "") -> str:
    pl.DataFrame(
        {
            "id": [f"r{i}" for i in range(rows)],
            "text": [f"review {i}: it works" for i in range(rows)],
        }
    ).write_csv(folder / "in.csv")
    config = folder / "job.toml"
    config.write_text(
        f'[input]\npath = "in.csv"\nid_column = "id"\n\n'
        f'[prompt]\ntemplate = "{{text}}"\nsystem = "{GUIDE}"\n\n'
        f'[request]\nbase_url = "{sim.base_url}"\nmodel = "{model}"\n'
        f'labels = ["positive", "negative"]\n{extra}\n'
        f'[output]\npath = "out.parquet"\n\n[limits]\nconcurrency = 8\n\n{FAST_RETRY}'
    )
    return str(config)


@pytest.mark.timeout(120)
def test_a_long_system_prompt_is_billed_at_the_cache_rate_after_the_first_rows(
    tmp_path: Path, sim_thread: Any
) -> None:
    with sim_thread() as sim:
        done = run_cli(labeling_job(tmp_path, sim, CLAUDE.id, 200))
        ledger = sim_get(sim, "ledger")["data"]
        sent = [entry["body"] for entry in sim_get(sim, "requests")["data"][-3:]]
    assert done.returncode == 0, done.stderr
    for body in sent:  # a breakpoint as OpenRouter's spec has it
        validate_component("ChatRequest", body)
        system = body["messages"][0]["content"]
        assert system[-1]["cache_control"] == {"type": "ephemeral"}
    assert len(ledger) == 200
    written = [e for e in ledger if e["cache_write_tokens"]]
    read = [e for e in ledger if e["cached_tokens"]]
    # The job's session keeps its requests on one provider: one write, every other row reads.
    assert len({e["provider"] for e in ledger}) == 1
    assert len(written) == 1 and len(read) == 199
    prefix = written[0]["cache_write_tokens"]
    assert prefix >= 2_000 and all(e["cached_tokens"] == prefix for e in read)
    for entry in read:  # the prefix at the cache-read price
        plain = entry["prompt_tokens"] - prefix
        expected = float(
            prefix * CLAUDE.cache_read_price  # type: ignore[operator]
            + plain * CLAUDE.prompt_price
            + entry["completion_tokens"] * CLAUDE.completion_price
        )
        assert entry["cost"] == pytest.approx(expected)
    meta = read_metadata(tmp_path / "out.parquet")
    assert meta["cached_tokens"] == prefix * len(read)
    assert meta["cache_write_tokens"] == prefix * len(written)
    assert meta["cost_usd"] == pytest.approx(sum(e["cost"] for e in ledger))
    saved = float(
        prefix * len(read) * (CLAUDE.prompt_price - CLAUDE.cache_read_price)  # type: ignore[operator]
        - prefix * len(written) * (CLAUDE.cache_write_price - CLAUDE.prompt_price)  # type: ignore[operator]
    )
    assert meta["cache_saving_usd"] == pytest.approx(saved) and saved > 0
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["cached_tokens"].sum() == meta["cached_tokens"]
    assert out["cache_write_tokens"].sum() == meta["cache_write_tokens"]
    assert "prompt cache:" in done.stderr and f"{meta['cached_share']:.1%}" in done.stderr


@pytest.mark.timeout(120)
def test_a_provider_order_is_warned_about_once(tmp_path: Path, sim_thread: Any) -> None:
    with sim_thread() as sim:
        config = labeling_job(
            tmp_path, sim, CLAUDE.id, 20, extra='provider = {order = ["Amazon Bedrock"]}'
        )
        done = run_cli(config)
        ledger = sim_get(sim, "ledger")["data"]
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "sticky routing" in line]
    assert len(warnings) == 1 and "request.provider" in warnings[0], done.stderr
    assert {e["provider"] for e in ledger} == {"Amazon Bedrock"}


@pytest.mark.timeout(120)
def test_a_model_that_caches_by_itself_gets_the_same_requests_as_before(
    tmp_path: Path, sim_thread: Any
) -> None:
    with sim_thread() as sim:
        for model in ("mistralai/mixtral-8x7b-instruct", "openai/gpt-4o-mini"):
            done = run_cli(labeling_job(tmp_path, sim, model, 3), "--restart")
            assert done.returncode == 0, done.stderr
            body = sim_get(sim, "requests")["data"][-1]["body"]
            assert isinstance(body["messages"][0]["content"], str), json.dumps(body)[:200]
            assert "sticky routing" not in done.stderr


@pytest.mark.timeout(120)
def test_the_estimate_prices_the_cache_and_the_run_falls_inside_it(
    tmp_path: Path, sim_thread: Any
) -> None:
    (tmp_path / "plain").mkdir()
    with sim_thread() as sim:
        config = labeling_job(tmp_path, sim, CLAUDE.id, 100)
        uncached = Path(labeling_job(tmp_path / "plain", sim, CLAUDE.id, 100))
        uncached.write_text(
            uncached.read_text().replace("[prompt]\n", "[prompt]\ncache_prefix = false\n")
        )
        estimated = json.loads(run_command("estimate", config, "--json").stdout)
        plain = json.loads(run_command("estimate", str(uncached), "--json").stdout)
        done = run_cli(config)
        spent = sum(e["cost"] for e in sim_get(sim, "ledger")["data"])
    assert done.returncode == 0, done.stderr
    assert "prompt cache" in estimated["method"]
    assert estimated["cost_low_usd"] <= spent <= estimated["cost_high_usd"]
    assert estimated["cost_low_usd"] < plain["cost_low_usd"] / 3  # the prefix at a tenth


@pytest.mark.timeout(120)
def test_turning_the_mark_on_or_off_resumes_the_job(tmp_path: Path, sim_thread: Any) -> None:
    with sim_thread() as sim:
        config = Path(labeling_job(tmp_path, sim, CLAUDE.id, 10))
        text = config.read_text()
        config.write_text(text.replace("[prompt]\n", "[prompt]\ncache_prefix = false\n"))
        first = run_cli(str(config), "--limit", "4")
        config.write_text(text)  # "auto" again
        second = run_cli(str(config))
        paid = len(sim_get(sim, "ledger")["data"])
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert paid == 10  # the first four not asked again
    assert (
        "prompt.cache_prefix 'off' -> 'auto'" in second.stderr
        or "prompt.cache_prefix" in second.stderr
    )
