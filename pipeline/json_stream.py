"""A JSON object decoded with one of its arrays turned into something smaller item by item,
so that a batch's 10,000 results are never all parsed dicts at once: `json.loads` of such a
body would build every line's completion as dicts before the first could be dropped, the
largest transient of a batch run. Standard library only (`JSONDecoder.raw_decode`)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def loads_with(raw: bytes | str, key: str, convert: Callable[[Any], Any]) -> Any:
    """`json.loads(raw)`, except that in a top-level object the array under `key` holds
    `convert(item)` for each item, each item decoded, converted and dropped in turn.
    Raises `ValueError` for what `json.loads` would refuse."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        return _Reader(text).document(key, convert)
    except IndexError:  # the text ended early
        raise ValueError("truncated JSON") from None


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.at = 0

    def document(self, key: str, convert: Callable[[Any], Any]) -> Any:
        self._space()
        value = self._object(key, convert) if self.text[self.at] == "{" else self._value()
        self._space()
        if self.at != len(self.text):
            raise ValueError(f"extra data at character {self.at}")
        return value

    def _object(self, key: str, convert: Callable[[Any], Any]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        self.at += 1
        self._space()
        if self._take("}"):
            return found
        while True:
            self._space()
            name = self._value()
            if not isinstance(name, str):
                raise ValueError(f"an object key that is not a string at character {self.at}")
            self._space()
            self._expect(":")
            self._space()
            if name == key and self.text[self.at] == "[":
                found[name] = self._array(convert)
            else:
                found[name] = self._value()
            self._space()
            if self._take("}"):
                return found
            self._expect(",")

    def _array(self, convert: Callable[[Any], Any]) -> list[Any]:
        items: list[Any] = []
        self.at += 1
        self._space()
        if self._take("]"):
            return items
        while True:
            self._space()
            items.append(convert(self._value()))
            self._space()
            if self._take("]"):
                return items
            self._expect(",")

    def _value(self) -> Any:
        value, self.at = _DECODER.raw_decode(self.text, self.at)
        return value

    def _space(self) -> None:
        match = _SPACE.match(self.text, self.at)
        assert match is not None
        self.at = match.end()

    def _take(self, char: str) -> bool:
        if self.text[self.at] == char:
            self.at += 1
            return True
        return False

    def _expect(self, char: str) -> None:
        if not self._take(char):
            raise ValueError(f"expected {char!r} at character {self.at}")
