"""Where things are: the project's own folder, and where it keeps what it prepares once
(converted models, the WordNet copy)."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the clone: cluster/, tune/, ../shared


def cache_dir() -> Path:
    """``$DDPT_CACHE_DIR``, else ``~/.cache/ddpt``."""
    return Path(os.environ.get("DDPT_CACHE_DIR", Path.home() / ".cache" / "ddpt")).expanduser()
