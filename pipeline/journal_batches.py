"""The journal's record of provider batches (batch mode): which requests went into which batch,
kept so that a crash at any moment and a re-run give every row once and never a second batch
for the same rows.

A batch is recorded, with its lines, *before* its create is sent (`begin`: state
`submitting`), and its server id once the create is answered (`submitted`). A batch still
`submitting` when a run starts may or may not exist on the server, as there is no idempotency
key: the run looks for it in the server's list of batches created since `created_after`
before it sends it again. A batch is marked `done` only after its answers are committed
(`done`); a crash between the two leaves it open, and the next run, which collects it again,
gives its answers only to rows not yet settled, so none is lost or journaled twice. (Callers
that want both in one transaction have `Journal.write(..., then=log.finishing(...))`.)

The tables are made by the first batch: the journal of a job never sent in batch mode is
unchanged.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.journal_file import when_full

SUBMITTING, SUBMITTED, DONE = "submitting", "submitted", "done"
_KEYS_PER_QUERY = 500  # custom ids in one `IN (...)`, well under sqlite's parameter limit

_TABLES = """
CREATE TABLE IF NOT EXISTS batches (
    local_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    lines INTEGER NOT NULL,
    created_after REAL NOT NULL,
    state TEXT NOT NULL,
    server_id TEXT UNIQUE,
    status TEXT,
    completed INTEGER,
    failed INTEGER,
    expires_at REAL,
    reserved_usd REAL,
    cost_usd REAL,
    lines_cost_usd REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS batch_lines (
    local_id TEXT NOT NULL,
    custom_id TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    body BLOB,
    PRIMARY KEY (local_id, custom_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batch_lines_by_hash ON batch_lines (request_hash);
"""


@dataclass(frozen=True, slots=True)
class BatchRecord:
    local_id: str
    model: str
    lines: int
    created_after: float  # unix time just before its create was (first) sent
    state: str
    server_id: str | None
    status: str | None  # the server's, as last seen
    reserved_usd: float | None


class BatchLog:
    """The batch tables of one journal's sqlite connection (`guard`: the journal's lock)."""

    def __init__(self, db: sqlite3.Connection, guard: threading.Lock, path: Path) -> None:
        self._db = db
        self._guard = guard
        self._path = path
        self._made = False  # the tables exist (once made, they stay)

    def _exists(self) -> bool:
        if not self._made:
            query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'batches'"
            self._made = self._db.execute(query).fetchone() is not None
        return self._made

    def _select(self, query: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows `query` selects; none before the first batch made the tables."""
        with self._guard:
            return self._db.execute(query, args).fetchall() if self._exists() else []

    def begin(
        self, model: str, lines: list[tuple[str, str, bytes]], created_after: float,
        reserved_usd: float | None = None,
    ) -> BatchRecord:  # fmt: skip
        """Record a batch of `lines` (custom id, request hash, body) about to be submitted;
        durable once this returns. The bodies are kept to send a line again if it fails, so
        no run holds them in memory while its batches run."""
        record = BatchRecord(
            uuid.uuid4().hex, model, len(lines), created_after, SUBMITTING, None, None, reserved_usd
        )
        with self._guard, when_full(self._path), self._db:
            for statement in _TABLES.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(
                "INSERT INTO batches (local_id, model, lines, created_after, state, reserved_usd)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (record.local_id, model, len(lines), created_after, SUBMITTING, reserved_usd),
            )
            self._db.executemany(
                "INSERT INTO batch_lines (local_id, custom_id, request_hash, body) VALUES (?, ?, ?, ?)",
                [(record.local_id, custom_id, key, body) for custom_id, key, body in lines],
            )
        return record

    def submitted(self, local_id: str, server_id: str, status: str) -> None:
        """The server took the batch as `server_id`."""
        with self._guard, when_full(self._path), self._db:
            self._db.execute(
                "UPDATE batches SET state = ?, server_id = ?, status = ? WHERE local_id = ?",
                (SUBMITTED, server_id, status, local_id),
            )

    def seen(
        self, local_id: str, status: str, completed: int, failed: int, expires_at: float | None
    ) -> None:
        """A submitted batch as last polled (for `pipeline status`)."""
        with self._guard, when_full(self._path), self._db:
            self._db.execute(
                "UPDATE batches SET status = ?, completed = ?, failed = ?, expires_at = ?"
                " WHERE local_id = ?",
                (status, completed, failed, expires_at, local_id),
            )

    def listing(self, limit: int = 20) -> list[dict[str, object]]:
        """The newest batches, as `pipeline status` shows them."""
        names = ("id", "model", "lines", "state", "status", "completed", "failed",
                 "created_after", "expires_at", "cost_usd")  # fmt: skip
        rows = self._select(
            "SELECT server_id, model, lines, state, status, completed, failed, created_after,"
            " expires_at, cost_usd FROM batches ORDER BY created_after DESC, rowid DESC LIMIT ?",
            (limit,),
        )
        return [dict(zip(names, row, strict=True)) for row in rows]

    def done(
        self, local_id: str, status: str, cost_usd: float | None, lines_cost_usd: float | None,
        at: float,
    ) -> None:  # fmt: skip
        """The batch is final and its answers are saved: what it was billed (`usage.cost`)
        beside what its answers' costs add up to."""
        with self._guard, when_full(self._path), self._db:
            self.finishing(local_id, status, cost_usd, lines_cost_usd, at)(self._db)

    def abandon(self, local_id: str) -> None:
        """A batch whose create never reached the server: its lines are sent again as new."""
        with self._guard, when_full(self._path), self._db:
            self._db.execute("DELETE FROM batch_lines WHERE local_id = ?", (local_id,))
            self._db.execute("DELETE FROM batches WHERE local_id = ?", (local_id,))

    def finishing(
        self, local_id: str, status: str, cost_usd: float | None, lines_cost_usd: float | None,
        at: float,
    ) -> Callable[[sqlite3.Connection], None]:  # fmt: skip
        """What marks the batch done, to run in the transaction that writes its results."""

        def finish(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE batches SET state = ?, status = ?, cost_usd = ?, lines_cost_usd = ?,"
                " finished_at = ? WHERE local_id = ?",
                (DONE, status, cost_usd, lines_cost_usd, at, local_id),
            )

        return finish

    def unfinished(self) -> list[BatchRecord]:
        """Batches not yet done, oldest first."""
        rows = self._select(
            "SELECT local_id, model, lines, created_after, state, server_id, status, reserved_usd"
            " FROM batches WHERE state != ? ORDER BY created_after, rowid",
            (DONE,),
        )
        return [BatchRecord(*row) for row in rows]

    def lines(self, local_id: str) -> dict[str, str]:
        """A batch's lines: request hash by custom id."""
        return dict(
            self._select(
                "SELECT custom_id, request_hash FROM batch_lines WHERE local_id = ?", (local_id,)
            )
        )

    def bodies(self, local_id: str, custom_ids: list[str]) -> dict[str, bytes]:
        """The request bodies of some of a batch's lines, by custom id (each read by its key,
        not the whole batch's bodies to keep a few)."""
        found: dict[str, bytes] = {}
        for start in range(0, len(custom_ids), _KEYS_PER_QUERY):
            some = custom_ids[start : start + _KEYS_PER_QUERY]
            found.update(
                self._select(
                    "SELECT custom_id, body FROM batch_lines WHERE local_id = ? AND body IS NOT NULL"
                    f" AND custom_id IN ({', '.join('?' * len(some))})",
                    (local_id, *some),
                )
            )
        return found

    def pending_batch_of(self, request_hash: str) -> str | None:
        """The batch not yet done whose line answers this request, if any."""
        found = self._select(
            "SELECT l.local_id FROM batch_lines l JOIN batches b USING (local_id)"
            " WHERE l.request_hash = ? AND b.state != ? LIMIT 1",
            (request_hash, DONE),
        )
        return found[0][0] if found else None

    def server_ids(self) -> set[str]:
        """Every server id the journal holds: a listed batch among them is not a lost create."""
        query = "SELECT server_id FROM batches WHERE server_id IS NOT NULL"
        return {server_id for (server_id,) in self._select(query)}
