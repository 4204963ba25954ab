"""How the simulator behaves: latency, faults, limits, keys and credit."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.simulator.faults import Fault, FaultSpecError, parse_fault, parse_rates


@dataclass(frozen=True, slots=True)
class Latency:
    """Time from request to answer.

    `fixed`: always `seconds`. `lognormal`: median `seconds`, spread `sigma`, so a few requests
    take several times the median (the long tail real providers have). `tokens`: `seconds` to
    the first token plus `per_token` for each output token.
    """

    kind: Literal["fixed", "lognormal", "tokens"] = "fixed"
    seconds: float = 0.0
    sigma: float = 0.0
    per_token: float = 0.0

    def sample(self, rng: random.Random, completion_tokens: int) -> float:
        if self.kind == "lognormal":
            return self.seconds * math.exp(rng.gauss(0.0, self.sigma)) if self.seconds > 0 else 0.0
        if self.kind == "tokens":
            return self.seconds + self.per_token * completion_tokens
        return self.seconds

    @classmethod
    def parse(cls, spec: str) -> Latency:
        """`0.2`, `fixed:0.2`, `lognormal:0.2:0.5` (median, sigma) or `tokens:0.3:0.01`."""
        kind, _, rest = spec.partition(":") if ":" in spec else ("fixed", "", spec)
        try:
            numbers = [float(x) for x in rest.split(":")]
        except ValueError:
            raise FaultSpecError(
                f"latency {spec!r}: expected numbers, e.g. 0.2 or lognormal:0.2:0.5"
            ) from None
        if any(n < 0 for n in numbers):
            raise FaultSpecError(f"latency {spec!r}: values must not be negative")
        if kind == "fixed" and len(numbers) == 1:
            return cls("fixed", numbers[0])
        if kind == "lognormal" and len(numbers) == 2:
            return cls("lognormal", numbers[0], sigma=numbers[1])
        if kind == "tokens" and len(numbers) == 2:
            return cls("tokens", numbers[0], per_token=numbers[1])
        raise FaultSpecError(
            f"latency {spec!r}: use SECONDS, fixed:SECONDS, lognormal:MEDIAN:SIGMA or tokens:FIRST:PER_TOKEN"
        )


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything that shapes the simulator's answers; every field has a harmless default."""

    latency: Latency = Latency()
    # Probability of each fault per request, drawn from an RNG seeded with `seed`.
    fault_rates: Mapping[Fault, float] = field(default_factory=dict)
    seed: int = 0
    # Server-side limit: at most `rate_limit` requests per `rate_window` seconds, else 429.
    rate_limit: float | None = None
    rate_window: float = 1.0
    # Seconds an injected 429/503 asks the client to wait (its Retry-After); it refuses only
    # that request, like an upstream provider's.
    retry_after: float = 1.0
    # After a `rate_limit` 429, refuse (and count in `retry_after_violations`) whatever the key
    # sends before its Retry-After elapses.
    enforce_retry_after: bool = True
    # None: any non-empty bearer key is accepted. Otherwise only these.
    api_keys: frozenset[str] | None = None
    disabled_keys: frozenset[str] = frozenset()
    management_keys: frozenset[str] = frozenset()
    # Per-key credit limit in USD; once spent, requests get 402.
    credit_limit: float | None = None
    # `/generation?id=` answers 404 until this many seconds after the generation finished.
    ready_after: float = 1.0
    # Models whose providers are all down (502): exercises the `models` fallback list.
    down_models: frozenset[str] = frozenset()
    # Prompts containing any of these get 403 moderation.
    flagged_terms: tuple[str, ...] = ()
    # Words in each plain-text answer; None picks 8-31 per request from its digest.
    completion_words: int | None = None
    # While a slow non-streaming answer is generated, send "\n" this often (OpenRouter's keep-alive).
    keepalive_interval: float | None = None
    # How long `hang` and `stall` faults hold the connection (the server's shutdown ends them early).
    hang_seconds: float = 600.0
    # How long a provider keeps a prompt prefix cached after its last use (`caching.py`).
    cache_ttl: float = 300.0
    free_requests_per_minute: int = 20
    free_requests_per_day: int = 50
    request_log_size: int = 10_000
    # Answer like a plain OpenAI-compatible server: `usage` without `cost` or `cost_details`.
    omit_cost: bool = False
    # List every model in `/models` with the price "-1" (unknown, as OpenRouter lists its
    # routers): with `omit_cost`, nothing tells a client what an answer cost.
    omit_prices: bool = False
    # Honour `n` (several choices in one answer) and list it among every model's supported
    # parameters, as OpenAI-compatible servers such as vLLM do. OpenRouter does neither: its
    # chat API has no `n`, so by default the simulator ignores it like any unknown parameter.
    native_n: bool = False
    # List less in `/models`, as some endpoints do (OpenRouter's spec allows null for both):
    # every model's `top_provider.max_completion_tokens`, or its `context_length` and
    # `top_provider.context_length`, as null. Only the listing changes: requests are still
    # checked against the real context length.
    omit_max_completion: bool = False
    omit_context_length: bool = False
    # Refuse (400) any chat body field OpenAI's API does not know, as strict OpenAI-compatible
    # servers do: OpenRouter's own fields (`provider`, `models`, `reasoning`...) included.
    strict_openai: bool = False

    # The Batch API (`batches.py`). Seconds on the simulator's clock (`POST /_sim/clock` moves
    # it on) a batch spends validating, then in progress (its lines finish evenly, in order),
    # then finalizing (0: the state is never shown) before it completes.
    batch_validating_s: float = 0.5
    batch_in_progress_s: float = 2.0
    batch_finalizing_s: float = 0.0
    # Of the model's price, what a batch line costs (its `:batch` endpoint's price).
    batch_discount: float = 0.5
    # Listed with a `:batch` endpoint, yet refused at submit ("does not have a :batch endpoint").
    batch_refused_models: frozenset[str] = frozenset()
    # At this age a batch stops: expired (finished lines returned, if `batch_expired_results`)
    # or cancelled by the provider; unfinished lines become error rows.
    batch_expire_after_s: float | None = None
    batch_expired_results: bool = True
    batch_cancel_after_s: float | None = None
    # GET answers 404 for a batch younger than this; the list leaves out those younger than
    # `batch_list_lag` (OpenRouter caches list responses for ~10 s).
    batch_visible_after_s: float = 0.0
    batch_list_lag_s: float = 0.0
    # GETs of a completed batch that still answer `results: null` (settlement pending).
    batch_settlement_polls: int = 0
    # GET of a completed batch answers 402, results withheld, while this is set.
    batch_payment_required: bool = False
    # One entry used up per create / per GET of a batch or the list: "ok", "429", "500", "502",
    # or, for creates only, "drop" (the batch is created, the connection reset before the 202)
    # and "accepted_500" (created, then a 500).
    batch_create_faults: tuple[str, ...] = ()
    batch_get_faults: tuple[str, ...] = ()
    batch_max_lines: int = 50_000
    batch_max_bytes: int = 200 * 1024 * 1024
    batch_shuffle: bool = True  # results in an order of their own: join on custom_id
    batch_line_cost: bool = False  # each line's `usage.cost` (not in the SDK's schema)
    batch_results_route: bool = False  # `GET /batches/{id}/results` (paged), newest docs only

    def updated(self, changes: Mapping[str, Any]) -> SimConfig:
        """A copy with `changes` applied; JSON-friendly values (lists, strings) are converted."""
        names = {f.name for f in dataclasses.fields(self)}
        converted: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in names:
                raise FaultSpecError(
                    f"unknown simulator setting {name!r}; valid: {', '.join(sorted(names))}"
                )
            if name == "latency" and isinstance(value, str | int | float):
                value = Latency.parse(str(value))
            elif name == "fault_rates":
                value = (
                    parse_rates(value)
                    if isinstance(value, str)
                    else {parse_fault(k): float(v) for k, v in value.items()}
                )
            elif (name in ("api_keys",) and value is not None) or name in (
                "disabled_keys",
                "management_keys",
                "down_models",
                "batch_refused_models",
            ):
                value = frozenset(value)
            elif name in ("flagged_terms", "batch_create_faults", "batch_get_faults"):
                value = tuple(value)
            converted[name] = value
        return dataclasses.replace(self, **converted)
