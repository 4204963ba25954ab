"""Where things are: what the tool keeps for itself (price listings, notebook jobs, remote
outputs before their upload, with their journals) under $PIPELINE_CACHE_DIR, else the XDG cache
folder; and which paths name an object store. Imports nothing heavy."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    explicit = os.environ.get("PIPELINE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prompt-pipeline"


# Object stores a path may name, and the extra that installs each one's library.
EXTRAS = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure"}


def scheme_of(path: str) -> str:
    return path.split("://", 1)[0].lower() if "://" in path else ""


def is_remote(path: str) -> bool:
    """An object-store URL (`s3://bucket/key`), which `remote` reads and writes."""
    return scheme_of(path) in EXTRAS


def staged_output(url: str) -> Path:
    """Where the output for an object-store URL is written before its upload (and the journal
    beside it): a folder of the cache, one per URL, keeping the object's name."""
    folder = hashlib.sha256(url.encode()).hexdigest()[:16]
    return cache_dir() / "outputs" / folder / (url.rstrip("/").rsplit("/", 1)[-1] or "output")
