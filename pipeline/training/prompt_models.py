"""The prompt models by name (``train.method``): how each is built from a run's configuration,
what objective trains it, and which ``ddpt sample`` option names a trained one.

Adding a prompt model means its name in :data:`pipeline.config.PROMPT_MODELS` (``train.method``'s
choices) and its entry in :data:`PROMPT_MODELS` here (checked at import); training, checkpoints,
sampling and the comparison look it up here instead of branching on its name.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.baselines.soft_prompt import PromptTuningObjective, SoftPrompt
from pipeline.config import PROMPT_MODELS as PROMPT_MODEL_NAMES
from pipeline.config import RunConfig, SampleConfig
from pipeline.method.objectives import OBJECTIVES, ObjectiveOutput
from pipeline.method.prompt import DiffusionPrompt

if TYPE_CHECKING:  # light to import: the command line reads the registry before any model
    from pipeline.lm.frozen import Batch, FrozenCodeLM


@dataclass(frozen=True)
class LMFacts:
    """What a prompt model needs to know of the frozen LM: n, d, the mean token-embedding norm
    and X_ctx (n, d); ``context`` is None when a checkpoint's weights will supply it.
    ``word_embeddings``: the LM's input-embedding module (prompt tuning's ``vocab`` start
    draws its tokens' rows from it); None when restoring a checkpoint."""

    context_tokens: int
    hidden_size: int
    token_norm: float
    context: torch.Tensor | None = None
    word_embeddings: nn.Module | None = None


@dataclass(frozen=True)
class PromptModelSpec:
    build: Callable[[RunConfig, LMFacts], nn.Module]
    objective: Callable[[RunConfig], object]
    checkpoint_flag: str  # the `ddpt sample` option that names a trained one
    help: str


# the objectives that train through the unroll_steps DDIM chain, which sampling then runs
CHAIN_OBJECTIVES = ("unrolled", "spread", "soft_min")


def _diffusion_prompt(config: RunConfig, facts: LMFacts) -> DiffusionPrompt:
    dn, df, objective = config.denoiser, config.diffusion, config.train.objective
    return DiffusionPrompt(
        facts.context_tokens, facts.hidden_size, facts.token_norm, bottleneck=dn.bottleneck,
        hidden_dim=dn.hidden_dim, num_blocks=dn.num_blocks, time_embed_dim=dn.time_embed_dim,
        up_projection=dn.up_projection, up_scale=dn.up_scale, schedule=df.schedule,
        timesteps=df.timesteps, seed=config.train.seed,
        cond_dim=0 if dn.condition == "none" else facts.hidden_size,
        teacher=objective == "bootstrap_teacher", deterministic=objective == "deterministic",
        chain_steps=config.train.unroll_steps if objective in CHAIN_OBJECTIVES else None)


# train.objective -> the objective's settings, from the train section
_OBJECTIVE_ARGS = {
    "bootstrap": lambda tc: {"ema_rate": tc.ema_rate, "consistency_weight": tc.consistency_weight,
                             "cfg_dropout": tc.cfg_dropout},
    "bootstrap_teacher": lambda tc: {"ema_rate": tc.ema_rate, "cfg_dropout": tc.cfg_dropout,
                                     "consistency_weight": tc.consistency_weight,
                                     "teacher_steps": tc.teacher_steps},
    "unrolled": lambda tc: {"cfg_dropout": tc.cfg_dropout, "unroll_steps": tc.unroll_steps},
    "spread": lambda tc: {"cfg_dropout": tc.cfg_dropout, "unroll_steps": tc.unroll_steps,
                          "spread_weight": tc.spread_weight, "target_spread": tc.target_spread},
    "deterministic": lambda tc: {"cfg_dropout": tc.cfg_dropout},
    # K and tau: SoftMinSettings' defaults until they join the train section
    "soft_min": lambda tc: {"cfg_dropout": tc.cfg_dropout, "unroll_steps": tc.unroll_steps},
}


def _ddpt_objective(config: RunConfig):
    tc = config.train
    return OBJECTIVES[tc.objective](**_OBJECTIVE_ARGS[tc.objective](tc))


def _soft_prompt(config: RunConfig, facts: LMFacts) -> SoftPrompt:
    context = facts.context
    if context is None:  # restored from a checkpoint, whose weights hold X_ctx
        context = torch.zeros(facts.context_tokens, facts.hidden_size)
    vocab = config.train.prompt_init == "vocab" and facts.context is not None
    return SoftPrompt(context, facts.token_norm, facts.word_embeddings if vocab else None)


PROMPT_MODELS: dict[str, PromptModelSpec] = {
    "ddpt": PromptModelSpec(_diffusion_prompt, _ddpt_objective, "--checkpoint",
                            "DDPT: a denoiser turns noise into the prompt direction"),
    "prompt_tuning": PromptModelSpec(_soft_prompt, lambda config: PromptTuningObjective(),
                                     "--prompt-tuning",
                                     "the baseline: the n context embeddings learned directly"),
}
if tuple(PROMPT_MODELS) != PROMPT_MODEL_NAMES:  # one entry per train.method choice, in order
    raise ImportError(f"prompt model registry {list(PROMPT_MODELS)} does not match "
                      f"pipeline.config.PROMPT_MODELS {list(PROMPT_MODEL_NAMES)}")


def lm_facts(lm: FrozenCodeLM, token_norm: float | None = None,
             context: torch.Tensor | None = None) -> LMFacts:
    """The LM's facts; pass ``token_norm`` and ``context`` when its embedding table is
    partitioned (ZeRO-3) and had to be gathered first."""
    return LMFacts(lm.context_length, lm.hidden_size,
                   lm.mean_token_norm() if token_norm is None else token_norm,
                   lm.context_embedding() if context is None else context,
                   lm.model.get_input_embeddings())


