"""Images and files from columns (`prompt.images`, `prompt.files`), as content parts of the user
message after its text, in OpenRouter's (and OpenAI's) shapes:

    {"type": "image_url", "image_url": {"url": ...}}
    {"type": "file", "file": {"filename": ..., "file_data": ...}}

A cell is an http(s) URL (passed on as it is: the provider fetches it), a `data:` URI (passed
on), a local path (relative to the folder of the input file the row came from) or bytes (a
binary column); a path or bytes are sent as a base64 data URI with the media type their first
bytes show. A cell that cannot be sent (null, a missing or unreadable file, not an image where
an image is wanted, over `limits.max_file_mb`) makes its row an error row naming the column, and
nothing is sent for that row.
"""

from __future__ import annotations

import base64
import mimetypes
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.errors import InputError
from pipeline.options import describe

IMAGE, FILE = "image", "file"
# What a provider bills an image as, for the rate and budget estimates before an answer says:
# a 1024 x 1024 picture at high detail is 765 tokens on OpenAI's models; files count by size.
IMAGE_TOKENS = 765
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"), (b"%PDF-", "application/pdf"),
)  # fmt: skip
_IMAGE_NAMES = "a PNG, JPEG, WebP or GIF image"


@dataclass(frozen=True, slots=True)
class Attached:
    """One row's parts, or why they cannot be sent."""

    parts: list[dict[str, Any]]
    images: int = 0
    file_bytes: int = 0
    error: str | None = None


class Attachments:
    """The content parts of each row, from the job's image and file columns."""

    def __init__(
        self,
        columns: list[tuple[str, str]],  # (column, IMAGE | FILE)
        schema: Any,
        max_bytes: int,
        folder_of: Callable[[int], Path | None],  # of the input file holding a position
    ) -> None:
        for column, kind in columns:
            key = describe("prompt.images" if kind == IMAGE else "prompt.files")
            if column not in schema:
                raise InputError(
                    f"{key} names column '{column}', which the input does not have; columns: {', '.join(schema)}"
                )
            if schema[column] not in (pl.String, pl.Binary):
                raise InputError(
                    f"{key}: column '{column}' is {schema[column]}; it must hold URLs or paths (text) or the bytes themselves (binary)"
                )
        self.columns = columns
        self.max_bytes = max_bytes
        self.folder_of = folder_of

    def for_rows(self, frame: pl.DataFrame, positions: list[int]) -> list[Attached]:
        """The parts of each row of `frame` (whose positions are `positions`), in order."""
        cells = [frame[column].to_list() for column, _ in self.columns]
        found = []
        for i, position in enumerate(positions):
            parts, images, size = [], 0, 0
            error = None
            for (column, kind), values in zip(self.columns, cells, strict=True):
                part, used, error = self._part(column, kind, values[i], position)
                if error is not None:
                    break
                parts.append(part)
                images += kind == IMAGE
                size += used
            found.append(
                Attached(parts, images, size, error) if error is None else Attached([], error=error)
            )
        return found

    def _part(
        self, column: str, kind: str, value: Any, position: int
    ) -> tuple[dict[str, Any], int, str | None]:
        """One cell's part and the bytes it adds, or why it cannot be sent."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return {}, 0, f"column '{column}' is empty, so there is no {kind} to send"
        name = column
        if isinstance(value, bytes):
            data = value
        else:
            text = value.strip()
            if text.startswith(("http://", "https://", "data:")):
                if text.startswith("data:") and len(text) * 3 // 4 > self.max_bytes:
                    return {}, 0, self._too_big(column, len(text) * 3 // 4)
                filename = Path(urllib.parse.urlsplit(text).path).name or column
                return _shaped(kind, text, filename), 0, None
            path = Path(text).expanduser()
            if not path.is_absolute() and (folder := self.folder_of(position)) is not None:
                path = folder / path
            try:
                size = path.stat().st_size
                if size > self.max_bytes:
                    return {}, 0, self._too_big(column, size, path)
                data = path.read_bytes()
            except FileNotFoundError:
                return {}, 0, f"column '{column}': file {path} does not exist"
            except IsADirectoryError:
                return {}, 0, f"column '{column}': {path} is a folder, not a file"
            except OSError as exc:
                return {}, 0, f"column '{column}': file {path} cannot be read: {exc.strerror}"
            name = path.name
        if len(data) > self.max_bytes:
            return {}, 0, self._too_big(column, len(data))
        media = media_type(data, name)
        if kind == IMAGE and (media is None or not media.startswith("image/")):
            return {}, 0, f"column '{column}': {name} is not {_IMAGE_NAMES}"
        if media is None:
            return (
                {},
                0,
                f"column '{column}': cannot tell what kind of file {name} is (give it an extension such as .pdf)",
            )
        uri = f"data:{media};base64,{base64.b64encode(data).decode()}"
        return (
            _shaped(kind, uri, name if "." in name else f"{name}{_suffix(media)}"),
            len(data),
            None,
        )

    def _too_big(self, column: str, size: int, path: Path | None = None) -> str:
        what = f"file {path}" if path else "its value"
        return (
            f"column '{column}': {what} is {size / 1e6:.1f} MB, over {describe('limits.max_file_mb')} "
            f"({self.max_bytes / 1e6:g} MB)"
        )


def media_type(data: bytes, name: str) -> str | None:
    """What the bytes are, by their first bytes, else by the name's extension."""
    for magic, media in _MAGIC:
        if data.startswith(magic):
            return media
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    guessed, _ = mimetypes.guess_type(name)
    return None if guessed is None or guessed.startswith("image/") else guessed


def _shaped(kind: str, url: str, filename: str) -> dict[str, Any]:
    if kind == IMAGE:
        return {"type": "image_url", "image_url": {"url": url}}
    return {"type": "file", "file": {"filename": filename, "file_data": url}}


def _suffix(media: str) -> str:
    return mimetypes.guess_extension(media) or ""
