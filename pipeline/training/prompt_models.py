"""The prompt models by name (``train.method``): how each is built from a run's configuration,
what objective trains it, and which ``ddpt sample`` option names a trained one.

Adding a prompt model means one entry in :data:`PROMPT_MODELS` (and its name among
``train.method``'s choices in :mod:`pipeline.config`); training, checkpoints, sampling and the
comparison look it up here instead of branching on its name.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.baselines.soft_prompt import PromptTuningObjective, SoftPrompt
from pipeline.config import RunConfig, SampleConfig
from pipeline.method.objectives import OBJECTIVES, ObjectiveOutput
from pipeline.method.prompt import DiffusionPrompt

if TYPE_CHECKING:  # light to import: the command line reads the registry before any model
    from pipeline.lm.frozen import Batch, FrozenCodeLM


@dataclass(frozen=True)
class LMFacts:
    """What a prompt model needs to know of the frozen LM: n, d, the mean token-embedding norm
    and X_ctx (n, d); ``context`` is None when a checkpoint's weights will supply it."""

    context_tokens: int
    hidden_size: int
    token_norm: float
    context: torch.Tensor | None = None


@dataclass(frozen=True)
class PromptModelSpec:
    build: Callable[[RunConfig, LMFacts], nn.Module]
    objective: Callable[[RunConfig], object]
    checkpoint_flag: str  # the `ddpt sample` option that names a trained one
    help: str


def _diffusion_prompt(config: RunConfig, facts: LMFacts) -> DiffusionPrompt:
    dn, df = config.denoiser, config.diffusion
    return DiffusionPrompt(
        facts.context_tokens, facts.hidden_size, facts.token_norm, bottleneck=dn.bottleneck,
        hidden_dim=dn.hidden_dim, num_blocks=dn.num_blocks, time_embed_dim=dn.time_embed_dim,
        up_projection=dn.up_projection, up_scale=dn.up_scale, schedule=df.schedule,
        timesteps=df.timesteps, seed=config.train.seed)


def _bootstrap(config: RunConfig):
    tc = config.train
    return OBJECTIVES[tc.objective](ema_rate=tc.ema_rate, consistency_weight=tc.consistency_weight)


def _soft_prompt(config: RunConfig, facts: LMFacts) -> SoftPrompt:
    context = facts.context
    if context is None:  # restored from a checkpoint, whose weights hold X_ctx
        context = torch.zeros(facts.context_tokens, facts.hidden_size)
    return SoftPrompt(context, facts.token_norm)


PROMPT_MODELS: dict[str, PromptModelSpec] = {
    "ddpt": PromptModelSpec(_diffusion_prompt, _bootstrap, "--checkpoint",
                            "DDPT: a denoiser turns noise into the prompt direction"),
    "prompt_tuning": PromptModelSpec(_soft_prompt, lambda config: PromptTuningObjective(),
                                     "--prompt-tuning",
                                     "the baseline: the n context embeddings learned directly"),
}


def lm_facts(lm: FrozenCodeLM, token_norm: float | None = None,
             context: torch.Tensor | None = None) -> LMFacts:
    """The LM's facts; pass ``token_norm`` and ``context`` when its embedding table is
    partitioned (ZeRO-3) and had to be gathered first."""
    return LMFacts(lm.context_length, lm.hidden_size,
                   lm.mean_token_norm() if token_norm is None else token_norm,
                   lm.context_embedding() if context is None else context)


def build_trainable(lm: FrozenCodeLM, config: RunConfig, token_norm: float | None = None,
                    context: torch.Tensor | None = None) -> tuple[nn.Module, object]:
    """The prompt model and the objective that ``train.method`` trains, initialised from
    ``train.seed``."""
    spec = PROMPT_MODELS[config.train.method]
    torch.manual_seed(config.train.seed)
    return spec.build(config, lm_facts(lm, token_norm, context)), spec.objective(config)


def sampling_args(sample: SampleConfig) -> dict:
    """``sample_directions`` keywords from the ``sample`` section."""
    return {"sampler": sample.sampler, "steps": sample.ddim_steps, "eta": sample.eta}


class PromptLoss(nn.Module):
    """A prompt model and the frozen LM in one module, returning the objective's loss.

    DeepSpeed wraps exactly one module; with ZeRO-3 its hooks gather the partitioned LM layers
    as they run, so the LM must be a submodule here.
    """

    def __init__(self, prompt_model: nn.Module, lm: FrozenCodeLM, objective):
        super().__init__()
        self.prompt = prompt_model
        self.lm_model = lm.model  # registered, so DeepSpeed sees (and partitions) it
        self._lm, self.objective = lm, objective

    def forward(self, batch: Batch, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, ObjectiveOutput]:
        """(the loss to back-propagate, the objective's whole output)."""
        output = self.objective.loss(self.prompt, lambda d: self._lm.code_loss(batch, d),
                                     batch.input_ids.shape[0], generator)
        return output.loss, output

    def after_step(self, output: ObjectiveOutput) -> None:
        self.objective.after_step(self.prompt, output)
