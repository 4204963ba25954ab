"""`pipeline.run_frame`: a notebook's frame in, the job's output as a frame out, with the CLI's
promises (journal, resume, dedupe, budget) and its vocabulary of settings."""

from __future__ import annotations

import _thread
import asyncio
import signal
import threading
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import pipeline
from pipeline.frames import content_digest
from tests.helpers import TEST_KEY, run_cli, sim_get, wait_for

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "reviews.csv"
# What the answers carry beside the rows that differs between two runs of one job.
PER_RUN = ("latency_ms", "generation_id", "attempts", "provider", "model_used")
FAST = {"retry": {"backoff_base": 0}}


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", TEST_KEY)


def _comparable(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.drop([c for c in frame.columns if c in PER_RUN])


def _requests(sim: Any) -> int:
    return int(sim_get(sim, "stats")["requests"])


def test_a_frame_gives_the_rows_the_cli_gives_for_the_same_file(
    tmp_path: Path, sim_thread: Any
) -> None:
    config = REPO / "configs" / "example.toml"
    with sim_thread() as sim:
        out = tmp_path / "cli.parquet"
        done = run_cli(
            str(config), "--output", str(out), "--base-url", sim.base_url, "--quiet", timeout=120
        )
        assert done.returncode == 0, done.stderr
        frame = pl.read_csv(SAMPLE, infer_schema=False)  # as the CLI reads CSV: strings
        labeled = pipeline.run_frame(
            frame, config=config, request={"base_url": sim.base_url}, quiet=True
        )
    cli = pl.read_parquet(out)
    assert labeled.columns == cli.columns
    assert labeled.height == frame.height == 200
    assert _comparable(labeled).equals(_comparable(cli))
    assert labeled["label"].null_count() == 0


def test_running_the_same_call_again_sends_nothing(tmp_path: Path, sim_thread: Any) -> None:
    frame = pl.DataFrame({"text": [f"review {i}" for i in range(40)] + ["review 0"] * 10})
    with sim_thread() as sim:
        settings = {"request": {"base_url": sim.base_url}, **FAST}
        first = pipeline.run_frame(frame, template="Say: {text}", quiet=True, **settings)
        sent = _requests(sim)
        assert sent == 40  # the ten repeats were answered by their twins
        # Rechunked, the same rows are the same job.
        rechunked = pl.concat([frame.slice(0, 7), frame.slice(7)], rechunk=False)
        again = pipeline.run_frame(rechunked, template="Say: {text}", quiet=True, **settings)
        assert _requests(sim) == sent
        other = pipeline.run_frame(frame, template="Echo: {text}", quiet=True, **settings)
        assert _requests(sim) == sent + 40  # another question is another job
    assert again.equals(first)
    assert first.height == 50 and first["error_type"].null_count() == 50
    assert other["text"].to_list() == frame["text"].to_list()


def test_the_digest_is_of_the_rows_not_of_their_chunks() -> None:
    frame = pl.DataFrame({"a": list(range(200_000)), "b": ["x"] * 200_000})
    split = pl.concat([frame.slice(0, 70_001), frame.slice(70_001)], rechunk=False)
    assert split.n_chunks() == 2
    assert content_digest(split) == content_digest(frame)
    assert content_digest(frame.with_columns(pl.col("b").alias("c"))) != content_digest(frame)


def test_lazy_and_pandas_frames_are_read_through_polars(tmp_path: Path, sim_thread: Any) -> None:
    pandas = pytest.importorskip("pandas")
    rows = {"id": ["a", "b"], "text": ["one", "two"]}
    with sim_thread() as sim:
        settings = {"request": {"base_url": sim.base_url}, "input": {"id_column": "id"}}
        lazy = pipeline.run_frame(pl.LazyFrame(rows), template="{text}", quiet=True, **settings)
        from_pandas = pipeline.run_frame(
            pandas.DataFrame(rows), template="{text}", quiet=True, **settings
        )
        assert _requests(sim) == 2  # one job: the same rows however they came
    assert lazy.equals(from_pandas) and lazy["id"].to_list() == ["a", "b"]


def test_settings_are_checked_as_a_config_file_is() -> None:
    frame = pl.DataFrame({"text": ["x"]})
    with pytest.raises(
        pipeline.ConfigError,
        match=r"run_frame: unknown key request\.modell; did you mean request\.model\?",
    ):
        pipeline.run_frame(frame, template="{text}", request={"modell": "x"})
    with pytest.raises(
        pipeline.ConfigError,
        match=r"run_frame: unknown section \[requests\]; did you mean \[request\]\?",
    ):
        pipeline.run_frame(frame, template="{text}", requests={"model": "x"})
    with pytest.raises(
        pipeline.ConfigError, match=r"limits= takes the \[limits\] section's keys as a dict"
    ):
        pipeline.run_frame(frame, template="{text}", limits=8)  # type: ignore[arg-type]
    with pytest.raises(pipeline.ConfigError, match=r"limits\.concurrency \(--concurrency\)"):
        pipeline.run_frame(frame, template="{text}", limits={"concurrency": 0})
    with pytest.raises(
        pipeline.ConfigError, match=r"reads its rows from the frame; leave input\.path out"
    ):
        pipeline.run_frame(frame, template="{text}", input={"path": "x.csv"})
    with pytest.raises(pipeline.ConfigError, match="takes a polars DataFrame or LazyFrame"):
        pipeline.run_frame([{"text": "x"}], template="{text}")
    with pytest.raises(pipeline.InputError, match="column 'nope'"):
        pipeline.run_frame(frame, template="{nope}")


def test_a_journal_path_and_an_output_path_are_kept_where_given(
    tmp_path: Path, sim_thread: Any
) -> None:
    frame = pl.DataFrame({"text": ["one", "two"]})
    with sim_thread() as sim:
        pipeline.run_frame(
            frame, template="{text}", journal=tmp_path / "labels.journal", quiet=True,
            request={"base_url": sim.base_url}, output={"path": str(tmp_path / "labels.parquet")},
        )  # fmt: skip
        pipeline.run_frame(
            frame, template="{text}", journal=tmp_path / "labels.journal", quiet=True,
            request={"base_url": sim.base_url}, output={"path": str(tmp_path / "labels.parquet")},
        )  # fmt: skip
        sent = _requests(sim)
    assert (tmp_path / "labels.journal").is_file()
    assert not (tmp_path / "labels.parquet.journal").exists()
    assert pl.read_parquet(tmp_path / "labels.parquet").height == 2
    assert sent == 2


def test_a_budget_stops_the_call_and_a_higher_one_finishes_it(sim_thread: Any) -> None:
    frame = pl.DataFrame({"text": [f"a somewhat longer review number {i}" for i in range(60)]})
    with sim_thread() as sim:
        request = {"base_url": sim.base_url, "max_tokens": 40}
        twin = pipeline.run_frame(frame, template="Twin: {text}", quiet=True, request=request)
        cap = 0.5 * twin["cost_usd"].sum()
        with pytest.raises(pipeline.BudgetReached, match=r"cost\.max_cost"):
            pipeline.run_frame(
                frame, template="{text}", quiet=True, cost={"max_cost": cap}, request=request
            )
        stopped = _requests(sim) - 60
        assert 0 < stopped < 60
        done = pipeline.run_frame(frame, template="{text}", quiet=True, request=request)
        assert _requests(sim) == 120  # nothing paid twice
    assert done["error_type"].null_count() == 60
    assert done.filter(pl.int_range(pl.len()) < stopped)["cost_usd"].sum() <= cap


def test_an_interrupted_call_saves_its_answers_and_the_next_call_goes_on(
    tmp_path: Path, sim_thread: Any
) -> None:
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in a script's background
        pytest.skip("SIGINT is ignored in this process: interrupt_main cannot interrupt it")
    frame = pl.DataFrame({"text": [f"row {i}" for i in range(300)]})
    with sim_thread(latency=0.02) as sim:
        settings = {"request": {"base_url": sim.base_url}, "limits": {"concurrency": 4}}

        def interrupt_when_busy() -> None:  # the kernel's interrupt: SIGINT to the main thread
            wait_for(lambda: _requests(sim) >= 40, what="the first answers")
            _thread.interrupt_main()

        interrupter = threading.Thread(target=interrupt_when_busy, daemon=True)
        interrupter.start()
        with pytest.raises(pipeline.Interrupted, match="run the same call again") as stopped:
            pipeline.run_frame(frame, template="{text}", quiet=True, **settings)
        interrupter.join(10)
        assert stopped.value.exit_code == 130
        before = _requests(sim)
        assert before < 300
        done = pipeline.run_frame(frame, template="{text}", quiet=True, **settings)
        repeats = _requests(sim) - 300
    assert done.height == 300 and done["error_type"].null_count() == 300
    assert 0 <= repeats <= 4  # at most the requests in flight when it stopped


async def test_a_call_from_inside_a_running_event_loop_works(sim_thread: Any) -> None:
    asyncio.get_running_loop()  # as in Jupyter, where cells run inside the kernel's loop
    with sim_thread() as sim:
        done = pipeline.run_frame(
            pl.DataFrame({"text": ["one", "two"]}), template="{text}", quiet=True,
            request={"base_url": sim.base_url},
        )  # fmt: skip
    assert done.height == 2 and done["error_type"].null_count() == 2


def test_the_progress_bar_is_shown_where_stderr_is_no_terminal(
    sim_thread: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with sim_thread() as sim:
        pipeline.run_frame(
            pl.DataFrame({"text": ["one", "two"]}), template="{text}",
            request={"base_url": sim.base_url},
        )  # fmt: skip
    assert "2/2" in capsys.readouterr().err


def _execute(client: Any, code: str) -> list[dict[str, Any]]:
    """Run a cell in the kernel; its messages until the kernel is idle again."""
    msg_id = client.execute(code)
    messages = []
    while True:
        message = client.get_iopub_msg(timeout=60)
        if message["parent_header"].get("msg_id") != msg_id:
            continue
        messages.append(message)
        if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
            return messages


# jupyter_client leaves its zmq sockets and loop to the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_in_a_jupyter_kernel_the_bar_is_a_widget_and_an_interrupt_resumes(
    sim_thread: Any,
) -> None:
    """A real kernel: cells run inside its event loop, ipywidgets draws tqdm's widget, and the
    interrupt button (SIGINT to the kernel) stops the call, which the same cell then resumes."""
    manager_module = pytest.importorskip("jupyter_client.manager")
    pytest.importorskip("ipywidgets")
    with sim_thread(latency=0.02) as sim:
        manager, client = manager_module.start_new_kernel(startup_timeout=60)
        try:
            cell = (
                "import pipeline, polars as pl\n"
                "frame = pl.DataFrame({'text': [f'row {i}' for i in range(300)]})\n"
                f"out = pipeline.run_frame(frame, template='{{text}}', request={{'base_url': {sim.base_url!r}}},"
                " limits={'concurrency': 4})\n"
                "print('rows', out.height, out['error_type'].null_count())\n"
            )
            stopper = threading.Thread(
                target=lambda: (
                    wait_for(lambda: _requests(sim) >= 40, what="the first answers"),
                    manager.interrupt_kernel(),
                ),
                daemon=True,
            )
            stopper.start()
            first = _execute(client, cell)
            stopper.join(10)
            errors = [m["content"] for m in first if m["msg_type"] == "error"]
            assert [e["ename"] for e in errors] == ["Interrupted"]
            assert "run the same call again" in errors[0]["evalue"]
            assert _requests(sim) < 300
            second = _execute(client, cell)
            repeats = _requests(sim) - 300
        finally:
            client.stop_channels()
            manager.shutdown_kernel(now=True)
    printed = "".join(m["content"].get("text", "") for m in second if m["msg_type"] == "stream")
    assert "rows 300 300" in printed
    assert 0 <= repeats <= 4
    widgets = [
        m for m in first + second
        if m["msg_type"] == "display_data"
        and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]
    ]  # fmt: skip
    assert widgets, "tqdm's notebook bar"
