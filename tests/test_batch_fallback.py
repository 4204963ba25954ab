"""Batch mode's ways around a batch, through the real CLI against the simulator: `auto` sending
the models the Batch API does not take in sync mode (by the catalogue, or when a submit is
refused), `batch_retry = "sync"`, and answers turned down (labels, schema) asked again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.helpers import run_cli, sim_get, sim_post, start_cli, wait_for, write_job

pytestmark = pytest.mark.timeout(120)
QUICK = "[batch]\npoll_interval = 0.01\npoll_max = 0.05\nlist_lag = 0.2\n"
INSTANT = {"batch_validating_s": 0, "batch_in_progress_s": 0}
MIXTRAL, MISTRAL = "mistralai/mixtral-8x7b-instruct", "mistralai/mistral-7b-instruct"


def job(folder: Path, sim: Any, texts: list[str], request: str, retry: str = "") -> Path:
    ids = [f"r{i}" for i in range(len(texts))]
    pl.DataFrame({"id": ids, "text": texts}).write_csv(folder / "in.csv")
    config = write_job(folder, sim, extra=QUICK)
    text = config.read_text().replace("[request]\n", f"[request]\n{request}\n")
    config.write_text(text.replace("[retry]\n", f"[retry]\n{retry}\n"))
    return config


def made(sim: Any) -> list[dict[str, Any]]:
    return sim_get(sim, "batches")["data"]  # type: ignore[no-any-return]


def ledger(sim: Any) -> list[dict[str, Any]]:
    return sim_get(sim, "ledger")["data"]  # type: ignore[no-any-return]


def test_auto_sends_what_the_batch_api_takes_in_batches_and_the_rest_in_sync(
    tmp_path: Path, sim_thread: Any
) -> None:
    request = f'mode = "auto"\nmodels = ["{MIXTRAL}", "{MISTRAL}"]'
    with sim_thread(**INSTANT) as sim:
        done = run_cli(str(job(tmp_path, sim, [f"review {i}" for i in range(4)], request)))
        batches, paid = made(sim), ledger(sim)
    assert done.returncode == 0, done.stderr
    assert f"{MISTRAL} lists no :batch endpoint; its rows are sent in sync mode" in done.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 8
    sources = dict(out.group_by("model").agg(pl.col("cost_source").unique()).rows())
    assert sources[MIXTRAL] == ["batch_price"] and sources[MISTRAL] == ["reported"]
    assert [len(b["custom_ids"]) for b in batches] == [4]
    assert sorted(bool(e.get("batch_id")) for e in paid) == [False] * 4 + [True] * 4
    assert out["cost_usd"].sum() == pytest.approx(sum(e["cost"] for e in paid))


def test_auto_falls_back_to_sync_when_a_listed_model_is_refused_at_submit(
    tmp_path: Path, sim_thread: Any
) -> None:
    with sim_thread(**INSTANT, batch_refused_models=[MIXTRAL]) as sim:
        config = str(job(tmp_path, sim, [f"review {i}" for i in range(5)], 'mode = "auto"'))
        done = run_cli(config)
        paid = len(ledger(sim))
        again = run_cli(config)
        batches, paid_again = made(sim), len(ledger(sim))
    assert done.returncode == 0, done.stderr
    assert "does not have a :batch endpoint" in done.stderr and "sent in sync mode" in done.stderr
    assert batches == [] and paid == 5
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 5
    assert out["cost_source"].unique().to_list() == ["reported"]
    assert again.returncode == 0, again.stderr
    assert paid_again == 5 and "looking for it" not in again.stderr  # nothing left open


def test_a_failed_line_is_asked_again_in_sync_mode_with_batch_retry_sync(
    tmp_path: Path, sim_thread: Any
) -> None:
    texts = ["fine", "flaky [[sim:500]]", "also fine"]
    request = 'mode = "batch"\nbatch_retry = "sync"'
    with sim_thread(**INSTANT) as sim:
        done = run_cli(str(job(tmp_path, sim, texts, request)))
        batches, paid = made(sim), ledger(sim)
    assert done.returncode == 0, done.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 3
    assert out["attempts"].to_list() == [1, 2, 1]
    assert out["cost_source"].to_list() == ["batch_price", "reported", "batch_price"]
    assert [len(b["custom_ids"]) for b in batches] == [3]
    assert sorted(bool(e.get("batch_id")) for e in paid) == [False, True, True]


@pytest.mark.parametrize(("retry", "sizes"), [("batch", [3, 2, 1]), ("sync", [3])])
def test_answers_turned_down_are_asked_again_and_every_one_is_paid_for(
    tmp_path: Path, sim_thread: Any, retry: str, sizes: list[int]
) -> None:
    texts = ["fine [[sim:schema_invalid*1]]", "broken [[sim:schema_invalid*]]", "plain"]
    request = f'mode = "batch"\nbatch_retry = "{retry}"\nlabels = ["positive", "negative"]'
    with sim_thread(**INSTANT) as sim:
        done = run_cli(str(job(tmp_path, sim, texts, request, retry="invalid_retries = 2")))
        batches, paid = made(sim), ledger(sim)
    assert done.returncode == 3, done.stderr  # one row failed
    rows = {r["id"]: r for r in pl.read_parquet(tmp_path / "out.parquet").iter_rows(named=True)}
    assert (rows["r0"]["status"], rows["r0"]["attempts"]) == ("ok", 2)
    assert rows["r0"]["label"] in ("positive", "negative")
    assert (rows["r1"]["status"], rows["r1"]["error_type"]) == ("error", "invalid_answer")
    assert rows["r1"]["attempts"] == 3 and rows["r1"]["label"] is None
    assert rows["r2"]["attempts"] == 1
    assert [len(b["custom_ids"]) for b in batches] == sizes
    assert len(paid) == 6  # every answer turned down was paid for ...
    total = sum(r["cost_usd"] for r in rows.values())
    assert total == pytest.approx(sum(e["cost"] for e in paid), rel=1e-9)  # ... and counted


def test_429s_and_5xx_on_creates_and_polls_are_ridden_out(tmp_path: Path, sim_thread: Any) -> None:
    with sim_thread(
        batch_validating_s=0, batch_in_progress_s=0, batch_create_faults=["429", "502"],
        batch_get_faults=["500", "429", "502"],
    ) as sim:  # fmt: skip
        config = job(tmp_path, sim, [f"review {i}" for i in range(8)], 'mode = "batch"')
        done = run_cli(str(config))
        batches, paid = made(sim), ledger(sim)
    assert done.returncode == 0, done.stderr
    assert len(batches) == 1 and len(paid) == 8  # made once, in spite of the refusals
    assert "HTTP 502" in done.stderr and "looking for it before sending it again" in done.stderr
    assert pl.read_parquet(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 8


def test_lines_a_provider_cancelled_batch_did_not_run_are_sent_again(
    tmp_path: Path, sim_thread: Any
) -> None:
    # The provider cancels the first batch a quarter of the way through; the second runs.
    with sim_thread(batch_validating_s=0, batch_in_progress_s=100, batch_cancel_after_s=25) as sim:
        config = job(tmp_path, sim, [f"review {i}" for i in range(8)], 'mode = "batch"')
        running = start_cli(str(config))
        wait_for(lambda: len(made(sim)) == 1, what="the first batch")
        sim_post(sim, "clock", {"advance": 30})
        wait_for(lambda: len(made(sim)) == 2, what="the lines sent again")
        sim_post(sim, "config", {"batch_cancel_after_s": None})
        sim_post(sim, "clock", {"advance": 100})
        _, stderr = running.communicate(timeout=60)
        batches, paid = made(sim), ledger(sim)
    assert running.returncode == 0, stderr
    assert [b["status"] for b in batches] == ["cancelled", "completed"]
    assert [len(b["custom_ids"]) for b in batches] == [8, 6] and len(paid) == 8
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 8
    assert sorted(out["attempts"].to_list()) == [1, 1] + [2] * 6
