"""Object-store inputs and outputs: `s3://`, `gs://` and `az://` paths (and globs), through
fsspec and each store's own library (s3fs, gcsfs, adlfs), installed by the extras `[s3]`,
`[gcs]` and `[azure]`.

fsspec rather than pyarrow's or polars' object-store readers: one interface for every store
with globbing and paginated listing built in, each store's standard credential chain
(environment, profiles, instance roles) and an object version (ETag, generation) to fingerprint
an input by without reading it. Credentials are never passed from here, so none can come
from a config file or a flag; messages are scrubbed of any secret the environment holds.

Only this module imports fsspec, and only when a remote path is used (`places.is_remote`).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import IO, Any

from pipeline.errors import ConfigError, InputError, JobStopped
from pipeline.places import EXTRAS, is_remote, scheme_of

# What an object's version is called in each store's listing, most exact first.
VERSION_FIELDS = ("VersionId", "ETag", "etag", "generation", "md5Hash", "crc32c")
SECRET_NAMES = re.compile(r"SECRET|TOKEN|PASSWORD|CREDENTIAL|ACCOUNT_KEY|STORAGE_KEY|SAS", re.I)


@dataclass(frozen=True)
class RemoteFile:
    """One object of an input: what `source` reads through, in place of a `Path`."""

    url: str
    size: int
    version: str | None
    fs: Any = field(compare=False, repr=False)

    def __str__(self) -> str:
        return self.url

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.url).suffix

    def stat(self) -> SimpleNamespace:
        return SimpleNamespace(st_size=self.size)

    def open(self, mode: str = "rb", **text: Any) -> IO[Any]:
        """The object for reading, fetched in the ranges the reader asks for (no read-ahead
        cache: Parquet readers ask for whole column chunks, CSV and JSONL read in order)."""
        try:
            raw = self.fs.open(_bare(self.url), "rb", cache_type="none")
        except Exception as exc:
            raise store_error(f"input file {self.url} cannot be read", exc) from None
        return raw if "b" in mode else io.TextIOWrapper(raw, **text)

    def fingerprint(self) -> dict[str, Any]:
        """What a resume compares: the object's version stands for its content's hash."""
        return {"file": self.url, "bytes": self.size, "version": self.version}


def filesystem(url: str, key: str) -> Any:
    """The fsspec filesystem for `url`'s store, made afresh (so credentials set since the last
    job in a notebook count); a missing library is named with the extra that installs it."""
    scheme = scheme_of(url)
    try:
        import fsspec

        return fsspec.filesystem(scheme, skip_instance_cache=True)
    except ImportError:
        extra = EXTRAS[scheme]
        raise ConfigError(
            f"{key} {url}: {scheme}:// paths need the [{extra}] extra; "
            f"pip install 'prompt-pipeline[{extra}]'"
        ) from None


def list_objects(pattern: str, key: str) -> tuple[RemoteFile, ...]:
    """The objects a URL or glob names, sorted; listings are paginated by the store's library
    (a folder of 1,500 objects is two ListObjectsV2 calls on S3)."""
    fs = filesystem(pattern, key)
    prefix = f"{scheme_of(pattern)}://"
    try:
        if any(ch in pattern for ch in "*?["):
            found = fs.glob(_bare(pattern), detail=True)
        else:
            found = {_bare(pattern): fs.info(_bare(pattern))}
    except FileNotFoundError:
        raise InputError(f"input file {pattern} does not exist (input.path / --input)") from None
    except Exception as exc:
        raise store_error(f"{key} {pattern} cannot be listed", exc) from None
    files = tuple(
        RemoteFile(
            prefix + name.removeprefix(prefix), int(info.get("size") or 0), _version(info), fs
        )
        for name, info in sorted(found.items())
        if info.get("type") == "file"
    )
    if not files:
        if found:
            raise InputError(
                f"{key} {pattern} is a folder; use a glob such as {pattern.rstrip('/')}/*.parquet"
            )
        raise InputError(f"{key} {pattern} matches no objects (or its bucket does not exist)")
    return files


def bucket_exists(url: str, key: str) -> bool:
    fs = filesystem(url, key)
    bucket = _bare(url).split("/", 1)[0]
    try:  # not `exists`, which reads missing credentials as a missing bucket
        fs.info(bucket)
        return True
    except FileNotFoundError:
        return False
    except Exception as exc:
        raise store_error(f"{key} {url} cannot be checked", exc) from None


def publish(local: Path, url: str, key: str) -> None:
    """Upload the finished output: one PUT, or a multipart upload that is completed only once
    every part is in (s3fs aborts it on a failure), so the object never appears half-written."""
    fs = filesystem(url, key)
    try:
        fs.put_file(str(local), _bare(url))
    except Exception as exc:
        raise JobStopped(
            f"{key} {url} cannot be written: {scrub(_first_line(exc))}; the output is complete "
            f"in {local}, and running the job again uploads it (nothing is sent again)"
        ) from None


def store_error(what: str, exc: BaseException) -> InputError:
    """A store's failure as one line, with a hint for the usual causes."""
    text = scrub(_first_line(exc))
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError") or isinstance(
        exc, PermissionError
    ):
        hint = (
            "; check the credentials in the environment or the store's profile "
            "(for S3: AWS_ACCESS_KEY_ID / AWS_PROFILE)"
        )
    else:
        hint = ""
    return InputError(f"{what}: {text}{hint}")


def scrub(text: str) -> str:
    """`text` without any secret the environment holds (a store's error may quote one)."""
    for name, value in os.environ.items():
        if len(value) >= 8 and (SECRET_NAMES.search(name) or name.endswith("_KEY_ID")):
            text = text.replace(value, "***")
    return text


def _version(info: dict[str, Any]) -> str | None:
    for name in VERSION_FIELDS:
        if info.get(name):
            return str(info[name]).strip('"')
    modified = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    return str(modified) if modified else None


def _bare(url: str) -> str:
    """The path fsspec's store expects: the URL without its scheme."""
    return url.split("://", 1)[1] if is_remote(url) else url


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
