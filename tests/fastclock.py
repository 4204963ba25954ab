"""An event loop whose clock jumps straight to the next timer when nothing else is ready.

Sleeps, aiolimiter waits and timeouts then take no real time while keeping their order and
their loop-time arithmetic exact. For code without real I/O (sockets would not wake it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class FastForwardLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self._now = 1000.0

    def time(self) -> float:
        return self._now

    def _run_once(self) -> None:
        scheduled = self._scheduled  # type: ignore[attr-defined]
        if not self._ready and scheduled:  # type: ignore[attr-defined]
            # One microsecond past the timer, as a real clock would be: aiolimiter re-arms a
            # timer at "now + 1e-16" after float rounding, which an exact jump never passes.
            self._now = max(self._now, scheduled[0]._when) + 1e-6
        super()._run_once()  # type: ignore[misc]


def run_fast(coroutine: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=FastForwardLoop) as runner:
        return runner.run(coroutine)
