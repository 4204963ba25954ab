"""Constants and small helpers shared by the tests."""

from __future__ import annotations

import json
import json as _json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pipeline.simulator import RunningSimulator

TEST_KEY = "sk-or-v1-test0123456789abcdef0123456789abcdef"

# Tests never wait for real back-off: no Retry-After penalty and /generation ready at once,
# unless a test asks for them.
FAST = {"retry_after": 0.0, "ready_after": 0.0}

SimFactory = Callable[..., Awaitable[RunningSimulator]]


def chat_body(prompt: str = "Label the sentiment: great phone", **params: Any) -> dict[str, Any]:
    return {
        "model": "mistralai/mixtral-8x7b-instruct",
        "messages": [{"role": "user", "content": prompt}],
        **params,
    }


# --------------------------------------------------------------------------- CLI helpers

FAST_RETRY = "[retry]\nbackoff_base = 0\nmax_attempts = 4\n"


def cli_env(key: str | None = TEST_KEY) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OPENROUTER_API_KEY"}
    if key is not None:
        env["OPENROUTER_API_KEY"] = key
    return env


def run_command(
    *args: str, key: str | None = TEST_KEY, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`pipeline ARGS` in a subprocess, the way a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True, text=True, env=cli_env(key), timeout=timeout, cwd=cwd, check=False,
    )  # fmt: skip


def run_cli(
    *args: str, key: str | None = TEST_KEY, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`pipeline run ARGS` in a subprocess, the way a user runs it."""
    return run_command("run", *args, key=key, timeout=timeout, cwd=cwd)


def start_cli(*args: str, key: str | None = TEST_KEY) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(key),
    )  # fmt: skip


def status(config: str | Path, *flags: str) -> dict[str, Any]:
    """`pipeline status CONFIG --json`, read."""
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "status", str(config), "--json", *flags],
        capture_output=True, text=True, env=cli_env(), timeout=60, check=True,
    )  # fmt: skip
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def sim_get(sim: RunningSimulator, what: str) -> Any:
    with urllib.request.urlopen(f"{sim.origin}/_sim/{what}", timeout=10) as resp:
        return _json.load(resp)


def sim_post(sim: RunningSimulator, what: str, payload: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        f"{sim.origin}/_sim/{what}",
        data=_json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return _json.load(resp)


def post_api(sim: RunningSimulator, path: str, body: dict[str, Any]) -> Any:
    """POST `body` to the simulator's API route `path` (`/chat/completions`) with the test key."""
    request = urllib.request.Request(
        f"{sim.base_url}{path}", data=_json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TEST_KEY}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as resp:
        return _json.load(resp)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll a condition of another process (a bounded loop, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def write_job(
    folder: Path,
    sim: RunningSimulator | None,
    *,
    input_name: str = "in.csv",
    extra: str = "",
    prompt: str = 'template = "{text}"',
    id_column: str | None = "id",
    output: str = "",
) -> Path:
    """A job config in `folder` reading `input_name` and writing `out.parquet`, aimed at `sim`;
    `output` adds keys to its [output] table."""
    id_line = f'id_column = "{id_column}"' if id_column else ""
    base = f'base_url = "{sim.base_url}"' if sim else ""
    config = folder / "job.toml"
    config.write_text(
        f'[input]\npath = "{input_name}"\n{id_line}\n\n[prompt]\n{prompt}\n\n[request]\n{base}\n\n'
        f'[output]\npath = "out.parquet"\n{output}\n\n{extra if "[retry]" in extra else FAST_RETRY + extra}\n'
    )
    return config


def journaled_positions(folder: Path) -> set[int]:
    """Input positions the job's journal (`out.parquet.journal` in `folder`) holds, read from outside."""
    path = folder / "out.parquet.journal"
    if not path.exists():
        return set()
    with sqlite3.connect(path) as db:
        try:
            return {p for (p,) in db.execute("SELECT position FROM results")}
        except sqlite3.OperationalError:
            return set()


# ------------------------------------------------------------------------- golden files

GOLDEN = Path(__file__).parent / "golden"


def check_golden(name: str, actual: str) -> None:
    """`actual` must equal the file `tests/golden/<name>`; PIPELINE_UPDATE_GOLDEN=1 rewrites it."""
    path = GOLDEN / name
    if os.environ.get("PIPELINE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        return
    assert path.exists(), f"{path} is missing; write it with PIPELINE_UPDATE_GOLDEN=1"
    assert actual == path.read_text(), (
        f"{name} changed; if on purpose, rewrite it with PIPELINE_UPDATE_GOLDEN=1 and review the diff"
    )
