"""The journal's sqlite file: its layout, the upgrades that bring an older layout up to date,
and opening it (WAL, the integrity check, a stale index dropped, a full disk named) — what
`journal.Journal` stands on.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import DiskFull, JournalError, PipelineError, disk_full_message, is_disk_full
from pipeline.records import NOT_NULL, RESULT_TYPES
from pipeline.settings import simulated

OPENING_FULL = "; nothing was sent. Free some space and run again"
# The journal sums its results' checks by blocks of this many slots (`digests`).
BLOCK_BITS = 16
BLOCK_SLOTS = 1 << BLOCK_BITS

_SQL_TYPES = {
    "string": "TEXT",
    "int64": "INTEGER",
    "int32": "INTEGER",
    "float64": "REAL",
    "bool": "INTEGER",
    "binary": "BLOB",
}
_COLUMN_TYPES = {
    name: _SQL_TYPES[kind] + (" NOT NULL" if name in NOT_NULL else "")
    for name, kind in RESULT_TYPES.items()
}
_COLUMNS_SQL = ",\n    ".join(f"{name} {kind}" for name, kind in _COLUMN_TYPES.items())
NOW = "((julianday('now') - 2440587.5) * 86400.0)"  # Unix time (older sqlite has no unixepoch)
# Result columns later than the first layout, as an older journal gets them: `settings` is
# filled in by `Journal._check`.
ADDED_COLUMNS = {
    "stale": "INTEGER NOT NULL DEFAULT 0",
    "settings": "TEXT",
    "digest": "INTEGER",
    "ident_check": "INTEGER",
    "cache_write_tokens": "INTEGER",
    "reasoning": "TEXT",
    "tool_calls": "TEXT",
    "label_confidence": "REAL",
    "embedding": "BLOB",
}
AS_ADDED = {name: "0" if "DEFAULT 0" in kind else "NULL" for name, kind in ADDED_COLUMNS.items()}
# When each spend was paid, for max_cost_per_day: an answer's `done_at`, a lost attempt's
# `lost_at` (when it was found lost), a replaced answer's `paid_at` (its own done_at).
_LOST_TABLE = f"""lost_attempts (
    generation_id TEXT PRIMARY KEY, position INTEGER NOT NULL, kind TEXT NOT NULL, cost_usd REAL,
    lost_at REAL NOT NULL DEFAULT {NOW}
)"""
_REPLACED_TABLE = (
    "replaced_answers (position INTEGER NOT NULL, generation_id TEXT, cost_usd REAL, paid_at REAL)"
)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    position INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    {_COLUMNS_SQL},
    -- Unix time: the rate `pipeline status` shows, the spend of the last 24 h.
    done_at REAL NOT NULL DEFAULT {NOW},
    settings TEXT,  -- settings.settings_hash of what was asked; meta `configs` holds each
    ident_check INTEGER  -- digests.check_of its slot, id and digest; summed in `blocks`
);
CREATE INDEX IF NOT EXISTS results_by_request ON results (request_hash) WHERE status = 'ok';
-- Attempts whose answer never arrived although the server had accepted them (it may have billed).
CREATE TABLE IF NOT EXISTS {_LOST_TABLE};
-- Paid answers that a later result for the same slot replaced (a row sent again with
-- --reprocess-changed, a failure that had spent something retried): still the job's spend,
-- unknown (NULL) for an answer that came without a cost. Filled by the trigger below.
CREATE TABLE IF NOT EXISTS {_REPLACED_TABLE};
"""
# Per block of slots (digests.BLOCK_SLOTS, from slot 0): the results there, how many are
# settled (not to be sent again), how many have no check, and the sums of the checks' halves.
# Kept by the triggers below, so an incremental run compares a million rows in a few reads.
_BLOCKS_TABLE = """blocks (
    block INTEGER PRIMARY KEY, rows INTEGER NOT NULL, settled INTEGER NOT NULL,
    unknown INTEGER NOT NULL, low INTEGER NOT NULL, high INTEGER NOT NULL
)"""
_BLOCK_OF = f"{{row}}.position >> {BLOCK_BITS}"
# What each result adds to its block's settled, unknown, low and high.
_COUNTED = (
    "{row}.retry_on_resume = 0",
    "{row}.ident_check IS NULL",
    f"COALESCE({{row}}.ident_check & {(1 << 31) - 1}, 0)",
    "COALESCE({row}.ident_check >> 31, 0)",
)
_PARTS = ", ".join(_COUNTED)
_ADD = f"""INSERT INTO blocks SELECT {_BLOCK_OF}, 1, {_PARTS} WHERE {{row}}.position >= 0
    ON CONFLICT (block) DO UPDATE SET rows = rows + 1, settled = settled + excluded.settled,
    unknown = unknown + excluded.unknown, low = low + excluded.low, high = high + excluded.high;"""
