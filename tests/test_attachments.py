"""Images and files from columns, through the real CLI against the simulator: each reaches it as
the spec's content parts, is billed per image as `/models` prices it, and a cell that cannot be
sent is an error row naming its column (or, when no row could be sent, a refusal up front)."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.simulator.catalogue import MODELS_BY_ID
from tests.helpers import FAST_RETRY, run_cli, run_command, sim_get
from tests.openapi import validate_component

VISION = MODELS_BY_ID["openai/gpt-4o-mini"]


def png(width: int, height: int) -> bytes:
    """A real PNG of red pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )  # fmt: skip


PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"


def job(folder: Path, sim: Any, prompt: str, *, model: str = VISION.id, extra: str = "") -> str:
    config = folder / "job.toml"
    config.write_text(
        f'[input]\npath = "in.parquet"\nid_column = "id"\n\n'
        f'[prompt]\ntemplate = "Describe {{text}}"\n{prompt}\n\n'
        f'[request]\nbase_url = "{sim.base_url}"\nmodel = "{model}"\nmax_tokens = 40\n\n'
        f'[output]\npath = "out.parquet"\n\n{extra}\n{FAST_RETRY}'
    )
    return str(config)


def sent_bodies(sim: Any) -> dict[str, dict[str, Any]]:
    """The requests the simulator received, by the text of their prompt."""
    found = {}
    for entry in sim_get(sim, "requests")["data"]:
        body = entry["body"]
        found[body["messages"][-1]["content"][0]["text"]] = body
    return found


@pytest.mark.timeout(120)
def test_url_local_and_binary_images_and_a_pdf_reach_the_simulator_as_content_parts(
    tmp_path: Path, sim_thread: Any
) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(png(3, 2))
    (tmp_path / "report.pdf").write_bytes(PDF)
    pl.DataFrame(
        {
            "id": ["url", "local", "missing"],
            "text": ["url", "local", "missing"],
            "photo": ["https://example.com/cat.jpg", "photos/a.png", "photos/gone.png"],
            "scan": [png(1, 1), png(2, 2), png(1, 1)],
            "doc": ["report.pdf", "report.pdf", "report.pdf"],
        }
    ).write_parquet(tmp_path / "in.parquet")
    with sim_thread() as sim:
        done = run_cli(job(tmp_path, sim, 'images = ["photo", "scan"]\nfiles = ["doc"]'))
        bodies = sent_bodies(sim)
        ledger = {e["id"]: e for e in sim_get(sim, "ledger")["data"]}
    assert done.returncode in (0, 3), done.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok", "ok", "error"]
    missing = out.row(2, named=True)
    assert missing["error_type"] == "input"
    assert missing["error_message"] == (
        f"column 'photo': file {tmp_path / 'photos' / 'gone.png'} does not exist"
    )
    assert set(bodies) == {"Describe url", "Describe local"}  # nothing sent for the error row
    for body in bodies.values():
        validate_component("ChatRequest", body)
    url_parts = bodies["Describe url"]["messages"][-1]["content"]
    assert url_parts[1] == {
        "type": "image_url",
        "image_url": {"url": "https://example.com/cat.jpg"},
    }
    local_parts = bodies["Describe local"]["messages"][-1]["content"]
    expected = "data:image/png;base64," + base64.b64encode(png(3, 2)).decode()
    assert local_parts[1] == {"type": "image_url", "image_url": {"url": expected}}
    assert local_parts[2]["image_url"]["url"].startswith("data:image/png;base64,")
    assert local_parts[3] == {
        "type": "file",
        "file": {
            "filename": "report.pdf",
            "file_data": "data:application/pdf;base64," + base64.b64encode(PDF).decode(),
        },
    }
    # Two images a row, billed per image; the row's cost is what the ledger billed.
    for row in out.filter(pl.col("status") == "ok").iter_rows(named=True):
        billed = ledger[row["generation_id"]]
        assert row["cost_usd"] == pytest.approx(billed["cost"], abs=1e-12)
        tokens_only = VISION.charges(row["prompt_tokens"], row["completion_tokens"])[0]
        assert billed["cost"] == pytest.approx(tokens_only + 2 * float(VISION.image_price))
        # The answer quotes a digest of the whole content, images and file included.
        assert row["completion"].startswith("sim:")
    assert out["completion"][0] != out["completion"][1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("notes.txt", "column 'photo': notes.txt is not a PNG, JPEG, WebP or GIF image"),
        ("big.png", "column 'photo': file {folder}/big.png is 1.1 MB, over limits.max_file_mb (1 MB)"),
        ("photos", "column 'photo': {folder}/photos is a folder, not a file"),
    ],
)  # fmt: skip
def test_a_cell_that_cannot_be_sent_is_an_error_row_naming_its_column(
    tmp_path: Path, sim_thread: Any, cell: str, message: str
) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "ok.png").write_bytes(png(1, 1))
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "big.png").write_bytes(png(1, 1) + b"\x00" * 1_100_000)
    pl.DataFrame(
        {"id": ["good", "bad"], "text": ["good", "bad"], "photo": ["ok.png", cell]}
    ).write_parquet(tmp_path / "in.parquet")
    with sim_thread() as sim:
        config = job(tmp_path, sim, 'images = ["photo"]', extra="[limits]\nmax_file_mb = 1\n")
        done = run_cli(config)
        sent = sim_get(sim, "requests")["data"]
    assert done.returncode in (0, 3), done.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok", "error"] and len(sent) == 1
    assert out["error_message"][1] == message.format(folder=tmp_path)


