"""`JobConfig`: one frozen, validated object built from a TOML file, command-line flags and the
environment. Flags override the file. Every message names the key (and its flag) and what would
be valid. Relative paths in a file are relative to that file, so a cron job can run from anywhere.

```toml
[input]    path, format, delimiter, id_column, incremental, on_change, reprocess_changed
[prompt]   column | template | messages_column, system, model_column, param_columns,
           cache_prefix, images, files
[request]  model, models, n, labels | response_schema, base_url, temperature, top_p,
           max_tokens, seed, stop, response_format, reasoning, provider, fallback_models,
           referer, title, key_file, timeout, connect_timeout, extra, cache, tools,
           tool_choice, logprobs, top_logprobs, endpoint, dimensions
[limits]   concurrency, rps | rpm, tpm, max_runtime, max_file_mb, inputs_per_request
[retry]    max_attempts, max_elapsed, backoff_base, backoff_max, invalid_retries
[output]   path, journal, result_prefix, row_group_size, keep_reasoning
[cost]     max_cost, max_cost_per_run, max_cost_per_day, expected_output_tokens, prices_ttl,
           reconcile_timeout
[batch]    base_url, max_lines, max_bytes, poll_interval, poll_max, list_lag, wait
[cluster]  engine, address, workers, unit_rows, local_inputs
```
"""

from __future__ import annotations

import difflib
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline import request_keys
from pipeline.batch_config import BatchConfig, batch_config
from pipeline.cluster_config import ClusterConfig, cluster_config
from pipeline.config_file import read_toml
from pipeline.cost_config import CostConfig, cost_config
from pipeline.errors import ConfigError
from pipeline.options import FORMAT_NAMES, describe
from pipeline.places import is_remote, staged_output
from pipeline.settings import asked, settings_hash
from pipeline.values import RawValues

DEFAULT_MODEL = "mistralai/mixtral-8x7b-instruct"
DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
DEFAULT_CONCURRENCY = 16
DEFAULT_TIMEOUT = 300.0  # seconds per attempt: long generations are slow, not stuck
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_MAX_ATTEMPTS = 6
DEFAULT_MAX_ELAPSED = 900.0  # seconds one row may spend retrying
DEFAULT_TITLE = "prompt-pipeline"
DEFAULT_ROW_GROUP_SIZE = 10_000  # output rows per Parquet row group
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class InputConfig:
    path: str
    format: str | None = None  # csv | tsv | parquet | jsonl; by extension when unset
    delimiter: str | None = None  # of CSV fields; "," (a tab for tsv) when unset
    id_column: str | None = None
    # The input grows between runs (rows appended, new files in a glob): only new rows are sent.
    incremental: bool = False
    # A row done for another request than it asks now: "reprocess" sends it again (refused
    # over a tenth of the rows done unless `reprocess_changed`), "keep" marks its answer stale.
    on_change: str = "reprocess"
    reprocess_changed: bool = False