def build_trainable(lm: FrozenCodeLM, config: RunConfig, token_norm: float | None = None,
                    context: torch.Tensor | None = None) -> tuple[nn.Module, object]:
    """The prompt model and the objective that ``train.method`` trains, initialised from
    ``train.seed``."""
    spec = PROMPT_MODELS[config.train.method]
    torch.manual_seed(config.train.seed)
    return spec.build(config, lm_facts(lm, token_norm, context)), spec.objective(config)


def sampling_args(sample: SampleConfig, model: nn.Module | None = None) -> dict:
    """``sample_directions`` keywords from the ``sample`` section (and the guidance scale for a
    conditional ``model``)."""
    args = {"sampler": sample.sampler, "steps": sample.ddim_steps, "eta": sample.eta}
    if is_conditional(model):
        args["guidance"] = sample.guidance
    return args


def is_conditional(model: nn.Module | None) -> bool:
    """Whether the prompt model wants each example's condition (a per-task prompt)."""
    return bool(getattr(model, "conditional", False))


def parameter_count(model: nn.Module) -> int:
    """The prompt model's trained parameters (buffers, the EMA teacher and the LM excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has bfloat16 kernels on this CPU (AVX512-BF16 or AMX; not AVX2)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op: absent means unknown, assume not
        return False


class PromptLoss(nn.Module):
    """A prompt model and the frozen LM in one module, returning the objective's loss.

    DeepSpeed wraps exactly one module; with ZeRO-3 its hooks gather the partitioned LM layers
    as they run, so the LM must be a submodule here.
    """

    def __init__(self, prompt_model: nn.Module, lm: FrozenCodeLM, objective,
                 autocast: str = "off"):
        super().__init__()
        self.prompt = prompt_model
        self.lm_model = lm.model  # registered, so DeepSpeed sees (and partitions) it
        self._lm, self.objective = lm, objective
        self.autocast = autocast  # train.lm_autocast: the frozen LM's forward in bfloat16
        if autocast == "bfloat16" and lm.device.type == "cpu" and not cpu_has_native_bf16():
            logging.getLogger(__name__).warning(
                "train.lm_autocast=bfloat16 on a CPU without native bfloat16 (%s): bfloat16 is "
                "emulated there, measured over 7x slower per step than 'off' (docs/training.md)",
                torch.backends.cpu.get_cpu_capability())

    def forward(self, batch: Batch, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, ObjectiveOutput]:
        """(the loss to back-propagate, the objective's whole output)."""
        extra = {"condition": self._lm.condition(batch)} if is_conditional(self.prompt) else {}
        output = self.objective.loss(
            self.prompt, lambda d, per_example=False: self._code_loss(
                batch, d, generator, per_example=per_example),
            batch.input_ids.shape[0], generator, **extra)
        return output.loss, output

    def _code_loss(self, batch: Batch, direction: torch.Tensor,
                   generator: torch.Generator | None, *, per_example: bool = False
                   ) -> torch.Tensor:
        # m prompts per example (direction (m * B, n, d)): the batch tiled m times, one forward.
        rows = batch.input_ids.shape[0]
        if direction.dim() == 3 and direction.shape[0] != rows:
            if direction.shape[0] % rows:
                raise ValueError(f"{direction.shape[0]} prompt directions for {rows} examples")
            batch = tile_batch(batch, direction.shape[0] // rows)
        # A masked-diffusion LM draws its coupled masks from the step's generator too.
        device = self._lm.device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.autocast == "bfloat16"):
            return self._lm.code_loss(batch, direction, per_example=per_example,
                                      generator=generator).float()

    def after_step(self, output: ObjectiveOutput, gather=nullcontext) -> None:
        """The objective's update after the optimizer step. ``gather(params)``: a context in
        which partitioned parameters are whole (ZeRO-3's ``GatheredParameters``)."""
        if getattr(self.objective, "reads_parameters", False):
            with gather(list(self.prompt.parameters())):
                self.objective.after_step(self.prompt, output)
        else:
            self.objective.after_step(self.prompt, output)


def tile_batch(batch: Batch, times: int) -> Batch:
    """The batch repeated ``times`` times along rows (row ``i * B + b`` is example b)."""
    from pipeline.lm.frozen import Batch

    tile = lambda x: None if x is None else x.repeat(times, *([1] * (x.dim() - 1)))
    return Batch(batch.ids * times, tile(batch.input_ids), tile(batch.attention_mask),
                 tile(batch.context_mask), tile(batch.labels),
                 {name: tile(mask) for name, mask in batch.spans.items()})


@torch.no_grad()
def condition_stats(lm: FrozenCodeLM, batches) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sums over ``batches`` of the conditions and their squares: ((d,), (d,), count), to be
    summed over data-parallel ranks before :func:`set_condition_stats`."""
    total = square = None
    count = 0
    for batch in batches:
        c = lm.condition(batch.to(lm.device)).double()
        total = c.sum(0) if total is None else total + c.sum(0)
        square = c.pow(2).sum(0) if square is None else square + c.pow(2).sum(0)
        count += c.shape[0]
    return total, square, count


def set_condition_stats(model: nn.Module, total: torch.Tensor, square: torch.Tensor,
                        count: int) -> None:
    """Standardise a conditional model's conditions with the training data's mean and std."""
    mean = total / count
    std = (square / count - mean.pow(2)).clamp(min=0).sqrt()
    model.set_condition_stats(mean.float(), std.float())
