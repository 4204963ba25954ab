"""Waiting for batches: every open batch polled, the interval doubling up to `poll_max`, its
state journaled (for `pipeline status`) and shown with its counts and an ETA, and each handed
to `collect` once final and its results are in. A run that does not wait looks once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pipeline.batch_api import BatchAPI, BatchError, BatchState
from pipeline.batch_config import BatchConfig
from pipeline.errors import UserError
from pipeline.journal_batches import BatchLog

# Seconds after its create in which a batch that reads 404 is taken as not readable yet (the
# record is written asynchronously); a 404 later means it is gone, which needs a person.
UNSEEN_GRACE = 600.0


@dataclass
class OpenBatch:
    """A submitted batch this run waits for."""

    local_id: str
    server_id: str
    model: str
    created_after: float
    started: tuple[float, int] | None = None  # (when, lines done) first seen running

    def eta(self, state: BatchState, now: float) -> float | None:
        """Seconds until every line is done at the pace seen so far; None before any pace."""
        done = state.completed + state.failed
        if self.started is None or done == 0:
            self.started = self.started or (now, done)
            return None
        since, then = self.started
        if done <= then or now <= since:
            return None
        return (state.total - done) / ((done - then) / (now - since))


Show = Callable[[list[dict[str, Any]]], None]


class Poller:
    def __init__(
        self, api: BatchAPI, log: BatchLog, settings: BatchConfig, stopping: asyncio.Event, *,
        say: Callable[[str], None], show: Show,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self.api, self.log, self.settings, self.stopping = api, log, settings, stopping
        self.say, self.show, self._sleep, self._clock = say, show, sleep, clock

    async def wait(
        self, batches: list[OpenBatch],
        collect: Callable[[OpenBatch, BatchState], Awaitable[None]],
    ) -> None:  # fmt: skip
        """Until every batch is collected, or the run stops (the rest are journaled for the
        next), or, not waiting, after one look at each."""
        delay = self.settings.poll_interval
        while batches and not self.stopping.is_set():
            shown = []
            for batch in list(batches):
                state = await self._look(batch)
                if state is None:
                    continue
                # Completed but without results: the charge is settling, they come later.
                if state.final and (state.results is not None or state.status != "completed"):
                    await collect(batch, state)
                    batches.remove(batch)
                    del state  # its results, before the next batch's are read
                else:
                    shown.append(self._view(batch, state))
            if shown:
                self.show(shown)
            if not batches or not self.settings.wait:
                return
            await self._pause(delay)
            delay = min(delay * 2, self.settings.poll_max)

    async def _look(self, batch: OpenBatch) -> BatchState | None:
        """The batch's state, journaled; None when it cannot be read this time."""
        try:
            state = await self.api.get(batch.server_id)
        except BatchError as exc:
            # Right after its create a batch may not be readable yet; 5xx, 429 and dropped
            # connections pass.
            young = self._clock() - batch.created_after < UNSEEN_GRACE
            if exc.retry or (exc.status == 404 and young):
                self.say(f"batch {batch.server_id}: {exc}; asking again")
                return None
            raise UserError(
                f"batch {batch.server_id}: {exc}; its rows are kept for the next run, which asks for it again"
            ) from None
        await asyncio.to_thread(
            self.log.seen, batch.local_id, state.status, state.completed, state.failed,
            state.expires_at,
        )  # fmt: skip
        return state

    def _view(self, batch: OpenBatch, state: BatchState) -> dict[str, Any]:
        now = self._clock()
        eta = batch.eta(state, now)
        return {
            "id": state.id, "model": batch.model, "status": state.status,
            "completed": state.completed, "failed": state.failed, "total": state.total,
            "eta_s": round(eta, 1) if eta is not None else None,
            "expires_in_s": round(state.expires_at - now, 1) if state.expires_at else None,
        }  # fmt: skip

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or less if the run is told to stop."""
        waits = [
            asyncio.ensure_future(self.stopping.wait()),
            asyncio.ensure_future(self._sleep(seconds)),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
