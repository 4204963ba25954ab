"""The endpoint's perimeter: an endpoint that cannot be reached (or stops answering) stops the
job once, by name, resumably; `pipeline models` lists what an OpenAI-compatible server lists and
says why when it cannot; `pipeline estimate` sends nothing, so it needs no key."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import polars as pl
from aiohttp import web

from pipeline.simulator import SimConfig, SimulatorThread
from pipeline.simulator.runner import start
from tests.helpers import (
    FAST,
    cli_env,
    run_cli,
    sim_get,
    sim_post,
    start_cli,
    wait_for,
    write_job,
)
from tests.test_security import Recorder


def write_input(folder: Path, n: int) -> None:
    pl.DataFrame(
        {"id": [f"k{i}" for i in range(n)], "text": [f"item {i}: bright lamp" for i in range(n)]}
    ).write_csv(folder / "in.csv")


def free_port() -> int:
    """A loopback port with nothing listening on it (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SimOnPort(SimulatorThread):
    """A simulator thread on a given port: the endpoint "comes back" at the same address."""

    def __init__(self, port: int, **overrides: Any) -> None:
        super().__init__(SimConfig().updated({**FAST, **overrides}))
        self._port = port

    def __enter__(self) -> Any:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            start(self._config, self._host, self._port), self._loop
        )
        self.running = future.result(timeout=10)
        return self.running


def at(base_url: str) -> Any:
    """What `write_job` needs of a simulator to aim a job at `base_url`."""
    return SimpleNamespace(base_url=base_url)


