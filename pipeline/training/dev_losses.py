"""The per-task dev losses of a training run's last step: ``dev_losses.json``, kept so that two
runs (a sweep's trials) can be compared task by task with a paired interval, not only by their
means. Written in the final Ray Train checkpoint, copied to the run's output folder and logged to
its MLflow run (pipeline.distributed.train)::

    {"step": 40, "metric": "dev_loss", "dev_loss": 1.157,
     "ids": ["mbpp/602", ...], "losses": [1.21, ...]}

``dev_loss`` is the mean of ``losses``: the value the run reported at that step.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

DEV_LOSSES_FILE = "dev_losses.json"


def dev_losses_record(step: int, ids: list[str], losses: list[float]) -> dict:
    """The file's content: per-task losses in dev-split order, and their mean."""
    if len(ids) != len(losses) or not ids:
        raise ValueError(f"dev losses: {len(ids)} ids for {len(losses)} losses")
    return {"step": step, "metric": "dev_loss", "dev_loss": sum(losses) / len(losses),
            "ids": list(ids), "losses": [float(v) for v in losses]}


def write_dev_losses(folder: str | Path, record: dict) -> Path:
    path = Path(folder) / DEV_LOSSES_FILE
    path.write_text(json.dumps(record) + "\n")
    return path


def read_dev_losses(folder: str | Path) -> dict[str, float] | None:
    """``{task id: dev loss}`` from ``folder/dev_losses.json``; None when the folder has none
    (a run stopped before its last step, a failed run, an older run). A malformed file fails,
    naming it and what is wrong."""
    path = Path(folder) / DEV_LOSSES_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        ids, losses = record["ids"], record["losses"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a dev-losses record ({type(err).__name__}: {err})") from err
    if not isinstance(ids, list) or not isinstance(losses, list) or len(ids) != len(losses):
        raise ValueError(f"{path}: 'ids' and 'losses' must be lists of the same length")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: task ids repeat; each dev task is scored once")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses):
        raise ValueError(f"{path}: 'losses' must be finite numbers")
    return dict(zip(map(str, ids), map(float, losses)))
