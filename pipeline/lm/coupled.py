"""Coupled per-token scores of a completion under a masked-diffusion LM (docs/dllm.md s8).

DiffuCoder's coupled-GRPO trainer scores each completion token with three forwards over
prompt + completion (the prompt never masked, no attention mask):

- v1: the whole completion masked, weight 1 (t = 1);
- v2: the completion tokens with R < t masked (M_t), weight 1/t;
- v3: the complement, R > t (M_t with t^ = 1 - t), weight 1/(1 - t);

with t ~ U(0.2, 0.8) one scalar per call and R ~ U(0, 1) per token. With the sampler's logit shift
(logit j from hidden j-1) and l_j the log-probability of the true token under v_j, the score is
``(l1 + where(M_t, l2 / t, l3 / (1 - t))) / 2``: every token is masked in exactly one of v2/v3,
an antithetic pair. :func:`decoupled_scores` is the plain Monte Carlo counterpart with the same
three forwards and independent masks (rate t and 1 - t): same expectation, higher variance.
To score old / reference / current policies under the same masks (as the trainer's mask seeds
do), pass generators in the same state.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ModelFn = Callable[[torch.Tensor], torch.Tensor]


def _as_fn(model: ModelFn | nn.Module) -> ModelFn:
    if isinstance(model, nn.Module):  # as the trainer: no attention mask, pads visible
        return lambda x: model(input_ids=x).logits
    return model


def _completion_logprobs(model_fn: ModelFn, views: torch.Tensor, n: int,
                         completion_ids: torch.Tensor) -> torch.Tensor:
    """(V*B, N) canvases -> (V*B, K) fp32 log p(true completion token), shifted logits."""
    K = completion_ids.shape[1]
    logits = model_fn(views)[:, n - 1:n - 1 + K].float()  # = logits[:, :-1][:, -K:]
    target = completion_ids.repeat(views.shape[0] // completion_ids.shape[0], 1)
    return logits.log_softmax(-1).gather(-1, target[..., None])[..., 0]


def _draw_t(generator: torch.Generator | None, t_range: tuple[float, float],
            device: torch.device) -> float:
    lo, hi = t_range
    if not 0.0 < lo <= hi < 1.0:
        raise ValueError(f"t_range must satisfy 0 < lo <= hi < 1, got {t_range}")
    return lo + (hi - lo) * float(torch.rand((), generator=generator, device=device))


def draw_coupled_mask(shape: tuple[int, ...], generator: torch.Generator | None = None,
                      t_range: tuple[float, float] = (0.2, 0.8),
                      device: torch.device | str = "cpu") -> tuple[float, torch.Tensor]:
    """(t, M_t): t ~ U(t_range), then M_t = R < t with R ~ U(0, 1) of ``shape``, both from
    ``generator`` in that order: the draws :func:`coupled_scores` makes, so a generator seeded
    alike gives old, reference and current policy the same masks."""
    t = _draw_t(generator, t_range, torch.device(device))
    return t, torch.rand(shape, generator=generator, device=device) < t


def _views(prompt_ids: torch.Tensor, completion_ids: torch.Tensor, masks: list[torch.Tensor],
           mask_id: int) -> torch.Tensor:
    """Stack one canvas per completion mask: (len(masks) * B, n + K)."""
    rows = [torch.cat([prompt_ids, completion_ids.masked_fill(m, mask_id)], dim=1)
            for m in masks]
    return torch.cat(rows)


def coupled_scores(model: ModelFn | nn.Module, prompt_ids: torch.Tensor,
                   completion_ids: torch.Tensor, mask_id: int,
                   generator: torch.Generator | None = None,
                   t_range: tuple[float, float] = (0.2, 0.8)) -> torch.Tensor:
    """Per-token coupled scores (B, K) fp32 of ``completion_ids`` (B, K) after ``prompt_ids``
    (B, n >= 1). ``model``: a DreamModel or ``model_fn(x (3B, N)) -> logits (3B, N, V)``.
    Runs under the caller's grad mode (a policy-gradient step differentiates through it; wrap
    old / reference scoring in ``torch.no_grad()``)."""
    t, m_t = draw_coupled_mask(completion_ids.shape, generator, t_range, completion_ids.device)
    full = torch.ones_like(m_t)
    views = _views(prompt_ids, completion_ids, [full, m_t, ~m_t], mask_id)
    l1, l2, l3 = _completion_logprobs(_as_fn(model), views, prompt_ids.shape[1],
                                      completion_ids).chunk(3)
    return coupled_from_logprobs(l1, l2, l3, m_t, t)


def coupled_from_logprobs(l1: torch.Tensor, l2: torch.Tensor, l3: torch.Tensor,
                          m_t: torch.Tensor, t: float) -> torch.Tensor:
    """``(l1 + where(M_t, l2 / t, l3 / (1 - t))) / 2`` in fp32; all (B, K)."""
    return (l1.float() + torch.where(m_t, l2.float() / t, l3.float() / (1 - t))) / 2


def decoupled_scores(model: ModelFn | nn.Module, prompt_ids: torch.Tensor,
                     completion_ids: torch.Tensor, mask_id: int,
                     generator: torch.Generator | None = None,
                     t_range: tuple[float, float] = (0.2, 0.8)) -> torch.Tensor:
    """Plain Monte Carlo with the same three forwards: full mask, an independent mask of rate t
    and one of rate 1 - t; ``(l1 + 1[M2] l2 / t + 1[M3] l3 / (1 - t)) / 2`` (B, K) fp32. Its
    expectation equals :func:`coupled_scores`' (each term is unbiased for the same conditional
    log-likelihood), but a token may be masked in both or neither of the pair."""
    B, K = completion_ids.shape
    dev = completion_ids.device
    t = _draw_t(generator, t_range, dev)
    m2 = torch.rand(B, K, generator=generator, device=dev) < t
    m3 = torch.rand(B, K, generator=generator, device=dev) < 1 - t
    views = _views(prompt_ids, completion_ids, [torch.ones_like(m2), m2, m3], mask_id)
    l1, l2, l3 = _completion_logprobs(_as_fn(model), views, prompt_ids.shape[1],
                                      completion_ids).chunk(3)
    return (l1 + m2 * l2 / t + m3 * l3 / (1 - t)) / 2


def coupled_scores_at(model_fn: ModelFn, ids: torch.Tensor, targets: torch.Tensor,
                      mask_id: int, generator: torch.Generator | None = None,
                      t_range: tuple[float, float] = (0.2, 0.8)) -> torch.Tensor:
    """:func:`coupled_scores` for any layout: the scored tokens are where ``targets`` (B, N)
    bool is True (a batch whose rows end at different places); the rest is context, never
    masked. ``model_fn(x (3B, N)) -> logits (3B, N, V)`` carries the attention mask and any
    prompt embeddings. Returns (B, N) fp32 scores, 0 off the targets."""
    t = _draw_t(generator, t_range, ids.device)
    m_t = (torch.rand(ids.shape, generator=generator, device=ids.device) < t) & targets
    views = torch.cat([ids.masked_fill(targets, mask_id), ids.masked_fill(m_t, mask_id),
                       ids.masked_fill(targets & ~m_t, mask_id)])
    logits = model_fn(views)
    logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # logit j from hidden j-1
    where = targets.repeat(3, 1)
    logp = logits[where].float().log_softmax(-1)  # only the scored rows: (3T, V)
    true = ids.repeat(3, 1)[where]
    picked = logp.gather(-1, true[:, None])[:, 0]
    l1, l2, l3 = (torch.zeros(ids.shape, device=ids.device).masked_scatter(targets, part)
                  for part in picked.chunk(3))
    return coupled_from_logprobs(l1, l2, l3, m_t, t) * targets
