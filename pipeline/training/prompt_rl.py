"""DDPT's prompt model as the RL loop's policy (``train.objective`` grpo / grpo_gaussian; the
loop: :mod:`pipeline.training.rl_loop`; the math: :mod:`pipeline.method.chain_grpo`).

The rollout side (:class:`PromptRolloutWorker`) holds the frozen LM and a copy of the policy: it
samples G prompts per task (the reverse chain with eta > 0, or the one-step Gaussian), decodes
each greedily, and scores the programs. The learner (:class:`PromptLearner`) holds the policy, a
frozen reference (the start checkpoint) and the optimizer, and no LM unless ``rl.ce_weight`` asks
for the auxiliary cross-entropy: the update never back-propagates through the LM.
"""
from __future__ import annotations

import dataclasses
import math
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.config import ConfigError, RunConfig
from pipeline.data.example import Example
from pipeline.decoding.autoregressive import generate, generate_samples
from pipeline.lm.frozen import FrozenCodeLM
from pipeline.method.chain_grpo import Rollout, update
from pipeline.method.chain_policy import ChainPolicy, GaussianPromptPolicy, Trajectory, frozen_copy
from pipeline.method.policy_gradient import GroupAdvantages
from pipeline.method.prompt import DiffusionPrompt
from pipeline.scoring.rewards import ExecutionReward, Reward, Scored
from pipeline.training.checkpoint import load_optimizer_state, read_state, resolve, save_checkpoint
from pipeline.training.loop import step_generator
from pipeline.training.prompt_models import (
    GENERATOR_OBJECTIVES,
    PROMPT_MODELS,
    LMFacts,
    PromptLoss,
    lm_facts,
)
from pipeline.training.rl_loop import Rollouts, Weights, tensor_digest

# What fixes a prompt model's shape and meaning: a start checkpoint must agree on every one.
SHAPING_FIELDS = ("model.name", "prompt.context", "prompt.template", "prompt.context_tokens",
                  "diffusion.schedule", "diffusion.timesteps", "denoiser.bottleneck",
                  "denoiser.hidden_dim", "denoiser.num_blocks", "denoiser.time_embed_dim",
                  "denoiser.up_projection", "denoiser.up_scale", "denoiser.condition")


def check_start_checkpoint(config: RunConfig) -> dict:
    """Fail now, naming ``train.init_checkpoint``, unless it is a trained DDPT checkpoint that
    fits this run (the same LM, prompt and denoiser); returns its state.json."""
    where = f"train.init_checkpoint: {config.train.init_checkpoint}"
    folder = resolve(Path(str(config.train.init_checkpoint)).expanduser())
    if (folder / "checkpoint" / "state.json").is_file():  # a training output folder
        folder = folder / "checkpoint"
    try:
        state = read_state(folder)
        saved = RunConfig.load(folder / "config.yaml")
    except (FileNotFoundError, ConfigError) as err:
        raise ConfigError(f"{where}: not a trained checkpoint folder ({err})") from err
    if saved.train.method != "ddpt":
        raise ConfigError(f"{where}: holds a {saved.train.method!r} model; RL needs a DDPT "
                          "checkpoint (train.method=ddpt)")
    ours, theirs = config.to_flat(), saved.to_flat()
    for name in SHAPING_FIELDS:
        if ours[name] != theirs[name]:
            raise ConfigError(f"{where}: was trained with {name}={theirs[name]!r}, this run "
                              f"says {ours[name]!r}; set {name} to match")
    if config.train.objective == "grpo" and saved.train.objective in GENERATOR_OBJECTIVES:
        raise ConfigError(f"{where}: was trained as the deterministic generator "
                          f"(train.objective={saved.train.objective}), which has no reverse "
                          "chain; 'grpo' needs a chain-trained DDPT (grpo_gaussian takes it)")
    return {**state, "folder": str(folder)}


