"""The committed OpenAPI subset (tests/spec/) is self-contained and matches its refresh script."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.openapi import SUBSET_PATH, spec
from tests.spec import refresh

# The full spec, when a checkout has it at hand (CI sets it): the subset must be what it gives.
FULL_SPEC = os.environ.get("OPENROUTER_OPENAPI_SPEC")


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} points outside the subset"
    node: Any = document
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and token in node, f"{ref} does not resolve in the subset"
        node = node[token]
    return node


def test_every_ref_in_the_subset_resolves_inside_it() -> None:
    subset = spec()
    refs = _refs(subset)
    assert refs
    for ref in set(refs):
        _resolve(subset, ref)


def test_the_subset_holds_its_roots_licence_and_valid_schemas() -> None:
    subset = spec()
    assert subset["info"]["license"]["name"] == "MIT"
    for name in refresh.COMPONENTS:
        assert name in subset["components"]["schemas"]
    for schema in subset["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    for path, method, statuses in refresh.RESPONSES:
        responses = subset["paths"][path][method]["responses"]
        for status in statuses or ():
            assert "schema" in responses[status]["content"]["application/json"]


def test_the_subset_is_closed_and_exactly_what_the_script_writes() -> None:
    """Rebuilding from the subset itself gives the same bytes: nothing is missing (a dangling
    `$ref` raises), nothing unreachable is kept, and the file is in the script's format."""
    text = SUBSET_PATH.read_text(encoding="utf-8")
    assert refresh.render(refresh.build(json.loads(text))) == text


def test_the_subset_matches_the_full_spec_when_one_is_given() -> None:
    if not FULL_SPEC:
        pytest.skip("OPENROUTER_OPENAPI_SPEC names no full spec to compare with")
    assert refresh.render(refresh.build(refresh.load(Path(FULL_SPEC)))) == SUBSET_PATH.read_text(
        encoding="utf-8"
    ), "tests/spec is stale: run python tests/spec/refresh.py PATH/TO/openapi.yaml"
