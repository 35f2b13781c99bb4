"""The trainable prompt models and their training objectives.

:class:`DiffusionPrompt` (DDPT, method.md section 1) bundles the noise schedule, the denoiser,
the up-projection and the bootstrap target ``x0_bar``. Latents are (n, k); directions are (n, d);
the prompt the LM sees is ``X_ctx + direction``.

:class:`SoftPrompt` is the prompt-tuning baseline: the same n context positions, learned directly
with the same loss, data and steps. Both offer ``sample_directions(num, config, generator)``, so
sampling and evaluation treat them alike.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import (
    DenoiserConfig,
    DiffusionConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
)
from pipeline.method.denoiser import PromptDenoiser, UpProjection
from pipeline.method.samplers import sample
from pipeline.method.schedules import NoiseSchedule
from pipeline.lm.frozen import Batch, FrozenCodeLM


class DiffusionPrompt(nn.Module):
    """Noise -> prompt direction.

    Args:
        context_tokens: n. hidden_size: d. token_norm: the LM's mean token-embedding norm (sets
        the fixed up-projection's scale). seed: the fixed up-projection's seed.
    """

    def __init__(self, context_tokens: int, hidden_size: int, token_norm: float,
                 denoiser: DenoiserConfig, diffusion: DiffusionConfig, seed: int = 0):
        super().__init__()
        self.context_tokens, self.hidden_size, self.token_norm = context_tokens, hidden_size, token_norm
        self.bottleneck = denoiser.bottleneck
        self.schedule = NoiseSchedule(diffusion.schedule, diffusion.timesteps)
        self.denoiser = PromptDenoiser(context_tokens, denoiser)
        self.up = UpProjection(denoiser.bottleneck, hidden_size, denoiser.up_projection,
                               denoiser.up_scale * token_norm, seed=seed)
        # The bootstrap target: a stop-gradient moving average of clean predictions. It starts
        # at 0, i.e. at the manual prompt.
        self.register_buffer("x0_bar", torch.zeros(context_tokens, denoiser.bottleneck))

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.context_tokens, self.bottleneck)

    def direction(self, latent: torch.Tensor) -> torch.Tensor:
        """(..., n, k) -> (..., n, d)."""
        return self.up(latent)

    @torch.no_grad()
    def sample_latents(self, num: int, config: SampleConfig,
                       generator: torch.Generator | Sequence[torch.Generator] | None = None
                       ) -> torch.Tensor:
        """``num`` latents from the reverse chain: (num, n, k). ``generator``: one, or one per
        row (see :func:`pipeline.method.samplers.sample`)."""
        was_training, threads = self.training, torch.get_num_threads()
        self.eval()
        device = self.x0_bar.device
        if device.type == "cpu":
            # The denoiser's matrices are tiny: one thread skips the per-op fork/join that
            # makes each of the T small steps slow, worst on a busy machine.
            torch.set_num_threads(1)
        try:
            return sample(self.denoiser, self.schedule, (num, *self.latent_shape),
                          sampler=config.sampler, steps=config.ddim_steps, eta=config.eta,
                          generator=generator, device=device)
        finally:
            torch.set_num_threads(threads)
            self.train(was_training)

    def sample_directions(self, num: int, config: SampleConfig,
                          generator: torch.Generator | Sequence[torch.Generator] | None = None
                          ) -> torch.Tensor:
        """``num`` prompt directions: (num, n, d)."""
        return self.direction(self.sample_latents(num, config, generator))


class SoftPrompt(nn.Module):
    """Prompt tuning (Lester et al. 2021) on the context span: the n prompt embeddings P (n, d)
    are the parameters, initialised from the manual context's embeddings (PEFT's TEXT init), and
    the direction is ``P - X_ctx``, so the LM sees P exactly where DDPT's prompt goes.

    P lives in PEFT's ``PromptEmbedding``. PEFT's ``PeftModel`` wrapper is not used: it prepends
    virtual tokens before the whole input (in front of the chat template's system header), which
    would put the baseline's prompt somewhere else than DDPT's, and it wraps the forward that
    DeepSpeed's ZeRO-3 hooks and our KV-cache decoding drive directly.
    """

    def __init__(self, context: torch.Tensor, token_norm: float):
        from peft import PromptTuningConfig
        from peft.tuners.prompt_tuning import PromptEmbedding

        super().__init__()
        self.context_tokens, self.hidden_size = context.shape
        self.token_norm = token_norm
        peft_config = PromptTuningConfig(task_type="CAUSAL_LM", prompt_tuning_init="RANDOM",
                                         num_virtual_tokens=self.context_tokens,
                                         token_dim=self.hidden_size, num_transformer_submodules=1)
        self.prompt = PromptEmbedding(peft_config, word_embeddings=None)
        with torch.no_grad():
            self.prompt.embedding.weight.copy_(context.float())
        self.register_buffer("context", context.detach().float().clone())  # X_ctx, (n, d)
        self.register_buffer("positions", torch.arange(self.context_tokens), persistent=False)

    def direction(self) -> torch.Tensor:
        """P - X_ctx: (n, d). P is read through the embedding's forward, where ZeRO-3's hooks
        gather it when DeepSpeed has partitioned it."""
        return self.prompt(self.positions) - self.context

    @torch.no_grad()
    def sample_directions(self, num: int, config: SampleConfig | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """The one learned direction, ``num`` times: (num, n, d). Nothing is random."""
        return self.direction().detach().expand(num, -1, -1).clone()


@dataclass
class StepStats:
    loss: float  # total objective
    code_loss: float  # the LM's cross-entropy on code tokens
    consistency: float  # ||x0_hat - x0_bar||^2, mean over elements
    direction_norm: float  # mean per-position norm of the predicted direction


class BootstrapObjective:
    """The default objective (method.md section 1, ``objective: bootstrap``).

    Each step: t ~ U{0..T-1}, eps ~ N(0, I); x_t = sqrt(abar_t) x0_bar + sqrt(1 - abar_t) eps;
    x0_hat = D(x_t, t); loss = CE(LM | X_ctx + Up(x0_hat)) + lambda ||x0_hat - x0_bar||^2;
    then x0_bar <- (1 - rate) x0_bar + rate * mean(x0_hat) (no gradient).
    """

    def __init__(self, config: TrainConfig):
        self.rate, self.weight = config.ema_rate, config.consistency_weight

    def loss(self, model: DiffusionPrompt, lm: FrozenCodeLM, batch: Batch,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, StepStats]:
        bsz = batch.input_ids.shape[0]
        device = model.x0_bar.device
        t = torch.randint(0, model.schedule.timesteps, (bsz,), generator=generator).to(device)
        eps = torch.randn((bsz, *model.latent_shape), generator=generator).to(device)
        x0_bar = model.x0_bar.expand(bsz, *model.latent_shape)
        x_t = model.schedule.add_noise(x0_bar, eps, t)
        x0_hat = model.denoiser(x_t, t)
        direction = model.direction(x0_hat)
        code_loss = lm.code_loss(batch, direction)
        consistency = (x0_hat - x0_bar).pow(2).mean()
        loss = code_loss + self.weight * consistency
        self._last_x0_hat = x0_hat.detach()
        stats = StepStats(loss.item(), code_loss.item(), consistency.item(),
                          direction.detach().norm(dim=-1).mean().item())
        return loss, stats

    @torch.no_grad()
    def after_step(self, model: DiffusionPrompt) -> None:
        mean = self._last_x0_hat.mean(0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must keep the same target: average the ranks' batch means.
            torch.distributed.all_reduce(mean)
            mean /= torch.distributed.get_world_size()
        model.x0_bar.lerp_(mean.to(model.x0_bar.dtype), self.rate)


class PromptTuningObjective:
    """The baseline's loss: the LM's code cross-entropy given P; nothing else to update."""

    def __init__(self, config: TrainConfig):
        pass

    def loss(self, model: SoftPrompt, lm: FrozenCodeLM, batch: Batch,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, StepStats]:
        direction = model.direction()
        code_loss = lm.code_loss(batch, direction)
        stats = StepStats(code_loss.item(), code_loss.item(), 0.0,
                          direction.detach().norm(dim=-1).mean().item())
        return code_loss, stats

    def after_step(self, model: SoftPrompt) -> None:
        pass


OBJECTIVES = {"bootstrap": BootstrapObjective}


class DDPTLoss(nn.Module):
    """A prompt model (DDPT's or the soft prompt) and the frozen LM in one module, returning the
    objective's loss.

    DeepSpeed wraps exactly one module; with ZeRO-3 its hooks gather the partitioned LM layers
    as they run, so the LM must be a submodule here.
    """

    def __init__(self, prompt_model: nn.Module, lm: FrozenCodeLM, objective):
        super().__init__()
        self.prompt = prompt_model
        self.lm_model = lm.model  # registered, so DeepSpeed sees (and partitions) it
        self._lm, self.objective = lm, objective

    def forward(self, batch: Batch, generator: torch.Generator | None = None):
        return self.objective.loss(self.prompt, self._lm, batch, generator)


def build_prompt_model(lm: FrozenCodeLM, denoiser: DenoiserConfig, diffusion: DiffusionConfig,
                       seed: int, token_norm: float | None = None) -> DiffusionPrompt:
    """``token_norm`` defaults to the LM's mean token-embedding norm (pass it when the table is
    partitioned and has to be gathered first)."""
    torch.manual_seed(seed)
    norm = lm.mean_token_norm() if token_norm is None else token_norm
    return DiffusionPrompt(lm.context_length, lm.hidden_size, norm, denoiser, diffusion, seed=seed)


def build_trainable(lm: FrozenCodeLM, config: RunConfig, token_norm: float | None = None,
                    context: torch.Tensor | None = None) -> tuple[nn.Module, object]:
    """The prompt model and objective that ``train.method`` trains. ``token_norm`` and
    ``context`` (X_ctx, (n, d)) default to the LM's; pass them when its embedding table is
    partitioned (ZeRO-3) and has to be gathered first."""
    tc = config.train
    if tc.method == "prompt_tuning":
        torch.manual_seed(tc.seed)
        context = lm.context_embedding() if context is None else context
        norm = lm.mean_token_norm() if token_norm is None else token_norm
        return SoftPrompt(context, norm), PromptTuningObjective(tc)
    model = build_prompt_model(lm, config.denoiser, config.diffusion, tc.seed, token_norm)
    return model, OBJECTIVES[tc.objective](tc)
