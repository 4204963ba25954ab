"""Progress at the edge: a tqdm bar on a terminal, a plain line every few seconds otherwise
(cron, `--quiet`), or with `--log-format json` one JSON object per line: `start`, `progress`,
`rate_limited`, `row_failed`, `stopping`, then `summary` or `error` (written by the CLI).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from pipeline.budget import Budget
from pipeline.records import API, OK, Result

LOG_INTERVAL = 10.0  # seconds between progress lines when there is no terminal
FAILURES_LOGGED = 20  # row_failed events per run; the summary counts the rest


@dataclass(frozen=True)
class LogSettings:
    """Where and how a run reports: `--log-format`, `--log-file`, `--log-prompts`."""

    json: bool = False
    file: str | None = None
    prompts: bool = False

    def open(self) -> IO[str]:
        if self.file is None:
            return sys.stderr
        # Line-buffered: each line reaches the file as it is written, whatever ends the run.
        return open(self.file, "a", buffering=1, encoding="utf-8")


def json_line(event: str, **fields: Any) -> str:
    """One log event as a line of JSON, with a UTC timestamp."""
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps({"ts": stamp, "event": event, **fields}, ensure_ascii=False, default=str)


@dataclass
class Tally:
    """Running totals of a run (this run only; the journal holds the whole job's)."""

    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    cost_unknown: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, result: Result) -> None:
        if result.status == OK:
            self.ok += 1
        else:
            self.failed += 1
        if result.response_source == API:  # a reused answer was not generated again
            self.prompt_tokens += result.prompt_tokens or 0
            self.completion_tokens += result.completion_tokens or 0
        if result.cost_usd is not None:
            self.cost += result.cost_usd
        elif result.status == OK:
            self.cost_unknown += 1

    @property
    def done(self) -> int:
        return self.ok + self.failed


def _bar_class() -> tuple[Any, bool]:
    """tqdm's widget in a Jupyter kernel that has ipywidgets, else its text bar (which a
    notebook shows too, less prettily); and whether it is the text bar."""
    if "ipykernel" in sys.modules and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as widget

        return widget, False
    from tqdm import tqdm

    return tqdm, True


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return 0


