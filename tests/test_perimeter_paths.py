"""The files a run reads and writes: the input, the output, the journal and their lock files are
distinct, the output is a Parquet file that one job at a time writes, a refused run leaves
nothing behind, and a full disk is one clear line that a re-run recovers from without paying
twice. All through the real CLI against the simulator."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.helpers import cli_env, run_cli, sim_get, start_cli, wait_for, write_job


def good_input(folder: Path, rows: int = 2) -> bytes:
    pl.DataFrame({"id": [f"r{i}" for i in range(rows)], "text": [f"t{i}" for i in range(rows)]}).write_csv(folder / "in.csv")  # fmt: skip
    return (folder / "in.csv").read_bytes()


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def last_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """A run stopped mid-way says so as it stops, then ends with its one error line."""
    assert "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), done.stderr
    return line


def journal_rows(path: Path) -> int:
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path)) as db:
        try:
            return int(db.execute("SELECT COUNT(*) FROM results").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


# ------------------------------------------------------------- 1, 2: three distinct files


def _hard_link(d: Path) -> list[str]:
    os.link(d / "in.csv", d / "linked")
    return ["--journal", str(d / "linked")]


def _symlink(d: Path) -> list[str]:
    (d / "link").symlink_to(d / "in.csv")
    return ["--journal", str(d / "link")]


def _glob(d: Path) -> list[str]:
    (d / "parts").mkdir()
    (d / "in.csv").rename(d / "parts" / "a.csv")
    (d / "parts" / "b.csv").write_text("id,text\nx,y\n")
    return ["--input", str(d / "parts" / "*.csv"), "--journal", str(d / "parts" / "b.csv")]


def _lock_is_input(d: Path) -> list[str]:
    (d / "in.csv").rename(d / "in.csv.lock")
    return ["--input", str(d / "in.csv.lock"), "--input-format", "csv", "--journal", str(d / "in.csv")]  # fmt: skip


JOURNAL_IS_INPUT: list[tuple[str, Callable[[Path], list[str]]]] = [
    ("same path", lambda d: ["--journal", str(d / "in.csv")]),
    ("through ..", lambda d: ["--journal", str(d / "sub" / ".." / "in.csv")]),
    ("symlink", _symlink),
    ("hard link", _hard_link),
    ("one file of a glob", _glob),
    ("its lock file is the input", _lock_is_input),
]


@pytest.mark.parametrize(("case", "args"), JOURNAL_IS_INPUT, ids=[c[0] for c in JOURNAL_IS_INPUT])
def test_a_journal_naming_the_input_is_refused_and_the_input_kept(
    tmp_path: Path, sim_thread: Any, case: str, args: Callable[[Path], list[str]]
) -> None:
    good_input(tmp_path)
    (tmp_path / "sub").mkdir()
    extra = args(tmp_path)
    inputs = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with sim_thread() as sim:
        # --restart too: it would delete the journal, here the input
        done = run_cli(str(write_job(tmp_path, sim)), *extra, "--restart")
        sent = sim_get(sim, "stats")["requests"]
    line = one_error_line(done)
    assert done.returncode == 1 and sent == 0
    assert "output.journal (--journal)" in line and "input" in line, line
    for path, content in inputs.items():
        assert path.read_bytes() == content, path
    assert not list(tmp_path.rglob("*.journal*")) and not (tmp_path / "out.parquet").exists()


def test_an_output_temp_name_matching_the_input_is_refused(tmp_path: Path, sim_thread: Any) -> None:
    """The unfinished output `.NAME.tmp-PID` of a dead run is deleted at start: never the input."""
    good_input(tmp_path)
    (tmp_path / "in.csv").rename(tmp_path / ".out.parquet.tmp-999999")
    with sim_thread() as sim:
        args = ["--input", str(tmp_path / ".out.parquet.tmp-999999"), "--input-format", "csv"]
        done = run_cli(str(write_job(tmp_path, sim)), *args)
    assert done.returncode == 1 and "input" in one_error_line(done)
    assert (tmp_path / ".out.parquet.tmp-999999").exists()


@pytest.mark.parametrize("how", ["same path", "symlink"])
def test_a_journal_that_is_the_output_is_refused(tmp_path: Path, sim_thread: Any, how: str) -> None:
    good_input(tmp_path)
    journal = tmp_path / "out.parquet"
    if how == "symlink":
        journal = tmp_path / "journal-link"
        journal.symlink_to(tmp_path / "out.parquet")  # dangling until the output is written
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim)), "--journal", str(journal))
        sent = sim_get(sim, "stats")["requests"]
    line = one_error_line(done)
    assert done.returncode == 1 and sent == 0
    assert "output.journal (--journal)" in line and "output.path (--output)" in line, line
    assert not (tmp_path / "out.parquet").exists()


# ------------------------------------------------------------------ 3: one writer per output


def test_a_second_job_writing_the_same_output_is_locked_out(
    tmp_path: Path, sim_thread: Any
) -> None:
    good_input(tmp_path, 20)
    with sim_thread(latency=0.15) as sim:
        config = str(write_job(tmp_path, sim, extra="[limits]\nconcurrency = 1\n"))
        first = start_cli(config, "--journal", str(tmp_path / "one.journal"))
        try:
            wait_for(lambda: journal_rows(tmp_path / "one.journal") >= 1, what="the first run")
            second = run_cli(config, "--journal", str(tmp_path / "two.journal"))
        finally:
            first.communicate(timeout=60)
    assert second.returncode == 5, second.stderr
    (line,) = second.stderr.strip().splitlines()  # 5 is an expected end: not an `error:`
    assert "out.parquet" in line and f"pid {first.pid}" in line, line
    assert not list(tmp_path.glob("two.journal*"))
    assert first.returncode == 0
    assert pl.read_parquet(tmp_path / "out.parquet").height == 20


# --------------------------------------------------------------- 7, 14: what the output is


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("folder", "is a folder"),
        ("in.csv/out.parquet", "is not a folder"),
        ("out.csv", "Parquet"),
        ("out.jsonl", "Parquet"),
    ],
)
def test_an_output_that_cannot_be_the_parquet_file_is_refused_up_front(
    tmp_path: Path, sim_thread: Any, output: str, message: str
) -> None:
    good_input(tmp_path)
    (tmp_path / "folder").mkdir()
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim)), "--output", str(tmp_path / output))
        sent = sim_get(sim, "stats")["requests"]
    line = one_error_line(done)
    assert done.returncode == 1 and sent == 0
    assert "output.path (--output)" in line and message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "in.csv", "job.toml"]


def test_an_output_without_an_extension_is_written_as_parquet(
    tmp_path: Path, sim_thread: Any
) -> None:
    good_input(tmp_path)
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim)), "--output", str(tmp_path / "labeled"))
    assert done.returncode == 0, done.stderr
    assert pl.read_parquet(tmp_path / "labeled").height == 2


# ----------------------------------------------------------- 19: a refused run leaves nothing


@pytest.mark.parametrize(
    "args", [["--template", "{missing}"], ["--concurrency", "0"], ["--model", "nope/nothing"]]
)
def test_a_refused_run_leaves_no_files(tmp_path: Path, sim_thread: Any, args: list[str]) -> None:
    good_input(tmp_path)
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim)), *args)
    assert done.returncode == 1, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "job.toml"]


def test_a_finished_run_leaves_no_lock_files(tmp_path: Path, sim_thread: Any) -> None:
    good_input(tmp_path)
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim)))
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob("*.lock"))


# ---------------------------------------------------------------------------- 8: full disks


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """`disk = small_disk("96k")`: a tmpfs of that size (root only); `remount(disk)` grows it."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        disk = tmp_path / "disk"
        disk.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(disk)
        return disk

    yield mount
    for disk in mounted:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def grow(disk: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)