@dataclass(frozen=True, slots=True)
class PromptConfig:
    column: str | None = None
    template: str | None = None
    messages_column: str | None = None
    system: str | None = None
    model_column: str | None = None
    # Request parameters taken per row from columns: {"temperature": "temp_column"}.
    param_columns: Mapping[str, str] | None = None
    # Mark the system prompt for prompt caching: "auto" (models that price cache writes, i.e.
    # need explicit breakpoints), "on" (every model) or "off" (`prompts.CACHE_MARK`).
    cache_prefix: str = "auto"
    # Columns sent as images / files after the prompt's text (`attachments`).
    images: tuple[str, ...] | None = None
    files: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class RequestConfig:
    model: str = DEFAULT_MODEL
    base_url: str = DEFAULT_BASE_URL
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    response_format: Mapping[str, Any] | None = None
    provider: Mapping[str, Any] | None = None
    # Every prompt through every one of these models (one output row each), instead of `model`.
    models: tuple[str, ...] | None = None
    n: int = 1  # samples per prompt (and model): one output row each
    labels: tuple[str, ...] | None = None  # answer with one of these: a `label` column
    response_schema: Mapping[str, Any] | None = None  # JSON Schema: a typed column per property
    reasoning: Mapping[str, Any] | None = None  # OpenRouter `reasoning`: effort, max_tokens, ...
    fallback_models: tuple[str, ...] | None = None  # OpenRouter `models`: tried if `model` fails
    referer: str | None = None
    title: str = DEFAULT_TITLE
    key_file: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    extra: Mapping[str, Any] = field(default_factory=dict)
    # A response cache shared across jobs (sqlite): identical requests are answered from it.
    cache: str | None = None
    # Talk to the bundled simulator instead of base_url (no key, no network).
    simulate: bool = False
    # Whether base_url is OpenRouter, which takes fields OpenAI's API does not know (the
    # `provider` routing a schema adds); None: OpenRouter's host or the simulator.
    openrouter: bool | None = None
    # "sync": a request per row; "batch": OpenRouter's Batch API (`batch_mode`, `[batch]`);
    # "auto": batch for the models that have a `:batch` endpoint, sync for the rest.
    mode: str = "sync"
    # Where batch mode asks a failed or turned-down line again: "batch" (a later batch), "sync".
    batch_retry: str = "batch"
    # Functions the model may call (`request_keys`): the first choice's calls in a `tool_calls`
    # column, a single function's arguments in typed columns.
    tools: tuple[Mapping[str, Any], ...] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {type, function: {name}}
    # Ask for the answer tokens' log-probabilities, which give `label_confidence` with labels.
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # "embeddings": each row's text to `/embeddings`, many rows a request (`embed`).
    endpoint: str | None = None  # None: "chat"
    dimensions: int | None = None  # of the embeddings, for models that can shorten them

    @property
    def is_openrouter(self) -> bool:
        if self.openrouter is not None:
            return self.openrouter
        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        return self.simulate or host == "openrouter.ai" or host.endswith(".openrouter.ai")

    def body_params(self) -> dict[str, Any]:
        """Everything besides `model` and `messages` that goes into each request body."""
        params: dict[str, Any] = {}
        for name in PASSED_THROUGH:
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        if self.stop is not None:
            params["stop"] = list(self.stop)
        if self.fallback_models is not None:
            params["models"] = list(self.fallback_models)
        if self.tools is not None:
            params["tools"] = [dict(tool) for tool in self.tools]
        params.update(self.extra)
        return params

    @property
    def variants(self) -> list[tuple[str | None, int]]:
        """(model, sample index) of each output row one prompt becomes; model None: the row's
        own (`model`, or the model column's)."""
        return [(model, sample) for model in self.models or (None,) for sample in range(self.n)]


