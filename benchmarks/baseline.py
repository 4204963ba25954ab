"""The bare aiohttp baseline the benchmark compares `pipeline run` against.

A fixed pool of workers, one `ClientSession`, an aiolimiter request limit, JSON decode of every
answer, the same retry rule (408/429/5xx, dropped connections and timeouts, up to 6 attempts,
each row on its own, no waiting) — and nothing else: no journal, no output file, no templating
beyond string formatting. Prints how many rows got an answer.

    python benchmarks/baseline.py --base-url URL --input rows.parquet --concurrency 256 [--rps 100] [--timeout 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json

import aiohttp
import pyarrow.parquet as pq
from aiolimiter import AsyncLimiter

RETRY = {408, 429, 500, 502, 503, 504, 524, 529}


async def main(
    base_url: str, prompts: list[str], concurrency: int, rps: float | None, model: str,
    attempt_seconds: float = 300,
) -> int:  # fmt: skip
    url = f"{base_url}/chat/completions"
    limiter = AsyncLimiter(1, 1 / rps) if rps else None
    todo = iter(prompts)
    done = 0
    headers = {"Authorization": "Bearer sk-or-v1-baseline", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=attempt_seconds)
    ) as session:

        async def worker() -> None:
            nonlocal done
            for prompt in todo:
                body = json.dumps(
                    {"model": model, "messages": [{"role": "user", "content": prompt}]}
                )
                for _ in range(6):
                    if limiter is not None:
                        await limiter.acquire()
                    try:
                        async with session.post(url, data=body) as resp:
                            data = json.loads(await resp.read())
                            if resp.status == 200 and "choices" in data:
                                done += 1
                                break
                            if resp.status not in RETRY:
                                break
                    except (aiohttp.ClientError, ValueError, TimeoutError):
                        continue

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--rps", type=float)
    parser.add_argument("--model", default="mistralai/mixtral-8x7b-instruct")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one attempt may take")
    args = parser.parse_args()
    rows = pq.read_table(args.input, columns=["text"])["text"].to_pylist()
    ok = asyncio.run(
        main(args.base_url, rows, args.concurrency, args.rps, args.model, args.timeout)
    )
    print(json.dumps({"ok": ok}))
