"""`pipeline simulate`: the bundled OpenRouter simulator's command line, one option per simulator
setting. Kept apart from the job commands in `cli`; the simulator itself is imported only when
the command runs, so `pipeline --help` stays fast."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from pipeline.simulator import RunningSimulator

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command(context_settings=CONTEXT)
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
    help="Seconds that injected 429/503 faults ask clients to wait.",
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
@click.option(
    "--strict-openai",
    is_flag=True,
    help="Refuse (400) body fields OpenAI's chat API does not know, like a strict OpenAI-compatible server.",
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
    strict_openai: bool,
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
            strict_openai=strict_openai,
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
