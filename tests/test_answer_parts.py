"""The parts of an answer beyond its text, through the real CLI against the simulator: a
label's confidence from the tokens' log-probabilities, the reasoning text, and a function call's
arguments as typed columns."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.answer_parts import label_confidence
from tests.helpers import FAST_RETRY, post_api, run_cli, sim_get
from tests.openapi import validate_component, validate_response

LABELS = ["very positive", "negative", "neutral"]
RATE = {
    "type": "object",
    "properties": {
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["stars", "summary", "tags"],
}
TOOL = {"type": "function", "function": {"name": "rate", "parameters": RATE}}


def inline(value: Any) -> str:
    """`value` as a TOML inline value (JSON with `=` between keys and values)."""
    return json.dumps(value).replace('":', '" =')


TOOL_TOML = inline(TOOL)


def reviews(folder: Path, rows: int) -> None:
    texts = [f"review {i}: {'great' if i % 2 else 'poor'} phone" for i in range(rows)]
    pl.DataFrame({"id": [f"r{i}" for i in range(rows)], "text": texts}).write_csv(folder / "in.csv")


def job(folder: Path, sim: Any, request: str, output: str = "") -> str:
    config = folder / "job.toml"
    config.write_text(
        f'[input]\npath = "in.csv"\nid_column = "id"\n\n[prompt]\ntemplate = "{{text}}"\n\n'
        f'[request]\nbase_url = "{sim.base_url}"\n{request}\n\n'
        f'[output]\npath = "out.parquet"\n{output}\n\n{FAST_RETRY}'
    )
    return str(config)


@pytest.mark.timeout(120)
def test_label_confidence_is_the_probability_of_the_label_and_fits_the_label_set(
    tmp_path: Path, sim_thread: Any
) -> None:
    reviews(tmp_path, 40)
    with sim_thread() as sim:
        config = job(
            tmp_path, sim, f"labels = {json.dumps(LABELS)}\nlogprobs = true\ntop_logprobs = 5"
        )
        done = run_cli(config)
        sent = [entry["body"] for entry in sim_get(sim, "requests")["data"]]
        answer = post_api(sim, "/chat/completions", sent[0])  # the first row's request, asked again
    assert done.returncode == 0, done.stderr
    assert all(body["logprobs"] is True and body["top_logprobs"] == 5 for body in sent)
    validate_component("ChatRequest", sent[0])
    validate_response("/chat/completions", "post", 200, answer)
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out.schema["label_confidence"] == pl.Float64
    ok = out.filter(pl.col("status") == "ok")
    assert ok.height == 40 and ok["label_confidence"].null_count() == 0
    # The chosen label is the likeliest of the set, and never above certainty.
    assert ok["label_confidence"].min() >= 1 / len(LABELS)  # type: ignore[operator]
    assert ok["label_confidence"].max() <= 1.0  # type: ignore[operator]
    # Against the tokens themselves: the row's confidence plus the other labels' first tokens'
    # probabilities where the label begins make the whole label set's mass, 1.
    tokens = answer["choices"][0]["logprobs"]["content"]
    first = next(t for t in tokens if t["top_logprobs"][1:])
    others = sum(math.exp(alt["logprob"]) for alt in first["top_logprobs"][1:])
    pairs = [(t["token"], t["logprob"]) for t in tokens]
    label = json.loads(answer["choices"][0]["message"]["content"])["label"]
    confidence = label_confidence(pairs, label)
    assert confidence is not None and confidence + others == pytest.approx(1.0)
    # The run's row for that request got the same figure ("very positive" is two tokens: its
    # confidence is theirs together).
    row = ok.filter(pl.col("text") == sent[0]["messages"][-1]["content"])
    assert row["label"].to_list() == [label]
    assert row["label_confidence"][0] == pytest.approx(confidence)


@pytest.mark.timeout(120)
def test_a_model_without_logprobs_is_asked_without_and_says_so_once(
    tmp_path: Path, sim_thread: Any
) -> None:
    reviews(tmp_path, 20)
    with sim_thread() as sim:
        config = job(
            tmp_path, sim,
            f'model = "deepseek/deepseek-r1"\nlabels = {json.dumps(LABELS)}\nlogprobs = true',
        )  # fmt: skip
        done = run_cli(config)
        sent = [entry["body"] for entry in sim_get(sim, "requests")["data"]]
    assert done.returncode == 0, done.stderr
    assert len(sent) == 20 and not any("logprobs" in body for body in sent)
    assert done.stderr.count("does not list logprobs") == 1
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 20
    assert out["label_confidence"].null_count() == 20


@pytest.mark.timeout(120)
def test_a_single_function_call_becomes_typed_columns_with_the_reasoning_kept(
    tmp_path: Path, sim_thread: Any
) -> None:
    reviews(tmp_path, 30)
    with sim_thread() as sim:
        config = job(
            tmp_path, sim,
            f'model = "deepseek/deepseek-r1"\ntool_choice = "rate"\ntools = [{TOOL_TOML}]',
            output="keep_reasoning = true",
        )  # fmt: skip
        done = run_cli(config)
        sent = [entry["body"] for entry in sim_get(sim, "requests")["data"]]
        answer = post_api(sim, "/chat/completions", sent[0])
    assert done.returncode == 0, done.stderr
    validate_component("ChatRequest", sent[0])
    validate_response("/chat/completions", "post", 200, answer)
    assert sent[0]["tool_choice"] == {"type": "function", "function": {"name": "rate"}}
    assert "response_format" not in sent[0]  # the arguments are checked, not asked as a format
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 30
    assert out.schema["stars"] == pl.Int64 and out.schema["summary"] == pl.String
    assert out.schema["tags"] == pl.List(pl.String)
    assert out.schema["tool_calls"] == pl.String and out.schema["reasoning"] == pl.String
    for row in out.iter_rows(named=True):
        (call,) = json.loads(row["tool_calls"])
        arguments = json.loads(call["function"]["arguments"])
        assert call["function"]["name"] == "rate"
        assert (row["stars"], row["summary"], row["tags"]) == (
            arguments["stars"], arguments["summary"], arguments["tags"],
        )  # fmt: skip
        assert 1 <= row["stars"] <= 5
        assert row["reasoning"].startswith("Thinking sim:") and row["reasoning_tokens"] > 0


@pytest.mark.timeout(120)
def test_several_tools_keep_the_calls_as_json_and_reasoning_is_off_by_default(
    tmp_path: Path, sim_thread: Any
) -> None:
    reviews(tmp_path, 10)
    other = {"type": "function", "function": {"name": "skip", "parameters": {"type": "object"}}}
    tools = inline([TOOL, other])
    with sim_thread() as sim:
        done = run_cli(job(tmp_path, sim, f'model = "deepseek/deepseek-r1"\ntools = {tools}'))
    assert done.returncode == 0, done.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert "stars" not in out.columns and "reasoning" not in out.columns
    assert all(json.loads(calls)[0]["type"] == "function" for calls in out["tool_calls"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (f"labels = ['a', 'b']\ntools = [{TOOL_TOML}]",
         "set request.tools or request.labels (--labels), not both"),
        ('tool_choice = "rate"', "request.tool_choice needs request.tools"),
        (f'tool_choice = "grade"\ntools = [{TOOL_TOML}]',
         "request.tool_choice must be one of none, auto, required or a function name (rate)"),
        ('tools = [{type = "function", function = {parameters = {}}}]',
         "request.tools[0].function.name must name the function"),
        ("top_logprobs = 3", "request.top_logprobs takes 0 to 20"),
    ],
)  # fmt: skip
def test_bad_tool_and_logprob_settings_are_refused_before_sending(
    tmp_path: Path, sim_thread: Any, extra: str, message: str
) -> None:
    reviews(tmp_path, 3)
    with sim_thread() as sim:
        done = run_cli(job(tmp_path, sim, extra))
        sent = sim_get(sim, "requests")["data"]
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert sent == []
    assert not (tmp_path / "out.parquet").exists()
