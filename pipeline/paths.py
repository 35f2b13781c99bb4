"""Where things are: the project's own folder, where it keeps what it prepares once (converted
models, the WordNet copy), and the check every command makes of the folder it writes."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the clone: cluster/, tune/, ../shared


def cache_dir() -> Path:
    """``$DDPT_CACHE_DIR``, else ``~/.cache/ddpt``."""
    return Path(os.environ.get("DDPT_CACHE_DIR", Path.home() / ".cache" / "ddpt")).expanduser()


class OutputFolderError(ValueError):
    """A command's output folder that it could not write: the message names the folder."""


def writable_folder(path: str | os.PathLike) -> Path:
    """``path`` if this process can write its results there: an existing folder it may write
    into, or a missing one whose nearest existing parent is such a folder. Creates nothing (a
    command that then fails on a bad option leaves no folder behind); raises OutputFolderError
    naming the folder and why."""
    path = Path(path).expanduser()
    existing = path
    while not os.path.lexists(existing):  # lexists: a broken link is there, and in the way
        existing = existing.parent
    if not existing.is_dir():
        if existing == path:
            raise OutputFolderError(f"{path} is a file, not a folder: give a folder to write the "
                                    "results into (a missing one is created)")
        raise OutputFolderError(f"{path}: cannot create this folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        why = "a read-only file system" if read_only else "no write permission for this user"
        if existing == path:
            raise OutputFolderError(f"{path}: cannot write into this folder ({why})")
        raise OutputFolderError(f"{path}: cannot create this folder: {existing} is not writable "
                                f"({why})")
    return path
