"""SPA, selective prompt anchoring (method.md section 2): the pieces of the decoding step.

At every generated token the LM sees the prompt twice: in full, and with the *anchored* tokens'
embeddings replaced by a mask embedding (positions and attention kept). The anchored text's
contribution to the logits, ``full - masked``, is scaled by ``omega``:
``masked + omega * (full - masked)``. :mod:`pipeline.decoding.autoregressive` runs both streams
as one batch of 2B rows with one KV cache; this module holds the stream building and the logit
arithmetic.
"""
from __future__ import annotations

import torch

# The mask embedding is the zero vector: it exists for every model, carries no token's meaning
# (a real token such as pad or unk would be its own cue; SmolLM2's pad is <|im_end|>), and after
# the first norm layer it contributes neither key nor value at its position.
MASK_FILL = 0.0


def masked_stream(embeds: torch.Tensor, anchor_mask: torch.Tensor,
                  fill: float = MASK_FILL) -> torch.Tensor:
    """(B, L, d) prompt embeddings with the anchored positions ((B, L) bool) set to ``fill``."""
    return embeds.masked_fill(anchor_mask[..., None], fill)


def two_streams(embeds: torch.Tensor, attention_mask: torch.Tensor, anchor_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the full and the masked stream: (2B, L, d) embeddings, rows ``[:B]`` full and
    ``[B:]`` masked, and the (2B, L) attention mask (the same for both: positions are kept)."""
    return (torch.cat([embeds, masked_stream(embeds, anchor_mask)]),
            torch.cat([attention_mask, attention_mask]))


def combine(full: torch.Tensor, masked: torch.Tensor, omega: float) -> torch.Tensor:
    """SPA logits ``masked + omega * (full - masked)``, written as ``full + (omega - 1) * (full -
    masked)`` so that omega = 1 returns ``full`` bit for bit (the other form rounds)."""
    return full + (omega - 1.0) * (full - masked)


def split_combine(logits: torch.Tensor, omega: float) -> torch.Tensor:
    """(2B, V) logits of the stacked streams -> (B, V) SPA logits (float32: half-precision
    logits would round the small anchored difference)."""
    full, masked = logits.float().chunk(2)
    return combine(full, masked, omega)
