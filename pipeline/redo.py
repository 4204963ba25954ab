"""`--redo SELECTOR` / `--redo-where EXPR`: which rows done before a run sends again, under the
run's settings, while every other row keeps its answer.

The rows chosen are marked `retry_on_resume` in the journal ("send again"), so the feed treats
them as not done and a run that stops before sending them sends them next time; the answer
each replaces stays in the job's spend (the journal's `keep_replaced_spend`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.records import RESULT_COLUMNS, RESULT_TYPES

if TYPE_CHECKING:
    import polars as pl

    from pipeline.journal import Journal

SELECTORS = "failed, length, invalid, error_type=KIND"


class BadSelector(ValueError):
    """A selector or expression that cannot choose rows; the message says what is valid."""


@dataclass(frozen=True)
class Redo:
    """The rows to send again: those any selector or the expression matches."""

    selectors: tuple[str, ...] = ()
    where: str | None = None

    def expression(self) -> pl.Expr:
        import polars as pl

        chosen = [_selector(s) for s in self.selectors]
        if self.where is not None:
            chosen.append(_where(self.where))
        return pl.any_horizontal(chosen) if chosen else pl.lit(False)

    def choose(self, journal: Journal, below: int) -> list[int]:
        """The slots under `below` that the journal holds as settled and this redo picks."""
        import polars as pl

        rows = journal.stored_results(below, ("position", *RESULT_COLUMNS))
        frame = pl.DataFrame(rows, schema=_schema(), orient="row")
        picked = frame.filter(self.expression().fill_null(False))
        return picked["position"].to_list()


def parse_selectors(values: tuple[str, ...]) -> tuple[str, ...]:
    for value in values:
        _selector(value)
    return values


def check_where(text: str) -> str:
    """`text` as a filter over the output's result columns, or a `BadSelector` saying why not."""
    import polars as pl

    empty = pl.DataFrame(schema=_schema())
    try:
        result = empty.select(_where(text))
    except pl.exceptions.ColumnNotFoundError as exc:
        missing = str(exc).splitlines()[0].split('"')[1] if '"' in str(exc) else str(exc)
        raise BadSelector(
            f"no column {missing!r}; the columns are {', '.join(RESULT_COLUMNS)}"
        ) from None
    except pl.exceptions.PolarsError as exc:
        raise BadSelector(f"{str(exc).strip().splitlines()[0]}") from None
    if result.dtypes[0] != pl.Boolean:
        raise BadSelector(
            f"{text!r} is not a condition (it gives {result.dtypes[0]}, not true/false)"
        )
    return text


def _selector(value: str) -> pl.Expr:
    import polars as pl

    name, _, kind = value.partition("=")
    if name == "error_type" and kind:
        return pl.col("error_type") == kind
    found = {
        "failed": pl.col("status") == "error",
        "length": pl.col("finish_reason") == "length",  # cut off by max_tokens
        "invalid": pl.col("error_type") == "invalid_answer",  # outside the labels / schema
    }.get(value)
    if found is None:
        raise BadSelector(f"unknown selector {value!r}; use one of {SELECTORS}")
    return found


def _where(text: str) -> pl.Expr:
    import polars as pl

    try:
        return pl.sql_expr(text)
    except pl.exceptions.PolarsError as exc:
        raise BadSelector(
            f"{text!r} does not parse as a SQL condition ({str(exc).strip().splitlines()[0]}), "
            "e.g. \"cost_usd > 0.01 AND finish_reason = 'length'\""
        ) from None


def _schema() -> dict[str, Any]:
    """The slot and the output's result columns, as polars types."""
    import polars as pl

    kinds = {"string": pl.String, "int64": pl.Int64, "int32": pl.Int32, "float64": pl.Float64}
    return {"position": pl.Int64, **{name: kinds[RESULT_TYPES[name]] for name in RESULT_COLUMNS}}
