"""Typed getters over a job's merged raw config (TOML and flags): each returns the value, or
None when the key is unset, and raises a `ConfigError` that names the key (and its flag) and
what would be valid."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.options import describe

# Parameters a column may set per row (prompt.param_columns), with their JSON types.
ROW_PARAMS: dict[str, type | tuple[type, ...]] = {
    "temperature": (int, float), "top_p": (int, float), "top_k": int, "max_tokens": int,
    "seed": int, "frequency_penalty": (int, float), "presence_penalty": (int, float),
    "repetition_penalty": (int, float), "min_p": (int, float),
}  # fmt: skip


class RawValues:
    """Typed getters over the merged raw config; each raises a ConfigError naming the key."""

    def __init__(self, raw: dict[str, dict[str, Any]]) -> None:
        self.raw = raw

    def _get(self, key: str) -> Any:
        section, item = key.split(".")
        return self.raw[section].get(item)

    def _fail(self, key: str, expected: str, value: Any) -> ConfigError:
        return ConfigError(f"{describe(key)} must be {expected}, got {value!r}")

    def required(self, key: str) -> str:
        value = self.string(key)
        if value is None:
            raise ConfigError(f"{describe(key)} is required")
        return value

    def string(self, key: str, empty_is_unset: bool = True) -> str | None:
        """A string, or None when unset. For a key where an empty value most likely comes from an
        empty shell variable (`--model "$MODEL"`), `empty_is_unset=False` refuses it rather than
        quietly running with the default."""
        value = self._get(key)
        if value == "" and not empty_is_unset:
            raise self._fail(key, "a non-empty string", value)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise self._fail(key, "a string", value)
        return value

    def choice(self, key: str, options: tuple[str, ...]) -> str | None:
        value = self.string(key)
        if value is not None and value not in options:
            raise self._fail(key, f"one of {', '.join(options)}", value)
        return value

    def number(
        self,
        key: str,
        *,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
    ) -> float | None:
        value = self._get(key)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise self._fail(key, "a number", value) from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, "a number", value)
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            bounds = f"{'>' if low_open else '>='} {low:g}" if low is not None else ""
            if high is not None:
                bounds = f"between {low:g} and {high:g}" if low is not None else f"<= {high:g}"
            raise self._fail(key, f"a number {bounds}", value)
        return float(value)

    def integer(self, key: str, *, low: int | None = None) -> int | None:
        value = self._get(key)
        if value is None:
            return None
        if isinstance(value, str) and value.lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, "a whole number", value)
        if low is not None and value < low:
            raise self._fail(key, f"a whole number >= {low}", value)
        return value

    def table(self, key: str) -> Mapping[str, Any] | None:
        value = self._get(key)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise self._fail(
                    key, "a table (or a JSON object on the command line)", value
                ) from None
        if not isinstance(value, dict):
            raise self._fail(key, "a table", value)
        return value

    def delimiter(self, key: str) -> str | None:
        """One character; `\\t` (as a shell passes it) is a tab."""
        value = self.string(key)
        value = "\t" if value == "\\t" else value
        if value is not None and (len(value) != 1 or value in '"\r\n'):
            raise ConfigError(
                f"{describe(key)} must be one character other than a quote or newline, got {value!r}"
            )
        return value

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self._get(key)
        if value is None:
            return None
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise self._fail(key, "a list of strings", value)
        return tuple(value)

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def auto_or_flag(self, key: str) -> str | None:
        """`"auto"`, true or false, as "auto", "on" or "off"."""
        value = self._get(key)
        if value is None:
            return None
        if value == "auto":
            return "auto"
        if not isinstance(value, bool):
            raise self._fail(key, '"auto", true or false', value)
        return "on" if value else "off"

    def duration(self, key: str) -> float | None:
        """Seconds, from a number or a string like `90`, `45s`, `55m`, `2h`, `1h30m`."""
        value = self._get(key)
        if value is None:
            return None
        if isinstance(value, str):
            parts = re.fullmatch(
                r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*",
                value,
            )
            if parts is None or not any(parts.groups()):
                raise self._fail(key, "a duration like 90s, 55m or 2h", value)
            hours, minutes, seconds = (float(g) if g else 0.0 for g in parts.groups())
            value = hours * 3600 + minutes * 60 + seconds
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self._fail(key, "a duration like 90s, 55m or 2h", value)
        return float(value)

    def labels(self, key: str) -> tuple[str, ...] | None:
        labels = self.strings(key)
        if labels is None:
            return None
        labels = tuple(label.strip() for label in labels)
        if len(labels) < 2 or not all(labels):
            raise self._fail(key, "at least two non-empty labels", self._get(key))
        folded = [label.casefold() for label in labels]
        if len(set(folded)) != len(folded):
            raise self._fail(key, "labels that differ by more than case", self._get(key))
        return labels

    def schema(self, key: str) -> Mapping[str, Any] | None:
        """A JSON Schema: an inline table, or the path of a JSON file holding one."""
        from pipeline.answers import load_schema

        value = self._get(key)
        if value is None:
            return None
        what = describe(key)
        if isinstance(value, str):
            try:
                value = json.loads(Path(value).read_text())
            except OSError as exc:
                raise ConfigError(f"{what}: cannot read {value}: {exc.strerror}") from None
            except ValueError as exc:
                raise ConfigError(f"{what}: {value} is not JSON: {exc}") from None
            what = f"{what} file {self._get(key)}"
        try:
            return load_schema(value, what)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def param_columns(self, key: str) -> Mapping[str, str] | None:
        table = self.table(key)
        if table is None:
            return None
        for param, column in table.items():
            if param not in ROW_PARAMS:
                raise ConfigError(
                    f"{describe(key)}: {param!r} cannot come from a column; choose from {', '.join(ROW_PARAMS)}"
                )
            if not isinstance(column, str) or not column:
                raise self._fail(
                    f"{key}", f"a table of parameter = column name ({param!r})", column
                )
        return table

    def stop(self, key: str) -> tuple[str, ...] | None:
        value = self._get(key)
        stops = (value,) if isinstance(value, str) else self.strings(key)
        if stops is not None and len(stops) > 4:
            raise self._fail(key, "at most 4 stop sequences", value)
        return stops
