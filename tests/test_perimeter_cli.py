"""The command line at its edges: signals in every phase, data files given as configs, and the
quiet exits a scheduler expects."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.helpers import TEST_KEY, cli_env, run_cli, sim_get, wait_for, write_job


def caught_signals(pid: int) -> int:
    """The bit mask of signals the process has a handler for (0 once it has gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return int(
        next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16
    )


def holds_open(pid: int, path: Path) -> bool:
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return False
    for fd in fds:
        try:
            if os.readlink(fd) == str(path):
                return True
        except OSError:
            continue
    return False


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(TEST_KEY),
    )  # fmt: skip


def big_input(folder: Path, rows: int = 1_500_000) -> Path:
    path = folder / "in.csv"
    pl.DataFrame({"id": [f"r{i}" for i in range(rows)], "text": ["some words"] * rows}).write_csv(
        path
    )
    return path


def signal_while_reading(
    folder: Path, sim_thread: Any, signum: int, command: str, *args: str
) -> tuple[subprocess.Popen[str], str, int]:
    """Start `pipeline COMMAND` on a big input, send `signum` once it has the input open; the
    child, its stderr and the requests the simulator saw."""
    source = big_input(folder)
    with sim_thread() as sim:
        config = write_job(folder, sim)
        child = start(command, str(config), *args)
        wait_for(lambda: holds_open(child.pid, source) or child.poll() is not None, what="reading")
        child.send_signal(signum)
        _, err = child.communicate(timeout=60)
        return child, err, sim_get(sim, "stats")["requests"]


pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_starting_exits_128_plus_signal_without_a_traceback(
    tmp_path: Path, sim_thread: Any, signum: int
) -> None:
    """However early it comes (the interpreter still importing), a signal is one plain line and
    130/143, never a KeyboardInterrupt traceback or a silent kill."""
    pl.DataFrame({"id": ["a"], "text": ["x"]}).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = write_job(tmp_path, sim)
        child = start("run", str(config))
        # Our handler for SIGTERM is the first thing the entry point installs.
        wait_for(
            lambda: (
                caught_signals(child.pid) & (1 << (signal.SIGTERM - 1)) != 0
                or child.poll() is not None
            )
        )
        child.send_signal(signum)
        _, err = child.communicate(timeout=30)
        sent = sim_get(sim, "stats")["requests"]
    assert child.returncode == 128 + signum, err
    assert "Traceback" not in err and "Aborted" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: interrupted"), err
    assert sent == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_validation_is_130_or_143_with_a_json_error_event(
    tmp_path: Path, sim_thread: Any, signum: int
) -> None:
    child, err, sent = signal_while_reading(
        tmp_path, sim_thread, signum, "run", "--log-format", "json"
    )
    assert child.returncode == 128 + signum, err
    events = [json.loads(line) for line in err.strip().splitlines()]
    assert events[-1]["event"] == "error" and events[-1]["exit_code"] == 128 + signum, err
    assert sent == 0
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("command", ["status", "estimate"])
def test_sigterm_while_status_or_estimate_reads_the_input_is_143(
    tmp_path: Path, sim_thread: Any, command: str
) -> None:
    child, err, _ = signal_while_reading(tmp_path, sim_thread, signal.SIGTERM, command)
    assert child.returncode == 143, err
    assert err.startswith("error: interrupted") and "Traceback" not in err, err


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("command", ["run", "status", "estimate"])
@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl", "binary"])
def test_a_data_file_given_as_the_config_says_so(
    tmp_path: Path, sim_thread: Any, command: str, kind: str
) -> None:
    frame = pl.DataFrame({"id": ["a"], "text": ["x"]})
    path = tmp_path / f"data.{kind if kind != 'binary' else 'bin'}"
    if kind == "parquet":
        frame.write_parquet(path)
    elif kind == "csv":
        frame.write_csv(path)
    elif kind == "jsonl":
        frame.write_ndjson(path)
    else:
        path.write_bytes(bytes(range(256)))
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", command, str(path)],
        capture_output=True, text=True, env=cli_env(TEST_KEY), timeout=60, check=False,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: config file {path}"), lines[0]
    if kind != "binary":
        assert "--input" in lines[0] and "data file" in lines[0], lines[0]
    else:
        assert "not a TOML" in lines[0] or "not valid TOML" in lines[0], lines[0]


# --------------------------------------------------------------------------- quiet exits


def test_exit_5_and_6_are_not_errors_for_a_scheduler(tmp_path: Path, sim_thread: Any) -> None:
    """A scheduled job that finds the previous run still going (5), or runs out of time (6),
    is an expected outcome: one informational line on stderr (none with --log-file), never
    `error:`, which cron mails every hour."""
    import fcntl

    pl.DataFrame({"id": ["a", "b"], "text": ["x", "y"]}).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = write_job(tmp_path, sim)
        lock = (tmp_path / "out.parquet.journal.lock").open("a+")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            locked = run_cli(str(config))
            logged = run_cli(
                str(config), "--log-format", "json", "--log-file", str(tmp_path / "log.jsonl")
            )
        finally:
            lock.close()
    assert locked.returncode == 5
    assert "error" not in locked.stderr and len(locked.stderr.strip().splitlines()) == 1, (
        locked.stderr
    )
    assert logged.returncode == 5 and logged.stderr == "", logged.stderr
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert events[-1]["exit_code"] == 5 and events[-1]["event"] != "error", events[-1]


def test_exit_6_out_of_time_is_informational(tmp_path: Path, sim_thread: Any) -> None:
    pl.DataFrame({"id": [str(i) for i in range(50)], "text": ["x"] * 50}).write_csv(
        tmp_path / "in.csv"
    )
    with sim_thread(latency="fixed:5") as sim:
        config = write_job(tmp_path, sim)
        done = run_cli(str(config), "--max-runtime", "2s", "--quiet")
        logged = run_cli(
            str(config), "--max-runtime", "2s", "--log-format", "json",
            "--log-file", str(tmp_path / "log.jsonl"),
        )  # fmt: skip
    assert done.returncode == 6, done.stderr
    assert "error:" not in done.stderr, done.stderr
    assert logged.returncode == 6 and logged.stderr == "", logged.stderr
