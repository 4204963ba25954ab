"""At the provider's edge: a fault storm (upstream 429s among every other kind of fault) and
the key's own rate limit below the client's pace, `pipeline run` against the bare baseline on
the same simulator, interleaved (issue 19's scenarios; `run.py --only fault_storm key_limit`)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import polars as pl
from harness import Simulator, baseline, interleaved, median, ours, write_rows

# 5% upstream 429s (Retry-After: 1), 1% each of 500/502/503, resets, mid-body drops and 200s
# carrying an error, and 0.5% hangs, which only the client's timeout ends.
STORM = "429=0.05,500=0.01,502=0.01,503=0.01,reset=0.01,mid_body=0.01,error_body=0.01,hang=0.005"
TIMEOUT = ("--timeout", "10")  # seconds per attempt, for both clients
CONCURRENCY = 100
KEY_LIMIT = 100  # requests the simulator lets the key send in any one second


def fault_storm(rows: int, repeat: int, work: Path) -> dict[str, Any]:
    path = write_rows(work, rows)
    with Simulator(
        "--latency", "0.05", "--fault-rate", STORM, "--retry-after", "1", "--seed", "7"
    ) as sim:

        def ours_run() -> dict[str, Any]:
            result = ours(sim, path, work, CONCURRENCY, extra=TIMEOUT, codes=(0, 3))
            statuses = pl.read_parquet(work / "out.parquet", columns=["status"])["status"]
            return {**result, "lost": rows - int((statuses == "ok").sum()), **_paid(sim)}

        def baseline_run() -> dict[str, Any]:
            result = baseline(sim, path, CONCURRENCY, extra=TIMEOUT)
            return {**result, "lost": rows - json.loads(result["stdout"])["ok"], **_paid(sim)}

        runs = interleaved(repeat, sim, {"ours": ours_run, "baseline": baseline_run})
    figures: dict[str, Any] = {
        name: {
            "wall_s": median(results, "wall"),
            "walls_s": [round(r["wall"], 2) for r in results],
            "lost": max(r["lost"] for r in results),
            "paid_twice": max(r["paid_twice"] for r in results),
            "billing_faults": max(r["billing_faults"] for r in results),
            "http_429": statistics.median(r["server"]["by_status"].get("429", 0) for r in results),
        }
        for name, results in runs.items()
    }
    figures["ratio_wall"] = figures["ours"]["wall_s"] / figures["baseline"]["wall_s"]
    return figures


def key_limit(rows: int, repeat: int, work: Path) -> dict[str, Any]:
    path = write_rows(work, rows)
    with Simulator(
        "--latency", "0.05", "--rate-limit", str(KEY_LIMIT), "--rate-window", "1"
    ) as sim:

        def baseline_run() -> dict[str, Any]:
            result = baseline(sim, path, CONCURRENCY)
            return {**result, "lost": rows - json.loads(result["stdout"])["ok"]}

        def ours_run() -> dict[str, Any]:
            result = ours(sim, path, work, CONCURRENCY)
            statuses = pl.read_parquet(work / "out.parquet", columns=["status"])["status"]
            return {**result, "lost": rows - int((statuses == "ok").sum())}

        runs = interleaved(repeat, sim, {"ours": ours_run, "baseline": baseline_run})
    figures: dict[str, Any] = {"limit_rps": KEY_LIMIT, "concurrency": CONCURRENCY}
    for name, results in runs.items():
        servers = [r["server"] for r in results]
        accepted = [
            s["by_status"].get("200", 0) / max(s["last_request_at"] - s["first_request_at"], 1e-9)
            for s in servers
        ]
        figures[name] = {
            "accepted_rps": statistics.median(accepted),
            "share_of_limit": statistics.median(accepted) / KEY_LIMIT,
            "http_429": statistics.median(s["by_status"].get("429", 0) for s in servers),
            "max_429s_in_a_second": max(s["max_429s_per_clock_second"] for s in servers),
            "retry_after_violations": max(s["retry_after_violations"] for s in servers),
            "lost": max(r["lost"] for r in results),
        }
    return figures


def _paid(sim: Simulator) -> dict[str, int]:
    repeats, billing = sim.paid_twice()
    return {"paid_twice": repeats, "billing_faults": billing}
