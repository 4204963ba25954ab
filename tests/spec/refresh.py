"""Rebuild `openrouter-openapi-subset.json` from OpenRouter's full OpenAPI spec.

    python tests/spec/refresh.py PATH/TO/openapi.yaml [--output FILE]

Keeps `openapi`, `info` (title, version, license), the responses listed in `RESPONSES`, the
request bodies listed in `REQUEST_BODIES`, the schemas listed in `COMPONENTS`, and every schema
those reach through `$ref`, transitively.
Everything kept is copied verbatim; everything else (examples beside the schemas, other routes,
parameters, security, tags) is dropped. `$ref`s keep their `#/components/schemas/...` shape.
The output is deterministic (sorted keys, fixed indentation), so the same spec always gives the
same bytes and a refresh shows as a readable diff.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

# The roots: what the tests validate against (`validate_component` / `validate_response` in
# tests/openapi.py). Add a root here, rerun the script, and commit the new subset.
COMPONENTS: tuple[str, ...] = ("ChatRequest", "ChatStreamChunk")
# (path, method, statuses); `None` keeps every status the operation documents.
RESPONSES: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    # The error tests pass whatever status (or `error.code`) the simulator sent.
    ("/chat/completions", "post", None),
    ("/models", "get", ("200",)),
    ("/models/user", "get", ("200", "401")),
    ("/models/{author}/{slug}/endpoints", "get", ("200", "404")),
    ("/key", "get", ("200",)),
    ("/credits", "get", ("200",)),
    ("/generation", "get", ("200", "404")),
    ("/embeddings", "post", ("200",)),
    ("/embeddings/models", "get", ("200",)),
)
# Operations whose request body schema is kept too (`validate_request`): those written inline
# under the operation rather than as a component.
REQUEST_BODIES: tuple[tuple[str, str], ...] = (("/embeddings", "post"),)
INFO_KEYS: tuple[str, ...] = ("title", "version", "license")

SCHEMA_REF = "#/components/schemas/"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "openrouter-openapi-subset.json"


def load(path: Path) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open(encoding="utf-8") as f:
        return yaml.load(f, Loader=loader)  # type: ignore[no-any-return]


def _refs(node: Any) -> list[str]:
    """Every `$ref` value inside `node`, in document order."""
    found: list[str] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str):
                found.append(ref)
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))
    return found


def _schema_name(ref: str) -> str:
    if not ref.startswith(SCHEMA_REF):
        raise ValueError(f"unsupported $ref {ref!r}: only {SCHEMA_REF}<name> is handled")
    name = ref[len(SCHEMA_REF) :]
    if "/" in name:  # a pointer into a schema: keep the whole schema it points into
        name = name.split("/", 1)[0]
    return name.replace("~1", "/").replace("~0", "~")


def build(full: dict[str, Any]) -> dict[str, Any]:
    """The subset of `full` that the tests need, as a plain dict."""
    schemas: dict[str, Any] = full["components"]["schemas"]
    paths: dict[str, Any] = {}
    todo: list[str] = list(COMPONENTS)

    for path, method, statuses in RESPONSES:
        documented = full["paths"][path][method]["responses"]
        keep = sorted(documented) if statuses is None else statuses
        responses = {}
        for status in keep:
            response = documented[status]
            schema = response["content"]["application/json"]["schema"]
            responses[status] = {
                "description": response.get("description", ""),
                "content": {"application/json": {"schema": schema}},
            }
            todo.extend(_schema_name(ref) for ref in _refs(schema))
        paths.setdefault(path, {})[method] = {"responses": responses}

    for path, method in REQUEST_BODIES:
        schema = full["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        body = {"content": {"application/json": {"schema": schema}}}
        paths[path][method]["requestBody"] = body
        todo.extend(_schema_name(ref) for ref in _refs(schema))

    kept: dict[str, Any] = {}
    while todo:
        name = todo.pop()
        if name in kept:
            continue
        if name not in schemas:
            raise KeyError(f"#/components/schemas/{name} is referenced but not in the spec")
        kept[name] = schemas[name]
        todo.extend(_schema_name(ref) for ref in _refs(schemas[name]))

    return {
        "openapi": full["openapi"],
        "info": {key: full["info"][key] for key in INFO_KEYS if key in full["info"]},
        "paths": paths,
        "components": {"schemas": kept},
    }


def render(subset: dict[str, Any]) -> str:
    return json.dumps(subset, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("spec", type=Path, help="OpenRouter's full openapi.yaml")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    subset = build(load(args.spec))
    text = render(subset)
    args.output.write_text(text, encoding="utf-8", newline="\n")
    print(
        f"{args.output}: {len(text.encode()):,} bytes, "
        f"{len(subset['components']['schemas'])} schemas",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
