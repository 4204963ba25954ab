"""An opt-in response cache shared across jobs (`request.cache` / `--cache PATH`).

Keyed by the request hash: the endpoint (the one the job's journal first ran on: the simulator
never shares keys with a real endpoint) plus the canonical request body, so the model, the
messages and every parameter are in the key. An unchanged job run again (or another job asking
the same things) is answered from here: no request, no cost. Several jobs may share one file.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.options import describe
from pipeline.records import RESULT_FIELDS, Result

# What an answer is, not which row had it or how it stands there.
_STORED = tuple(
    f
    for f in RESULT_FIELDS
    # cache_write_tokens: what answering cost the provider's cache, nothing to a reuse.
    if f not in ("position", "key", "request_hash", "stale", "digest", "cache_write_tokens")
)
# Fields stored since the table got its name: added to an older table, so its answers still serve.
_ADDED = ("reasoning", "tool_calls", "label_confidence", "embedding")
_NAMED_BY = " ".join(f for f in _STORED if f not in _ADDED)
# Named for its columns: a cache written by a version that stored other fields is not misread.
_TABLE = "responses_" + hashlib.blake2b(_NAMED_BY.encode(), digest_size=4).hexdigest()


class ResponseCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._guard = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {_TABLE} (request_hash TEXT PRIMARY KEY, {', '.join(_STORED)})"
            )
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({_TABLE})")}
            for name in _ADDED:
                if name not in present:
                    self._db.execute(f"ALTER TABLE {_TABLE} ADD COLUMN {name}")
        except sqlite3.DatabaseError as exc:
            raise ConfigError(
                f"{describe('request.cache')} {path} cannot be used as a response cache: {exc}"
            ) from None

    def lookup(self, request_hashes: list[str]) -> dict[str, Result]:
        found: dict[str, Result] = {}
        with self._guard:
            for start in range(0, len(request_hashes), 500):
                chunk = request_hashes[start : start + 500]
                cursor = self._db.execute(
                    f"SELECT request_hash, {', '.join(_STORED)} FROM {_TABLE} WHERE request_hash IN ({', '.join('?' * len(chunk))})",
                    chunk,
                )
                for request_hash, *values in cursor:
                    found[request_hash] = Result(
                        position=-1,
                        key="",
                        request_hash=request_hash,
                        **dict(zip(_STORED, values, strict=True)),
                    )
        return found

    def store(self, results: list[Result]) -> None:
        if not results:
            return
        rows = [
            (r.request_hash, *(getattr(r, f) for f in _STORED)) for r in results if r.request_hash
        ]
        with self._guard, self._db:
            self._db.executemany(
                f"INSERT OR IGNORE INTO {_TABLE} (request_hash, {', '.join(_STORED)}) VALUES ({', '.join('?' * (len(_STORED) + 1))})",
                rows,
            )

    def close(self) -> None:
        with self._guard:
            self._db.close()
