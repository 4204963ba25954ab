"""The `pipeline` command line: parses options, calls the library, maps errors to exit codes.

The job options come from one table (`options.JOB_OPTIONS`), their defaults from the config's
dataclasses, and every command maps errors to messages and exit codes through `exits`. Heavy
libraries (polars, pyarrow, aiohttp) are imported inside the commands that need them, so
`pipeline --help` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from pipeline import __version__, keys
from pipeline import config as config_module
from pipeline.errors import (
    BatchesPending,
    Interrupted,
    Locked,
    OutOfTime,
    PipelineError,
    Terminated,
)
from pipeline.options import JOB_OPTIONS, Option, show
from pipeline.simulate_command import CONTEXT, simulate


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="pipeline")
def cli() -> None:
    """Run large batches of prompts through OpenRouter or any OpenAI-compatible API.

    Concurrent and rate-limited, resumable after a crash without paying twice, with exact
    cost per row. Start with `pipeline simulate` to get a local OpenRouter to try things on.
    """


cli.add_command(simulate)

Fail = Callable[[str, int], NoReturn]
INTERRUPTED = "interrupted; the journal is saved. Run the same command again to resume."


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def exits(fail: Fail = _fail, interrupted: str = INTERRUPTED) -> Iterator[None]:
    """Every command's one mapping from errors to a message and an exit code: ours carry their
    code; Ctrl-C before the run's own handler is in place (reading the input, say) is 130."""
    try:
        yield
    except Interrupted as exc:
        fail(interrupted, exc.exit_code)
    except KeyboardInterrupt as exc:
        fail(interrupted, _interrupt_code(exc))
    except PipelineError as exc:
        fail(str(exc), exc.exit_code)


def _click_option(option: Option) -> Any:
    kwargs: dict[str, Any] = {"metavar": option.metavar}
    if option.kind == "flag":
        kwargs.update(
            is_flag=True, default=None, flag_value=True if option.sets is None else option.sets
        )
    elif option.kind == "choice":
        kwargs["type"] = click.Choice(list(option.choices))
    elif option.kind != "text":
        kwargs["type"] = {"int": int, "float": float}[option.kind]
    help_text = option.help_with(config_module.default(option.key))
    return click.option(option.flag, option.param, help=help_text, **kwargs)


def job_options(command: Any, without: tuple[str, ...] = ()) -> Any:
    """Add CONFIG_FILE, every job flag (but those of the keys `without`), --limit and
    --simulate to a command."""
    for option in reversed(JOB_OPTIONS):
        if option.key not in without:
            command = _click_option(option)(command)
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


