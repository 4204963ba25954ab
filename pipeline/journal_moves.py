"""How an incremental run's matching (`identity`) reads and rewrites the journal: the results
of some blocks of slots, and moving results between slots in one transaction."""

from __future__ import annotations

import sqlite3
from typing import Any

from pipeline.journal_file import BLOCK_BITS

# A slot no result has: results move by way of these, as slots are unique at every step.
_ASIDE = -(1 << 62)


def results_in_blocks(
    db: sqlite3.Connection, query: str, blocks: list[int] | None
) -> list[tuple[Any, ...]]:
    """What `query` (a SELECT from results) finds in these blocks and among the departed
    results (all results: None)."""
    if blocks is None:
        return db.execute(query).fetchall()
    rows = db.execute(f"{query} WHERE position < 0").fetchall()
    for block in blocks:
        rows += db.execute(
            f"{query} WHERE position >= ? AND position < ?",
            (block << BLOCK_BITS, (block + 1) << BLOCK_BITS),
        ).fetchall()
    return rows


def move_results(
    db: sqlite3.Connection, moves: list[tuple[int, int]], departures: list[tuple[int, int]],
    per_row: int, *, changed: list[int], keep_changed: bool,
    identified: list[tuple[int | None, int | None, int]],
) -> None:  # fmt: skip
    """Inside the caller's transaction: see `Journal.realign`."""
    (lowest,) = db.execute("SELECT MIN(position) FROM results").fetchone()
    group = (-1 - min(lowest or 0, -1)) // per_row + 1  # the next free departed group
    gone = [(old, -1 - ((group + i) * per_row + v)) for i, (old, v) in enumerate(departures)]
    everything = moves + gone
    if everything:
        db.executemany(
            "UPDATE results SET position = ? WHERE position = ?",
            [(_ASIDE - i, old) for i, (old, _) in enumerate(everything)],
        )
        db.executemany(
            "UPDATE results SET position = ? WHERE position = ?",
            [(new, _ASIDE - i) for i, (_, new) in enumerate(everything)],
        )
    db.execute("UPDATE results SET stale = 0 WHERE stale = 1")
    column = "stale" if keep_changed else "retry_on_resume"
    db.executemany(f"UPDATE results SET {column} = 1 WHERE position = ?", [(s,) for s in changed])
    db.executemany("UPDATE results SET digest = ?, ident_check = ? WHERE position = ?", identified)
