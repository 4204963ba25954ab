"""How many requests per second the simulator serves at zero latency.

Starts `pipeline simulate` in its own process, sends N chat completions from an aiohttp client
at a fixed concurrency, and prints requests/s plus the server's CPU time per request (read from
/proc), so the figure can be told apart from the client's share of this machine's cores.

    python benchmarks/simulator_throughput.py [--requests 20000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(base_url: str, requests: int, concurrency: int) -> float:
    body: dict[str, Any] = {
        "model": "mistralai/mixtral-8x7b-instruct",
        "messages": [{"role": "user", "content": "x" * 200}],
    }
    queue = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, headers={"Authorization": "Bearer sk-or-v1-bench"}
    ) as session:

        async def worker() -> None:
            for i in queue:
                body["messages"][0]["content"] = f"{i} " + "x" * 200
                async with session.post(
                    f"{base_url}/chat/completions",
                    data=json.dumps(body),
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    assert resp.status == 200
                    await resp.read()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "simulate", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        base_url = server.stdout.readline().strip()
        asyncio.run(load(base_url, 500, args.concurrency))  # warm-up
        cpu_before = cpu_seconds(server.pid)
        wall = asyncio.run(load(base_url, args.requests, args.concurrency))
        server_cpu = cpu_seconds(server.pid) - cpu_before
    finally:
        server.terminate()
        server.wait(timeout=10)
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "wall_s": round(wall, 3),
        "requests_per_s": round(args.requests / wall),
        "server_cpu_us_per_request": round(server_cpu / args.requests * 1e6, 1),
        "server_capacity_per_core_rps": round(args.requests / server_cpu) if server_cpu else None,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
