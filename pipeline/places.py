"""Where the tool keeps what it makes for itself (price listings, notebook jobs, the journals of
remote outputs): $PIPELINE_CACHE_DIR, else the XDG cache folder."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    explicit = os.environ.get("PIPELINE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prompt-pipeline"
