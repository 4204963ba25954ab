"""Batch mode (issue 20): what the sample job costs in sync and in batch mode, and peak memory
while submitting and collecting a 100,000-line job against the same job in sync mode, one
after the other on one simulator (whose batches finish at once).

    python benchmarks/batch.py [--rows 100000] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness import KEY, PYTHON, Simulator, measure, write_rows

ROOT = Path(__file__).resolve().parent.parent
# Poll every 50 ms (the simulator's batches finish at once): the client is measured, not a wait.
POLL = "\n[batch]\npoll_interval = 0.05\npoll_max = 0.05\n"


def sample_costs(work: Path) -> dict[str, float]:
    """The sample job (configs/example.toml, 200 reviews) in each mode, its summary's cost."""
    example = (ROOT / "configs" / "example.toml").read_text()
    config = work / "example.toml"
    config.write_text(example.replace('"../data/', f'"{ROOT}/data/') + POLL)
    costs = {}
    for mode in ("sync", "batch"):
        out = work / f"sample-{mode}.parquet"
        done = measure(
            [PYTHON, "-m", "pipeline", "run", str(config), "--simulate", "--mode", mode,
             "--output", str(out), "--quiet", "--log-format", "json"],
            _env(work),
        )  # fmt: skip
        summary = next(
            json.loads(line) for line in done["stderr"].splitlines() if '"summary"' in line
        )
        costs[mode] = summary["cost_usd"]
    return costs


def peak_memory(work: Path, rows: int, repeat: int) -> dict[str, Any]:
    path = write_rows(work, rows)
    config = work / "memory.toml"
    config.write_text(POLL)
    peaks: dict[str, list[float]] = {"sync": [], "batch": []}
    with Simulator("--latency", "0") as sim:
        for name in ("batch_validating_s", "batch_in_progress_s"):
            sim_config(sim, name, 0)
        for _ in range(repeat):
            for mode in peaks:
                sim.reset()
                for stale in work.glob("mem.parquet*"):
                    stale.unlink()
                done = measure(
                    [PYTHON, "-m", "pipeline", "run", str(config), "--input", str(path), "--template", "{text}",
                     "--id-column", "id", "--output", str(work / "mem.parquet"), "--base-url",
                     sim.base_url, "--mode", mode, "--concurrency", "256", "--quiet"],
                    _env(work),
                )  # fmt: skip
                if done["code"] != 0:
                    raise SystemExit(f"{mode} run failed:\n{done['stderr'][-2000:]}")
                peaks[mode].append(done["rss_mb"])
    sync, batch = (statistics.median(peaks[m]) for m in ("sync", "batch"))
    return {"rows": rows, "sync_peak_mb": sync, "batch_peak_mb": batch, "ratio": batch / sync}


def _env(work: Path) -> dict[str, str]:
    return {**os.environ, "OPENROUTER_API_KEY": KEY, "PIPELINE_CACHE_DIR": str(work / "cache")}


def sim_config(sim: Simulator, name: str, value: Any) -> None:
    import urllib.request

    request = urllib.request.Request(
        f"{sim.origin}/_sim/config", data=json.dumps({name: value}).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    urllib.request.urlopen(request, timeout=30).close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        costs = sample_costs(work)
        memory = peak_memory(work, args.rows, args.repeat)
    print(json.dumps({"sample_cost_usd": costs, "memory": memory}, indent=1))
    print(
        f"sample job: sync ${costs['sync']:.6f}, batch ${costs['batch']:.6f}: batch/sync {costs['batch'] / costs['sync']:.3f}"
    )
    print(
        f"{memory['rows']:,} rows: peak RSS sync {memory['sync_peak_mb']:.0f} MB, batch "
        f"{memory['batch_peak_mb']:.0f} MB: {memory['ratio']:.2f}x (target <= 1.25x)"
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
