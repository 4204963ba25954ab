"""Reading awkward input through the real CLI: malformed CSV and JSONL name the file and line,
globs whose files differ are reconciled by column name (or refused naming both files), TSV and
other delimiters are read, and null ids name the row. Nothing is sent when a problem is
knowable up front."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import run_cli, sim_get, write_job


def refused(folder: Path, sim: Any, input_name: str, *args: str) -> str:
    """Run the job on `input_name`; it must exit 1 with one error line, send nothing and write
    nothing. Returns the line."""
    config = write_job(folder, sim, input_name=input_name)
    done = run_cli(str(config), *args)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert sim_get(sim, "stats")["requests"] == 0
    assert not (folder / "out.parquet").exists()
    return lines[0]


def runs(folder: Path, sim: Any, input_name: str, *args: str, extra: str = "") -> pl.DataFrame:
    """Run the job on `input_name`; it must exit 0. Returns the output."""
    config = write_job(folder, sim, input_name=input_name, extra=extra)
    done = run_cli(str(config), "--quiet", *args)
    assert done.returncode == 0, done.stderr
    return pl.read_parquet(folder / "out.parquet")


# ------------------------------------------------------------------ 4: malformed CSV


def test_csv_unclosed_quote_is_refused_naming_the_line(tmp_path: Path, sim_thread: Any) -> None:
    # The quote opened on line 3 never closes: every later row would be one field.
    (tmp_path / "in.csv").write_text('id,text\na,one\nb,"two\nc,three\nd,four\n')
    with sim_thread() as sim:
        line = refused(tmp_path, sim, "in.csv")
    assert "in.csv:3" in line and "quote" in line


def test_csv_wrong_field_count_names_the_line(tmp_path: Path, sim_thread: Any) -> None:
    (tmp_path / "in.csv").write_text('id,text\na,one\n"b,two\nc,three\n')
    with sim_thread() as sim:
        line = refused(tmp_path, sim, "in.csv")
    assert "in.csv:3" in line


def test_csv_quoted_newlines_are_still_values(tmp_path: Path, sim_thread: Any) -> None:
    (tmp_path / "in.csv").write_text('id,text\na,"two\nlines"\nb,"say ""hi"""\nc,5" screen\n')
    with sim_thread() as sim:
        out = runs(tmp_path, sim, "in.csv")
    assert out["text"].to_list() == ["two\nlines", 'say "hi"', '5" screen']


# --------------------------------------------------- 6 and 16: globs of differing files


def test_parquet_glob_with_reordered_extra_and_narrower_columns_runs(
    tmp_path: Path, sim_thread: Any
) -> None:
    (tmp_path / "incoming").mkdir()
    pq.write_table(
        pa.table({"id": ["a", "b"], "text": ["x", "y"], "score": pa.array([1, 2], pa.int32())}),
        tmp_path / "incoming" / "1.parquet",
    )
    pq.write_table(
        pa.table({"text": ["z"], "id": ["c"], "score": pa.array([3], pa.int64()), "lang": ["en"]}),
        tmp_path / "incoming" / "2.parquet",
    )
    with sim_thread() as sim:
        out = runs(tmp_path, sim, "incoming/*.parquet")
    assert out.columns[:4] == ["id", "text", "score", "lang"]
    assert out["id"].to_list() == ["a", "b", "c"]
    assert out["text"].to_list() == ["x", "y", "z"]
    assert out.schema["score"] == pl.Int64 and out["score"].to_list() == [1, 2, 3]
    assert out["lang"].to_list() == [None, None, "en"]
    assert out["status"].to_list() == ["ok"] * 3


def test_parquet_glob_with_conflicting_types_names_both_files(
    tmp_path: Path, sim_thread: Any
) -> None:
    (tmp_path / "incoming").mkdir()
    pq.write_table(
        pa.table({"id": ["a"], "text": ["x"], "score": ["high"]}), tmp_path / "incoming/1.parquet"
    )
    pq.write_table(
        pa.table({"id": ["b"], "text": ["y"], "score": [3]}), tmp_path / "incoming/2.parquet"
    )
    with sim_thread() as sim:
        line = refused(tmp_path, sim, "incoming/*.parquet")
    assert "1.parquet" in line and "2.parquet" in line and "'score'" in line


def test_jsonl_glob_with_differing_keys_keeps_every_column(tmp_path: Path, sim_thread: Any) -> None:
    (tmp_path / "incoming").mkdir()
    (tmp_path / "incoming/1.jsonl").write_text('{"id": "a", "text": "x", "n": 1}\n')
    (tmp_path / "incoming/2.jsonl").write_text('{"text": "y", "id": "b", "n": 2.5, "lang": "en"}\n')
    with sim_thread() as sim:
        out = runs(tmp_path, sim, "incoming/*.jsonl")
    assert out.columns[:4] == ["id", "text", "n", "lang"]
    assert out["id"].to_list() == ["a", "b"]
    assert out["n"].to_list() == [1.0, 2.5]
    assert out["lang"].to_list() == [None, "en"]


def test_csv_glob_is_matched_by_header_name(tmp_path: Path, sim_thread: Any) -> None:
    (tmp_path / "incoming").mkdir()
    (tmp_path / "incoming/1.csv").write_text("id,text\na,x\n")
    (tmp_path / "incoming/2.csv").write_text("text,id,lang\ny,b,en\n")
    with sim_thread() as sim:
        out = runs(tmp_path, sim, "incoming/*.csv")
    assert out.columns[:3] == ["id", "text", "lang"]
    assert out["id"].to_list() == ["a", "b"] and out["text"].to_list() == ["x", "y"]
    assert out["lang"].to_list() == [None, "en"]


