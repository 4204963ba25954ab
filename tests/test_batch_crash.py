"""A batch run killed (SIGKILL) at each moment that matters, then run again through the real
CLI: every row exactly once in the output, every line paid once in the simulator's ledger, and
one batch per chunk in its records — never a second batch for the same rows.

The kill comes from inside the run, at the exact moment (a patched method of our own that
kills the process), so each phase is hit every time rather than by a race: before the create
is sent (the batch is journaled, nothing made), between the server making it and the journal
recording its id, with the answers in hand but not yet saved, and with them saved but the
batch not yet marked done. The kill while waiting for a batch is `test_batch_mode`'s."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.helpers import cli_env, run_cli, sim_get, write_job

pytestmark = pytest.mark.timeout(120)
QUICK = "[batch]\npoll_interval = 0.01\npoll_max = 0.05\nlist_lag = 0.2\nmax_lines = 3\n"
ROWS = 6  # two batches of three

# (patched method, what the journal holds and the server has when the kill comes)
PHASES = {
    "before_create": "pipeline.batch_api:BatchAPI.create",
    "between_create_and_record": "pipeline.journal_batches:BatchLog.submitted",
    "while_saving_answers": "pipeline.writer:JournalWriter.flush",
    "before_marked_done": "pipeline.journal_batches:BatchLog.done",
}
KILLED_AT = textwrap.dedent("""
    import os, signal, sys
    from importlib import import_module
    module, _, attribute = sys.argv.pop(1).partition(":")
    owner_name, _, method = attribute.partition(".")
    owner = getattr(import_module(module), owner_name)
    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    setattr(owner, method, killed)
    from pipeline.cli import main
    sys.argv[0] = "pipeline"
    main()
""")


def killed_at(phase: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", KILLED_AT, PHASES[phase], "run", *args],
        capture_output=True, text=True, env=cli_env(), timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_run_killed_at_any_phase_then_run_again_gives_every_row_once(
    tmp_path: Path, sim_thread: Any, phase: str
) -> None:
    texts = [f"review {i}: fine" for i in range(ROWS)]
    pl.DataFrame({"id": [f"r{i}" for i in range(ROWS)], "text": texts}).write_csv(
        tmp_path / "in.csv"
    )
    config = write_job(tmp_path, None, extra=QUICK)
    with sim_thread(batch_validating_s=0, batch_in_progress_s=0) as sim:
        text = config.read_text().replace(
            "[request]\n", f'[request]\nbase_url = "{sim.base_url}"\nmode = "batch"\n'
        )
        config.write_text(text)
        killed = killed_at(phase, str(config))
        made_before = sim_get(sim, "batches")["data"]
        done = run_cli(str(config))
        made = sim_get(sim, "batches")["data"]
        ledger = sim_get(sim, "ledger")["data"]
    assert killed.returncode == -9, killed.stderr
    assert len(made_before) == (0 if phase == "before_create" else 1 if "create" in phase else 2)
    assert done.returncode == 0, done.stderr
    assert sorted(len(b["custom_ids"]) for b in made) == [3, 3]  # one batch per chunk
    assert len(ledger) == ROWS  # every line paid once
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == [f"r{i}" for i in range(ROWS)]
    assert out["status"].to_list() == ["ok"] * ROWS
    assert out["cost_usd"].sum() == pytest.approx(sum(e["cost"] for e in ledger))
