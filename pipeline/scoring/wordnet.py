"""Offline WordNet for nltk (needed by METEOR).

nltk normally downloads WordNet from the internet. Offline we build the same corpus folder from
Debian's ``wordnet-base`` and ``wordnet-sense-index`` packages (WordNet 3.0 under
``/usr/share/wordnet``) plus the small ``lexnames`` file Debian does not ship (kept in
``<data dir>/wordnet/lexnames``). The files are *copied*, not symlinked: nltk refuses paths that
resolve outside its data folders. Debian's file names (``index.noun``, ``data.noun``,
``noun.exc``, ``index.sense``, ``cntlist.rev``, ...) are the ones nltk's ``WordNetCorpusReader``
reads, so no renaming is needed.

``python -m pipeline.scoring.wordnet`` builds the cache and prints the nltk data folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import nltk
from nltk.corpus.reader.wordnet import WordNetCorpusReader

from pipeline.data.loaders import resolve_data_dir
from pipeline.paths import cache_dir

SYSTEM_WORDNET_DIR = Path("/usr/share/wordnet")

#: Files nltk's WordNetCorpusReader opens; all but ``lexnames`` come from the Debian packages.
REQUIRED_FILES: tuple[str, ...] = WordNetCorpusReader._FILES

INSTALL_HINT = (
    "install Debian packages `wordnet-base wordnet-sense-index` "
    "(`apt-get install -y wordnet-base wordnet-sense-index`)"
)


def default_lexnames_path() -> Path:
    """``<data dir>/wordnet/lexnames`` (the data dir as every loader resolves it)."""
    return resolve_data_dir() / "wordnet" / "lexnames"


def default_cache_dir() -> Path:
    """``<ddpt cache>/nltk_data`` (``$DDPT_CACHE_DIR``, else ``~/.cache/ddpt``)."""
    return cache_dir() / "nltk_data"


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def _build(target: Path, lexnames_path: Path) -> None:
    """Copy the WordNet files into ``target`` via a temp folder and an atomic rename."""
    missing = [n for n in REQUIRED_FILES
               if n != "lexnames" and not (SYSTEM_WORDNET_DIR / n).is_file()]
    if missing:
        raise RuntimeError(
            f"WordNet files missing from {SYSTEM_WORDNET_DIR} ({', '.join(missing)}): "
            f"{INSTALL_HINT}"
        )
    if not lexnames_path.is_file():
        raise RuntimeError(
            f"WordNet lexnames file not found at {lexnames_path} (expected "
            "<data dir>/wordnet/lexnames; "
            "set DDPT_DATA_DIR or pass lexnames_path)"
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet-tmp-", dir=target.parent))
    try:
        for src in SYSTEM_WORDNET_DIR.iterdir():
            if src.is_file():  # skip Debian's bin/, pixmaps/, wnres/
                shutil.copyfile(src, tmp / src.name)
        shutil.copyfile(lexnames_path, tmp / "lexnames")
        if target.exists():  # a broken leftover (no atomic rename makes one, but be safe)
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_wordnet(cache_dir: Path | None = None, lexnames_path: Path | None = None) -> Path:
    """Make nltk's WordNet available offline; return the nltk data folder holding it.

    Idempotent: builds ``<cache_dir>/corpora/wordnet/`` once, prepends ``cache_dir`` to
    ``nltk.data.path`` and checks that ``nltk.corpus.wordnet.synsets("dog")`` works.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = root.expanduser().resolve()  # nltk compares resolved paths
    lexnames = Path(lexnames_path) if lexnames_path is not None else default_lexnames_path()

    target = root / "corpora" / "wordnet"
    if not _is_complete(target):
        _build(target, lexnames)

    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))

    from nltk.corpus import wordnet

    if not wordnet.synsets("dog"):
        raise RuntimeError(f"WordNet at {target} loaded but found no synsets for 'dog'")
    return root


if __name__ == "__main__":
    print(ensure_wordnet())