def test_csv_glob_blames_the_odd_file(tmp_path: Path, sim_thread: Any) -> None:
    (tmp_path / "incoming").mkdir()
    (tmp_path / "incoming/1.csv").write_text("id,text\na,x\n")
    (tmp_path / "incoming/2.csv").write_bytes(b"id,text\nb,caf\xe9\n")
    with sim_thread() as sim:
        line = refused(tmp_path, sim, "incoming/*.csv")
    assert "2.csv:2" in line and "1.csv" not in line


# -------------------------------------------------- 15: encodings, JSONL lines, null ids


def test_latin1_csv_names_the_line_and_how_to_reencode(tmp_path: Path, sim_thread: Any) -> None:
    (tmp_path / "in.csv").write_bytes(b"id,text\na,ok\nb,caf\xe9\n")
    with sim_thread() as sim:
        line = refused(tmp_path, sim, "in.csv")
    assert "in.csv:3" in line and "not UTF-8" in line and "'text'" in line
    assert "iconv -f latin1 -t utf-8" in line


@pytest.mark.parametrize("bad_line", [3, 2500], ids=["while inferring", "while reading"])
def test_malformed_jsonl_line_is_named(tmp_path: Path, sim_thread: Any, bad_line: int) -> None:
    lines = [json.dumps({"id": f"r{i}", "text": "t"}) for i in range(1, 3001)]
    lines[bad_line - 1] = '{"id": "oops", text}'
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    with sim_thread() as sim:
        line = refused(tmp_path, sim, "in.jsonl", "--limit", "1")
    assert f"in.jsonl:{bad_line}" in line


def test_jsonl_numbers_mixing_ints_and_floats_read_as_floats(
    tmp_path: Path, sim_thread: Any
) -> None:
    rows = [{"id": f"r{i}", "text": "t", "score": 1} for i in range(1500)]
    rows[1400]["score"] = 1.5  # past the rows a reader samples for types
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with sim_thread() as sim:
        out = runs(tmp_path, sim, "in.jsonl", "--limit", "2")
    assert out.schema["score"] == pl.Float64


def test_null_id_names_the_first_row(tmp_path: Path, sim_thread: Any) -> None:
    (tmp_path / "in.csv").write_text("id,text\na,x\nb,y\n,z\nd,w\n,v\n")
    with sim_thread() as sim:
        line = refused(tmp_path, sim, "in.csv")
    assert "'id'" in line and "in 2 row(s)" in line and "in.csv row 3" in line


def test_null_id_in_a_later_file_names_that_file(tmp_path: Path, sim_thread: Any) -> None:
    (tmp_path / "incoming").mkdir()
    (tmp_path / "incoming/1.jsonl").write_text('{"id": "a", "text": "x"}\n')
    (tmp_path / "incoming/2.jsonl").write_text('{"id": "b", "text": "y"}\n{"text": "z"}\n')
    with sim_thread() as sim:
        line = refused(tmp_path, sim, "incoming/*.jsonl")
    assert "2.jsonl row 2" in line


# ------------------------------------------------------------------- 18: TSV, delimiters


def test_tsv_is_read_by_extension(tmp_path: Path, sim_thread: Any) -> None:
    (tmp_path / "in.tsv").write_text("id\ttext\na\thello, world\nb\ttwo\n")
    with sim_thread() as sim:
        out = runs(tmp_path, sim, "in.tsv")
    assert out["text"].to_list() == ["hello, world", "two"]


def test_input_format_tsv_flag(tmp_path: Path, sim_thread: Any) -> None:
    (tmp_path / "in.txt").write_text("id\ttext\na\tx\n")
    with sim_thread() as sim:
        out = runs(tmp_path, sim, "in.txt", "--input-format", "tsv")
    assert out["text"].to_list() == ["x"]


def test_input_delimiter_key(tmp_path: Path, sim_thread: Any) -> None:
    (tmp_path / "in.csv").write_text("id;text\na;x,y\n")
    with sim_thread() as sim:
        config = write_job(tmp_path, sim)
        config.write_text(config.read_text().replace("[input]\n", '[input]\ndelimiter = ";"\n'))
        done = run_cli(str(config), "--quiet")
    assert done.returncode == 0, done.stderr
    assert pl.read_parquet(tmp_path / "out.parquet")["text"].to_list() == ["x,y"]


def test_unknown_extension_mentions_tsv(tmp_path: Path, sim_thread: Any) -> None:
    (tmp_path / "in.txt").write_text("id\ttext\na\tx\n")
    with sim_thread() as sim:
        line = refused(tmp_path, sim, "in.txt")
    assert "tsv" in line and "--input-format" in line


@pytest.mark.parametrize(
    ("input_name", "delimiter", "message"),
    [("in.csv", "ab", "must be one character"), ("in.jsonl", ";", "applies to CSV input")],
)
def test_bad_delimiter_is_refused(
    tmp_path: Path, sim_thread: Any, input_name: str, delimiter: str, message: str
) -> None:
    (tmp_path / "in.csv").write_text("id,text\na,x\n")
    (tmp_path / "in.jsonl").write_text('{"id": "a", "text": "x"}\n')
    with sim_thread() as sim:
        line = refused(tmp_path, sim, input_name, "--delimiter", delimiter)
    assert "input.delimiter (--delimiter)" in line and message in line
