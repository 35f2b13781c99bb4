"""How much sampled prompts differ: collapse made visible.

A prompt model that keeps a distribution gives different directions for different noise (the
spread *per condition*); a per-task model also gives different directions for different tasks
(the spread *across conditions*). Spread = mean pairwise L2 distance of the flattened directions
over their mean L2 norm: 0 when all are equal (a collapsed distribution, or the soft prompt), about
sqrt(2) for independent directions of equal norm.
"""
from __future__ import annotations

import math

import torch


def pairwise_spread(directions: torch.Tensor) -> float:
    """(K, n, d) -> mean pairwise distance / mean norm; NaN when the mean norm is 0 (the manual
    prompt)."""
    flat = directions.reshape(directions.shape[0], -1).double()
    count = flat.shape[0]
    if count < 2:
        raise ValueError("need at least 2 directions")
    mean_distance = torch.cdist(flat, flat).sum() / (count * (count - 1))
    norm = flat.norm(dim=-1).mean()
    return (mean_distance / norm).item() if norm > 0 else math.nan


def prompt_diversity(per_condition: torch.Tensor, across: torch.Tensor) -> dict[str, float]:
    """``per_condition`` (M, K, n, d): K samples for each of M examples; ``across`` (N, n, d):
    one sample each (the same noise) for N examples. Returns the mean spread per condition and
    the spread across conditions."""
    per = [pairwise_spread(per_condition[i]) for i in range(per_condition.shape[0])]
    return {"prompt_spread_per_condition": sum(per) / len(per),
            "prompt_spread_across_conditions": pairwise_spread(across)}
