"""Golden files: what users and their scripts rely on, byte for byte, so that moving code around
cannot change it unnoticed. Each test compares against a file in `tests/golden/`.

    PIPELINE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py   # rewrite them, then review the diff

Pinned: every command's `--help`; the journal's DDL (from `sqlite_master`) and meta keys; the
request bytes and `request_hash` of the bundled example jobs; the output's Arrow schema and the
keys of its Parquet metadata; the JSON log events with their fields, and the summary's keys and
lines.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest

from tests.helpers import check_golden, cli_env, run_cli, write_job

CONFIGS = Path(__file__).parent.parent / "configs"


def pipeline(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # A fixed width: click wraps help to the terminal's, and there is no terminal here.
    env = {**cli_env(), "COLUMNS": "100"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True, text=True, env=env, timeout=120, cwd=cwd, check=False,
    )  # fmt: skip


def numbers_masked(text: str) -> str:
    """Figures that differ from run to run (times, rates) as N."""
    return re.sub(r"\d+(?:[.,]\d+)*", "N", text)


# ------------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "command", ["", "run", "status", "export", "estimate", "models", "simulate"]
)
def test_help_of_every_command(command: str) -> None:
    done = pipeline(*([command] if command else []), "--help")
    assert done.returncode == 0, done.stderr
    check_golden(f"help-{command or 'pipeline'}.txt", done.stdout)


# ----------------------------------------------------------------- the example jobs


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two bundled jobs, their first 12 rows, against the bundled simulator."""
    folders = {}
    for name in ("example", "extract"):
        folder = tmp_path_factory.mktemp(name)
        done = pipeline(
            "run", str(CONFIGS / f"{name}.toml"), "--simulate", "--limit", "12",
            "--output", str(folder / "out.parquet"), "--log-format", "json",
            "--log-file", str(folder / "log.jsonl"),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        folders[name] = folder
    return folders


@pytest.mark.parametrize("name", ["example", "extract"])
def test_request_hashes_of_the_example_jobs(example_runs: dict[str, Path], name: str) -> None:
    """With --simulate the hash is of "(simulator)", the body and a sample's salt: pinning the
    hashes pins every byte of every body too."""
    with sqlite3.connect(example_runs[name] / "out.parquet.journal") as db:
        rows = db.execute("SELECT position, key, request_hash FROM results ORDER BY position")
        lines = [f"{position} {key} {request_hash}" for position, key, request_hash in rows]
    check_golden(f"request-hashes-{name}.txt", "\n".join(lines) + "\n")


@pytest.mark.parametrize("name", ["example", "extract"])
def test_request_bytes_of_the_example_jobs(tmp_path: Path, sim_thread: Any, name: str) -> None:
    with sim_thread() as sim:
        done = run_cli(
            str(CONFIGS / f"{name}.toml"), "--limit", "6", "--base-url", sim.base_url,
            "--output", str(tmp_path / "out.parquet"), "--quiet",
        )  # fmt: skip
        bodies = sorted(
            raw.decode()
            for method, path, _, raw in sim.simulator.requests_log
            if path.endswith("/chat/completions")
        )
    assert done.returncode == 0, done.stderr
    check_golden(f"request-bodies-{name}.txt", "\n".join(bodies) + "\n")


def test_journal_layout(example_runs: dict[str, Path]) -> None:
    with sqlite3.connect(example_runs["example"] / "out.parquet.journal") as db:
        ddl = db.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
        ).fetchall()
        meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
    lines = [f"-- {kind} {name} on {table}\n{sql};" for kind, name, table, sql in ddl if sql]
    fingerprint = json.loads(meta["config"])
    lines += [
        f"-- meta keys: {', '.join(sorted(meta))}",
        f"-- meta format: {meta['format']}",
        f"-- meta config sections: {', '.join(fingerprint)}",
        f"-- meta config.prompt keys: {', '.join(fingerprint['prompt'])}",
        f"-- meta config.request keys: {', '.join(fingerprint['request'])}",
        f"-- meta input file keys: {', '.join(json.loads(meta['input'])[0])}",
    ]
    check_golden("journal.sql", "\n".join(lines) + "\n")


