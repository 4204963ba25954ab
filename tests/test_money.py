"""Money: exact and computed cost, prices, estimates, budgets, dedupe, cache, and true spend."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import read_metadata
from pipeline.simulator import MODELS_BY_ID
from tests.helpers import cli_env, run_cli, sim_get, sim_post, write_job

MIXTRAL = "mistralai/mixtral-8x7b-instruct"


def texts(n: int, prefix: str = "review") -> list[str]:
    return [f"{prefix} {i}: the kettle is quiet and boils fast, would buy again" for i in range(n)]


def write_input(folder: Path, prompts: list[str]) -> None:
    pl.DataFrame({"id": [f"r{i}" for i in range(len(prompts))], "text": prompts}).write_csv(
        folder / "in.csv"
    )


def ledger(sim: Any) -> list[dict[str, Any]]:
    return sim_get(sim, "ledger")["data"]  # type: ignore[no-any-return]


def out(folder: Path, name: str = "out.parquet") -> pl.DataFrame:
    return pl.read_parquet(folder / name)


def pipeline_cmd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=120,
        check=False,
    )


# ----------------------------------------------------------------------- cost per row


def test_reported_cost_equals_the_ledger_to_float_precision(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, texts(40))
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim)))
        billed = {e["id"]: e["cost"] for e in ledger(sim)}
    assert done.returncode == 0, done.stderr
    frame = out(tmp_path)
    assert frame["cost_source"].unique().to_list() == ["reported"]
    for gen_id, cost in zip(frame["generation_id"], frame["cost_usd"], strict=True):
        assert cost == billed[gen_id]  # the very same float, row by row
    assert frame["cost_usd"].sum() == pytest.approx(sum(billed.values()), rel=1e-15)


def test_an_endpoint_without_cost_gets_cost_computed_from_prices(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, texts(10))
    with sim_thread(omit_cost=True) as sim:
        done = run_cli(str(write_job(tmp_path, sim)))
        billed = {e["id"]: e["cost"] for e in ledger(sim)}
    assert done.returncode == 0, done.stderr
    frame = out(tmp_path)
    assert frame["cost_source"].unique().to_list() == ["computed"]
    price = MODELS_BY_ID[MIXTRAL]
    for row in frame.iter_rows(named=True):
        expected = float(
            row["prompt_tokens"] * price.prompt_price
            + row["completion_tokens"] * price.completion_price
        )
        assert row["cost_usd"] == pytest.approx(expected, rel=1e-12)
        assert row["cost_usd"] == pytest.approx(billed[row["generation_id"]], rel=1e-12)


def test_cost_is_null_not_zero_when_nothing_can_tell_it() -> None:
    from pipeline.completions import Completion
    from pipeline.money import completion_cost

    completion = Completion("hi", "stop", "x/unpriced", "P", "gen-1", 10, 2, 12, 0, 0, None)
    assert completion_cost(completion, None, "x/unpriced") == (None, None)


def test_the_worst_case_is_the_longest_answer_the_request_allows() -> None:
    """max_tokens when the request sets it; else the model's completion limit; else what the
    context leaves after the prompt; else unknown, never a guess."""
    from pipeline.money import ModelPrice, most_output_tokens, worst_case_cost

    def price(max_completion: int | None, context: int | None) -> ModelPrice:
        return ModelPrice(
            "m", "m", context, max_completion, Decimal("0.000001"), Decimal("0.000002")
        )

    assert most_output_tokens(price(16_384, 32_768), 100, 40) == 40
    assert most_output_tokens(price(16_384, 32_768), 100, None) == 16_384
    assert most_output_tokens(price(None, 32_768), 100, None) == 32_668
    assert most_output_tokens(price(None, None), 100, None) is None
    assert worst_case_cost(price(None, None), 100, None) is None
    # The prompt with its estimate's margin (x1.25, plus one), every sample's longest answer.
    assert worst_case_cost(price(16_384, None), 100, None, samples=3) == pytest.approx(
        126 * 0.000001 + 3 * 16_384 * 0.000002
    )


def test_usage_spelled_oddly_is_read_as_counts_and_junk_as_unknown() -> None:
    """Any OpenAI-compatible server may answer: counts spelled 12.0 or "3" are counts, and
    values of the wrong kind are unknown, never a crash when the typed output is written."""
    from pipeline.completions import parse_completion

    data = {
        "id": 7, "model": {"name": "m"}, "provider": "P",
        "choices": [{"message": {"content": "hi"}, "finish_reason": 1}],
        "usage": {
            "prompt_tokens": 12.0, "completion_tokens": "3", "total_tokens": True, "cost": True,
            "prompt_tokens_details": {"cached_tokens": "n/a"},
            "completion_tokens_details": {"reasoning_tokens": 1.5},
        },
    }  # fmt: skip
    c = parse_completion(data, "gen-from-header")
    assert (c.prompt_tokens, c.completion_tokens, c.total_tokens) == (12, 3, None)
    assert (c.cached_tokens, c.reasoning_tokens, c.cost) == (None, None, None)
    assert (c.model, c.provider, c.generation_id, c.finish_reason) == (
        None, "P", "gen-from-header", None,
    )  # fmt: skip
    assert type(c.prompt_tokens) is int and c.choices == [("hi", None)]


# ------------------------------------------------------------------------- prices


def test_models_lists_prices_per_million_and_caches_them(tmp_path: Path) -> None:
    env = {**cli_env(), "PIPELINE_CACHE_DIR": str(tmp_path)}
    listing = pipeline_cmd("models", "--simulate", "--search", "mixtral", env=env)
    assert listing.returncode == 0, listing.stderr
    (line,) = [row for row in listing.stdout.splitlines() if row.startswith(MIXTRAL)]
    assert line.split() == [MIXTRAL, "32,768", "0.54", "0.54"]
    assert "mistral-7b" not in listing.stdout
    (cached,) = tmp_path.glob("models-*.json")
    assert json.loads(cached.read_text())["body"]["data"]
    as_json = json.loads(pipeline_cmd("models", "--simulate", "--json", env=env).stdout)
    assert {m["id"] for m in as_json} >= {MIXTRAL, "deepseek/deepseek-r1"}


def test_an_unknown_model_is_refused_before_anything_is_sent(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, texts(3))
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim)), "--model", "mistralai/mixtral-9x9b")
        sent = sim_get(sim, "stats")["requests"]
    assert (
        done.returncode == 1
        and "has no model 'mistralai/mixtral-9x9b'" in done.stderr
        and sent == 0
    )


# ----------------------------------------------------------------------- estimates


def test_estimate_brackets_the_real_cost_of_the_sample_job(tmp_path: Path) -> None:
    env = {**cli_env(None), "PIPELINE_CACHE_DIR": str(tmp_path)}
    root = Path(__file__).resolve().parents[1]
    journal = tmp_path / "labeled.parquet"
    args = [str(root / "configs" / "example.toml"), "--simulate", "--output", str(journal)]
    estimated = pipeline_cmd("estimate", *args, "--json", env=env)
    assert estimated.returncode == 0, estimated.stderr
    guess = json.loads(estimated.stdout)
    assert guess["todo_rows"] == 200 and guess["done_rows"] == 0
    ran = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    actual = read_metadata(journal)["cost_usd"]
    assert guess["cost_low_usd"] <= actual <= guess["cost_high_usd"]
    assert "characters/4" in guess["method"]


def test_a_pilot_is_journaled_so_the_run_never_pays_for_it_again(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, texts(50))
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        pilot = pipeline_cmd("estimate", config, "--pilot", "10")
        paid_by_pilot = len(ledger(sim))
        done = run_cli(config)
        billed = Counter(e["messages_digest"] for e in ledger(sim))
    assert pilot.returncode == 0, pilot.stderr
    assert "pilot: 10 rows cost" in pilot.stdout and "40 to do" in pilot.stdout
    assert paid_by_pilot == 10
    assert done.returncode == 0 and "(10 done by earlier runs)" in done.stderr
    assert len(billed) == 50 and max(billed.values()) == 1


# -------------------------------------------------------------------------- budget


def test_a_budget_stops_before_the_cap_and_a_higher_cap_finishes_without_repaying(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, texts(60))
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim, extra="[limits]\nconcurrency = 4\n"))
        full_cost = (
            60 * MODELS_BY_ID[MIXTRAL].charges(40, 31)[0]
        )  # roughly: 40 prompt + <=31 output tokens a row
        cap = full_cost / 3
        stopped = run_cli(config, "--max-cost", f"{cap:.8f}", "--max-tokens", "40")
        spent = sum(e["cost"] for e in ledger(sim))
        finished = run_cli(config, "--max-cost", "1", "--max-tokens", "40")
        billed = Counter(e["messages_digest"] for e in ledger(sim))
    assert stopped.returncode == 4, stopped.stderr
    assert "budget reached" in stopped.stderr and "--max-cost" in stopped.stderr
    assert 0 < spent <= cap
    assert finished.returncode == 0, finished.stderr
    assert len(billed) == 60 and max(billed.values()) == 1


def test_a_budget_without_max_tokens_holds_when_answers_run_long(
    tmp_path: Path, sim_thread: Any
) -> None:
    """No max_tokens: each request could use the model's whole completion limit (16,384 tokens
    for mixtral), so that is what the budget must reserve. Answers here are 4,001 tokens, far
    past the 256 an estimate would assume, and 64 requests may be in flight."""
    write_input(tmp_path, texts(200))
    cap = 0.05
    with sim_thread(completion_words=4000) as sim:
        config = str(write_job(tmp_path, sim, extra="[limits]\nconcurrency = 64\n"))
        stopped = run_cli(config, "--max-cost", str(cap))
        billed = sim_get(sim, "ledger")["total_cost"]
    assert stopped.returncode == 4, stopped.stderr
    assert "budget reached" in stopped.stderr
    assert 0 < billed <= cap, f"the server billed ${billed:.4f} against a cap of ${cap}"


def test_a_budget_without_max_tokens_is_refused_up_front_when_no_limit_is_listed(
    tmp_path: Path, sim_thread: Any
) -> None:
    """An endpoint whose /models lists neither a completion limit nor a context length leaves
    the worst case unknown: refused before anything is sent, saying what to set; with
    max_tokens the same job runs, and with only the context length listed, the context
    bounds the worst case."""
    write_input(tmp_path, texts(6))
    with sim_thread(omit_max_completion=True, omit_context_length=True) as sim:
        config = str(write_job(tmp_path, sim))
        refused = run_cli(config, "--max-cost", "1")
        sent = sim_get(sim, "stats")["requests"]
        capped = run_cli(config, "--max-cost", "1", "--max-tokens", "20")
    assert refused.returncode == 1, refused.stderr
    assert "neither a completion limit nor a context length" in refused.stderr
    assert "request.max_tokens (--max-tokens)" in refused.stderr and sent == 0
    assert capped.returncode == 0, capped.stderr
    (tmp_path / "out.parquet.journal").unlink()
    with sim_thread(omit_max_completion=True) as sim:
        by_context = run_cli(str(write_job(tmp_path, sim)), "--max-cost", "1")
    assert by_context.returncode == 0, by_context.stderr


def test_402_reports_the_key_figures_and_preflight_warns(tmp_path: Path, sim_thread: Any) -> None:
    write_input(tmp_path, texts(40))
    with sim_thread(credit_limit=0.0002) as sim:
        done = run_cli(
            str(write_job(tmp_path, sim, extra="[limits]\nconcurrency = 2\n")), "--max-tokens", "30"
        )
    assert done.returncode == 4
    assert "warning: this job could cost up to" in done.stderr and "limit_remaining" in done.stderr
    assert "(key: usage $" in done.stderr and "limit $0.0002" in done.stderr


# ------------------------------------------------------------------ never pay twice


def test_identical_requests_are_sent_once_and_reused(tmp_path: Path, sim_thread: Any) -> None:
    unique = texts(70)
    prompts = unique + [unique[i % 70] for i in range(30)]  # 30% of the rows repeat another
    write_input(tmp_path, prompts)
    with sim_thread(latency=0.005) as sim:
        done = run_cli(str(write_job(tmp_path, sim, extra="[limits]\nconcurrency = 8\n")))
        entries = ledger(sim)
    assert done.returncode == 0, done.stderr
    assert len(entries) == 70 and len({e["messages_digest"] for e in entries}) == 70
    frame = out(tmp_path)
    assert frame["response_source"].value_counts().sort("response_source").rows() == [
        ("api", 70),
        ("duplicate", 30),
    ]
    reused = frame.filter(pl.col("response_source") == "duplicate")
    assert reused["cost_usd"].to_list() == [0.0] * 30 and reused[
        "cost_source"
    ].unique().to_list() == ["reused"]
    # The copy carries the original's answer, row for row.
    by_text = dict(zip(frame["text"][:70], frame["completion"][:70], strict=True))
    assert all(by_text[t] == c for t, c in zip(reused["text"], reused["completion"], strict=True))
    assert frame["cost_usd"].sum() == pytest.approx(sum(e["cost"] for e in entries), rel=1e-12)
    assert "30 rows reused an identical request" in done.stderr


def test_a_shared_cache_answers_an_unchanged_job_with_no_requests(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, texts(25))
    cache = tmp_path / "responses.sqlite"
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        first = run_cli(config, "--cache", str(cache))
        billed_once = ledger(sim)
        second = run_cli(config, "--cache", str(cache), "--output", str(tmp_path / "again.parquet"))
        billed_after = ledger(sim)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert billed_after == billed_once  # zero requests, zero cost
    again = out(tmp_path, "again.parquet")
    assert again["response_source"].unique().to_list() == ["cache"] and again["cost_usd"].sum() == 0
    assert again["completion"].to_list() == out(tmp_path)["completion"].to_list()
    assert "25 came from the cache" in second.stderr


def test_finish_reason_length_is_a_result_and_never_resent(tmp_path: Path, sim_thread: Any) -> None:
    write_input(tmp_path, texts(10))
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        first = run_cli(config, "--max-tokens", "2")
        again = run_cli(config, "--max-tokens", "2")
        requests = sim_get(sim, "stats")["requests"]
    assert first.returncode == 0 and again.returncode == 0
    frame = out(tmp_path)
    assert frame["finish_reason"].unique().to_list() == ["length"] and frame[
        "status"
    ].unique().to_list() == ["ok"]
    assert requests == 10


# ------------------------------------------------------------- spend the client cannot see


def test_true_spend_includes_answers_billed_but_never_received(
    tmp_path: Path, sim_thread: Any
) -> None:
    prompts = [
        f"{t} [[sim:{fault}]]" if fault else t
        for t, fault in zip(texts(12), ["mid_body", "invalid_json", "stall", None] * 3, strict=True)
    ]
    write_input(tmp_path, prompts)
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim)), "--timeout", "0.5")
        entries = ledger(sim)
    assert done.returncode == 0, done.stderr
    meta = read_metadata(tmp_path / "out.parquet")
    wasted = [e for e in entries if e["outcome"] != "ok"]
    assert len(wasted) == 9
    assert meta["paid_twice_requests"] == 9 and meta["lost_attempts_unreconciled"] == 0
    assert meta["paid_twice_cost_usd"] == pytest.approx(sum(e["cost"] for e in wasted), rel=1e-12)
    assert meta["true_cost_usd"] == pytest.approx(sum(e["cost"] for e in entries), rel=1e-12)
    assert meta["cost_usd"] == pytest.approx(
        sum(e["cost"] for e in entries if e["outcome"] == "ok"), rel=1e-12
    )
    assert "9 attempt(s) billed although their answer never arrived" in done.stderr


def test_lost_attempts_wait_for_generation_to_know_them(tmp_path: Path, sim_thread: Any) -> None:
    write_input(tmp_path, [f"{texts(1)[0]} [[sim:mid_body]]"])
    with sim_thread(ready_after=3600) as sim:
        config = str(write_job(tmp_path, sim, extra="[cost]\nreconcile_timeout = 0.6\n"))
        done = run_cli(config)
        sim_post(sim, "config", {"ready_after": 0})
        later = run_cli(config)
    assert done.returncode == 0, done.stderr
    assert "1 not yet known" in done.stderr
    assert read_metadata(tmp_path / "out.parquet")["lost_attempts_unreconciled"] == 0, later.stderr
    assert "1 attempt(s) billed" in later.stderr


# ------------------------------------------------------------------------- totals


def test_totals_by_model_sum_to_the_job_total(tmp_path: Path, sim_thread: Any) -> None:
    models = [MIXTRAL, "openai/gpt-4o-mini", "mistralai/mistral-7b-instruct"]
    frame = pl.DataFrame(
        {
            "id": [str(i) for i in range(30)],
            "text": texts(30),
            "model": [models[i % 3] for i in range(30)],
        }
    )
    frame.write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = write_job(tmp_path, sim, prompt='template = "{text}"\nmodel_column = "model"')
        done = run_cli(str(config))
    assert done.returncode == 0, done.stderr
    meta = read_metadata(tmp_path / "out.parquet")
    by_model = meta["by_model"]
    assert set(by_model) == set(models) and all(m["rows"] == 10 for m in by_model.values())
    assert sum(m["cost_usd"] for m in by_model.values()) == pytest.approx(
        meta["cost_usd"], rel=1e-12
    )
    assert sum(m["prompt_tokens"] for m in by_model.values()) == meta["prompt_tokens"]
    for model in models:
        assert f"  {model}: 10 rows" in done.stderr
    assert Decimal(str(by_model["openai/gpt-4o-mini"]["cost_usd"])) > 0
