"""Reading a job's TOML config file, with a clear word when it is something else."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.options import INPUT_FORMATS

DATA_SUFFIXES = {*INPUT_FORMATS, ".json"}


def read_toml(config_file: Path) -> dict[str, Any]:
    """The config file's TOML, or a clear word on what it is instead (a data file given where
    the config goes is the usual mix-up)."""
    try:
        data = config_file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {config_file} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {config_file} is a folder; give a TOML job file") from None
    except OSError as exc:
        raise ConfigError(f"config file {config_file} cannot be read: {exc.strerror}") from None
    if data.startswith(b"PAR1") or config_file.suffix.lower() in DATA_SUFFIXES:
        raise ConfigError(
            f"config file {config_file} is a data file, not a TOML job config; give it as --input {config_file}"
            " (with a config file or --template / --prompt-column)"
        )
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(
            f"config file {config_file} is not a TOML file (not UTF-8 text); give a TOML job file such as configs/example.toml"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None
