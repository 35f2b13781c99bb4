"""The model functions the masked-diffusion loop (:mod:`pipeline.decoding.masked_diffusion`)
calls, ``x (B, N) -> logits (B, N, V)``: a Dream model with its padding mask and an optional
prompt offset on the context span (:func:`dream_model_fn`), and SPA's two canvases combined into
one (:func:`spa_model_fn`)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.decoding.spa import MASK_FILL, masked_stream, split_combine
from pipeline.lm.dream import padding_inputs

ModelFn = Callable[[torch.Tensor], torch.Tensor]


def _span_mask(prompt_mask: torch.Tensor, N: int, n_ctx: int) -> torch.Tensor:
    mask = F.pad(prompt_mask.bool(), (0, N - prompt_mask.shape[1]), value=False)
    if not bool((mask.sum(1) == n_ctx).all()):
        raise ValueError(f"prompt_mask must mark exactly n_ctx={n_ctx} positions in every row, "
                         f"got {mask.sum(1).tolist()}")
    return mask


def _embed(model: nn.Module, x: torch.Tensor, prompt_embeds: torch.Tensor | None,
           span: torch.Tensor | None) -> torch.Tensor:
    emb = model.get_input_embeddings()(x)
    if prompt_embeds is not None:  # replace the span's embeddings, row-major within each row
        emb = emb.masked_scatter(span[..., None], prompt_embeds.to(emb.dtype))
    return emb


def dream_model_fn(model: nn.Module, attention_mask: torch.Tensor | None = None,
                   prompt_embeds: torch.Tensor | None = None,
                   prompt_mask: torch.Tensor | None = None) -> ModelFn:
    """x (B, N) -> logits (B, N, V). The 4-D mask and positions are built once from the 0/1
    ``attention_mask`` (B, n <= N), as the reference does (only when something is padded).
    With ``prompt_embeds`` (B, n_ctx, d) and ``prompt_mask`` (B, n <= N) bool marking n_ctx
    positions per row, those positions' input embeddings are replaced at every step."""
    if (prompt_embeds is None) != (prompt_mask is None):
        raise ValueError("prompt_embeds and prompt_mask go together")
    cache: dict[int, tuple] = {}

    def fn(x: torch.Tensor) -> torch.Tensor:
        N = x.shape[1]
        if N not in cache:
            span = (None if prompt_mask is None
                    else _span_mask(prompt_mask.to(x.device), N, prompt_embeds.shape[1]))
            cache[N] = (*padding_inputs(attention_mask, N), span)
        mask4, pos, span = cache[N]
        if prompt_embeds is None:
            return model(input_ids=x, attention_mask=mask4, position_ids=pos).logits
        return model(inputs_embeds=_embed(model, x, prompt_embeds, span),
                     attention_mask=mask4, position_ids=pos).logits

    return fn


def combine_streams(two_stream_fn: ModelFn, omega: float) -> ModelFn:
    """SPA over one canvas: ``two_stream_fn`` maps (2B, N) -> (2B, N, V), rows [:B] the full
    prompt and [B:] the anchor-masked one; the logits are combined as in autoregressive SPA
    (:func:`pipeline.decoding.spa.split_combine`, float32). Both canvases are the same x, so
    they update identically."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        return split_combine(two_stream_fn(torch.cat([x, x])), omega)

    return fn


def spa_model_fn(model: nn.Module, attention_mask: torch.Tensor | None,
                 anchor_mask: torch.Tensor, omega: float, *, fill: float = MASK_FILL,
                 prompt_embeds: torch.Tensor | None = None,
                 prompt_mask: torch.Tensor | None = None) -> ModelFn:
    """SPA with a Dream model: the anchored positions ((B, n <= N) bool) get the embedding
    ``fill`` (the zero vector, as autoregressive SPA) in the second stream
    (:func:`pipeline.decoding.spa.masked_stream`); positions and attention are kept. Prompt
    offsets as in :func:`dream_model_fn` apply to both streams."""
    am2 = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    cache: dict[int, tuple] = {}

    def two(x2: torch.Tensor) -> torch.Tensor:
        N, B = x2.shape[1], x2.shape[0] // 2
        if N not in cache:
            anchor = F.pad(anchor_mask.bool().to(x2.device), (0, N - anchor_mask.shape[1]))
            span = (None if prompt_mask is None
                    else _span_mask(prompt_mask.to(x2.device), N, prompt_embeds.shape[1]))
            cache[N] = (*padding_inputs(am2, N), anchor, span)
        mask4, pos, anchor, span = cache[N]
        emb = _embed(model, x2[:B], prompt_embeds, span)
        emb = torch.cat([emb, masked_stream(emb, anchor, fill)])
        return model(inputs_embeds=emb, attention_mask=mask4, position_ids=pos).logits

    return combine_streams(two, omega)
