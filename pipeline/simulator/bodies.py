"""JSON bodies exactly as OpenRouter shapes them (OAS `ChatResult`, `ChatStreamChunk`, errors)."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.simulator.catalogue import SimModel
from pipeline.simulator.content import Answer

_ALNUM = string.ascii_letters + string.digits
# Ids need to be unique, not secret: a seeded-from-urandom Mersenne Twister is 20x cheaper
# per id than `secrets`, which matters at thousands of requests per second.
_ID_RNG = random.Random()


def generation_id(now: float, *, batch: bool = False) -> str:
    """`gen-<unix seconds>-<20 alphanumerics>`, the form real responses use; a batch line's is
    `gen-batch-<unix seconds>-<20 hex digits>`."""
    if batch:
        return f"gen-batch-{int(now)}-{_ID_RNG.getrandbits(80):020x}"
    return f"gen-{int(now)}-{''.join(_ID_RNG.choices(_ALNUM, k=20))}"


def batch_id(now: float) -> str:
    """`batch-<unix seconds>-<20 alphanumerics>`, as live batch ids look."""
    return f"batch-{int(now)}-{''.join(_ID_RNG.choices(_ALNUM, k=20))}"


@dataclass(slots=True)
class Generation:
    """One billed generation: what the ledger keeps and `/generation` reports."""

    id: str
    request_hash: str
    messages_digest: str
    key_label: str
    model: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    cost: float
    prompt_cost: float
    completion_cost: float
    finish_reason: str | None
    native_finish_reason: str | None
    created: float
    latency_ms: float
    streamed: bool
    outcome: str  # "ok", or the fault that kept the answer from the client
    user: str | None = None
    http_referer: str | None = None
    cache_write_tokens: int | None = None  # prompt tokens written to the cache, where reported
    uncached_cost: float | None = None  # what it would have cost without the cache
    batch_id: str | None = None  # the batch the line was answered in, if it was

    def ledger_entry(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "request_hash": self.request_hash,
            "messages_digest": self.messages_digest,
            "key": self.key_label,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cached_tokens": self.cached_tokens,
            "cache_write_tokens": self.cache_write_tokens or 0,
            "provider": self.provider,
            "cost": self.cost,
            "finish_reason": self.finish_reason,
            "outcome": self.outcome,
            **({"batch_id": self.batch_id} if self.batch_id is not None else {}),
        }

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {
                "cached_tokens": self.cached_tokens,
                **(
                    {}
                    if self.cache_write_tokens is None
                    else {"cache_write_tokens": self.cache_write_tokens}
                ),
                "audio_tokens": 0,
            },
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "cost": self.cost,
            "is_byok": False,
            "cost_details": {
                "upstream_inference_cost": None,
                "upstream_inference_prompt_cost": self.prompt_cost,
                "upstream_inference_completions_cost": self.completion_cost,
            },
        }

    def record(self) -> dict[str, Any]:
        """The `data` object of `GET /api/v1/generation` (OAS `GenerationResponse`)."""
        return {
            "id": self.id,
            "upstream_id": f"chatcmpl-{self.id[-12:]}",
            "request_id": f"req-{self.id[-12:]}",
            "total_cost": self.cost,
            "usage": self.cost,
            # What the cache saved (negative: a write cost more), as OpenRouter reports it.
            "cache_discount": (
                None
                if self.uncached_cost is None or not (self.cached_tokens or self.cache_write_tokens)
                else self.uncached_cost - self.cost
            ),
            "upstream_inference_cost": None,
            "created_at": datetime.fromtimestamp(self.created, UTC)
            .isoformat()
            .replace("+00:00", "Z"),
            "model": self.model,
            "app_id": None,
            "streamed": self.streamed,
            "cancelled": self.outcome != "ok",
            "provider_name": self.provider,
            "latency": self.latency_ms,
            "moderation_latency": None,
            "generation_time": self.latency_ms,
            "finish_reason": self.finish_reason,
            "native_finish_reason": self.native_finish_reason,
            "service_tier": None,
            "tokens_prompt": self.prompt_tokens,
            "tokens_completion": self.completion_tokens,
            "native_tokens_prompt": self.prompt_tokens,
            "native_tokens_completion": self.completion_tokens,
            "native_tokens_completion_images": None,
            "native_tokens_reasoning": self.reasoning_tokens,
            "native_tokens_cached": self.cached_tokens,
            "num_media_prompt": None,
            "num_input_audio_prompt": None,
            "num_media_completion": None,
            "num_search_results": None,
            "num_fetches": None,
            "web_search_engine": None,
            "origin": "",
            "is_byok": False,
            "external_user": self.user,
            "api_type": "completions",
            "preset_id": None,
            "router": None,
            "provider_responses": None,
            "user_agent": None,
            "http_referer": self.http_referer,
            "data_region": "global",
            "workspace_id": None,
            "session_id": None,
            "response_cache_source_id": None,
        }


def completion(gen: Generation, answers: list[Answer]) -> dict[str, Any]:
    """A non-streaming `chat.completion` body, with one choice per answer."""
    return {
        "id": gen.id,
        "provider": gen.provider,
        "model": gen.model,
        "object": "chat.completion",
        "created": int(gen.created),
        "system_fingerprint": None,
        "choices": [
            {
                "index": index,
                "logprobs": answer.logprobs,
                "finish_reason": answer.finish_reason,
                "native_finish_reason": answer.native_finish_reason,
                "message": _message(answer),
            }
            for index, answer in enumerate(answers)
        ],
        "usage": gen.usage(),
    }


def _message(answer: Answer) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.content, "refusal": None}
    if answer.reasoning is not None:
        message["reasoning"] = answer.reasoning
    if answer.tool_calls is not None:
        message["content"] = answer.content or None
        message["tool_calls"] = answer.tool_calls
    return message


def chunk(gen: Generation, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """One `chat.completion.chunk` of a stream."""
    return {
        "id": gen.id,
        "provider": gen.provider,
        "model": gen.model,
        "object": "chat.completion.chunk",
        "created": int(gen.created),
        "system_fingerprint": "fp_sim",
        "choices": choices,
        **extra,
    }


def error(
    code: int, message: str, metadata: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """The error envelope `{"error": {code, message, metadata}, "user_id": ...}`."""
    body: dict[str, Any] = {"code": code, "message": message}
    if metadata is not None:
        body["metadata"] = metadata
    return {"error": body | extra, "user_id": "user_sim"}


def invalid_request(message: str) -> dict[str, Any]:
    """A 400 for a request OpenRouter cannot parse or accept."""
    return error(400, message, {"error_type": "invalid_request"})


# The body fields of OpenAI's `POST /chat/completions` (its API reference, 2025): what a strict
# OpenAI-compatible server accepts.
OPENAI_CHAT_FIELDS = frozenset({
    "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "messages", "metadata", "modalities", "model", "n",
    "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key",
    "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier", "stop",
    "store", "stream", "stream_options", "temperature", "tool_choice", "tools", "top_logprobs",
    "top_p", "user", "verbosity", "web_search_options",
})  # fmt: skip


def unrecognized_argument(name: str) -> dict[str, Any]:
    """OpenAI's 400 for a body field it does not know."""
    return {
        "error": {
            "message": f"Unrecognized request argument supplied: {name}",
            "type": "invalid_request_error", "param": None, "code": None,
        }
    }  # fmt: skip


