"""Labeling and generation: labels, JSON-schema answers as typed columns, models x samples,
per-row parameters, provider pass-through and reasoning models — through the real CLI against
the simulator."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import read_metadata
from pipeline.answers import AnswerSpec
from pipeline.records import SHARED
from tests.helpers import run_cli, sim_get, write_job
from tests.openapi import validate_component

MIXTRAL = "mistralai/mixtral-8x7b-instruct"
MINI = "openai/gpt-4o-mini"
LABELS = ["positive", "negative", "neutral"]

PRODUCT_SCHEMA = {
    "type": "object",
    "properties": {
        "product": {"type": "string"},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "score": {"type": "number"},
        "recommend": {"type": "boolean"},
        "sentiment": {"enum": ["positive", "negative"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "seller": {"$ref": "#/$defs/seller"},
        "note": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
        "status": {"type": "string"},  # also a result column: becomes answer_status
    },
    "required": ["product", "stars", "sentiment"],
    "$defs": {
        "seller": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "rating": {"type": "number"}},
        }
    },
}


def write_input(folder: Path, texts: list[str], **columns: list[Any]) -> None:
    frame = pl.DataFrame({"id": [f"r{i}" for i in range(len(texts))], "text": texts, **columns})
    frame.write_csv(folder / "in.csv")


def job(folder: Path, sim: Any, request: str, extra: str = "", **kwargs: Any) -> Path:
    config = write_job(folder, sim, extra=extra, **kwargs)
    config.write_text(config.read_text().replace("[request]\n", "[request]\n" + request))
    return config


def ledger(sim: Any) -> list[dict[str, Any]]:
    return sim_get(sim, "ledger")["data"]  # type: ignore[no-any-return]


def output(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(folder / "out.parquet")


# ------------------------------------------------------------------------- structured


def test_schema_answers_become_typed_columns_and_requests_ask_for_the_schema(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, [f"Review {i}: the kettle is fine" for i in range(12)])
    (tmp_path / "schema.json").write_text(json.dumps(PRODUCT_SCHEMA))
    with sim_thread() as sim:
        done = run_cli(
            str(job(tmp_path, sim, 'response_schema = "schema.json"\nopenrouter = true\n'))
        )
        logged = sim_get(sim, "requests")["data"]
    assert done.returncode == 0, done.stderr
    body = logged[0]["body"]
    validate_component("ChatRequest", body)
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "strict": True, "schema": PRODUCT_SCHEMA},
    }
    assert body["provider"] == {"require_parameters": True}

    schema = pq.read_schema(tmp_path / "out.parquet")
    assert schema.field("product").type == pa.string()
    assert schema.field("stars").type == pa.int64()
    assert schema.field("score").type == pa.float64()
    assert schema.field("recommend").type == pa.bool_()
    assert schema.field("sentiment").type == pa.string()
    assert schema.field("tags").type == pa.list_(pa.string())
    assert schema.field("seller").type == pa.struct(
        [("name", pa.string()), ("rating", pa.float64())]
    )
    assert schema.field("note").type == pa.string()  # no single type: JSON text
    assert schema.field("answer_status").type == pa.string()
    names = schema.names
    assert names[: names.index("completion")][-9:] == [
        "product", "stars", "score", "recommend", "sentiment", "tags", "seller", "note", "answer_status",
    ]  # fmt: skip

    frame = output(tmp_path)
    assert frame["status"].unique().to_list() == ["ok"]
    for row in frame.iter_rows(named=True):  # each column holds what the raw answer said
        answer = json.loads(row["completion"])
        assert row["stars"] == answer["stars"] and row["tags"] == answer["tags"]
        assert row["seller"] == answer["seller"] and row["answer_status"] == answer["status"]
        assert 1 <= row["stars"] <= 5 and row["sentiment"] in ("positive", "negative")


def test_invalid_answers_are_asked_again_then_recorded_with_every_attempt_paid(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(
        tmp_path,
        ["fine [[sim:schema_invalid*1]]", "broken [[sim:schema_invalid*]]", "plain"],
    )
    with sim_thread() as sim:
        config = job(tmp_path, sim, f"response_schema = {_toml(PRODUCT_SCHEMA)}\n")
        config.write_text(config.read_text() + "invalid_retries = 2\n")
        done = run_cli(str(config))
        billed = Counter(entry["messages_digest"] for entry in ledger(sim))
        costs = sum(entry["cost"] for entry in ledger(sim))
    assert done.returncode == 3, done.stderr  # one row failed
    rows = {r["id"]: r for r in output(tmp_path).iter_rows(named=True)}
    assert rows["r0"]["status"] == "ok" and rows["r0"]["attempts"] == 2
    assert rows["r0"]["product"] is not None
    assert rows["r1"]["status"] == "error" and rows["r1"]["error_type"] == "invalid_answer"
    assert rows["r1"]["attempts"] == 3 and rows["r1"]["product"] is None
    assert "not JSON" in rows["r1"]["error_message"]
    assert rows["r2"]["attempts"] == 1
    assert sorted(billed.values()) == [1, 2, 3]  # every invalid answer was billed ...
    assert output(tmp_path)["cost_usd"].sum() == pytest.approx(costs, rel=1e-12)  # ... and counted


def test_a_label_set_gives_a_label_column_and_an_instruction(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, [f"Review {i}: it broke after a week" for i in range(20)])
    with sim_thread() as sim:
        done = run_cli(str(job(tmp_path, sim, "", prompt='template = "{text}"\nsystem = "Be strict."')), "--labels", ",".join(LABELS))  # fmt: skip
        body = sim_get(sim, "requests")["data"][0]["body"]
    assert done.returncode == 0, done.stderr
    system = body["messages"][0]["content"]
    assert system.startswith("Be strict.") and "positive, negative, neutral" in system
    assert body["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"] == LABELS
    frame = output(tmp_path)
    assert frame.schema["label"] == pl.String
    assert set(frame["label"]) <= set(LABELS) and frame["label"].null_count() == 0


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ('{"label": "positive"}', "positive"),
        ('{"label": "  Positive\\n"}', "positive"),
        ("NEUTRAL", "neutral"),
        ('"Negative."', "negative"),
        ("**neutral**", "neutral"),
        ("  negative  ", "negative"),
        ("Very positive", None),
        ('{"label": "mixed"}', None),
        ('{"sentiment": "positive"}', None),
        ("", None),
    ],
)
def test_labels_are_normalised_and_anything_outside_the_set_is_invalid(
    answer: str, label: str | None
) -> None:
    spec = AnswerSpec.for_labels(LABELS)
    parsed, problem = spec.check(answer)
    if label is None:
        assert parsed is None and problem is not None and "none of the labels" in problem
    else:
        assert problem is None and json.loads(parsed or "") == {"label": label}


def test_bad_label_and_schema_settings_are_refused_before_anything_is_sent(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, ["a", "b"])
    (tmp_path / "bad.json").write_text('{"type": "objekt"}')
    (tmp_path / "good.json").write_text(json.dumps(PRODUCT_SCHEMA))
    cases = [
        (["--labels", "yes"], "at least two"),
        (["--labels", "Yes,yes"], "differ by more than case"),
        (["--labels", "a,b", "--schema", str(tmp_path / "good.json")], "not both"),
        (["--schema", str(tmp_path / "bad.json")], "not a valid JSON Schema"),
        (["--schema", str(tmp_path / "missing.json")], "cannot read"),
        (["--models", f"{MIXTRAL},{MIXTRAL}"], "names a model twice"),
        (["--models", "nobody/nothing"], "has no model 'nobody/nothing'"),
        (["--n", "0"], "request.n (--n)"),
    ]
    with sim_thread() as sim:
        config = job(tmp_path, sim, "")
        for flags, message in cases:
            done = run_cli(str(config), *flags)
            assert done.returncode == 1 and message in done.stderr, (flags, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert sim_get(sim, "stats")["requests"] == 0
    assert not (tmp_path / "out.parquet").exists()


# ---------------------------------------------------------------------- models x samples


def test_prompts_times_models_times_samples_give_exactly_those_rows_and_totals_add_up(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, [f"Describe item {i}" for i in range(7)])
    models = [MIXTRAL, MINI]
    request = f"models = {json.dumps(models)}\nn = 3\nseed = 11\n"
    with sim_thread() as sim:
        config = job(tmp_path, sim, request)
        first = run_cli(str(config), "--limit", "2")  # a trial run, then the whole job
        done = run_cli(str(config))
        entries = ledger(sim)
        seeds = Counter(e["body"]["seed"] for e in sim_get(sim, "requests")["data"])
    assert first.returncode == 0 and done.returncode == 0, done.stderr
    frame = output(tmp_path)
    assert frame.height == 7 * 2 * 3
    expected = [(f"r{i}", m, s) for i in range(7) for m in models for s in range(3)]
    assert list(zip(frame["id"], frame["model"], frame["sample_index"], strict=True)) == expected
    assert (frame["model"] == frame["response_model"]).all()
    assert len(entries) == 42  # every row sent once, none of the trial's twice
    assert seeds == {11: 14, 12: 14, 13: 14}  # each sample asks with its own seed
    totals = read_metadata(tmp_path / "out.parquet")
    assert set(totals["by_model"]) == set(models)
    assert all(m["rows"] == 21 for m in totals["by_model"].values())
    assert sum(m["cost_usd"] for m in totals["by_model"].values()) == pytest.approx(
        totals["cost_usd"]
    )
    assert totals["cost_usd"] == pytest.approx(sum(e["cost"] for e in entries), rel=1e-12)


def test_samples_without_a_seed_are_separate_requests_not_deduplicated(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, ["same prompt", "same prompt"])
    with sim_thread() as sim:
        done = run_cli(str(job(tmp_path, sim, "")), "--n", "2")
        entries = ledger(sim)
    assert done.returncode == 0, done.stderr
    frame = output(tmp_path)
    assert frame["sample_index"].to_list() == [0, 1, 0, 1]
    # Two samples asked for; the second input row repeats the first and reuses its answers.
    assert len(entries) == 2
    assert frame["response_source"].to_list() == ["api", "api", "duplicate", "duplicate"]


def test_where_the_endpoint_lists_n_the_samples_come_from_one_request(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, [f"Name a colour {i}" for i in range(5)])
    with sim_thread(native_n=True) as sim:
        done = run_cli(str(job(tmp_path, sim, "")), "--n", "3", "--temperature", "1")
        entries = ledger(sim)
        bodies = [e["body"] for e in sim_get(sim, "requests")["data"]]
    assert done.returncode == 0, done.stderr
    assert len(entries) == 5 and all(body["n"] == 3 for body in bodies)  # one request a prompt
    frame = output(tmp_path)
    assert frame.height == 15 and frame["sample_index"].to_list() == [0, 1, 2] * 5
    for first in range(0, 15, 3):
        samples = frame.slice(first, 3)
        assert samples["completion"].n_unique() == 3  # three answers, not one copied
        assert samples["cost_source"].to_list() == ["reported", SHARED, SHARED]
        assert samples["cost_usd"].to_list()[1:] == [0.0, 0.0]
    assert frame["cost_usd"].sum() == pytest.approx(sum(e["cost"] for e in entries), rel=1e-12)
    assert frame["completion_tokens"].sum() == sum(e["completion_tokens"] for e in entries)


def test_samples_asked_for_in_one_request_are_not_taken_from_a_shared_cache(
    tmp_path: Path, sim_thread: Any
) -> None:
    """The cache keeps one answer a request; a request with `n` has several, so a second job
    asks again rather than fill one slot of three (which crashed its output write)."""
    write_input(tmp_path, ["Name a colour", "Name a fruit"])
    cache = str(tmp_path / "cache.sqlite")
    with sim_thread(native_n=True) as sim:
        config = str(job(tmp_path, sim, ""))
        first = run_cli(config, "--n", "3", "--temperature", "1", "--cache", cache)
        (tmp_path / "out.parquet.journal").unlink()
        second = run_cli(config, "--n", "3", "--temperature", "1", "--cache", cache)
        entries = ledger(sim)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    frame = output(tmp_path)
    assert frame["status"].to_list() == ["ok"] * 6 and len(entries) == 4
    assert frame.slice(0, 3)["completion"].n_unique() == 3


def test_one_invalid_answer_among_n_asks_for_all_again_and_every_attempt_is_counted(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, ["steady", "shaky [[sim:schema_invalid*1]]"])
    with sim_thread(native_n=True) as sim:
        done = run_cli(str(job(tmp_path, sim, "")), "--n", "2", "--labels", "yes,no")
        entries = ledger(sim)
    assert done.returncode == 0, done.stderr
    frame = output(tmp_path)
    assert frame["attempts"].to_list() == [1, 1, 2, 2]
    assert set(frame["label"]) <= {"yes", "no"} and frame["label"].null_count() == 0
    assert len(entries) == 3
    assert frame["cost_usd"].sum() == pytest.approx(sum(e["cost"] for e in entries), rel=1e-12)


# ------------------------------------------------------------- per-row and pass-through


def test_per_row_parameters_come_from_columns_and_a_bad_cell_fails_only_its_row(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(
        tmp_path,
        ["one", "two", "three"],
        temp=["0.1", "", "hot"],
        budget=["16", "32", "8"],
    )
    prompt = 'template = "{text}"\nparam_columns = { temperature = "temp", max_tokens = "budget" }'
    with sim_thread() as sim:
        done = run_cli(str(job(tmp_path, sim, "temperature = 0.7\n", prompt=prompt)))
        bodies = {
            e["body"]["messages"][-1]["content"]: e["body"]
            for e in sim_get(sim, "requests")["data"]
        }
    assert done.returncode == 3, done.stderr
    assert bodies["one"]["temperature"] == 0.1 and bodies["one"]["max_tokens"] == 16
    assert bodies["two"]["temperature"] == 0.7 and bodies["two"]["max_tokens"] == 32
    assert "three" not in bodies
    row = output(tmp_path).row(2, named=True)
    assert row["status"] == "error" and "column 'temp' holds 'hot'" in row["error_message"]


def test_provider_preferences_and_fallbacks_pass_through_and_the_serving_model_is_recorded(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, ["a", "b", "c"])
    request = (
        f'fallback_models = ["{MINI}"]\n'
        'provider = { order = ["deepinfra"], allow_fallbacks = false, data_collection = "deny", sort = "price" }\n'
    )
    with sim_thread(down_models=frozenset({MIXTRAL})) as sim:
        done = run_cli(str(job(tmp_path, sim, request)))
        body = sim_get(sim, "requests")["data"][0]["body"]
    assert done.returncode == 0, done.stderr
    validate_component("ChatRequest", body)
    assert body["models"] == [MINI]
    assert body["provider"] == {
        "order": ["deepinfra"], "allow_fallbacks": False, "data_collection": "deny", "sort": "price",
    }  # fmt: skip
    assert output(tmp_path)["response_model"].unique().to_list() == [MINI]


def test_a_reasoning_model_that_spends_the_whole_budget_thinking_is_reported_not_ok(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, ["Prove it", "Explain it"])
    request = 'model = "deepseek/deepseek-r1"\nreasoning = { effort = "high" }\n'
    with sim_thread() as sim:
        short = run_cli(str(job(tmp_path, sim, request)), "--max-tokens", "8")
        body = sim_get(sim, "requests")["data"][0]["body"]
    assert short.returncode == 3, short.stderr
    assert body["reasoning"] == {"effort": "high"}
    frame = output(tmp_path)
    assert frame["status"].unique().to_list() == ["error"]
    assert frame["error_type"].unique().to_list() == ["length"]
    assert (frame["reasoning_tokens"] == 8).all() and (frame["cost_usd"] > 0).all()
    assert "8 of them reasoning" in frame["error_message"][0]


def test_the_readme_examples_run_as_written_and_give_the_columns_it_shows(tmp_path: Path) -> None:
    configs = Path(__file__).resolve().parent.parent / "configs"
    for name in ("example", "extract"):
        done = run_cli(str(configs / f"{name}.toml"), "--simulate", "--limit", "20", "--output", str(tmp_path / f"{name}.parquet"))  # fmt: skip
        assert done.returncode == 0, done.stderr
    labeled = pl.read_parquet(tmp_path / "example.parquet")
    assert set(labeled["label"]) <= {"positive", "negative", "neutral"} and labeled.height == 20
    extracted = pl.read_parquet(tmp_path / "extract.parquet")
    assert extracted.select("rating", "sentiment", "would_buy_again", "complaints", "aspects").dtypes == [
        pl.Int64, pl.String, pl.Boolean, pl.List(pl.String),
        pl.Struct({"quality": pl.Float64, "price": pl.Float64}),
    ]  # fmt: skip


def _toml(value: Any) -> str:
    """A JSON object as a TOML inline table."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)
