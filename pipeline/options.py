"""One table of the job's command-line options: the config key each flag sets, its kind and its
help. The CLI's options, the defaults its help shows and every message's "key (--flag)" come
from here; the defaults themselves live only on the config dataclasses (`config.default`).

Imports nothing heavy, not even click: `config` uses it to name keys in messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Option:
    key: str  # the TOML key, "section.item"
    flag: str
    help: str  # ends without a full stop when the default follows it
    kind: str = "text"  # text | int | float | flag | choice
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    # How the help shows the default: None, not at all; "" the config's default; else this text.
    shows_default: str | None = None
    sets: str | bool | None = None  # a flag that sets the key to this value (else to true)

    @property
    def param(self) -> str:
        """The click parameter's name."""
        return self.key.replace(".", "_")

    def help_with(self, default: Any) -> str:
        """The help line, with `default` (the config's) where it shows one."""
        if self.shows_default is None:
            return self.help
        shown = self.shows_default or show(default)
        return f"{self.help} [default: {shown}]."


def show(value: Any) -> str:
    """A default as help text: 300.0 is "300"."""
    return f"{value:g}" if isinstance(value, float) else str(value)


# In the order `--help` lists them.
# Input files by extension: what `input.format` may name, and what a data file looks like.
INPUT_FORMATS = {
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".ndjson": "jsonl",
}  # fmt: skip
FORMAT_NAMES = tuple(dict.fromkeys(INPUT_FORMATS.values()))  # csv, tsv, parquet, jsonl

JOB_OPTIONS: tuple[Option, ...] = (
    Option("input.path", "--input", "Input file or glob (CSV, TSV, Parquet, JSONL).", metavar="PATH"),
    Option("input.format", "--input-format", "Input format, when the extension does not say.", "choice", choices=FORMAT_NAMES),
    Option("input.delimiter", "--delimiter", "Field delimiter of CSV input (default: ',', a tab for tsv).", metavar="CHAR"),
    Option("input.incremental", "--incremental", "The input grows between runs: send only rows not done before.", "flag"),
    Option("input.reprocess_changed", "--reprocess-changed", "With --incremental: send changed rows again even when over a tenth of the rows done changed.", "flag"),
    Option("input.on_change", "--keep-changed", "With --incremental: keep the earlier answers of changed rows, marked stale.", "flag", sets="keep"),
    Option("output.path", "--output", "Output Parquet file.", metavar="PATH"),
    Option("prompt.column", "--prompt-column", "Column holding the whole prompt.", metavar="COL"),
    Option("prompt.template", "--template", "Prompt template over columns, e.g. 'Label: {review}'.", metavar="TEXT"),
    Option("prompt.messages_column", "--messages-column", "Column holding a JSON list of chat messages.", metavar="COL"),
    Option("prompt.system", "--system", "System prompt sent before each prompt.", metavar="TEXT"),
    Option("input.id_column", "--id-column", "Column of unique row ids (default: row position).", metavar="COL"),
    Option("prompt.model_column", "--model-column", "Column naming a model per row (empty: --model).", metavar="COL"),
    Option("request.model", "--model", "Model id", metavar="ID", shows_default=""),
    Option("request.models", "--models", "Run every prompt through each of these models (a row each).", metavar="A,B"),
    Option("request.n", "--n", "Samples per prompt and model (a row each)", "int", metavar="N", shows_default=""),
    Option("request.labels", "--labels", "Answer with one of these labels: a 'label' column.", metavar="A,B,C"),
    Option("request.response_schema", "--schema", "JSON Schema file for structured answers: a typed column per property.", metavar="FILE"),
    Option("request.base_url", "--base-url", "OpenAI-compatible API base URL", metavar="URL", shows_default=""),
    Option("request.temperature", "--temperature", "Sampling temperature (0-2).", "float"),
    Option("request.max_tokens", "--max-tokens", "Cap on output tokens per request.", "int"),
    Option("request.mode", "--mode", "How rows are sent: sync (a request each), batch (OpenRouter's Batch API, about half the price, results within 24 h) or auto (batch for the models that take it)", "choice", choices=("sync", "batch", "auto"), shows_default=""),
    Option("batch.wait", "--no-wait", "With --mode batch or auto: submit, then exit 7 while batches run; the next run collects them.", "flag", sets=False),
    Option("cluster.engine", "--engine", "Where requests are sent from: local (this process) or ray (workers on a Ray cluster: pip install 'prompt-pipeline[ray]'; [cluster] address, workers, unit_rows, local_inputs)", "choice", choices=("local", "ray"), shows_default=""),
    Option("request.cache", "--cache", "Response cache shared across jobs (sqlite file).", metavar="PATH"),
    Option("limits.concurrency", "--concurrency", "Requests in flight at most", "int", metavar="N", shows_default=""),
    Option("limits.rps", "--rps", "Requests per second at most.", "float", metavar="R"),
    Option("limits.rpm", "--rpm", "Requests per minute at most.", "float", metavar="R"),
    Option("limits.max_runtime", "--max-runtime", "Stop in time to save everything within this (90s, 55m, 2h); exit 6, resumable.", metavar="DURATION"),
    Option("limits.tpm", "--tpm", "Tokens (prompt + max output) per minute at most.", "float", metavar="T"),
    Option("retry.max_attempts", "--max-retries", "Attempts per row at most, the first included", "int", metavar="N", shows_default=""),
    Option("request.timeout", "--timeout", "Time one attempt may take", "float", metavar="SECONDS", shows_default=""),
    Option("cost.max_cost", "--max-cost", "Stop before the job's spend could pass this.", "float", metavar="USD"),
    Option("cost.max_cost_per_run", "--max-cost-per-run", "Stop before this run's own spend could pass this.", "float", metavar="USD"),
    Option("cost.max_cost_per_day", "--max-cost-per-day", "Stop before the spend of the last 24 h could pass this.", "float", metavar="USD"),
    Option("output.journal", "--journal", "Checkpoint file", metavar="PATH", shows_default="OUTPUT.journal"),
    Option("output.result_prefix", "--result-prefix", "Prefix for the result columns, if the input uses their names.", metavar="TEXT"),
)  # fmt: skip

_BY_KEY = {option.key: option for option in JOB_OPTIONS}


def describe(key: str) -> str:
    """How a message names a key: `limits.concurrency (--concurrency)`, or the key alone when
    no flag sets it."""
    option = _BY_KEY.get(key)
    return f"{key} ({option.flag})" if option else key
