"""Checkpoints of the trainable part only: the prompt model (any of
:data:`~pipeline.training.prompt_models.PROMPT_MODELS`, per ``train.method``), its optimizer, the
config and the step. Never the LM. Weights in safetensors.

Layout of a checkpoint folder::

    model.safetensors   the prompt model's state (DDPT: denoiser, up-projection, x0_bar;
                        prompt tuning: P and X_ctx)
    optimizer.pt        optimizer state (absent in an export)
    config.yaml         the RunConfig that made it
    state.json          {"step", "context_tokens", "hidden_size", "token_norm", ...}

Writes are atomic: the new folder is written beside the old one, the old one is renamed aside,
the new one into place, then the old one is deleted. A crash between the two renames leaves the
complete old folder under ``.<name>-previous``, which :func:`resolve` finds.

Reads are checked first (:func:`check_checkpoint`, a few milliseconds): a damaged or cut-short
file is a :class:`CheckpointError` naming it, before a model is built or an MLflow run opened.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import RunConfig
from pipeline.training.prompt_models import PROMPT_MODELS, LMFacts

STATE_FILE = "state.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
# state.json's fields that loading reads, and the least each may be
STATE_FIELDS = {"step": 0, "context_tokens": 1, "hidden_size": 1, "token_norm": 0}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as this format; the message names the file."""


def _previous(path: Path) -> Path:
    return path.parent / f".{path.name}-previous"


def replace_folder(tmp: Path, path: Path) -> None:
    """Move the finished folder ``tmp`` to ``path``, replacing what is there."""
    previous = _previous(path)
    if path.exists():
        if previous.exists():  # a stale copy from an earlier crash: `path` is complete
            shutil.rmtree(previous)
        path.rename(previous)
    # (when `path` is missing, `previous` is the only complete copy: it stays until now)
    tmp.rename(path)
    shutil.rmtree(previous, ignore_errors=True)


def resolve(path: str | Path) -> Path:
    """``path``, or its complete previous version when a crash left ``path`` missing."""
    path = Path(path)
    if not (path / STATE_FILE).is_file() and (_previous(path) / STATE_FILE).is_file():
        return _previous(path)
    return path


def save_checkpoint(path: str | Path, model: nn.Module, config: RunConfig, step: int,
                    optimizer: torch.optim.Optimizer | None = None, *,
                    files: dict[str, str] | None = None, **extra: Any) -> Path:
    """Write the checkpoint folder atomically; ``files``: more text files in it (name ->
    contents, e.g. RL's rollout log); ``extra``: more entries of state.json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-new-"))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        config.save(tmp / CONFIG_FILE)
        meta = {"step": step, "context_tokens": model.context_tokens,
                "hidden_size": model.hidden_size, "token_norm": model.token_norm, **extra}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_state(path: str | Path) -> dict[str, Any]:
    """The checkpoint's state.json, checked: a JSON object with :data:`STATE_FIELDS` (integers,
    ``token_norm`` a finite number), each at least its least value."""
    path = resolve(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no {STATE_FILE})")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{state_file}: not valid JSON ({err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file}: holds a JSON {type(state).__name__}, expected an "
                              "object")
    for name, least in STATE_FIELDS.items():
        value = state.get(name)
        number = (float, int) if name == "token_norm" else int
        if name not in state:
            raise CheckpointError(f"{state_file}: field {name!r} is missing")
        if isinstance(value, bool) or not isinstance(value, number) \
                or not math.isfinite(value) or value < least:
            kind = "a finite number" if name == "token_norm" else "an integer"
            raise CheckpointError(f"{state_file}: field {name!r}: got {value!r:.40}, expected "
                                  f"{kind} >= {least}")
    return state


def check_checkpoint(path: str | Path) -> dict[str, Any]:
    """A cheap check of a checkpoint folder (:func:`resolve`d) before it is used: state.json
    (:func:`read_state`), config.yaml a valid configuration, and model.safetensors' header
    parses with its tensors filling the file exactly (safetensors' own check; no weight is
    read). Returns the state; a CheckpointError (or ConfigError) names the damaged file."""
    path = resolve(path)
    state = read_state(path)
    RunConfig.load(path / CONFIG_FILE)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (a checkpoint holds its weights there)")
    try:
        with safe_open(str(weights), framework="pt") as opened:
            opened.keys()
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: not a complete safetensors file ({err}); it was cut "
                              "short or damaged") from None
    return state


def load_prompt_model(path: str | Path, map_location: str | torch.device = "cpu"
                      ) -> tuple[nn.Module, RunConfig, dict[str, Any]]:
    """Rebuild the prompt model saved at ``path``; returns (model, config, state)."""
    path = resolve(path)
    meta = check_checkpoint(path)
    config = RunConfig.load(path / CONFIG_FILE)
    weights = load_file(str(path / WEIGHTS_FILE), device=str(map_location))
    facts = LMFacts(meta["context_tokens"], meta["hidden_size"], meta["token_norm"])
    model = PROMPT_MODELS[config.train.method].build(config, facts)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # names and shapes that are not this model's
        raise CheckpointError(f"{path / WEIGHTS_FILE}: does not hold the {config.train.method} "
                              f"prompt model that {path / CONFIG_FILE} and {STATE_FILE} "
                              f"describe: {err}") from None
    return model.to(map_location), config, meta


def load_optimizer_state(path: str | Path) -> dict | None:
    file = resolve(path) / "optimizer.pt"
    return torch.load(file, map_location="cpu", weights_only=False) if file.is_file() else None
