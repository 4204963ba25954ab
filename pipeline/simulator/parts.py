"""The parts of a simulated answer beyond its text: tool calls for a request that offers tools,
and token log-probabilities for one that asks for them. Both are deterministic in the request.

Log-probabilities follow one rule a test can check: a token is `\\s*[\\w:]+` or one other
character with its leading spaces; ordinary tokens get a probability of 0.90-0.99, and where
the answer writes one of the values of an `enum` in the response schema (a label), its first
token gets a probability p of 0.50-0.99 and the rest of the label's tokens certainty, with the
other values' first tokens as the alternatives (`top_logprobs`) sharing 1 - p between them.
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
from typing import Any

from pipeline.simulator.content import Answer, count_tokens, instance_for

_TOKEN = re.compile(r"\s*[\w:]+|\s*[^\w\s]")


def tool_answer(
    body: dict[str, Any], digest: str, rng: random.Random, thought: Answer
) -> Answer | None:
    """A call of the first function offered (or the one `tool_choice` names), arguments that
    satisfy its parameters, after the reasoning of `thought`; None when no tool is offered or
    `tool_choice` is "none"."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    functions = [
        t["function"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        functions = [f for f in functions if f.get("name") == wanted] or functions
    if not functions:
        return None
    function = functions[0]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    arguments = json.dumps(instance_for(parameters, rng), ensure_ascii=False)
    call = {
        "id": f"call_{digest}",
        "type": "function",
        "function": {"name": function.get("name", ""), "arguments": arguments},
    }
    tokens = thought.reasoning_tokens + count_tokens(arguments) + 4
    return Answer(
        "", thought.reasoning, tokens, thought.reasoning_tokens, "tool_calls", "tool_calls",
        tool_calls=[call],
    )  # fmt: skip


def logprobs(content: str, schema: dict[str, Any] | None, digest: str, top: int) -> dict[str, Any]:
    """`choices[].logprobs` for `content` (OAS `ChatTokenLogprobs`), `top` alternatives a token."""
    rng = random.Random(f"logprobs|{digest}")
    labels = _enum_values(schema)
    tokens = _TOKEN.findall(content)
    label_span = _label_span(content, labels)
    entries, offset = [], 0
    for token in tokens:
        start, offset = offset, offset + len(token)
        alternatives: list[tuple[str, float]] = []
        if label_span is not None and start <= label_span[0] < offset:
            p = 0.5 + 0.49 * rng.random()
            chosen = content[label_span[0] : label_span[1]]
            others = [label for label in labels if label != chosen]
            share = (1 - p) / len(others) if others else 0.0
            alternatives = [(_first_token(label), math.log(share)) for label in others if share]
            value = math.log(p)
        elif label_span is not None and label_span[0] < offset and start < label_span[1]:
            value = 0.0  # the rest of a label, once its first token is written
        else:
            value = math.log(0.9 + 0.09 * rng.random())
        entries.append(_entry(token, value, [(token, value), *alternatives][: max(top, 0)]))
    return {"content": entries, "refusal": None}


def _entry(token: str, value: float, top: list[tuple[str, float]]) -> dict[str, Any]:
    return {
        "token": token, "logprob": value, "bytes": list(token.encode()),
        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top],
    }  # fmt: skip


def _enum_values(schema: Any) -> list[str]:
    """The string values of the enums among a schema's top-level properties."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        return []
    values: list[str] = []
    for sub in properties.values():
        if isinstance(sub, dict) and isinstance(sub.get("enum"), list):
            values += [v for v in sub["enum"] if isinstance(v, str) and v]
    return values


def _label_span(content: str, labels: list[str]) -> tuple[int, int] | None:
    """Where the answer writes a label as a JSON string value."""
    for label in sorted(labels, key=len, reverse=True):
        at = content.rfind(json.dumps(label, ensure_ascii=False))
        if at >= 0:
            return at + 1, at + 1 + len(label)
    return None


def _first_token(text: str) -> str:
    found = _TOKEN.findall(text)
    return found[0] if found else text


# ------------------------------------------------------------------------- content parts

_DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,([A-Za-z0-9+/=\s]*)\Z", re.S)


def attached(messages: list[Any]) -> tuple[int, int]:
    """The images and files among the messages' content parts, each checked as the spec
    describes them (OAS `ChatContentItems`); a malformed part raises ValueError saying which."""
    images = files = 0
    for m, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for p, part in enumerate(content):
            where = f"messages[{m}].content[{p}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"{where}.text: expected a string")
            elif kind == "image_url":
                url = (part.get("image_url") or {}).get("url")
                _check_url(url, f"{where}.image_url.url", image=True)
                images += 1
            elif kind == "file":
                file = part.get("file") or {}
                if not isinstance(file, dict) or not (file.get("file_data") or file.get("file_id")):
                    raise ValueError(f"{where}.file: expected file_data or file_id")
                if file.get("file_data") is not None:
                    _check_url(file["file_data"], f"{where}.file.file_data", image=False)
                files += 1
            elif kind not in ("input_audio", "video_url", "input_video"):
                raise ValueError(f"{where}.type: unknown content part type {kind!r}")
    return images, files


def _check_url(url: Any, where: str, *, image: bool) -> None:
    if not isinstance(url, str) or not url:
        raise ValueError(f"{where}: expected a URL or a data URI")
    if url.startswith(("http://", "https://")):
        return
    found = _DATA_URI.match(url)
    if found is None:
        raise ValueError(f"{where}: expected an http(s) URL or a base64 data URI")
    media, data = found.groups()
    if image and not media.startswith("image/"):
        raise ValueError(f"{where}: {media} is not an image type")
    try:
        base64.b64decode(data, validate=False)
    except ValueError:
        raise ValueError(f"{where}: the data URI is not valid base64") from None
