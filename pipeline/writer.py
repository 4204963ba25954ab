"""The journal's single writer: results gathered as rows settle and committed in batches every
`FLUSH_INTERVAL` seconds from a thread, with lost attempts and new cache entries alongside."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from pipeline.cache import ResponseCache
from pipeline.errors import DiskFull
from pipeline.journal import FLUSH_INTERVAL, Journal
from pipeline.records import API, OK, Result


class JournalWriter:
    """The single writer: collects results and commits them every `interval` seconds, along with
    lost attempts and, when a response cache is in use, the new answers for it."""

    def __init__(
        self,
        journal: Journal,
        cache: ResponseCache | None = None,
        interval: float = FLUSH_INTERVAL,
        on_commit: Callable[[list[tuple[Any, ...]]], None] | None = None,
        on_failure: Callable[[DiskFull], None] | None = None,
    ) -> None:
        self.journal = journal
        self.cache = cache
        self.interval = interval
        # Told each batch, as stored, once it is durable (in the writer's thread).
        self.on_commit = on_commit
        self._pending: list[Result] = []
        self._lost: list[tuple[str, int, str]] = []
        self._flushing = asyncio.Lock()
        self._stopped = asyncio.Event()
        # Set when a commit found the disk full: its results wait for the next attempt.
        self.failure: DiskFull | None = None
        self.on_failure = on_failure  # told once, when a commit first finds the disk full

    @property
    def unsaved(self) -> int:
        """Results not committed (yet)."""
        return len(self._pending)

    def add(self, result: Result) -> None:
        self._pending.append(result)

    def add_lost(self, attempts: list[tuple[str, int, str]]) -> None:
        self._lost.extend(attempts)

    async def flush(self) -> None:
        async with self._flushing:
            batch, self._pending = self._pending, []
            lost, self._lost = self._lost, []
            if batch or lost:
                try:
                    await asyncio.to_thread(self._write, batch, lost)
                except DiskFull as exc:  # kept, and tried again: room may be made
                    self._pending[:0], self._lost[:0] = batch, lost
                    first, self.failure = self.failure is None, exc
                    if first and self.on_failure is not None:
                        self.on_failure(exc)

    def _write(self, batch: list[Result], lost: list[tuple[str, int, str]]) -> None:
        self.journal.record_lost(lost)  # before the rows: a row's lost attempts are never missed
        stored = self.journal.write(batch)
        if self.on_commit is not None:
            self.on_commit(stored)
        if self.cache is not None:
            self.cache.store([r for r in batch if r.status == OK and r.response_source == API])

    async def run(self) -> None:
        """Flush every `interval` until `stop()`, then return; the owner calls `flush()` once
        more at the end. Never cancelled: a cancelled flush would leave its commit running in
        the thread while the final flush, finding nothing pending, returns before it lands."""
        async for _ in every(self.interval, self._stopped):
            await self.flush()

    def stop(self) -> None:
        self._stopped.set()


async def every(interval: float, stopped: asyncio.Event) -> AsyncIterator[None]:
    """Tick every `interval` seconds until `stopped` is set, and once more when it is, so the
    last interval's work is not left behind."""
    while not stopped.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), interval)
        yield
