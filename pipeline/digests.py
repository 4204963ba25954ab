"""Digests that let an incremental run tell what is new without rebuilding every request.

A row's `digest` hashes what its request is made of that varies by row (the rendered prompt
or messages, the model and parameter columns): the same digest, the same request, given the
job's settings (which the journal's fingerprint compares). Each result's `ident_check` hashes
its slot, its id (with an id column) and its digest; the journal keeps, for every block of
`BLOCK_SLOTS` slots, how many results it holds and the sums of their checks (`journal_file`'s
triggers). A block of today's input whose sums and count equal the journal's holds exactly the
answers it held, each at its own row: only the other blocks are compared row by row.

Both hashes are polars' own, vectorised; polars does not promise them across versions, so the
journal names the version (`SCHEME`) and a journal of another drops its digests and is matched
the slow way once (by request hash), then gets today's.
"""

from __future__ import annotations

import polars as pl

from pipeline.journal_file import BLOCK_SLOTS

SCHEME = f"polars {pl.__version__}, scheme 1"
_SEED = 0x5EED


def digest_of(parts: list[pl.Expr]) -> pl.Expr:
    """A row's digest (a non-negative 63-bit integer) from the expressions its request varies by."""
    return (pl.struct(parts).hash(_SEED) // 2).cast(pl.Int64)


def check_of(slot: pl.Expr, ident: pl.Expr, digest: pl.Expr) -> pl.Expr:
    """A result's `ident_check` (62 bits, so its two 31-bit halves sum without overflow)."""
    parts = pl.struct(slot.alias("s"), ident.alias("i"), digest.alias("d"))
    return (parts.hash(_SEED) // 4).cast(pl.Int64)


def checks(slots: list[int], idents: list[str], digests: list[int | None]) -> list[int | None]:
    """`check_of` for these results (None where the digest is unknown)."""
    frame = pl.DataFrame(
        {"s": slots, "i": idents, "d": digests},
        schema={"s": pl.Int64, "i": pl.String, "d": pl.Int64},
    )
    found = frame.select(
        pl.when(pl.col("d").is_not_null()).then(check_of(pl.col("s"), pl.col("i"), pl.col("d")))
    )
    return found.to_series().to_list()


def block_sums(frame: pl.DataFrame) -> pl.DataFrame:
    """Per block of `frame`'s `slot`s: the count and the two sums of `check`, as the journal's
    `blocks` table keeps them."""
    return frame.group_by(block=pl.col("slot") // BLOCK_SLOTS).agg(
        rows=pl.len(),
        low=(pl.col("check") % (1 << 31)).sum(),
        high=(pl.col("check") // (1 << 31)).sum(),
    )
