"""Pure parts of the simulator: schema-valid answers, token counts, fault specs and latency."""

from __future__ import annotations

import random
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.simulator import Fault, FaultSpecError, Latency, parse_rates
from pipeline.simulator.content import instance_for
from pipeline.simulator.faults import FaultPicker, parse_schedule

scalar = st.one_of(
    st.just({"type": "string"}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.integers(-50, 50).map(lambda lo: {"type": "integer", "minimum": lo, "maximum": lo + 10}),
    st.floats(-5, 5).map(lambda lo: {"type": "number", "minimum": lo, "maximum": lo + 1}),
    st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=4, unique=True).map(
        lambda e: {"type": "string", "enum": e}
    ),
    st.integers(1, 9).map(lambda n: {"type": "string", "minLength": n, "maxLength": n + 5}),
    st.just({"type": ["string", "null"]}),
)


def containers(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    props = st.dictionaries(
        st.text("abcdefgh_", min_size=1, max_size=6), children, min_size=1, max_size=4
    )
    return st.one_of(
        props.map(
            lambda p: {
                "type": "object",
                "properties": p,
                "required": sorted(p),
                "additionalProperties": False,
            }
        ),
        st.tuples(children, st.integers(0, 3)).map(
            lambda t: {"type": "array", "items": t[0], "minItems": t[1]}
        ),
        st.lists(children, min_size=1, max_size=3).map(lambda xs: {"anyOf": xs}),
    )


schemas = st.recursive(scalar, containers, max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(schema=schemas, seed=st.integers(0, 2**32))
def test_generated_instance_satisfies_any_schema(schema: dict[str, Any], seed: int) -> None:
    jsonschema.validate(instance_for(schema, random.Random(seed)), schema)


def test_refs_to_defs_are_followed() -> None:
    schema = {
        "type": "object",
        "properties": {"item": {"$ref": "#/$defs/item"}},
        "required": ["item"],
        "$defs": {
            "item": {
                "type": "object",
                "properties": {"sku": {"type": "integer", "minimum": 1}},
                "required": ["sku"],
            }
        },
    }
    jsonschema.validate(instance_for(schema, random.Random(1)), schema)


def test_fault_specs_parse_and_reject_nonsense() -> None:
    assert parse_rates("429=0.05, 500=0.03") == {Fault.HTTP_429: 0.05, Fault.HTTP_500: 0.03}
    assert parse_schedule("429*2,mid_body") == [(Fault.HTTP_429, 2), (Fault.MID_BODY, 1)]
    with pytest.raises(FaultSpecError, match="unknown fault 'nope'"):
        parse_rates("nope=0.1")
    with pytest.raises(FaultSpecError, match="between 0 and 1"):
        parse_rates("500=2")
    with pytest.raises(FaultSpecError, match="more than 1"):
        parse_rates("500=0.6,502=0.6")


def test_fault_picker_keeps_a_schedule_per_request() -> None:
    picker = FaultPicker({}, seed=0)
    row7 = [picker.pick(None, "429*2", "row7") for _ in range(3)]
    row8 = [picker.pick(None, "500", "row8") for _ in range(2)]
    assert row7 == [Fault.HTTP_429, Fault.HTTP_429, None]
    assert row8 == [Fault.HTTP_500, None]
    assert picker.pick("reset", "500", "row8") is Fault.RESET  # the header wins


def test_latency_models() -> None:
    rng = random.Random(3)
    assert Latency.parse("0.25").sample(rng, 100) == 0.25
    assert Latency.parse("tokens:0.1:0.01").sample(rng, 50) == pytest.approx(0.6)
    tail = [Latency.parse("lognormal:0.2:0.8").sample(rng, 1) for _ in range(2000)]
    assert 0.15 < sorted(tail)[1000] < 0.25  # the median is the median
    assert max(tail) > 0.8  # and some requests take several times as long
    for bad in ("fast", "lognormal:1", "-1"):
        with pytest.raises(FaultSpecError):
            Latency.parse(bad)
