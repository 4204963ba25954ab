"""The Batch API's routes, served under both `/api/v1/batches` and `/api/beta/batches` as
OpenRouter's edge does: create (202), get, list, delete, and the paged results of the newest
documentation (behind `batch_results_route`). There is no cancel route. What a batch does over
time is `batches.py`'s; this module checks requests and shapes answers.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pipeline.simulator import bodies
from pipeline.simulator.batches import FINAL, Batch
from pipeline.simulator.catalogue import MODELS_BY_ID
from pipeline.simulator.replies import Refusal, reset_connection

if TYPE_CHECKING:
    from pipeline.simulator.server import Simulator

PREFIXES = ("/api/v1", "/api/beta")
ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/embeddings")
_ANTHROPIC_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_STATUSES = ("validating", "in_progress", "completed", "failed", "expired", "cancelled")
_ORDER = "endpoint and model are required and must appear before requests in the request body"


def add_routes(app: web.Application, sim: Simulator) -> None:
    routes = BatchRoutes(sim)
    for prefix in PREFIXES:
        app.router.add_post(f"{prefix}/batches", routes.create)
        app.router.add_get(f"{prefix}/batches", routes.list)
        app.router.add_get(f"{prefix}/batches/{{id}}", routes.get)
        app.router.add_delete(f"{prefix}/batches/{{id}}", routes.delete)
        app.router.add_get(f"{prefix}/batches/{{id}}/results", routes.results)


class BatchRoutes:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    async def create(self, request: web.Request) -> web.StreamResponse:
        """`POST /batches`: checks in OpenRouter's order, then 202 with the new batch."""
        sim = self.sim
        raw = await request.read()
        sim.log_request(request, raw)
        now = sim.now()
        try:
            key = sim.authenticate(request)
            fault = _next(sim.batches.create_faults)
            if fault not in ("ok", "drop", "accepted_500"):
                raise _scripted_refusal(fault)
            batch = self._accept(raw, key, now)
        except Refusal as refusal:
            sim.counters[f"batch_status:{refusal.status}"] += 1
            return refusal.response
        if fault == "drop":  # created, but the 202 never reaches the client
            reset_connection(request)
            return web.Response()
        if fault == "accepted_500":
            return _error(500, "Internal Server Error")
        sim.counters["batch_status:202"] += 1
        return web.json_response(sim.batches.body(batch, now, with_results=False), status=202)

    def _accept(self, raw: bytes, key: str, now: float) -> Batch:
        sim, cfg = self.sim, self.sim.config
        if len(raw) > cfg.batch_max_bytes:
            raise Refusal(
                413,
                bodies.error(
                    413, f"Request body too large: {len(raw)} bytes; at most {cfg.batch_max_bytes}"
                ),
            )
        try:
            body = json.loads(raw)
        except ValueError:
            raise Refusal(
                400, bodies.error(400, "Invalid JSON: expected object key or end of object")
            ) from None
        if not isinstance(body, dict):
            raise Refusal(400, bodies.error(400, "Request body must be a JSON object"))
        order = list(body)
        if (
            "endpoint" not in body
            or "model" not in body
            or (
                "requests" in body
                and order.index("requests") < max(order.index("endpoint"), order.index("model"))
            )
        ):
            raise Refusal(400, bodies.error(400, _ORDER))
        for late in ("provider", "completion_window", "callback_url"):
            if late in body and "requests" in body and order.index(late) > order.index("requests"):
                raise Refusal(
                    400,
                    bodies.error(400, f"{late} must appear before requests in the request body"),
                )
        endpoint, model_id = body["endpoint"], body["model"]
        if endpoint not in ENDPOINTS:
            raise Refusal(
                400,
                bodies.error(
                    400, f"Unsupported endpoint {endpoint!r}; use one of {', '.join(ENDPOINTS)}"
                ),
            )
        if body.get("completion_window", "24h") != "24h":
            raise Refusal(400, bodies.error(400, "completion_window must be '24h'"))
        model = MODELS_BY_ID.get(model_id) if isinstance(model_id, str) else None
        if isinstance(model_id, str) and model_id.endswith(":online"):
            raise Refusal(422, bodies.error(422, f"Model '{model_id}' cannot be used in a batch"))
        if model is None:
            raise Refusal(400, bodies.error(400, f"{model_id} is not a valid model ID"))
        if not model.batch or model.id in cfg.batch_refused_models:
            raise Refusal(
                400, bodies.error(400, f"Model '{model.id}' does not have a :batch endpoint.")
            )
        if endpoint != "/v1/chat/completions":
            raise Refusal(
                400,
                bodies.error(
                    400,
                    f"Model '{model.id}' does not support {endpoint} in batches here (the simulator serves chat completions)",
                ),
            )
        provider_only = self._provider_only(body.get("provider"), model.id, model.provider)
        lines = self._lines(body.get("requests"), model.id, model.provider)
        if len(lines) > cfg.batch_max_lines:
            raise Refusal(
                413,
                bodies.error(
                    413,
                    f"Too many requests in one batch: {len(lines)}; at most {cfg.batch_max_lines}",
                ),
            )
        if cfg.credit_limit is not None and sim.key_usage[key] >= cfg.credit_limit:
            raise Refusal(402, bodies.payment_required(bodies.OUT_OF_CREDITS))
        return sim.batches.add(key, endpoint, model, lines, now, provider_only)

    def _provider_only(self, provider: Any, model_id: str, serving: str) -> list[str] | None:
        if provider is None:
            return None
        if not isinstance(provider, dict) or set(provider) - {"only", "allow_fallbacks"}:
            raise Refusal(
                400,
                bodies.error(
                    400,
                    "provider: only provider.only and provider.allow_fallbacks are supported in batches",
                ),
            )
        only = provider.get("only")
        if only is None:
            return None
        if not isinstance(only, list) or not all(isinstance(p, str) for p in only):
            raise Refusal(
                400, bodies.error(400, "provider.only: expected a list of provider slugs")
            )
        if not any(_slug(p) == _slug(serving) for p in only):
            raise Refusal(
                404,
                bodies.error(
                    404,
                    f"Model '{model_id}' does not have an eligible :batch endpoint matching provider.only: {', '.join(only)}.",
                ),
            )
        return only

    def _lines(
        self, requests: Any, model_id: str, provider: str
    ) -> list[tuple[str, dict[str, Any]]]:
        if not isinstance(requests, list) or not requests:
            raise Refusal(400, bodies.error(400, "requests must contain at least one item."))
        lines: list[tuple[str, dict[str, Any]]] = []
        seen: set[str] = set()
        for number, line in enumerate(requests, 1):
            custom_id = line.get("custom_id") if isinstance(line, dict) else None
            if not isinstance(custom_id, str) or not custom_id:
                raise Refusal(
                    400, bodies.error(400, f"Request at line {number} must have a string custom_id")
                )
            if custom_id in seen:
                raise Refusal(
                    422,
                    bodies.error(
                        422, f"Request at line {number} has a duplicate custom_id '{custom_id}'"
                    ),
                )
            seen.add(custom_id)
            if provider == "Anthropic" and not _ANTHROPIC_ID.match(custom_id):
                raise Refusal(
                    422,
                    bodies.error(
                        422,
                        f"Request at line {number}: custom_id '{custom_id}' must be 1-64 characters of letters, digits, '_' and '-'",
                    ),
                )
            body = line.get("body")
            if not isinstance(body, dict):
                raise Refusal(
                    400, bodies.error(400, f"Request at line {number} must have an object body")
                )
            if body.get("model", model_id) != model_id:
                raise Refusal(
                    400,
                    bodies.error(
                        400,
                        f"Request at line {number} names model '{body['model']}', not the batch's '{model_id}'",
                    ),
                )
            lines.append((custom_id, body))
        return lines

    async def get(self, request: web.Request) -> web.Response:
        """`GET /batches/{id}`: the stored state, results inline once final."""
        sim = self.sim
        now = sim.now()
        try:
            key = sim.authenticate(request)
            if (fault := _next(sim.batches.get_faults)) != "ok":
                raise _scripted_refusal(fault)
            batch = self._find(request.match_info["id"], key, now)
        except Refusal as refusal:
            return refusal.response
        body = sim.batches.body(batch, now, with_results=True)
        if body["status"] == "completed":
            batch.polls_since_final += 1
            if batch.polls_since_final <= sim.config.batch_settlement_polls:
                body["results"] = None  # settlement pending
            elif sim.config.batch_payment_required:
                body["results"] = None
                return web.json_response(
                    {
                        **body,
                        **bodies.payment_required(
                            "Add credits to unlock the results of this batch; it is not run again."
                        ),
                    },
                    status=402,
                )
        return web.json_response(body)

    def _find(self, batch_id: str, key: str, now: float) -> Batch:
        batch = self.sim.batches.batches.get(batch_id)
        if (
            batch is None or batch.deleted or batch.key != key
            or now - batch.created < self.sim.config.batch_visible_after_s
        ):  # fmt: skip
            raise Refusal(404, bodies.error(404, f"Batch job {batch_id} not found."))
        return batch

    async def list(self, request: web.Request) -> web.Response:
        """`GET /batches`: newest first, `limit`, `after`, `status`, `created_after/before`."""
        sim, query = self.sim, request.query
        now = sim.now()
        try:
            key = sim.authenticate(request)
            if (fault := _next(sim.batches.get_faults)) != "ok":
                raise _scripted_refusal(fault)
            limit = _int(query.get("limit", "20"), "limit")
            if not 1 <= limit <= 100:
                raise Refusal(400, bodies.error(400, "limit must be between 1 and 100"))
            statuses = query.getall("status", [])
            if bad := [s for s in statuses if s not in _STATUSES]:
                raise Refusal(
                    400,
                    bodies.error(400, f"status {bad[0]!r} is not one of {', '.join(_STATUSES)}"),
                )
            after_time = _time(query.get("created_after"), "created_after")
            before_time = _time(query.get("created_before"), "created_before")
        except Refusal as refusal:
            return refusal.response
        lag = sim.config.batch_list_lag_s
        mine = [
            b for b in reversed(sim.batches.batches.values())
            if b.key == key and not b.deleted and now - b.created >= lag
            and (after_time is None or b.created > after_time)
            and (before_time is None or b.created < before_time)
        ]  # fmt: skip
        items = [sim.batches.body(b, now, with_results=False) for b in mine]
        if statuses:
            items = [item for item in items if item["status"] in statuses]
        if after := query.get("after"):
            ids = [item["id"] for item in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[:limit]
        return web.json_response({
            "object": "list", "data": page,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        })  # fmt: skip

    async def delete(self, request: web.Request) -> web.Response:
        """`DELETE /batches/{id}`: a final batch only (409 before), then 404 everywhere."""
        sim = self.sim
        now = sim.now()
        try:
            key = sim.authenticate(request)
            batch = self._find(request.match_info["id"], key, now)
        except Refusal as refusal:
            return refusal.response
        status, _ = sim.batches.state(batch, now)
        if status not in FINAL:
            return _error(
                409, f"Batch {batch.id} is {status}; only a finished batch can be deleted"
            )
        batch.deleted = True
        return web.json_response({
            "id": batch.id, "object": "batch",
            "deletion": {"openrouter": "deleted", "upstream": {"provider": batch.model.provider, "status": "deleted"}},
        })  # fmt: skip

    async def results(self, request: web.Request) -> web.Response:
        """`GET /batches/{id}/results?limit&cursor`: a final batch's results a page at a time."""
        sim = self.sim
        if not sim.config.batch_results_route:
            return _error(404, f"No route for GET {request.path}")
        now = sim.now()
        try:
            key = sim.authenticate(request)
            batch = self._find(request.match_info["id"], key, now)
            limit = _int(request.query.get("limit", "500"), "limit")
            start = _int(request.query.get("cursor", "0"), "cursor")
        except Refusal as refusal:
            return refusal.response
        if not 1 <= limit <= 1000:
            return _error(400, "limit must be between 1 and 1000")
        status, _ = sim.batches.state(batch, now)
        if status not in FINAL:
            return _error(409, f"Batch {batch.id} is {status}; its results are not ready")
        rows = batch.results or []
        page = rows[start : start + limit]
        more = start + limit < len(rows)
        return web.json_response(
            {
                "object": "list",
                "data": page,
                "has_more": more,
                "next_cursor": str(start + limit) if more else None,
            }
        )


def _next(script: list[str]) -> str:
    """The next entry of a fault script: "ok" once it is used up."""
    return script.pop(0) if script else "ok"


def _scripted_refusal(fault: str) -> Refusal:
    status = int(fault) if fault.isdigit() else 500
    headers = {"Retry-After": "1"} if status == 429 else None
    message = "Rate limit exceeded" if status == 429 else "Internal Server Error"
    return Refusal(status, bodies.error(status, message), headers)


def _error(status: int, message: str) -> web.Response:
    return web.json_response(bodies.error(status, message), status=status)


def _slug(provider: str) -> str:
    return provider.lower().replace(" ", "-")


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise Refusal(400, bodies.error(400, f"{name} must be an integer")) from None


def _time(value: str | None, name: str) -> float | None:
    """Unix seconds or an ISO-8601 date or datetime."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise Refusal(
            400, bodies.error(400, f"{name} must be unix seconds or an ISO-8601 date")
        ) from None
    return moment.timestamp()
