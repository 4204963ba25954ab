"""The Batch API's state: each batch's lifecycle on the simulator's clock, its lines' answers and
what it bills (`batch_routes.py` serves it over HTTP).

A batch is `validating` for `batch_validating_s`, then `failed` if a line breaks a rule checked
only after the 202, else `in_progress` for `batch_in_progress_s`, its lines finishing evenly in
order, then (after `batch_finalizing_s` of `finalizing`) `completed`. `batch_expire_after_s` or
`batch_cancel_after_s`, whichever comes first, stops it early: `expired` or `cancelled`, with
the unfinished lines as error rows. The results are made, and the finished lines billed at the
model's batch price, the first time the batch is seen in a final state. Time is the
simulator's clock (`Simulator.now`), which tests move on instead of waiting.

Each line's outcome is the fault the simulator would give it as a chat request (a marker such as
`[[sim:500]]` in its messages, or `fault_rates`): any refusal is an error row, so a line marked
`[[sim:500]]` fails in its first batch and succeeds when sent again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.simulator import bodies, chat
from pipeline.simulator.catalogue import SimModel
from pipeline.simulator.content import message_text, messages_digest
from pipeline.simulator.faults import Fault, find_marker

if TYPE_CHECKING:
    from pipeline.simulator.server import Simulator

FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# The error type of a line refused with each fault, as the batch's result rows name them.
_LINE_ERRORS: dict[Fault, tuple[str, str]] = {
    Fault.HTTP_402: ("payment_required", "Insufficient credits"),
    Fault.HTTP_403: ("content_policy_violation", "The prompt was flagged by moderation"),
    Fault.HTTP_408: ("timeout", "Request timed out"),
    Fault.HTTP_429: ("rate_limit_exceeded", "Provider rate limit exceeded"),
    Fault.HTTP_524: ("timeout", "Provider timed out"),
    Fault.HTTP_529: ("provider_overloaded", "Provider overloaded"),
    Fault.HTTP_503: ("provider_overloaded", "No instances available"),
    Fault.RESET: ("server", "Upstream connection reset"),
    Fault.HANG: ("timeout", "Upstream request timed out"),
    Fault.ERROR_BODY: ("server", "Provider returned error"),
    Fault.CHOICE_ERROR: ("server", "Upstream provider error mid-generation"),
}
_ANSWERED = frozenset(
    {Fault.EMPTY, Fault.SCHEMA_INVALID, Fault.INVALID_JSON, Fault.MID_BODY, Fault.STALL}
)


@dataclass(slots=True)
class Batch:
    """One submitted batch: its lines, when it was made, and, once final, its results."""

    id: str
    key: str
    endpoint: str
    model: SimModel
    lines: list[tuple[str, dict[str, Any]]]  # (custom_id, body), as submitted
    faults: list[Fault | None]  # each line's outcome, drawn at submit
    created: float
    invalid: str | None  # why asynchronous validation fails the batch
    provider_only: list[str] | None = None
    status: str | None = None  # once final
    finalized: float | None = None
    results: list[dict[str, Any]] | None = None
    usage: dict[str, Any] | None = None
    counts: tuple[int, int] = (0, 0)  # completed, failed
    error: str | None = None
    polls_since_final: int = 0
    deleted: bool = False


class BatchStore:
    """Every batch the simulator was sent, by id, with the lifecycle rules of the config."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.batches: dict[str, Batch] = {}
        self.create_faults = list(sim.config.batch_create_faults)
        self.get_faults = list(sim.config.batch_get_faults)

    def add(
        self, key: str, endpoint: str, model: SimModel, lines: list[tuple[str, dict[str, Any]]],
        now: float, provider_only: list[str] | None = None,
    ) -> Batch:  # fmt: skip
        picker = self.sim.picker
        faults = []
        for _, body in lines:
            messages = body.get("messages") or []
            marker = find_marker(message_text(m) for m in messages)
            faults.append(picker.pick(None, marker, messages_digest(messages)))
        batch = Batch(
            bodies.batch_id(now), key, endpoint, model, lines, faults, now,
            asynchronously_invalid(lines), provider_only,
        )  # fmt: skip
        self.batches[batch.id] = batch
        self.sim.counters["batches_created"] += 1
        self.sim.counters["batch_lines"] += len(lines)
        return batch

    # ------------------------------------------------------------------------------ lifecycle

    def state(self, batch: Batch, now: float) -> tuple[str, int]:
        """The batch's status at `now` and how many of its lines have finished."""
        if batch.status is not None:
            return batch.status, len(batch.lines)
        cfg = self.sim.config
        age = now - batch.created
        if age < cfg.batch_validating_s:
            return "validating", 0
        if batch.invalid is not None:
            return self._finish(batch, "failed", 0, now), 0
        running = age - cfg.batch_validating_s
        stops = [
            (after - cfg.batch_validating_s, status)
            for after, status in ((cfg.batch_cancel_after_s, "cancelled"), (cfg.batch_expire_after_s, "expired"))
            if after is not None
        ]  # fmt: skip
        for at, status in sorted(stops):
            if at < cfg.batch_in_progress_s and running >= at:
                done = self._finished(len(batch.lines), max(at, 0.0))
                return self._finish(batch, status, done, now), done
        if running < cfg.batch_in_progress_s:
            return "in_progress", self._finished(len(batch.lines), running)
        if running < cfg.batch_in_progress_s + cfg.batch_finalizing_s:
            return "finalizing", len(batch.lines)
        return self._finish(batch, "completed", len(batch.lines), now), len(batch.lines)

    def _finished(self, lines: int, running: float) -> int:
        window = self.sim.config.batch_in_progress_s
        return lines if window <= 0 else min(lines, int(lines * running / window))

    def counts(self, batch: Batch, done: int) -> tuple[int, int]:
        """(completed, failed) among the first `done` lines."""
        if batch.status is not None:
            return batch.counts
        failed = sum(1 for fault in batch.faults[:done] if _refused(fault))
        return done - failed, failed

    def _finish(self, batch: Batch, status: str, done: int, now: float) -> str:
        """Make the results of a batch that has just become final, and bill its lines."""
        sim, cfg = self.sim, self.sim.config
        batch.status, batch.finalized = status, now
        if status == "failed":
            batch.error, batch.results = batch.invalid, None
            batch.usage = _usage([])
            return status
        priced = batch.model.batch_row(cfg.batch_discount)
        results: list[dict[str, Any]] = []
        billed = []
        for index, ((custom_id, body), fault) in enumerate(
            zip(batch.lines, batch.faults, strict=True)
        ):
            if index >= done:
                kind = "expired" if status == "expired" else "canceled"
                results.append(
                    _error_row(
                        batch, custom_id, kind, f"The batch was {status} before this request ran."
                    )
                )
            elif _refused(fault):
                assert fault is not None
                kind, message = _LINE_ERRORS.get(fault, ("server", "Internal Server Error"))
                results.append(_error_row(batch, custom_id, kind, message))
            else:
                gen, completion = chat.answer_line(
                    sim, batch.key, batch.model, priced, body, now, fault
                )
                gen.batch_id = batch.id
                sim.record(gen, batch.key, billed=True)
                billed.append(gen)
                if not cfg.batch_line_cost:
                    for name in ("cost", "cost_details", "is_byok"):
                        completion["usage"].pop(name)
                results.append({
                    "id": f"batch_req_{gen.id[-20:]}", "custom_id": custom_id,
                    "response": {"status_code": 200, "request_id": f"req_{gen.id[-20:]}", "body": completion},
                    "error": None,
                })  # fmt: skip
        failed = len(results) - len(billed)
        batch.counts = (len(billed), failed)
        batch.usage = _usage(billed)
        if billed or not results:
            batch.error = None
        else:
            batch.error = f"All {len(results)} request(s) in this batch failed upstream; inspect each result's error field."
        if cfg.batch_shuffle:
            random.Random(batch.id).shuffle(results)
        if status == "expired" and not cfg.batch_expired_results:
            results = []
        batch.results = results
        return status

    # --------------------------------------------------------------------------------- bodies

    def body(self, batch: Batch, now: float, *, with_results: bool) -> dict[str, Any]:
        """The batch object as `GET /batches/{id}` (or, without results, the list) shows it."""
        status, done = self.state(batch, now)
        completed, failed = self.counts(batch, done)
        results = None
        if with_results and status in FINAL and status != "failed":
            results = batch.results
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "model": batch.model.id,
            "completion_window": "24h",
            "status": status,
            "created_at": int(batch.created),
            "finalized_at": int(batch.finalized) if batch.finalized is not None else None,
            "expires_at": int(batch.created) + 86_400,
            "provider": batch.model.provider,
            "request_counts": {"total": len(batch.lines), "completed": completed, "failed": failed},
            "usage": batch.usage if status in FINAL else None,
            "results": results,
            "error": {"message": batch.error} if batch.error else None,
        }