OUT_OF_CREDITS = "Insufficient credits. Add more using https://openrouter.ai/credits"


def payment_required(message: str) -> dict[str, Any]:
    """A 402: the key's credit cannot pay for the request."""
    return error(402, message, {"error_type": "payment_required"})


def moderation(model: SimModel, flagged: str) -> dict[str, Any]:
    """A 403 from a moderated provider, quoting (an excerpt of) the flagged input."""
    excerpt = flagged if len(flagged) <= 100 else f"{flagged[:48]}...{flagged[-48:]}"
    return error(
        403,
        f"{model.id} requires moderation on {model.provider}. Your input was flagged for \"harassment\". No credits were charged.",
        {"reasons": ["harassment"], "flagged_input": excerpt, "provider_name": model.provider, "model_slug": model.id, "error_type": "content_policy_violation"},
    )  # fmt: skip


def rate_limit_headers(limit: int, reset_at: float, retry_after: float | None) -> dict[str, str]:
    """429 headers: X-RateLimit-Reset is epoch milliseconds; Retry-After is whole seconds."""
    headers = {
        "X-RateLimit-Limit": str(limit),
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(int(reset_at * 1000)),
    }
    if retry_after is not None:
        headers["Retry-After"] = str(max(0, int(-(-retry_after // 1))))
    return headers


def key_info(label: str, limit: float | None, usage: float, *, management: bool) -> dict[str, Any]:
    """The `data` object of `GET /api/v1/key`."""
    return {
        "label": label,
        "limit": limit,
        "limit_remaining": None if limit is None else limit - usage,
        "limit_reset": None,
        "include_byok_in_limit": False,
        "usage": usage,
        "usage_daily": usage,
        "usage_weekly": usage,
        "usage_monthly": usage,
        "byok_usage": 0.0,
        "byok_usage_daily": 0.0,
        "byok_usage_weekly": 0.0,
        "byok_usage_monthly": 0.0,
        "is_free_tier": False,
        "is_management_key": management,
        "is_provisioning_key": management,
        "creator_user_id": "user_sim",
        "expires_at": None,
        "rate_limit": {
            "requests": -1,
            "interval": "10s",
            "note": "This field is deprecated and safe to ignore.",
        },
    }


def key_label(key: str) -> str:
    """What OpenRouter shows for a key: a prefix and the last three characters, never the key."""
    return f"{key[:9]}...{key[-3:]}" if len(key) > 16 else "sk-...***"