@pytest.mark.parametrize("name", ["example", "extract"])
def test_output_schema_and_metadata_keys(example_runs: dict[str, Path], name: str) -> None:
    path = example_runs[name] / "out.parquet"
    schema = pq.read_schema(path)
    file_metadata = pq.read_metadata(path).metadata
    metadata = json.loads(file_metadata[b"pipeline"])
    lines = [f"{field.name}: {field.type}" for field in schema]
    lines.append(
        f"-- parquet metadata keys: {', '.join(sorted(k.decode() for k in file_metadata))}"
    )
    lines.append(f"-- pipeline metadata keys: {', '.join(sorted(metadata))}")
    (model,) = metadata["by_model"].values()
    lines.append(f"-- pipeline metadata by_model.<model> keys: {', '.join(sorted(model))}")
    check_golden(f"output-schema-{name}.txt", "\n".join(lines) + "\n")
    assert pl.read_parquet(path).height == 12


# ------------------------------------------------------------------------------ logs


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def shape(logged: list[dict[str, Any]]) -> str:
    """The first and last event, then each event once with its fields (in between, events come
    in an order that depends on timing)."""
    seen: dict[str, list[str]] = {}
    for event in logged:
        seen.setdefault(event["event"], sorted(event))
    lines = [f"first {logged[0]['event']}, last {logged[-1]['event']}"]
    lines += [f"{name}: {', '.join(fields)}" for name, fields in sorted(seen.items())]
    return "\n".join(lines) + "\n"


def test_json_log_of_a_run_that_finishes(tmp_path: Path, sim_thread: Any) -> None:
    """start, rate_limited, row_failed, summary (progress comes every 10 s: not in a short run)."""
    prompts = ["fine", "[[sim:429*1]] busy", "[[sim:403*]] flagged", "also fine"]
    pl.DataFrame({"id": ["a", "b", "c", "d"], "text": prompts}).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim)), "--log-format", "json")
    assert done.returncode == 3, done.stderr
    logged = [json.loads(line) for line in done.stderr.splitlines()]
    summary = logged[-1]
    assert summary["event"] == "summary" and summary["exit_code"] == 3
    check_golden(
        "log-finished.txt",
        shape(logged)
        + f"by_model: {', '.join(sorted(next(iter(summary['by_model'].values()))))}\n",
    )


def test_json_log_of_a_run_stopped_by_its_budget(tmp_path: Path, sim_thread: Any) -> None:
    pl.DataFrame({"id": ["a", "b"], "text": ["one", "two"]}).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        done = run_cli(
            str(write_job(tmp_path, sim)), "--log-format", "json", "--max-cost", "0.0000001",
            "--max-tokens", "10",
        )  # fmt: skip
    assert done.returncode == 4, done.stderr
    check_golden("log-stopped.txt", shape([json.loads(line) for line in done.stderr.splitlines()]))


def test_json_log_of_a_run_that_cannot_start(tmp_path: Path) -> None:
    done = pipeline(
        "run", "--input", str(tmp_path / "missing.csv"), "--template", "{text}", "--output",
        str(tmp_path / "out.parquet"), "--simulate", "--log-format", "json",
    )  # fmt: skip
    assert done.returncode == 1
    check_golden("log-error.txt", shape([json.loads(line) for line in done.stderr.splitlines()]))


def test_text_summary_lines(tmp_path: Path, sim_thread: Any) -> None:
    prompts = ["fine", "fine", "[[sim:403*]] flagged", "also fine"]
    pl.DataFrame({"id": ["a", "b", "c", "d"], "text": prompts}).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim)), "--quiet")
    assert done.returncode == 3
    lines = [line for line in done.stderr.splitlines() if not line.startswith("progress ")]
    check_golden(
        "summary-text.txt", numbers_masked("\n".join(lines).replace(str(tmp_path), "TMP")) + "\n"
    )


def test_status_json_keys(example_runs: dict[str, Path]) -> None:
    folder = example_runs["example"]
    done = pipeline(
        "status", str(CONFIGS / "example.toml"), "--simulate", "--limit", "12", "--output",
        str(folder / "out.parquet"), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert (figures["rows"], figures["done"], figures["remaining"]) == (12, 12, 0)
    check_golden("status-keys.txt", ", ".join(figures) + "\n")


def test_estimate_json_keys(example_runs: dict[str, Path]) -> None:
    folder = example_runs["example"]
    done = pipeline(
        "estimate", str(CONFIGS / "example.toml"), "--simulate", "--output",
        str(folder / "out.parquet"), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert (figures["total_rows"], figures["done_rows"], figures["todo_rows"]) == (200, 12, 188)
    model = ", ".join(next(iter(figures["by_model"].values())))
    check_golden("estimate-keys.txt", f"{', '.join(figures)}\nby_model: {model}\n")
