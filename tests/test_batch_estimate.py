"""`pipeline estimate` puts what batch mode would cost beside the sync figure: the same rows at
the model's `:batch` endpoint price, or a note when the model has none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_command

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def estimate(tmp_path: Path, *args: str) -> dict[str, object]:
    done = run_command(
        "estimate", str(CONFIGS / "example.toml"), "--simulate",
        "--output", str(tmp_path / "out.parquet"), "--json", *args,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.timeout(120)
def test_the_estimate_shows_the_batch_price_beside_the_sync_one(tmp_path: Path) -> None:
    figures = estimate(tmp_path)
    # The simulator's :batch rows are at half the price, like most of OpenRouter's.
    assert figures["batch_cost_low_usd"] == pytest.approx(figures["cost_low_usd"] / 2)
    assert figures["batch_cost_high_usd"] == pytest.approx(figures["cost_high_usd"] / 2)
    text = run_command(
        "estimate",
        str(CONFIGS / "example.toml"),
        "--simulate",
        "--output",
        str(tmp_path / "o.parquet"),
    ).stdout
    assert "; batch mode: $" in text


@pytest.mark.timeout(120)
def test_a_model_without_a_batch_endpoint_says_so(tmp_path: Path) -> None:
    figures = estimate(tmp_path, "--model", "mistralai/mistral-7b-instruct")
    assert figures["cost_low_usd"] is not None and figures["batch_cost_low_usd"] is None
    assert any("lists no :batch endpoint" in note for note in figures["notes"])  # type: ignore[union-attr]
