"""Validate bodies against OpenRouter's own published OpenAPI spec.

The tests read only the subset committed in `tests/spec/` (the schemas they validate against,
copied verbatim; see `tests/spec/README.md` for where it came from and how to refresh it), so
they pass on a bare clone.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_URI = "urn:openrouter-openapi"
SUBSET_PATH = Path(__file__).resolve().parent / "spec" / "openrouter-openapi-subset.json"


def spec_path() -> Path:
    return SUBSET_PATH


@functools.cache
def spec() -> dict[str, Any]:
    with spec_path().open(encoding="utf-8") as f:
        return json.load(f)  # type: ignore[no-any-return]


@functools.cache
def _registry() -> Registry:
    return Registry().with_resource(SPEC_URI, Resource(contents=spec(), specification=DRAFT202012))


def _validate(schema: dict[str, Any], instance: Any) -> None:
    validator = jsonschema.Draft202012Validator(schema, registry=_registry())
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        details = "; ".join(
            f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:200]}"
            for e in errors[:5]
        )
        raise AssertionError(f"does not match OpenRouter's OpenAPI spec: {details}")


def validate_component(name: str, instance: Any) -> None:
    """Validate against `#/components/schemas/<name>`."""
    _validate({"$ref": f"{SPEC_URI}#/components/schemas/{name}"}, instance)


def validate_request(path: str, method: str, instance: Any) -> None:
    """Validate a request body against an operation's documented (inline) body schema."""
    pointer = f"#/paths/{_escape(path)}/{method}/requestBody/content/application~1json/schema"
    _validate({"$ref": SPEC_URI + pointer}, instance)


def validate_response(path: str, method: str, status: int, instance: Any) -> None:
    """Validate against the documented response of an operation for a status code."""
    response = spec()["paths"][path][method]["responses"][str(status)]
    schema = response["content"]["application/json"]["schema"]
    if "$ref" in schema:
        schema = {"$ref": SPEC_URI + schema["$ref"]}
    else:
        schema = {
            "$ref": f"{SPEC_URI}#/paths/{_escape(path)}/{method}/responses/{status}/content/application~1json/schema"
        }
    _validate(schema, instance)


def _escape(path: str) -> str:
    return path.replace("~", "~0").replace("/", "~1")
