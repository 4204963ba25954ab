"""Jobs whose settings change between runs (issue 18, points 3-5): a moved endpoint resumes, a
simulated journal gives way to a real run, and `--redo` sends chosen rows again under new
settings while every other row keeps its answer. Each test checks, row by row, that the
completion in the output answers that row's own prompt (the simulator quotes its digest)."""

from __future__ import annotations

import json
import shlex
import shutil
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.simulator.content import messages_digest
from tests.helpers import run_cli, run_command, sim_get, write_job
from tests.test_perimeter_endpoint import SimOnPort, free_port

ROOT = Path(__file__).resolve().parent.parent


def write_reviews(folder: Path, n: int) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "id": [f"r{i:03d}" for i in range(n)],
            "text": [f"Review {i}: {'fine ' * (i % 7)}" for i in range(n)],
        }
    )
    frame.write_csv(folder / "in.csv")
    return frame


def output(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(folder / "out.parquet")


def metadata(folder: Path) -> dict[str, Any]:
    return json.loads(pq.read_metadata(folder / "out.parquet").metadata[b"pipeline"])  # type: ignore[no-any-return]


def ledger(sim: Any) -> list[dict[str, Any]]:
    return sim_get(sim, "ledger")["data"]  # type: ignore[no-any-return]


def answers_own_prompts(frame: pl.DataFrame) -> bool:
    """Every completion quotes the digest of its own row's prompt (template "{text}")."""
    return all(
        (completion or "").startswith(f"sim:{messages_digest([{'role': 'user', 'content': text}])}")
        for text, completion in zip(frame["text"], frame["completion"], strict=True)
    )


pipeline = run_command


# ------------------------------------------------------------------- settings that move


def test_resume_after_the_endpoint_moves_to_another_port_pays_only_for_rows_not_done(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_reviews(tmp_path, 12)
    with sim_thread() as first:
        config = str(write_job(tmp_path, first))
        trial = run_cli(config, "--limit", "5")
    assert trial.returncode == 0, trial.stderr
    new_url = f"http://127.0.0.1:{free_port()}/api/v1"
    with SimOnPort(int(new_url.split(":")[2].split("/")[0])) as moved:
        resumed = run_cli(config, "--base-url", new_url, "--concurrency", "3", "--timeout", "30")
        again = run_cli(config, "--base-url", new_url, "--log-format", "json")
        paid = len(ledger(moved))
        other_model = run_cli(config, "--base-url", new_url, "--model", "openai/gpt-4o-mini")
    assert resumed.returncode == 0, resumed.stderr
    assert paid == 12 - 5  # only the rows not done before
    frame = output(tmp_path)
    assert frame["status"].to_list() == ["ok"] * 12 and answers_own_prompts(frame)
    # Said once, naming what changed; the next run has nothing to say.
    warnings = [line for line in resumed.stderr.splitlines() if "request.base_url" in line]
    assert len(warnings) == 1 and new_url in warnings[0], resumed.stderr
    assert "limits.concurrency" in warnings[0] and "request.timeout" in warnings[0]
    assert again.returncode == 0 and "request.base_url" not in again.stderr
    # What is asked still refuses (and sends nothing).
    assert other_model.returncode == 1 and "request.model changed" in other_model.stderr


@pytest.mark.parametrize("id_column", ["id", None], ids=["with an id", "without an id"])
def test_an_incremental_job_on_a_moved_endpoint_sends_only_its_new_rows(
    tmp_path: Path, sim_thread: Any, id_column: str | None
) -> None:
    frame = write_reviews(tmp_path, 10)
    with sim_thread() as first, sim_thread() as second:
        config = str(write_job(tmp_path, first, id_column=id_column))
        assert run_cli(config, "--incremental").returncode == 0
        grown = pl.concat([frame, pl.DataFrame({"id": ["new1", "new2"], "text": ["A", "B"]})])
        grown.sample(fraction=1.0, shuffle=True, seed=3).write_csv(tmp_path / "in.csv")
        moved = run_cli(config, "--incremental", "--base-url", second.base_url)
        paid = sorted(entry["messages_digest"] for entry in ledger(second))
    assert moved.returncode == 0, moved.stderr
    expected = sorted(messages_digest([{"role": "user", "content": t}]) for t in ["A", "B"])
    assert paid == expected  # the ten rows done before are not changed by the move
    out = output(tmp_path)
    assert out.height == 12 and answers_own_prompts(out)


def test_a_moved_endpoint_is_one_json_warning_event(tmp_path: Path, sim_thread: Any) -> None:
    write_reviews(tmp_path, 4)
    with sim_thread() as first, sim_thread() as second:
        config = str(write_job(tmp_path, first))
        assert run_cli(config, "--limit", "2").returncode == 0
        moved = run_cli(config, "--base-url", second.base_url, "--log-format", "json")
    assert moved.returncode == 0, moved.stderr
    events = [json.loads(line) for line in moved.stderr.splitlines() if line.startswith("{")]
    warned = [e for e in events if e["event"] == "settings_changed"]
    assert len(warned) == 1 and warned[0]["changed"]["request.base_url"] == [
        first.base_url,
        second.base_url,
    ]


# ---------------------------------------------------------------- simulated, then real


def readme_commands(after: str) -> list[list[str]]:
    """The `.venv/bin/pipeline run ...` commands of the README's first shell block after the
    line `after`, as argument lists (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index(after) :].split("```sh\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.replace("&&", "\n").splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == [".venv/bin/pipeline", "run"]:
            commands.append(words[1:])
    return commands


def test_the_readme_demo_then_its_run_it_for_real_commands(tmp_path: Path, sim_thread: Any) -> None:
    (demo_command,) = readme_commands("<!-- ci:demo -->")
    trial_command, rest_command = readme_commands("## Run it for real")
    (tmp_path / "configs").mkdir()
    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "configs" / "example.toml", tmp_path / "configs")
    shutil.copy(ROOT / "data" / "reviews.csv", tmp_path / "data")
    rows = pl.read_csv(tmp_path / "data" / "reviews.csv").height
    demo = pipeline(*demo_command, "--quiet", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    with sim_thread() as real:  # stands in for OpenRouter
        trial = pipeline(*trial_command, "--base-url", real.base_url, cwd=tmp_path)
        trial_paid = len(ledger(real))
        rest = pipeline(*rest_command, "--base-url", real.base_url, cwd=tmp_path)
        billed = Counter(entry["messages_digest"] for entry in ledger(real))
    assert trial.returncode == 0, trial.stderr
    assert "simulated" in trial.stderr and "starting over" in trial.stderr
    assert "paid for again" not in trial.stderr + rest.stderr
    assert trial_paid == 20
    assert rest.returncode == 0, rest.stderr
    labeled = pl.read_parquet(tmp_path / "data" / "reviews-labeled.parquet")
    assert labeled.height == rows and labeled["status"].to_list() == ["ok"] * rows
    # Each request paid once (the 20 of the trial are not paid again; duplicates share one).
    assert set(billed.values()) == {1}
    assert sum(billed.values()) == labeled.filter(pl.col("response_source") == "api").height


def test_a_simulated_run_over_real_answers_is_refused(tmp_path: Path, sim_thread: Any) -> None:
    write_reviews(tmp_path, 4)
    with sim_thread() as real:
        config = str(write_job(tmp_path, real))
        assert run_cli(config).returncode == 0
        simulated = run_cli(config, "--simulate")
    assert simulated.returncode == 1
    line = simulated.stderr.strip()
    assert line.startswith("error:") and "--simulate" in line and "real answers" in line, line
    assert "paid for again" not in line
    assert answers_own_prompts(output(tmp_path))


def test_a_changed_simulated_job_is_refused_without_talk_of_paying(tmp_path: Path) -> None:
    write_reviews(tmp_path, 3)
    config = str(write_job(tmp_path, None))
    assert run_cli(config, "--simulate").returncode == 0
    changed = run_cli(config, "--simulate", "--template", "Say: {text}")
    assert changed.returncode == 1 and "prompt.template changed" in changed.stderr
    assert "paid for again" not in changed.stderr and "costs nothing" in changed.stderr


# ------------------------------------------------------------------------------- --redo


def test_redo_length_with_a_larger_max_tokens_pays_only_for_the_rows_cut_off(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_reviews(tmp_path, 30)
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        first = run_cli(config, "--max-tokens", "16")
        before = output(tmp_path)
        cut = before.filter(pl.col("finish_reason") == "length")["id"].to_list()
        refused = run_cli(config, "--max-tokens", "64")
        estimated = pipeline("estimate", config, "--max-tokens", "64", "--redo", "length", "--json")
        paid_before = len(ledger(sim))
        redone = run_cli(config, "--max-tokens", "64", "--redo", "length")
        paid = len(ledger(sim)) - paid_before
        plain = run_cli(config, "--max-tokens", "64")
        paid_after = len(ledger(sim)) - paid_before
    assert first.returncode == 0, first.stderr
    assert 0 < len(cut) < 30
    assert refused.returncode == 1 and "request.max_tokens changed" in refused.stderr
    assert "--redo" in refused.stderr
    assert estimated.returncode == 0, estimated.stderr
    assert json.loads(estimated.stdout)["todo_rows"] == len(cut)
    assert redone.returncode == 0, redone.stderr
    assert paid == len(cut)  # the cut-off rows, nothing else
    after = output(tmp_path)
    assert after["finish_reason"].to_list() == ["stop"] * 30 and answers_own_prompts(after)
    kept = before.filter(~pl.col("id").is_in(cut))
    assert (
        after.filter(~pl.col("id").is_in(cut))["generation_id"].to_list()
        == kept["generation_id"].to_list()
    )
    meta = metadata(tmp_path)
    assert sorted(meta["rows_by_settings"].values()) == sorted([30 - len(cut), len(cut)])
    assert meta["replaced_answers"] == len(cut) and meta["true_cost_usd"] > meta["cost_usd"]
    # The redo's settings are the job's now: the same command without --redo resumes, sends nothing.
    assert plain.returncode == 0 and paid_after == paid


def test_redo_failed_and_redo_where(tmp_path: Path, sim_thread: Any) -> None:
    frame = write_reviews(tmp_path, 6)
    texts = frame["text"].to_list()
    texts[2] += " [[sim:403*1]]"  # refused once, answered when asked again
    frame.with_columns(pl.Series("text", texts)).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        first = run_cli(config)
        redone = run_cli(config, "--redo", "error_type=http_403")
        paid = len(ledger(sim))
        chosen = output(tmp_path).filter(pl.col("id") == "r004")["generation_id"][0]
        where = run_cli(config, "--redo-where", f"generation_id = '{chosen}' OR cost_usd < 0")
        paid_where = len(ledger(sim)) - paid
    assert first.returncode == 3, first.stderr
    assert redone.returncode == 0, redone.stderr
    assert output(tmp_path)["status"].to_list() == ["ok"] * 6 and answers_own_prompts(
        output(tmp_path)
    )
    assert paid == 6  # the refusal was not billed; the row answered once
    assert where.returncode == 0, where.stderr
    # Sent again although nothing changed: a redo never takes the journal's own answer.
    assert paid_where == 1
    after = output(tmp_path)
    assert after.filter(pl.col("id") == "r004")["generation_id"][0] != chosen
    assert answers_own_prompts(after)


def test_bad_redo_selectors_are_usage_errors_and_send_nothing(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_reviews(tmp_path, 3)
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        unknown = run_cli(config, "--redo", "cutoff")
        broken = run_cli(config, "--redo-where", "cost_usd >")
        no_column = run_cli(config, "--redo-where", "costs > 0.01")
        estimate = pipeline("estimate", config, "--redo", "cutoff")
        sent = sim_get(sim, "stats")["requests"]
    assert unknown.returncode == 2 and "failed, length, invalid, error_type=KIND" in unknown.stderr
    assert estimate.returncode == 2 and "--redo" in estimate.stderr
    assert broken.returncode == 2 and "--redo-where" in broken.stderr
    assert (
        no_column.returncode == 2 and "costs" in no_column.stderr and "cost_usd" in no_column.stderr
    )
    for done in (unknown, broken, no_column):
        assert "Traceback" not in done.stderr
    assert sent == 0 and not (tmp_path / "out.parquet").exists()


def test_a_journal_from_before_settings_were_kept_resumes_on_a_moved_endpoint(
    tmp_path: Path, sim_thread: Any
) -> None:
    write_reviews(tmp_path, 6)
    with sim_thread() as first, sim_thread() as second:
        config = str(write_job(tmp_path, first))
        assert run_cli(config, "--limit", "3", "--labels", "good,bad").returncode == 0
        # As the version before kept it: base_url among what was asked, no settings column.
        with sqlite3.connect(tmp_path / "out.parquet.journal") as db:
            (stored,) = db.execute("SELECT value FROM meta WHERE name = 'config'").fetchone()
            old = json.loads(stored)
            del old["request"]["openrouter_fields"]
            old["request"]["base_url"] = first.base_url
            db.execute("UPDATE meta SET value = ? WHERE name = 'config'", (json.dumps(old),))
            db.execute("DELETE FROM meta WHERE name IN ('transport', 'configs')")
            db.execute("ALTER TABLE results DROP COLUMN settings")
        moved = run_cli(config, "--base-url", second.base_url, "--labels", "good,bad")
        paid = len(ledger(second))
    assert moved.returncode == 0, moved.stderr
    assert paid == 3 and "request.base_url" in moved.stderr
    assert list(metadata(tmp_path)["rows_by_settings"].values()) == [6]  # the same question
