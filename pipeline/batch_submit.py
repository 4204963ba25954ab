"""Submitting batches so that none is ever made twice. There is no idempotency key and no
cancel: a batch is recorded in the journal before its create is sent and its server id after,
and a create whose answer never came (a timeout, a reset, a 5xx after sending) is looked for in
the server's list of batches made since, rather than sent again blindly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from pipeline.batch_api import Ambiguous, BatchAPI, BatchError, BatchState, NoBatchEndpoint
from pipeline.batch_config import BatchConfig
from pipeline.errors import UserError
from pipeline.journal_batches import SUBMITTING, BatchLog, BatchRecord
from pipeline.retry import RetryPolicy


class Submitter:
    def __init__(
        self, api: BatchAPI, log: BatchLog, settings: BatchConfig, policy: RetryPolicy, *,
        say: Callable[[str], None], sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self.api, self.log, self.settings, self.policy = api, log, settings, policy
        self.say, self._sleep, self._clock = say, sleep, clock

    async def begin(self, model: str, lines: list[tuple[str, str, bytes]]) -> BatchRecord:
        """The batch on disk (its lines and their bodies), before anything is sent."""
        return await asyncio.to_thread(self.log.begin, model, lines, self._clock())

    async def create(self, record: BatchRecord, body: bytes) -> BatchState:
        """Send the create, then record the server's id. A refusal abandons the record
        (nothing was made): `NoBatchEndpoint` for a model the Batch API does not take, else a
        `UserError` saying why."""
        for attempt in range(1, self.policy.max_attempts + 1):
            try:
                state = await self.api.create(body)
            except NoBatchEndpoint:
                await self.abandon(record)
                raise
            except Ambiguous as exc:
                self.say(f"batch create unanswered ({exc}); looking for it before sending it again")
                found = await self.find(record)
                if found is None:
                    continue
                state = found
            except BatchError as exc:
                if not exc.retry:
                    await self.abandon(record)
                    raise UserError(
                        f"the Batch API refused a batch of {record.lines:,} requests for {record.model}: {exc}"
                    ) from None
                await self._sleep(self.policy.delay(attempt, None))  # the retry policy's back-off
                continue
            await asyncio.to_thread(self.log.submitted, record.local_id, state.id, state.status)
            self.say(f"batch {state.id}: {record.lines:,} requests for {record.model} submitted")
            return state
        # Every attempt was refused, or lost and then not found: nothing was made.
        await self.abandon(record)
        raise UserError(
            f"could not submit a batch for {record.model} after {self.policy.max_attempts} attempts; run again to resume"
        )

    async def abandon(self, record: BatchRecord) -> None:
        await asyncio.to_thread(self.log.abandon, record.local_id)

    async def resume(self, record: BatchRecord) -> str | None:
        """The server id of a batch an earlier run left open; None when its create, never
        answered, made nothing (the record is abandoned, its lines are to be sent again)."""
        if record.state != SUBMITTING:
            return record.server_id
        found = await self.find(record)
        if found is None:
            await self.abandon(record)
            return None
        await asyncio.to_thread(self.log.submitted, record.local_id, found.id, found.status)
        return found.id

    async def find(self, record: BatchRecord) -> BatchState | None:
        """The server's batch for a create whose answer never came: one of the same model and
        size created since, not claimed by another record. The list may lag behind a new
        batch, so it is asked again for `list_lag` seconds before giving up."""
        known = await asyncio.to_thread(self.log.server_ids)
        waited, delay = 0.0, 1.0
        while True:
            try:
                listed = await self.api.created_since(record.created_after)
            except BatchError:
                listed = []
            for state in reversed(listed):  # the oldest first: ours came before any retry's
                if (
                    state.model == record.model
                    and state.total == record.lines
                    and state.id not in known
                ):
                    return state
            if waited >= self.settings.list_lag:
                return None
            await self._sleep(delay)
            waited += delay
            delay = min(delay * 2, self.settings.poll_max)
