"""A toy verifiable task for the RL loop (tests/test_rl.py, tests/test_ray_rl.py): the tiny random
Llama, a 4-token context, and a reward a few lines compute from the generated text (no sandbox).
The start model is a tiny DDPT denoiser trained to sample N(0, I) latents (the x0-prediction
loss), saved as a DDPT checkpoint: RL starts from a trained chain, as it must."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import RunConfig, build_config
from pipeline.scoring.rewards import Scored

TOY = ["model.name=tiny-llama", "prompt.context_tokens=4", "denoiser.bottleneck=2",
       "denoiser.condition=none", "eval.max_new_tokens=8", "distributed.backend=local"]
# What made the toy learn on every seed tried (6 of 6, both policies): 2 tasks, G = 16, four
# updates a round with a wide clip.
TOY_RL = ["rl.tasks_per_round=2", "rl.group_size=16", "rl.updates_per_round=4",
          "rl.eps_low=0.5", "rl.eps_high=0.5", "rl.screen=false", "rl.lr=3e-3"]


def even_characters(tasks, codes) -> Scored:
    """The toy's verdict: the share of the first 8 generated characters with an even code point
    (the "asserts" that pass)."""
    return Scored([sum(ord(c) % 2 == 0 for c in code[:8]) / 8 for code in codes], {})


def start_checkpoint(folder: Path, seed: int = 0, *, steps: int = 150) -> Path:
    """A trained DDPT checkpoint for the toy: the denoiser fit to N(0, I) latents."""
    from pipeline.lm.loader import build_lm
    from pipeline.training.checkpoint import save_checkpoint
    from pipeline.training.prompt_models import build_trainable

    config = build_config("smoke", overrides=[*TOY, "train.objective=unrolled",
                                              f"train.seed={seed}"])
    model, _ = build_trainable(build_lm(config), config)
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.denoiser.parameters(), lr=3e-3)
    shape = (64, *model.latent_shape)
    for _ in range(steps):
        x0 = torch.randn(shape, generator=g)
        t = torch.randint(0, model.schedule.timesteps, (64,), generator=g)
        x_t = model.schedule.add_noise(x0, torch.randn(shape, generator=g), t)
        loss = (model.predict(x_t, t) - x0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_checkpoint(folder, model, config, steps)


def toy_config(objective: str, start: Path, seed: int = 0, *extra: str) -> RunConfig:
    return build_config("smoke", overrides=[*TOY, *TOY_RL, f"train.objective={objective}",
                                            f"train.init_checkpoint={start}",
                                            f"train.seed={seed}", *extra])


def mean_reward(config: RunConfig, lm, weights: dict, tasks, rounds: int = 6) -> float:
    """The policy's mean toy reward on fresh noise (rounds the training never drew: 10000+),
    the same noise for every policy evaluated (a paired comparison)."""
    from pipeline.training.prompt_rl import PromptRolloutWorker
    from pipeline.training.rl_loop import rollout_chunks

    worker = PromptRolloutWorker(config, lm, even_characters)
    worker.set_weights(weights)
    return sum(float(worker.rollout(rollout_chunks(config, tasks), 10_000 + k).rewards.mean())
               for k in range(rounds)) / rounds


def policy_weights(config: RunConfig, checkpoint: Path | None = None) -> dict:
    """The policy's weights at the start (``checkpoint`` None: the frozen control) or as a
    finished run exported them."""
    from pipeline.training.prompt_rl import PromptLearner, load_start_model

    learner = PromptLearner(config, load_start_model(config))
    if checkpoint is not None:
        learner.load(checkpoint)
    return learner.weights()
