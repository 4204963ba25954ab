"""Which fault, if any, the simulator injects into one request.

Three ways to ask for a fault, checked in this order:

1. the `X-Sim-Fault: KIND` request header: that one request gets KIND;
2. a marker anywhere in the messages, `[[sim:KIND*N,KIND...]]`: a schedule for every attempt of
   that request. `[[sim:429*2]]` answers the first two attempts with 429 and the third normally;
   `[[sim:403*]]` (no count) repeats forever;
3. `fault_rates` in the config: each request draws from a seeded RNG.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from enum import StrEnum


class Fault(StrEnum):
    """A fault the simulator can inject; the value is what markers, headers and flags use."""

    HTTP_402 = "402"  # out of credits
    HTTP_403 = "403"  # moderation: the prompt was flagged
    HTTP_408 = "408"
    HTTP_429 = "429"  # an upstream provider's: Retry-After, the provider and its raw error
    HTTP_500 = "500"
    HTTP_502 = "502"
    HTTP_503 = "503"
    HTTP_524 = "524"
    HTTP_529 = "529"
    ERROR_BODY = "error_body"  # 200 whose body is a top-level `error` and no `choices`
    CHOICE_ERROR = "choice_error"  # 200 with choices[0].error, finish_reason "error", partial text
    EMPTY = "empty"  # 200, content "", no completion tokens, finish_reason null, cost 0
    INVALID_JSON = "invalid_json"  # 200 whose body is cut short: not parseable (billed)
    SCHEMA_INVALID = "schema_invalid"  # a well-formed response whose content breaks the schema
    RESET = "reset"  # connection reset before any response
    MID_BODY = "mid_body"  # status, headers and half the body, then the connection drops (billed)
    STALL = "stall"  # status and headers (with X-Generation-Id), then silence (billed)
    HANG = "hang"  # no response at all, longer than any sane client timeout (not billed)


# Faults that happen after the provider generated an answer, so the generation is billed even
# though the client never reads it: the "spend the client cannot see".
BILLED_FAULTS = frozenset({Fault.INVALID_JSON, Fault.MID_BODY, Fault.STALL, Fault.SCHEMA_INVALID})

_MARKER = re.compile(r"\[\[sim:([^\]]*)\]\]")
FOREVER = -1


class FaultSpecError(ValueError):
    """A marker, header or `--fault-rate` value names no known fault."""


def parse_fault(name: str) -> Fault:
    try:
        return Fault(name.strip())
    except ValueError:
        valid = ", ".join(fault.value for fault in Fault)
        raise FaultSpecError(f"unknown fault {name.strip()!r}; valid faults: {valid}") from None


def parse_schedule(spec: str) -> list[tuple[Fault, int]]:
    """`429*2,500` -> [(429, 2), (500, 1)]; a bare `*` repeats forever."""
    schedule = []
    for part in spec.split(","):
        name, star, count = part.partition("*")
        if not star:
            times = 1
        elif not count.strip():
            times = FOREVER
        else:
            times = int(count)
        schedule.append((parse_fault(name), times))
    return schedule


def parse_rates(spec: str) -> dict[Fault, float]:
    """`429=0.05,500=0.03` -> {Fault.HTTP_429: 0.05, Fault.HTTP_500: 0.03}."""
    rates: dict[Fault, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        if not eq:
            raise FaultSpecError(
                f"fault rate {part!r} should look like KIND=PROBABILITY, e.g. 429=0.05"
            )
        probability = float(value)
        if not 0 <= probability <= 1:
            raise FaultSpecError(f"fault rate for {name!r} must be between 0 and 1, got {value}")
        rates[parse_fault(name)] = probability
    if sum(rates.values()) > 1:
        raise FaultSpecError("fault rates add up to more than 1")
    return rates


def find_marker(texts: Iterable[str]) -> str | None:
    for text in texts:
        if "[[sim:" in text and (match := _MARKER.search(text)):
            return match.group(1)
    return None


class FaultPicker:
    """Chooses the fault for each attempt; remembers how often each marked request was seen."""

    def __init__(self, rates: Mapping[Fault, float], seed: int) -> None:
        self._rng = random.Random(seed)
        self._cumulative: list[tuple[float, Fault]] = []
        total = 0.0
        for fault, probability in rates.items():
            total += probability
            self._cumulative.append((total, fault))
        self._attempts: dict[str, int] = {}

    def pick(self, header: str | None, marker: str | None, request_key: str) -> Fault | None:
        if header:
            return parse_fault(header)
        if marker is not None:
            return self._from_schedule(parse_schedule(marker), request_key)
        if self._cumulative:
            draw = self._rng.random()
            for bound, fault in self._cumulative:
                if draw < bound:
                    return fault
        return None

    def _from_schedule(self, schedule: list[tuple[Fault, int]], request_key: str) -> Fault | None:
        attempt = self._attempts.get(request_key, 0)
        self._attempts[request_key] = attempt + 1
        for fault, times in schedule:
            if times == FOREVER or attempt < times:
                return fault
            attempt -= times
        return None
