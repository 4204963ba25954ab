"""The README's worked examples of richer requests run as written against the simulator, and
give the columns the README says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent


def copy_example(tmp_path: Path, name: str) -> Path:
    """The example config and the data it reads, copied so the run writes into `tmp_path`."""
    shutil.copytree(ROOT / "data", tmp_path / "data", ignore=shutil.ignore_patterns("*.parquet*"))
    (tmp_path / "configs").mkdir()
    return Path(shutil.copy(ROOT / "configs" / name, tmp_path / "configs" / name))


@pytest.mark.timeout(120)
def test_the_photos_example(tmp_path: Path) -> None:
    done = run_cli(str(copy_example(tmp_path, "photos.toml")), "--simulate")
    assert done.returncode in (0, 3), done.stderr
    out = pl.read_parquet(tmp_path / "data" / "photos-described.parquet")
    assert out["status"].to_list() == ["ok", "ok", "ok", "error"]
    assert "column 'photo': file" in out["error_message"][3]


@pytest.mark.timeout(120)
def test_the_embeddings_example(tmp_path: Path) -> None:
    done = run_cli(str(copy_example(tmp_path, "embeddings.toml")), "--simulate")
    assert done.returncode == 0, done.stderr
    out = pl.read_parquet(tmp_path / "data" / "reviews-embedded.parquet")
    assert out.height == 200 and out.schema["embedding"] == pl.Array(pl.Float32, 256)


@pytest.mark.timeout(120)
def test_the_confidence_example(tmp_path: Path) -> None:
    done = run_cli(str(copy_example(tmp_path, "confidence.toml")), "--simulate")
    assert done.returncode == 0, done.stderr
    out = pl.read_parquet(tmp_path / "data" / "reviews-confidence.parquet")
    confidence = out["label_confidence"]
    assert confidence.null_count() == 0
    assert 1 / 3 <= confidence.min() <= confidence.max() <= 1  # type: ignore[operator]


@pytest.mark.timeout(120)
def test_the_rate_example(tmp_path: Path) -> None:
    done = run_cli(str(copy_example(tmp_path, "rate.toml")), "--simulate")
    assert done.returncode == 0, done.stderr
    out = pl.read_parquet(tmp_path / "data" / "reviews-rated.parquet")
    assert out.schema["rating"] == pl.Int64 and out.schema["tags"] == pl.List(pl.String)
    assert out["reasoning"].null_count() == 0
    assert json.loads(out["tool_calls"][0])[0]["function"]["name"] == "rate"
