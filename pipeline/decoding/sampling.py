"""Drawing a token from logits: temperature and nucleus (top-p) sampling, shared by every
decoding strategy."""
from __future__ import annotations

import torch


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) logits with everything outside the nucleus (the smallest set of most likely tokens
    whose probability reaches ``top_p``) set to -inf; the most likely token always stays."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # A token is dropped when the tokens ranked above it already reach top_p.
    drop_sorted = probs.cumsum(-1) - probs >= top_p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from (B, V) logits with temperature and nucleus sampling: (B,)."""
    scaled = top_p_filter(logits.float() / temperature, top_p)
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator)[:, 0]
