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
    """``D(x_t, t [, c]) -> x0_hat``: predicts the clean latent (n, k) from a noisy one, given
    the condition c (B, d) of each example when ``cond_dim > 0``.

    The last layer starts at zero, so before training every prediction is 0 and the prompt is
    exactly the manual one. The condition is standardised per feature with the training
    conditions' statistics (:meth:`set_condition_stats`: a mean of token embeddings is dominated
    by what every instruction shares, so raw conditions of different tasks are nearly
    parallel), then LayerNorm -> MLP, and added to the timestep embedding every block receives.
    A dropped condition (classifier-free guidance) is a learned null embedding instead.

    Args:
        context_tokens: n. bottleneck: k. hidden_dim: width of the MLP blocks. num_blocks:
        residual blocks. time_embed_dim: sinusoidal timestep embedding width (even). cond_dim:
        the condition's width d (0: unconditional).
    """

    def __init__(self, context_tokens: int, bottleneck: int, hidden_dim: int = 256,
                 num_blocks: int = 2, time_embed_dim: int = 64, cond_dim: int = 0):
        super().__init__()
        self.context_tokens, self.bottleneck = context_tokens, bottleneck
        self.time_embed_dim, self.cond_dim = time_embed_dim, cond_dim
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
        if cond_dim:  # built last: the layers above start as the unconditional model's
            self.cond_mlp = nn.Sequential(
                nn.LayerNorm(cond_dim), nn.Linear(cond_dim, hidden_dim), nn.SiLU(),
                nn.Linear(hidden_dim, hidden_dim),
            )
            self.null = nn.Parameter(torch.zeros(hidden_dim))
            self.register_buffer("cond_mean", torch.zeros(cond_dim))
            self.register_buffer("cond_scale", torch.ones(cond_dim))

    @torch.no_grad()
    def set_condition_stats(self, mean: torch.Tensor, std: torch.Tensor,
                            eps: float = 1e-6) -> None:
        """Standardise conditions with this per-feature (d,) mean and std from now on."""
        self.cond_mean.copy_(mean.float())
        self.cond_scale.copy_(std.float().clamp(min=eps))

    def condition_embedding(self, c: torch.Tensor | None, batch: int,
                            drop: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, d) -> (B, H); None (unconditional model), or the null embedding for rows without
        a condition (``c`` None) or dropped (``drop`` (B,) bool)."""
        if not self.cond_dim:
            return None
        null = self.null.expand(batch, -1)
        if c is None:
            return null
        emb = self.cond_mlp((c.to(self.null.dtype) - self.cond_mean) / self.cond_scale)
        return emb if drop is None else torch.where(drop[:, None], null, emb)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """x_t: (B, n, k), t: (B,) long, c: (B, d) or None, drop: (B,) bool -> x0_hat (B, n, k)."""
        batch = x_t.shape[0]
        t_emb = self.time_mlp(timestep_embedding(t, self.time_embed_dim).to(x_t.dtype))
        c_emb = self.condition_embedding(c, batch, drop)
        if c_emb is not None:
            t_emb = t_emb + c_emb
        h = self.inp(x_t.reshape(batch, -1))
        for block in self.blocks:
            h = block(h, t_emb)
        return self.out(self.out_norm(h)).reshape(batch, self.context_tokens, self.bottleneck)


def as_buffers(module: nn.Module) -> nn.Module:
    """``module`` with every parameter turned into a buffer of the same name: a frozen copy
    (an EMA teacher) that no optimizer sees and that DeepSpeed's ZeRO-3 does not partition."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                del sub._parameters[name]
                sub.register_buffer(name, param.detach().clone())
    return module


class UpProjection(nn.Module):
    """Latent (..., n, k) -> direction (..., n, d).

    'fixed': a random Gaussian map scaled so that a standard-normal latent has norm
    ``up_scale * mean token-embedding norm`` per position (a buffer: never trained).
    'learned': the same map as a trained parameter, starting at the fixed one. (Not at zero:
    with the denoiser's last layer at zero too, each factor's gradient would be the other's
    zero, and neither would ever train.)
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
            self.weight = nn.Parameter(weight)
        else:
            raise ValueError(f"unknown up_projection {kind!r}; known: ['fixed', 'learned']")

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return latent @ self.weight.to(latent.dtype)
