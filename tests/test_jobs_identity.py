"""Jobs whose input changes between runs: rows are matched to their answers by identity (the id
column, else the request), never by position, so re-sorting, inserting or deleting rows never
moves an answer onto another row; an edited row is sent again (or kept and marked stale), and a
re-export that changed many rows is refused before anything is sent."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import read_metadata
from pipeline.simulator import messages_digest
from tests.helpers import run_cli, run_command, sim_get, write_job


def frame(ids: list[int], text: str = "item {i}: the lamp is bright") -> pl.DataFrame:
    return pl.DataFrame({"id": [f"r{i}" for i in ids], "text": [text.format(i=i) for i in ids]})


def billed(sim: Any) -> Counter[str]:
    return Counter(entry["messages_digest"] for entry in sim_get(sim, "ledger")["data"])


def answers(text: str, completion: str | None) -> bool:
    """Whether a simulator's completion answers this prompt (it quotes the prompt's digest)."""
    digest = messages_digest([{"role": "user", "content": text}])
    return completion is not None and completion.startswith(f"sim:{digest}")


def assert_each_row_answers_its_own_prompt(
    folder: Path, name: str = "out.parquet", rows: int | None = None
) -> pl.DataFrame:
    """Every row of the output (`name`), or its first `rows`, answers its own prompt."""
    out = pl.read_parquet(folder / name)
    for text, completion in zip(out["text"][:rows], out["completion"][:rows], strict=True):
        assert answers(text, completion), (text, completion)
    return out


def reshuffled_with_inserts(ids: list[int], new: list[int]) -> list[int]:
    """The same rows in another order, with `new` ones in the middle."""
    order = ids[:]
    random.Random(7).shuffle(order)
    middle = len(order) // 2
    return order[:middle] + new + order[middle:]


@pytest.mark.parametrize("id_column", ["id", None], ids=["with an id", "without an id"])
def test_a_resorted_input_with_rows_inserted_mid_file_keeps_every_answer_on_its_own_row(
    tmp_path: Path, sim_thread: Any, id_column: str | None
) -> None:
    frame(list(range(12))).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim, id_column=id_column))
        first = run_cli(config, "--incremental")
        assert first.returncode == 0, first.stderr
        frame(reshuffled_with_inserts(list(range(12)), [100, 101, 102])).write_csv(
            tmp_path / "in.csv"
        )
        second = run_cli(config, "--incremental")
        paid = billed(sim)
    assert second.returncode == 0, second.stderr
    assert sum(paid.values()) == 15 and set(paid.values()) == {1}  # only the new rows sent
    out = assert_each_row_answers_its_own_prompt(tmp_path)
    assert out.height == 15
    assert out["response_source"].to_list().count("api") == 15  # moved, not reused for $0


def test_rows_deleted_from_the_input_leave_the_output_and_stay_in_the_true_spend(
    tmp_path: Path, sim_thread: Any
) -> None:
    frame(list(range(8))).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        assert run_cli(config, "--incremental").returncode == 0
        frame([0, 2, 3, 5, 6, 7, 8]).write_csv(tmp_path / "in.csv")  # 1 and 4 gone, 8 new
        second = run_cli(config, "--incremental")
        spent = sum(entry["cost"] for entry in sim_get(sim, "ledger")["data"])
    assert second.returncode == 0, second.stderr
    out = assert_each_row_answers_its_own_prompt(tmp_path)
    assert out["id"].to_list() == ["r0", "r2", "r3", "r5", "r6", "r7", "r8"]
    assert "2 row(s) done earlier are no longer in the input" in second.stderr
    meta = read_metadata(tmp_path / "out.parquet")
    assert meta["departed_rows"] == 2
    assert meta["true_cost_usd"] == pytest.approx(spent, rel=1e-9)


def edited(ids: list[int], changed: set[int]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "id": [f"r{i}" for i in ids],
            "text": [f"item {i}: the lamp is {'dim' if i in changed else 'bright'}" for i in ids],
        }
    )


def test_an_edited_row_is_sent_again_by_default_and_its_earlier_spend_kept(
    tmp_path: Path, sim_thread: Any
) -> None:
    edited(list(range(20)), set()).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        assert run_cli(config, "--incremental").returncode == 0
        edited(list(range(20)), {3}).write_csv(tmp_path / "in.csv")
        second = run_cli(config, "--incremental")
        paid = billed(sim)
        spent = sum(entry["cost"] for entry in sim_get(sim, "ledger")["data"])
    assert second.returncode == 0, second.stderr
    assert sum(paid.values()) == 21  # the edited row, once more
    assert_each_row_answers_its_own_prompt(tmp_path)
    meta = read_metadata(tmp_path / "out.parquet")
    assert meta["replaced_answers"] == 1 and meta["changed_rows"] == 1
    assert meta["true_cost_usd"] == pytest.approx(spent, rel=1e-9)
    assert "1 row(s) changed since they were done: sent again" in second.stderr


def test_a_re_export_that_changed_over_a_tenth_of_the_rows_is_refused_unless_asked(
    tmp_path: Path, sim_thread: Any
) -> None:
    edited(list(range(10)), set()).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        assert run_cli(config, "--incremental").returncode == 0
        edited(list(range(10)), {1, 4}).write_csv(tmp_path / "in.csv")
        refused = run_cli(config, "--incremental")
        after_refusal = sum(billed(sim).values())
        allowed = run_cli(config, "--incremental", "--reprocess-changed")
        paid = sum(billed(sim).values())
    assert refused.returncode == 1, refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert "2 of 10 rows done earlier have changed" in line and "'r1'" in line, line
    assert "--reprocess-changed" in line and "--keep-changed" in line, line
    assert after_refusal == 10  # nothing sent
    assert allowed.returncode == 0, allowed.stderr
    assert paid == 12
    assert_each_row_answers_its_own_prompt(tmp_path)


def test_keep_changed_keeps_earlier_answers_and_marks_them_stale(
    tmp_path: Path, sim_thread: Any
) -> None:
    edited(list(range(6)), set()).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        assert run_cli(config, "--incremental").returncode == 0
        edited([*range(6), 6], {2}).write_csv(tmp_path / "in.csv")
        kept = run_cli(config, "--incremental", "--keep-changed")
        paid = sum(billed(sim).values())
    assert kept.returncode == 0, kept.stderr
    assert paid == 7  # the new row only
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["stale"].to_list() == [False, False, True, False, False, False, False]
    old = messages_digest([{"role": "user", "content": "item 2: the lamp is bright"}])
    assert out["completion"][2].startswith(f"sim:{old}")  # the earlier answer, marked
    assert "1 row(s) changed since they were done: kept their earlier answers" in kept.stderr


def test_estimate_of_a_resorted_grown_input_counts_only_the_new_and_edited_rows(
    tmp_path: Path, sim_thread: Any
) -> None:
    frame(list(range(12))).write_csv(tmp_path / "in.csv")
    with sim_thread() as sim:
        config = str(write_job(tmp_path, sim))
        assert run_cli(config, "--incremental").returncode == 0
        grown = edited(reshuffled_with_inserts(list(range(12)), [100, 101, 102]), changed={4})
        grown.write_csv(tmp_path / "in.csv")
        estimated = run_command("estimate", config, "--incremental", "--json")
        kept = run_command("estimate", config, "--incremental", "--keep-changed", "--json")
    assert estimated.returncode == 0, estimated.stderr
    assert json.loads(estimated.stdout)["todo_rows"] == 4  # three new, one edited
    assert json.loads(kept.stdout)["todo_rows"] == 3  # the edited one keeps its answer