_SUBTRACT = f"""UPDATE blocks SET rows = rows - 1, settled = settled - ({{row}}.retry_on_resume = 0),
    unknown = unknown - ({{row}}.ident_check IS NULL),
    low = low - COALESCE({{row}}.ident_check & {(1 << 31) - 1}, 0),
    high = high - COALESCE({{row}}.ident_check >> 31, 0)
    WHERE block = {_BLOCK_OF} AND {{row}}.position >= 0;"""
_BLOCK_TRIGGERS = f"""
CREATE TRIGGER blocks_insert AFTER INSERT ON results
BEGIN {_ADD.format(row="NEW")} END;
CREATE TRIGGER blocks_delete AFTER DELETE ON results
BEGIN {_SUBTRACT.format(row="OLD")} END;
CREATE TRIGGER blocks_update AFTER UPDATE OF position, retry_on_resume, ident_check ON results
BEGIN {_SUBTRACT.format(row="OLD")} {_ADD.format(row="NEW")} END;
"""
# A journal from before the blocks: they are counted once from its results.
_FILL_BLOCKS = f"""CREATE TABLE {_BLOCKS_TABLE};
INSERT INTO blocks SELECT {_BLOCK_OF.format(row="results")}, COUNT(*),
    {", ".join(f"SUM({part.format(row='results')})" for part in _COUNTED)}
    FROM results WHERE position >= 0 GROUP BY 1;
"""
# Replaced on every open, so a journal made before a change to it gets the current one. It
# fires as INSERT OR REPLACE deletes the old row (needs recursive_triggers).
_TRIGGER = """
CREATE TRIGGER keep_replaced_spend BEFORE DELETE ON results
    WHEN OLD.response_source = 'api' AND (OLD.cost_usd > 0 OR (OLD.status = 'ok' AND OLD.cost_usd IS NULL))
BEGIN
    INSERT INTO replaced_answers VALUES (OLD.position, OLD.generation_id, OLD.cost_usd, OLD.done_at);
END;
"""
# Journals before unknown replaced costs were kept had `cost_usd REAL NOT NULL` there, and
# before max_cost_per_day no payment times beside answers. Such spend is dated by the answer
# now in its slot, which came later (else the upgrade): it counts for longer, never shorter.
_LATER = f"COALESCE((SELECT done_at FROM results WHERE results.position = old.position), {NOW})"
_UPGRADE_REPLACED = f"""
CREATE TABLE {_REPLACED_TABLE.replace("replaced_answers", "replaced_answers_new", 1)};
INSERT INTO replaced_answers_new SELECT position, generation_id, cost_usd, {_LATER} FROM replaced_answers AS old;
DROP TABLE replaced_answers;
ALTER TABLE replaced_answers_new RENAME TO replaced_answers;
"""
_UPGRADE_LOST = f"""
CREATE TABLE {_LOST_TABLE.replace("lost_attempts", "lost_attempts_new", 1)};
INSERT INTO lost_attempts_new SELECT generation_id, position, kind, cost_usd, {_LATER} FROM lost_attempts AS old;
DROP TABLE lost_attempts;
ALTER TABLE lost_attempts_new RENAME TO lost_attempts;
"""


def within(blocks: frozenset[int], low: int, high: int) -> bool:
    """Whether every slot in [low, high) lies in one of these blocks."""
    return all(b in blocks for b in range(low >> BLOCK_BITS, ((high - 1) >> BLOCK_BITS) + 1))


