"""`pipeline status`: how far a job is, read from its journal without taking the lock, so it
works while a run is going (and from a monitoring script while none is)."""

from __future__ import annotations

import sqlite3
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


def job_status(config: JobConfig, limit: int | None = None) -> dict[str, Any]:
    """Rows, done / failed / remaining, spend (and that of the last 24 h, with a rolling cap),
    the recent rate and the lock, as one dict."""
    slots = plan_job(config, limit).slots
    path = config.output.journal_path
    totals = Totals()
    settled = recent = 0
    day_spend = 0.0
    if (journal := Journal.read_only(path)) is not None:
        try:
            with journal:
                totals = journal.totals(below=slots)
                settled = journal.settled_count(below=slots)
                recent = journal.done_since(time.time() - RATE_WINDOW)
                day_spend = sum(usd for _, usd in journal.spend_since(time.time() - DAY))
        except sqlite3.Error as exc:
            raise JournalError(f"journal {path} cannot be read: {exc}") from None
    holder = lock_holder(path)
    output = Path(config.output.path)
    rolling = {}
    if config.cost.max_cost_per_day is not None:  # what the rolling cap counts now
        rolling = {
            "spent_last_24h_usd": day_spend,
            "max_cost_per_day": config.cost.max_cost_per_day,
        }
    return {
        "rows": slots,
        "done": settled,
        "ok": totals.ok,
        "failed": totals.failed,
        "remaining": slots - settled,
        "cost_usd": totals.cost_usd,
        "true_cost_usd": totals.true_cost_usd,
        "rows_cost_unknown": totals.rows_cost_unknown,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "by_model": totals.as_dict()["by_model"],
        **rolling,
        "rows_per_s_last_minute": recent / RATE_WINDOW,
        "running": holder is not None,
        "lock_holder": holder,
        "journal": str(path),
        "output": str(output),
        "output_exists": output.exists(),
    }
