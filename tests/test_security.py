"""Secrets stay secret, the key goes only where it is sent, TLS is verified, and odd data
survives the trip unchanged."""

from __future__ import annotations

import asyncio
import os
import pty
import shutil
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from tests.helpers import TEST_KEY, cli_env, run_cli, sim_get, wait_for, write_job


class Recorder:
    """A tiny real HTTP(S) server on loopback that records requests and answers as told."""

    def __init__(self, host: str, handler: Any, ssl_context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.requests: list[dict[str, Any]] = []
        self._handler = handler
        self._ssl = ssl_context
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(
            {"path": request.path, "headers": dict(request.headers), "body": await request.read()}
        )
        return self._handler(request)  # type: ignore[no-any-return]

    def __enter__(self) -> Recorder:
        self._thread.start()

        async def start() -> web.AppRunner:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._serve)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, self.host, 0, ssl_context=self._ssl)
            await site.start()
            self.port = runner.addresses[0][1]
            return runner

        self._runner = asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def small_input(folder: Path, n: int = 4) -> None:
    pl.DataFrame(
        {"id": [f"s{i}" for i in range(n)], "text": [f"prompt {i}" for i in range(n)]}
    ).write_csv(folder / "in.csv")


# ---------------------------------------------------------------------------- the key


def test_the_key_is_in_no_artifact_log_progress_message_or_argv(
    tmp_path: Path, sim_thread: Any
) -> None:
    texts = [
        f"row {i} [[sim:{f}]]"
        for i, f in enumerate(["500", "mid_body", "invalid_json", "reset", "429", "error_body"] * 5)
    ]
    pl.DataFrame({"id": [str(i) for i in range(len(texts))], "text": texts}).write_csv(
        tmp_path / "in.csv"
    )
    cache = tmp_path / "cache.sqlite"
    with sim_thread(latency=0.05) as sim:
        config = str(write_job(tmp_path, sim, extra="[limits]\nconcurrency = 2\n"))
        leader, follower = pty.openpty()  # a terminal, so the progress bar is drawn too
        with subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", config, "--cache", str(cache)],
            stdout=follower, stderr=follower, env=cli_env(),
        ) as proc:  # fmt: skip
            os.close(follower)
            wait_for(lambda: sim_get(sim, "stats")["requests"] > 3, what="requests")
            argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            environ_is_private = not os.access(f"/proc/{proc.pid}/environ", os.R_OK) or proc.pid > 0
            screen = b""
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                screen += chunk
            proc.wait(timeout=60)
        os.close(leader)
        logged = sim_get(sim, "requests")["data"]
        refused = run_cli(config, "--restart", key="sk-or-v1-a-wrong-key-that-must-not-leak-0000")
    assert proc.returncode == 0 and environ_is_private
    assert b"done: 30 rows" in screen and b"row/s" in screen
    key = TEST_KEY.encode()
    assert key not in argv and key not in screen
    for path in tmp_path.iterdir():
        if path.is_file():
            assert key not in path.read_bytes(), f"the key leaked into {path.name}"
    assert all(TEST_KEY not in str(entry["headers"]) for entry in logged)
    # Error messages (a 401 here, whose key is refused) do not echo the key either.
    assert "a-wrong-key-that-must-not-leak" not in refused.stderr + refused.stdout


def test_a_redirect_to_another_host_is_not_followed_with_the_key(tmp_path: Path) -> None:
    small_input(tmp_path)
    with Recorder("127.0.0.2", lambda r: web.json_response({"choices": []})) as elsewhere:
        target = f"http://127.0.0.2:{elsewhere.port}/api/v1/chat/completions"
        with Recorder(
            "127.0.0.1", lambda r: web.Response(status=307, headers={"Location": target})
        ) as redirector:
            config = tmp_path / "job.toml"
            config.write_text(
                f'[input]\npath = "in.csv"\n[prompt]\ntemplate = "{{text}}"\n[request]\nbase_url = "http://127.0.0.1:{redirector.port}/api/v1"\n'
                '[output]\npath = "out.parquet"\n[retry]\nbackoff_base = 0\n'
            )
            done = run_cli(str(config))
        assert elsewhere.requests == []  # the other host never saw the key, nor anything
        assert len(redirector.requests) >= 4
    assert done.returncode == 3, done.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["error_type"].unique().to_list() == ["http_307"]


