"""Reading spec files, sweep spaces (``tune/*.yaml``) and experiment specs
(``experiments/*.yaml``): their sections checked for shape, before any work. Files are read by
:func:`pipeline.config.read_mapping` and presets looked up by
:func:`pipeline.config.preset_config`, as config files are; every error names the file and the
key."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, read_mapping


def read_spec(path: str | Path, sections: tuple[str, ...], what: str) -> dict[str, dict]:
    """The ``sections`` of a spec file, each a mapping (``{}`` when absent); an unknown section
    is an error."""
    source = str(path)
    data = read_mapping(path, what)
    known(data, sections, source, "top level")
    return {name: mapping(data.get(name), source, name) for name in sections}


def mapping(value: Any, source: str, name: str) -> dict:
    """``value`` as a mapping (None: empty), or a ConfigError naming ``name``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {name}: expected a mapping, got {value!r}")
    return value


def known(data: dict, keys: tuple[str, ...], source: str, where: str) -> None:
    """A ConfigError for any key of ``data`` outside ``keys``."""
    unknown = [k for k in data if k not in keys]
    if unknown:
        raise ConfigError(f"{source}: {where}: unknown key(s) {unknown}; known: {list(keys)}")


def integer(value: Any, source: str, name: str, *, low: int) -> int:
    """``value`` as an integer >= ``low`` (a bool is not one), or a ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{source}: {name}: must be an integer >= {low}, got {value!r}")
    return value
