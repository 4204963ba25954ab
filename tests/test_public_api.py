"""The public Python API: what `pipeline.__all__` names stays there and works as the README
shows, and importing the package stays cheap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import pipeline
from tests.helpers import TEST_KEY

# Remove a name only with a major version: scripts and notebooks import these.
PUBLIC = {
    "__version__", "load_config", "JobConfig", "run_job", "run_frame", "RunOptions", "JobReport",
    "LogSettings", "Totals", "job_status", "estimate_job", "Estimate", "read_metadata",
    "PipelineError", "UserError", "ConfigError", "InputError", "JournalError", "JobStopped",
    "AuthError", "CreditsError", "BudgetReached", "TrustError", "Locked", "OutOfTime",
    "Interrupted",
}  # fmt: skip


def test_the_exported_names_stay_exported_and_resolve() -> None:
    assert set(pipeline.__all__) >= PUBLIC
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None, name
    assert issubclass(pipeline.ConfigError, pipeline.UserError)
    assert issubclass(pipeline.BudgetReached, pipeline.JobStopped)
    assert set(dir(pipeline)) >= PUBLIC


def test_importing_the_package_loads_no_heavy_library() -> None:
    code = "import sys, pipeline; print(sorted(m for m in ('polars', 'pyarrow', 'aiohttp') if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "[]"


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pipeline.nope  # noqa: B018


def test_a_job_runs_from_python_as_the_readme_shows(
    tmp_path: Path, sim_thread: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", TEST_KEY)
    pl.DataFrame({"id": ["a", "b", "c"], "text": ["one", "two", "one"]}).write_csv(
        tmp_path / "in.csv"
    )
    (tmp_path / "job.toml").write_text(
        '[input]\npath = "in.csv"\nid_column = "id"\n[prompt]\ntemplate = "Say: {text}"\n'
        '[output]\npath = "out.parquet"\n'
    )
    with sim_thread() as sim:
        config = pipeline.load_config(
            tmp_path / "job.toml", {"request.base_url": sim.base_url, "limits.concurrency": 2}
        )
        report = pipeline.run_job(config, pipeline.RunOptions(quiet=True))
    assert isinstance(config, pipeline.JobConfig) and isinstance(report, pipeline.JobReport)
    assert report.exit_code == 0 and report.total_rows == 3
    assert isinstance(report.job_totals, pipeline.Totals)
    assert (report.job_totals.ok, report.job_totals.duplicates_reused) == (3, 1)
    metadata = pipeline.read_metadata(tmp_path / "out.parquet")
    assert metadata["ok"] == 3 and metadata["cost_usd"] == pytest.approx(report.job_totals.cost_usd)
    status = pipeline.job_status(config)
    assert (status["done"], status["remaining"]) == (3, 0)


def test_errors_from_python_are_the_exported_classes(tmp_path: Path) -> None:
    with pytest.raises(pipeline.ConfigError, match=r"limits\.concurrency \(--concurrency\)"):
        pipeline.load_config(
            None, {"input.path": "x.csv", "output.path": "o.parquet", "prompt.column": "t",
                   "limits.concurrency": 0},
        )  # fmt: skip
    config = pipeline.load_config(
        None, {"input.path": str(tmp_path / "missing.csv"), "output.path": str(tmp_path / "o.parquet"),
               "prompt.column": "t", "request.simulate": True},
    )  # fmt: skip
    with pytest.raises(pipeline.InputError, match="does not exist"):
        pipeline.run_job(config, pipeline.RunOptions(quiet=True))
