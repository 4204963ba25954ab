"""`pipeline status`: how far a job is, read from its journal without taking the lock, so it
works while a run is going (and from a monitoring script while none is)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from pipeline.config import JobConfig
from pipeline.errors import JournalError
from pipeline.journal import lock_holder, read_totals
from pipeline.prompts import RequestBuilder
from pipeline.source import open_source

RATE_WINDOW = 60.0  # seconds the recent rate is measured over


def job_status(config: JobConfig, limit: int | None = None) -> dict[str, Any]:
    """Rows, done / failed / remaining, spend, the recent rate and the lock, as one dict."""
    from pipeline.job import _validate_rows

    source = open_source(config.input.path, config.input.format)
    builder = RequestBuilder(config, source.columns)
    total, _ = _validate_rows(source, config, builder, limit)
    slots = total * len(builder.variants)
    journal = config.output.journal_path
    totals: dict[str, Any] = {}
    settled = recent = 0
    if journal.exists():
        try:
            with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as db:
                totals = read_totals(db, slots)
                (settled,) = db.execute(
                    "SELECT COUNT(*) FROM results WHERE position < ? AND retry_on_resume = 0",
                    (slots,),
                ).fetchone()
                (recent,) = db.execute(
                    "SELECT COUNT(*) FROM results WHERE done_at > ?", (time.time() - RATE_WINDOW,)
                ).fetchone()
        except sqlite3.Error as exc:
            raise JournalError(f"journal {journal} cannot be read: {exc}") from None
    holder = lock_holder(journal)
    output = Path(config.output.path)
    return {
        "rows": slots,
        "done": settled,
        "ok": totals.get("ok", 0),
        "failed": totals.get("failed", 0),
        "remaining": slots - settled,
        "cost_usd": totals.get("cost_usd", 0.0),
        "true_cost_usd": totals.get("true_cost_usd", 0.0),
        "prompt_tokens": totals.get("prompt_tokens", 0),
        "completion_tokens": totals.get("completion_tokens", 0),
        "by_model": totals.get("by_model", {}),
        "rows_per_s_last_minute": recent / RATE_WINDOW,
        "running": holder is not None,
        "lock_holder": holder,
        "journal": str(journal),
        "output": str(output),
        "output_exists": output.exists(),
    }
