"""The small network that turns a noisy latent into a clean prompt direction.

Diffusion runs in a low-dimensional latent of shape (n, k) per prompt (n context tokens, bottleneck
width k, the "optimise in a low-dimensional space" of BBT). An up-projection maps a latent to the
direction ``delta`` (n, d) added to the context's embedding: the prompt is ``X_ctx + Up(z)``.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Transformer / DDPM). t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, time_width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.time = nn.Linear(time_width, width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, h: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm(h) + self.time(t_emb))


class PromptDenoiser(nn.Module):
    """``D(x_t, t) -> x0_hat``: predicts the clean latent (n, k) from a noisy one.

    The last layer starts at zero, so before training every prediction is 0 and the prompt is
    exactly the manual one.

    Args:
        context_tokens: n. bottleneck: k. hidden_dim: width of the MLP blocks. num_blocks:
        residual blocks. time_embed_dim: sinusoidal timestep embedding width (even).
    """

    def __init__(self, context_tokens: int, bottleneck: int, hidden_dim: int = 256,
                 num_blocks: int = 2, time_embed_dim: int = 64):
        super().__init__()
        self.context_tokens, self.bottleneck = context_tokens, bottleneck
        self.time_embed_dim = time_embed_dim
        latent = context_tokens * bottleneck
        self.time_mlp = nn.Sequential(
            nn.Linear(time_embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim),
        )
        self.inp = nn.Linear(latent, hidden_dim)
        self.blocks = nn.ModuleList(
            ResidualBlock(hidden_dim, hidden_dim) for _ in range(num_blocks)
        )
        self.out_norm = nn.LayerNorm(hidden_dim)
        self.out = nn.Linear(hidden_dim, latent)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t: (B, n, k), t: (B,) long -> x0_hat: (B, n, k)."""
        batch = x_t.shape[0]
        t_emb = self.time_mlp(timestep_embedding(t, self.time_embed_dim).to(x_t.dtype))
        h = self.inp(x_t.reshape(batch, -1))
        for block in self.blocks:
            h = block(h, t_emb)
        return self.out(self.out_norm(h)).reshape(batch, self.context_tokens, self.bottleneck)


class UpProjection(nn.Module):
    """Latent (..., n, k) -> direction (..., n, d).

    'fixed': a random Gaussian map scaled so that a standard-normal latent has norm
    ``up_scale * mean token-embedding norm`` per position (a buffer: never trained).
    'learned': a zero-initialised linear map (then the denoiser's own zero init is not needed
    to start at the manual prompt, but it is kept).
    """

    def __init__(self, bottleneck: int, hidden_size: int, kind: str, scale: float, seed: int = 0):
        super().__init__()
        self.kind = kind
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(bottleneck, hidden_size, generator=generator)
        # E||z W||^2 = d k var(W) for z ~ N(0, I_k): pick var(W) so the norm is `scale`.
        weight = weight * (scale / math.sqrt(hidden_size * bottleneck))
        if kind == "fixed":
            self.register_buffer("weight", weight)
        elif kind == "learned":
            self.weight = nn.Parameter(torch.zeros_like(weight))
        else:
            raise ValueError(f"unknown up_projection {kind!r}; known: ['fixed', 'learned']")

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return latent @ self.weight.to(latent.dtype)