def big_input(folder: Path, rows: int, blob: int = 0) -> None:
    frame = pl.DataFrame(
        {"id": [f"r{i}" for i in range(rows)], "text": [f"row {i} " * 8 for i in range(rows)]}
    )
    if blob:  # incompressible: the output is much bigger than the journal
        frame = frame.with_columns(blob=pl.Series([os.urandom(blob).hex() for _ in range(rows)]))
    frame.write_csv(folder / "in.csv")


def test_a_journal_filling_its_disk_stops_the_run_and_the_next_run_resumes(
    tmp_path: Path, sim_thread: Any, small_disk: Callable[[str], Path]
) -> None:
    big_input(tmp_path, 600)
    disk = small_disk("256k")
    paths = ["--output", str(disk / "out.parquet"), "--concurrency", "4"]
    with sim_thread(latency=0.005) as sim:  # a few commits before the disk is full
        config = str(write_job(tmp_path, sim))
        first = run_cli(config, *paths)
        sent_first = sim_get(sim, "stats")["requests"]
        grow(disk)
        saved = journal_rows(disk / "out.parquet.journal")
        second = run_cli(config, *paths)
        sent_second = sim_get(sim, "stats")["requests"] - sent_first
    assert first.returncode == 4, first.stderr
    line = last_error_line(first)
    assert "disk is full" in line and str(disk / "out.parquet.journal") in line, line
    assert 0 < saved < 600
    assert second.returncode == 0, second.stderr
    assert sent_second == 600 - saved  # what was saved is not paid again
    with contextlib.closing(sqlite3.connect(disk / "out.parquet.journal")) as db:
        assert db.execute("PRAGMA quick_check").fetchone() == ("ok",)
    assert pl.read_parquet(disk / "out.parquet").height == 600


