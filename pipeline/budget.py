"""The budget: the caps on spend (`[cost]` max_cost, max_cost_per_run, max_cost_per_day), held
together against a worst-case reservation for every request in flight, and the message of
each stop: which cap, its figures, and when a rolling cap frees up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pipeline.errors import JobStopped
from pipeline.options import describe

if TYPE_CHECKING:
    from pipeline.cost_config import CostConfig
    from pipeline.journal import Journal


class BudgetReached(JobStopped):
    """Another request could push spend past a cap; `details` has its figures for the log."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


DAY = 86_400.0  # seconds max_cost_per_day looks back


@dataclass
class Cap:
    """One cap on spend: `earlier` is what it counts from before this run; a rolling cap also
    has that spend's payments, (Unix time, USD) oldest first, which age out of it."""

    key: str  # the config key: cost.max_cost, cost.max_cost_per_run, cost.max_cost_per_day
    limit: float
    earlier: float = 0.0
    paid: list[tuple[float, float]] | None = None  # the rolling cap's; None for the others

    @classmethod
    def for_job(cls, cost: CostConfig, journal: Journal, below: int, now: float) -> list[Cap]:
        """The caps the config sets, each with what the journal says counts against it."""
        caps = []
        if cost.max_cost is not None:
            caps.append(cls("cost.max_cost", cost.max_cost, journal.totals(below).known_spend_usd))
        if cost.max_cost_per_run is not None:
            caps.append(cls("cost.max_cost_per_run", cost.max_cost_per_run))
        if cost.max_cost_per_day is not None:
            paid = journal.spend_since(now - DAY)
            caps.append(
                cls("cost.max_cost_per_day", cost.max_cost_per_day, sum(u for _, u in paid), paid)
            )
        return caps

    def age(self, now: float) -> None:
        """Drop the earlier spend paid more than a day before `now` (a run can outlast a day)."""
        while self.paid and self.paid[0][0] <= now - DAY:
            self.earlier -= self.paid.pop(0)[1]


class Budget:
    """The caps on spend, all at once: what each counts from earlier runs, plus this run's
    spend, plus a worst-case reservation for every request in flight must stay under it.

    A request that does not fit waits while others are in flight (they usually cost far less
    than their worst case, and settling frees the difference); it is refused, and the job
    stops, only when it would not fit even with nothing else in flight. Earlier runs' spend
    ages out of the rolling cap as the run goes on; this run's own stays in it to the end (a
    run of over a day may stop sooner than it had to, never later)."""

    def __init__(self, caps: list[Cap], clock: Callable[[], float] = time.time) -> None:
        self.caps = caps
        self.clock = clock
        self.spent = 0.0  # by this run
        self.reserved = 0.0
        # This run's spend by the minute, (last payment's time, USD): when the rolling cap frees up.
        self._paid: list[tuple[float, float]] = []
        self._held = 0  # reservations not yet settled (a count: float sums drift)
        self._settled = asyncio.Event()

    @property
    def cap(self) -> float:
        """The limit of the cap with the least room left (what the progress line shows)."""
        return min(self.caps, key=self._room).limit

    def fits(self, amount: float) -> bool:
        """Whether `amount` could be reserved this moment (a `reserve` then returns at once)."""
        return not self._full(amount)

    def _full(self, amount: float) -> list[Cap]:
        """The caps without room for `amount` now (earlier spend aged out first)."""
        now = self.clock()
        for cap in self.caps:
            cap.age(now)
        return [cap for cap in self.caps if self._room(cap) < amount]

    def _room(self, cap: Cap) -> float:
        return cap.limit - cap.earlier - self.spent - self.reserved

    async def reserve(self, amount: float, *, wait: bool = True) -> None:
        """Hold `amount` of every cap; when one has no room, wait for requests in flight to
        settle (unless not `wait`: a batch's reservations settle only when it is collected),
        or, with none held, stop (`BudgetReached`)."""
        while full := self._full(amount):
            if not self._held or not wait:
                raise self._reached(min(full, key=self._room), amount, self.clock())
            self._settled.clear()
            await self._settled.wait()
        self.reserved += amount
        self._held += 1

    def settle(self, reserved: float, actual: float | None) -> None:
        """Swap a reservation for what the request really cost (the reservation, if unknown)."""
        cost = reserved if actual is None else actual
        self.reserved -= reserved
        self.spent += cost
        self._held -= 1
        if not self._held:
            self.reserved = 0.0  # what float sums have drifted by
        if cost > 0:
            now = self.clock()
            if self._paid and self._paid[-1][0] >= now // 60 * 60:  # paid in the same minute
                self._paid[-1] = (now, self._paid[-1][1] + cost)
            else:
                self._paid.append((now, cost))
        self._settled.set()

    def _reached(self, cap: Cap, amount: float, now: float) -> BudgetReached:
        """The stop at `cap`: its figures, how to go on, and for the rolling cap when."""
        spent = cap.earlier + self.spent
        counted = {
            "cost.max_cost": "the job has spent",
            "cost.max_cost_per_run": "this run has spent",
            "cost.max_cost_per_day": "the spend of the last 24 h is",
        }[cap.key]
        details: dict[str, Any] = {
            "cap": cap.key, "cap_usd": cap.limit, "spent_usd": spent, "next_request_usd": amount,
        }  # fmt: skip
        figures = (
            f"budget reached: {counted} ${spent:.6f} of {describe(cap.key)} ${cap.limit:.6f}, "
            f"and the next request could cost up to ${amount:.6f}"
        )
        resume = "nothing done so far is paid again."
        if cap.key == "cost.max_cost":
            how = f"Raise {describe(cap.key)} and re-run the same command to continue; {resume}"
        elif cap.key == "cost.max_cost_per_run":
            how = f"The next run may spend as much again (or raise {describe(cap.key)}); {resume}"
        elif (frees := self._frees_at(cap, amount)) is None:
            how = f"That request alone could cost more than the cap: raise {describe(cap.key)}; {resume}"
        else:
            details.update(frees_at=_local_time(frees), frees_at_unix=frees)
            how = (
                f"It frees up at {_local_time(frees)} (in {_duration(frees - now)}), when enough of that "
                f"spend is over 24 h old: re-run then, or raise {describe(cap.key)}; {resume}"
            )
        return BudgetReached(f"{figures}. {how}", details)

    def _frees_at(self, cap: Cap, amount: float) -> float | None:
        """When enough of the last 24 h's spend is older than a day for `amount` to fit (None:
        it never will). This run's spend is the newest."""
        if amount > cap.limit:
            return None
        left, frees = cap.earlier + self.spent, self.clock()
        for paid_at, usd in [*(cap.paid or ()), *self._paid]:
            if left + amount <= cap.limit:
                break
            left, frees = left - usd, paid_at + DAY
        return frees


def _local_time(when: float) -> str:
    return datetime.fromtimestamp(when).astimezone().isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
    minutes = max(int(seconds // 60), 0)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"
