"""The `pipeline` command line: parses options, calls the library, maps errors to exit codes.

Heavy libraries (polars, pyarrow, aiohttp) are imported inside the commands that need them, so
`pipeline --help` stays fast.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
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
@click.option(
    "--omit-cost", is_flag=True, help="Leave usage.cost out, like a plain OpenAI-compatible server."
)
@click.option(
    "--native-n",
    is_flag=True,
    help="Honour `n` (several choices per answer) like an OpenAI-compatible server; OpenRouter has no `n`.",
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
    omit_cost: bool,
    native_n: bool,
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
            omit_cost=omit_cost,
            native_n=native_n,
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


# Flags shared by every command that runs or describes a job: (config key, parameter, option).
_JOB_OPTIONS: list[tuple[str, str, Any]] = [
    ("input.path", "input_path", click.option("--input", "input_path", metavar="PATH", help="Input file or glob (CSV, Parquet, JSONL).")),
    ("input.format", "input_format", click.option("--input-format", type=click.Choice(["csv", "parquet", "jsonl"]), help="Input format, when the extension does not say.")),
    ("input.incremental", "incremental", click.option("--incremental", is_flag=True, default=None, help="The input grows between runs: send only rows not done before.")),
    ("input.reprocess_changed", "reprocess_changed", click.option("--reprocess-changed", is_flag=True, default=None, help="With --incremental: send rows that changed since they were done again.")),
    ("output.path", "output_path", click.option("--output", "output_path", metavar="PATH", help="Output Parquet file.")),
    ("prompt.column", "prompt_column", click.option("--prompt-column", metavar="COL", help="Column holding the whole prompt.")),
    ("prompt.template", "template", click.option("--template", metavar="TEXT", help="Prompt template over columns, e.g. 'Label: {review}'.")),
    ("prompt.messages_column", "messages_column", click.option("--messages-column", metavar="COL", help="Column holding a JSON list of chat messages.")),
    ("prompt.system", "system", click.option("--system", metavar="TEXT", help="System prompt sent before each prompt.")),
    ("input.id_column", "id_column", click.option("--id-column", metavar="COL", help="Column of unique row ids (default: row position).")),
    ("prompt.model_column", "model_column", click.option("--model-column", metavar="COL", help="Column naming a model per row (empty: --model).")),
    ("request.model", "model", click.option("--model", metavar="ID", help="Model id [default: mistralai/mixtral-8x7b-instruct].")),
    ("request.models", "models", click.option("--models", metavar="A,B", help="Run every prompt through each of these models (a row each).")),
    ("request.n", "n", click.option("--n", "n", type=int, metavar="N", help="Samples per prompt and model (a row each) [default: 1].")),
    ("request.labels", "labels", click.option("--labels", metavar="A,B,C", help="Answer with one of these labels: a 'label' column.")),
    ("request.response_schema", "schema", click.option("--schema", "schema", metavar="FILE", help="JSON Schema file for structured answers: a typed column per property.")),
    ("request.base_url", "base_url", click.option("--base-url", metavar="URL", help="OpenAI-compatible API base URL [default: https://openrouter.ai/api/v1].")),
    ("request.temperature", "temperature", click.option("--temperature", type=float, help="Sampling temperature (0-2).")),
    ("request.max_tokens", "max_tokens", click.option("--max-tokens", type=int, help="Cap on output tokens per request.")),
    ("request.cache", "cache_path", click.option("--cache", "cache_path", metavar="PATH", help="Response cache shared across jobs (sqlite file).")),
    ("limits.concurrency", "concurrency", click.option("--concurrency", type=int, metavar="N", help="Requests in flight at most [default: 16].")),
    ("limits.rps", "rps", click.option("--rps", type=float, metavar="R", help="Requests per second at most.")),
    ("limits.rpm", "rpm", click.option("--rpm", type=float, metavar="R", help="Requests per minute at most.")),
    ("limits.max_runtime", "max_runtime", click.option("--max-runtime", metavar="DURATION", help="Stop in time to save everything within this (90s, 55m, 2h); exit 6, resumable.")),
    ("limits.tpm", "tpm", click.option("--tpm", type=float, metavar="T", help="Tokens (prompt + max output) per minute at most.")),
    ("retry.max_attempts", "max_retries", click.option("--max-retries", type=int, metavar="N", help="Attempts per row at most, the first included [default: 6].")),
    ("request.timeout", "timeout", click.option("--timeout", type=float, metavar="SECONDS", help="Time one attempt may take [default: 300].")),
    ("cost.max_cost", "max_cost", click.option("--max-cost", type=float, metavar="USD", help="Stop before the job's spend could pass this.")),
    ("output.journal", "journal_path", click.option("--journal", "journal_path", metavar="PATH", help="Checkpoint file [default: OUTPUT.journal].")),
    ("output.result_prefix", "result_prefix", click.option("--result-prefix", metavar="TEXT", help="Prefix for the result columns, if the input uses their names.")),
]  # fmt: skip


def job_options(command: Any) -> Any:
    """Add CONFIG_FILE, every job flag, --limit and --simulate to a command."""
    for _, _, option in reversed(_JOB_OPTIONS):
        command = option(command)
    command = click.option(
        "--simulate", is_flag=True, help="Use the bundled OpenRouter simulator: no key, no network."
    )(command)
    command = click.option(
        "--limit",
        type=click.IntRange(min=1),
        metavar="N",
        help="Only the first N rows: a cheap trial run.",
    )(command)
    return click.argument(
        "config_file", required=False, type=click.Path(dir_okay=False, path_type=Path)
    )(command)


def _load_config(config_file: Path | None, simulate: bool, flags: dict[str, Any]) -> Any:
    from pipeline import config as config_module

    overrides = {key: flags[param] for key, param, _ in _JOB_OPTIONS}
    if simulate:
        overrides["request.simulate"] = True
    return config_module.load(config_file, overrides)


@cli.command(context_settings=CONTEXT)
@job_options
@click.option(
    "--restart", is_flag=True, help="Discard the journal and start over (pays again for done rows)."
)
@click.option(
    "--quiet", "-q", is_flag=True, help="No progress bar: a plain progress line every 10 s."
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON object per line (start, progress, rate_limited, row_failed, stopping, summary, error).",
)
@click.option(
    "--log-file",
    metavar="PATH",
    help="Append progress and log lines here instead of stderr (errors still also go to stderr).",
)
@click.option(
    "--log-prompts", is_flag=True, help="Put the prompt of each failed row in the log (off: never)."
)
def run(
    config_file: Path | None,
    limit: int | None,
    restart: bool,
    quiet: bool,
    log_format: str,
    log_file: str | None,
    log_prompts: bool,
    simulate: bool,
    **flags: Any,
) -> None:
    """Run a job: prompts in, completions with tokens and cost out, resumable.

    CONFIG_FILE is a TOML job description (see configs/example.toml); flags override it.
    The API key comes from OPENROUTER_API_KEY (or request.key_file), never from a flag.
    Running the same command again resumes: rows already done are not sent again.

    Exit codes: 0 all rows ok; 1 the job could not run (nothing sent); 2 usage error;
    3 finished, some rows failed; 4 stopped early (bad key, out of credits, budget reached),
    resumable; 5 another run of this job holds its lock (nothing touched); 6 --max-runtime
    reached (journal saved), resumable; 130/143 interrupted (journal saved), resumable.
    """
    from pipeline.errors import Interrupted, JobStopped, Locked, OutOfTime, UserError
    from pipeline.job import RunOptions, run_job
    from pipeline.progress import LogSettings, json_line

    logs = LogSettings(json=log_format == "json", file=log_file, prompts=log_prompts)
    try:
        stream = logs.open()
    except OSError as exc:
        _fail(f"--log-file {log_file} cannot be opened: {exc.strerror}", 1)

    def fail(message: str, code: int) -> NoReturn:
        if logs.json:
            print(json_line("error", message=message, exit_code=code), file=stream, flush=True)
        elif stream is not sys.stderr:
            print(f"error: {message}", file=stream, flush=True)
        if not logs.json or stream is not sys.stderr:
            click.echo(f"error: {message}", err=True)
        sys.exit(code)

    options = RunOptions(limit=limit, restart=restart, quiet=quiet, logs=logs, stream=stream)
    try:
        config = _load_config(config_file, simulate, flags)
        report = run_job(config, options)
    except (UserError, JobStopped, Locked, OutOfTime) as exc:
        fail(str(exc), exc.exit_code)
    except Interrupted as exc:
        fail(
            "interrupted; the journal is saved. Run the same command again to resume.",
            exc.exit_code,
        )
    if logs.json:
        summary = {
            "exit_code": report.exit_code, "rows": report.total_rows, "done_by_earlier_runs": report.skipped,
            "wall_s": round(report.wall_seconds, 3), "retries": report.retries, "output": str(report.output),
            "changed_rows": report.changed,
            **report.job_totals.as_dict(),
        }  # fmt: skip
        print(json_line("summary", **summary), file=stream, flush=True)
    else:
        click.echo(_summary(report, config.input.reprocess_changed), file=stream)
    sys.exit(report.exit_code)


def _summary(report: Any, reprocess_changed: bool) -> str:
    t = report.job_totals
    lines = [
        f"done: {report.total_rows:,} rows: {t.ok:,} ok, {t.failed:,} failed "
        f"({report.skipped:,} done by earlier runs) in {report.wall_seconds:.1f}s, {report.retries} retries; wrote {report.output} ({report.write_seconds:.2f}s at the end, {report.write_cpu_seconds:.2f}s CPU in all)",
        f"  cost ${t.cost_usd:.6f} for {t.prompt_tokens:,} prompt + {t.completion_tokens:,} completion tokens",
    ]
    if t.duplicates_reused or t.cache_hits:
        lines.append(
            f"  not paid: {t.duplicates_reused:,} rows reused an identical request, {t.cache_hits:,} came from the cache"
        )
    extra_spend = []  # paid for, yet in no row's cost
    if t.lost_attempts:
        extra_spend.append(
            f"{t.paid_twice_requests} attempt(s) billed although their answer never arrived cost ${t.paid_twice_cost_usd:.6f}"
            + (
                f"; {t.lost_attempts_unreconciled} not yet known (a later run checks again)"
                if t.lost_attempts_unreconciled
                else ""
            )
        )
    if t.replaced_answers:
        extra_spend.append(
            f"{t.replaced_answers} earlier answer(s), since replaced by a new one, cost ${t.replaced_cost_usd:.6f}"
        )
    if extra_spend:
        lines.append(f"  true spend ${t.true_cost_usd:.6f}: {'; '.join(extra_spend)}")
    if report.changed:
        again = (
            "sent again"
            if reprocess_changed
            else "kept their earlier answers; --reprocess-changed sends them again"
        )
        lines.append(f"  {report.changed:,} row(s) changed since they were done: {again}")
    if t.rows_cost_unknown:
        lines.append(
            f"  {t.rows_cost_unknown:,} row(s) have no cost: the endpoint reported none and lists no price"
        )
    by_model = t.by_model
    if len(by_model) > 1:
        for model, m in by_model.items():
            lines.append(
                f"  {model}: {m.rows:,} rows, {m.prompt_tokens:,} + {m.completion_tokens:,} tokens, ${m.cost_usd:.6f}"
            )
    return "\n".join(lines)


@cli.command(context_settings=CONTEXT)
@job_options
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object, for scripts and monitoring."
)
def status(
    config_file: Path | None, limit: int | None, simulate: bool, as_json: bool, **flags: Any
) -> None:
    """How far a job is: rows done, failed and left, spend, recent rate, and whether a run holds
    its lock. Reads the journal without the lock, so it works while the job runs."""
    import json

    from pipeline.errors import UserError
    from pipeline.status import job_status

    try:
        figures = job_status(_load_config(config_file, simulate, flags), limit)
    except UserError as exc:
        _fail(str(exc), exc.exit_code)
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    running = f"running (pid {figures['lock_holder']})" if figures["running"] else "not running"
    click.echo(
        f"{figures['rows']:,} rows: {figures['done']:,} done ({figures['ok']:,} ok, {figures['failed']:,} failed), "
        f"{figures['remaining']:,} to do; {running}\n"
        f"spent ${figures['cost_usd']:.6f} (true ${figures['true_cost_usd']:.6f}); "
        f"{figures['rows_per_s_last_minute']:.1f} rows/s over the last minute\n"
        f"output {figures['output']}: {'written' if figures['output_exists'] else 'not written yet'}"
    )


@cli.command(context_settings=CONTEXT)
@job_options
@click.option(
    "--pilot",
    type=click.IntRange(min=1),
    metavar="N",
    help="Really run N rows (journaled) and extrapolate from them.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def estimate(
    config_file: Path | None,
    limit: int | None,
    simulate: bool,
    pilot: int | None,
    as_json: bool,
    **flags: Any,
) -> None:
    """Estimate what a job (or the rest of a resumed one) will cost, without sending it.

    Counts rows still to do, estimates prompt tokens (characters / 4) and output tokens
    (cost.expected_output_tokens or max_tokens), and prices them from /models. --pilot N runs
    N rows for real; they are journaled, so the job never pays for them again.
    """
    import json

    from pipeline.errors import Interrupted, JobStopped, Locked, UserError
    from pipeline.estimate import estimate as estimate_job

    try:
        config = _load_config(config_file, simulate, flags)
        result = estimate_job(config, limit=limit, pilot=pilot)
    except (UserError, JobStopped, Locked) as exc:
        _fail(str(exc), exc.exit_code)
    except Interrupted as exc:
        _fail("interrupted; the pilot's journal is saved.", exc.exit_code)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    click.echo(f"rows: {result.total_rows:,} in the input, {result.done_rows:,} done, {result.todo_rows:,} to do"
               + (f" ({result.unique_requests:,} distinct requests)" if result.unique_requests is not None else ""))  # fmt: skip
    for model, m in result.by_model.items():
        cost = (
            f"${m.cost_low:.4f} - ${m.cost_high:.4f}"
            if m.cost_low is not None and m.cost_high is not None
            else "price unknown"
        )
        click.echo(
            f"  {model}: {m.rows:,} requests, ~{m.prompt_tokens:,} prompt tokens, {m.output_low:,}-{m.output_high:,} output tokens: {cost}"
        )
    if result.cost_low is not None and result.cost_high is not None:
        click.echo(f"estimated cost: ${result.cost_low:.4f} - ${result.cost_high:.4f}")
    click.echo(f"how: {result.method}")
    for note in result.notes:
        click.echo(f"note: {note}")
    if result.pilot:
        p = result.pilot
        click.echo(f"pilot: {p['rows']} rows cost ${p['cost_usd']:.6f} (${p['cost_per_row_usd'] or 0:.6f} per row); "
                   f"projected for the rest: ${p['projected_remaining_usd'] or 0:.4f}, whole job: ${p['projected_total_usd'] or 0:.4f}")  # fmt: skip


@cli.command(context_settings=CONTEXT)
@click.option("--search", metavar="TEXT", help="Only models whose id or name contains TEXT.")
@click.option(
    "--base-url",
    metavar="URL",
    default=None,
    help="API base URL [default: https://openrouter.ai/api/v1].",
)
@click.option("--simulate", is_flag=True, help="List the bundled simulator's models.")
@click.option("--refresh", is_flag=True, help="Fetch now instead of using the cached list.")
@click.option(
    "--ttl",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="Age at which the cached list is refetched [default: 21600].",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(
    search: str | None,
    base_url: str | None,
    simulate: bool,
    refresh: bool,
    ttl: float | None,
    as_json: bool,
) -> None:
    """List models with context length and prices per million tokens (from /models, cached)."""
    import asyncio
    import json
    import os

    from pipeline import config as config_module
    from pipeline.client import connect
    from pipeline.errors import UserError
    from pipeline.money import load_catalogue

    try:
        config = config_module.load(None, {
            "input.path": "-", "output.path": "-", "prompt.column": "-", "request.base_url": base_url,
            "request.simulate": simulate or None, "cost.prices_ttl": ttl,
        })  # fmt: skip
    except UserError as exc:
        _fail(str(exc), exc.exit_code)
    key = config_module.SIMULATOR_KEY if simulate else os.environ.get(config_module.KEY_ENV, "")

    async def fetch() -> Any:
        async with connect(config, key) as client:
            return await load_catalogue(client, config, refresh=refresh)

    catalogue = asyncio.run(fetch())
    if catalogue is None:
        _fail(f"{config.request.base_url}/models did not answer with a model list", 1)
    found = catalogue.search(search)
    if as_json:
        click.echo(json.dumps([
            {"id": m.id, "name": m.name, "context_length": m.context_length,
             "prompt_per_million": float(m.prompt * 1_000_000), "completion_per_million": float(m.completion * 1_000_000)}
            for m in found
        ], indent=2))  # fmt: skip
        return
    width = max((len(m.id) for m in found), default=10)
    click.echo(f"{'model':<{width}}  {'context':>9}  {'$/M in':>9}  {'$/M out':>9}")
    for m in found:
        context = f"{m.context_length:,}" if m.context_length else "?"
        click.echo(
            f"{m.id:<{width}}  {context:>9}  {m.per_million(m.prompt):>9}  {m.per_million(m.completion):>9}"
        )
    click.echo(
        f"{len(found)} model(s); prices as of {time.strftime('%Y-%m-%d %H:%M', time.localtime(catalogue.fetched_at))}",
        err=True,
    )


def main() -> None:
    """Console-script entry point.

    Leaves without the interpreter's teardown: after a big job, freeing every object and module
    takes a quarter of a second that nobody needs (measured by benchmarks/run.py). Each command
    has closed and renamed its files before it returns; only the streams are left to flush."""
    try:
        cli(prog_name="pipeline")
    except SystemExit as exc:
        if not isinstance(exc.code, int | None):
            raise
        code = exc.code or 0
    else:
        code = 0
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
