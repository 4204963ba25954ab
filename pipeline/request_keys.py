"""Checking the request keys beyond the basics: `request.tools` and `request.tool_choice` (the
function definitions a request offers the model, as OpenAI's chat API spells them, each
function's parameters a JSON Schema), and what an embeddings job cannot combine with."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.answers import load_schema
from pipeline.errors import ConfigError
from pipeline.options import describe

if TYPE_CHECKING:
    from pipeline.config import PromptConfig, RequestConfig

_CHOICES = ("none", "auto", "required")
ENDPOINTS = ("chat", "embeddings")


def tools(value: Any) -> tuple[Mapping[str, Any], ...] | None:
    """`request.tools`: a list of `{type = "function", function = {name, parameters}}` tables
    (or the path of a JSON file holding the list)."""
    key = describe("request.tools")
    if value is None:
        return None
    if isinstance(value, str):
        value = _json_file(value, key)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key} must be a non-empty list of tool tables, got {value!r}")
    names = set()
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
        ):
            raise ConfigError(
                f'{key}[{i}] must be {{type = "function", function = {{name = ..., parameters = {{...}}}}}}'
            )
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{key}[{i}].function.name must name the function")
        if name in names:
            raise ConfigError(f"{key} names function {name!r} twice")
        names.add(name)
        if "parameters" in function:
            try:
                load_schema(function["parameters"], f"{key}[{i}].function.parameters")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    return tuple(value)


def tool_choice(value: Any, offered: tuple[Mapping[str, Any], ...] | None) -> Any:
    """`request.tool_choice`: "none", "auto", "required", or the name of an offered function
    (sent as `{type = "function", function = {name}}`)."""
    if value is None:
        return None
    key = describe("request.tool_choice")
    if offered is None:
        raise ConfigError(f"{key} needs {describe('request.tools')} to choose from")
    if value in _CHOICES:
        return value
    names = [tool["function"]["name"] for tool in offered]
    if isinstance(value, str) and value in names:
        return {"type": "function", "function": {"name": value}}
    raise ConfigError(
        f"{key} must be one of {', '.join(_CHOICES)} or a function name ({', '.join(names)}), got {value!r}"
    )


def single_function(offered: tuple[Mapping[str, Any], ...] | None) -> Mapping[str, Any] | None:
    """The one function offered, when there is exactly one and it has parameters: its
    arguments become typed columns, as a response schema's answer does."""
    if offered is None or len(offered) != 1:
        return None
    function = offered[0]["function"]
    return function if isinstance(function.get("parameters"), dict) else None


def _json_file(path: str, key: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{key}: {path} is not JSON: {exc}") from None


def check_embeddings(request: RequestConfig, prompt: PromptConfig) -> None:
    """An embeddings job sends each row's text and nothing else: refuse what would be lost."""
    if request.endpoint != "embeddings":
        if request.dimensions is not None:
            raise ConfigError(
                f'{describe("request.dimensions")} sizes embeddings; set {describe("request.endpoint")} = "embeddings"'
            )
        return
    unsendable = (
        ("request.labels", request.labels), ("request.response_schema", request.response_schema),
        ("request.response_format", request.response_format), ("request.tools", request.tools),
        ("request.logprobs", request.logprobs), ("request.reasoning", request.reasoning),
        ("request.max_tokens", request.max_tokens), ("prompt.system", prompt.system),
        ("prompt.messages_column", prompt.messages_column), ("prompt.images", prompt.images),
        ("prompt.files", prompt.files), ("request.temperature", request.temperature),
        ("request.top_p", request.top_p), ("request.seed", request.seed),
        ("request.stop", request.stop),
    )  # fmt: skip
    for key, value in unsendable:
        if value is not None:
            raise ConfigError(
                f'{describe(key)} has no place in an embeddings job (request.endpoint = "embeddings"), which sends each row\'s text alone'
            )
    if request.n > 1 or request.mode != "sync":
        key = "request.n" if request.n > 1 else "request.mode"
        raise ConfigError(
            f'{describe(key)} has no place in an embeddings job (request.endpoint = "embeddings")'
        )
