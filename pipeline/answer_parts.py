"""The parts of a chat answer beyond its text: the reasoning a reasoning model returns, the tool
calls of a function-calling answer, and the tokens' log-probabilities, with the confidence in a
label they give.

A label's confidence is the probability the model gave to writing that label where it did:
`exp` of the sum of the log-probabilities of the answer's tokens that overlap the label's text
(for `{"label": "very positive"}`, the tokens of `very positive`). It is the model's own
probability of the label given what it wrote before it, so over the set of labels it sums to at
most 1, and a label written as one token reads off that token's probability directly. Where the
tokens do not spell the label (a provider that returns no log-probabilities, or tokens that do
not add up to the text) it is unknown, not guessed.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pyarrow as pa

Logprobs = list[tuple[str, float]]  # (token, log-probability) in answer order


def reasoning(choice: dict[str, Any]) -> str | None:
    """The reasoning text of a choice: `message.reasoning`, else the text parts of
    `message.reasoning_details`."""
    message = choice.get("message")
    if not isinstance(message, dict):
        return None
    text = message.get("reasoning")
    if isinstance(text, str) and text:
        return text
    details = message.get("reasoning_details")
    if isinstance(details, list):
        parts = [d.get("text") for d in details if isinstance(d, dict)]
        joined = "".join(p for p in parts if isinstance(p, str))
        return joined or None
    return None


def tool_calls(choice: dict[str, Any]) -> str | None:
    """The tool calls of a choice as compact JSON text, None when it made none."""
    message = choice.get("message")
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if not isinstance(calls, list) or not calls:
        return None
    return json.dumps(calls, ensure_ascii=False, separators=(",", ":"))


def logprobs(choice: dict[str, Any]) -> Logprobs | None:
    """The answer's tokens with their log-probabilities (`logprobs.content`), None without."""
    found = choice.get("logprobs")
    content = found.get("content") if isinstance(found, dict) else None
    if not isinstance(content, list) or not content:
        return None
    tokens = []
    for entry in content:
        if not isinstance(entry, dict):
            return None
        token, value = entry.get("token"), entry.get("logprob")
        if not isinstance(token, str) or isinstance(value, bool):
            return None
        if not isinstance(value, int | float):
            return None
        tokens.append((token, float(value)))
    return tokens


def label_confidence(tokens: Logprobs | None, label: str | None) -> float | None:
    """The probability of the label's tokens (see the module's docstring); None if unknown."""
    if not tokens or not label:
        return None
    text = "".join(token for token, _ in tokens).casefold()
    start = text.rfind(label.casefold())
    if start < 0:
        return None
    end, offset, total = start + len(label), 0, 0.0
    for token, value in tokens:
        token_end = offset + len(token)
        if token_end > start and offset < end:
            total += value
        offset = token_end
        if offset >= end:
            break
    return min(1.0, math.exp(min(total, 0.0)))


def tool_arguments(calls: str | None, name: str) -> str | None:
    """The arguments (JSON text) of the first call of function `name`, None if there is none."""
    if calls is None:
        return None
    for call in json.loads(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and function.get("name") == name:
            arguments = function.get("arguments")
            if isinstance(arguments, dict):  # some servers send them parsed
                return json.dumps(arguments, ensure_ascii=False)
            return arguments if isinstance(arguments, str) else None
    return None


def embedding_array(stored: list[bytes | None], dimensions: int | None) -> pa.Array:
    """The output column: `list[float32]`, fixed-size when the dimension is known."""
    lengths = [len(v) // 4 if v is not None else 0 for v in stored]
    values = pa.Array.from_buffers(
        pa.float32(), sum(lengths), [None, pa.py_buffer(b"".join(v for v in stored if v))]
    )
    mask = pa.array([v is None for v in stored])
    if dimensions and all(n in (0, dimensions) for n in lengths):
        filled = b"".join(v if v is not None else bytes(4 * dimensions) for v in stored)
        values = pa.Array.from_buffers(
            pa.float32(), dimensions * len(stored), [None, pa.py_buffer(filled)]
        )
        return pa.FixedSizeListArray.from_arrays(values, dimensions, mask=mask)
    offsets = pa.array([0, *_running(lengths)], type=pa.int32())
    return pa.ListArray.from_arrays(offsets, values, mask=mask)


def _running(lengths: list[int]) -> list[int]:
    total, found = 0, []
    for n in lengths:
        total += n
        found.append(total)
    return found
