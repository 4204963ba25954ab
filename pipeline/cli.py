"""The `pipeline` command line: parses options, calls the library, maps errors to exit codes.

Heavy libraries (polars, pyarrow, aiohttp) are imported inside the commands that need them, so
`pipeline --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from pipeline import __version__

if TYPE_CHECKING:
    from pipeline.simulator import RunningSimulator

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="pipeline")
def cli() -> None:
    """Run large batches of prompts through OpenRouter or any OpenAI-compatible API.

    Concurrent and rate-limited, resumable after a crash without paying twice, with exact
    cost per row. Start with `pipeline simulate` to get a local OpenRouter to try things on.
    """


@cli.command(context_settings=CONTEXT)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind. Keep it on loopback."
)
@click.option(
    "--port",
    default=0,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port; 0 picks a free one.",
)
@click.option(
    "--latency",
    default="0",
    show_default=True,
    metavar="SPEC",
    help="Seconds per answer: SECONDS, lognormal:MEDIAN:SIGMA, or tokens:FIRST:PER_TOKEN.",
)
@click.option(
    "--fault-rate",
    "fault_rates",
    default="",
    metavar="KIND=P,...",
    help="Inject faults at random, e.g. '429=0.05,500=0.03,mid_body=0.01'. Kinds: "
    "402 403 408 429 500 502 503 524 529 error_body choice_error empty invalid_json "
    "schema_invalid reset mid_body stall hang.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed for fault draws and latency jitter.",
)
@click.option(
    "--rate-limit",
    type=click.FloatRange(min=0, min_open=True),
    help="Answer 429 past this many requests per window.",
)
@click.option(
    "--rate-window",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds in the rate-limit window.",
)
@click.option(
    "--retry-after",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds that 429/503 answers ask clients to wait.",
)
@click.option(
    "--credit-limit",
    type=click.FloatRange(min=0),
    help="USD each key may spend before getting 402.",
)
@click.option(
    "--ready-after",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds before /generation knows a new id.",
)
@click.option(
    "--keepalive",
    type=click.FloatRange(min=0, min_open=True),
    help="Send a newline this often while a slow answer is generated.",
)
@click.option(
    "--completion-words",
    type=click.IntRange(min=1),
    help="Words per answer (default: 8-31, varying by prompt).",
)
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    metavar="KEY",
    help="Accept only these keys (repeatable). Default: any non-empty key.",
)
@click.option(
    "--down-model",
    "down_models",
    multiple=True,
    metavar="MODEL",
    help="Pretend every provider of MODEL is down (repeatable).",
)
@click.option(
    "--flag-term",
    "flagged_terms",
    multiple=True,
    metavar="TEXT",
    help="Prompts containing TEXT get 403 moderation (repeatable).",
)
def simulate(
    host: str,
    port: int,
    latency: str,
    fault_rates: str,
    seed: int,
    rate_limit: float | None,
    rate_window: float,
    retry_after: float,
    credit_limit: float | None,
    ready_after: float,
    keepalive: float | None,
    completion_words: int | None,
    api_keys: tuple[str, ...],
    down_models: tuple[str, ...],
    flagged_terms: tuple[str, ...],
) -> None:
    """Serve a local OpenRouter simulator until Ctrl-C.

    Prints its base URL on stdout (one line, for scripts); point a job's `base_url` at it.
    It answers like OpenRouter — same routes, bodies, headers and errors — with deterministic
    answers, a ledger of what it billed (GET /_sim/ledger) and counters (GET /_sim/stats).
    """
    import asyncio

    from pipeline.simulator import FaultSpecError, Latency, SimConfig, parse_rates

    try:
        config = SimConfig(
            latency=Latency.parse(latency),
            fault_rates=parse_rates(fault_rates),
            seed=seed,
            rate_limit=rate_limit,
            rate_window=rate_window,
            retry_after=retry_after,
            credit_limit=credit_limit,
            ready_after=ready_after,
            keepalive_interval=keepalive,
            completion_words=completion_words,
            api_keys=frozenset(api_keys) or None,
            down_models=frozenset(down_models),
            flagged_terms=flagged_terms,
        )
    except FaultSpecError as exc:
        raise click.BadParameter(str(exc)) from None

    def announce(running: RunningSimulator) -> None:
        click.echo(running.base_url)
        sys.stdout.flush()
        click.echo(
            f"OpenRouter simulator listening on {running.base_url} (Ctrl-C to stop)", err=True
        )

    from pipeline.simulator import serve_forever

    try:
        asyncio.run(serve_forever(config, host, port, announce))
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@cli.command(context_settings=CONTEXT)
@click.argument("config_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--input", "input_path", metavar="PATH", help="Input file or glob (CSV, Parquet, JSONL)."
)
@click.option(
    "--input-format",
    type=click.Choice(["csv", "parquet", "jsonl"]),
    help="Input format, when the extension does not say.",
)
@click.option("--output", "output_path", metavar="PATH", help="Output Parquet file.")
@click.option("--prompt-column", metavar="COL", help="Column holding the whole prompt.")
@click.option(
    "--template", metavar="TEXT", help="Prompt template over columns, e.g. 'Label: {review}'."
)
@click.option(
    "--messages-column", metavar="COL", help="Column holding a JSON list of chat messages."
)
@click.option("--system", metavar="TEXT", help="System prompt sent before each prompt.")
@click.option(
    "--id-column", metavar="COL", help="Column of unique row ids (default: row position)."
)
@click.option(
    "--model-column", metavar="COL", help="Column naming a model per row (empty: --model)."
)
@click.option("--model", metavar="ID", help="Model id [default: mistralai/mixtral-8x7b-instruct].")
@click.option(
    "--base-url",
    metavar="URL",
    help="OpenAI-compatible API base URL [default: https://openrouter.ai/api/v1].",
)
@click.option("--temperature", type=float, help="Sampling temperature (0-2).")
@click.option("--max-tokens", type=int, help="Cap on output tokens per request.")
@click.option(
    "--concurrency", type=int, metavar="N", help="Requests in flight at most [default: 16]."
)
@click.option("--rps", type=float, metavar="R", help="Requests per second at most.")
@click.option("--rpm", type=float, metavar="R", help="Requests per minute at most.")
@click.option(
    "--tpm", type=float, metavar="T", help="Tokens (prompt + max output) per minute at most."
)
@click.option(
    "--max-retries",
    type=int,
    metavar="N",
    help="Attempts per row at most, the first included [default: 6].",
)
@click.option(
    "--timeout", type=float, metavar="SECONDS", help="Time one attempt may take [default: 300]."
)
@click.option(
    "--journal", "journal_path", metavar="PATH", help="Checkpoint file [default: OUTPUT.journal]."
)
@click.option(
    "--result-prefix",
    metavar="TEXT",
    help="Prefix for the result columns, if the input uses their names.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    metavar="N",
    help="Only the first N rows: a cheap trial run.",
)
@click.option(
    "--restart", is_flag=True, help="Discard the journal and start over (pays again for done rows)."
)
@click.option(
    "--simulate", is_flag=True, help="Use the bundled OpenRouter simulator: no key, no network."
)
@click.option(
    "--quiet", "-q", is_flag=True, help="No progress bar: a plain progress line every 10 s."
)
def run(
    config_file: Path | None,
    limit: int | None,
    restart: bool,
    quiet: bool,
    simulate: bool,
    **flags: Any,
) -> None:
    """Run a job: prompts in, completions with tokens and cost out, resumable.

    CONFIG_FILE is a TOML job description (see configs/example.toml); flags override it.
    The API key comes from OPENROUTER_API_KEY (or request.key_file), never from a flag.
    Running the same command again resumes: rows already done are not sent again.

    Exit codes: 0 all rows ok; 1 the job could not run (nothing sent); 2 usage error;
    3 finished, some rows failed; 4 stopped early (bad key, out of credits), resumable;
    130/143 interrupted (journal saved), resumable.
    """
    from pipeline import config as config_module
    from pipeline.errors import Interrupted, JobStopped, UserError
    from pipeline.job import run_job

    overrides = {key: flags[option] for key, option in _RUN_FLAGS.items()}
    if simulate:
        overrides["request.simulate"] = True
    try:
        config = config_module.load(config_file, overrides)
        report = run_job(config, limit=limit, restart=restart, quiet=quiet)
    except UserError as exc:
        _fail(str(exc), exc.exit_code)
    except JobStopped as exc:
        _fail(f"{exc}", exc.exit_code)
    except Interrupted as exc:
        _fail(
            "interrupted; the journal is saved. Run the same command again to resume.",
            exc.exit_code,
        )
    totals = report.job_totals
    cost = totals.get("cost_usd") or 0.0
    click.echo(
        f"done: {report.total_rows:,} rows: {totals.get('ok', 0):,} ok, {totals.get('failed', 0):,} failed "
        f"({report.skipped:,} done by earlier runs); {totals.get('prompt_tokens', 0):,} prompt + "
        f"{totals.get('completion_tokens', 0):,} completion tokens; ${cost:.6f}; "
        f"{report.wall_seconds:.1f}s; {report.retries} retries; wrote {report.output}",
        err=True,
    )
    sys.exit(report.exit_code)


_RUN_FLAGS = {
    "input.path": "input_path", "input.format": "input_format", "output.path": "output_path",
    "prompt.column": "prompt_column", "prompt.template": "template", "prompt.messages_column": "messages_column",
    "prompt.system": "system", "input.id_column": "id_column", "prompt.model_column": "model_column",
    "request.model": "model", "request.base_url": "base_url", "request.temperature": "temperature",
    "request.max_tokens": "max_tokens", "limits.concurrency": "concurrency", "limits.rps": "rps",
    "limits.rpm": "rpm", "limits.tpm": "tpm", "retry.max_attempts": "max_retries",
    "request.timeout": "timeout", "output.journal": "journal_path", "output.result_prefix": "result_prefix",
}  # fmt: skip


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="pipeline")
