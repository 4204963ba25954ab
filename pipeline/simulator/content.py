"""Deterministic, verifiable answers: the same request always gets the same completion.

Every answer starts with `sim:<digest>`, where the digest is `messages_digest(messages)`, so a
test (or a curious user) can tell which prompt a completion answers. The words that follow come
from an RNG seeded by the model, messages, seed and temperature.

Token counts use one cheap rule everywhere: a text costs `ceil(len/4)` tokens, each message adds
4 for its framing, and each generated word is one token.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

_WORDS = [
    "the",
    "product",
    "arrived",
    "quickly",
    "and",
    "works",
    "as",
    "described",
    "overall",
    "quality",
    "is",
    "good",
    "but",
    "packaging",
    "could",
    "be",
    "better",
    "battery",
    "lasts",
    "long",
    "screen",
    "bright",
    "sound",
    "clear",
    "price",
    "fair",
    "support",
    "helpful",
    "setup",
    "easy",
    "instructions",
    "unclear",
    "would",
    "buy",
    "again",
    "recommend",
    "friends",
]

MESSAGE_OVERHEAD_TOKENS = 4


def messages_digest(messages: Any) -> str:
    """A short stable fingerprint of a message list; answers quote it as `sim:<digest>`."""
    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def count_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def message_text(message: Any) -> str:
    """The text of one chat message; content may be a string or a list of parts."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def prompt_tokens(messages: list[Any]) -> int:
    return sum(count_tokens(message_text(m)) + MESSAGE_OVERHEAD_TOKENS for m in messages) + 2


@dataclass(frozen=True, slots=True)
class Answer:
    """What the simulated model produced, before any fault or wire format is applied."""

    content: str
    reasoning: str | None
    completion_tokens: int  # includes reasoning tokens, as OpenRouter bills them
    reasoning_tokens: int
    finish_reason: str | None  # None: the provider gave no reason (an empty answer)
    native_finish_reason: str | None
    tool_calls: list[dict[str, Any]] | None = None  # `parts.tool_answer`
    logprobs: dict[str, Any] | None = None  # `parts.logprobs`


def compose(
    *,
    digest: str,
    rng: random.Random,
    words: int,
    max_tokens: int | None,
    stop: list[str],
    reasoning_tokens: int,
    native_length_reason: str,
    response_schema: dict[str, Any] | None,
    json_object: bool,
) -> Answer:
    """Build the answer; `max_tokens` caps reasoning plus content, and `stop` cuts the content."""
    budget = max_tokens if max_tokens is not None else 1 << 30
    reasoning_used = min(reasoning_tokens, budget)
    reasoning = None
    if reasoning_tokens:
        reasoning = " ".join(
            ["Thinking", f"sim:{digest}", *rng.choices(_WORDS, k=max(reasoning_used - 2, 0))]
        )
    budget -= reasoning_used

    if response_schema is not None or json_object:
        # Structured answers are all or nothing: JSON cut at max_tokens would be a lie either way.
        value = (
            instance_for(response_schema, rng)
            if response_schema is not None
            else {"answer": f"sim:{digest}"}
        )
        text = json.dumps(value, ensure_ascii=False)
        used = count_tokens(text)
        if used <= budget:
            return Answer(text, reasoning, reasoning_used + used, reasoning_used, "stop", "stop")
        return Answer("", reasoning, reasoning_used, reasoning_used, "length", native_length_reason)

    tokens = [f"sim:{digest}", *rng.choices(_WORDS, k=words)]
    finish, native = "stop", "stop"
    if len(tokens) > budget:
        tokens = tokens[:budget]
        finish, native = "length", native_length_reason
    content = " ".join(tokens)
    for sequence in stop:
        if sequence and (cut := content.find(sequence)) >= 0:
            content = content[:cut]
            tokens = content.split()
            finish, native = "stop", "stop"
    return Answer(content, reasoning, reasoning_used + len(tokens), reasoning_used, finish, native)


def instance_for(schema: Any, rng: random.Random, root: Any = None, depth: int = 0) -> Any:
    """A value that satisfies `schema` (the JSON Schema subset structured outputs use)."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > 16:
        return None
    if "$ref" in schema:
        return instance_for(_resolve(root, schema["$ref"]), rng, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return instance_for(schema[key][0], rng, root, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: instance_for(sub, rng, root, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        low = schema.get("minItems", 1)
        high = max(low, min(schema.get("maxItems", 3), low + 2))
        return [
            instance_for(schema.get("items", {}), rng, root, depth + 1)
            for _ in range(rng.randint(low, high))
        ]
    if kind == "integer":
        return rng.randint(int(schema.get("minimum", 0)), int(schema.get("maximum", 100)))
    if kind == "number":
        return round(
            rng.uniform(float(schema.get("minimum", 0)), float(schema.get("maximum", 1))), 4
        )
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    text = " ".join(rng.choices(_WORDS, k=3))
    return text.ljust(schema.get("minLength", 0), "x")[: schema.get("maxLength", len(text) + 64)]


def _resolve(root: Any, ref: str) -> Any:
    node = root
    for part in ref.removeprefix("#/").split("/"):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node
