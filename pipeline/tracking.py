"""MLflow tracking for the training job, the sampler and the sweeps, on ``MlflowClient`` only:
no global MLflow state, so trackers for several URIs coexist and pickle to Ray workers."""
from __future__ import annotations

import json
import logging
import numbers
import os
import re
import time
import urllib.error
import urllib.request
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000     # MLflow's limit on a param value
MAX_ERROR_CHARS = 5000     # what the `error` tag keeps of an exception message
PARAMS_PER_BATCH = 100     # MLflow's limit on params in one log_batch
METRICS_PER_BATCH = 1000   # MLflow's limit on metrics in one log_batch
HTTP_TIMEOUT_S = 3.0
# Tags every run of the project carries: its role (train, comparison, method, sweep, trial,
# evaluate), so that an MLflow filter such as `tags.ddpt.role = 'method'` selects one kind.
ROLE_TAG, OUTPUT_TAG = "ddpt.role", "ddpt.output"


class TrackingError(ValueError):
    """A tracking URI that is malformed or cannot be used."""


def resolve_tracking_uri(output_dir: str | Path | None, uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<output_dir or cwd>/mlflow.db``."""
    if uri := uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    folder = Path(output_dir if output_dir is not None else Path.cwd()).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI (absolute), None for in-memory."""
    path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    return None if path in ("", ":memory:") else Path(path).expanduser().resolve()


def check_tracking_uri(uri: str) -> None:
    """Fail fast (a few seconds at most) with a TrackingError if ``uri`` cannot be used."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+", 1)[0].lower()
    if uri.startswith("databricks") or scheme in ("postgresql", "mysql", "mssql"):
        return  # credentials and drivers are MLflow's business; don't connect here
    if scheme == "sqlite":
        if not (uri.startswith("sqlite:///") or uri == "sqlite://"):
            raise TrackingError(f"tracking URI {uri!r}: a sqlite URI is 'sqlite:///PATH'")
        if (path := _sqlite_path(uri)) is None:
            return
        if path.is_dir():
            raise TrackingError(f"tracking URI {uri!r}: {path} is a folder, not a database file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"tracking URI {uri!r}: cannot create {path.parent}: {e}") from e
        if not os.access(path.parent, os.W_OK):
            raise TrackingError(f"tracking URI {uri!r}: folder {path.parent} is not writable")
    elif scheme in ("http", "https"):
        if not parsed.hostname:
            raise TrackingError(f"tracking URI {uri!r}: no host name")
        _check_server(uri)
    elif scheme == "file" or (scheme == "" and ":" not in uri and uri.strip()):
        if not MLFLOW_ALLOW_FILE_STORE.get():
            raise TrackingError(
                f"tracking URI {uri!r}: MLflow 3 refuses the file store (./mlruns) unless "
                "MLFLOW_ALLOW_FILE_STORE=true; set it or use 'sqlite:///PATH/mlflow.db'")
    else:
        raise TrackingError(
            f"tracking URI {uri!r}: unknown or missing scheme {parsed.scheme!r}; expected "
            "sqlite:///PATH, http(s)://HOST:PORT, file:PATH, databricks, postgresql or mysql")


def _check_server(uri: str) -> None:
    """GET ``/health`` (then the experiments API) with a short timeout; raise if no answer."""
    base, status = uri.rstrip("/"), ""
    for route in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        try:
            with urllib.request.urlopen(base + route, timeout=HTTP_TIMEOUT_S):
                return
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                return  # it answers; MLflow's client sends the credentials
            status = f"answered HTTP {e.code} at {route}"
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(
                f"tracking URI {uri!r}: no MLflow server answers ({getattr(e, 'reason', e)}); "
                "start one with `mlflow server` or fix the URI") from e
    raise TrackingError(f"tracking URI {uri!r}: the server {status}; is it an MLflow server?")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; ``prefix`` is prepended as ``prefix.``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def _param_value(value: Any) -> str:
    """MLflow's param value: a string of at most 6000 characters (lists etc. as JSON)."""
    text = json.dumps(value, default=str) if isinstance(value, (list, tuple, set)) else str(value)
    return text[:MAX_PARAM_CHARS]


def _metric_value(key: str, value: Any) -> float | None:
    """A float for MLflow (NaN kept), None (with a warning unless None) when not numeric."""
    if callable(getattr(value, "item", None)):  # numpy / torch scalars
        with suppress(TypeError, ValueError):
            value = value.item()
    if isinstance(value, numbers.Real):
        return float(value)
    if value is not None:
        log.warning("metric %r skipped: %r is not a number", key, value)
    return None


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    """The id of experiment ``name``, creating it (artifacts beside a sqlite db) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        db = _sqlite_path(uri) if uri.startswith("sqlite:") else None
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"
        location = (db.parent / "mlartifacts" / safe).as_uri() if db else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another process created it in between
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


class RunTracker:
    """One MLflow run; as a context manager it ends FINISHED, or FAILED on an exception."""

    def __init__(self, uri: str, run_id: str, experiment_id: str,
                 client: MlflowClient | None = None) -> None:
        """Wrap an existing run; use ``start`` or ``resume`` rather than this."""
        self.uri, self.client = uri, client or MlflowClient(tracking_uri=uri)
        self.run_id, self.experiment_id, self._ended = run_id, experiment_id, False

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str | None = None,
              params: dict | None = None, tags: dict | None = None,
              parent_run_id: str | None = None) -> RunTracker:
        """Check ``uri``, get or create ``experiment`` and start a (child) run in it."""
        check_tracking_uri(uri)
        client = MlflowClient(tracking_uri=uri)
        run_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = client.create_run(_experiment_id(client, uri, experiment),
                                tags=run_tags, run_name=run_name)
        tracker = cls(uri, run.info.run_id, run.info.experiment_id, client)
        tracker.log_params(params or {})
        return tracker

    @classmethod
    def resume(cls, uri: str, run_id: str) -> RunTracker:
        """Re-attach to an existing run (a resumed job) and mark it RUNNING again."""
        check_tracking_uri(uri)
        client = MlflowClient(tracking_uri=uri)
        try:
            run = client.get_run(run_id)
        except MlflowException as e:
            raise TrackingError(f"tracking URI {uri!r}: cannot resume run {run_id}: {e}") from e
        client.update_run(run_id, status="RUNNING")
        return cls(uri, run_id, run.info.experiment_id, client)

    def __reduce__(self) -> tuple:
        """Pickle as ``(uri, run_id, experiment_id)``: a Ray worker builds its own client."""
        return (RunTracker, (self.uri, self.run_id, self.experiment_id))

    def log_params(self, flat: dict) -> None:
        """Log params (nested dicts flattened, values stringified and cut to 6000 chars)."""
        params = [Param(k, _param_value(v)) for k, v in flatten(flat).items()]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None, *,
                    timestamp_ms: int | None = None) -> None:
        """Log numeric metrics (nested dicts flattened); None and non-numbers are skipped.
        ``timestamp_ms``: when they were measured (now by default); MLflow's SQL stores keep a
        metric logged again with the same key, value, step and timestamp once."""
        now = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        rows = [Metric(k, v, now, step or 0) for k, raw in flatten(metrics).items()
                if (v := _metric_value(k, raw)) is not None]
        for i in range(0, len(rows), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=rows[i:i + METRICS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        """Store ``obj`` as artifact ``name`` (JSON, or YAML for .yaml/.yml)."""
        self.client.log_dict(self.run_id, obj, name)

    def set_tag(self, key: str, value: Any) -> None:
        self.client.set_tag(self.run_id, key, str(value))

    def end(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED (once; later calls do nothing)."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"run status must be FINISHED, FAILED or KILLED, not {status!r}")
        if not self._ended:
            self.client.set_terminated(self.run_id, status)
            self._ended = True

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            return self.end("FINISHED")
        try:  # never hide the original exception behind a tracking error
            self.set_tag("error", f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])
            self.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        except Exception:
            log.exception("could not mark MLflow run %s as failed", self.run_id)


def read_run_file(run_file: str | Path) -> dict[str, Any]:
    """A run pointer file: ``{"uri", "run_id", ...}`` of the MLflow run a job logs into."""
    saved = json.loads(Path(run_file).read_text())
    if not {"uri", "run_id"} <= set(saved):
        raise TrackingError(f"{run_file}: not a run pointer file (needs 'uri' and 'run_id')")
    return saved


def open_run(run_file: str | Path, uri: str, experiment: str, run_name: str, *, resume: bool,
             role: str, output: str | Path, params: dict | None = None,
             tags: dict | None = None, parent_run_id: str | None = None,
             note: dict | None = None) -> RunTracker:
    """A job's MLflow run: with ``resume`` and an existing ``run_file``, the run it names
    (re-attached); else a new (child) run in ``experiment``, tagged with its ``role`` and
    ``output`` folder, noted in ``run_file`` as ``{"uri", "run_id", **note}``."""
    run_file = Path(run_file)
    if resume and run_file.is_file():
        saved = read_run_file(run_file)
        return RunTracker.resume(saved["uri"], saved["run_id"])
    tracker = RunTracker.start(uri, experiment, run_name, params=params,
                               tags={ROLE_TAG: role, OUTPUT_TAG: str(output), **(tags or {})},
                               parent_run_id=parent_run_id)
    run_file.parent.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"uri": uri, "run_id": tracker.run_id, **(note or {})}) + "\n")
    return tracker


def child_runs(uri: str, parent_run_id: str) -> list[Run]:
    """All runs (in any active experiment) whose ``mlflow.parentRunId`` is ``parent_run_id``."""
    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs(ids, f"tags.{MLFLOW_PARENT_RUN_ID} = '{parent_run_id}'",
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs += page
        if not (token := page.token):
            return runs


def metric_history(uri: str, run_id: str, name: str) -> list[tuple[int, float]]:
    """Every ``(step, value)`` logged for metric ``name`` in a run, by step (a step logged twice,
    e.g. around a resume, keeps its latest value); empty if never logged."""
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, name)
    latest = {m.step: m for m in sorted(history, key=lambda m: m.timestamp)}
    return [(step, latest[step].value) for step in sorted(latest)]
