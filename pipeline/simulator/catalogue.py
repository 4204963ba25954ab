"""The simulator's model catalogue: ids, context sizes and per-token prices as `/models` serves them.

Prices are `Decimal` per token, serialised as decimal strings exactly as OpenRouter does, and
costs are computed in `Decimal` then rounded once to a float, so the cost in a response equals
`tokens * price` to float precision.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

_PER_MILLION = Decimal(1_000_000)

_COMMON_PARAMETERS = (
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "seed",
    "stop",
)
_STRUCTURED = ("response_format", "structured_outputs")
_REASONING = ("reasoning", "include_reasoning")
_TOOLS = ("tools", "tool_choice")
_LOGPROBS = ("logprobs", "top_logprobs")


@dataclass(frozen=True, slots=True)
class SimModel:
    """One catalogue entry; prices are USD per token."""

    id: str
    name: str
    provider: str
    tokenizer: str
    instruct_type: str | None
    context_length: int
    max_completion_tokens: int
    prompt_price: Decimal
    completion_price: Decimal
    supported_parameters: tuple[str, ...]
    cache_read_price: Decimal | None = None
    # Writing a prefix to the cache (explicit caching), per token; None: no charge above the
    # prompt price. Explicit models cache only up to a `cache_control` mark (`caching.py`).
    cache_write_price: Decimal | None = None
    explicit_cache: bool = False
    min_cache_tokens: int = 0
    # Every provider serving the model (`provider` first); each keeps its own cache.
    providers: tuple[str, ...] = ()
    reasoning: bool = False
    native_length_reason: str = "length"
    batch: bool = True  # has a `:batch` endpoint (the Batch API takes it)
    input_modalities: tuple[str, ...] = ("text",)
    dimensions: int = 0  # of an embeddings model's vectors (`/embeddings`); 0: a chat model
    image_price: Decimal = Decimal(0)  # USD per input image

    def charges(
        self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
        written_tokens: int = 0,
    ) -> tuple[float, float, float]:  # fmt: skip
        """(total, prompt part, completion part) in USD; reasoning tokens bill as completion,
        prompt tokens read from the cache at its price and those written to it at that price.

        The total is summed in Decimal and rounded to a float once, as `usage.cost` is.
        """
        read = self.cache_read_price if self.cache_read_price is not None else self.prompt_price
        write = self.cache_write_price if self.cache_write_price is not None else self.prompt_price
        plain = prompt_tokens - cached_tokens - written_tokens
        prompt = plain * self.prompt_price + cached_tokens * read + written_tokens * write
        completion = completion_tokens * self.completion_price
        return float(prompt + completion), float(prompt), float(completion)

    def batch_row(self, discount: float) -> SimModel:
        """The model's `:batch` endpoint: every price at `discount` of the model's."""
        factor = Decimal(str(discount))

        def cut(price: Decimal | None) -> Decimal | None:
            return None if price is None else price * factor

        return dataclasses.replace(
            self, prompt_price=self.prompt_price * factor, image_price=self.image_price * factor,
            completion_price=self.completion_price * factor,
            cache_read_price=cut(self.cache_read_price), cache_write_price=cut(self.cache_write_price),
        )  # fmt: skip

    @property
    def output(self) -> str:
        return "embeddings" if self.dimensions else "text"

    @property
    def is_free(self) -> bool:
        return self.id.endswith(":free")

    def to_json(self, created: int) -> dict[str, Any]:
        """The `Model` object of `GET /api/v1/models` (OAS `Model`)."""
        pricing = {
            "prompt": _price_str(self.prompt_price),
            "completion": _price_str(self.completion_price),
            "request": "0",
            "image": _price_str(self.image_price),
        }
        if self.cache_read_price is not None:
            pricing["input_cache_read"] = _price_str(self.cache_read_price)
        if self.cache_write_price is not None:
            pricing["input_cache_write"] = _price_str(self.cache_write_price)
        entry: dict[str, Any] = {
            "id": self.id,
            "canonical_slug": self.id.removesuffix(":free"),
            "hugging_face_id": None,
            "name": self.name,
            "created": created,
            "description": f"{self.name} (simulated).",
            "context_length": self.context_length,
            "architecture": {
                "modality": "+".join(self.input_modalities) + f"->{self.output}",
                "input_modalities": list(self.input_modalities),
                "output_modalities": [self.output],
                "tokenizer": self.tokenizer,
                "instruct_type": self.instruct_type,
            },
            "pricing": pricing,
            "top_provider": {
                "context_length": self.context_length,
                "max_completion_tokens": self.max_completion_tokens,
                "is_moderated": False,
            },
            "per_request_limits": None,
            "supported_parameters": list(self.supported_parameters),
            "default_parameters": {"temperature": None, "top_p": None, "frequency_penalty": None},
            "supported_voices": None,
            "links": {"details": f"/api/v1/models/{self.id}/endpoints"},
        }
        if self.reasoning:
            entry["reasoning"] = {
                "supported_efforts": ["high", "medium", "low"],
                "default_effort": "medium",
                "default_enabled": True,
                "mandatory": False,
                "supports_max_tokens": True,
            }
        return entry


def _price_str(price: Decimal) -> str:
    """Per-token price as OpenRouter prints it: plain decimal notation, no exponent."""
    return format(price.normalize(), "f")


def _per_million(usd: str) -> Decimal:
    return Decimal(usd) / _PER_MILLION


DEFAULT_MODEL = "mistralai/mixtral-8x7b-instruct"

CATALOGUE: tuple[SimModel, ...] = (
    SimModel(
        id=DEFAULT_MODEL,
        name="Mistral: Mixtral 8x7B Instruct",
        provider="DeepInfra",
        tokenizer="Mistral",
        instruct_type="mistral",
        context_length=32_768,
        max_completion_tokens=16_384,
        prompt_price=_per_million("0.54"),
        completion_price=_per_million("0.54"),
        supported_parameters=_COMMON_PARAMETERS + _STRUCTURED + _TOOLS + _LOGPROBS,
    ),
    SimModel(
        id="openai/gpt-4o-mini",
        name="OpenAI: GPT-4o-mini",
        provider="OpenAI",
        tokenizer="GPT",
        instruct_type=None,
        context_length=128_000,
        max_completion_tokens=16_384,
        prompt_price=_per_million("0.15"),
        completion_price=_per_million("0.60"),
        cache_read_price=_per_million("0.075"),
        supported_parameters=_COMMON_PARAMETERS + _STRUCTURED + _TOOLS + _LOGPROBS,
        input_modalities=("text", "image", "file"),
        image_price=Decimal("0.000217"),
    ),
    SimModel(
        id="deepseek/deepseek-r1",
        name="DeepSeek: R1",
        provider="DeepInfra",
        tokenizer="DeepSeek",
        instruct_type="deepseek-r1",
        context_length=163_840,
        max_completion_tokens=32_768,
        prompt_price=_per_million("0.40"),
        completion_price=_per_million("2.00"),
        supported_parameters=_COMMON_PARAMETERS + _STRUCTURED + _REASONING + _TOOLS,
        reasoning=True,
        native_length_reason="max_tokens",
    ),
    SimModel(
        # The model without structured outputs: with `provider.require_parameters` a
        # `response_format` request finds no endpoint; without it the format is ignored.
        id="mistralai/mistral-7b-instruct",
        name="Mistral: Mistral 7B Instruct",
        provider="Together",
        tokenizer="Mistral",
        instruct_type="mistral",
        context_length=32_768,
        max_completion_tokens=4_096,
        prompt_price=_per_million("0.028"),
        completion_price=_per_million("0.054"),
        supported_parameters=_COMMON_PARAMETERS,
        batch=False,
    ),
    SimModel(
        # Explicit caching, as Anthropic's models have: only up to a `cache_control` mark, a
        # prefix of at least 1,024 tokens, writes at 1.25x and reads at 0.1x the prompt price,
        # each of its three providers with a cache of its own.
        id="anthropic/claude-sonnet-4",
        name="Anthropic: Claude Sonnet 4",
        provider="Anthropic",
        providers=("Anthropic", "Amazon Bedrock", "Google"),
        tokenizer="Claude",
        instruct_type=None,
        context_length=200_000,
        max_completion_tokens=64_000,
        prompt_price=_per_million("3.00"),
        completion_price=_per_million("15.00"),
        cache_read_price=_per_million("0.30"),
        cache_write_price=_per_million("3.75"),
        explicit_cache=True,
        min_cache_tokens=1_024,
        input_modalities=("text", "image", "file"),
        image_price=Decimal("0.0048"),
        supported_parameters=_COMMON_PARAMETERS + _STRUCTURED,
    ),
    SimModel(
        id="meta-llama/llama-3.3-70b-instruct:free",
        name="Meta: Llama 3.3 70B Instruct (free)",
        provider="Chutes",
        tokenizer="Llama3",
        instruct_type="llama3",
        context_length=131_072,
        max_completion_tokens=8_192,
        prompt_price=Decimal(0),
        completion_price=Decimal(0),
        supported_parameters=_COMMON_PARAMETERS,
        batch=False,
    ),
)

EMBEDDINGS_MODEL = SimModel(
    id="openai/text-embedding-3-small",
    name="OpenAI: Text Embedding 3 Small",
    provider="OpenAI",
    tokenizer="GPT",
    instruct_type=None,
    context_length=8_192,
    max_completion_tokens=0,
    prompt_price=_per_million("0.02"),
    completion_price=Decimal(0),
    supported_parameters=(),  # the spec's list of parameters has no `dimensions` yet
    batch=False,
    dimensions=1_536,
)
# Listed by `GET /embeddings/models`, not `/models`, as OpenRouter lists them.
EMBEDDING_MODELS: tuple[SimModel, ...] = (EMBEDDINGS_MODEL,)

MODELS_BY_ID: dict[str, SimModel] = {m.id: m for m in (*CATALOGUE, *EMBEDDING_MODELS)}
