"""What an answer must look like, and the typed columns a valid one becomes.

A job may ask for structured output (`request.response_schema`, any JSON Schema) or for one of
a fixed set of labels (`request.labels`, which builds an enum schema and an instruction). Either
way the schema is sent as `response_format`, but providers may ignore it, so every answer is
checked here: `AnswerSpec.check` turns the answer text into canonical JSON (stored in the
journal) or says what is wrong with it (`attempt.py` asks again). At the end `AnswerSpec.columns`
turns the stored JSON into Arrow columns whose types come from the schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import pyarrow as pa

LABEL = "label"
SCHEMA_NAME = "answer"
MAX_REF_DEPTH = 32
_LABEL_JUNK = " \t\r\n\"'`.,;:!*"  # around a bare label: "Positive." / **positive** / 'neutral'


@dataclass(frozen=True)
class AnswerSpec:
    schema: Mapping[str, Any]
    labels: tuple[str, ...] = ()
    # The function whose call's arguments are the answer (a single-function `request.tools`),
    # instead of the message's text; no `response_format` is sent then.
    tool: str | None = None

    @classmethod
    def for_labels(cls, labels: Sequence[str]) -> AnswerSpec:
        schema = {
            "type": "object",
            "properties": {LABEL: {"type": "string", "enum": list(labels)}},
            "required": [LABEL],
            "additionalProperties": False,
        }
        return cls(schema, tuple(labels))

    @classmethod
    def for_tool(cls, function: Mapping[str, Any]) -> AnswerSpec:
        return cls(function["parameters"], tool=function["name"])

    @property
    def response_format(self) -> dict[str, Any]:
        return {
            "type": "json_schema",
            "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": dict(self.schema)},
        }

    @property
    def instruction(self) -> str | None:
        """Told to the model in the system prompt, for providers that ignore `response_format`."""
        if not self.labels:
            return None
        return (
            f"Answer with exactly one of these labels: {', '.join(self.labels)}. "
            f'Reply with JSON only, like {{"{LABEL}": "{self.labels[0]}"}}.'
        )

    # ------------------------------------------------------------------------- checking

    def check(self, content: str | None) -> tuple[str | None, str | None]:
        """(canonical JSON of the answer, None) if it is valid, else (None, what is wrong)."""
        if self.labels:
            label = self.label_of(content)
            if label is None:
                shown = (content or "").strip()[:80]
                return None, f"the answer {shown!r} is none of the labels {', '.join(self.labels)}"
            return json.dumps({LABEL: label}, ensure_ascii=False), None
        try:
            value = json.loads(content or "")
        except ValueError as exc:
            return None, f"the answer is not JSON ({exc})"
        from jsonschema.exceptions import best_match

        problem = best_match(self._validator.iter_errors(value))
        if problem is not None:
            where = "/".join(str(p) for p in problem.absolute_path) or "the answer"
            return None, f"the answer does not match the schema at {where}: {problem.message}"
        return json.dumps(value, ensure_ascii=False, sort_keys=True), None

    def label_of(self, content: str | None) -> str | None:
        """The label an answer names, compared without case and surrounding whitespace or
        punctuation; a JSON object's `label`, a JSON string or the bare text all count."""
        text = (content or "").strip()
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        if isinstance(value, dict):
            value = value.get(LABEL)
        if not isinstance(value, str):
            return None
        wanted = re.sub(r"\s+", " ", value.strip(_LABEL_JUNK)).casefold()
        return next((label for label in self.labels if label.casefold() == wanted), None)

    @cached_property
    def _validator(self) -> Any:
        from jsonschema import validators

        return validators.validator_for(self.schema)(self.schema)

    # -------------------------------------------------------------------------- columns

    def column_types(self) -> dict[str, pa.DataType]:
        """One column per top-level property, typed from its schema."""
        root = _deref(self.schema, self.schema)
        properties = root.get("properties") if isinstance(root, dict) else None
        if not isinstance(properties, dict) or not properties:
            return {SCHEMA_NAME: arrow_type(self.schema, self.schema)}
        return {name: arrow_type(sub, self.schema) for name, sub in properties.items()}

    def columns(self, stored: Sequence[str | None]) -> list[pa.Array]:
        """The typed columns of stored answers (canonical JSON, or None for a failed row)."""
        types = self.column_types()
        values = [json.loads(text) if text is not None else None for text in stored]
        if list(types) == [SCHEMA_NAME]:
            return [_array(list(values), self.schema, self.schema, types[SCHEMA_NAME])]
        root = _deref(self.schema, self.schema)
        arrays = []
        for name, kind in types.items():
            sub = root["properties"][name]
            column = [v.get(name) if isinstance(v, dict) else None for v in values]
            arrays.append(_array(column, sub, self.schema, kind))
        return arrays


