"""The `pipeline` command itself: installed entry points, help on every command, `simulate`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pipeline import __version__
from pipeline.cli import cli


def all_commands(group: click.Group) -> list[list[str]]:
    paths: list[list[str]] = [[]]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            paths += [[name, *sub] for sub in all_commands(command)]
        else:
            paths.append([name])
    return paths


@pytest.mark.parametrize("path", all_commands(cli), ids=lambda p: " ".join(p) or "pipeline")
def test_every_command_has_help(path: list[str]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output and len(result.output.splitlines()) > 3


def test_version_via_python_dash_m() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.strip() == f"pipeline, version {__version__}"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("pipeline")  # installed beside this interpreter
    out = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=30, check=True
    )
    assert "simulate" in out.stdout


def test_simulate_prints_its_url_serves_and_stops_on_sigterm() -> None:
    command = [sys.executable, "-m", "pipeline", "simulate", "--port", "0", "--seed", "3"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            base_url = proc.stdout.readline().strip()
            assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/api/v1")
            with urllib.request.urlopen(f"{base_url}/models", timeout=10) as resp:
                assert any(
                    m["id"] == "mistralai/mixtral-8x7b-instruct" for m in json.load(resp)["data"]
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
    assert proc.returncode == 0


def test_simulate_rejects_a_bad_fault_spec_in_one_line() -> None:
    result = CliRunner().invoke(cli, ["simulate", "--fault-rate", "430=0.1"])
    assert result.exit_code == 2
    assert "unknown fault '430'" in result.output and "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_benchmark_suite_runs_at_tiny_sizes(tmp_path: Path) -> None:
    """The suite itself keeps working (timings are the benchmark's business, not the test's)."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=230, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert {
        "overhead",
        "latency_bound",
        "rate_precision",
        "memory",
        "startup",
        "incremental",
        "targets",
    } <= set(results)
    assert (
        results["overhead"]["ours"]["cpu_us_per_row"] > 0
        and results["overhead"]["baseline"]["cpu_us_per_row"] > 0
    )
    assert results["rate_precision"]["ours"]["http_429"] == 0
    assert "ours/baseline" in done.stdout and "targets" in done.stdout
