"""The benchmark suite: `pipeline run` against a bare aiohttp loop, on the same simulator.

    python benchmarks/run.py                 # the full suite (about 30 minutes on 2 cores)
    python benchmarks/run.py --quick         # tiny sizes: checks the suite itself works

The simulator runs in its own process. For each scenario the two clients run interleaved,
`--repeat` times each, and the median is reported. Client CPU and peak RSS are user+sys and
`ru_maxrss` of the client process from `os.wait4`, taken in a small launcher (see
`harness.measure`); server CPU is read from /proc so readers see the two share the machine.
Ratios (ours / baseline) are what to compare across machines; absolute times drift on shared
hosts. Prints one table and writes every figure to `--out` (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import throttling  # beside this script
from harness import (
    HERE,
    PYTHON,
    Simulator,
    baseline,
    compile_bytecode,
    interleaved,
    measure,
    median,
    ours,
    write_rows,
)


@dataclass(frozen=True)
class Sizes:
    overhead_rows: int
    latency_rows: tuple[int, ...]
    rate_rows: int
    memory_rows: tuple[int, int]
    repeat: int
    # The CPU figure is the noisiest (±20% between runs here) and a run takes seconds: more.
    overhead_repeat: int
    incremental_rows: int = 1_000_000  # of which 1,000 new (benchmarks/incremental.py)
    incremental_repeat: int = 5  # its ratio's two sides are each under two seconds: noisy
    storm_rows: int = 3_000  # benchmarks/throttling.py
    key_limit_rows: int = 3_000


FULL = Sizes(20_000, (5_000, 50_000), 3_000, (100_000, 1_000_000), 3, 7)
QUICK = Sizes(400, (200,), 60, (500, 1_000), 1, 1, 20_000, 1, 200, 200)


# ------------------------------------------------------------------------------ scenarios


def overhead(sizes: Sizes, work: Path) -> dict[str, Any]:
    n = sizes.overhead_rows
    rows = write_rows(work, n)
    with Simulator("--latency", "0") as sim:
        runs = interleaved(
            max(sizes.repeat, sizes.overhead_repeat),
            sim,
            {
                "ours": lambda: ours(sim, rows, work, 256),
                "baseline": lambda: baseline(sim, rows, 256),
            },
        )
    figures: dict[str, Any] = {}
    for name, results in runs.items():
        figures[name] = {
            "cpu_us_per_row": median(results, "cpu") / n * 1e6,
            # The kernel's share and the context switches: what threads handing the GIL cost.
            "sys_us_per_row": median(results, "sys") / n * 1e6,
            "context_switches": median(results, "switches"),
            "rows_per_s": n / median(results, "wall"),
            "peak_rss_mb": median(results, "rss_mb"),
            "server_cpu_us_per_row": median(results, "server_cpu") / n * 1e6,
        }
    figures["ratio_cpu"] = figures["ours"]["cpu_us_per_row"] / figures["baseline"]["cpu_us_per_row"]
    return figures


def latency_bound(sizes: Sizes, work: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with Simulator("--latency", "0.2") as sim:
        for n in sizes.latency_rows:
            rows = write_rows(work, n)
            ideal = n * 0.2 / 200
            runs = interleaved(
                sizes.repeat,
                sim,
                {
                    "ours": lambda r=rows: ours(sim, r, work, 200),
                    "baseline": lambda r=rows: baseline(sim, r, 200),
                },
            )
            figures[str(n)] = {
                name: {"wall_over_ideal": median(results, "wall") / ideal}
                for name, results in runs.items()
            }
    return figures


def rate_precision(sizes: Sizes, work: Path) -> dict[str, Any]:
    n = sizes.rate_rows
    rows = write_rows(work, n)
    figures = {}
    with Simulator(
        "--latency", "0.02", "--rate-limit", "110", "--rate-window", "1", "--retry-after", "1"
    ) as sim:
        runs = interleaved(
            sizes.repeat,
            sim,
            {
                "ours": lambda: ours(sim, rows, work, 64, rps=100),
                "baseline": lambda: baseline(sim, rows, 64, rps=100),
            },
        )
    for name, results in runs.items():
        servers = [r["server"] for r in results]
        achieved = [
            s["requests"] / max(s["last_request_at"] - s["first_request_at"], 1e-9) for s in servers
        ]
        figures[name] = {
            "achieved_rps": statistics.median(achieved),
            "max_in_one_second": max(s["max_requests_per_second"] for s in servers),  # sliding
            "max_in_a_clock_second": max(s["max_requests_per_clock_second"] for s in servers),
            "http_429": sum(s["by_status"].get("429", 0) for s in servers),
        }
    return figures


def memory(sizes: Sizes, work: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with Simulator("--latency", "0", "--completion-words", "100") as sim:
        for n in sizes.memory_rows:
            rows = write_rows(work, n)
            sim.reset()
            result = ours(sim, rows, work, 256)
            figures[str(n)] = {
                "peak_rss_mb": result["rss_mb"],
                "wall_s": result["wall"],
                "parquet_write_s": result["write_seconds"],
                "parquet_write_cpu_s": result["write_cpu_seconds"],
            }
    small, large = (figures[str(n)] for n in sizes.memory_rows)
    figures["ratio_rss"] = large["peak_rss_mb"] / small["peak_rss_mb"]
    figures["write_share"] = (
        large["parquet_write_s"] / large["wall_s"] if large["parquet_write_s"] is not None else None
    )
    return figures


def incremental(sizes: Sizes, work: Path) -> dict[str, Any]:
    """Deciding what is new: an incremental run over a large input with 1,000 new rows."""
    from incremental import measure as before_first_request  # beside this script

    return before_first_request(sizes.incremental_rows, 1_000, sizes.incremental_repeat)


def fault_storm(sizes: Sizes, work: Path) -> dict[str, Any]:
    return throttling.fault_storm(sizes.storm_rows, sizes.repeat, work)


def key_limit(sizes: Sizes, work: Path) -> dict[str, Any]:
    return throttling.key_limit(sizes.key_limit_rows, sizes.repeat, work)


SCENARIOS = ["overhead", "latency_bound", "rate_precision", "fault_storm", "key_limit", "memory",
             "startup", "incremental"]  # fmt: skip


def startup(repeat: int) -> dict[str, Any]:
    figures = {}
    for label, args in (
        ("pipeline --help", ["--help"]),
        ("pipeline run --help", ["run", "--help"]),
    ):
        walls = [measure([PYTHON, "-m", "pipeline", *args])["wall"] for _ in range(max(repeat, 5))]
        figures[label] = statistics.median(walls)
    return figures


# ------------------------------------------------------------------------------ report


def verdicts(r: dict[str, Any], sizes: Sizes) -> list[tuple[str, str, bool]]:
    lat = r["latency_bound"]
    small, *rest = (str(n) for n in sizes.latency_rows)
    checks = [
        ("overhead: client CPU/row <= 1.3x baseline", f"{r['overhead']['ratio_cpu']:.2f}x", r["overhead"]["ratio_cpu"] <= 1.3),
        (f"latency {small} rows: wall/ideal <= baseline + 0.03", f"{lat[small]['ours']['wall_over_ideal']:.3f} vs {lat[small]['baseline']['wall_over_ideal']:.3f}",
         lat[small]["ours"]["wall_over_ideal"] <= lat[small]["baseline"]["wall_over_ideal"] + 0.03),
    ]  # fmt: skip
    for n in rest:
        checks.append(
            (
                f"latency {n} rows: wall/ideal <= 1.03",
                f"{lat[n]['ours']['wall_over_ideal']:.3f}",
                lat[n]["ours"]["wall_over_ideal"] <= 1.03,
            )
        )
    rate = r["rate_precision"]["ours"]
    storm, key = r["fault_storm"]["ours"], r["key_limit"]["ours"]
    checks += [
        ("rate: achieved >= 98% of 100 rps", f"{rate['achieved_rps']:.1f} rps", rate["achieved_rps"] >= 98),
        ("rate: no one-second window above 100", f"max {rate['max_in_one_second']}", rate["max_in_one_second"] <= 100),
        ("rate: zero 429s", str(rate["http_429"]), rate["http_429"] == 0),
        ("fault storm: wall <= 1.1x baseline", f"{r['fault_storm']['ratio_wall']:.2f}x", r["fault_storm"]["ratio_wall"] <= 1.1),
        ("fault storm: no row lost", str(storm["lost"]), storm["lost"] == 0),
        ("fault storm: nothing paid twice beyond what faults bill", f"{storm['paid_twice']} repeats, {storm['billing_faults']} billing faults", storm["paid_twice"] <= storm["billing_faults"]),
        ("key limit: >= 95% of the server's limit", f"{key['share_of_limit'] * 100:.1f}%", key["share_of_limit"] >= 0.95),
        ("key limit: at most one 429 per worker per second", f"max {key['max_429s_in_a_second']} in a second, {r['key_limit']['concurrency']} workers", key["max_429s_in_a_second"] <= r["key_limit"]["concurrency"]),
        ("memory: RSS at large <= 1.25x small", f"{r['memory']['ratio_rss']:.2f}x", r["memory"]["ratio_rss"] <= 1.25),
        ("memory: RSS at large < 500 MB", f"{r['memory'][str(sizes.memory_rows[1])]['peak_rss_mb']:.0f} MB", r["memory"][str(sizes.memory_rows[1])]["peak_rss_mb"] < 500),
        ("memory: final Parquet write <= 10% of wall", f"{(r['memory']['write_share'] or 0) * 100:.1f}%", (r["memory"]["write_share"] or 0) <= 0.10),
        ("start-up: pipeline --help < 0.25 s", f"{r['startup']['pipeline --help']:.3f} s", r["startup"]["pipeline --help"] < 0.25),
        ("incremental: before the first request <= 3x polars' read", f"{r['incremental']['ratio']:.1f}x", r["incremental"]["ratio"] <= 3),
    ]  # fmt: skip
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, one repetition: a smoke test of the suite"
    )
    parser.add_argument("--repeat", type=int, help="repetitions per client (default 3, quick 1)")
    parser.add_argument(
        "--out", type=Path, default=HERE / "results.json", help="where to write the figures (JSON)"
    )
    parser.add_argument(
        "--only",
        nargs="*",
        choices=SCENARIOS,
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.repeat:
        sizes = dataclasses.replace(sizes, repeat=args.repeat)
    wanted = args.only or SCENARIOS
    compile_bytecode()
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "sizes": vars(sizes),
    }
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        work = Path(tmp)
        for name in wanted:
            started = time.perf_counter()
            results[name] = (
                startup(sizes.repeat) if name == "startup" else globals()[name](sizes, work)
            )
            print(f"[{name}: {time.perf_counter() - started:.0f}s]", file=sys.stderr, flush=True)
    if set(wanted) == set(SCENARIOS):
        results["targets"] = [
            {"target": t, "measured": m, "met": ok} for t, m, ok in verdicts(results, sizes)
        ]
    args.out.write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(r: dict[str, Any]) -> None:
    if "overhead" in r:
        o = r["overhead"]
        print(
            "\noverhead (zero latency, concurrency 256)        ours      baseline   ours/baseline"
        )
        print(
            f"  client CPU per row (us)                  {o['ours']['cpu_us_per_row']:10.1f} {o['baseline']['cpu_us_per_row']:12.1f} {o['ratio_cpu']:12.2f}"
        )
        print(
            f"  of which the kernel's (us)               {o['ours']['sys_us_per_row']:10.1f} {o['baseline']['sys_us_per_row']:12.1f}"
        )
        print(
            f"  context switches                         {o['ours']['context_switches']:10.0f} {o['baseline']['context_switches']:12.0f}"
        )
        print(
            f"  rows/s                                   {o['ours']['rows_per_s']:10.0f} {o['baseline']['rows_per_s']:12.0f} {o['ours']['rows_per_s'] / o['baseline']['rows_per_s']:12.2f}"
        )
        print(
            f"  peak RSS (MB)                            {o['ours']['peak_rss_mb']:10.0f} {o['baseline']['peak_rss_mb']:12.0f}"
        )
        print(
            f"  server CPU per row (us)                  {o['ours']['server_cpu_us_per_row']:10.1f} {o['baseline']['server_cpu_us_per_row']:12.1f}"
        )
    if "latency_bound" in r:
        print("\nlatency-bound (200 ms, concurrency 200): wall / ideal")
        for n, f in r["latency_bound"].items():
            print(
                f"  {int(n):>9,} rows                          {f['ours']['wall_over_ideal']:10.3f} {f['baseline']['wall_over_ideal']:12.3f}"
            )
    if "rate_precision" in r:
        print("\nrate precision (limit 100 rps, server enforces 110)")
        for name, f in r["rate_precision"].items():
            print(
                f"  {name:<9} achieved {f['achieved_rps']:6.1f} rps, busiest sliding second {f['max_in_one_second']}, busiest clock second {f['max_in_a_clock_second']}, 429s {f['http_429']}"
            )
    if "fault_storm" in r:
        print(
            "\nfault storm (50 ms, 5% upstream 429s, ~6% other faults, 0.5% hangs; concurrency 100)"
        )
        for name in ("ours", "baseline"):
            f = r["fault_storm"][name]
            print(
                f"  {name:<9} wall {f['wall_s']:6.1f} s, rows lost {f['lost']}, paid twice {f['paid_twice']} ({f['billing_faults']} faults that bill), 429s {f['http_429']:.0f}"
            )
        print(f"  ours/baseline wall {r['fault_storm']['ratio_wall']:.2f}")
    if "key_limit" in r:
        k = r["key_limit"]
        print(
            f"\nkey limit (server allows {k['limit_rps']} rps, concurrency {k['concurrency']}, no client rate)"
        )
        for name in ("ours", "baseline"):
            f = k[name]
            print(
                f"  {name:<9} {f['accepted_rps']:6.1f} rps accepted ({f['share_of_limit'] * 100:.1f}% of the limit), 429s {f['http_429']:.0f} (at most {f['max_429s_in_a_second']} in a second), sent before Retry-After {f['retry_after_violations']}, rows lost {f['lost']}"
            )
    if "memory" in r:
        print("\nmemory at scale (~200-char prompts, ~100-token answers)")
        for n, f in r["memory"].items():
            if isinstance(f, dict):
                print(
                    f"  {int(n):>9,} rows: peak RSS {f['peak_rss_mb']:6.0f} MB, wall {f['wall_s']:7.1f} s, Parquet write at the end {f['parquet_write_s']:.2f} s ({f['parquet_write_cpu_s']:.2f} s CPU in all)"
                )
    if "startup" in r:
        print("\nstart-up (median wall)")
        for label, seconds in r["startup"].items():
            print(f"  {label:<22} {seconds:.3f} s")
    if "incremental" in r:
        i = r["incremental"]
        print(
            f"\nincremental ({i['rows']:,} rows, {i['new']:,} new; journal {i['journal_mb']:.0f} MB)"
        )
        print(
            f"  before the first request {i['ours_s']:.2f} s, polars read_csv {i['polars_s']:.2f} s: {i['ratio']:.1f}x"
        )
    if "targets" in r:
        print("\ntargets")
        for t in r["targets"]:
            print(f"  [{'met ' if t['met'] else 'MISS'}] {t['target']}: {t['measured']}")


if __name__ == "__main__":
    main()
