"""prompt-pipeline: batch prompts through OpenRouter-compatible chat APIs, durably and cheaply.

The public API, for running jobs from Python (a notebook, a scheduler, another tool)::

    import pipeline

    config = pipeline.load_config("configs/example.toml", {"limits.concurrency": 8})
    report = pipeline.run_job(config, pipeline.RunOptions(quiet=True))
    print(report.exit_code, report.job_totals.cost_usd)

    labeled = pipeline.run_frame(df, template="Sentiment of: {text}",
                                 request={"labels": ["positive", "negative"]})

Everything listed in `__all__` stays; other modules are internal. Names are imported when
first used, so `import pipeline` (and `pipeline --help`) loads no heavy library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "load_config": "pipeline.config",
    "JobConfig": "pipeline.config",
    "run_job": "pipeline.job",
    "run_frame": "pipeline.frames",
    "RunOptions": "pipeline.job",
    "JobReport": "pipeline.job",
    "LogSettings": "pipeline.progress",
    "Totals": "pipeline.records",
    "job_status": "pipeline.status",
    "estimate_job": "pipeline.estimate",
    "Estimate": "pipeline.estimate",
    "read_metadata": "pipeline.output",
    "PipelineError": "pipeline.errors",
    "UserError": "pipeline.errors",
    "ConfigError": "pipeline.errors",
    "InputError": "pipeline.errors",
    "JournalError": "pipeline.errors",
    "JobStopped": "pipeline.errors",
    "AuthError": "pipeline.errors",
    "CreditsError": "pipeline.errors",
    "BudgetReached": "pipeline.budget",
    "TrustError": "pipeline.errors",
    "Locked": "pipeline.errors",
    "OutOfTime": "pipeline.errors",
    "Interrupted": "pipeline.errors",
}
# Public name -> the name in its module (`pipeline.estimate` is the module's own name).
_RENAMED = {"load_config": "load", "estimate_job": "estimate"}

__all__ = [
    "AuthError",
    "BudgetReached",
    "ConfigError",
    "CreditsError",
    "Estimate",
    "InputError",
    "Interrupted",
    "JobConfig",
    "JobReport",
    "JobStopped",
    "JournalError",
    "Locked",
    "LogSettings",
    "OutOfTime",
    "PipelineError",
    "RunOptions",
    "Totals",
    "TrustError",
    "UserError",
    "__version__",
    "estimate_job",
    "job_status",
    "load_config",
    "read_metadata",
    "run_frame",
    "run_job",
]

if TYPE_CHECKING:
    from pipeline.budget import BudgetReached
    from pipeline.config import JobConfig
    from pipeline.config import load as load_config
    from pipeline.errors import (
        AuthError,
        ConfigError,
        CreditsError,
        InputError,
        Interrupted,
        JobStopped,
        JournalError,
        Locked,
        OutOfTime,
        PipelineError,
        TrustError,
        UserError,
    )
    from pipeline.estimate import Estimate
    from pipeline.estimate import estimate as estimate_job
    from pipeline.frames import run_frame
    from pipeline.job import JobReport, RunOptions, run_job
    from pipeline.output import read_metadata
    from pipeline.progress import LogSettings
    from pipeline.records import Totals
    from pipeline.status import job_status


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
