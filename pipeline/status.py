"""`pipeline status`: how far a job is, read from its journal without taking the lock, so it
works while a run is going (and from a monitoring script while none is).

Given the job's config, the input is read too, for the rows in all and the rows left. Given only
the output's or the journal's path (what a cron line or a monitoring check has to hand), the
journal alone says what is done, failed and spent and whether a run holds the lock; the rows in
all and the rows left are then unknown (None), never guessed."""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.budget import DAY
from pipeline.config import JobConfig
from pipeline.errors import JournalError
from pipeline.journal import Journal
from pipeline.lock import lock_holder
from pipeline.plan import plan_job
from pipeline.records import Totals

RATE_WINDOW = 60.0  # seconds the recent rate is measured over
SQLITE_MAGIC, PARQUET_MAGIC = b"SQLite format 3\x00", b"PAR1"
WITHOUT_CONFIG = "rows in all and rows left are unknown without the config, which says how to read the input: run `pipeline status CONFIG` for them"


def job_status(config: JobConfig, limit: int | None = None) -> dict[str, Any]:
    """Rows, done / failed / remaining, spend (and that of the last 24 h, with a rolling cap),
    the recent rate and the lock, as one dict."""
    slots = plan_job(config, limit).slots
    figures, _ = _journal_figures(config.output.journal_path, slots)
    day_spend = figures.pop("spent_last_24h_usd")
    if config.cost.max_cost_per_day is not None:  # what the rolling cap counts now
        figures |= {
            "spent_last_24h_usd": day_spend,
            "max_cost_per_day": config.cost.max_cost_per_day,
        }
    return _ordered(slots, figures, slots - figures["done"], _output(config.output.local_path))


def names_job_file(path: Path) -> bool:
    """Whether `path` names a job's journal or output rather than its config: a journal, a
    missing file not named `.toml` (an output a running job has not written yet), or a Parquet
    file with a journal beside it or written by this tool. Any other Parquet file is taken for a
    config, whose message says it is a data file (an input given in the wrong place)."""
    if path.suffix.lower() == ".toml":
        return False
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return True
    except OSError:
        return False  # the config's own message says what is wrong with it
    if head.startswith(SQLITE_MAGIC):
        return True
    return head.startswith(PARQUET_MAGIC) and (
        Path(f"{path}.journal").exists() or _written_by_us(path)
    )


def _written_by_us(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        return b"pipeline" in (pq.read_metadata(path).metadata or {})
    except (OSError, ValueError):  # pyarrow's errors for a file that is not whole Parquet
        return False


def path_status(path: Path) -> dict[str, Any]:
    """`job_status` from a journal's or an output's path alone (see the module's doc)."""
    output: Path | None = None
    journal = path
    if not _is_journal(path):
        output, journal = path, Path(f"{path}.journal")
        if not journal.exists():
            raise JournalError(
                f"no journal at {journal}, the journal of output {path}: the job has not started, "
                "or its config names another [output] journal; give that journal's path or the config"
            )
    figures, meta = _journal_figures(journal, None)
    del figures["spent_last_24h_usd"]  # no cap to count it against without the config
    written = _output(output) if output is not None else {"output": None, "output_exists": None}
    return {
        **_ordered(None, figures, None, written),
        "input": [entry.get("file") for entry in meta.get("input", [])],
        "note": WITHOUT_CONFIG,
    }


def _ordered(
    rows: int | None, figures: dict[str, Any], remaining: int | None, output: dict[str, Any]
) -> dict[str, Any]:
    """The figures in the order scripts have always seen them (`status --json`)."""
    counts = {"rows": rows, **{k: figures[k] for k in ("done", "ok", "failed")}}
    return {**counts, "remaining": remaining, **figures, **output}


def _is_journal(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def _journal_figures(path: Path, slots: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the journal at `path` holds (of the first `slots` slots, if given), read-only, and
    its `meta` (what the job was)."""
    totals = Totals()
    settled = recent = 0
    day_spend = 0.0
    meta: dict[str, Any] = {}
    batches: list[dict[str, Any]] = []
    if (journal := Journal.read_only(path)) is not None:
        try:
            with journal, journal.snapshot():
                totals = journal.totals(below=slots)
                settled = journal.settled_count(below=sys.maxsize if slots is None else slots)
                recent = journal.done_since(time.time() - RATE_WINDOW)
                day_spend = sum(usd for _, usd in journal.spend_since(time.time() - DAY))
                meta = journal.meta()
                batches = journal.batches.listing()
        except sqlite3.Error as exc:
            raise JournalError(f"journal {path} cannot be read: {exc}") from None
    holder = lock_holder(path)
    figures = {
        "done": settled,
        "ok": totals.ok,
        "failed": totals.failed,
        "cost_usd": totals.cost_usd,
        "true_cost_usd": totals.true_cost_usd,
        "rows_cost_unknown": totals.rows_cost_unknown,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "by_model": totals.as_dict()["by_model"],
        "spent_last_24h_usd": day_spend,
        "rows_per_s_last_minute": recent / RATE_WINDOW,
        "running": holder is not None,
        "lock_holder": holder,
        "journal": str(path),
        "batches": batches,  # batch mode's, newest first
    }
    return figures, meta


def _output(output: Path) -> dict[str, Any]:
    return {"output": str(output), "output_exists": output.exists()}
