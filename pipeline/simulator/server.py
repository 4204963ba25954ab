"""The OpenRouter simulator: an `aiohttp.web` app that a client reaches by changing its base URL.

Routes (under `/api/v1` like OpenRouter): `POST /chat/completions`, `GET /models`,
`GET /models/user`, `GET /models/{author}/{slug}/endpoints`, `GET /key` (and the older
`/auth/key`), `GET /credits`, `GET /generation?id=`, and the Batch API (`batch_routes.py`, also
under `/api/beta`). Test hooks live under `/_sim/`: `stats`, `ledger`, `requests`, `batches`
(GET) and `config`, `reset`, `clock` (POST). Any other route, or a method a route does
not take, gets OpenRouter's JSON error body (404, 405), never aiohttp's plain text.

This module holds the state every route shares and answers the small GETs; a chat request's
own path runs through `chat.py`, then `replies.py`; what the model routes list is `listing.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter, defaultdict, deque
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from pipeline.simulator import batch_routes, bodies, chat, embeddings, listing
from pipeline.simulator.batches import BatchStore
from pipeline.simulator.bodies import Generation
from pipeline.simulator.caching import PromptCache
from pipeline.simulator.catalogue import EMBEDDING_MODELS
from pipeline.simulator.config import SimConfig
from pipeline.simulator.faults import FaultPicker, FaultSpecError
from pipeline.simulator.limits import Limits
from pipeline.simulator.replies import Refusal

API = "/api/v1"


class Simulator:
    """State shared by the handlers: configuration, ledger, counters and rate limits."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.closing = asyncio.Event()
        self.reset()

    def reset(self) -> None:
        """Forget every request: ledger, counters, logs, limits, caches and fault schedules."""
        self.picker = FaultPicker(self.config.fault_rates, self.config.seed)
        self.latency_rng = random.Random(self.config.seed + 1)
        self.ledger: list[Generation] = []  # billed generations, in order
        self.generations: dict[str, Generation] = {}  # every generation, billed or not, by id
        self.key_usage: defaultdict[str, float] = defaultdict(float)
        self.counters: Counter[str] = Counter()
        self.requests_log: deque[tuple[str, str, Any, bytes]] = deque(
            maxlen=self.config.request_log_size
        )
        self.arrivals: deque[float] = deque()
        self.first_request_at: float | None = None
        self.last_request_at: float | None = None
        self.max_per_second = 0  # in any sliding second
        self.by_clock_second: Counter[int] = Counter()  # arrivals in each whole second of the clock
        self.refused_by_second: Counter[int] = Counter()  # 429s answered, likewise
        self.in_flight = 0
        self.max_in_flight = 0
        self.limits = Limits()
        self.prompt_cache = PromptCache(self.config.cache_ttl)  # every provider's prefixes
        self.clock_offset = 0.0  # seconds `POST /_sim/clock` moved the batch clock on
        self.batches = BatchStore(self)

    def now(self) -> float:
        """The Batch API's clock: the wall clock, moved on by `POST /_sim/clock`."""
        return time.time() + self.clock_offset

    def reconfigure(self, changes: dict[str, Any]) -> None:
        """Apply `changes` (as `SimConfig.updated` takes them) to the running simulator."""
        self.config = self.config.updated(changes)
        if "fault_rates" in changes or "seed" in changes:
            self.picker = FaultPicker(self.config.fault_rates, self.config.seed)
        if "batch_create_faults" in changes:
            self.batches.create_faults = list(self.config.batch_create_faults)
        if "batch_get_faults" in changes:
            self.batches.get_faults = list(self.config.batch_get_faults)

    # ----------------------------------------------------------------------------- bookkeeping

    def authenticate(self, request: web.Request) -> str:
        """The request's bearer key, or `Refusal` 401 if it has none or an unknown one."""
        header = request.headers.get("Authorization", "")
        key = header.removeprefix("Bearer").strip() if header.startswith("Bearer") else ""
        if not key:
            raise Refusal(401, bodies.error(401, "No auth credentials found"))
        cfg = self.config
        if (cfg.api_keys is not None and key not in cfg.api_keys) or key in cfg.disabled_keys:
            raise Refusal(401, bodies.error(401, "User not found."))
        return key

    def log_request(self, request: web.Request, raw: bytes) -> None:
        """Keep a request for `/_sim/requests`."""
        # Kept raw and formatted only when read: logging must stay cheap on the hot path.
        self.requests_log.append((request.method, request.path, request.headers, raw))

    def record(self, gen: Generation, key: str, *, billed: bool) -> None:
        """Keep a generation for `/generation`; if `billed`, charge it to `key` in the ledger."""
        self.generations[gen.id] = gen
        if billed:
            self.ledger.append(gen)
            self.key_usage[key] += gen.cost

    async def hold(self) -> None:
        """Keep a connection open until `hang_seconds` pass or the server shuts down."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), self.config.hang_seconds)

    def stats(self) -> dict[str, Any]:
        """The body of `/_sim/stats`: what the server saw and billed."""
        return {
            "requests": self.counters["requests"],
            "by_status": {
                k.removeprefix("status:"): v
                for k, v in self.counters.items()
                if k.startswith("status:")
            },
            "faults": {
                k.removeprefix("fault:"): v
                for k, v in self.counters.items()
                if k.startswith("fault:")
            },
            "billed": len(self.ledger),
            "billed_cost": sum(g.cost for g in self.ledger),
            "billed_tokens": sum(g.prompt_tokens + g.completion_tokens for g in self.ledger),
            "max_requests_per_second": self.max_per_second,
            "max_requests_per_clock_second": max(self.by_clock_second.values(), default=0),
            "max_429s_per_clock_second": max(self.refused_by_second.values(), default=0),
            "max_in_flight": self.max_in_flight,
            "retry_after_violations": self.limits.retry_after_violations,
            "first_request_at": self.first_request_at,
            "last_request_at": self.last_request_at,
        }

    def logged_requests(self) -> list[dict[str, Any]]:
        """The recent requests, with the key replaced by its label: this log must not hold a usable key."""
        entries = []
        for method, path, raw_headers, raw in self.requests_log:
            headers = dict(raw_headers)
            if "Authorization" in headers:
                token = headers["Authorization"].removeprefix("Bearer ").strip()
                headers["Authorization"] = f"Bearer {bodies.key_label(token)}"
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
            entries.append({"method": method, "path": path, "headers": headers, "body": body})
        return entries

    def _arrive(self, now: float) -> None:
        self.counters["requests"] += 1
        if self.first_request_at is None:
            self.first_request_at = now
        self.last_request_at = now
        arrivals = self.arrivals
        arrivals.append(now)
        while arrivals[0] <= now - 1.0:
            arrivals.popleft()
        self.max_per_second = max(self.max_per_second, len(arrivals))
        self.by_clock_second[int(now)] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    # ---------------------------------------------------------------------------------- routes

    def app(self) -> web.Application:
        """The aiohttp application serving every route."""
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_json_errors])
        app.router.add_post(f"{API}/chat/completions", self.chat_completions)
        app.router.add_post(f"{API}/embeddings", self.embeddings)
        app.router.add_get(f"{API}/embeddings/models", self.embedding_models)
        app.router.add_get(f"{API}/models", self.models)
        app.router.add_get(f"{API}/models/user", self.models_user)
        app.router.add_get(f"{API}/models/{{author}}/{{slug}}/endpoints", self.endpoints)
        app.router.add_get(f"{API}/key", self.key)
        app.router.add_get(f"{API}/auth/key", self.key)
        app.router.add_get(f"{API}/credits", self.credits)
        app.router.add_get(f"{API}/generation", self.generation)
        app.router.add_get("/_sim/stats", self.sim_stats)
        app.router.add_get("/_sim/ledger", self.sim_ledger)
        app.router.add_get("/_sim/requests", self.sim_requests)
        app.router.add_post("/_sim/config", self.sim_config)
        app.router.add_post("/_sim/reset", self.sim_reset)
        app.router.add_post("/_sim/clock", self.sim_clock)
        app.router.add_get("/_sim/batches", self.sim_batches)
        batch_routes.add_routes(app, self)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        self.closing.set()

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /chat/completions`, counted in the arrival and concurrency figures."""
        now = time.time()
        self._arrive(now)
        try:
            response = await chat.complete(self, request, now)
        finally:
            self.in_flight -= 1
        return response

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """`POST /embeddings`, counted as chat requests are."""
        now = time.time()
        self._arrive(now)
        try:
            response = await embeddings.embed(self, request, now)
        finally:
            self.in_flight -= 1
        return response

    async def embedding_models(self, request: web.Request) -> web.Response:
        """`GET /embeddings/models`: the embeddings models, listed as `/models` lists models."""
        return web.json_response(listing.models(self.config, request.query, EMBEDDING_MODELS))

    async def models(self, request: web.Request) -> web.Response:
        """`GET /models[?supported_parameters=a,b]`: the catalogue (`listing.models`); no key needed."""
        return web.json_response(listing.models(self.config, request.query))

    async def models_user(self, request: web.Request) -> web.Response:
        """`GET /models/user`: the models the key's provider preferences allow, which with no
        preferences to keep is every one; unlike `/models`, it needs a key."""
        try:
            self.authenticate(request)
        except Refusal as refusal:
            return refusal.response
        return web.json_response(listing.models(self.config))

    async def endpoints(self, request: web.Request) -> web.Response:
        """`GET /models/{author}/{slug}/endpoints`: the model's one endpoint, or 404."""
        model_id = f"{request.match_info['author']}/{request.match_info['slug']}"
        body = listing.endpoints(self.config, model_id)
        if body is None:
            return web.json_response(bodies.error(404, f"Model {model_id} not found"), status=404)
        return web.json_response(body)

    async def key(self, request: web.Request) -> web.Response:
        """`GET /key`: the key's label, limit and usage."""
        try:
            key = self.authenticate(request)
        except Refusal as refusal:
            return refusal.response
        info = bodies.key_info(
            bodies.key_label(key), self.config.credit_limit, self.key_usage[key],
            management=key in self.config.management_keys,
        )  # fmt: skip
        return web.json_response({"data": info})

    async def credits(self, request: web.Request) -> web.Response:
        """`GET /credits`: total credit and usage, for management keys only."""
        try:
            key = self.authenticate(request)
        except Refusal as refusal:
            return refusal.response
        if key not in self.config.management_keys:
            return web.json_response(
                bodies.error(403, "Only management keys can fetch credits"), status=403
            )
        total = self.config.credit_limit if self.config.credit_limit is not None else 100.0
        return web.json_response(
            {"data": {"total_credits": total, "total_usage": sum(self.key_usage.values())}}
        )

    async def generation(self, request: web.Request) -> web.Response:
        """`GET /generation?id=`: 404 until `ready_after` seconds after it finished."""
        try:
            self.authenticate(request)
        except Refusal as refusal:
            return refusal.response
        gen = self.generations.get(request.query.get("id", ""))
        finished = gen.created + gen.latency_ms / 1000 if gen else 0.0
        if gen is None or self.now() < finished + self.config.ready_after:
            return web.json_response(bodies.error(404, "Generation not found"), status=404)
        return web.json_response({"data": gen.record()})

    async def sim_stats(self, request: web.Request) -> web.Response:
        """`GET /_sim/stats`."""
        return web.json_response(self.stats())

    async def sim_ledger(self, request: web.Request) -> web.Response:
        """`GET /_sim/ledger?offset=`: billed generations from `offset` on, and the total."""
        offset = int(request.query.get("offset", 0))
        entries = [g.ledger_entry() for g in self.ledger[offset:]]
        return web.json_response({"data": entries, "total_cost": sum(g.cost for g in self.ledger)})

    async def sim_requests(self, request: web.Request) -> web.Response:
        """`GET /_sim/requests`: the request log, keys replaced by labels."""
        return web.json_response({"data": self.logged_requests()})

    async def sim_config(self, request: web.Request) -> web.Response:
        """`POST /_sim/config`: change settings while running; 400 names a bad one."""
        try:
            self.reconfigure(await request.json())
        except (FaultSpecError, TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True})

    async def sim_clock(self, request: web.Request) -> web.Response:
        """`POST /_sim/clock` `{"advance": seconds}`: move the Batch API's clock on."""
        try:
            advance = float((await request.json()).get("advance", 0))
        except (ValueError, TypeError, AttributeError):
            return web.json_response({"error": 'expected {"advance": seconds}'}, status=400)
        self.clock_offset += advance
        return web.json_response({"now": self.now()})

    async def sim_batches(self, request: web.Request) -> web.Response:
        """`GET /_sim/batches`: every batch of every key, with its lines' custom ids."""
        now = self.now()
        data = []
        for batch in self.batches.batches.values():
            status, _ = self.batches.state(batch, now)
            data.append({
                "id": batch.id, "key": bodies.key_label(batch.key), "model": batch.model.id,
                "status": status, "created_at": batch.created, "deleted": batch.deleted,
                "custom_ids": [custom_id for custom_id, _ in batch.lines],
                "cost": (batch.usage or {}).get("cost"),
            })  # fmt: skip
        return web.json_response({"data": data})

    async def sim_reset(self, request: web.Request) -> web.Response:
        """`POST /_sim/reset`: see `reset`."""
        self.reset()
        return web.json_response({"ok": True})


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (no such route, a method the route does not take, a body too
    large) as OpenRouter's JSON error body instead of a text/plain "404: Not Found"."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.reason
        if isinstance(exc, web.HTTPNotFound):
            message = f"No route for {request.method} {request.path}"
        elif isinstance(exc, web.HTTPMethodNotAllowed):
            message = f"Method {request.method} is not allowed on {request.path}; allowed: {', '.join(sorted(exc.allowed_methods))}"
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
        return web.json_response(
            bodies.error(exc.status, message), status=exc.status, headers=headers
        )


_BODY_HEADERS = {"content-type", "content-length"}