def _redo_selectors(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> Any:
    from pipeline.redo import BadSelector, parse_selectors

    try:
        return parse_selectors(value)
    except BadSelector as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _redo_where(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    from pipeline.redo import BadSelector, check_where

    try:
        return None if value is None else check_where(value)
    except BadSelector as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def redo_options(command: Any) -> Any:
    """--redo and --redo-where: rows done before to send again under the current settings."""
    command = click.option(
        "--redo-where", metavar="EXPR", callback=_redo_where, expose_value=True,
        help="Also send again the rows done before where this SQL condition over the result columns holds, e.g. \"cost_usd > 0.01\".",
    )(command)  # fmt: skip
    return click.option(
        "--redo", metavar="SELECTOR", multiple=True, callback=_redo_selectors,
        help="Send again, under the current settings (a changed model or max_tokens is accepted), the rows done before that are: failed, length (cut off by max_tokens), invalid (outside the labels / schema) or error_type=KIND; repeatable. Every other row keeps its answer.",
    )(command)  # fmt: skip


def _redo(selectors: tuple[str, ...], where: str | None) -> Any:
    from pipeline.redo import Redo

    return Redo(selectors, where) if selectors or where is not None else None


def _load_config(config_file: Path | None, simulate: bool, flags: dict[str, Any]) -> Any:
    overrides = {option.key: flags.get(option.param) for option in JOB_OPTIONS}
    if simulate:
        overrides["request.simulate"] = True
    if flags.get("endpoint") is not None:  # `pipeline embed`
        overrides["request.endpoint"] = flags["endpoint"]
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
@redo_options
def run(
    config_file: Path | None,
    limit: int | None,
    redo: tuple[str, ...],
    redo_where: str | None,
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
    from pipeline import render
    from pipeline.progress import LogSettings, json_line

    logs = LogSettings(json=log_format == "json", file=log_file, prompts=log_prompts)
    try:
        stream = logs.open()
    except OSError as exc:
        _fail(f"--log-file {log_file} cannot be opened: {exc.strerror}", 1)

    def fail(message: str, code: int) -> NoReturn:
        # 5 (the previous run still going), 6 (out of time, resumes next run) and 7 (batches
        # pending) are what a scheduled job expects: said once where the log goes, never as an
        # `error:` on stderr that cron would mail every hour.
        expected = code in (Locked.exit_code, OutOfTime.exit_code, BatchesPending.exit_code)
        line = message if expected else f"error: {message}"
        if logs.json:
            event = "exit" if expected else "error"
            print(json_line(event, message=message, exit_code=code), file=stream, flush=True)
        else:
            print(line, file=stream, flush=True)
        if stream is not sys.stderr and not expected:  # an error also reaches stderr
            click.echo(line, err=True)
        sys.exit(code)

    with exits(fail):
        chosen = _redo(redo, redo_where)
        config = _load_config(config_file, simulate, flags)
        if not restart:  # the journal's integrity check leaves the GIL to the imports below
            from pipeline.journal_file import precheck

            precheck(config.output.journal_path)
        from pipeline.job import RunOptions, run_job

        options = RunOptions(
            limit=limit, restart=restart, quiet=quiet, logs=logs, stream=stream, redo=chosen
        )
        report = run_job(config, options)
    if logs.json:
        print(json_line("summary", **render.run_summary_json(report)), file=stream, flush=True)
    else:
        click.echo(render.summary(report, config.input.on_change), file=stream)
    sys.exit(report.exit_code)


def _embed(**params: Any) -> None:
    """`pipeline embed`: `pipeline run` of the job as an embeddings job."""
    assert run.callback is not None
    run.callback(**params, endpoint="embeddings")


cli.add_command(
    click.Command(
        "embed",
        context_settings=CONTEXT,
        params=run.params,
        callback=_embed,
        help="Run a job as an embeddings job: `pipeline run` with request.endpoint = "
        '"embeddings" (the prompt column to /embeddings, an `embedding` column out).\n\n'
        "Options, resuming and exit codes are those of `pipeline run`.",
    )
)


@cli.command(context_settings=CONTEXT)
@job_options
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object, for scripts and monitoring."
)
def status(
    config_file: Path | None, limit: int | None, simulate: bool, as_json: bool, **flags: Any
) -> None:
    """How far a job is: rows done, failed and left, spend, recent rate, and whether a run holds
    its lock. Reads the journal without the lock, so it works while the job runs.

    CONFIG_FILE may also be the job's output or journal path: the journal alone then says what
    is done, failed and spent, but not the rows in all or left (that needs the input)."""
    from pipeline import render

    with exits():
        from pipeline.status import job_status, names_job_file, path_status

        if config_file is not None and names_job_file(config_file):
            given = [o.flag for o in JOB_OPTIONS if flags.get(o.param) is not None]
            given += ["--limit"] * (limit is not None) + ["--simulate"] * simulate
            if given:
                _fail(
                    f"{given[0]} needs the job's config: with an output or journal path "
                    f"({config_file}) status reads only the journal",
                    2,
                )
            figures = path_status(config_file)
        else:
            figures = job_status(_load_config(config_file, simulate, flags), limit)
    click.echo(json.dumps(figures, indent=2) if as_json else render.status(figures))


@cli.command(context_settings=CONTEXT)
@functools.partial(job_options, without=("output.path",))
@click.option(
    "--output",
    "target",
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="Where to write the export [default: OUTPUT with .partial.parquet].",
)
def export(
    config_file: Path | None, limit: int | None, simulate: bool, target: Path | None, **flags: Any
) -> None:
    """Write the rows done so far, from the journal, while a job is stopped or running.

    The same columns as the output: rows done as they will be there, failed rows with their
    error, rows not done yet with status "pending" and no result. The job's lock is not taken,
    so a run going on is not disturbed; the file appears whole. The job's own output path comes
    from CONFIG_FILE (--output names the export).
    """
    with exits():
        from pipeline.export import export as export_job

        done = export_job(_load_config(config_file, simulate, flags), target, limit)
    click.echo(done.summary())


@cli.command(context_settings=CONTEXT)
@job_options
@click.option(
    "--pilot",
    type=click.IntRange(min=1),
    metavar="N",
    help="Really run N rows (journaled) and extrapolate from them.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
@redo_options
def estimate(
    config_file: Path | None,
    limit: int | None,
    redo: tuple[str, ...],
    redo_where: str | None,
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
    from pipeline import render

    with exits(interrupted="interrupted; the pilot's journal is saved."):
        from pipeline.estimate import estimate as estimate_job

        config = _load_config(config_file, simulate, flags)
        if pilot and (redo or redo_where is not None):
            raise click.UsageError(
                "--pilot cannot be combined with --redo: estimate the redo without --pilot"
            )
        result = estimate_job(config, limit=limit, pilot=pilot, redo=_redo(redo, redo_where))
    click.echo(json.dumps(result.as_dict(), indent=2) if as_json else render.estimate(result))


@cli.command(context_settings=CONTEXT)
@click.option("--search", metavar="TEXT", help="Only models whose id or name contains TEXT.")
@click.option(
    "--base-url",
    metavar="URL",
    default=None,
    help=f"API base URL [default: {show(config_module.default('request.base_url'))}].",
)
@click.option("--simulate", is_flag=True, help="List the bundled simulator's models.")
@click.option("--refresh", is_flag=True, help="Fetch now instead of using the cached list.")
@click.option(
    "--ttl",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help=f"Age at which the cached list is refetched [default: {show(config_module.default('cost.prices_ttl'))}].",
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

    from pipeline import render

    with exits():
        from pipeline.client import connect
        from pipeline.money import load_catalogue

        config = config_module.load(None, {
            "input.path": "-", "output.path": "-", "prompt.column": "-", "request.base_url": base_url,
            "request.simulate": simulate or None, "cost.prices_ttl": ttl,
        })  # fmt: skip
        # Listing models needs no key on OpenRouter: send one only if the user has set it.
        key = keys.SIMULATOR_KEY if simulate else os.environ.get(keys.KEY_ENV, "")

        async def fetch() -> Any:
            async with connect(config, key) as client:
                return await load_catalogue(client, config, refresh=refresh, required=True)

        catalogue = asyncio.run(fetch())
    found = catalogue.search(search)
    if as_json:
        click.echo(json.dumps(render.models_json(found), indent=2))
        return
    click.echo(render.models(found))
    click.echo(render.models_footer(found, catalogue), err=True)


def main() -> None:
    """Console-script entry point (after `pipeline.__main__`, which guards the imports).

    Leaves without the interpreter's teardown: after a big job, freeing every object and module
    takes a quarter of a second that nobody needs (measured by benchmarks/run.py). Each command
    has closed and renamed its files before it returns; only the streams are left to flush."""
    _signals_raise()
    try:
        code = cli.main(prog_name="pipeline", standalone_mode=False)
    except SystemExit as exc:
        if not isinstance(exc.code, int | None):
            raise
        code = exc.code or 0
    except click.exceptions.Abort as exc:  # Ctrl-C outside a command's own mapping
        interrupt = exc.__cause__ or exc.__context__
        code = _interrupt_code(interrupt)
        click.echo(f"error: {INTERRUPTED}", err=True)
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    code = code if isinstance(code, int) else 0
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _signals_raise() -> None:
    """SIGINT raises KeyboardInterrupt and SIGTERM its kind `Terminated`, so each phase (reading
    the input, say) unwinds through its `finally`s to 130 / 143; a run handles both itself."""

    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    handlers = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: terminate}
    for signum, handler in handlers.items():
        if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored (nohup): stays ignored
            signal.signal(signum, handler)


def _interrupt_code(exc: BaseException | None) -> int:
    """130 for Ctrl-C's KeyboardInterrupt, 143 for SIGTERM's `Terminated`."""
    return getattr(exc, "exit_code", 130)
