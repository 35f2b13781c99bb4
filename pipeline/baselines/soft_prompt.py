"""The prompt-tuning baseline (the paper's "basic prompt tuning"): the context's n prompt
embeddings learned directly, with the same loss, data and steps as DDPT."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.method.objectives import CodeLoss, ObjectiveOutput, direction_stats


class SoftPrompt(nn.Module):
    """Prompt tuning (Lester et al. 2021) on the context span: the n prompt embeddings P (n, d)
    are the parameters, and the direction is ``P - X_ctx``, so the LM sees P exactly where
    DDPT's prompt goes. P starts at the manual context's embeddings (PEFT's TEXT init: step 0
    is the manual prompt), or, given ``word_embeddings``, at the embeddings of n tokens drawn
    from the whole vocabulary with torch's global generator (PEFT's SAMPLE_VOCAB init, which
    gathers a ZeRO-3-partitioned table itself).

    P lives in PEFT's ``PromptEmbedding``. PEFT's ``PeftModel`` wrapper is not used: it prepends
    virtual tokens before the whole input (in front of the chat template's system header), which
    would put the baseline's prompt somewhere else than DDPT's, and it wraps the forward that
    DeepSpeed's ZeRO-3 hooks and our KV-cache decoding drive directly.

    Args:
        context: X_ctx, (n, d). token_norm: the LM's mean token-embedding norm (kept with the
        checkpoint, for interpretation). word_embeddings: the LM's input-embedding module, to
        start from random vocabulary tokens (``train.prompt_init: vocab``); None: from X_ctx.
    """

    def __init__(self, context: torch.Tensor, token_norm: float,
                 word_embeddings: nn.Module | None = None):
        from peft import PromptTuningConfig
        from peft.tuners.prompt_tuning import PromptEmbedding

        super().__init__()
        self.context_tokens, self.hidden_size = context.shape
        self.token_norm = token_norm
        init = "RANDOM" if word_embeddings is None else "SAMPLE_VOCAB"
        peft_config = PromptTuningConfig(task_type="CAUSAL_LM", prompt_tuning_init=init,
                                         num_virtual_tokens=self.context_tokens,
                                         token_dim=self.hidden_size, num_transformer_submodules=1)
        self.prompt = PromptEmbedding(peft_config, word_embeddings=word_embeddings)
        if word_embeddings is None:
            with torch.no_grad():
                self.prompt.embedding.weight.copy_(context.float())
        self.register_buffer("context", context.detach().float().clone())  # X_ctx, (n, d)
        self.register_buffer("positions", torch.arange(self.context_tokens), persistent=False)

    def direction(self) -> torch.Tensor:
        """P - X_ctx: (n, d). P is read through the embedding's forward, where ZeRO-3's hooks
        gather it when DeepSpeed has partitioned it."""
        return self.prompt(self.positions) - self.context

    @torch.no_grad()
    def sample_directions(self, num: int, generator: object = None, **sampling: object
                          ) -> torch.Tensor:
        """The one learned direction, ``num`` times: (num, n, d). Nothing is random, so the
        generator and the sampler settings are ignored."""
        return self.direction().detach().expand(num, -1, -1).clone()


class PromptTuningObjective:
    """The baseline's loss: the LM's code cross-entropy given P; nothing else to update."""

    def loss(self, model: SoftPrompt, code_loss: CodeLoss, batch_size: int,
             generator: torch.Generator | None = None,
             condition: torch.Tensor | None = None) -> ObjectiveOutput:
        direction = model.direction()
        lm_loss = code_loss(direction)
        return ObjectiveOutput(lm_loss, direction_stats(lm_loss, lm_loss, torch.zeros(()),
                                                        direction))

    def after_step(self, model: SoftPrompt, output: ObjectiveOutput) -> None:
        pass