@pytest.mark.timeout(60)
def test_a_job_none_of_whose_images_can_be_sent_is_refused_up_front(
    tmp_path: Path, sim_thread: Any
) -> None:
    pl.DataFrame(
        {"id": ["a", "b"], "text": ["a", "b"], "photo": ["elsewhere/a.png", "elsewhere/b.png"]}
    ).write_parquet(tmp_path / "in.parquet")
    with sim_thread() as sim:
        done = run_cli(job(tmp_path, sim, 'images = ["photo"]'))
        sent = sim_get(sim, "requests")["data"]
    assert done.returncode == 1 and sent == [] and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: none of the first 2 rows' images or files can be sent; the first: column "
        f"'photo': file {tmp_path / 'elsewhere' / 'a.png'} does not exist "
        f"({tmp_path / 'in.parquet'} row 1)"
    ]
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("prompt", "model", "message"),
    [
        ('images = ["photo"]', "mistralai/mixtral-8x7b-instruct",
         "request.model (--model) 'mistralai/mixtral-8x7b-instruct' takes no image input"),
        ('images = ["picture"]', VISION.id,
         "prompt.images names column 'picture', which the input does not have"),
        ('images = ["count"]', VISION.id,
         "prompt.images: column 'count' is Int64; it must hold URLs or paths (text)"),
    ],
)  # fmt: skip
def test_images_a_model_or_column_cannot_take_are_refused_before_sending(
    tmp_path: Path, sim_thread: Any, prompt: str, model: str, message: str
) -> None:
    (tmp_path / "a.png").write_bytes(png(1, 1))
    pl.DataFrame({"id": ["a"], "text": ["a"], "photo": ["a.png"], "count": [1]}).write_parquet(
        tmp_path / "in.parquet"
    )
    with sim_thread() as sim:
        done = run_cli(job(tmp_path, sim, prompt, model=model))
        sent = sim_get(sim, "requests")["data"]
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert sent == [] and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(60)
def test_the_estimate_prices_images_as_the_listing_does(tmp_path: Path, sim_thread: Any) -> None:
    (tmp_path / "a.png").write_bytes(png(1, 1))
    pl.DataFrame({"id": [str(i) for i in range(10)], "text": [f"t{i}" for i in range(10)],
                  "photo": ["a.png"] * 10}).write_parquet(tmp_path / "in.parquet")  # fmt: skip
    with sim_thread() as sim:
        plain = run_command("estimate", job(tmp_path, sim, "", model=VISION.id), "--json")
        pictured = run_command(
            "estimate", job(tmp_path, sim, 'images = ["photo"]', model=VISION.id), "--json"
        )
    assert plain.returncode == 0 and pictured.returncode == 0, pictured.stderr
    before = json.loads(plain.stdout)["by_model"][VISION.id]
    after = json.loads(pictured.stdout)["by_model"][VISION.id]
    assert after["images"] == 10
    # Ten images at the per-image price, plus their round token figure at the prompt price.
    image_cost = 10 * float(VISION.image_price)
    assert after["cost_low"] - before["cost_low"] >= image_cost
    assert after["cost_high"] - before["cost_high"] >= image_cost
