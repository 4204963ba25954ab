"""The cost of deciding what is new: an incremental run over a large input of which only a few
rows are new, timed from the command's start to its first request reaching the simulator, as a
ratio to reading the same input once with polars (both in a fresh interpreter, in the same run,
interleaved, medians).

    python benchmarks/incremental.py                  # 1,000,000 rows, 1,000 of them new
    python benchmarks/incremental.py --rows 100000    # smaller
    python benchmarks/incremental.py --answer-chars 400   # a journal of longer answers

The journal of the rows already done is written directly (with the pipeline's own request
builder, so every request hash is what a run would compute), not by sending a million requests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from pipeline.config import load
from pipeline.journal import Journal
from pipeline.plan import plan_job
from pipeline.records import OK, Result
from pipeline.settings import transport
from pipeline.simulator import RunningSimulator, SimConfig, SimulatorThread

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers
from tests.helpers import cli_env, sim_get, sim_post


def make_job(folder: Path, rows: int, new: int, base_url: str, answer_chars: int = 4) -> Path:
    texts = [
        f"item {i}: the kettle is quiet, the lid fits, the handle stays cool" for i in range(rows)
    ]
    pl.DataFrame({"id": [f"k{i}" for i in range(rows)], "text": texts}).write_csv(folder / "in.csv")
    config = folder / "job.toml"
    config.write_text(
        f'[input]\npath = "in.csv"\nid_column = "id"\nincremental = true\n\n'
        f'[prompt]\ntemplate = "Classify: {{text}}"\n\n[request]\nbase_url = "{base_url}"\n\n'
        f'[output]\npath = "out.parquet"\n'
    )
    job = load(config)
    plan = plan_job(job)
    builder = plan.builder
    answer = ("positive, " * answer_chars)[:answer_chars]
    opened = Journal.open(
        job.output.journal_path,
        plan.fingerprint,
        incremental=True,
        transport=transport(job),
        keyed=True,
    )
    with opened as journal:
        for batch in plan.source.batches(rows - new):
            journal.write([
                Result(row.slot, row.key, completion=answer, finish_reason="stop", status=OK,
                       cost_usd=1e-6, cost_source="reported", response_source="api",
                       request_hash=row.request_hash, digest=row.digest, attempts=1)
                for row in builder.rows(batch)
            ])  # fmt: skip
    return config


def until_first_request(config: Path, sim: RunningSimulator) -> float:
    """Seconds from starting `pipeline run` to its first chat request at the simulator."""
    sim_post(sim, "reset", {})
    started = time.time()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(config), "--quiet"],
        env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while True:
            first = sim_get(sim, "stats")["first_request_at"]
            if first is not None:
                return float(first) - started
            if process.poll() is not None:
                raise SystemExit(f"the run ended before sending: {process.stderr.read()}")  # type: ignore[union-attr]
            time.sleep(0.005)
    finally:
        process.kill()
        process.wait()


def polars_read(path: Path) -> float:
    started = time.time()
    code = f"import polars as pl; pl.read_csv({str(path)!r})"
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--answer-chars", type=int, default=4,
        help="length of each stored answer (the journal's size, which its integrity check reads)",
    )  # fmt: skip
    args = parser.parse_args()
    found = measure(args.rows, args.new, args.repeat, args.answer_chars)
    print(
        f"rows {args.rows:,}, new {args.new:,}, repeat {args.repeat}, cores {os.cpu_count()}, "
        f"journal {found['journal_mb']:.0f} MB"
    )
    print(
        f"before the first request: {found['ours_s']:.2f} s; polars read_csv: "
        f"{found['polars_s']:.2f} s; ratio {found['ratio']:.1f}x"
    )


def measure(rows: int, new: int, repeat: int, answer_chars: int = 4) -> dict[str, float]:
    """Medians of `repeat` interleaved timings: ours to the first request, polars' read."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        SimulatorThread(SimConfig().updated({"latency": 0})) as sim,
    ):
        folder = Path(tmp)
        config = make_job(folder, rows, new, sim.base_url, answer_chars)
        journal = folder / "out.parquet.journal"
        pristine = journal.read_bytes()
        os.sync()  # what make_job wrote is on disk before anything is timed
        ours, theirs = [], []
        for _ in range(repeat):
            theirs.append(polars_read(folder / "in.csv"))
            ours.append(until_first_request(config, sim))
            for suffix in ("-wal", "-shm"):  # the next run starts from the same journal
                Path(f"{journal}{suffix}").unlink(missing_ok=True)
            journal.write_bytes(pristine)
            os.sync()  # the copy's writeback is not the next run's to wait for
        o, t = statistics.median(ours), statistics.median(theirs)
        return {
            "ours_s": o, "polars_s": t, "ratio": o / t, "journal_mb": journal.stat().st_size / 1e6,
            "rows": rows, "new": new,
        }  # fmt: skip


if __name__ == "__main__":
    main()