class _Check(threading.Thread):
    """`PRAGMA quick_check` of a journal, read-only, in a thread of its own (sqlite leaves
    the GIL while it reads): on a large journal it takes as long as reading the input."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="journal-check", daemon=True)
        self.path = path
        self.verdict: str | None = None  # "ok", else unknown: the opening checks again

    def run(self) -> None:
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            ) as db:
                db.execute(f"PRAGMA mmap_size = {1 << 40}")  # read in place: a fifth quicker
                (self.verdict,) = db.execute("PRAGMA quick_check(1)").fetchone()
        except (sqlite3.Error, OSError):
            self.verdict = None


_CHECKS: dict[str, _Check] = {}


def precheck(path: Path) -> None:
    """Start checking the journal at `path`, if there is one (and no check of it is under
    way), while the caller does other work (imports, reads the input); the next
    `connect(path)` uses the verdict. The check reads a snapshot: a run that gets the job's
    lock after another run wrote more has a journal whole all the same (sqlite's writes keep
    it so), and a run that does not get the lock uses no verdict."""
    under_way = _CHECKS.get(str(path))
    # One finished but never used (a run that stopped before opening) is of an older journal.
    if (under_way is None or not under_way.is_alive()) and path.is_file():
        check = _CHECKS[str(path)] = _Check(path)
        check.start()


def connect(path: Path) -> sqlite3.Connection:
    """Open and check the journal. A stale WAL index (`-shm`) left by a crash can point past a
    torn WAL; it is only an index, so with the job lock held it is dropped and rebuilt from the
    WAL, whose torn frames fail their checksums and are ignored. Anything else damaged is refused."""
    check = _CHECKS.pop(str(path), None)
    if check is not None:
        check.join()
    try:
        with when_full(path, JournalError, OPENING_FULL):
            return _open_checked(path, checked=check is not None and check.verdict == "ok")
    except sqlite3.DatabaseError as exc:
        failure: sqlite3.DatabaseError = exc
    index = Path(f"{path}-shm")
    if index.exists():
        index.unlink()
        try:
            return _open_checked(path)
        except sqlite3.DatabaseError as exc:
            failure = exc
    detail = (
        str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
    )
    raise JournalError(
        f"journal {path} is damaged ({detail}); move it aside and re-run, or re-run with --restart"
    )


def columns(db: sqlite3.Connection, table: str) -> dict[str, bool]:
    """A table's columns, each with whether it is NOT NULL."""
    info = db.execute(f"PRAGMA table_info({table})").fetchall()
    return {name: bool(not_null) for _, name, _, not_null, *_ in info}


@contextlib.contextmanager
def when_full(path: Path, error: type[PipelineError] = DiskFull, then: str = "") -> Iterator[None]:
    """A write the disk has no room for becomes `error`: mid-run a `DiskFull` that stops the job
    (the commit rolled back, the journal whole; every later commit would fail too); when opening,
    a refusal before anything is sent, never "damaged" (which would suggest --restart)."""
    try:
        yield
    except sqlite3.Error as exc:
        if not is_disk_full(exc):
            raise
        raise error(disk_full_message("journal", path, exc) + then) from None


def _open_checked(path: Path, *, checked: bool = False) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA recursive_triggers=ON")  # REPLACE's deletes fire keep_replaced_spend
        db.executescript(_SCHEMA)
        (verdict,) = ("ok",) if checked else db.execute("PRAGMA quick_check(1)").fetchone()
        if verdict != "ok":
            raise sqlite3.DatabaseError(verdict.replace("\n", "; "))
        # Only a whole journal is brought up to date.
        results = columns(db, "results")
        for name, kind in ADDED_COLUMNS.items():
            if name not in results:
                db.execute(f"ALTER TABLE results ADD COLUMN {name} {kind}")
        replaced = columns(db, "replaced_answers")
        older = replaced.get("cost_usd") or "paid_at" not in replaced
        upgrades = (_UPGRADE_REPLACED if older else "") + (
            "" if "lost_at" in columns(db, "lost_attempts") else _UPGRADE_LOST
        )
        if not columns(db, "blocks"):
            upgrades += _FILL_BLOCKS
        upgrades += (
            "CREATE INDEX IF NOT EXISTS results_stale ON results (position) WHERE stale = 1;"
        )
        triggers = ("keep_replaced_spend", "blocks_insert", "blocks_delete", "blocks_update")
        db.executescript(
            f"BEGIN; {' '.join(f'DROP TRIGGER IF EXISTS {t};' for t in triggers)} {upgrades} "
            f"{_TRIGGER} {_BLOCK_TRIGGERS} COMMIT;"
        )
    except BaseException:
        db.close()
        raise
    db.isolation_level = "DEFERRED"
    return db


def simulated_only(path: Path) -> bool:
    """Whether the journal at `path` holds simulated answers (`--simulate`) only: a journal is
    all one or the other, as a simulated run over real answers is refused."""
    if not path.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT value FROM meta WHERE name = 'config'").fetchone()
    except sqlite3.Error:
        return False  # damaged or not a journal: opening it says so
    return row is not None and simulated(json.loads(row[0]))
