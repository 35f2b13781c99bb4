"""Where Ray Train and Ray Tune keep a job's checkpoints and run state
(``distributed.storage_path``).

On one machine the default, ``<output>/ray``, is visible to every worker. On a cluster whose
nodes have their own disks it must be a folder every node mounts (NFS) or a URI that pyarrow
opens (``s3://bucket/prefix``, ``gs://...``): a Train worker on another node writes its
checkpoint shards there, and a restarted run reads them back from there.

A job writes ``storage.json`` into its output folder: the storage and the run's name inside it,
so that ``--resume`` finds the run again (and refuses a different storage_path).
"""
from __future__ import annotations

import hashlib
import json
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, RunConfig

POINTER_FILE = "storage.json"
REACH_TIMEOUT_S = 30.0  # an unreachable bucket answers within this, or counts as unreachable


@dataclass(frozen=True)
class RunStorage:
    """One Ray run's place: ``root`` (a local absolute path or a URI, Ray's ``storage_path``)
    and ``name`` (Ray's run name; the run's folder is ``root/name``)."""

    root: str
    name: str

    @property
    def location(self) -> str:
        return f"{self.root.rstrip('/')}/{self.name}"

    def exists(self) -> bool:
        """Whether the run's folder exists in the storage."""
        import pyarrow.fs

        filesystem, path = open_filesystem(self.root)
        info = filesystem.get_file_info(f"{path.rstrip('/')}/{self.name}")
        return info.type != pyarrow.fs.FileType.NotFound


def is_uri(root: str) -> bool:
    return "://" in root


def open_filesystem(root: str):
    """``(pyarrow filesystem, path inside it)`` for a local path or a URI."""
    import pyarrow.fs

    if not is_uri(root):
        return pyarrow.fs.LocalFileSystem(), str(Path(root).expanduser().resolve())
    try:
        return pyarrow.fs.FileSystem.from_uri(root)
    except Exception as err:  # ArrowInvalid (unknown scheme), OSError (no credentials, ...)
        raise ConfigError(f"distributed.storage_path: {root}: pyarrow cannot open it: "
                          f"{err}") from err


def run_storage(config: RunConfig, output: Path, name: str,
                default_root: Path | None = None) -> RunStorage:
    """The storage of the Ray run ``name`` that writes into ``output``: ``<default_root>/<name>``
    (``<output>/ray`` unless given) by default; with ``distributed.storage_path`` set,
    ``<storage_path>/<name>-<output folder's name>-<8 hex digits of its path>`` (one storage
    serves many jobs)."""
    root = config.distributed.storage_path
    if root is None:
        return RunStorage(str(Path(default_root or Path(output) / "ray").resolve()), name)
    root = root if is_uri(root) else str(Path(root).expanduser().resolve())
    output = Path(output).resolve()
    digest = hashlib.sha1(str(output).encode()).hexdigest()[:8]
    return RunStorage(root, f"{name}-{output.name}-{digest}")


def check_storage(storage: RunStorage, timeout: float = REACH_TIMEOUT_S) -> None:
    """Fail now, naming ``distributed.storage_path``, unless a file can be written into and
    removed from the storage's root (an unreachable endpoint fails after ``timeout``)."""
    filesystem, path = open_filesystem(storage.root)
    probe = f"{path.rstrip('/')}/.ddpt-probe-{uuid.uuid4().hex[:8]}"
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            filesystem.create_dir(path, recursive=True)
            with filesystem.open_output_stream(probe) as stream:
                stream.write(b"ddpt")
            filesystem.delete_file(probe)
            outcome.append(None)
        except BaseException as err:  # reported below, with the setting's name
            outcome.append(err)

    # A thread, because an unreachable endpoint can retry for minutes inside the client.
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise ConfigError(f"distributed.storage_path: {storage.root}: no answer within "
                          f"{timeout:.0f} s (unreachable?)")
    if outcome[0] is not None:
        raise ConfigError(f"distributed.storage_path: {storage.root}: cannot write there: "
                          f"{outcome[0]}") from outcome[0]


def record_storage(output: Path, storage: RunStorage, *, resume: bool) -> RunStorage:
    """Write (or, on resume, check) ``<output>/storage.json``; returns the storage to use. A
    resume with another storage_path than the run was started with fails, naming both."""
    pointer = Path(output) / POINTER_FILE
    if pointer.is_file():
        saved = RunStorage(**json.loads(pointer.read_text()))
        if resume and saved != storage:
            raise ConfigError(f"distributed.storage_path: {pointer} says this run is stored at "
                              f"{saved.location}, not {storage.location}; resume with "
                              f"--set distributed.storage_path={saved.root}")
        if resume:
            return saved
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(json.dumps({"root": storage.root, "name": storage.name}, indent=2) + "\n")
    return storage


def check_fresh_storage(storage: RunStorage, what: str, *, resume: bool) -> None:
    """Refuse to start over an earlier run in the storage (``--resume`` continues it)."""
    if not resume and storage.exists():
        raise ConfigError(f"{storage.location} holds an earlier {what}: pass --resume to "
                          f"continue it, or choose another --output")


def prepare_storage(config: RunConfig, output: Path, name: str, what: str, *, resume: bool,
                    default_root: Path | None = None) -> RunStorage:
    """The run's storage, checked before Ray starts (:func:`run_storage`, reachable, not an
    earlier ``what`` unless ``resume``) and recorded in ``<output>/storage.json``."""
    storage = run_storage(config, output, name, default_root)
    check_storage(storage)  # a bad URI fails in seconds
    check_fresh_storage(storage, what, resume=resume)
    return record_storage(output, storage, resume=resume)
