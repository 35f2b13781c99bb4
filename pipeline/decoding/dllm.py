"""Masked-diffusion decoding through the harness: a batch of examples in the frozen LM's
template, optionally with a DDPT prompt offset on the context span and SPA's two canvases, into
code and the decoding record (:mod:`pipeline.decoding.masked_diffusion` does the decoding).

How DDPT and SPA compose with a dLLM: a DDPT prompt is an embedding offset on the context span,
so every denoising step's forward sees ``X_ctx + delta`` there (the canvas is re-embedded each
step); SPA runs the full and the anchor-masked prompt as two canvases (2B rows), combines their
logits with omega and updates both canvases with the same tokens.
"""
from __future__ import annotations

import torch

from pipeline.config import DecodingConfig
from pipeline.decoding.masked_diffusion import (
    DecodingRecord,
    DiffusionSettings,
    completion_ids,
    diffusion_generate,
)
from pipeline.decoding.model_fns import dream_model_fn, spa_model_fn
from pipeline.lm.frozen import Batch, FrozenCodeLM


def diffusion_settings(decoding: DecodingConfig, max_new_tokens: int) -> DiffusionSettings:
    """Dream's arguments from the ``decoding`` section; the canvas is ``max_new_tokens`` long
    and ``diffusion_steps: 0`` means one step per canvas token."""
    return DiffusionSettings(
        max_new_tokens=max_new_tokens, steps=decoding.diffusion_steps or max_new_tokens,
        eps=decoding.diffusion_eps, alg=decoding.diffusion_alg,
        alg_temp=decoding.diffusion_alg_temp or None,
        temperature=decoding.diffusion_temperature,
        top_p=decoding.diffusion_top_p if decoding.diffusion_top_p < 1 else None,
        top_k=decoding.diffusion_top_k or None, parity=decoding.diffusion_parity)


@torch.no_grad()
def generate_ids_diffusion(lm: FrozenCodeLM, batch: Batch, delta: torch.Tensor | None,
                           max_new_tokens: int, decoding: DecodingConfig, *, spa: bool = False,
                           generator: torch.Generator | None = None
                           ) -> tuple[list[list[int]], DecodingRecord]:
    """Decode a batch collated without targets (left-padded prompts): the new token ids of
    each row (cut at the first stop or pad id, without mask ids or ids beyond the tokenizer),
    and the decoding record."""
    model = lm.model
    prompt_embeds = prompt_mask = None
    if delta is not None:
        n, d = lm.context_length, lm.hidden_size
        context = lm.context_embedding()
        prompt_embeds = (context + delta.to(context.dtype)).expand(batch.input_ids.shape[0], n, d)
        prompt_mask = batch.context_mask
    mask = batch.attention_mask
    if spa:
        model_fn = spa_model_fn(model, mask, batch.anchor_mask(decoding.spa_anchors),
                                decoding.spa_omega, prompt_embeds=prompt_embeds,
                                prompt_mask=prompt_mask)
    else:
        model_fn = dream_model_fn(model, mask, prompt_embeds, prompt_mask)
    out = diffusion_generate(model_fn, batch.input_ids, mask,
                             diffusion_settings(decoding, max_new_tokens),
                             model.config.mask_token_id, generator=generator,
                             valid_vocab_size=len(lm.tokenizer))
    rows = completion_ids(out.sequences, batch.input_ids.shape[1],
                          {*lm.template.stop_ids, lm.pad_id}, mask_id=model.config.mask_token_id,
                          vocab_size=len(lm.tokenizer))
    return rows, out.record
