"""`--engine ray` (issue 23): rows per second of the same job on one and on two Ray nodes (two
workers a node) against a local run, all against one zero-latency simulator in another process;
and Ray's fixed cost: the wall time a tiny job spends starting a Ray instance of its own, and
the memory of Ray's processes while it runs.

    cd benchmarks && ../.venv/bin/python cluster.py [--rows 20000]

The nodes of a `ray.cluster_utils.Cluster` are process groups of this machine, on loopback: two
"nodes" share its 2 cores, so this measures what the engine costs, not what a second machine adds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import psutil
from harness import Simulator, compile_bytecode, ours, write_rows

BUDGET = ("--max-cost", "1000")


def ray_memory(stop: threading.Event, peak: list[float]) -> None:
    """The largest sum of RSS (MB) of Ray's processes, sampled every 0.2 s until `stop`."""
    while not stop.wait(0.2):
        total = 0
        for proc in psutil.process_iter(["name", "cmdline", "memory_info"]):
            line = " ".join(proc.info["cmdline"] or ())
            if proc.info["memory_info"] and ("ray" in (proc.info["name"] or "") or "/ray/" in line):
                total += proc.info["memory_info"].rss
        peak[0] = max(peak[0], total / 2**20)


def on_cluster(
    sim: Simulator, rows: Path, tiny: Path, work: Path, nodes: int, extra: tuple[str, ...] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job, and the tiny job (what joining the cluster and starting the actors cost), on a
    cluster of `nodes` started beforehand."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from ray.cluster_utils import Cluster

        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 2,
                "node_ip_address": "127.0.0.1",
                "include_dashboard": False,
            },
        )
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    os.environ["RAY_ADDRESS"] = cluster.address
    try:
        sim.reset()
        small = ours(sim, tiny, work, 16, extra=("--engine", "ray", *extra))
        sim.reset()
        return ours(sim, rows, work, 64, extra=("--engine", "ray", *extra)), small
    finally:
        del os.environ["RAY_ADDRESS"]
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--tiny", type=int, default=100)
    args = parser.parse_args()
    compile_bytecode()
    with tempfile.TemporaryDirectory() as folder, Simulator("--latency", "0") as sim:
        work = Path(folder)
        rows, tiny = write_rows(work, args.rows), write_rows(work, args.tiny)
        sim.reset()
        local = ours(sim, rows, work, 64)
        sim.reset()
        tiny_local = ours(sim, tiny, work, 16)
        runs, smalls = {"local": local}, {"local": tiny_local}
        # A budget (never reached) adds a reservation and a settlement to every request.
        sim.reset()
        runs["local, --max-cost"] = ours(sim, rows, work, 64, extra=BUDGET)
        sim.reset()
        smalls["local, --max-cost"] = ours(sim, tiny, work, 16, extra=BUDGET)
        for n, extra in ((1, ()), (2, ()), (1, BUDGET)):
            name = f"ray, {n} node(s){', --max-cost' if extra else ''}"
            runs[name], smalls[name] = on_cluster(sim, rows, tiny, work, n, extra)
        # The fixed cost: a tiny job with a Ray instance of its own.
        stop, peak = threading.Event(), [0.0]
        sampler = threading.Thread(target=ray_memory, args=(stop, peak))
        sampler.start()
        sim.reset()
        tiny_ray = ours(sim, tiny, work, 16, extra=("--engine", "ray"))
        stop.set()
        sampler.join()
    result = {
        "rows": args.rows,
        "rows_per_second": {name: args.rows / r["wall"] for name, r in runs.items()},
        "vs_local": {name: local["wall"] / r["wall"] for name, r in runs.items()},
        # Past the start: the rows beyond the tiny job's over the time beyond its wall.
        "rows_per_second_once_started": {
            name: (args.rows - args.tiny) / (r["wall"] - smalls[name]["wall"])
            for name, r in runs.items()
        },
        "tiny_job_on_the_cluster_wall_s": {name: r["wall"] for name, r in smalls.items()},
        "driver_cpu_s": {name: r["cpu"] for name, r in runs.items()},
        "tiny_job_wall_s": {"local": tiny_local["wall"], "ray": tiny_ray["wall"]},
        "ray_start_s": tiny_ray["wall"] - tiny_local["wall"],
        "ray_processes_peak_rss_mb": peak[0],
        "driver_peak_rss_mb": {"local": tiny_local["rss_mb"], "ray": tiny_ray["rss_mb"]},
    }
    print(json.dumps(result, indent=1))
    started = result["rows_per_second_once_started"]
    for name, rate in result["rows_per_second"].items():
        local_name = "local, --max-cost" if "--max-cost" in name else "local"
        print(
            f"{name}: {rate:,.0f} rows/s; once started {started[name]:,.0f} rows/s "
            f"({started[name] / started[local_name]:.2f}x {local_name})"
        )
    print(
        f"Ray's fixed cost: +{result['ray_start_s']:.1f} s for a {args.tiny}-row job, "
        f"{peak[0]:,.0f} MB in Ray's processes"
    )


if __name__ == "__main__":
    main()
