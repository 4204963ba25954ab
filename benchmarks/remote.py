"""Object-store input (issue 21): peak memory of a job reading its rows from S3 (moto's
server on loopback) against the same job reading the same Parquet file from local disk, one
after the other on one zero-latency simulator.

    python benchmarks/remote.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness import KEY, PYTHON, Simulator, measure, write_rows

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.s3server import aws_environment, moto_server


def run(work: Path, sim: Simulator, env: dict[str, str], inputs: str, name: str) -> dict[str, Any]:
    done = measure(
        [PYTHON, "-m", "pipeline", "run", "--input", inputs, "--template", "{text}",
         "--id-column", "id", "--output", str(work / f"{name}.parquet"), "--base-url",
         sim.base_url, "--concurrency", "256", "--quiet"],
        env,
    )  # fmt: skip
    if done["code"] != 0:
        raise SystemExit(f"{name} run failed:\n{done['stderr'][-2000:]}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, moto_server() as endpoint:
        work = Path(folder)
        path = write_rows(work, args.rows)
        env = {**os.environ, **aws_environment(endpoint, work), "OPENROUTER_API_KEY": KEY,
               "PIPELINE_CACHE_DIR": str(work / "cache")}  # fmt: skip
        os.environ.update(env)
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        fs.put_file(str(path), "bench/rows.parquet")
        with Simulator("--latency", "0") as sim:
            local = run(work, sim, env, str(path), "local")
            sim.reset()
            remote = run(work, sim, env, "s3://bench/rows.parquet", "remote")
    result = {
        "rows": args.rows, "local_peak_mb": local["rss_mb"], "s3_peak_mb": remote["rss_mb"],
        "ratio": remote["rss_mb"] / local["rss_mb"],
        "local_wall_s": local["wall"], "s3_wall_s": remote["wall"],
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    print(
        f"{args.rows:,} rows: peak RSS local {result['local_peak_mb']:.0f} MB, S3 "
        f"{result['s3_peak_mb']:.0f} MB: {result['ratio']:.2f}x (target <= 1.25x)"
    )


if __name__ == "__main__":
    main()