def pipeline_cli(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    """Any `pipeline` command in a subprocess, the way a user runs it (no key by default)."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True, text=True, env=cli_env(key), timeout=60, check=False,
    )  # fmt: skip


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return errors[0]


# ------------------------------------------------------------- 10. unreachable endpoints


def test_refused_at_start_stops_once_by_name_and_the_rerun_resumes(tmp_path: Path) -> None:
    write_input(tmp_path, 12)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/api/v1"
    config = write_job(tmp_path, at(base_url))
    done = run_cli(str(config))
    assert done.returncode == 4, done.stderr
    line = one_error_line(done.stderr)
    assert f"cannot reach {base_url}: connection refused" in line
    assert not (tmp_path / "out.parquet").exists()  # no file of error rows never answered

    with SimOnPort(port) as sim:
        again = run_cli(str(config))
        stats = sim_get(sim, "stats")
    assert again.returncode == 0, again.stderr
    assert stats["requests"] == 12
    assert pl.read_parquet(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 12


def test_an_endpoint_that_stops_answering_mid_run_stops_the_job_and_resumes_paying_once(
    tmp_path: Path, sim_thread: Any
) -> None:
    rows = 400
    write_input(tmp_path, rows)
    with sim_thread(latency=0.01) as sim:
        config = str(write_job(tmp_path, sim, extra="[limits]\nconcurrency = 4\n"))
        proc = start_cli(config)
        wait_for(lambda: len(sim_get(sim, "ledger")["data"]) >= 20, what="some rows answered")
        sim_post(sim, "config", {"fault_rates": {"reset": 1.0}})  # every request: reset
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 4, stderr
        line = one_error_line(stderr)
        assert sim.base_url in line and "answered no request" in line, line
        assert not (tmp_path / "out.parquet").exists()

        sim_post(sim, "config", {"fault_rates": {}})
        again = run_cli(config)
        ledger = sim_get(sim, "ledger")["data"]
    assert again.returncode == 0, again.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * rows
    paid = Counter(e["messages_digest"] for e in ledger if e["outcome"] == "ok")
    assert len(paid) == rows and paid.most_common(1)[0][1] == 1  # nothing paid twice


def test_an_endpoint_that_goes_away_mid_run_stops_the_job_and_the_rerun_finishes_it(
    tmp_path: Path,
) -> None:
    rows = 400
    write_input(tmp_path, rows)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/api/v1"
    config = str(write_job(tmp_path, at(base_url), extra="[limits]\nconcurrency = 4\n"))
    with SimOnPort(port, latency=0.01) as sim:
        proc = start_cli(config)
        wait_for(lambda: len(sim_get(sim, "ledger")["data"]) >= 20, what="some rows answered")
    _, stderr = proc.communicate(timeout=60)  # the simulator is gone: connection refused
    assert proc.returncode == 4, stderr
    assert f"cannot reach {base_url}: connection refused" in one_error_line(stderr)
    assert not (tmp_path / "out.parquet").exists()
    with sqlite3.connect(tmp_path / "out.parquet.journal") as db:
        (done_before,) = db.execute("SELECT COUNT(*) FROM results WHERE status = 'ok'").fetchone()
    assert 0 < done_before < rows

    with SimOnPort(port) as sim:
        again = run_cli(config)
        stats = sim_get(sim, "stats")
    assert again.returncode == 0, again.stderr
    assert pl.read_parquet(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * rows
    assert stats["requests"] == rows - done_before  # only the rows not answered before


def test_an_endpoint_that_holds_every_request_unanswered_stops_the_job_naming_the_timeout(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, 8)
    with sim_thread(fault_rates={"hang": 1.0}) as sim:
        config = write_job(tmp_path, sim, extra="[limits]\nconcurrency = 2\n")
        done = run_cli(str(config), "--timeout", "0.3")
    assert done.returncode == 4, done.stderr
    line = one_error_line(done.stderr)
    assert f"{sim.base_url} answered no request: no complete answer within the timeout" in line
    assert "raise request.timeout (--timeout)" in line
    assert not (tmp_path / "out.parquet").exists()


def test_a_sprinkle_of_resets_is_retried_per_row_and_never_stops_the_job(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, 200)
    with sim_thread(fault_rates={"reset": 0.15}, seed=5) as sim:
        config = write_job(
            tmp_path,
            sim,
            extra="[retry]\nbackoff_base = 0\nmax_attempts = 6\n[limits]\nconcurrency = 4\n",
        )
        done = run_cli(str(config))
        stats = sim_get(sim, "stats")
    assert done.returncode == 0, done.stderr
    assert stats["faults"].get("reset", 0) > 10  # the resets really happened


def test_tls_to_a_plain_http_port_stops_at_once_naming_the_handshake(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_input(tmp_path, 6)
    with sim_thread() as sim:
        base_url = sim.base_url.replace("http://", "https://")
        config = write_job(tmp_path, at(base_url))
        done = run_cli(str(config))
        stats = sim_get(sim, "stats")
    assert done.returncode == 4, done.stderr
    line = one_error_line(done.stderr)
    assert f"cannot reach {base_url}: TLS handshake failed" in line
    assert stats["requests"] == 0
    assert not (tmp_path / "out.parquet").exists()


# --------------------------------------------------- 11. `pipeline models`, OpenAI-style

OPENAI_MODELS = {
    "object": "list",
    "data": [
        {"id": "llama-3-8b", "object": "model", "created": 1700000000, "owned_by": "vllm"},
        {"id": "qwen2-7b", "object": "model", "created": 1700000001, "owned_by": "vllm"},
    ],
}


def openai_server(request: web.Request) -> web.Response:
    """A plain OpenAI-compatible server: models without prices, answers without cost."""
    if request.path.endswith("/models"):
        return web.json_response(OPENAI_MODELS)
    if request.path.endswith("/chat/completions"):
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000,
            "model": "llama-3-8b",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        })  # fmt: skip
    return web.json_response({"error": {"message": "not found"}}, status=404)


def test_models_lists_an_openai_compatible_servers_models_with_the_price_unknown() -> None:
    with Recorder("127.0.0.1", openai_server) as server:
        base_url = f"http://127.0.0.1:{server.port}/v1"
        listed = pipeline_cli("models", "--base-url", base_url)
        as_json = pipeline_cli("models", "--base-url", base_url, "--json", "--refresh")
    assert listed.returncode == 0, listed.stderr
    assert "llama-3-8b" in listed.stdout and "qwen2-7b" in listed.stdout
    assert "2 model(s)" in listed.stderr
    assert as_json.returncode == 0, as_json.stderr
    entries = json.loads(as_json.stdout)
    assert [e["id"] for e in entries] == ["llama-3-8b", "qwen2-7b"]
    assert entries[0]["prompt_per_million"] is None  # unknown, never a made-up 0


def test_a_run_against_an_openai_compatible_server_works_with_the_cost_null(
    tmp_path: Path,
) -> None:
    write_input(tmp_path, 3)
    with Recorder("127.0.0.1", openai_server) as server:
        base_url = f"http://127.0.0.1:{server.port}/v1"
        config = write_job(tmp_path, at(base_url))
        done = run_cli(str(config), "--model", "llama-3-8b")
    assert done.returncode == 0, done.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 3
    assert out["cost_usd"].null_count() == 3


def test_models_says_why_when_the_server_does_not_list_models() -> None:
    refused_url = f"http://127.0.0.1:{free_port()}/api/v1"
    refused = pipeline_cli("models", "--base-url", refused_url)
    assert refused.returncode == 1, refused.stderr
    line = one_error_line(refused.stderr)
    assert f"{refused_url}/models did not answer with a model list" in line
    assert "connection refused" in line

    for status in (400, 401, 500):

        def failing(request: web.Request, status: int = status) -> web.Response:
            return web.json_response({"error": {"message": f"nope {status}"}}, status=status)

        with Recorder("127.0.0.1", failing) as server:
            done = pipeline_cli("models", "--base-url", f"http://127.0.0.1:{server.port}/v1")
        assert done.returncode == 1, done.stderr
        line = one_error_line(done.stderr)
        assert f"HTTP {status}" in line and f"nope {status}" in line, line


def strict_openai_server(request: web.Request) -> web.Response:
    """An OpenAI-compatible server that serves its API under /v1 only, like vLLM."""
    if request.path in ("/v1/models", "/v1/chat/completions"):
        return openai_server(request)
    return web.json_response({"error": {"message": "not found"}}, status=404)


def chat_only_server(request: web.Request) -> web.Response:
    """A gateway that proxies chat completions but has no model list."""
    if request.path == "/v1/chat/completions":
        return openai_server(request)
    return web.json_response({"error": {"message": "not found"}}, status=404)


def test_a_base_url_missing_its_api_path_is_refused_before_any_row_is_sent(
    tmp_path: Path,
) -> None:
    write_input(tmp_path, 3)
    with Recorder("127.0.0.1", strict_openai_server) as server:
        root = f"http://127.0.0.1:{server.port}"
        config = write_job(tmp_path, at(root))
        done = run_cli(str(config), "--model", "llama-3-8b")
        chat_bodies = [r["body"] for r in server.requests if r["path"].endswith("/completions")]
    assert done.returncode == 1, done.stderr
    line = one_error_line(done.stderr)
    assert root in line and "/api/v1" in line and "request.base_url" in line, line
    assert all(json.loads(body) == {} for body in chat_bodies)  # a probe, never a row
    assert not (tmp_path / "out.parquet").exists()


def test_an_endpoint_without_a_model_list_still_runs(tmp_path: Path) -> None:
    write_input(tmp_path, 2)
    with Recorder("127.0.0.1", chat_only_server) as server:
        config = write_job(tmp_path, at(f"http://127.0.0.1:{server.port}/v1"))
        done = run_cli(str(config), "--model", "llama-3-8b")
    assert done.returncode == 0, done.stderr
    assert pl.read_parquet(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 2


# ---------------------------------------------------------- 21. estimate needs no key


def test_estimate_needs_no_key_but_a_pilot_does(tmp_path: Path, sim_thread: Any) -> None:
    write_input(tmp_path, 5)
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        estimated = pipeline_cli("estimate", config, key=None)
        pilot = pipeline_cli("estimate", config, "--pilot", "2", key=None)
        stats = sim_get(sim, "stats")
    assert estimated.returncode == 0, estimated.stderr
    assert "5" in estimated.stdout
    assert pilot.returncode == 1, pilot.stderr
    assert "no API key" in one_error_line(pilot.stderr)
    assert stats["requests"] == 0
