"""The text the commands print: a run's summary, a job's status, an estimate, the model list.

Kept apart from `cli.py` (which only parses and maps errors) and from the library (which
returns figures): scripts read the JSON forms, people read these.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.estimate import Estimate
    from pipeline.job import JobReport
    from pipeline.money import Catalogue, ModelPrice


def summary(report: JobReport, on_change: str) -> str:
    """The lines a run ends with (without --log-format json)."""
    t = report.job_totals
    lines = [
        f"done: {report.total_rows:,} rows: {t.ok:,} ok, {t.failed:,} failed "
        f"({report.skipped:,} done by earlier runs) in {report.wall_seconds:.1f}s, {report.retries} retries; wrote {report.uploaded_to or report.output} ({report.write_seconds:.2f}s at the end, {report.write_cpu_seconds:.2f}s CPU in all)",
        f"  cost {_usd(t.cost_usd, t.rows_cost_unknown)} for {t.prompt_tokens:,} prompt + {t.completion_tokens:,} completion tokens"
        + _left_out(t.rows_cost_unknown, ": the endpoint reported none and lists no price"),
    ]
    if t.cached_tokens or t.cache_write_tokens:
        share = t.cached_tokens / t.prompt_tokens if t.prompt_tokens else 0.0
        saved = "an unknown amount" if t.cache_saving_usd is None else f"${t.cache_saving_usd:.6f}"
        lines.append(
            f"  prompt cache: {t.cached_tokens:,} prompt tokens ({share:.1%}) read from it, "
            f"{t.cache_write_tokens:,} written to it; saved {saved} against the uncached price"
        )
    if t.duplicates_reused or t.cache_hits:
        lines.append(
            f"  not paid: {t.duplicates_reused:,} rows reused an identical request, {t.cache_hits:,} came from the cache"
        )
    extra_spend = []  # paid for, yet in no row's cost
    if t.lost_attempts:
        billed = f"{t.paid_twice_requests} attempt(s) billed although their answer never arrived"
        extra_spend.append(
            f"{billed}; {t.lost_attempts_unreconciled} not yet known (a later run checks again)"
            if t.paid_twice_cost_usd is None
            else f"{billed} cost ${t.paid_twice_cost_usd:.6f}"
        )
    if t.replaced_answers:
        extra_spend.append(
            f"{t.replaced_answers} earlier answer(s), since replaced by a new one, cost {_usd(t.replaced_cost_usd)}"
        )
    if t.batches_billed_apart:
        beyond = t.batch_bills_beyond_usd
        extra_spend.append(
            f"{t.batches_billed_apart} batch(es) billed ${abs(beyond):.6f} "
            f"{'more' if beyond > 0 else 'less'} than their answers' costs add up to"
        )
    if extra_spend:
        lines.append(f"  true spend {_usd(t.true_cost_usd)}: {'; '.join(extra_spend)}")
    if report.changed:
        again = (
            "sent again" if on_change == "reprocess" else "kept their earlier answers, marked stale"
        )
        lines.append(f"  {report.changed:,} row(s) changed since they were done: {again}")
    if report.departed:
        lines.append(
            f"  {report.departed:,} row(s) done earlier are no longer in the input: left out of the "
            "output, their spend kept in the true spend"
        )
    by_model = t.by_model
    if len(by_model) > 1:
        for model, m in by_model.items():
            lines.append(
                f"  {model}: {m.rows:,} rows, {m.prompt_tokens:,} + {m.completion_tokens:,} tokens, "
                f"{_usd(m.cost_usd, m.rows_cost_unknown)}{_left_out(m.rows_cost_unknown)}"
            )
    return "\n".join(lines)


def status(figures: dict[str, Any]) -> str:
    """`pipeline status`: how far a job is."""
    unknown = figures["rows_cost_unknown"]
    running = f"running (pid {figures['lock_holder']})" if figures["running"] else "not running"
    rows = "rows in all unknown: " if figures["rows"] is None else f"{figures['rows']:,} rows: "
    left = "" if figures["remaining"] is None else f", {figures['remaining']:,} to do"
    output = figures["output"]
    lines = [
        f"{rows}{figures['done']:,} done ({figures['ok']:,} ok, {figures['failed']:,} failed){left}; {running}",
        f"spent {_usd(figures['cost_usd'], unknown)}{_left_out(unknown)}, true {_usd(figures['true_cost_usd'])}; "
        f"{_day_spend(figures)}{figures['rows_per_s_last_minute']:.1f} rows/s over the last minute",
        f"output {output}: {'written' if figures['output_exists'] else 'not written yet'}"
        if output is not None
        else f"journal {figures['journal']} (output unknown without the config)",
    ]
    lines += [_batch_line(batch) for batch in figures.get("batches", [])]
    if figures.get("note"):
        lines.append(f"note: {figures['note']}")
    return "\n".join(lines)


def _batch_line(batch: dict[str, Any]) -> str:
    """A batch of batch mode: its id, the server's state and counts, age and expiry."""
    now = time.time()
    name = batch["id"] or "(create not yet answered)"
    status = batch["status"] or batch["state"]
    counts = ""
    if batch["completed"] is not None:
        counts = f", {batch['completed']:,} answered, {batch['failed']:,} failed"
    line = f"batch {name}: {status}, {batch['lines']:,} requests for {batch['model']}{counts}, {_age(now - batch['created_after'])} old"
    if batch["state"] != "done" and batch["expires_at"]:
        line += f", expires in {_age(batch['expires_at'] - now)}"
    if batch["cost_usd"] is not None:
        line += f", cost {_usd(batch['cost_usd'])}"
    return line


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _day_spend(figures: dict[str, Any]) -> str:
    """With a rolling cap: what it counts now (the known spend: a lower bound while any of the
    job's spend is unknown)."""
    if "spent_last_24h_usd" not in figures:
        return ""
    spent = _usd(figures["spent_last_24h_usd"], figures["true_cost_usd"] is None)
    return f"{spent} in the last 24 h (max_cost_per_day {_usd(figures['max_cost_per_day'])}); "


