"""The rows a batch run is waiting on. One `Waiting` per distinct request: its rows (those
that asked the identical request share its one line), its attempts, and its body until its
batch is recorded. Once a batch is submitted its rows leave memory for `WaitingRows`, a
private temporary sqlite database (deleted when closed), and come back one batch at a time
when it is collected: a run with millions of rows in running batches holds no more in memory
than one with thousands. Nothing here needs to survive a crash: every run reads its rows
again from the input, and the journal keeps what was submitted."""

from __future__ import annotations

import sqlite3
import tempfile
import threading
from dataclasses import dataclass

from pipeline.errors import DiskFull, is_disk_full
from pipeline.records import Result, Row

_SCHEMA = """
CREATE TABLE waiting (
    local_id TEXT NOT NULL, request_hash TEXT NOT NULL, slot INTEGER NOT NULL,
    key TEXT NOT NULL, digest INTEGER, model TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,
    max_tokens INTEGER, samples INTEGER NOT NULL, attempts INTEGER NOT NULL,
    invalid INTEGER NOT NULL, reserved REAL NOT NULL
);
CREATE INDEX waiting_by_batch ON waiting (local_id);
CREATE INDEX waiting_by_hash ON waiting (request_hash);
"""


@dataclass(slots=True)
class Waiting:
    """A request of this run that has no answer yet. Kept small (one is held for every row
    of a batch being submitted or collected): no list for the usual single row, and rows
    without their bodies."""

    first: Row
    body: bytes | None
    others: list[Row] | None = None  # rows that asked the identical request: one line for all
    attempts: int = 0
    reserved: float = 0.0
    invalid: int = 0  # answers turned down so far
    rejected: Result | None = None  # the last of them, with the spend of all

    @classmethod
    def of(cls, row: Row, *, keep_body: bool) -> Waiting:
        body, row.body = row.body, None
        return cls(row, body if keep_body else None)

    @property
    def rows(self) -> list[Row]:
        return [self.first, *self.others] if self.others else [self.first]

    def join(self, row: Row) -> None:
        row.body = None
        if self.others is None:
            self.others = [row]
        else:
            self.others.append(row)


class WaitingRows:
    def __init__(self) -> None:
        # "": a private temporary database on disk, deleted when the connection closes.
        self._db = sqlite3.connect("", check_same_thread=False, isolation_level=None)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self.rows = 0  # held here now

    def put(self, local_id: str, waiting: list[Waiting]) -> None:
        """The rows of a submitted batch's requests, each with its request's counts (its
        reserve with the first row only)."""
        records = [
            (local_id, row.request_hash, row.slot, row.key, row.digest, row.model,
             row.prompt_tokens, row.max_tokens, row.samples, w.attempts, w.invalid,
             w.reserved if row is w.first else 0.0)
            for w in waiting for row in w.rows
        ]  # fmt: skip
        with self._lock:
            try:
                self._db.executemany(f"INSERT INTO waiting VALUES ({', '.join('?' * 12)})", records)
            except sqlite3.Error as exc:
                if not is_disk_full(exc):
                    raise
                raise DiskFull(
                    f"no room in the temporary directory {tempfile.gettempdir()} for the rows of "
                    f"running batches ({exc}): set TMPDIR to a disk with room, then run the same "
                    "command again (the batches submitted are collected, not sent again)"
                ) from None
            self.rows += len(records)

    def batch_of(self, request_hash: str) -> str | None:
        """The submitted batch whose line answers this request, if its rows are here."""
        if not self.rows:
            return None
        with self._lock:
            found = self._db.execute(
                "SELECT local_id FROM waiting WHERE request_hash = ? LIMIT 1", (request_hash,)
            ).fetchone()
        return found[0] if found else None

    def join(self, local_id: str, row: Row) -> None:
        """Another row asking a request whose line is in batch `local_id`."""
        self.put(local_id, [Waiting(row, None)])

    def take(self, local_id: str) -> dict[str, Waiting]:
        """The batch's requests, back in memory and gone from here, by request hash."""
        with self._lock:
            found = self._db.execute(
                "SELECT request_hash, slot, key, digest, model, prompt_tokens, max_tokens,"
                " samples, attempts, invalid, reserved FROM waiting WHERE local_id = ?"
                " ORDER BY rowid",
                (local_id,),
            ).fetchall()
            self._db.execute("DELETE FROM waiting WHERE local_id = ?", (local_id,))
            self.rows -= len(found)
        taken: dict[str, Waiting] = {}
        for (
            key,
            slot,
            ident,
            digest,
            model,
            prompt,
            cap,
            samples,
            attempts,
            invalid,
            reserved,
        ) in found:
            row = Row(slot, ident, None, model, prompt, cap, key, samples=samples, digest=digest)
            if (waiting := taken.get(key)) is None:
                taken[key] = Waiting(row, None, None, attempts, reserved, invalid)
            else:
                waiting.join(row)
        return taken

    def close(self) -> None:
        self._db.close()
