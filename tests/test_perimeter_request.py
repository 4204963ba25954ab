"""OpenRouter's own body fields go to OpenRouter only: a strict OpenAI-compatible server refuses
fields it does not know."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import config as config_module
from tests.helpers import run_cli, sim_get, write_job

SCHEMA = (
    '{ type = "object", properties = { rating = { type = "integer" } }, required = ["rating"] }'
)


def bodies(sim: Any) -> list[dict[str, Any]]:
    return [
        e["body"]
        for e in sim_get(sim, "requests")["data"]
        if e["path"].endswith("/chat/completions")
    ]


@pytest.mark.parametrize(
    "answers", ['labels = ["yes", "no"]', f"response_schema = {SCHEMA}"], ids=["labels", "schema"]
)
def test_a_strict_openai_server_gets_only_openai_fields(
    tmp_path: Path, sim_thread: Any, answers: str
) -> None:
    pl.DataFrame({"id": ["a", "b"], "text": ["one", "two"]}).write_csv(tmp_path / "in.csv")
    with sim_thread(strict_openai=True) as sim:
        config = write_job(tmp_path, sim)
        text = config.read_text().replace("[request]\n", f"[request]\n{answers}\n", 1)
        config.write_text(text)
        done = run_cli(str(config))
        sent = bodies(sim)
    assert done.returncode == 0, done.stderr
    assert len(sent) == 2
    assert all("provider" not in body and "response_format" in body for body in sent)


def test_openrouter_fields_when_the_config_says_it_is_openrouter(
    tmp_path: Path, sim_thread: Any
) -> None:
    """`openrouter = true` sends OpenRouter's routing; a strict server then refuses it, naming
    the field, as a row error."""
    pl.DataFrame({"id": ["a"], "text": ["one"]}).write_csv(tmp_path / "in.csv")
    with sim_thread(strict_openai=True) as sim:
        config = write_job(tmp_path, sim)
        config.write_text(
            config.read_text().replace(
                "[request]\n", '[request]\nlabels = ["yes", "no"]\nopenrouter = true\n', 1
            )
        )
        done = run_cli(str(config))
        sent = bodies(sim)
    assert done.returncode == 3, done.stderr
    assert sent[0]["provider"] == {"require_parameters": True}
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert "Unrecognized request argument supplied: provider" in out["error_message"][0]


def test_openrouter_is_detected_from_the_base_url() -> None:
    def is_openrouter(**overrides: Any) -> bool:
        job = config_module.load(
            None,
            {
                "input.path": "in.csv",
                "prompt.column": "text",
                "output.path": "o.parquet",
                **overrides,
            },
        )
        return job.request.is_openrouter

    assert is_openrouter()  # the default base URL
    assert is_openrouter(**{"request.base_url": "https://openrouter.ai/api/beta"})
    assert is_openrouter(**{"request.simulate": True})
    assert not is_openrouter(**{"request.base_url": "http://127.0.0.1:8000/v1"})
    assert not is_openrouter(**{"request.base_url": "https://notopenrouter.ai/v1"})
    assert is_openrouter(
        **{"request.base_url": "http://127.0.0.1:8000/v1", "request.openrouter": True}
    )