def estimate(result: Estimate) -> str:
    """`pipeline estimate`: rows, tokens and a cost range per model, and how it was made."""
    unique = (
        f" ({result.unique_requests:,} distinct requests)"
        if result.unique_requests is not None
        else ""
    )
    lines = [
        f"rows: {result.total_rows:,} in the input, {result.done_rows:,} done, {result.todo_rows:,} to do{unique}"
    ]
    for model, m in result.by_model.items():
        cost = (
            f"${m.cost_low:.4f} - ${m.cost_high:.4f}"
            if m.cost_low is not None and m.cost_high is not None
            else "price unknown"
        )
        if m.batch_cost_low is not None and m.batch_cost_high is not None:
            cost += f" (batch mode: ${m.batch_cost_low:.4f} - ${m.batch_cost_high:.4f})"
        lines.append(
            f"  {model}: {m.rows:,} requests, ~{m.prompt_tokens:,} prompt tokens, {m.output_low:,}-{m.output_high:,} output tokens: {cost}"
        )
    if result.cost_low is not None and result.cost_high is not None:
        batch = (
            f"; batch mode: ${result.batch_cost_low:.4f} - ${result.batch_cost_high:.4f}"
            if result.batch_cost_low is not None and result.batch_cost_high is not None
            else ""
        )
        lines.append(f"estimated cost: ${result.cost_low:.4f} - ${result.cost_high:.4f}{batch}")
    lines.append(f"how: {result.method}")
    lines += [f"note: {note}" for note in result.notes]
    if result.pilot:
        p = result.pilot
        lower = p["cost_per_row_usd"] is None and p["rows"] > 0  # some of its spend is unknown
        lines.append(
            f"pilot: {p['rows']} rows cost {_usd(p['cost_usd'], lower)}{_left_out(p['rows_cost_unknown'])}, "
            f"{_usd(p['cost_per_row_usd'])} per row; projected for the rest: "
            f"{_usd(p['projected_remaining_usd'], digits=4)}, whole job: {_usd(p['projected_total_usd'], digits=4)}"
        )
    return "\n".join(lines)


def _usd(value: float | None, lower_bound: int | bool = False, digits: int = 6) -> str:
    """An amount of money: "unknown" for None (never a made-up $0), "at least" a lower bound."""
    if value is None:
        return "unknown"
    return f"{'at least ' if lower_bound else ''}${value:.{digits}f}"


def _left_out(rows: int, why: str = "") -> str:
    """What a total leaves out, said after it."""
    return f" ({rows:,} row{'' if rows == 1 else 's'} without a cost{why})" if rows else ""


def models(found: list[ModelPrice]) -> str:
    """`pipeline models`: one line per model, context and $ per million tokens."""
    width = max((len(m.id) for m in found), default=10)
    lines = [f"{'model':<{width}}  {'context':>9}  {'$/M in':>9}  {'$/M out':>9}"]
    for m in found:
        context = f"{m.context_length:,}" if m.context_length else "?"
        lines.append(
            f"{m.id:<{width}}  {context:>9}  {m.per_million(m.prompt):>9}  {m.per_million(m.completion):>9}"
        )
    return "\n".join(lines)


def models_json(found: list[ModelPrice]) -> list[dict[str, Any]]:
    # A model listed without prices has them null: unknown, never a made-up 0.
    return [
        {"id": m.id, "name": m.name, "context_length": m.context_length,
         "prompt_per_million": float(m.prompt * 1_000_000) if m.priced else None,
         "completion_per_million": float(m.completion * 1_000_000) if m.priced else None}
        for m in found
    ]  # fmt: skip


def models_footer(found: list[ModelPrice], catalogue: Catalogue) -> str:
    fetched = time.strftime("%Y-%m-%d %H:%M", time.localtime(catalogue.fetched_at))
    return f"{len(found)} model(s); prices as of {fetched}"


def run_summary_json(report: JobReport) -> dict[str, Any]:
    """The `summary` event's fields (with --log-format json)."""
    return {
        "exit_code": report.exit_code, "rows": report.total_rows, "done_by_earlier_runs": report.skipped,
        "wall_s": round(report.wall_seconds, 3), "retries": report.retries, "output": str(report.output),
        "changed_rows": report.changed,
        **report.job_totals.as_dict(),
    }  # fmt: skip
