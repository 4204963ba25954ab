"""The durable checkpoint: a sqlite3 database in WAL mode beside the output.

One row per settled output row, keyed by its slot (the input position, times the variants of a
fan-out over models and samples), written in batches by a single
writer every 0.1 s, each with the hash of the settings that asked for it (`settings`).
`meta` holds what the job was: the input's fingerprint and what it asks (`settings.asked`), so
a resume with a changed input or question is refused by name (a changed question is accepted
under `--redo`); and how it is sent, so a resume with a new endpoint or limits says what changed.
Whether the answers are simulated is in what is asked: a journal is all one or the other.
A lock file next to the journal (`lock.py`) keeps two runs from sharing it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import polars as pl

from pipeline import __version__
from pipeline.digests import SCHEME, checks
from pipeline.errors import JournalError
from pipeline.journal_batches import BatchLog
from pipeline.journal_file import (
    AS_ADDED,
    BLOCK_BITS,
    BLOCK_SLOTS,
    OPENING_FULL,
    columns,
    connect,
    simulated_only,
    when_full,
)
from pipeline.journal_moves import move_results, results_in_blocks
from pipeline.journal_totals import spend_since, totals
from pipeline.records import RESULT_FIELDS, Result, Totals
from pipeline.settings import (
    changed_transport,
    describe_changes,
    describe_transport,
    different_job,
    mixing_refused,
    redo_accepted,
    settings_hash,
    simulated,
    upgraded,
)

# Seconds between commits while results arrive. A WAL commit with synchronous=NORMAL costs no
# fsync, so committing often is cheap, and an answer that arrived but was not yet committed
# when the process died is the one thing a resume pays for again.
FLUSH_INTERVAL = 0.1
# The layout of the tables; a journal of another layout is refused, never misread.
JOURNAL_FORMAT = 3
JOURNAL_SUFFIXES = ("", "-wal", "-shm")  # the database and sqlite's files beside it


def _null(value: None) -> None:
    return None


# sqlite3 binds only int, float, str and bytes directly; any other value (None, a bool) is first
# offered to adapters, and where none is registered Python 3.11 raises and discards an
# AttributeError looking for one. A row has several such values: registering adapters for them
# made a journal insert 15% cheaper (valgrind, instructions). Stored values are unchanged.
sqlite3.register_adapter(type(None), _null)
sqlite3.register_adapter(bool, int)

_STORED = (*RESULT_FIELDS, "settings", "ident_check")
_INSERT = f"INSERT OR REPLACE INTO results ({', '.join(_STORED)}) VALUES ({', '.join('?' * len(_STORED))})"
# sqlite3 releases and retakes the GIL around every step of a statement: with one row a step,
# the writer thread handed the GIL to the event loop and back once a row. One statement inserts
# this many rows (under 999 parameters, the limit of SQLite before 3.32).
ROWS_PER_INSERT = 999 // len(_STORED)
_INSERT_MANY = _INSERT + f", ({', '.join('?' * len(_STORED))})" * (ROWS_PER_INSERT - 1)
SIMULATED_ONLY = "the journal {path} held only simulated answers (--simulate), which cost nothing: starting over for real"


class Journal:
    """The journal of one job. Use `Journal.open(...)`; close it (or use `with`)."""

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection
        self._guard = threading.Lock()  # the writer thread and the reader never overlap
        self._settings: str | None = None  # the hash each row written gets
        self.keyed = False  # whether rows are known by an id column (their checks name it)
        # What opening found worth saying once: (event, message, fields) for the run's log.
        self.notices: list[tuple[str, str, dict[str, Any]]] = []

    @classmethod
    def open(
        cls,
        path: Path,
        fingerprint: dict[str, Any],
        *,
        restart: bool = False,
        incremental: bool = False,
        transport: dict[str, Any] | None = None,
        redo: bool = False,
        keyed: bool = False,
    ) -> Journal:
        """Open (or create) the journal at `path` and check it against this job's fingerprint
        (an incremental job's input may grow: its files are not compared); `transport`: how
        the job is sent (`settings.transport`); `redo`: a changed question is accepted;
        `keyed`: the job has an id column.

        A real run over a journal of simulated answers starts it over (nothing was paid).
        The caller holds the job's lock (`lock.job_locks`)."""
        notices: list[tuple[str, str, dict[str, Any]]] = []
        if not restart and simulated_only(path) and not simulated(fingerprint.get("config", {})):
            restart = True
            notices.append(("started_over", SIMULATED_ONLY.format(path=path), {}))
        if restart:
            for suffix in JOURNAL_SUFFIXES:
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        db = connect(path)
        journal = cls(path, db)
        journal.notices = notices
        journal.keyed = keyed
        try:
            journal._check(fingerprint, incremental, transport or {}, redo)
        except BaseException:
            db.close()
            raise
        journal._settings = settings_hash(fingerprint.get("config", {}))
        return journal

    @classmethod
    def read_only(cls, path: Path) -> Journal | None:
        """The journal at `path` for reading while a run may be writing it (no lock taken,
        nothing checked); None when there is none yet."""
        if not path.exists():
            return None
        return cls(path, sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False))

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._guard:
            self._db.close()

    def meta(self) -> dict[str, Any]:
        """What the job was (input and config fingerprints), the version and the format."""
        with self._guard:
            return {
                name: json.loads(value)
                for name, value in self._db.execute("SELECT name, value FROM meta")
            }

    def _check(
        self, fingerprint: dict[str, Any], incremental: bool, transport: dict[str, Any], redo: bool
    ) -> None:
        stored = self.meta()
        config = fingerprint.get("config", {})
        if not stored:
            self._store_meta(
                {**fingerprint, "version": __version__, "format": JOURNAL_FORMAT,
                 "transport": transport, "configs": {settings_hash(config): config},
                 "hash_seed": transport.get("request.base_url"), "digests": SCHEME}
            )  # fmt: skip
            return
        if stored.get("format") != JOURNAL_FORMAT:
            raise JournalError(
                f"journal {self.path} was written by prompt-pipeline {stored.get('version', '?')}, whose "
                "journal layout this version cannot read; finish that job with that version, or re-run "
                "with --restart to start over"
            )
        old = upgraded(stored.get("config", {}))
        if simulated(config) and not simulated(old):
            raise JournalError(mixing_refused(self.path))
        input_changes = describe_changes(
            stored, fingerprint, compare_input=not incremental, compare_config=False
        )
        asked_changes = describe_changes(stored, fingerprint, compare_input=False)
        if input_changes or (asked_changes and not redo):
            raise JournalError(
                different_job(self.path, input_changes, asked_changes, simulated=simulated(old))
            )
        configs = stored.get("configs")
        if configs is None:  # a journal from before `settings`: its rows were asked as it says
            configs = {settings_hash(old): old}
            with when_full(self.path, JournalError, OPENING_FULL), self._db:
                self._db.execute(
                    "UPDATE results SET settings = ? WHERE settings IS NULL", (settings_hash(old),)
                )
        earlier = _recorded_transport(stored)
        if "hash_seed" not in stored:  # its rows were hashed with the endpoint it had then
            self._store_meta({"hash_seed": earlier.get("request.base_url")})
        if stored.get("digests") != SCHEME:  # digests of another polars mean nothing now
            with when_full(self.path, JournalError, OPENING_FULL), self._db:
                self._db.execute(
                    "UPDATE results SET digest = NULL, ident_check = NULL "
                    "WHERE digest IS NOT NULL OR ident_check IS NOT NULL"
                )
            self._store_meta({"digests": SCHEME})
        moved = changed_transport(earlier, transport)
        if moved:
            self.notices.append(
                ("settings_changed", f"warning: {describe_transport(moved)}", {"changed": moved})
            )
        if asked_changes:
            self.notices.append(("redo_settings", redo_accepted(asked_changes), {}))
        self._store_meta(
            {"config": config, "transport": transport, "configs": {**configs, settings_hash(config): config}}
        )  # fmt: skip

    def _store_meta(self, values: dict[str, Any]) -> None:
        with when_full(self.path, JournalError, OPENING_FULL), self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                [(name, json.dumps(value)) for name, value in values.items()],
            )

    # ------------------------------------------------------------------------------ reads

    @property
    def hash_seed(self) -> str | None:
        """What the request hashes of this journal's rows are seeded with: the endpoint of its
        first run (`settings.SIMULATOR` for the simulator's), kept for the journal's life, so
        a row asked again on a moved endpoint is the same request (`RequestBuilder.seeded`)."""
        meta = self.meta()
        seed = meta.get("hash_seed", _recorded_transport(meta).get("request.base_url"))
        return seed if isinstance(seed, str) else None

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Every read inside sees the journal as of one moment, though a run goes on writing it
        (a WAL reader: the writer is never held up)."""
        with self._guard:
            self._db.execute("BEGIN")
        try:
            yield
        finally:
            with self._guard:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")

    def settled_count(self, below: int) -> int:
        """How many of the first `below` rows an earlier run settled: whole blocks from their
        summary, the rest counted (all of it in a read-only journal from before the blocks)."""
        with self._guard:
            whole = min(below, 1 << 62) >> BLOCK_BITS if columns(self._db, "blocks") else 0
            in_blocks = 0
            if whole:
                query = "SELECT COALESCE(SUM(settled), 0) FROM blocks WHERE block < ?"
                (in_blocks,) = self._db.execute(query, (whole,)).fetchone()
            (count,) = self._db.execute(
                "SELECT COUNT(*) FROM results WHERE position >= ? AND position < ? AND retry_on_resume = 0",
                (whole << BLOCK_BITS, below),
            ).fetchone()
        return int(in_blocks) + int(count)

    def rows_by_settings(self, below: int) -> dict[str, int]:
        """How many of the first `below` slots were answered under each settings hash."""
        with self._guard:
            cursor = self._db.execute(
                "SELECT COALESCE(settings, '(unknown)'), COUNT(*) FROM results WHERE position >= 0 AND position < ? GROUP BY 1 ORDER BY 1",
                (below,),
            )
            return {name: int(count) for name, count in cursor}

    def stored_results(self, below: int, columns: tuple[str, ...]) -> list[tuple[Any, ...]]:
        """These columns of the first `below` slots settled (for `--redo`'s choice: those not
        settled are sent again anyway)."""
        with self._guard:
            cursor = self._db.execute(
                f"SELECT {', '.join(columns)} FROM results WHERE position >= 0 AND position < ? AND retry_on_resume = 0",
                (below,),
            )
            return cursor.fetchall()

    def redo(self, positions: list[int]) -> None:
        """Mark these slots to be sent again by this run (and, if it stops, the next)."""
        with self._guard, when_full(self.path, JournalError, OPENING_FULL), self._db:
            self._db.executemany(
                "UPDATE results SET retry_on_resume = 1 WHERE position = ?",
                ((p,) for p in positions),
            )

    def results_between(self, low: int, high: int) -> list[tuple[Any, ...]]:
        """The stored results (`RESULT_FIELDS` tuples) for positions in [low, high), in order."""
        with self._guard:
            cursor = self._db.execute(
                f"SELECT {self._selecting(RESULT_FIELDS)} FROM results WHERE position >= ? AND position < ? ORDER BY position",
                (low, high),
            )
            return cursor.fetchall()

    def results_at(self, positions: list[int]) -> list[tuple[Any, ...]]:
        """The stored results (`RESULT_FIELDS` tuples) at these slots, those there are."""
        return self._results_in("position", positions)

    def answers(self, request_hashes: list[str]) -> dict[str, Result]:
        """Successful answers already journaled for any of these requests, by request hash."""
        found: dict[str, Result] = {}
        where = "status = 'ok' AND retry_on_resume = 0 AND request_hash"
        for values in self._results_in(where, request_hashes):
            result = Result.from_tuple(values)
            found.setdefault(result.request_hash or "", result)
        return found

    def _results_in(self, where: str, values: list[Any]) -> list[tuple[Any, ...]]:
        """Results (`RESULT_FIELDS` tuples) where `where` (ending in a column) is one of
        `values`, asked 500 at a time (under SQLite's limit on parameters)."""
        found: list[tuple[Any, ...]] = []
        with self._guard:
            for start in range(0, len(values), 500):
                chunk = values[start : start + 500]
                found += self._db.execute(
                    f"SELECT {self._selecting(RESULT_FIELDS)} FROM results WHERE {where} IN ({', '.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
        return found

    def settled_slots(self, low: int, high: int) -> set[int]:
        """The slots in [low, high) an earlier run settled."""
        with self._guard:
            cursor = self._db.execute(
                "SELECT position FROM results WHERE position >= ? AND position < ? AND retry_on_resume = 0",
                (low, high),
            )
            return {position for (position,) in cursor}

    def done_since(self, since: float) -> int:
        """Results written after Unix time `since`."""
        with self._guard:
            (count,) = self._db.execute(
                "SELECT COUNT(*) FROM results WHERE done_at > ?", (since,)
            ).fetchone()
        return int(count)

    def blocks(self) -> pl.DataFrame:
        """The journal's summary of each block of slots (`digests`; `journal_file`'s triggers);
        none where a journal read without being brought up to date has no blocks, or digests
        of another polars."""
        known = self._digests_known()
        with self._guard:
            rows = []
            if known and columns(self._db, "blocks"):
                rows = self._db.execute(
                    "SELECT block, rows, settled, unknown, low, high FROM blocks WHERE rows > 0"
                ).fetchall()
        schema = dict.fromkeys(("block", "rows", "settled", "unknown", "low", "high"), pl.Int64)
        return pl.DataFrame(rows, schema=schema, orient="row")

    def settled_blocks(self) -> frozenset[int]:
        """The blocks of slots whose every slot an earlier run settled."""
        with self._guard:
            cursor = self._db.execute("SELECT block FROM blocks WHERE settled = ?", (BLOCK_SLOTS,))
            return frozenset(block for (block,) in cursor)

    def _digests_known(self) -> bool:
        """Whether the journal's digests are this polars' (`Journal._check` forgets others)."""
        return self.meta().get("digests") == SCHEME

    @functools.cached_property
    def _stored_columns(self) -> dict[str, bool]:
        return columns(self._db, "results")

    def _selecting(self, names: tuple[str, ...], unknown: tuple[str, ...] = ()) -> str:
        """These result columns for a SELECT, those `unknown` as NULL: one that a journal from
        before it lacks (read without being brought up to date) reads as an upgrade fills it."""
        stored = self._stored_columns
        return ", ".join(
            "NULL" if name in unknown else name if name in stored else AS_ADDED[name]
            for name in names
        )

    def has_results(self) -> bool:
        with self._guard:
            return self._db.execute("SELECT 1 FROM results LIMIT 1").fetchone() is not None

    def identities(self, blocks: list[int] | None = None, *, hashes: bool = True) -> pl.DataFrame:
        """The slot (negative: departed), id, digest, check, whether it is to be sent again and
        (with `hashes`) request hash of the results in these blocks (all: None) and of every
        departed one, for matching them to today's input (`identity.realign`)."""
        every = ("position", "key", "digest", "ident_check", "retry_on_resume", "request_hash")
        names = every[: 5 + hashes]
        # Digests of another polars: only in a journal read, not opened (which forgets them).
        foreign = () if self._digests_known() else ("digest", "ident_check")
        query = f"SELECT {self._selecting(names, unknown=foreign)} FROM results"
        with self._guard:
            rows = results_in_blocks(self._db, query, blocks)
        types = (pl.Int64, pl.String, pl.Int64, pl.Int64, pl.Int64, pl.String)
        values = list(zip(*rows, strict=True)) or [()] * len(names)  # by column: quicker
        return pl.DataFrame(
            dict(zip(names, values, strict=True)), schema=dict(zip(names, types, strict=False))
        )

    def realign(
        self, moves: list[tuple[int, int]], departures: list[tuple[int, int]], per_row: int, *,
        changed: list[int], keep_changed: bool, identified: list[tuple[int | None, int | None, int]],
    ) -> None:  # fmt: skip
        """In one transaction: move results (old slot, new slot); move the results of rows gone
        from the input (slot, variant) to negative slots of their own; mark the `changed`
        slots to be sent again, or (`keep_changed`) stale; and give results at their new slots
        the digest and check (digest, check, slot) these have now."""
        with self._guard, when_full(self.path, JournalError, OPENING_FULL), self._db:
            move_results(
                self._db, moves, departures, per_row, changed=changed, keep_changed=keep_changed,
                identified=identified,
            )  # fmt: skip

    def spend_since(self, since: float) -> list[tuple[float, float]]:
        """(paid at, USD) of the spend paid after Unix time `since` (`journal_totals`)."""
        with self._guard:
            return spend_since(self._db, since)

    def totals(self, below: int | None = None) -> Totals:
        """Counts, tokens and cost over the journal (`journal_totals`)."""
        with self._guard:
            return totals(self._db, below)

    def record_lost(self, attempts: list[tuple[str, int, str]]) -> None:
        """Attempts the server accepted but whose answer never arrived (cost to be reconciled)."""
        if attempts:
            with self._guard, when_full(self.path), self._db:
                self._db.executemany(
                    "INSERT OR IGNORE INTO lost_attempts (generation_id, position, kind) VALUES (?, ?, ?)",
                    attempts,
                )

    def unreconciled(self) -> list[str]:
        with self._guard:
            return [
                g
                for (g,) in self._db.execute(
                    "SELECT generation_id FROM lost_attempts WHERE cost_usd IS NULL"
                )
            ]

    def reconcile(self, costs: dict[str, float]) -> None:
        with self._guard, when_full(self.path), self._db:
            self._db.executemany(
                "UPDATE lost_attempts SET cost_usd = ? WHERE generation_id = ?",
                [(c, g) for g, c in costs.items()],
            )

    # ----------------------------------------------------------------------------- writes

    @property
    def batches(self) -> BatchLog:
        """The record of provider batches (batch mode)."""
        return BatchLog(self._db, self._guard, self.path)

    def write(
        self, results: list[Result], then: Callable[[sqlite3.Connection], None] | None = None
    ) -> list[tuple[Any, ...]]:
        """Commit `results` in one transaction (durable once this returns), with what `then`
        writes in it too; returns them as stored, `RESULT_FIELDS` tuples."""
        if not results and then is None:
            return []
        settings = self._settings
        found = checks(
            [r.position for r in results],
            [r.key if self.keyed else "" for r in results],
            [r.digest for r in results],
        )
        values = [(*r.as_tuple(), settings, c) for r, c in zip(results, found, strict=True)]
        whole = len(values) - len(values) % ROWS_PER_INSERT
        runs = (
            tuple(chain.from_iterable(values[start : start + ROWS_PER_INSERT]))
            for start in range(0, whole, ROWS_PER_INSERT)
        )
        with self._guard, when_full(self.path), self._db:
            self._db.executemany(_INSERT_MANY, runs)
            self._db.executemany(_INSERT, values[whole:])
            if then is not None:
                then(self._db)
        return values


def _recorded_transport(meta: dict[str, Any]) -> dict[str, Any]:
    """How a journal's job was last sent; an older journal kept only its endpoint, among what
    was asked."""
    return meta.get("transport") or {
        "request.base_url": meta.get("config", {}).get("request", {}).get("base_url")
    }
