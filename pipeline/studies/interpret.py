"""What the learned prompts look like: nearest vocabulary tokens and a t-SNE map.

A prompt is the n vectors ``P = X_ctx + delta`` (n, d) the LM sees in place of the manual
context. :func:`nearest_tokens` lists, per position, the vocabulary tokens whose input
embeddings are closest in cosine similarity; :func:`tsne_plot` maps sampled prompts, the manual
context and a random sample of the vocabulary into two dimensions, with the vocabulary tokens
nearest to the prompts labelled.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
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


@dataclass
class PromptSet:
    """One prompt model's prompts on the map: ``prompts`` (m, n, d); ``tasks`` the example id of
    each of the m prompts when prompts are per task (coloured by task), else None."""

    prompts: torch.Tensor
    tasks: list[str] | None = None


@dataclass
class TsneMap:
    """What :func:`tsne_plot` drew: the PNG, each group's marker and 2-D points (k, 2), the
    labelled vocabulary tokens, the tasks that colour prompts, and the seconds it took."""

    path: Path
    markers: dict[str, str] = field(default_factory=dict)
    coords: dict[str, object] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    seconds: float = 0.0


MARKERS = {"manual context": "s", "prompt_tuning": "^", "ddpt": "o"}
OTHER_MARKERS = ("D", "P", "X", "v")
GROUP_COLOURS = ("black", "crimson", "royalblue", "darkorange", "seagreen")  # manual first
TASK_COLOURS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")  # tab10 without its grey


def _label(text: str) -> str:
    """A token as a short, printable label."""
    return ascii(text.strip() or text)[1:-1][:14]


def _nearest_ids(table: torch.Tensor, points: torch.Tensor, limit: int) -> list[int]:
    """The ``limit`` vocabulary ids that are the nearest token (cosine) of most of ``points``
    (k, d), most frequent first."""
    nearest = (F.normalize(points, dim=-1) @ F.normalize(table, dim=-1).T).argmax(-1)
    ids, counts = nearest.unique(return_counts=True)
    return ids[counts.argsort(descending=True, stable=True)][:limit].tolist()


def _embed_2d(points: torch.Tensor, seed: int, max_iter: int):
    """t-SNE of ``points`` (N, d) on the unit sphere (cosine geometry, as nearest tokens use),
    after PCA to 50 dimensions, on one thread (predictable on a busy small machine): (N, 2)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = F.normalize(points.float(), dim=-1).numpy()
    with threadpool_limits(1):
        if x.shape[1] > 50 and len(x) > 50:
            x = PCA(50, random_state=seed).fit_transform(x)
        perplexity = min(15.0, (len(x) - 1) / 3)  # fewer neighbours: faster, local structure
        return TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=max_iter,
                    random_state=seed).fit_transform(x)


@torch.no_grad()
def tsne_plot(lm: FrozenCodeLM, prompts: dict[str, PromptSet], path: str | Path, *,
              vocab_sample: int = 3000, seed: int = 0, max_iter: int = 500,
              max_labels: int = 30) -> TsneMap:
    """Save a t-SNE map of ``prompts`` ({prompt model: PromptSet}) and the manual context among
    ``vocab_sample`` random vocabulary embeddings (a light background); the ``max_labels``
    vocabulary tokens nearest to most prompt positions are drawn darker and labelled. Each
    prompt model has its own marker; prompts per task are coloured by task.

    sklearn's first 250 iterations are early exaggeration, so ``max_iter`` 500 leaves 250
    ordinary ones; about 15 s of one CPU core for 3000 tokens."""
    began = time.perf_counter()
    table = lm.model.get_input_embeddings().weight.float().cpu()  # (V, d)
    groups = {"manual context": lm.context_embedding().float().cpu()}  # label -> (k, d)
    groups.update({name: s.prompts.float().cpu().reshape(-1, table.shape[1])
                   for name, s in prompts.items()})
    labelled = _nearest_ids(table, torch.cat(list(groups.values())), max_labels)
    generator = torch.Generator().manual_seed(seed)
    background = torch.randperm(table.shape[0], generator=generator)[:vocab_sample].tolist()
    chosen = set(labelled)
    background = [i for i in background if i not in chosen] + labelled
    points = torch.cat([table[background], *groups.values()])
    coords = _embed_2d(points, seed, max(max_iter, 250))
    drawn = TsneMap(Path(path), coords={"vocabulary": coords[:len(background)]},
                    labels=[_label(_token(lm, i)) for i in labelled])
    start = len(background)
    for name, group in groups.items():
        drawn.coords[name] = coords[start:start + len(group)]
        start += len(group)
    _draw_map(drawn, prompts, len(labelled))
    drawn.seconds = time.perf_counter() - began
    return drawn


def _draw_map(drawn: TsneMap, prompts: dict[str, PromptSet], labelled: int) -> None:
    """Draw ``drawn.coords`` (the last ``labelled`` vocabulary points labelled) into
    ``drawn.path``, filling ``drawn.markers``."""
    from matplotlib import patheffects
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(9, 7.5))
    ax = figure.subplots()
    vocab = drawn.coords["vocabulary"]
    ax.scatter(vocab[:, 0], vocab[:, 1], s=3, c="#cccccc", alpha=0.5, linewidths=0)
    near = vocab[len(vocab) - labelled:]
    ax.scatter(near[:, 0], near[:, 1], s=10, c="#555555", linewidths=0)
    halo = [patheffects.withStroke(linewidth=2, foreground="white")]
    for (x, y), text in zip(near, drawn.labels):  # above every marker, readable on them
        ax.annotate(text, (x, y), fontsize=7, color="#222222", xytext=(3, 3), zorder=5,
                    textcoords="offset points", path_effects=halo)
    handles = [Line2D([], [], marker="o", linestyle="", color=c, label=text) for c, text in
               (("#cccccc", "vocabulary (random sample)"), ("#555555", "nearest tokens"))]
    others = iter(OTHER_MARKERS)
    tasks = drawn.tasks = list(dict.fromkeys(t for s in prompts.values() for t in (s.tasks or [])))
    for index, name in enumerate(n for n in drawn.coords if n != "vocabulary"):
        marker = drawn.markers[name] = MARKERS.get(name) or next(others, "o")
        xy, colour = drawn.coords[name], GROUP_COLOURS[index % len(GROUP_COLOURS)]
        prompt_set = prompts.get(name)
        by_task = prompt_set is not None and bool(prompt_set.tasks)
        if by_task:  # m prompts of n points each: coloured by the prompt's task
            per_prompt = len(xy) // len(prompt_set.tasks)
            colour = [TASK_COLOURS[tasks.index(t) % len(TASK_COLOURS)] for t in prompt_set.tasks
                      for _ in range(per_prompt)]
        ax.scatter(xy[:, 0], xy[:, 1], s=30, marker=marker, c=colour, edgecolors="black",
                   linewidths=0.4, alpha=0.85)
        handles.append(Line2D([], [], marker=marker, linestyle="", markeredgecolor="black",
                              color="white" if by_task else colour,
                              label=name + (" (colour: task)" if by_task else "")))
    handles += [Line2D([], [], marker="o", linestyle="", label=f"task {t}",
                       color=TASK_COLOURS[i % len(TASK_COLOURS)])
                for i, t in enumerate(tasks[:len(TASK_COLOURS)])]
    ax.legend(handles=handles, loc="best", fontsize=7)
    ax.set_title("Prompts among token embeddings (t-SNE, cosine geometry)")
    ax.set_xticks([])
    ax.set_yticks([])
    drawn.path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(drawn.path, dpi=120)
