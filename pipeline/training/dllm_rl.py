"""Coupled-GRPO as the RL loop's second policy (``train.method=coupled_grpo``; the loop:
:mod:`pipeline.training.rl_loop`; the math: :mod:`pipeline.lm.coupled_grpo`; docs/dllm.md).

Unlike DDPT the policy is the masked-diffusion LM itself. The rollout side
(:class:`DllmRolloutWorker`) holds the LM (a sampler actor's on Ray): it takes the learner's
weights into it, builds the reference's prompts, decodes G completions per task with the project's
masked-diffusion decoder, and scores them with the reference's reward through the sandbox, adding
the AR-ness of each decode batch. The learner here, :class:`LocalDllmLearner`, is the one-process
one (``distributed.backend: local``); on Ray the ZeRO-3 learner of
:mod:`pipeline.distributed.dllm_policy` takes its place. Both turn a round into a
:class:`~pipeline.lm.coupled_grpo.CoupledRollout` with :func:`coupled_rollout`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import ConfigError, RunConfig
from pipeline.data.example import Example
from pipeline.decoding.masked_diffusion import DiffusionSettings, diffusion_generate
from pipeline.lm.coupled_grpo import (
    CoupledGRPOSettings,
    CoupledRollout,
    completion_mask,
    reference_optimizer,
    round_mask_seeds,
    settings_from_config,
    summarise,
    update,
)
from pipeline.lm.frozen import FrozenCodeLM
from pipeline.lm.rl_prompts import left_pad, reference_prompt_ids
from pipeline.method.policy_gradient import GroupAdvantages
from pipeline.scoring.arness import rollout_arness
from pipeline.scoring.code_reward import completion_texts, execution_rewards
from pipeline.scoring.rewards import Reward, Scored
from pipeline.training.rl_loop import Rollouts, Weights, tensor_digest

LEARNER_FILE = "learner.pt"  # beside a local checkpoint's Dream folder: optimizer, reference


def resolve_rounds(config: RunConfig, task_count: int) -> RunConfig:
    """``config`` with ``dllm_rl.rounds`` = 0 (one pass over the training tasks, the
    reference's epoch) made explicit: ceil(tasks / prompts_per_round)."""
    rl = config.dllm_rl
    if rl.rounds:
        return config
    rounds = max(1, math.ceil(task_count / rl.prompts_per_round))
    return dataclasses.replace(config, dllm_rl=dataclasses.replace(rl, rounds=rounds))


def decode_settings(config: RunConfig) -> DiffusionSettings:
    """The rollouts' decoding: ``dllm_rl``'s canvas, steps, algorithm and sampling."""
    rl = config.dllm_rl
    return DiffusionSettings(max_new_tokens=rl.max_completion_length, steps=rl.diffusion_steps,
                             alg=rl.alg, alg_temp=rl.alg_temp, temperature=rl.temperature,
                             top_p=rl.top_p)


def end_of_turn_id(tokenizer, token: str) -> int:
    """The id of ``dllm_rl.end_of_turn``; ConfigError when the tokenizer lacks it."""
    end_id = tokenizer.convert_tokens_to_ids(token)
    if end_id is None or end_id == tokenizer.unk_token_id:
        raise ConfigError(f"dllm_rl.end_of_turn: {token!r} is not a token of the tokenizer")
    return end_id


@dataclass
class DllmSamples:
    """How the dLLM sampled a batch: the prompts (B, n), left-padded with ``pad_id``, and the
    completions (B, K): all the learner needs to score them."""

    prompt_ids: torch.Tensor
    completion_ids: torch.Tensor
    pad_id: int

    @classmethod
    def cat(cls, parts: list[DllmSamples]) -> DllmSamples:
        """The batches in order, their prompts left-padded to the longest."""
        width = max(p.prompt_ids.shape[1] for p in parts)
        prompts = [torch.nn.functional.pad(p.prompt_ids, (width - p.prompt_ids.shape[1], 0),
                                           value=p.pad_id) for p in parts]
        return cls(torch.cat(prompts), torch.cat([p.completion_ids for p in parts]),
                   parts[0].pad_id)

    def digest(self) -> str:
        return tensor_digest(self.prompt_ids, self.completion_ids)


def reference_scored(texts: list[str], rows: list[Example], config: RunConfig) -> Scored:
    """The reference's reward through the sandbox, with its parts as per-program details."""
    rl = config.dllm_rl
    out = execution_rewards(texts, rows, config.execution, pass_weight=rl.pass_weight,
                            format_weight=rl.format_weight)
    return Scored(out.rewards.tolist(),
                  {"format_rate": (out.format == 1).float().tolist(),
                   "format_mean": out.format.tolist(),
                   "pass_fraction_mean": out.pass_fraction.tolist(),
                   "all_cases_passed": (out.pass_fraction == 1).float().tolist()})


class DllmRolloutWorker:
    """Coupled-GRPO's rollout side on ``lm`` (its model is the policy's copy: the learner's
    weights are loaded into it). ``reward``: another reward than the reference's through the
    sandbox (a test's toy), called with the rows' examples and the completions' texts."""

    def __init__(self, config: RunConfig, lm: FrozenCodeLM, reward: Reward | None = None):
        if not lm.is_diffusion:
            raise ConfigError(f"train.method: 'coupled_grpo' rolls out a masked-diffusion LM; "
                              f"model.name={config.model.name!r} is not one")
        self.config, self.lm, self.reward = config, lm, reward
        self.settings = settings_from_config(config.dllm_rl)
        self.end_id = end_of_turn_id(lm.tokenizer, config.dllm_rl.end_of_turn)

    def set_weights(self, weights: Weights) -> None:
        self.lm.model.load_state_dict(weights)

    def rollout(self, chunks: list[list[Example]], round_index: int) -> Rollouts:
        return Rollouts.cat([self._rollout(chunk, round_index) for chunk in chunks],
                            parallel=False)

    @torch.no_grad()
    def _rollout(self, tasks: list[Example], round_index: int) -> Rollouts:
        """One decode batch: G rows per task, seeded by (train.seed, round, its tasks' ids)
        only, so any backend that cuts the same chunks draws the same completions."""
        config, lm, group = self.config, self.lm, self.settings.group_size
        tokenizer, rl, device = lm.tokenizer, config.dllm_rl, lm.device
        rows = [task for task in tasks for _ in range(group)]
        began = time.perf_counter()
        ids = [reference_prompt_ids(tokenizer, task, rl.system_prompt, rl.max_prompt_length)
               for task in tasks]
        prompts, attention = (t.repeat_interleave(group, 0)
                              for t in left_pad(ids, tokenizer.pad_token_id))
        key = f"{config.train.seed}:{round_index}:{','.join(t.id for t in tasks)}"
        generator = torch.Generator(device).manual_seed(zlib.crc32(key.encode()))
        out = diffusion_generate(lm.model, prompts.to(device), attention.to(device),
                                 decode_settings(config), tokenizer.mask_token_id,
                                 generator=generator)
        completions = out.sequences[:, prompts.shape[1]:].cpu()
        texts = completion_texts(tokenizer, completions, self.end_id,
                                 whole_canvas=rl.reward_whole_canvas)
        generated = time.perf_counter()
        scored = (self.reward(rows, texts) if self.reward is not None
                  else reference_scored(texts, rows, config))
        L = rl.max_completion_length
        for name, value in rollout_arness(out.record, min(9, L), min(4, L)).items():
            scored.details[name] = [value] * len(rows)  # a batch's mean, weighted by its rows
        return Rollouts([t.id for t in tasks], group, scored, texts,
                        DllmSamples(prompts, completions, tokenizer.pad_token_id),
                        {"generate_seconds": generated - began,
                         "score_seconds": time.perf_counter() - generated})


def coupled_rollout(rollouts: Rollouts, advantages: GroupAdvantages, end_id: int,
                    settings: CoupledGRPOSettings, *, seed: int, round_index: int
                    ) -> CoupledRollout:
    """A round's rollouts as the coupled-GRPO update takes them: the loss mask up to the first
    end-of-turn token, the loop's advantages, the round's mask seeds."""
    samples: DllmSamples = rollouts.samples
    completions = samples.completion_ids
    return CoupledRollout(samples.prompt_ids, completions, completion_mask(completions, end_id),
                          rollouts.rewards, advantages,
                          round_mask_seeds(seed, round_index, settings))


def update_stats(data: CoupledRollout, records: list[dict]) -> dict[str, float]:
    """A round's update figures: the micro-steps' mean loss, KL, clip fraction and ratio, the
    counted completion tokens, and the mean gradient norm before clipping."""
    out = {k: v for k, v in summarise(data, records).items()
           if k not in ("reward_mean", "informative_share")}  # the loop logs those
    norms = [float(r["grad_norm"]) for r in records if "grad_norm" in r]
    if norms:
        out["grad_norm"] = sum(norms) / len(norms)
    return out


class LocalDllmLearner:
    """Coupled-GRPO's learner in this process: the run's Dream as the policy, a frozen copy as
    the reference, the reference's AdamW and warm-up + cosine schedule over ``dllm_rl.rounds x
    iterations`` optimizer steps; :func:`~pipeline.lm.coupled_grpo.update` on each round."""

    def __init__(self, config: RunConfig, lm: FrozenCodeLM | None = None,
                 start: Path | None = None):
        from pipeline.lm.loader import load_model, resolve_device

        if not config.dllm_rl.rounds:
            raise ValueError("dllm_rl.rounds must be resolved first (resolve_rounds)")
        self.config, self.settings = config, settings_from_config(config.dllm_rl)
        model, self.tokenizer = load_model(config.model, seed=config.train.seed)
        self.policy = model.to(resolve_device(config.model.device)).requires_grad_(True)
        self.policy.gradient_checkpointing = config.dllm_rl.gradient_checkpointing
        self.reference = copy.deepcopy(self.policy).requires_grad_(False)
        self.mask_id = self.tokenizer.mask_token_id
        self.end_id = end_of_turn_id(self.tokenizer, config.dllm_rl.end_of_turn)
        total = config.dllm_rl.rounds * self.settings.iterations
        self.optimizer, self.scheduler = reference_optimizer(self.policy, self.settings, total)
        self.step = 0

    def weights(self) -> Weights:
        return {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()}

    def update(self, rollouts: Rollouts, advantages: GroupAdvantages, tasks: list[Example],
               round_index: int) -> dict[str, float]:
        device = next(self.policy.parameters()).device
        data = coupled_rollout(rollouts, advantages, self.end_id, self.settings,
                               seed=self.config.train.seed, round_index=round_index).to(device)
        records, self.step = update(self.policy, self.reference, self.optimizer, data,
                                    self.mask_id, self.settings, scheduler=self.scheduler,
                                    step=self.step)
        return {**update_stats(data, records), "lr": self.scheduler.get_last_lr()[0]}

    def save(self, folder: Path, round_index: int, files: dict[str, str]) -> None:
        """A Dream folder (``load_dream`` and ``ddpt evaluate`` read it) with the tokenizer,
        ``files`` and :data:`LEARNER_FILE` (optimizer, schedule, reference, counters); written
        beside ``folder`` and moved in place."""
        from pipeline.lm.dream import save_dream
        from pipeline.training.checkpoint import replace_folder

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-new-"))
        try:
            save_dream(tmp, self.policy.config, self.policy.state_dict().items())
            self.tokenizer.save_pretrained(tmp)
            for name, text in files.items():
                (tmp / name).write_text(text)
            torch.save({"optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "reference": self.reference.state_dict(), "step": self.step,
                        "round": round_index}, tmp / LEARNER_FILE)
            (tmp / "learner_state.json").write_text(json.dumps(
                {"step": self.step, "rounds": round_index, "world": 1}))
            replace_folder(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load(self, folder: Path) -> int:
        from pipeline.lm.dream import load_dream

        state = torch.load(Path(folder) / LEARNER_FILE, weights_only=True)
        saved = load_dream(folder, next(self.policy.parameters()).dtype)
        self.policy.load_state_dict(saved.state_dict())
        self.reference.load_state_dict(state["reference"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        return int(state["round"])

