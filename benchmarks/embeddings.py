"""Embeddings jobs (issue 22): the client's CPU per row of an embeddings job against the same
rows as a text (chat) job, both against one zero-latency simulator in another process,
alternating, median of `--repeat` runs each.

    cd benchmarks && ../.venv/bin/python embeddings.py [--rows 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from harness import KEY, PYTHON, Simulator, compile_bytecode, measure, ours, write_rows


def embeddings_job(sim: Simulator, rows: Path, work: Path, dimensions: int) -> dict[str, Any]:
    config = work / "embed.toml"
    config.write_text(
        '[request]\nendpoint = "embeddings"\nmodel = "openai/text-embedding-3-small"\n'
        f"dimensions = {dimensions}\n\n[limits]\ninputs_per_request = 64\n"
    )
    for stale in work.glob("embedded.parquet*"):
        stale.unlink()
    command = [PYTHON, "-m", "pipeline", "run", str(config), "--input", str(rows), "--template", "{text}",
               "--id-column", "id", "--output", str(work / "embedded.parquet"), "--base-url", sim.base_url,
               "--concurrency", "8", "--quiet"]  # fmt: skip
    env = {**os.environ, "OPENROUTER_API_KEY": KEY, "PIPELINE_CACHE_DIR": str(work / "cache")}
    result = measure(command, env)
    if result["code"] != 0:
        raise SystemExit(f"the embeddings job failed:\n{result['stderr'][-2000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dimensions", type=int, default=256)
    args = parser.parse_args()
    compile_bytecode()
    with tempfile.TemporaryDirectory() as folder, Simulator("--latency", "0") as sim:
        work = Path(folder)
        rows = write_rows(work, args.rows)
        text: list[dict[str, Any]] = []
        embedded: list[dict[str, Any]] = []
        for _ in range(args.repeat):
            sim.reset()
            text.append(ours(sim, rows, work, 64))
            sim.reset()
            embedded.append(embeddings_job(sim, rows, work, args.dimensions))
    per_row = {
        name: statistics.median(r["cpu"] for r in runs) / args.rows * 1e6
        for name, runs in (("text", text), ("embeddings", embedded))
    }
    wall = {
        name: statistics.median(r["wall"] for r in runs)
        for name, runs in (("text", text), ("embeddings", embedded))
    }
    result = {
        "rows": args.rows, "dimensions": args.dimensions, "repeat": args.repeat,
        "cpu_us_per_row": per_row, "wall_s": wall,
        "ratio": per_row["embeddings"] / per_row["text"],
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    print(
        f"{args.rows:,} rows: client CPU per row, text {per_row['text']:.0f} us, embeddings "
        f"{per_row['embeddings']:.0f} us ({result['ratio']:.2f}x); wall {wall['text']:.1f} s, "
        f"{wall['embeddings']:.1f} s"
    )


if __name__ == "__main__":
    main()