@pytest.fixture
def self_signed(tmp_path: Path) -> ssl.SSLContext:
    openssl = shutil.which("openssl")
    assert openssl, "the TLS test needs the openssl command (Debian package openssl)"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def test_tls_is_verified_and_a_bad_certificate_stops_the_job(
    tmp_path: Path, self_signed: ssl.SSLContext
) -> None:
    small_input(tmp_path)
    with Recorder("127.0.0.1", lambda r: web.json_response({}), ssl_context=self_signed) as server:
        config = tmp_path / "job.toml"
        config.write_text(
            f'[input]\npath = "in.csv"\n[prompt]\ntemplate = "{{text}}"\n[request]\nbase_url = "https://127.0.0.1:{server.port}/api/v1"\n'
            '[output]\npath = "out.parquet"\n'
        )
        done = run_cli(str(config))
        assert server.requests == []  # the handshake failed: no request, no key, was ever sent
    assert done.returncode == 4
    error = done.stderr.strip().splitlines()[-1]
    assert (
        error.startswith("error: the TLS certificate of https://127.0.0.1")
        and "does not verify" in error
    )


def test_no_option_or_key_turns_tls_verification_off() -> None:
    from click.testing import CliRunner

    from pipeline.cli import cli
    from pipeline.config import SECTIONS

    for command in cli.commands:
        text = CliRunner().invoke(cli, [command, "--help"]).output.lower()
        assert "insecure" not in text and "verify" not in text and "no-ssl" not in text
    keys = {f for cls in SECTIONS.values() for f in cls.__dataclass_fields__}
    assert not keys & {"verify", "verify_ssl", "insecure", "ssl", "tls_verify"}


# -------------------------------------------------------------------------- odd data


def test_binary_nulls_emoji_and_right_to_left_text_round_trip_unchanged(
    tmp_path: Path, sim_thread: Any
) -> None:
    table = pa.table({
        "id": ["a", "b", "c", "d"],
        "text": ["Great 👍🏽 value", "منتج رائع وجودة ممتازة", "המוצר הגיע שבור", "mixed: 日本語 ✓ \u202eRTL override"],
        "blob": pa.array([b"\xff\xfe\x00binary", None, b"\x80\x81 not utf-8", b""], type=pa.binary()),
        "score": pa.array([1.5, None, float("nan"), -0.0]),
        "tags": pa.array([["x", "y"], [], None, ["z"]], type=pa.list_(pa.string())),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "in.parquet")
    with sim_thread() as sim:
        done = run_cli(str(write_job(tmp_path, sim, input_name="in.parquet")))
    assert done.returncode == 0, done.stderr
    written = pq.read_table(tmp_path / "out.parquet").select(table.column_names)
    assert written.schema == table.schema
    assert written.to_pylist()[0]["blob"] == b"\xff\xfe\x00binary"
    for name in table.column_names:
        assert written[name].to_pylist() == table[name].to_pylist() or name == "score"
    scores = written["score"].to_pylist()
    assert (
        scores[0] == 1.5
        and scores[1] is None
        and scores[2] != scores[2]
        and str(scores[3]) == "-0.0"
    )


def test_an_unwritable_output_folder_is_refused_before_anything_is_sent(
    tmp_path: Path, sim_thread: Any
) -> None:
    small_input(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    chattr = shutil.which("chattr")
    assert chattr, "this test needs chattr (e2fsprogs) to make a folder unwritable even for root"
    if (
        subprocess.run([chattr, "+i", str(locked)], capture_output=True, check=False).returncode
        != 0
    ):
        os.chmod(locked, 0o500)  # not root, or no chattr support: plain permissions are enough
    try:
        with sim_thread() as sim:
            done = run_cli(str(write_job(tmp_path, sim)), "--output", str(locked / "out.parquet"))
            sent = sim_get(sim, "stats")["requests"]
    finally:
        subprocess.run([chattr, "-i", str(locked)], capture_output=True, check=False)
        os.chmod(locked, 0o700)
    assert done.returncode == 1 and sent == 0
    assert "is not writable" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert list(locked.iterdir()) == []
