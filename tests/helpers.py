"""Constants and small helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pipeline.simulator import RunningSimulator

TEST_KEY = "sk-or-v1-test0123456789abcdef0123456789abcdef"

# Tests never wait for real back-off: no Retry-After penalty and /generation ready at once,
# unless a test asks for them.
FAST = {"retry_after": 0.0, "ready_after": 0.0}

SimFactory = Callable[..., Awaitable[RunningSimulator]]


def chat_body(prompt: str = "Label the sentiment: great phone", **params: Any) -> dict[str, Any]:
    return {
        "model": "mistralai/mixtral-8x7b-instruct",
        "messages": [{"role": "user", "content": prompt}],
        **params,
    }
