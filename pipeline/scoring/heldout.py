"""Scoring a prompt on examples: held-out code cross-entropy (in one process, or by the ranks of
a training run together) and the text metrics of stored generations."""
from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.data.example import Example
from pipeline.lm.frozen import Batch, FrozenCodeLM
from pipeline.lm.template import EncodedExample
from pipeline.scoring.metrics import compute_metrics
from pipeline.scoring.results import ResultStore


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def heldout_code_loss(lm: FrozenCodeLM, examples: list[Example], delta: torch.Tensor | None,
                      batch_size: int) -> float:
    """Mean over examples of each example's mean cross-entropy on its code tokens."""
    losses = []
    for chunk in _batches(lm.encode(examples), batch_size):
        batch = lm.collate(chunk).to(lm.device)
        losses.append(lm.code_loss(batch, delta, per_example=True).cpu())
    return torch.cat(losses).mean().item()


@torch.no_grad()
def sharded_example_losses(lm: FrozenCodeLM, encoded: list[EncodedExample],
                           delta: torch.Tensor | None | Callable[[Batch], torch.Tensor],
                           batch_size: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Each example's mean code cross-entropy, (len(encoded),) float64 in the order of
    ``encoded``, on every rank: :func:`heldout_code_loss` (its mean) computed by ``world`` ranks
    that all call this together (the dev loss of Ray Train workers). Rank r scores examples r,
    r + world, ... and scatters its losses into zeros; one all-reduce sums the ranks' vectors
    (each example is scored by one rank).
    Every rank runs the same number of forwards, because ZeRO-3's are collective: a shorter
    share is padded with repeats whose losses are dropped. ``delta``: one direction for every
    example, or a function of the batch (per-task prompts)."""
    if not encoded:
        raise ValueError("sharded_example_losses: no examples to score")
    positions = list(range(rank, len(encoded), world))
    per_rank = -(-len(encoded) // world)
    share = [encoded[i] for i in positions] + [encoded[0]] * (per_rank - len(positions))
    scored = []
    for start in range(0, per_rank, batch_size):
        batch = lm.collate(share[start:start + batch_size]).to(lm.device)
        direction = delta(batch) if callable(delta) else delta
        scored.append(lm.code_loss(batch, direction, per_example=True).double())
    losses = torch.zeros(len(encoded), dtype=torch.float64, device=lm.device)
    if positions:
        losses[positions] = torch.cat(scored)[:len(positions)]
    if world > 1:
        torch.distributed.all_reduce(losses)
    return losses.cpu()


def score_method(store: ResultStore, method: str, examples: list[Example],
                 metric_names: list[str]) -> dict[str, float]:
    """Metrics over the stored generations of ``method`` for exactly these examples."""
    records = {r["id"]: r for r in store.by_method().get(method, [])}
    missing = [e.id for e in examples if e.id not in records]
    if missing:
        raise RuntimeError(f"{store.path}: method {method!r} lacks {len(missing)} examples, "
                           f"e.g. {missing[:3]}")
    predictions = [records[e.id]["generation"] for e in examples]
    references = [e.output for e in examples]
    return compute_metrics(predictions, references, metric_names)