def asynchronously_invalid(lines: list[tuple[str, dict[str, Any]]]) -> str | None:
    """Why the batch fails once validated, as OpenRouter checks lines only after the 202."""
    for custom_id, body in lines:
        if body.get("stream") is True:
            return "Batch requests do not support stream: true."
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if isinstance(max_tokens, int) and max_tokens < 1:
            return f"Batch request '{custom_id}' has max_tokens below 1."
        plugins = body.get("plugins")
        if isinstance(plugins, list) and any(
            isinstance(p, dict) and p.get("id") == "web" for p in plugins
        ):
            return f"Batch request '{custom_id}' uses OpenRouter web search, which batches do not support."
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return f"Batch request '{custom_id}' has no input."
        for message in messages:
            parts = message.get("content") if isinstance(message, dict) else None
            for part in parts if isinstance(parts, list) else ():
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("input_audio", "video_url", "audio"):
                    return f"Batch request '{custom_id}' contains unsupported '{kind}' content."
                url = (part.get("image_url") or {}).get("url", "") if kind == "image_url" else ""
                if kind == "image_url" and not str(url).startswith(("http://", "https://")):
                    return (
                        f"Batch request '{custom_id}' contains unsupported 'image_url' content. "
                        "Only public http(s) image URLs are supported in batch; base64 data URIs are not."
                    )
    return None


def _refused(fault: Fault | None) -> bool:
    return fault is not None and fault not in _ANSWERED


def _error_row(batch: Batch, custom_id: str, kind: str, message: str) -> dict[str, Any]:
    return {
        "id": f"{batch.model.provider.lower().replace(' ', '-')}-{custom_id}",
        "custom_id": custom_id,
        "response": None,
        "error": {"type": kind, "message": message, "param": None},
    }


def _usage(billed: list[bodies.Generation]) -> dict[str, Any]:
    prompt = sum(g.prompt_tokens for g in billed)
    completion = sum(g.completion_tokens for g in billed)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost": float(sum(g.cost for g in billed)),
        "is_byok": False,
        "prompt_tokens_details": {"cached_tokens": sum(g.cached_tokens for g in billed)},
        "completion_tokens_details": {"reasoning_tokens": sum(g.reasoning_tokens for g in billed)},
    }