class Progress:
    """Shows a run's progress on stderr; `update()` is called once per result."""

    def __init__(
        self,
        total: int,
        already_done: int,
        *,
        quiet: bool,
        budget: Budget | None = None,
        stream: IO[str] | None = None,
        logs: LogSettings = LogSettings(),
        bar: bool | None = None,
    ) -> None:
        self.budget = budget
        self.stream = stream or sys.stderr
        self.logs = logs
        self._failures_logged = 0
        self._rate_limited = 0  # 429s already told
        self._next_storm_log = 0.0
        self.tally = Tally()
        self.total = total
        self.retries = 0
        self._bar: Any = None
        self._next_log = time.monotonic() + LOG_INTERVAL
        self._already = already_done
        self._batch_states: list[tuple[str, str, int]] = []  # the open batches' last told
        self._next_batches_log = 0.0
        if not quiet and not logs.json and (bar or (bar is None and self.stream.isatty())):
            tqdm, text = _bar_class()
            # A terminal that reports no size (script, bare ptys) would get an empty, hidden bar.
            sized = _columns(self.stream) > 0
            shape = (
                {"dynamic_ncols": sized, "ncols": None if sized else 100,
                 "nrows": None if sized else 20}
                if text else {}
            )  # fmt: skip
            self._bar = tqdm(
                total=total, initial=already_done, unit="row", file=self.stream, smoothing=0.05,
                **shape,
            )  # fmt: skip

    def update(
        self, result: Result, retries: int, rate_limited: int = 0, prompt: str | None = None
    ) -> None:
        self.tally.add(result)
        self.retries = retries
        if self.logs.json and result.status != OK and self._failures_logged < FAILURES_LOGGED:
            self._failures_logged += 1
            fields = {
                "key": result.key,
                "error_type": result.error_type,
                "message": result.error_message,
            }
            if self.logs.prompts and prompt is not None:
                fields["prompt"] = prompt
            self.event("row_failed", **fields)
        now = time.monotonic()
        if rate_limited > self._rate_limited and now >= self._next_storm_log:
            # A 429 storm is told as it starts, then at most once per LOG_INTERVAL.
            self._next_storm_log = now + LOG_INTERVAL
            self.event(
                "rate_limited", responses_429=rate_limited,
                since_last=rate_limited - self._rate_limited,
            )  # fmt: skip
            self._rate_limited = rate_limited
        if self._bar is not None:
            self._bar.update(1)
            if self.tally.done % 50 == 1:
                self._bar.set_postfix_str(self._postfix(), refresh=False)
        elif now >= self._next_log:
            self._next_log = now + LOG_INTERVAL
            if self.logs.json:
                self.event("progress", **self.figures())
            else:
                self.log(self.line())

    def figures(self) -> dict[str, Any]:
        t = self.tally
        done = self._already + t.done
        elapsed = time.monotonic() - t.started
        rate = t.done / elapsed if elapsed > 0 else 0.0
        return {
            "done": done, "total": self.total, "ok": t.ok, "failed": t.failed,
            "rows_per_s": round(rate, 2),
            "eta_s": round((self.total - done) / rate, 1) if rate > 0 else None,
            "cost_usd": round(t.cost, 8), "tokens": t.prompt_tokens + t.completion_tokens,
            "retries": self.retries,
        }  # fmt: skip

    def event(self, name: str, **fields: Any) -> None:
        """A log event: a JSON line with `--log-format json`, else a plain line (if it has one)."""
        if self.logs.json:
            print(json_line(name, **fields), file=self.stream, flush=True)
        elif "message" in fields:
            self.log(str(fields["message"]))

    def _postfix(self) -> str:
        t = self.tally
        spent = f"${t.cost:.4f}"
        if t.done:
            projected = t.cost / t.done * (self.total - self._already)
            spent += (
                f" (of ~${projected:.4f}{f', cap ${self.budget.cap:.2f}' if self.budget else ''})"
            )
        return f"{spent} {t.prompt_tokens + t.completion_tokens:,} tok {self.retries} retries {t.failed} errors"

    def line(self) -> str:
        t = self.tally
        done = self._already + t.done
        elapsed = time.monotonic() - t.started
        rate = t.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        return f"progress {done:,}/{self.total:,} rows ({rate:.1f}/s, eta {eta:.0f}s) {self._postfix()}"

    def batches(self, open_batches: list[dict[str, Any]]) -> None:
        """Where the batches a run waits for stand (batch mode), after each look at them: on the
        bar, else a line (an event) when one moves on and every LOG_INTERVAL otherwise."""
        if self._bar is not None:
            self._bar.set_description_str(batches_line(open_batches), refresh=True)
            return
        now = time.monotonic()
        states = [(b["id"], b["status"], b["completed"] + b["failed"]) for b in open_batches]
        if states == self._batch_states and now < self._next_batches_log:
            return
        self._batch_states, self._next_batches_log = states, now + LOG_INTERVAL
        if self.logs.json:
            self.event("batches", batches=open_batches)
        else:
            self.log(batches_line(open_batches))

    def log(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.close()
            self._bar = None


def batches_line(open_batches: list[dict[str, Any]]) -> str:
    """`batch ID STATUS done/total, eta` for each of a few batches; a sum for many."""
    if len(open_batches) <= 3:
        return "; ".join(
            f"batch {b['id']} {b['status']} {b['completed'] + b['failed']:,}/{b['total']:,}"
            + _eta(b["eta_s"])
            for b in open_batches
        )
    done = sum(b["completed"] + b["failed"] for b in open_batches)
    total = sum(b["total"] for b in open_batches)
    etas = [b["eta_s"] for b in open_batches if b["eta_s"] is not None]
    return f"{len(open_batches)} batches {done:,}/{total:,} requests done" + _eta(
        max(etas) if etas else None
    )


def _eta(seconds: float | None) -> str:
    return f", eta {_duration(seconds)}" if seconds is not None else ""


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