def load_schema(value: Any, what: str) -> Mapping[str, Any]:
    """Check a JSON Schema is one (`what` names where it came from, for the message)."""
    from jsonschema import exceptions, validators

    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON Schema object")
    try:
        validators.validator_for(value).check_schema(value)
    except exceptions.SchemaError as exc:
        raise ValueError(f"{what} is not a valid JSON Schema: {exc.message}") from None
    return value


# ------------------------------------------------------------------------ schema -> Arrow


def arrow_type(schema: Any, root: Any, depth: int = 0) -> pa.DataType:
    """The Arrow type of values that satisfy `schema`. Enums are strings, arrays lists, objects
    with properties structs; what has no single type (anyOf, free-form objects) is JSON text."""
    schema = _deref(schema, root, depth)
    if not isinstance(schema, dict) or depth > MAX_REF_DEPTH:
        return pa.string()
    if "enum" in schema or "const" in schema:
        choices = schema.get("enum", [schema.get("const")])
        kinds = {_json_kind(c) for c in choices if c is not None}
        return _SCALARS.get(kinds.pop(), pa.string()) if len(kinds) == 1 else pa.string()
    kind = _single_type(schema)
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array" and isinstance(schema.get("items"), dict):
        return pa.list_(arrow_type(schema["items"], root, depth + 1))
    if kind == "object" and isinstance(schema.get("properties"), dict) and schema["properties"]:
        return pa.struct(
            [
                pa.field(name, arrow_type(sub, root, depth + 1))
                for name, sub in schema["properties"].items()
            ]
        )
    return pa.string()  # JSON text


def _array(values: list[Any], schema: Any, root: Any, kind: pa.DataType) -> pa.Array:
    return pa.array([_fit(v, schema, root, kind) for v in values], type=kind)


def _fit(value: Any, schema: Any, root: Any, kind: pa.DataType, depth: int = 0) -> Any:
    """`value` shaped for `kind`: what became JSON text is encoded, numbers widened."""
    if value is None:
        return None
    schema = _deref(schema, root, depth)
    if pa.types.is_struct(kind):
        if not isinstance(value, dict):
            return None
        properties = schema.get("properties", {})
        return {
            field.name: _fit(
                value.get(field.name), properties.get(field.name), root, field.type, depth + 1
            )
            for field in kind
        }
    if pa.types.is_list(kind):
        items = schema.get("items") if isinstance(schema, dict) else None
        return [_fit(v, items, root, kind.value_type, depth + 1) for v in value]
    if pa.types.is_string(kind):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if pa.types.is_floating(kind):
        return float(value)
    return value


_SCALARS = {
    "string": pa.string(),
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
}


def _single_type(schema: Mapping[str, Any]) -> str | None:
    kind = schema.get("type")
    if kind is None and "properties" in schema:
        return "object"
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        return kinds[0] if len(kinds) == 1 else None
    return kind if isinstance(kind, str) else None


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string" if isinstance(value, str) else "json"


def _deref(schema: Any, root: Any, depth: int = 0) -> Any:
    """Follow local `$ref`s (`#/$defs/...`)."""
    while isinstance(schema, dict) and "$ref" in schema and depth <= MAX_REF_DEPTH:
        node = root
        for part in str(schema["$ref"]).removeprefix("#").strip("/").split("/"):
            node = node.get(part, {}) if isinstance(node, dict) and part else node
        schema, depth = node, depth + 1
    return schema