def test_an_output_filling_its_disk_keeps_the_journal_and_the_next_run_pays_nothing(
    tmp_path: Path, sim_thread: Any, small_disk: Callable[[str], Path]
) -> None:
    big_input(tmp_path, 120, blob=4000)
    disk = small_disk("400k")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        paths = ["--output", str(disk / "out.parquet"), "--journal", str(tmp_path / "j")]
        first = run_cli(config, *paths)
        sent_first = sim_get(sim, "stats")["requests"]
        grow(disk)
        second = run_cli(config, *paths)
        sent_second = sim_get(sim, "stats")["requests"] - sent_first
    assert first.returncode == 4, first.stderr
    line = last_error_line(first)
    assert "disk is full" in line and str(disk / "out.parquet") in line, line
    assert sent_first == 120 and journal_rows(tmp_path / "j") == 120
    assert second.returncode == 0, second.stderr
    assert sent_second == 0
    assert pl.read_parquet(disk / "out.parquet").height == 120


def _file_size_limit(limit: int) -> Callable[[], None]:
    def limited() -> None:  # in the child: writes past `limit` bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limited


def test_a_file_size_limit_is_the_same_clear_error_and_the_run_resumes(
    tmp_path: Path, sim_thread: Any
) -> None:
    """EFBIG (a ulimit -f, as for a quota) reads as SQLite's 'disk I/O error': said the same way."""
    big_input(tmp_path, 600)
    with sim_thread(latency=0.005) as sim:  # a few commits before the limit
        config = str(write_job(tmp_path, sim))
        first = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", config, "--concurrency", "4"],
            capture_output=True, text=True, env=cli_env(), timeout=60, check=False,
            preexec_fn=_file_size_limit(120_000),
        )  # fmt: skip
        sent_first = sim_get(sim, "stats")["requests"]
        saved = journal_rows(tmp_path / "out.parquet.journal")
        second = run_cli(config)
        sent_second = sim_get(sim, "stats")["requests"] - sent_first
    assert first.returncode == 4, first.stderr
    line = last_error_line(first)
    assert "disk is full" in line and "out.parquet.journal" in line, line
    assert 0 < saved < 600
    assert second.returncode == 0, second.stderr
    assert sent_second == 600 - saved
