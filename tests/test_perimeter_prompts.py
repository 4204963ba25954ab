"""Templates at the edges: nested columns render as JSON, and literal braces get a way out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from tests.helpers import run_cli, sim_get, write_job


def sent_prompts(sim: Any) -> list[str]:
    bodies = [
        e["body"]
        for e in sim_get(sim, "requests")["data"]
        if e["path"].endswith("/chat/completions")
    ]
    return sorted(body["messages"][-1]["content"] for body in bodies)


def run_parquet(
    folder: Path, sim_thread: Any, frame: pl.DataFrame, prompt: str
) -> tuple[Any, list[str]]:
    """Run a job over `frame` (as Parquet) with `prompt`; the run and the prompts it sent."""
    frame.write_parquet(folder / "in.parquet")
    with sim_thread() as sim:
        done = run_cli(str(write_job(folder, sim, input_name="in.parquet", prompt=prompt)))
        return done, sent_prompts(sim)


def test_nested_columns_render_as_json_in_a_template(tmp_path: Path, sim_thread: Any) -> None:
    """A struct keeps its field names and a list is a JSON array: what a model can read, and
    what `json.loads` gives back (before, a struct lost its keys and a list was refused)."""
    frame = pl.DataFrame(
        {
            "id": ["a", "b"],
            "meta": [{"n": 1, "p": 'x"y'}, {"n": None, "p": "q"}],
            "tags": [["red", "big"], []],
        }
    )
    done, prompts = run_parquet(tmp_path, sim_thread, frame, 'template = "M={meta} T={tags}"')
    assert done.returncode == 0, done.stderr
    assert prompts == sorted(
        [
            'M={"n":1,"p":"x\\"y"} T=["red","big"]',
            'M={"n":null,"p":"q"} T=[]',
        ]
    )
    meta = json.loads(prompts[0].split(" T=")[0].removeprefix("M="))
    assert meta in ({"n": 1, "p": 'x"y'}, {"n": None, "p": "q"})


def test_a_null_nested_value_is_a_row_error_like_any_null(tmp_path: Path, sim_thread: Any) -> None:
    frame = pl.DataFrame({"id": ["a", "b"], "tags": [["x"], None]})
    done, prompts = run_parquet(tmp_path, sim_thread, frame, 'template = "T={tags}"')
    assert done.returncode == 3, done.stderr
    assert prompts == ['T=["x"]']
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert (
        out["error_message"].to_list()[1]
        == "column 'tags' is null, so the template cannot be filled"
    )


def test_a_nested_prompt_column_is_sent_as_json(tmp_path: Path, sim_thread: Any) -> None:
    frame = pl.DataFrame({"id": ["a"], "doc": [{"title": "t", "body": "b"}]})
    done, prompts = run_parquet(tmp_path, sim_thread, frame, 'column = "doc"')
    assert done.returncode == 0, done.stderr
    assert prompts == ['{"title":"t","body":"b"}']


def test_literal_json_braces_in_a_template_say_how_to_escape(
    tmp_path: Path, sim_thread: Any
) -> None:
    pl.DataFrame({"id": ["a"], "review": ["fine"]}).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = write_job(tmp_path, sim)
        done = run_cli(str(config), "--template", 'Return {"label": "x"} for {review}')
        sent = sim_get(sim, "stats")["requests"]
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "{{" in lines[0] and "}}" in lines[0] and "literal brace" in lines[0], lines[0]
    assert sent == 0


def test_doubled_braces_are_literal_braces(tmp_path: Path, sim_thread: Any) -> None:
    pl.DataFrame({"id": ["a"], "review": ["fine"]}).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = write_job(tmp_path, sim)
        done = run_cli(str(config), "--template", 'Return {{"label": "x"}} for {review}')
        prompts = sent_prompts(sim)
    assert done.returncode == 0, done.stderr
    assert prompts == ['Return {"label": "x"} for fine']


def test_a_binary_column_in_a_template_is_refused_by_name(tmp_path: Path, sim_thread: Any) -> None:
    pl.DataFrame({"id": ["a"], "blob": [b"\x00\xff"]}).write_parquet(tmp_path / "in.parquet")
    with sim_thread() as sim:
        config = write_job(tmp_path, sim, input_name="in.parquet", prompt='template = "{blob}"')
        done = run_cli(str(config))
        sent = sim_get(sim, "stats")["requests"]
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "'blob'" in lines[0] and "binary" in lines[0]
    assert sent == 0
