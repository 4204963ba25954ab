"""The batch object decoded with its results converted one at a time: the same value as
`json.loads` (with the array converted), and the same refusals."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.json_stream import loads_with

pytestmark = pytest.mark.timeout(30)

DOCUMENTS: list[Any] = [
    {
        "id": "b1",
        "results": [{"custom_id": "a", "n": 1}, {"custom_id": "b", "n": [1, {"x": None}]}],
    },
    {"results": [], "usage": {"cost": 0.5}},
    {"id": "b2", "results": None, "nested": {"results": [1, 2]}},  # only the top level's
    {"status": "completed"},
    {},
    [1, 2, {"results": [3]}],
    "text",
    {"results": [{"s": 'a "quoted" ] , } string'}, 3.5e-7, True, None], "z": "é☃"},
]


@pytest.mark.parametrize("document", DOCUMENTS)
@pytest.mark.parametrize("indent", [None, 2])
def test_the_value_is_json_loads_with_the_results_converted(
    document: Any, indent: int | None
) -> None:
    raw = json.dumps(document, indent=indent, ensure_ascii=False).encode()
    expected = json.loads(raw)
    if isinstance(expected, dict) and isinstance(expected.get("results"), list):
        expected["results"] = [("seen", item) for item in expected["results"]]
    assert loads_with(raw, "results", lambda item: ("seen", item)) == expected


def test_each_result_is_converted_in_order_as_it_is_read() -> None:
    seen: list[Any] = []
    loads_with(b'{"results": [1, 2, 3], "after": 4}', "results", seen.append)
    assert seen == [1, 2, 3]


@pytest.mark.parametrize(
    "raw",
    [b'{"results": [1, 2', b'{"results": [1,, 2]}', b'{"a": 1} x', b'{"a" 1}', b"", b'{1: 2}',
     b'{"results": [1] "b": 2}', b"\xff"],
)  # fmt: skip
def test_what_json_loads_refuses_is_refused(raw: bytes) -> None:
    # A ValueError (JSONDecodeError, UnicodeDecodeError) is what fetch_json takes for "not JSON".
    for decode in (json.loads, lambda text: loads_with(text, "results", lambda item: item)):
        try:
            decode(raw)
        except ValueError:
            continue
        pytest.fail(f"{raw!r} was decoded")