PASSED_THROUGH = (
    "temperature", "top_p", "max_tokens", "seed", "response_format", "reasoning", "provider",
    "tool_choice", "logprobs", "top_logprobs",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    concurrency: int = DEFAULT_CONCURRENCY
    rps: float | None = None
    rpm: float | None = None
    tpm: float | None = None
    max_runtime: float | None = None  # seconds a run may take; it stops in time to flush
    max_file_mb: float = 20.0  # the largest image or file a row may send
    inputs_per_request: int = 64  # rows one embeddings request carries, at most

    @property
    def requests_per_second(self) -> float | None:
        if self.rps is not None:
            return self.rps
        return self.rpm / 60 if self.rpm is not None else None


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_elapsed: float = DEFAULT_MAX_ELAPSED
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    # Answers that break the schema / name no label are asked again this many times (each paid).
    invalid_retries: int = 2


@dataclass(frozen=True, slots=True)
class OutputConfig:
    path: str
    journal: str | None = None  # default: <output>.journal next to the output
    result_prefix: str = ""
    # Output rows per Parquet row group; each group is written as soon as all its rows are done.
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE
    keep_reasoning: bool = False  # a `reasoning` column with each answer's reasoning text

    @property
    def local_path(self) -> Path:
        """Where the output file is written: `path`, or for an object-store URL a file in the
        cache folder, uploaded once complete."""
        return staged_output(self.path) if is_remote(self.path) else Path(self.path)

    @property
    def journal_path(self) -> Path:
        return Path(self.journal) if self.journal else Path(f"{self.local_path}.journal")


@dataclass(frozen=True, slots=True)
class JobConfig:
    input: InputConfig
    prompt: PromptConfig
    request: RequestConfig
    limits: LimitsConfig
    retry: RetryConfig
    output: OutputConfig
    cost: CostConfig = field(default_factory=CostConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def request_fingerprint(self) -> dict[str, Any]:
        """What shapes the requests: a resumed job must ask the same (`settings.asked`)."""
        return asked(self)

    def fingerprint_hash(self) -> str:
        return settings_hash(self.request_fingerprint())


# ------------------------------------------------------------------------------- loading

SECTIONS: dict[str, Any] = {
    "input": InputConfig,
    "prompt": PromptConfig,
    "request": RequestConfig,
    "limits": LimitsConfig,
    "retry": RetryConfig,
    "output": OutputConfig,
    "cost": CostConfig,
    "batch": BatchConfig,
    "cluster": ClusterConfig,
}

MODES = ("sync", "batch", "auto")  # how rows are sent (`request.mode`)
ON_CHANGE = ("reprocess", "keep")  # what an incremental job does with a changed row
PROMPT_SOURCES = ("prompt.column", "prompt.template", "prompt.messages_column")
PATH_KEYS = (
    "input.path", "output.path", "output.journal", "request.key_file", "request.cache",
    "request.response_schema", "request.tools",
)  # fmt: skip


def default(key: str) -> Any:
    """The default of a key, as its dataclass holds it (the one place defaults live); None for
    a required key."""
    section, item = key.split(".")
    spec = SECTIONS[section].__dataclass_fields__[item]
    if spec.default is not MISSING:
        return spec.default
    return None if spec.default_factory is MISSING else spec.default_factory()  # None: required


def load(
    config_file: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> JobConfig:
    """Read `config_file` (if any; relative paths in it are relative to it), apply `overrides`
    by key (`{"limits.concurrency": 8}`: what flags do), and validate."""
    overrides = overrides or {}
    config_file = Path(config_file) if config_file is not None else None
    raw: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    base_dir = Path.cwd()
    if config_file is not None:
        document = read_toml(config_file)
        base_dir = config_file.resolve().parent
        check_keys(document, config_file)
        for section, values in document.items():
            raw[section].update(values)
        for key in PATH_KEYS:
            section, item = key.split(".")
            if isinstance(raw[section].get(item), str) and not is_remote(raw[section][item]):
                raw[section][item] = str(_resolve(raw[section][item], base_dir))
    given = {key for key, value in overrides.items() if value is not None}
    if given & set(PROMPT_SOURCES):
        # A prompt source on the command line replaces the file's, whichever kind it is.
        for key in PROMPT_SOURCES:
            raw["prompt"].pop(key.split(".")[1], None)
    for key, value in overrides.items():
        if value is not None:
            section, item = key.split(".")
            raw[section][item] = value
    return _build(raw)


def _resolve(path: str, base_dir: Path) -> Path:
    expanded = Path(os.path.expanduser(path))
    return expanded if expanded.is_absolute() else Path(os.path.normpath(base_dir / expanded))


def check_keys(document: Mapping[str, Any], source: object) -> None:
    """Refuse an unknown section or key, naming `source` (a file, or a call) and the nearest
    valid one."""
    every_key = [f"{s}.{f}" for s, cls in SECTIONS.items() for f in cls.__dataclass_fields__]
    for section, values in document.items():
        if section not in SECTIONS or not isinstance(values, dict):
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            hint = (
                f"; did you mean [{close[0]}]?"
                if close
                else f"; valid sections: {', '.join(SECTIONS)}"
            )
            raise ConfigError(f"{source}: unknown section [{section}]{hint}")
        for key in values:
            full = f"{section}.{key}"
            if full not in every_key:
                suggestion = _closest(full, every_key)
                hint = f"; did you mean {suggestion}?" if suggestion else ""
                raise ConfigError(f"{source}: unknown key {full}{hint}")


def _closest(full: str, every_key: list[str]) -> str | None:
    """The valid key nearest to a misspelt one, also across sections (`input.model` -> `request.model`)."""
    close = difflib.get_close_matches(full, every_key, n=1, cutoff=0.75)
    if close:
        return close[0]
    by_item = {key.split(".")[1]: key for key in every_key}
    close = difflib.get_close_matches(full.split(".")[1], by_item, n=1)
    return by_item[close[0]] if close else None


# ---------------------------------------------------------------------------- validation


def _build(raw: dict[str, dict[str, Any]]) -> JobConfig:
    v = RawValues(raw)
    input_cfg = _given(
        InputConfig,
        path=v.required("input.path"),
        format=v.choice("input.format", FORMAT_NAMES),
        delimiter=v.delimiter("input.delimiter"),
        id_column=v.string("input.id_column"),
        incremental=v.flag("input.incremental"),
        on_change=v.choice("input.on_change", ON_CHANGE),
        reprocess_changed=v.flag("input.reprocess_changed"),
    )
    if input_cfg.on_change == "keep" and input_cfg.reprocess_changed:
        raise ConfigError(
            f'{describe("input.on_change")} "keep" and {describe("input.reprocess_changed")} ask opposite things; choose one'
        )
    prompt = _given(
        PromptConfig,
        column=v.string("prompt.column"),
        template=v.string("prompt.template"),
        messages_column=v.string("prompt.messages_column"),
        system=v.string("prompt.system"),
        model_column=v.string("prompt.model_column"),
        param_columns=v.param_columns("prompt.param_columns"),
        cache_prefix=v.auto_or_flag("prompt.cache_prefix"),
        images=v.strings("prompt.images"),
        files=v.strings("prompt.files"),
    )
    if (prompt.images or prompt.files) and prompt.messages_column is not None:
        raise ConfigError(
            f"{describe('prompt.images')} and {describe('prompt.files')} go with a template or a prompt column, not {describe('prompt.messages_column')} (put the parts in its messages)"
        )
    sources = [
        k for k in ("column", "template", "messages_column") if getattr(prompt, k) is not None
    ]
    if len(sources) != 1:
        given = f" (got {', '.join('prompt.' + s for s in sources)})" if sources else ""
        raise ConfigError(
            f"set exactly one prompt source: {describe('prompt.column')}, {describe('prompt.template')} "
            f"or {describe('prompt.messages_column')}{given}"
        )
    base_url = v.string("request.base_url", empty_is_unset=False)
    if base_url is not None and not base_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"{describe('request.base_url')} must start with http:// or https://, got {base_url!r}"
        )
    request = _given(
        RequestConfig,
        model=v.string("request.model", empty_is_unset=False),
        base_url=base_url.rstrip("/") if base_url is not None else None,
        temperature=v.number("request.temperature", low=0, high=2),
        top_p=v.number("request.top_p", low=0, high=1, low_open=True),
        max_tokens=v.integer("request.max_tokens", low=1),
        seed=v.integer("request.seed"),
        stop=v.stop("request.stop"),
        response_format=v.table("request.response_format"),
        provider=v.table("request.provider"),
        models=v.strings("request.models"),
        n=v.integer("request.n", low=1),
        labels=v.labels("request.labels"),
        response_schema=v.schema("request.response_schema"),
        reasoning=v.table("request.reasoning"),
        fallback_models=v.strings("request.fallback_models"),
        referer=v.string("request.referer"),
        title=v.string("request.title"),
        key_file=v.string("request.key_file"),
        timeout=v.number("request.timeout", low=0, low_open=True),
        connect_timeout=v.number("request.connect_timeout", low=0, low_open=True),
        extra=v.table("request.extra"),
        cache=v.string("request.cache"),
        simulate=bool(v.raw["request"].get("simulate")),
        openrouter=v.flag("request.openrouter") if "openrouter" in v.raw["request"] else None,
        mode=v.choice("request.mode", MODES),
        batch_retry=v.choice("request.batch_retry", ("batch", "sync")),
        tools=(tools := request_keys.tools(v.raw["request"].get("tools"))),
        tool_choice=request_keys.tool_choice(v.raw["request"].get("tool_choice"), tools),
        logprobs=v.flag("request.logprobs") or None,
        top_logprobs=v.integer("request.top_logprobs", low=0),
        endpoint=None
        if (endpoint := v.choice("request.endpoint", request_keys.ENDPOINTS)) == "chat"
        else endpoint,
        dimensions=v.integer("request.dimensions", low=1),
    )
    _check_request(request, prompt)
    request_keys.check_embeddings(request, prompt)
    limits = _given(
        LimitsConfig,
        concurrency=v.integer("limits.concurrency", low=1),
        rps=v.number("limits.rps", low=0, low_open=True),
        rpm=v.number("limits.rpm", low=0, low_open=True),
        tpm=v.number("limits.tpm", low=0, low_open=True),
        max_runtime=v.duration("limits.max_runtime"),
        max_file_mb=v.number("limits.max_file_mb", low=0, low_open=True),
        inputs_per_request=v.integer("limits.inputs_per_request", low=1),
    )
    if limits.rps is not None and limits.rpm is not None:
        raise ConfigError(f"set {describe('limits.rps')} or {describe('limits.rpm')}, not both")
    retry = _given(
        RetryConfig,
        max_attempts=v.integer("retry.max_attempts", low=1),
        max_elapsed=v.number("retry.max_elapsed", low=0, low_open=True),
        backoff_base=v.number("retry.backoff_base", low=0),
        backoff_max=v.number("retry.backoff_max", low=0),
        invalid_retries=v.integer("retry.invalid_retries", low=0),
    )
    output = _given(
        OutputConfig,
        path=v.required("output.path"),
        journal=v.string("output.journal"),
        result_prefix=v.string("output.result_prefix"),
        row_group_size=v.integer("output.row_group_size", low=1),
        keep_reasoning=v.flag("output.keep_reasoning"),
    )
    return JobConfig(
        input_cfg,
        prompt,
        request,
        limits,
        retry,
        output,
        cost_config(v),
        batch_config(v),
        cluster_config(v),
    )


def _given(cls: type[T], **values: Any) -> T:
    """`cls` with the values given; a key left unset (None) keeps the dataclass's default."""
    return cls(**{key: value for key, value in values.items() if value is not None})


def _check_request(request: RequestConfig, prompt: PromptConfig) -> None:
    """Keys that cannot be combined."""
    pairs = (
        ("request.labels", request.labels, "request.response_schema", request.response_schema),
        ("request.labels", request.labels, "request.response_format", request.response_format),
        ("request.response_schema", request.response_schema, "request.response_format", request.response_format),
        ("request.models", request.models, "prompt.model_column", prompt.model_column),
        ("request.tools", request.tools, "request.labels", request.labels),
        ("request.tools", request.tools, "request.response_schema", request.response_schema),
    )  # fmt: skip
    for one, first, other, second in pairs:
        if first is not None and second is not None:
            raise ConfigError(f"set {describe(one)} or {describe(other)}, not both")
    if request.top_logprobs is not None and (request.top_logprobs > 20 or not request.logprobs):
        raise ConfigError(
            f"{describe('request.top_logprobs')} takes 0 to 20 alternatives per token, with {describe('request.logprobs')} = true"
        )
    if request.models is not None and not request.models:
        raise ConfigError(f"{describe('request.models')} must name at least one model")
    if request.models is not None and len(set(request.models)) != len(request.models):
        raise ConfigError(f"{describe('request.models')} names a model twice")
