"""Checkpoints of the trainable part only: the prompt model (DDPT's DiffusionPrompt or the
prompt-tuning SoftPrompt, per ``train.method``), its optimizer, the config and the step. Never the LM. Weights in safetensors; written atomically (temp folder + rename).

Layout of a checkpoint folder::

    model.safetensors   the prompt model's state (DDPT: denoiser, up-projection, x0_bar;
                        prompt tuning: P and X_ctx)
    optimizer.pt        optimizer state (absent in an export)
    config.yaml         the RunConfig that made it
    state.json          {"step", "context_tokens", "hidden_size", "token_norm", ...}
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import RunConfig
from torch import nn

from pipeline.method.prompt import DiffusionPrompt, SoftPrompt


def save_checkpoint(path: str | Path, model: nn.Module, config: RunConfig, step: int,
                    optimizer: torch.optim.Optimizer | None = None, **extra: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        config.save(tmp / "config.yaml")
        meta = {"step": step, "context_tokens": model.context_tokens,
                "hidden_size": model.hidden_size, "token_norm": model.token_norm, **extra}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no state.json)")
    return json.loads(state_file.read_text())


def load_prompt_model(path: str | Path, map_location: str | torch.device = "cpu"
                      ) -> tuple[DiffusionPrompt | SoftPrompt, RunConfig, dict[str, Any]]:
    """Rebuild the prompt model saved at ``path``; returns (model, config, state)."""
    path = Path(path)
    meta = read_state(path)
    config = RunConfig.load(path / "config.yaml")
    weights = load_file(str(path / "model.safetensors"), device=str(map_location))
    if config.train.method == "prompt_tuning":
        model = SoftPrompt(weights["context"], meta["token_norm"])
    else:
        model = DiffusionPrompt(meta["context_tokens"], meta["hidden_size"], meta["token_norm"],
                                config.denoiser, config.diffusion, seed=config.train.seed)
    model.load_state_dict(weights)
    return model.to(map_location), config, meta


def load_optimizer_state(path: str | Path) -> dict | None:
    file = Path(path) / "optimizer.pt"
    return torch.load(file, map_location="cpu", weights_only=False) if file.is_file() else None
