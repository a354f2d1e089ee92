"""The one TOML reader: run configs, coordinator.toml and site.toml are all read here, so a
missing or malformed file is reported the same way whichever it is."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from fedpeft.common.errors import ConfigError


def read_toml(path: Path) -> dict[str, Any]:
    """The tables of the TOML file at ``path``; ``ConfigError`` naming the file if it is missing
    or not valid TOML."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
