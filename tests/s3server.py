"""moto's standalone S3 server on loopback (the way s3fs's own tests run it), and the standard
AWS environment that points a job at it: no credential passes through a config or a flag."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

# Distinct values, to look for in every file and log a job leaves.
ACCESS_KEY = "AKIAMOTOTESTKEY12345"
SECRET_KEY = "moto-test-secret-Zx9q7W2kR5vLp3Ns"


@contextlib.contextmanager
def moto_server(timeout: float = 20.0) -> Iterator[str]:
    """Start `moto_server` on a free loopback port; yield its URL; stop it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)


def reset(url: str) -> None:
    """Forget every bucket (between tests)."""
    request = urllib.request.Request(f"{url}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()


def aws_environment(url: str, folder: Path) -> dict[str, str]:
    """What a user's shell would hold: keys, a region and the endpoint; no profile files, and
    no instance-metadata look-up (which would leave the machine)."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-credentials"),
        "AWS_CONFIG_FILE": str(folder / "no-config"),
    }
