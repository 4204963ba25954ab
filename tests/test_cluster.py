"""`--engine ray` on a real two-node Ray cluster started on this machine, on loopback, with the
project's simulator as the endpoint: every promise measured at the simulator's ledger."""

from __future__ import annotations

import gc
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import psutil
import pyarrow.parquet as pq
import pytest

from pipeline.journal import FLUSH_INTERVAL
from tests.helpers import (
    TEST_KEY,
    cli_env,
    journaled_positions,
    run_cli,
    sim_get,
    start_cli,
    status,
    wait_for,
)  # fmt: skip
from tests.s3server import SECRET_KEY, aws_environment, moto_server

pytestmark = pytest.mark.slow

ROWS_FIELDS_APART = ("generation_id", "latency_ms")  # differ run to run on any engine
ACTOR_PROCESS = re.compile(r"ray::(Worker|Coordinator)(\.\w+)?")  # Ray's title for an actor


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A head node and a worker node, each with 2 CPUs, every address on 127.0.0.1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from ray.cluster_utils import Cluster

        nodes = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            },
        )  # fmt: skip
        nodes.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    yield nodes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nodes.shutdown()
        # Ray leaves an event loop and its sockets unclosed in this process: collected here,
        # not in whichever later test the garbage collector happens to run in.
        gc.collect()


def prompts(folder: Path, count: int, distinct: int | None = None) -> list[str]:
    texts = [f"review {i % (distinct or count)}: the battery lasts" for i in range(count)]
    pl.DataFrame({"id": [f"r{i}" for i in range(count)], "text": texts}).write_csv(
        folder / "in.csv"
    )
    return texts


def job(
    folder: Path, sim: Any, cluster: Any | None, *, limits: str = "", cost: str = "",
    inputs: str = "", engine: str = "",
) -> str:  # fmt: skip
    """The job's config: on `cluster` if given (else `engine`, a `[cluster]` section of one's
    own, or a local run), with more `[input]` settings in `inputs`."""
    if cluster is not None:
        engine = f'[cluster]\nengine = "ray"\naddress = "{cluster.address}"\nworkers = 4\nunit_rows = 8\n'
    config = folder / "job.toml"
    config.write_text(
        f'[input]\npath = "in.csv"\nid_column = "id"\n{inputs}\n[prompt]\ntemplate = "{{text}}"\n\n'
        f'[request]\nbase_url = "{sim.base_url}"\nlabels = ["positive", "negative", "neutral"]\nmax_tokens = 16\n\n'
        f"[limits]\nconcurrency = 16\n{limits}\n\n[cost]\n{cost}\n\n"
        f'[output]\npath = "out.parquet"\n\n[retry]\nbackoff_base = 0\n\n{engine}'
    )
    return str(config)


def answered(sim: Any) -> Counter[str]:
    """How many times the simulator answered (and billed) each distinct request."""
    return Counter(entry["request_hash"] for entry in sim_get(sim, "ledger")["data"])


def job_actors() -> list[psutil.Process]:
    """The processes of the running jobs' workers and coordinators, on every node."""
    return [
        process
        for process in psutil.process_iter(["cmdline"])
        if ACTOR_PROCESS.fullmatch(" ".join(process.info["cmdline"] or ()).strip())
    ]


def totals(path: Path) -> dict[str, Any]:
    metadata = pq.read_metadata(path).metadata or {}
    return json.loads(metadata[b"pipeline"])  # type: ignore[no-any-return]


@pytest.mark.timeout(240)
def test_a_ray_run_writes_what_a_local_run_writes_and_asks_each_request_once(
    tmp_path: Path, sim_thread: Any, cluster: Any
) -> None:
    local, spread = tmp_path / "local", tmp_path / "ray"
    for folder in (local, spread):
        folder.mkdir()
        prompts(folder, 400, distinct=150)  # each prompt in units far apart, on either node
    with sim_thread(latency=0.01) as sim:
        assert run_cli(job(local, sim, None)).returncode == 0
    with sim_thread(latency=0.01) as sim:
        done = run_cli(job(spread, sim, cluster), timeout=200)
        asked = answered(sim)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    ours, theirs = (pl.read_parquet(folder / "out.parquet") for folder in (spread, local))
    assert ours.drop(ROWS_FIELDS_APART).equals(theirs.drop(ROWS_FIELDS_APART))
    assert len(asked) == 150 and set(asked.values()) == {1}  # duplicates answered once
    kept = ("true_cost_usd", "rows_ok", "rows_failed", "prompt_tokens", "completion_tokens")
    ours_meta, theirs_meta = totals(spread / "out.parquet"), totals(local / "out.parquet")
    assert {k: ours_meta.get(k) for k in kept} == {k: theirs_meta.get(k) for k in kept}


