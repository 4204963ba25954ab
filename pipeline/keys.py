"""The API key a job sends: the simulator's with `request.simulate`, else the user's, from the
environment or `request.key_file`. It goes into the Authorization header and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import JobConfig
from pipeline.errors import ConfigError

KEY_ENV = "OPENROUTER_API_KEY"
SIMULATOR_KEY = "sk-or-v1-simulator-local-0000000000000000"  # what --simulate runs send


def read_api_key(config: JobConfig) -> str | None:
    """The key from OPENROUTER_API_KEY, else from `request.key_file`; None if neither is set."""
    key = os.environ.get(KEY_ENV, "").strip()
    if key:
        return key
    if config.request.key_file:
        path = Path(config.request.key_file)
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"request.key_file {path} cannot be read: {exc.strerror}") from None
        if not key:
            raise ConfigError(f"request.key_file {path} is empty")
        return key
    return None


def api_key(config: JobConfig) -> str:
    """The key a job sends: the simulator's with `request.simulate`, else the user's."""
    if config.request.simulate:
        return SIMULATOR_KEY
    key = read_api_key(config)
    if key is None:
        raise ConfigError(
            f"no API key: set {KEY_ENV} in the environment (or request.key_file in the config); or try --simulate"
        )
    return key