def load_start_model(config: RunConfig, folder: str | Path | None = None) -> DiffusionPrompt:
    """The start checkpoint's weights in the prompt model this run's objective builds (its
    chain steps, or the generator; an EMA teacher's buffers are left behind). ``folder``: a
    copy of ``train.init_checkpoint`` to read instead (on a node that cannot see it)."""
    from safetensors.torch import load_file

    if folder is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(
            config.train, init_checkpoint=str(folder)))
    state = check_start_checkpoint(config)
    facts = LMFacts(state["context_tokens"], state["hidden_size"], state["token_norm"])
    model = PROMPT_MODELS["ddpt"].build(config, facts)
    weights = load_file(str(Path(state["folder"]) / "model.safetensors"))
    model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("teacher.")})
    return model


def policy_for(config: RunConfig, model: DiffusionPrompt) -> nn.Module:
    """The reverse chain (``grpo``) or the one-step Gaussian (``grpo_gaussian``) around
    ``model``."""
    rl, guidance = config.rl, config.sample.guidance
    if config.train.objective == "grpo":
        return ChainPolicy(model, rl.chain_steps, rl.eta, guidance)
    return GaussianPromptPolicy(model, rl.gaussian_std, learn_std=rl.learn_std,
                                guidance=guidance)


def row_seed(seed: int, round_index: int, task_id: str, draw: int) -> int:
    """The noise of sample ``draw`` of a task in a round: not of the batch it lands in."""
    return zlib.crc32(f"{seed}:{round_index}:{task_id}#{draw}".encode())


