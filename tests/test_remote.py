"""s3:// inputs and outputs, through the real CLI, against moto's S3 server on loopback: globs
to an object, a SIGKILL then a resume, an incremental folder of 1,500 objects, no object at the
output key before the job is done, clear errors, and no credential in any file or log."""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.places import staged_output
from tests.helpers import FAST_RETRY, cli_env, run_cli, sim_get, start_cli, wait_for
from tests.s3server import ACCESS_KEY, SECRET_KEY, aws_environment, moto_server, reset

s3fs = pytest.importorskip("s3fs")

OUT = "s3://labels/runs/out.parquet"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def s3(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An empty store, the environment pointing at it, and a filesystem to look at it with."""
    reset(s3_endpoint)
    for name, value in aws_environment(s3_endpoint, tmp_path).items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("incoming")
    fs.mkdir("labels")
    return fs


def put_rows(fs: Any, url: str, first: int, count: int) -> None:
    frame = pl.DataFrame(
        {"id": [f"r{i}" for i in range(first, first + count)],
         "text": [f"review {i}: the kettle boils fast" for i in range(first, first + count)]}
    )  # fmt: skip
    with fs.open(url, "wb") as f:
        frame.write_parquet(f)


def write_config(folder: Path, sim: Any, inputs: str, extra: str = "") -> str:
    config = folder / "job.toml"
    config.write_text(
        f'[input]\npath = "{inputs}"\nid_column = "id"\n\n[prompt]\ntemplate = "{{text}}"\n\n'
        f'[request]\nbase_url = "{sim.base_url}"\n\n[output]\npath = "{OUT}"\n\n{FAST_RETRY}{extra}'
    )
    return str(config)


def read_output(fs: Any) -> pl.DataFrame:
    fs.invalidate_cache()
    with fs.open(OUT, "rb") as f:
        return pl.read_parquet(f)


def journaled(journal: Path) -> int:
    with sqlite3.connect(journal) as db:
        return int(db.execute("SELECT count(*) FROM results").fetchone()[0])


def assert_no_credentials_in(*texts: str) -> None:
    """Neither the key id nor the secret in what was printed, nor in any file the job left."""
    cache = Path(os.environ["PIPELINE_CACHE_DIR"])
    for text in texts:
        assert ACCESS_KEY not in text and SECRET_KEY not in text
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files  # the staged output and its journal are there
    for path in files:
        data = path.read_bytes()
        assert ACCESS_KEY.encode() not in data and SECRET_KEY.encode() not in data, path


def test_an_s3_glob_is_labeled_into_an_s3_object(tmp_path: Path, sim_thread: Any, s3: Any) -> None:
    for part in range(3):
        put_rows(s3, f"s3://incoming/day/part-{part}.parquet", part * 20, 20)
    with sim_thread() as sim:
        done = run_cli(write_config(tmp_path, sim, "s3://incoming/day/part-*.parquet"))
        assert done.returncode == 0, done.stderr
        assert sim_get(sim, "stats")["requests"] == 60
    out = read_output(s3)
    assert out["id"].to_list() == [f"r{i}" for i in range(60)]  # in input order
    assert out["status"].to_list() == ["ok"] * 60
    assert f"wrote {OUT}" in done.stderr
    assert staged_output(OUT).with_name("out.parquet.journal").is_file()  # the journal is local
    assert_no_credentials_in(done.stdout, done.stderr)


def test_sigkill_mid_run_leaves_no_object_and_a_rerun_finishes_every_row_once(
    tmp_path: Path, sim_thread: Any, s3: Any
) -> None:
    put_rows(s3, "s3://incoming/big.parquet", 0, 240)
    with sim_thread(latency=0.02) as sim:
        config = write_config(
            tmp_path, sim, "s3://incoming/big.parquet", "[limits]\nconcurrency = 8\n"
        )
        proc = start_cli(config)
        wait_for(lambda: len(sim_get(sim, "ledger")["data"]) >= 80, what="80 answers")
        s3.invalidate_cache()
        assert not s3.exists(OUT)  # mid-run: nothing at the output key
        proc.kill()
        proc.communicate(timeout=10)
        billed_at_kill = len(sim_get(sim, "ledger")["data"])
        settled_at_kill = journaled(staged_output(OUT).with_name("out.parquet.journal"))
        s3.invalidate_cache()
        assert not s3.exists(OUT) and not s3.glob("s3://labels/**")
        rerun = run_cli(config)
        assert rerun.returncode == 0, rerun.stderr
        billed = len(sim_get(sim, "ledger")["data"])
    out = read_output(s3)
    assert out["id"].to_list() == [f"r{i}" for i in range(240)]
    assert out["status"].to_list() == ["ok"] * 240
    # Repaid: only answers that had arrived but were not yet in the journal when it died.
    assert billed - 240 <= billed_at_kill - settled_at_kill
    assert_no_credentials_in(rerun.stdout, rerun.stderr)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_incremental_job_over_1500_objects_sends_only_the_new_ones(
    tmp_path: Path, sim_thread: Any, s3: Any
) -> None:
    """More objects than one listing page (1,000 on S3): every one is read, then only the
    objects added since are sent."""
    rows = {
        f"incoming/new/{i:05d}.jsonl": f'{{"id": "r{i}", "text": "note {i}"}}\n'.encode()
        for i in range(1500)
    }
    s3.pipe(rows)
    with sim_thread() as sim:
        config = write_config(
            tmp_path, sim, "s3://incoming/new/*.jsonl", "[limits]\nconcurrency = 32\n"
        )
        first = run_cli(config, "--incremental", timeout=300)
        assert first.returncode == 0, first.stderr
        assert sim_get(sim, "stats")["requests"] == 1500
        s3.pipe(
            {
                f"incoming/new/{i:05d}.jsonl": f'{{"id": "r{i}", "text": "note {i}"}}\n'.encode()
                for i in range(1500, 1503)
            }
        )
        second = run_cli(config, "--incremental", timeout=300)
        assert second.returncode == 0, second.stderr
        assert sim_get(sim, "stats")["requests"] == 1503
    out = read_output(s3)
    assert out.height == 1503 and out["id"].to_list() == [f"r{i}" for i in range(1503)]


def test_a_missing_bucket_or_object_is_one_line_and_nothing_is_sent(
    tmp_path: Path, sim_thread: Any, s3: Any
) -> None:
    put_rows(s3, "s3://incoming/a.parquet", 0, 5)
    with sim_thread() as sim:
        config = write_config(tmp_path, sim, "s3://incoming/a.parquet")
        no_object = run_cli(config, "--input", "s3://incoming/nope.parquet")
        no_bucket = run_cli(config, "--input", "s3://no-such-bucket/*.parquet")
        no_output_bucket = run_cli(config, "--output", "s3://no-such-bucket/out.parquet")
        assert sim_get(sim, "stats")["requests"] == 0
    assert no_object.returncode == 1
    assert no_object.stderr.strip() == (
        "error: input file s3://incoming/nope.parquet does not exist (input.path / --input)"
    )
    assert no_bucket.returncode == 1
    assert (
        "s3://no-such-bucket/*.parquet matches no objects (or its bucket does not exist)"
        in no_bucket.stderr
    )
    assert no_output_bucket.returncode == 1
    assert "the bucket no-such-bucket does not exist" in no_output_bucket.stderr
    for done in (no_object, no_bucket, no_output_bucket):
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_missing_credentials_are_a_clear_error(
    tmp_path: Path, sim_thread: Any, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_rows(s3, "s3://incoming/a.parquet", 0, 5)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with sim_thread() as sim:
        done = run_cli(write_config(tmp_path, sim, "s3://incoming/a.parquet"))
        assert sim_get(sim, "stats")["requests"] == 0
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "Unable to locate credentials" in done.stderr and "AWS_PROFILE" in done.stderr


def test_without_the_extra_a_remote_path_names_it(tmp_path: Path, s3: Any) -> None:
    """s3fs missing (blocked from import): the error names the extra to install."""
    code = (
        "import sys; sys.modules['fsspec'] = sys.modules['s3fs'] = None; "
        "from pipeline.__main__ import main; sys.argv = ['pipeline', *sys.argv[1:]]; main()"
    )
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", code, "run", "--input", "s3://incoming/a.parquet",
         "--template", "{text}", "--output", str(tmp_path / "out.parquet"), "--simulate"],
        capture_output=True, text=True, timeout=60, env=cli_env(), check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (
        "error: input.path (--input) s3://incoming/a.parquet: s3:// paths need the [s3] extra; "
        "pip install 'prompt-pipeline[s3]'"
    )


def test_a_gs_path_without_gcsfs_names_its_extra(tmp_path: Path) -> None:
    if "gcsfs" in sys.modules or __import__("importlib").util.find_spec("gcsfs"):
        pytest.skip("gcsfs is installed here")
    done = run_cli(
        "--input", "gs://bucket/in.parquet", "--template", "{text}",
        "--output", str(tmp_path / "out.parquet"), "--simulate",
    )  # fmt: skip
    assert done.returncode == 1
    assert "gs:// paths need the [gcs] extra; pip install 'prompt-pipeline[gcs]'" in done.stderr
