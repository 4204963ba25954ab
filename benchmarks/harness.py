"""What the benchmark scripts share: the simulator in its own process, a client run measured
from outside (wall, CPU, peak RSS), `pipeline run` and the bare baseline on the same rows, and
the two run interleaved."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
KEY = "sk-or-v1-benchmark-0000000000000000000000"


def write_rows(folder: Path, n: int) -> Path:
    """`n` rows of ~200-character prompts (distinct, so nothing is deduplicated)."""
    path = folder / f"rows-{n}.parquet"
    if not path.exists():
        sentence = "The blender is loud but crushes ice well; the jug is sturdy, easy to clean and it fits under the cupboard. "
        frame = pl.DataFrame({"id": pl.int_range(n, eager=True).cast(pl.String)}).with_columns(
            text=pl.format("Review {}: {}", pl.col("id"), pl.lit(sentence * 2).str.slice(0, 190))
        )
        frame.write_parquet(path)
    return path


def compile_bytecode() -> None:
    """Compile the package's modules once, as `pip install` does. Without this, an editable
    install under PYTHONDONTWRITEBYTECODE (set on this project's machines) compiles every module
    from source in every run: 0.1 s that no installed copy ever spends."""
    import pipeline

    subprocess.run(
        [PYTHON, "-m", "compileall", "-q", str(Path(pipeline.__file__).parent)], check=True
    )


class Simulator:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "pipeline", "simulate", "--port", "0", "--ready-after", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()
        self.origin = self.base_url.removesuffix("/api/v1")

    def cpu(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.origin}/_sim/stats", timeout=30) as resp:
            return json.load(resp)  # type: ignore[no-any-return]

    def paid_twice(self) -> tuple[int, int]:
        """(requests billed for a prompt already billed, faults that bill what the client never
        reads): the first beyond the second is money a client paid twice for nothing."""
        with urllib.request.urlopen(f"{self.origin}/_sim/ledger", timeout=30) as resp:
            billed = Counter(entry["messages_digest"] for entry in json.load(resp)["data"])
        faults = self.stats()["faults"]
        billing = sum(
            faults.get(kind, 0) for kind in ("mid_body", "stall", "invalid_json", "schema_invalid")
        )
        return sum(billed.values()) - len(billed), billing

    def reset(self) -> None:
        urllib.request.urlopen(
            urllib.request.Request(f"{self.origin}/_sim/reset", data=b"{}"), timeout=30
        ).close()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


# Runs one client and reports its wall time, CPU and peak RSS. The harness cannot wait for the
# client itself: Linux carries the old address space's high-water mark across exec, and Python
# spawns children with vfork, so a client started from this (large) process would report this
# process's peak RSS as its own. A bare interpreter in between (-S: no site) keeps that floor
# at about 10 MB.
LAUNCHER = """
import json, os, sys, time
started = time.perf_counter()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as report:
    json.dump({"wall": time.perf_counter() - started, "code": os.waitstatus_to_exitcode(status),
               "cpu": usage.ru_utime + usage.ru_stime, "sys": usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
               "switches": usage.ru_nvcsw + usage.ru_nivcsw, "preempted": usage.ru_nivcsw}, report)
"""


def measure(command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a client to completion: wall seconds, CPU seconds (user+sys), peak RSS (MB), output."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "usage.json"
        proc = subprocess.Popen(
            [PYTHON, "-S", "-c", LAUNCHER, str(report), *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        stdout, stderr = _drain(proc)  # to the end before reaping: the child never blocks on a pipe
        if proc.wait() != 0:
            raise SystemExit(f"the launcher failed:\n{stderr.decode(errors='replace')[-2000:]}")
        usage = json.loads(report.read_text())
    return {
        **usage,
        "stdout": stdout.decode(errors="replace"),
        "stderr": stderr.decode(errors="replace"),
    }


def _drain(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    import threading

    chunks: dict[str, bytes] = {}

    def read(name: str, stream: Any) -> None:
        chunks[name] = stream.read()

    threads = [
        threading.Thread(target=read, args=(n, s))
        for n, s in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return chunks["out"], chunks["err"]


def ours(
    sim: Simulator, rows: Path, work: Path, concurrency: int, rps: float | None = None,
    extra: tuple[str, ...] = (), codes: tuple[int, ...] = (0,),
) -> dict[str, Any]:  # fmt: skip
    """A `pipeline run` of `rows` (`codes`: the exit codes that are not a failure)."""
    output = work / "out.parquet"
    for stale in work.glob("out.parquet*"):
        stale.unlink()
    command = [PYTHON, "-m", "pipeline", "run", "--input", str(rows), "--template", "{text}", "--id-column", "id",
               "--output", str(output), "--base-url", sim.base_url, "--concurrency", str(concurrency), "--quiet"]  # fmt: skip
    if rps:
        command += ["--rps", str(rps)]
    command += extra
    env = {**os.environ, "OPENROUTER_API_KEY": KEY, "PIPELINE_CACHE_DIR": str(work / "cache")}
    result = measure(command, env)
    if result["code"] not in codes:
        raise SystemExit(f"pipeline run failed ({result['code']}):\n{result['stderr'][-2000:]}")
    # The output is written a row group at a time while the job runs; the summary gives the
    # part left for the end (which adds to the wall time) and the CPU of all of it.
    match = re.search(r"\(([0-9.]+)s at the end, ([0-9.]+)s CPU in all\)", result["stderr"])
    result["write_seconds"], result["write_cpu_seconds"] = (
        (float(match.group(1)), float(match.group(2))) if match else (None, None)
    )
    return result


def baseline(
    sim: Simulator, rows: Path, concurrency: int, rps: float | None = None,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:  # fmt: skip
    command = [
        PYTHON,
        str(HERE / "baseline.py"),
        "--base-url",
        sim.base_url,
        "--input",
        str(rows),
        "--concurrency",
        str(concurrency),
    ]
    if rps:
        command += ["--rps", str(rps)]
    result = measure([*command, *extra])
    if result["code"] != 0:
        raise SystemExit(f"baseline failed:\n{result['stderr'][-2000:]}")
    return result


def interleaved(
    repeat: int, sim: Simulator, runs: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """Run each client `repeat` times, alternating, with the server's CPU and stats per run."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            sim.reset()
            before = sim.cpu()
            result = run()
            result["server_cpu"] = sim.cpu() - before
            result["server"] = sim.stats()
            results[name].append(result)
    return results


def median(results: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in results))
