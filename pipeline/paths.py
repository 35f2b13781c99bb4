"""Where the project keeps what it prepares once (converted models, the WordNet copy)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$DDPT_CACHE_DIR``, else ``~/.cache/ddpt``."""
    return Path(os.environ.get("DDPT_CACHE_DIR", Path.home() / ".cache" / "ddpt")).expanduser()