@pytest.mark.timeout(240)
def test_one_request_rate_holds_across_nodes_and_workers(
    tmp_path: Path, sim_thread: Any, cluster: Any
) -> None:
    prompts(tmp_path, 1_000)
    # The simulator runs in this process and stamps each arrival when its thread gets to it: a
    # collection of the earlier tests' garbage here can stall it and bunch the stamps (once
    # 101 in a second after a full module's tests). None happens while it measures.
    gc.collect()
    gc.disable()
    try:
        with sim_thread(rate_limit=100, rate_window=1.0, latency=0.01) as sim:
            done = run_cli(job(tmp_path, sim, cluster, limits="rps = 100"), timeout=200)
            stats = sim_get(sim, "stats")
    finally:
        gc.enable()
    assert done.returncode == 0, done.stderr
    assert stats["max_requests_per_second"] <= 100
    assert "429" not in stats["by_status"]
    achieved = stats["requests"] / (stats["last_request_at"] - stats["first_request_at"])
    assert achieved >= 95, achieved


@pytest.mark.timeout(240)
def test_a_429_s_retry_after_holds_back_every_worker_on_every_node(
    tmp_path: Path, sim_thread: Any, cluster: Any
) -> None:
    prompts(tmp_path, 80)
    # The key may send 40 requests in 2 s: the 41st gets a 429 whose Retry-After (about 2 s)
    # runs until the window has room for the 40 rows left. A request from any worker on any
    # node inside it is answered 429 again, and counted.
    with sim_thread(rate_limit=40, rate_window=2.0, latency=0.01) as sim:
        done = run_cli(job(tmp_path, sim, cluster), timeout=200)
        stats = sim_get(sim, "stats")
    assert done.returncode == 0, done.stderr
    assert pl.read_parquet(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 80
    # Only requests sent before the first 429 came back may break it: at most one a row in
    # flight elsewhere (concurrency 16). Had any worker gone on, every request it sent would.
    assert stats["by_status"]["429"] == 1 + stats["retry_after_violations"]
    assert stats["retry_after_violations"] <= 15


@pytest.mark.timeout(300)
def test_a_budget_is_never_exceeded_and_a_higher_one_finishes_paying_nothing_twice(
    tmp_path: Path, sim_thread: Any, cluster: Any
) -> None:
    prompts(tmp_path, 300)
    with sim_thread(latency=0.01) as sim:
        stopped = run_cli(job(tmp_path, sim, cluster, cost="max_cost = 0.006"), timeout=200)
        spent = sum(entry["cost"] for entry in sim_get(sim, "ledger")["data"])
        finished = run_cli(job(tmp_path, sim, cluster, cost="max_cost = 1.0"), timeout=200)
        asked = answered(sim)
    assert stopped.returncode == 4, stopped.stderr
    assert 0 < spent <= 0.006
    assert finished.returncode == 0, finished.stderr
    assert len(asked) == 300 and set(asked.values()) == {1}
    assert pl.read_parquet(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 300


def interrupted(
    folder: Path, sim: Any, cluster: Any, interrupt: Callable[[subprocess.Popen[str]], object]
) -> tuple[int, str]:
    """The 1,500-row job at 150 rps on `cluster`, with `interrupt(driver)` once 400 requests
    have been sent: the driver's exit code and stderr once it has ended."""
    driver = start_cli(job(folder, sim, cluster, limits="rps = 150"))
    try:
        wait_for(lambda: sim_get(sim, "stats")["requests"] >= 400, 120, "requests")
        interrupt(driver)
        _, stderr = driver.communicate(timeout=200)
    finally:
        if driver.poll() is None:
            driver.kill()
    return driver.returncode, stderr


def repeats_with_every_row_once(folder: Path, asked: Counter[str]) -> int:
    """The output has each of the 1,500 rows once, in order, answered; the requests repeated."""
    out = pl.read_parquet(folder / "out.parquet")
    assert out["id"].to_list() == [f"r{i}" for i in range(1_500)]
    assert out["status"].unique().to_list() == ["ok"]
    assert len(asked) == 1_500
    return sum(count - 1 for count in asked.values())


@pytest.mark.timeout(300)
def test_a_driver_killed_then_run_again_repeats_only_what_was_in_flight(
    tmp_path: Path, sim_thread: Any, cluster: Any
) -> None:
    prompts(tmp_path, 1_500)
    with sim_thread(latency=0.02) as sim:
        interrupted(tmp_path, sim, cluster, lambda driver: driver.send_signal(signal.SIGKILL))
        # The job's actors go with their driver; until then a worker may send what it holds.
        # What was answered by then and not journaled is what the kill exposed.
        wait_for(lambda: not job_actors(), 60, "the job's actors to end")
        exposed = len(answered(sim)) - len(journaled_positions(tmp_path))
        done = run_cli(str(tmp_path / "job.toml"), timeout=200)
        asked = answered(sim)
    assert done.returncode == 0, done.stderr
    repeats = repeats_with_every_row_once(tmp_path, asked)
    assert repeats <= exposed, (repeats, exposed)  # paid twice only if exposed at the kill
    # In flight (16 rows, a unit of 8 handed over) and answered in the journal's last 0.1 s.
    assert exposed <= 16 + 8 + 150 * 2 * FLUSH_INTERVAL, exposed


@pytest.mark.timeout(300)
def test_max_runtime_status_and_the_lock_work_as_in_a_local_run(
    tmp_path: Path, sim_thread: Any, cluster: Any
) -> None:
    prompts(tmp_path, 600)
    with sim_thread(latency=0.02) as sim:
        config = job(tmp_path, sim, cluster, limits="rps = 40")
        driver = start_cli(config, "--max-runtime", "12s")
        wait_for(lambda: sim_get(sim, "stats")["requests"] >= 40, 120, "requests")
        second = run_cli(config)  # the same job while the first holds its lock
        _, stderr = driver.communicate(timeout=120)
        journaled = status(config)["done"]
        paid = sum(answered(sim).values())
        finished = run_cli(config, timeout=200)
        asked = answered(sim)
    assert second.returncode == 5, second.stderr
    assert driver.returncode == 6, stderr
    assert 0 < journaled == paid < 600  # every answer paid for is in the journal
    assert finished.returncode == 0, finished.stderr
    assert len(asked) == 600 and set(asked.values()) == {1}


@pytest.mark.timeout(240)
def test_incremental_and_restart_work_as_in_a_local_run(
    tmp_path: Path, sim_thread: Any, cluster: Any
) -> None:
    prompts(tmp_path, 40)
    with sim_thread(latency=0.01) as sim:
        config = job(tmp_path, sim, cluster, inputs="incremental = true\n")
        assert run_cli(config, timeout=200).returncode == 0
        texts = prompts(tmp_path, 60)  # 20 rows more, as a scheduled run finds them
        grown = run_cli(config, timeout=200)
        after_growth = sim_get(sim, "stats")["requests"]
        again = run_cli(config, "--restart", timeout=200)
        after_restart = sim_get(sim, "stats")["requests"]
    assert grown.returncode == 0 and again.returncode == 0, grown.stderr + again.stderr
    assert after_growth == 60  # only the new rows were sent
    assert after_restart == 120  # --restart: every row again
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["text"].to_list() == texts and out["status"].to_list() == ["ok"] * 60


def test_a_local_run_does_not_import_ray(tmp_path: Path, sim_thread: Any) -> None:
    prompts(tmp_path, 3)
    code = (  # the CLI's own command, without the entry point's os._exit
        "import sys\nfrom pipeline.cli import cli\n"
        "try:\n    cli.main(['run', sys.argv[1]], prog_name='pipeline', standalone_mode=False)\n"
        "finally:\n    print('ray' in sys.modules)\n"
    )
    with sim_thread() as sim:
        done = subprocess.run(
            [sys.executable, "-c", code, job(tmp_path, sim, None)], capture_output=True,
            text=True, env=cli_env(), timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_without_ray_the_run_says_how_to_install_it_and_sends_nothing(
    tmp_path: Path, sim_thread: Any
) -> None:
    shadow = tmp_path / "shadow" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    prompts(tmp_path, 5)
    with sim_thread() as sim:
        config = job(tmp_path, sim, None, engine='[cluster]\nengine = "ray"\n')
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", config], capture_output=True, text=True,
            env={**cli_env(), "PYTHONPATH": str(shadow.parent)}, timeout=60, check=False,
        )  # fmt: skip
        sent = sim_get(sim, "stats")["requests"]
    assert done.returncode == 1, done.stderr
    assert "pip install 'prompt-pipeline[ray]'" in done.stderr
    assert "Traceback" not in done.stderr and sent == 0


def test_a_cluster_address_nobody_answers_at_is_refused_at_once_and_nothing_is_written(
    tmp_path: Path, sim_thread: Any
) -> None:
    with socket.socket() as probe:  # a port of this machine's that nothing listens at
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    prompts(tmp_path, 5)
    with sim_thread() as sim:
        config = job(
            tmp_path, sim, None, engine=f'[cluster]\nengine = "ray"\naddress = "127.0.0.1:{port}"\n'
        )
        before = sorted(tmp_path.iterdir())
        # Ray alone would retry such an address for minutes; the timeout says it must not.
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", config], capture_output=True, text=True,
            env=cli_env(), timeout=30, check=False,
        )  # fmt: skip
        sent = sim_get(sim, "stats")["requests"]
    assert done.returncode == 1, done.stderr
    assert f"cannot join the Ray cluster at 127.0.0.1:{port} (cluster.address)" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert sent == 0 and sorted(tmp_path.iterdir()) == before  # no journal, no output


def test_an_input_the_driver_cannot_read_is_refused_before_any_cluster_is_joined(
    tmp_path: Path, sim_thread: Any
) -> None:
    # The driver reads every input (and attachment) and hands requests to the nodes: a path
    # that is not where the driver runs (say, the laptop's, under `ray job submit`) is refused
    # as in a local run, before Ray is asked anything.
    with sim_thread() as sim:
        config = job(
            tmp_path, sim, None, engine='[cluster]\nengine = "ray"\naddress = "127.0.0.1:1"\n'
        )
        Path(config).write_text(Path(config).read_text().replace('"in.csv"', '"/nowhere/in.csv"'))
        done = run_cli(config, timeout=30)
        sent = sim_get(sim, "stats")["requests"]
    assert done.returncode == 1 and sent == 0, done.stderr
    assert (
        done.stderr.strip()
        == "error: input file /nowhere/in.csv does not exist (input.path / --input)"
    )


def on_this_machine_only(folder: Path, config: str) -> subprocess.CompletedProcess[str]:
    """`pipeline run config` with `folder/private` a folder only it sees (a tmpfs in a mount
    namespace of its own) holding `folder/private.csv` as `in.csv`: the nodes see what is at
    that path outside, if anything."""
    private = folder / "private"
    script = (
        f'mount -t tmpfs tmpfs "{private}" && cp "{folder}/private.csv" "{private}/in.csv" && '
        f'exec "{sys.executable}" -m pipeline run "{config}"'
    )
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, env=cli_env(), timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.timeout(300)
def test_an_input_only_this_machine_has_is_refused_on_a_cluster_of_two_nodes(
    tmp_path: Path, sim_thread: Any, cluster: Any
) -> None:
    private_mounts = (
        shutil.which("unshare") is not None
        and not subprocess.run(
            ["unshare", "--mount", "true"], capture_output=True, check=False
        ).returncode
    )
    if not private_mounts:
        pytest.skip("needs unshare --mount (root) for a folder only the driver sees")
    prompts(tmp_path, 60)
    (tmp_path / "in.csv").rename(tmp_path / "private.csv")
    (tmp_path / "private").mkdir()
    inputs = f'path = "{tmp_path / "private" / "in.csv"}"'
    with sim_thread() as sim:
        config = job(tmp_path, sim, cluster)
        Path(config).write_text(Path(config).read_text().replace('path = "in.csv"', inputs))
        before = sorted(tmp_path.iterdir())
        missing = on_this_machine_only(tmp_path, config)  # the nodes see an empty folder
        prompts(tmp_path / "private", 5)  # ... and now another file at the same path
        different = on_this_machine_only(tmp_path, config)
        sent = sim_get(sim, "stats")["requests"]
        after = sorted(tmp_path.iterdir())
        Path(config).write_text(Path(config).read_text() + "local_inputs = true\n")
        accepted = on_this_machine_only(tmp_path, config)
    where = f"input file {tmp_path / 'private' / 'in.csv'} is on this machine only"
    for refused, there in ((missing, "has no such file"), (different, "has a different file")):
        assert refused.returncode == 1, refused.stderr
        (line,) = refused.stderr.strip().splitlines()
        assert where in line and there in line and "cluster.local_inputs = true" in line, line
    assert sent == 0 and after == before  # nothing sent, no journal, no output
    assert accepted.returncode == 0, accepted.stderr  # the driver reads it; no node needs it
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out.height == 60 and out["status"].unique().to_list() == ["ok"]


@pytest.mark.timeout(240)
def test_an_object_store_input_and_output_work_on_a_cluster_of_two_nodes(
    tmp_path: Path, sim_thread: Any, cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3fs = pytest.importorskip("s3fs")
    with moto_server() as endpoint:
        for name, value in aws_environment(endpoint, tmp_path).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
        store = s3fs.S3FileSystem(skip_instance_cache=True)
        store.mkdir("incoming")
        prompts(tmp_path, 200)
        store.put(str(tmp_path / "in.csv"), "s3://incoming/in.csv")
        (tmp_path / "in.csv").unlink()  # no node, nor the driver, has it on disk
        with sim_thread() as sim:
            config = job(tmp_path, sim, cluster)
            text = Path(config).read_text()
            text = text.replace('"in.csv"', '"s3://incoming/in.csv"')
            Path(config).write_text(text.replace('"out.parquet"', '"s3://incoming/out.parquet"'))
            done = run_cli(config, timeout=200)
            asked = answered(sim)
        store.invalidate_cache()
        with store.open("s3://incoming/out.parquet", "rb") as f:
            out = pl.read_parquet(f)
    assert done.returncode == 0, done.stderr
    assert out["id"].to_list() == [f"r{i}" for i in range(200)]  # in input order
    assert out["status"].unique().to_list() == ["ok"] and len(asked) == 200


@pytest.mark.timeout(120)
def test_an_output_in_ray_s_copy_of_a_submitted_working_directory_is_refused(
    tmp_path: Path, sim_thread: Any, cluster: Any
) -> None:
    # `ray job submit --working-dir .` runs the driver in a copy of the folder under Ray's
    # session (tried by hand: the relative output and its journal were written there), which
    # Ray deletes: the answers lost and a later run paying for them again.
    session = tmp_path / "session_2026-12-06_21-40-59_1_2"
    folder = session / "runtime_resources" / "working_dir_files" / "_ray_pkg_4f352b88cddcfbf3"
    folder.mkdir(parents=True)
    prompts(folder, 20)
    with sim_thread() as sim:
        config = job(folder, sim, cluster)
        done = run_cli(config, timeout=100)
        sent = sim_get(sim, "stats")["requests"]
    assert done.returncode == 1 and sent == 0, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"output.path {folder / 'out.parquet'} is inside Ray's copy" in line, line
    assert not list(folder.glob("out.parquet*"))


@pytest.mark.timeout(300)
def test_a_worker_killed_mid_run_costs_only_what_was_in_flight_there(
    tmp_path: Path, sim_thread: Any, cluster: Any
) -> None:
    def kill_a_worker(_: Any) -> None:  # SIGKILL: one worker process; its node and the others go on
        workers = [p for p in job_actors() if "ray::Worker" in " ".join(p.cmdline())]
        assert len(workers) == 4, workers
        workers[0].kill()

    prompts(tmp_path, 1_500)
    with sim_thread(latency=0.02) as sim:
        code, stderr = interrupted(tmp_path, sim, cluster, kill_a_worker)
        asked = answered(sim)
    assert code == 0, stderr
    repeats = repeats_with_every_row_once(tmp_path, asked)
    assert repeats <= 16, repeats  # at most the rows in flight


@pytest.mark.timeout(300)
def test_a_node_lost_mid_run_costs_only_what_was_in_flight_there(
    tmp_path: Path, sim_thread: Any, cluster: Any
) -> None:
    (node,) = cluster.worker_nodes
    prompts(tmp_path, 1_500)
    with sim_thread(latency=0.02) as sim:
        try:
            code, stderr = interrupted(
                tmp_path, sim, cluster, lambda _: cluster.remove_node(node, allow_graceful=False)
            )
        finally:
            cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        asked = answered(sim)
    assert code == 0, stderr
    repeats = repeats_with_every_row_once(tmp_path, asked)
    assert repeats <= 16, repeats  # at most the rows in flight


def test_the_api_key_is_in_none_of_ray_s_files(cluster: Any) -> None:
    """Last in this module: every job above ran on this cluster with the test key, which the
    workers hold (and one read an object store, whose secret only the driver holds); none of
    its logs or session files may show either."""
    session = Path(cluster.head_node.get_session_dir_path())
    leaked = [
        path
        for path in session.rglob("*")
        if path.is_file()
        and not path.is_symlink()
        and any(secret.encode() in path.read_bytes() for secret in (TEST_KEY, SECRET_KEY))
    ]
    assert list(session.glob("logs/*")) and not leaked
