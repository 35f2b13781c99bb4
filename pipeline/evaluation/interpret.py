"""What the learned prompts look like: nearest vocabulary tokens and a t-SNE map.

A prompt is the n vectors ``P = X_ctx + delta`` (n, d) the LM sees in place of the manual
context. :func:`nearest_tokens` lists, per position, the vocabulary tokens whose input
embeddings are closest in cosine similarity; :func:`tsne_plot` maps sampled prompts, the manual
context and a random sample of the vocabulary into two dimensions.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.lm.frozen import FrozenCodeLM


def _token(lm: FrozenCodeLM, token_id: int) -> str:
    return lm.tokenizer.decode([token_id])


@torch.no_grad()
def nearest_tokens(lm: FrozenCodeLM, prompt: torch.Tensor, k: int = 5) -> dict:
    """``prompt``: (n, d). Per position: the context's own token, its k nearest vocabulary
    tokens (cosine) and how far the prompt moved from the manual context there.

    Returns ``{"positions": [...], "summary": {...}}``; ``summary.still_nearest`` is the share
    of positions whose nearest token is still the manual context's token there.
    """
    table = lm.model.get_input_embeddings().weight.float()  # (V, d)
    context = lm.context_embedding().float()  # (n, d)
    prompt = prompt.float().to(table.device)
    sims = F.normalize(prompt, dim=-1) @ F.normalize(table, dim=-1).T  # (n, V)
    top = sims.topk(k, dim=-1)
    to_context = F.cosine_similarity(prompt, context, dim=-1)  # (n,)
    positions = []
    for i, token_id in enumerate(lm.template.context_ids):
        positions.append({
            "position": i,
            "context_token": _token(lm, token_id),
            "cosine_to_context": round(to_context[i].item(), 4),
            "nearest": [[_token(lm, j), round(s, 4)]
                        for j, s in zip(top.indices[i].tolist(), top.values[i].tolist())],
        })
    kept = sum(int(top.indices[i, 0].item() == t) for i, t in enumerate(lm.template.context_ids))
    summary = {"still_nearest": kept / len(positions),
               "mean_cosine_to_context": to_context.mean().item(),
               "mean_direction_norm": (prompt - context).norm(dim=-1).mean().item(),
               "mean_token_norm": lm.mean_token_norm()}
    return {"positions": positions, "summary": summary}


@torch.no_grad()
def tsne_plot(lm: FrozenCodeLM, prompts: dict[str, torch.Tensor], path: str | Path,
              vocab_sample: int = 600, seed: int = 0, max_iter: int = 250) -> Path:
    """Save a t-SNE scatter of ``prompts`` ({label: (m, n, d) sampled prompts}) among the manual
    context and ``vocab_sample`` random vocabulary embeddings. Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a Ray node
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    table = lm.model.get_input_embeddings().weight.float().cpu()
    generator = torch.Generator().manual_seed(seed)
    vocab = table[torch.randperm(table.shape[0], generator=generator)[:vocab_sample]]
    groups = {"vocabulary": vocab, "manual context": lm.context_embedding().float().cpu()}
    groups.update({label: p.float().cpu().reshape(-1, p.shape[-1]) for label, p in
                   prompts.items()})
    points = torch.cat(list(groups.values())).numpy()
    perplexity = min(15.0, (len(points) - 1) / 3)  # fewer neighbours: faster, local structure
    # 250 iterations (sklearn's default is 1000): the map is a picture, not a measurement,
    # and Barnes-Hut t-SNE is the slowest step of a comparison on a small CPU machine.
    coords = TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=max_iter,
                  random_state=seed).fit_transform(points)

    figure, axes = plt.subplots(figsize=(7, 6))
    start = 0
    for label, group in groups.items():
        xy = coords[start : start + len(group)]
        start += len(group)
        style = {"s": 4, "c": "lightgray"} if label == "vocabulary" else {"s": 14}
        axes.scatter(xy[:, 0], xy[:, 1], label=label, alpha=0.8, **style)
    axes.set_title("Prompts among token embeddings (t-SNE)")
    axes.legend(loc="best", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
