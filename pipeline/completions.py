"""A 200 body made into a `Completion`, or into the error it carries: OpenRouter reports some
failures inside a success (a top-level `error` with no `choices`, an empty `choices`,
`choices[0].error` / `finish_reason: "error"`), and bodies from the wild may spell counts as
text or leave anything out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline import answer_parts
from pipeline.errors import Kind, PermanentError, RequestError, RetryableError

RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})


@dataclass(slots=True)
class Completion:
    """The parts of a chat completion a row keeps."""

    content: str | None
    finish_reason: str | None
    model: str | None
    provider: str | None
    generation_id: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    reasoning_tokens: int | None
    cached_tokens: int | None
    cost: float | None
    cache_write_tokens: int | None = None  # where the endpoint reports them
    # (content, finish_reason) of every choice, the first included: a request with `n` has
    # several; usage and cost above cover them all.
    choices: list[tuple[str | None, str | None]] = field(default_factory=list)
    # Of the first choice, when present (`answer_parts`): the reasoning text, the tool calls
    # as JSON text, and the answer's tokens with their log-probabilities.
    reasoning: str | None = None
    tool_calls: str | None = None
    logprobs: list[tuple[str, float]] | None = None


def parse_completion(data: dict[str, Any], generation_id: str | None) -> Completion:
    """The completion in a 200 body, or the error it carries (`RequestError`, `JobStopped`)."""
    error = data.get("error")
    if isinstance(error, dict) and not data.get("choices"):
        code = error_code(error, 200)
        raise error_class(code)(
            Kind.ERROR_BODY,
            f"HTTP 200 carrying error {code}: {error_message(error)}",
            status=code,
            generation_id=generation_id,
        )
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise RetryableError(
            Kind.NO_CHOICES, "HTTP 200 without any choice", status=200, generation_id=generation_id
        )
    answers = []
    for choice in map(as_dict, choices):
        finish = choice.get("finish_reason")
        if choice.get("error") or finish == "error":
            detail = as_dict(choice.get("error"))
            raise RetryableError(
                Kind.CHOICE_ERROR,
                f"the provider failed mid-answer: {error_message(detail) or 'finish_reason error'}",
                status=200,
                generation_id=data.get("id") or generation_id,
            )
        content = as_dict(choice.get("message")).get("content")
        if content is not None and not isinstance(content, str):
            content = json.dumps(content)
        answers.append((content, _text(finish)))
    content, finish = answers[0]
    usage = as_dict(data.get("usage"))
    completion_tokens = usage.get("completion_tokens")
    if not content and finish is None and not completion_tokens:
        # A cold start: nothing generated and (by zero-completion insurance) nothing charged.
        raise RetryableError(
            Kind.EMPTY,
            "empty answer with no finish reason (provider cold start?)",
            status=200,
            generation_id=data.get("id") or generation_id,
        )
    prompt_details = as_dict(usage.get("prompt_tokens_details"))
    completion_details = as_dict(usage.get("completion_tokens_details"))
    cost = usage.get("cost")
    model, provider, answer_id = data.get("model"), data.get("provider"), data.get("id")
    counts: tuple[Any, ...] = (
        usage.get("prompt_tokens"), completion_tokens, usage.get("total_tokens"),
        completion_details.get("reasoning_tokens"), prompt_details.get("cached_tokens"),
        prompt_details.get("cache_write_tokens"),
    )  # fmt: skip
    # These go to the journal and to typed output columns as they are. The usual body passes
    # one test in C; from a server in the wild, each is made a count or text, or unknown.
    usual = _COUNT_TYPES.issuperset(map(type, counts)) and _TEXT_TYPES.issuperset(
        map(type, (model, provider, answer_id))
    )
    if not usual:
        counts = tuple(map(_count, counts))
        model, provider, answer_id = _text(model), _text(provider), _text(answer_id)
    prompt_tokens, completion_tokens, total_tokens, reasoning_tokens, cached_tokens, written = (
        counts
    )
    completion = Completion(
        content=content,
        finish_reason=finish,
        model=model,
        provider=provider,
        generation_id=answer_id or generation_id,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=total_tokens,
        reasoning_tokens=reasoning_tokens,
        cached_tokens=cached_tokens,
        cache_write_tokens=written,
        cost=float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None,
        choices=answers,
    )
    # Most answers have none of these parts: three lookups tell, before any parsing.
    first = as_dict(choices[0])
    message = as_dict(first.get("message"))
    if message.get("reasoning") or message.get("reasoning_details") or message.get("tool_calls"):
        completion.reasoning = answer_parts.reasoning(first)
        completion.tool_calls = answer_parts.tool_calls(first)
    if first.get("logprobs"):
        completion.logprobs = answer_parts.logprobs(first)
    return completion


def parse_usage(data: dict[str, Any], generation_id: str | None) -> Completion:
    """The model, id, tokens and cost of an answer without text (an embeddings answer)."""
    usage = as_dict(data.get("usage"))
    cost = usage.get("cost")
    return Completion(
        content=None, finish_reason=None, model=_text(data.get("model")),
        provider=_text(data.get("provider")), generation_id=_text(data.get("id")) or generation_id,
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")) or 0,
        total_tokens=_count(usage.get("total_tokens")), reasoning_tokens=None,
        cached_tokens=_count(as_dict(usage.get("prompt_tokens_details")).get("cached_tokens")),
        cost=float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None,
    )  # fmt: skip


def error_class(code: int) -> type[RequestError]:
    return RetryableError if code in RETRYABLE_STATUSES or code >= 500 else PermanentError


def error_code(error: dict[str, Any], default: int) -> int:
    for candidate in (error.get("code"), error.get("http_status")):
        if isinstance(candidate, int):
            return candidate
        if isinstance(candidate, str) and candidate.isdigit():
            return int(candidate)
    return default


def error_message(error: dict[str, Any] | None) -> str:
    if not error:
        return ""
    message = str(error.get("message") or "")
    metadata = as_dict(error.get("metadata"))
    provider = metadata.get("provider_name")
    return f"{message} ({provider})" if provider and provider not in message else message


def as_dict(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one: bodies from the wild may omit anything."""
    return value if isinstance(value, dict) else {}


_COUNT_TYPES = frozenset({int, type(None)})
_TEXT_TYPES = frozenset({str, type(None)})


def _count(value: Any) -> int | None:
    """A token count as an int, from a body that may spell it `12.0` or `"12"`; else unknown."""
    if type(value) is int:
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
