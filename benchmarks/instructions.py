"""Instructions executed per row: `pipeline run` against the bare aiohttp baseline, under valgrind.

    python benchmarks/instructions.py [--repeat 3] [--python OTHER/.venv/bin/python] [--out F]

Each client runs under valgrind's cachegrind on a zero-latency simulator, once with
`--rows-small` (1,000) and once with `--rows-large` (3,000) rows. Instructions per row are
(I_large - I_small) / (large - small), so start-up (imports, reading the input, the first
connections) cancels out; start-up is what is left of I_small after its rows. The figure counts
every thread of the client (the event loop, the journal writer, row preparation, the Parquet
output) but not the contention between them: valgrind runs one thread at a time. Compare ours
with the baseline of the same session (the ratio), and a commit with another by running this
with each checkout's `--python`.

Why cachegrind, not callgrind: with `--cache-sim=no` it counts only instructions (Ir), summed
over all threads into one total, and runs faster than callgrind, whose call graph this figure
does not need. For where the instructions go, profile with callgrind instead.

How close two figures must be to count as the same: a run's total moves by about 0.1-0.2%
between rounds, so ours per row moves by about ±2k and the baseline's by about ±5k (its event
loop's batching of answers depends on timing). Differences of under about 3k a row are noise.

The simulator runs outside valgrind, in its own process on 127.0.0.1, served by this script's
interpreter, so two checkouts measured in turn are answered by the same server. Prints the
median of each figure over `--repeat` rounds, with its range (min-max) as the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import KEY, Simulator, write_rows

HERE = Path(__file__).resolve().parent
CONCURRENCY = 256  # as the overhead scenario of benchmarks/run.py


def compile_bytecode(python: str) -> str:
    """Compile the measured interpreter's copy of the package first, as `pip install` does:
    under PYTHONDONTWRITEBYTECODE an editable install would compile every module in every run
    (about 0.24 G instructions of start-up). Returns the package's folder."""
    script = "import compileall, os, pipeline; d = os.path.dirname(pipeline.__file__); compileall.compile_dir(d, quiet=1); print(d)"
    # Not from this checkout's folder: `-c` puts the current folder first on sys.path, and its
    # `pipeline` would be compiled instead of the one --python runs.
    proc = subprocess.run(
        [python, "-c", script], cwd="/", check=True, capture_output=True, text=True
    )
    return proc.stdout.strip()


def instructions(command: list[str], work: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run `command` under cachegrind to the end: its instruction count (all threads) and stdout."""
    counts = work / "cachegrind.out"
    # --cache-sim=no: only Ir is wanted, and without the cache model valgrind runs faster.
    valgrind = ["valgrind", "--tool=cachegrind", "--cache-sim=no",
                f"--cachegrind-out-file={counts}", f"--log-file={work / 'valgrind.log'}"]  # fmt: skip
    proc = subprocess.run(
        valgrind + command, cwd=work, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{command[1:4]} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    match = re.search(r"^summary:\s+(\d+)", counts.read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"no summary line in {counts}")
    return int(match.group(1)), proc.stdout


def ours(python: str, sim: Simulator, rows: Path, work: Path) -> int:
    command = [python, "-m", "pipeline", "run", "--input", str(rows), "--template", "{text}", "--id-column", "id",
               "--output", str(work / "out.parquet"), "--base-url", sim.base_url, "--concurrency", str(CONCURRENCY), "--quiet"]  # fmt: skip
    env = {**os.environ, "OPENROUTER_API_KEY": KEY, "PIPELINE_CACHE_DIR": str(work / "cache")}
    # Exit code 0 (checked in `instructions`) means every row was answered.
    return instructions(command, work, env)[0]


def baseline(python: str, sim: Simulator, rows: Path, work: Path, n: int) -> int:
    command = [python, str(HERE / "baseline.py"), "--base-url", sim.base_url, "--input", str(rows),
               "--concurrency", str(CONCURRENCY)]  # fmt: skip
    count, stdout = instructions(command, work, dict(os.environ))
    if json.loads(stdout.strip().splitlines()[-1])["ok"] != n:
        raise SystemExit(f"the baseline did not finish all {n} rows: {stdout[-500:]}")
    return count


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter (venv) to measure")
    parser.add_argument("--rows-small", type=int, default=1_000)
    parser.add_argument("--rows-large", type=int, default=3_000)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the four runs")
    parser.add_argument("--out", type=Path, help="write every figure here (JSON)")
    args = parser.parse_args()
    small, large = args.rows_small, args.rows_large
    if not 0 < small < large:
        parser.error("--rows-small must be below --rows-large")

    package = compile_bytecode(args.python)
    print(f"[measuring {package}]", file=sys.stderr, flush=True)
    # Set sets' and dicts' iteration order (and so the work done on them) the same every run.
    os.environ["PYTHONHASHSEED"] = "0"
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "baseline": []}
    with (
        tempfile.TemporaryDirectory(prefix="pipeline-instr-") as tmp,
        Simulator("--latency", "0") as sim,
    ):
        inputs = {n: write_rows(Path(tmp), n) for n in (small, large)}
        for round_ in range(args.repeat):
            for name in runs:
                counts = {}
                for n in (small, large):
                    sim.reset()  # generation ids and counters start over: the same answers
                    # A fresh folder per run: no journal, no output, no cached prices.
                    work = Path(tempfile.mkdtemp(prefix=f"{name}-{n}-", dir=tmp))
                    t0 = time.perf_counter()
                    counts[n] = (
                        ours(args.python, sim, inputs[n], work)
                        if name == "ours"
                        else baseline(args.python, sim, inputs[n], work, n)
                    )
                    print(f"[round {round_ + 1}: {name} {n} rows, {counts[n] / 1e9:.3f} G instructions, "
                          f"{time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)  # fmt: skip
                per_row = (counts[large] - counts[small]) / (large - small)
                runs[name].append(
                    {
                        "counts": counts,
                        "per_row": per_row,
                        "startup": counts[small] - small * per_row,
                    }
                )

    figures: dict[str, Any] = {
        name: {
            "per_row": summary([r["per_row"] for r in results]),
            "startup": summary([r["startup"] for r in results]),
            "runs": results,
        }
        for name, results in runs.items()
    }
    ratios = [
        o["per_row"] / b["per_row"] for o, b in zip(runs["ours"], runs["baseline"], strict=True)
    ]
    figures["ratio"] = summary(ratios)
    figures["setup"] = {
        "python": args.python,
        "package": package,
        "version": platform.python_version(),
        "rows": [small, large],
        "repeat": args.repeat,
        "concurrency": CONCURRENCY,
        "seconds": time.perf_counter() - started,
    }
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))

    print(f"\ninstructions per row ({large:,} rows less {small:,}, zero latency, "
          f"median of {args.repeat}, min-max)")  # fmt: skip
    for name in runs:
        p, s = figures[name]["per_row"], figures[name]["startup"]
        print(f"  {name:<9} {p['median'] / 1e3:8.1f}k  ({p['min'] / 1e3:.1f}-{p['max'] / 1e3:.1f}k)"
              f"   start-up {s['median'] / 1e9:.3f} G ({s['min'] / 1e9:.3f}-{s['max'] / 1e9:.3f})")  # fmt: skip
    r = figures["ratio"]
    print(f"  ratio     {r['median']:8.3f}   ({r['min']:.3f}-{r['max']:.3f})")
    print(f"  [{figures['setup']['seconds'] / 60:.1f} minutes]")


if __name__ == "__main__":
    main()
