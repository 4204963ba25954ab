"""A row's messages: a messages cell read and checked, and what a message's content is estimated
to cost in tokens."""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from pipeline.attachments import IMAGE_TOKENS

_ROLES = {"system", "developer", "user", "assistant", "tool"}


def tokens_of(content: Any) -> int:
    """A cheap estimate: about four characters of text per token, an image or a file at a
    round figure (their bytes are no measure of their tokens)."""
    if isinstance(content, str):
        return (len(content) + 3) // 4
    if isinstance(content, list):
        return sum(_parttokens_of(part) for part in content)
    return (len(json.dumps(content)) + 3) // 4 if content is not None else 0


def _parttokens_of(part: Any) -> int:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return tokens_of(part.get("text"))
    if kind in ("image_url", "file"):
        return IMAGE_TOKENS
    return tokens_of(json.dumps(part))


def parse_messages(value: Any, column: str) -> tuple[list[dict[str, Any]] | None, str | None]:
    """A messages cell: a JSON string, or an already-parsed list of {role, content}."""
    if value is None:
        return None, f"messages column '{column}' is null"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            return None, f"messages column '{column}' is not valid JSON: {exc}"
    if isinstance(value, pl.Series):
        value = value.to_list()
    if not isinstance(value, list) or not value:
        return (
            None,
            f"messages column '{column}' must hold a non-empty JSON list of {{role, content}} objects",
        )
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or message.get("role") not in _ROLES
            or "content" not in message
        ):
            return (
                None,
                f"messages column '{column}': message {i} needs a role ({', '.join(sorted(_ROLES))}) and content",
            )
    return value, None
