"""Bad config or input: one clear line naming what to fix, exit 1, nothing sent, nothing written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.helpers import run_cli, sim_get, write_job


def good_input(folder: Path) -> None:
    pl.DataFrame({"id": ["a", "b"], "text": ["one", "two"]}).write_csv(folder / "in.csv")


def edit(config: Path, old: str, new: str) -> None:
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))


CASES: list[tuple[str, Callable[[Path, Path], list[str]], str]] = [
    ("missing input", lambda d, c: (edit(c, '"in.csv"', '"nope.csv"'), [])[1], "input file"),
    (
        "glob matches nothing",
        lambda d, c: (edit(c, '"in.csv"', '"none/*.csv"'), [])[1],
        "matches no files",
    ),
    (
        "corrupt parquet",
        lambda d, c: (
            (d / "bad.parquet").write_bytes(b"PAR1 not really"),
            edit(c, '"in.csv"', '"bad.parquet"'),
            [],
        )[2],
        "cannot be read as parquet",
    ),
    (
        "bad csv encoding",
        lambda d, c: ((d / "in.csv").write_bytes(b"id,text\na,caf\xe9\n"), [])[1],
        "cannot be read",
    ),
    ("empty file", lambda d, c: ((d / "in.csv").write_bytes(b""), [])[1], "is empty"),
    ("header only", lambda d, c: ((d / "in.csv").write_text("id,text\n"), [])[1], "has no rows"),
    ("prompt column missing", lambda d, c: ["--prompt-column", "body"], "columns: id, text"),
    (
        "template column missing",
        lambda d, c: ["--template", "Rate {review}"],
        "names column 'review'",
    ),
    (
        "duplicate ids",
        lambda d, c: ((d / "in.csv").write_text("id,text\na,x\na,y\n"), [])[1],
        "duplicate values (e.g. 'a')",
    ),
    (
        "unknown key",
        lambda d, c: (edit(c, "[request]\n", "[request]\ntemprature = 0\n"), [])[1],
        "did you mean request.temperature?",
    ),
    (
        "wrong type",
        lambda d, c: (edit(c, "[request]\n", '[request]\ntemperature = "hot"\n'), [])[1],
        "request.temperature",
    ),
    (
        "zero concurrency",
        lambda d, c: ["--concurrency", "0"],
        "limits.concurrency (--concurrency) must be a whole number >= 1",
    ),
    ("negative rate", lambda d, c: ["--rps", "-5"], "limits.rps (--rps) must be a number > 0"),
    ("rps and rpm", lambda d, c: ["--rps", "5", "--rpm", "60"], "not both"),
    (
        "output folder missing",
        lambda d, c: ["--output", str(d / "no" / "out.parquet")],
        "does not exist",
    ),
    ("output is input", lambda d, c: ["--output", str(d / "in.csv")], "is the input file"),
    (
        "base url not http",
        lambda d, c: ["--base-url", "ftp://example.org"],
        "must start with http:// or https://",
    ),
    (
        "two prompt sources",
        lambda d, c: ["--prompt-column", "text", "--template", "{text}"],
        "set exactly one prompt source",
    ),
    (
        "result column clash",
        lambda d, c: ((d / "in.csv").write_text("id,text,status\na,x,new\n"), [])[1],
        "--result-prefix",
    ),
]


@pytest.mark.parametrize(("case", "break_it", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_cleanly(
    tmp_path: Path,
    sim_thread: Any,
    case: str,
    break_it: Callable[[Path, Path], list[str]],
    message: str,
) -> None:
    good_input(tmp_path)
    with sim_thread() as sim:
        config = write_job(tmp_path, sim)
        args = break_it(tmp_path, config)
        done = run_cli(str(config), *args)
        sent = sim_get(sim, "stats")["requests"]
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert message in lines[0]
    assert sent == 0
    assert not (tmp_path / "out.parquet").exists()


def test_missing_api_key_is_refused_before_anything_is_sent(
    tmp_path: Path, sim_thread: Any
) -> None:
    good_input(tmp_path)
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim)), key=None)
        sent = sim_get(sim, "stats")["requests"]
    assert done.returncode == 1 and "OPENROUTER_API_KEY" in done.stderr and sent == 0


def test_key_file_from_config_is_used(tmp_path: Path, sim_thread: Any) -> None:
    good_input(tmp_path)
    (tmp_path / "key.txt").write_text("sk-or-v1-from-a-file-000000000000000\n")
    with sim_thread(api_keys=["sk-or-v1-from-a-file-000000000000000"]) as sim:
        config = write_job(tmp_path, sim)
        edit(config, "[request]\n", '[request]\nkey_file = "key.txt"\n')
        done = run_cli(str(config), key=None)
    assert done.returncode == 0, done.stderr


def test_usage_errors_exit_2() -> None:
    done = run_cli("--concurrency", "lots")
    assert done.returncode == 2 and "Invalid value for '--concurrency'" in done.stderr