@contextmanager
def one_thread(device: torch.device):
    """The denoiser's matrices are tiny: on a CPU one thread skips the per-op fork/join."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class ChainSamples:
    """How DDPT's policy sampled a batch: the trajectories (B rows) and the per-row conditions
    (B, d) or None. Both travel to the learner, which holds no LM to recompute conditions."""

    trajectory: Trajectory
    condition: torch.Tensor | None

    @classmethod
    def cat(cls, parts: list[ChainSamples]) -> ChainSamples:
        conditions = [p.condition for p in parts]
        return cls(Trajectory.cat([p.trajectory for p in parts]),
                   None if conditions[0] is None else torch.cat(conditions))

    def digest(self) -> str:
        return tensor_digest(self.trajectory.latents, self.condition)


class PromptRolloutWorker:
    """DDPT's rollout side: the frozen LM, the policy's copy and the reward (default: the
    sandbox's, :class:`ExecutionReward`)."""

    def __init__(self, config: RunConfig, lm: FrozenCodeLM, reward: Reward | None = None):
        self.config, self.lm = config, lm
        model = PROMPT_MODELS["ddpt"].build(config, lm_facts(lm)).to(lm.device)
        self.policy = policy_for(config, model).eval()
        self.reward = reward or ExecutionReward(config.execution, config.rl)

    def set_weights(self, weights: Weights) -> None:
        self.policy.load_state_dict(weights)

    def rollout(self, chunks: list[list[Example]], round_index: int) -> Rollouts:
        return Rollouts.cat([self._rollout(chunk, round_index) for chunk in chunks],
                            parallel=False)

    @torch.no_grad()
    def _rollout(self, tasks: list[Example], round_index: int) -> Rollouts:
        lm, group, seed = self.lm, self.config.rl.group_size, self.config.train.seed
        rows = [task for task in tasks for _ in range(group)]
        began = time.perf_counter()
        condition = None
        if self.policy.model.conditional:
            batch = lm.collate(lm.encode(tasks), with_targets=False).to(lm.device)
            condition = lm.condition(batch).repeat_interleave(group, 0)
        generators = [torch.Generator().manual_seed(row_seed(seed, round_index, task.id, j))
                      for task in tasks for j in range(group)]
        with one_thread(lm.device):
            trajectory = self.policy.sample(len(rows), generators, condition)
            directions = self.policy.direction(trajectory.final)
        sampled = time.perf_counter()
        codes = generate(lm, rows, directions, self.config.eval.max_new_tokens)
        generated = time.perf_counter()
        scored = self.reward(rows, codes)
        done = time.perf_counter()
        return Rollouts([t.id for t in tasks], group, scored, codes,
                        ChainSamples(trajectory.to("cpu"), condition if condition is None
                                     else condition.cpu()),
                        {"sample_seconds": sampled - began, "generate_seconds": generated - sampled,
                         "score_seconds": done - generated})

    @torch.no_grad()
    def screen(self, chunks: list[list[Example]]) -> Scored:
        """``rl.screen_samples`` temperature samples of the manual prompt per task, scored; a
        chunk's draws are seeded by its tasks' ids."""
        rl, lm = self.config.rl, self.lm
        decoding = dataclasses.replace(self.config.decoding, strategy="sample",
                                       temperature=rl.screen_temperature)
        parts = []
        for tasks in chunks:
            seed = zlib.crc32(f"{self.config.train.seed}:screen:{','.join(t.id for t in tasks)}"
                              .encode())
            drawn = generate_samples(lm, tasks, rl.screen_samples, None,
                                     self.config.eval.max_new_tokens, decoding=decoding,
                                     generator=torch.Generator(lm.device).manual_seed(seed))
            rows = [task for task in tasks for _ in range(rl.screen_samples)]
            parts.append(self.reward(rows, [code for codes in drawn for code in codes]))
        return Scored.cat(parts)


class PromptLearner:
    """DDPT's learner: the policy, a frozen reference (the start model), AdamW
    (``rl.lr``, ``train.weight_decay``), and the LM only for the auxiliary cross-entropy
    (``rl.ce_weight`` > 0)."""

    def __init__(self, config: RunConfig, start: DiffusionPrompt, lm: FrozenCodeLM | None = None):
        self.config = config
        device = lm.device if lm is not None else torch.device("cpu")
        self.policy = policy_for(config, start.to(device))
        self.reference = frozen_copy(self.policy)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.rl.lr,
                                           weight_decay=config.train.weight_decay)
        self.aux = None
        if config.rl.ce_weight:
            if lm is None:
                raise ValueError("rl.ce_weight > 0: the learner needs the LM")
            self.aux = PromptLoss(self.policy.model, lm,
                                  PROMPT_MODELS["ddpt"].objective(config), config.train.lm_autocast)

    def weights(self) -> Weights:
        return {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()}

    def update(self, rollouts: Rollouts, advantages: GroupAdvantages, tasks: list[Example],
               round_index: int) -> dict[str, float]:
        samples: ChainSamples = rollouts.samples
        device = next(self.policy.parameters()).device
        condition = None if samples.condition is None else samples.condition.to(device)
        batch = Rollout(samples.trajectory.to(device), rollouts.rewards.to(device),
                        advantages, condition)
        self.policy.train()
        stats = update(self.policy, self.reference, self.optimizer, batch, self.config.rl,
                       self._aux_loss(tasks, round_index), grad_clip=self.config.train.grad_clip)
        self.policy.eval()
        out = {name: float(value) for name, value in stats.items()}
        if isinstance(self.policy, GaussianPromptPolicy):
            out["policy_std"] = float(self.policy.std.detach())
        return out

    def _aux_loss(self, tasks: list[Example], round_index: int):
        """The auxiliary loss: the code cross-entropy of the round's tasks' reference code
        under the policy's deterministic path (the step objective of the RL objective)."""
        if self.aux is None:
            return None
        lm = self.aux._lm
        batch = lm.collate(lm.encode(tasks)).to(lm.device)
        generator = step_generator(self.config.train.seed, round_index)
        return lambda: self.aux(batch, generator)[0]

    def save(self, folder: Path, round_index: int, files: dict[str, str]) -> None:
        extra = {}
        if isinstance(self.policy, GaussianPromptPolicy):  # exact: a float32 in a JSON double
            log_std = float(self.policy.log_std.detach())
            extra = {"log_std": log_std, "policy_std": math.exp(log_std)}
        save_checkpoint(folder, self.policy.model, self.config, round_index, self.optimizer,
                        files=files, **extra)

    def load(self, folder: Path) -> int:
        from safetensors.torch import load_file

        folder = resolve(folder)
        state = read_state(folder)
        self.policy.model.load_state_dict(load_file(str(folder / "model.safetensors")))
        if isinstance(self.policy, GaussianPromptPolicy):
            with torch.no_grad():
                self.policy.log_std.fill_(state["log_std"])
        self.optimizer.load_state_dict(load_optimizer_state(folder))
        return int(state["step"])

