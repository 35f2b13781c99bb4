"""Pictures of prompt directions ``delta`` (what a prompt model adds to the manual context):
where they lie (:func:`direction_map`) and what each context position became
(:func:`position_map`).

Projections are principal axes from an SVD in float64 with a fixed sign per axis, so the
pictures are deterministic and take milliseconds. Figures are built on
:class:`matplotlib.figure.Figure` without pyplot.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pipeline.lm.frozen import FrozenCodeLM
from pipeline.scoring.diversity import pairwise_spread

MANUAL = "manual"  # the manual prompt: delta = 0, the origin of the directions' map
MAX_ROWS = 40  # positions in the heat map: a longer context shows those that moved most
TASK_COLOURS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")  # tab10 without its grey


@torch.no_grad()
def nearest_ids(lm: FrozenCodeLM, prompts: torch.Tensor, k: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` (..., d) -> the ids (..., k) of the k vocabulary tokens whose input
    embeddings are nearest in cosine similarity, and those similarities (..., k)."""
    table = F.normalize(lm.model.get_input_embeddings().weight.float(), dim=-1)  # (V, d)
    sims = F.normalize(prompts.float().to(table.device), dim=-1) @ table.T  # (..., V)
    top = sims.topk(k, dim=-1)
    return top.indices.cpu(), top.values.cpu()


@dataclass
class PromptSet:
    """One prompt model's directions (not the prompts): ``directions`` (T, K, n, d), K noise
    draws for each of T tasks; draw 0 is the direction the method used. T = 1 when the model
    gives one prompt for every task (``tasks`` None), K = 1 when nothing is random (prompt
    tuning). ``label``: the method whose sampler drew them (the table's row name)."""

    directions: torch.Tensor
    tasks: list[str] | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if self.directions.dim() != 4:
            raise ValueError(f"{self.label}: directions must be (tasks, draws, n, d), got "
                             f"{tuple(self.directions.shape)}")
        if self.tasks is not None and len(self.tasks) != self.directions.shape[0]:
            raise ValueError(f"{self.label}: {len(self.tasks)} task ids for "
                             f"{self.directions.shape[0]} tasks of directions")


def project(points: torch.Tensor, *, centre: bool) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) points -> their coordinates (N, 2) on the first two principal axes and the share
    of the points' sum of squares (about their mean when ``centre``) each axis holds. Each
    axis's sign is fixed (deterministic): uncentred, the points' mean lies on its positive
    side; centred, its largest-magnitude loading is positive. A missing axis (rank below 2) is
    all zeros."""
    x = points.double()
    if centre:
        x = x - x.mean(0, keepdim=True)
    _, values, axes = torch.linalg.svd(x, full_matrices=False)  # axes (r, D)
    side = ((x @ axes.T).sum(0, keepdim=True).T if not centre  # (r, 1)
            else axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    axes = axes * torch.where(side < 0, -1.0, 1.0)
    coords = torch.zeros(len(x), 2, dtype=torch.float64)
    kept = min(2, axes.shape[0])
    coords[:, :kept] = x @ axes[:kept].T
    total = float((values ** 2).sum())
    shares = np.zeros(2)
    shares[:kept] = (values[:kept] ** 2 / total).numpy() if total > 0 else 0.0
    return coords.numpy(), shares


def spreads(prompt_set: PromptSet) -> dict[str, float]:
    """``within``: the mean over tasks of the spread of a task's noise draws (K > 1);
    ``across``: the spread of the tasks' used directions (T > 1). Spread is mean pairwise
    distance over mean norm (:func:`pipeline.scoring.diversity.pairwise_spread`)."""
    directions = prompt_set.directions
    found = {}
    if directions.shape[1] > 1:
        found["within"] = float(np.mean([pairwise_spread(d) for d in directions]))
    if directions.shape[0] > 1:
        found["across"] = pairwise_spread(directions[:, 0])
    return found


def mean_norm(prompt_set: PromptSet) -> float:
    """Mean norm of a direction at one context position, over positions, tasks and draws."""
    return prompt_set.directions.float().norm(dim=-1).mean().item()


@dataclass
class DirectionMap:
    """What :func:`direction_map` drew: per label, the points (T, K, 2) in the shared
    projection (``manual``: the origin, (1, 1, 2)) and, per sampled model, around its own
    mean; the axes' shares, per-position norms, spreads and the cosine between each two
    methods' mean directions (in all n·d dimensions, not the projection's two)."""

    path: Path
    coords: dict[str, np.ndarray] = field(default_factory=dict)
    local: dict[str, np.ndarray] = field(default_factory=dict)
    shares: np.ndarray | None = None
    norms: dict[str, float] = field(default_factory=dict)
    spreads: dict[str, dict[str, float]] = field(default_factory=dict)
    cosines: dict[tuple[str, str], float] = field(default_factory=dict)  # of mean directions


def direction_map(prompts: dict[str, PromptSet], path: str | Path, *, token_norm: float,
                  colours: dict[str, str] | None = None) -> DirectionMap:
    """Save the picture of ``prompts`` ({label: PromptSet}) at ``path``. Left: every direction
    (flattened, n·d values) on the two principal axes through the origin, which is the manual
    prompt: one large point per (task, method), small ones for further noise draws. Then, per
    model with more than one direction, its directions around their mean, coloured by task
    (small points: the same task's other noise draws), titled with the spread within a task
    and across tasks. ``colours``: {label: colour} (the metrics chart's)."""
    labels = list(prompts)
    colours = colours or {}
    colour = {label: colours.get(label, f"C{(i + 1) % 10}") for i, label in enumerate(labels)}
    flat = {label: s.directions.float().reshape(*s.directions.shape[:2], -1)
            for label, s in prompts.items()}  # (T, K, n*d)
    width = next(iter(flat.values())).shape[-1]
    points = torch.cat([torch.zeros(1, width)] + [f.reshape(-1, width) for f in flat.values()])
    coords, shares = project(points, centre=False)  # row 0: the manual prompt, at the origin
    drawn = DirectionMap(Path(path), shares=shares, coords={MANUAL: coords[:1].reshape(1, 1, 2)})
    start = 1
    for label, f in flat.items():
        drawn.coords[label] = coords[start:start + f.shape[0] * f.shape[1]].reshape(
            f.shape[0], f.shape[1], 2)
        start += f.shape[0] * f.shape[1]
        drawn.norms[label] = mean_norm(prompts[label])
        drawn.spreads[label] = spreads(prompts[label])
    means = {label: f.reshape(-1, width).mean(0) for label, f in flat.items()}
    drawn.cosines = {(a, b): F.cosine_similarity(means[a], means[b], dim=0).item()
                     for i, a in enumerate(labels) for b in labels[i + 1:]}
    sampled = [label for label in labels if flat[label].shape[0] * flat[label].shape[1] > 1]
    figure = Figure(figsize=(5.2 * (1 + len(sampled)), 4.8), layout="constrained")
    axes = figure.subplots(1, 1 + len(sampled), squeeze=False)[0]
    _draw_shared(axes[0], drawn, prompts, colour, colours.get(MANUAL, "black"), token_norm)
    for ax, label in zip(axes[1:], sampled):
        local, _ = project(flat[label].reshape(-1, width), centre=True)
        drawn.local[label] = local.reshape(*flat[label].shape[:2], 2)
        _draw_local(ax, label, drawn, prompts[label])
    figure.suptitle("What the prompts changed: the directions δ added to the manual context "
                    "(principal axes)", fontsize=10)
    _save(figure, drawn.path)
    return drawn


def _points(ax, xy: np.ndarray, colour, marker: str = "o", label: str | None = None) -> None:
    """``xy`` (T, K, 2): draw 0 of each task large, the other draws small and faint."""
    if xy.shape[1] > 1:
        rest = xy[:, 1:].reshape(-1, 2)
        ax.scatter(rest[:, 0], rest[:, 1], s=9, c=colour if isinstance(colour, str) else
                   np.repeat(colour, xy.shape[1] - 1, axis=0), alpha=0.45, linewidths=0)
    ax.scatter(xy[:, 0, 0], xy[:, 0, 1], s=46, c=colour, marker=marker, edgecolors="black",
               linewidths=0.5, label=label, zorder=3)


def _draw_shared(ax, drawn: DirectionMap, prompts: dict[str, PromptSet],
                 colour: dict[str, str], manual_colour: str, token_norm: float) -> None:
    for label, xy in drawn.coords.items():
        if label == MANUAL:
            ax.scatter([0], [0], s=70, marker="s", c=manual_colour, edgecolors="black",
                       zorder=4, label="manual prompt (δ = 0)")
            continue
        directions = prompts[label].directions
        count = (f"{directions.shape[0]} tasks" if prompts[label].tasks else "one prompt") + (
            f" × {directions.shape[1]} draws" if directions.shape[1] > 1 else "")
        norm = drawn.norms[label]
        _points(ax, xy, colour[label], label=f"{label} ({count}): |δ| per position "
                f"{norm:.3g} = {norm / token_norm:.3g} × token norm")
    ax.axhline(0, color="#bbbbbb", linewidth=0.6, zorder=0)
    ax.axvline(0, color="#bbbbbb", linewidth=0.6, zorder=0)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel(f"axis 1 ({drawn.shares[0]:.1%} of Σ|δ|²)", fontsize=8)
    ax.set_ylabel(f"axis 2 ({drawn.shares[1]:.1%})", fontsize=8)
    if drawn.cosines:  # the angle between methods, which the projection may distort
        lines = [f"{a} · {b}: {c:.2f}" for (a, b), c in drawn.cosines.items()]
        ax.text(0.98, 0.02, "cosine of mean directions\n" + "\n".join(lines), fontsize=6.5,
                ha="right", va="bottom", transform=ax.transAxes,
                bbox={"facecolor": "white", "edgecolor": "#cccccc", "alpha": 0.9})
    ax.set_title("every method's directions; the origin is the manual prompt", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6.5, loc="best")


def _draw_local(ax, label: str, drawn: DirectionMap, prompt_set: PromptSet) -> None:
    xy = drawn.local[label]  # (T, K, 2)
    tasks = prompt_set.tasks or ["all tasks"]
    task_colour = np.array([TASK_COLOURS[i % len(TASK_COLOURS)] for i in range(len(tasks))])
    for t in range(xy.shape[0]):  # each further draw joined to its task's used draw
        for k in range(1, xy.shape[1]):
            ax.plot(xy[t, [0, k], 0], xy[t, [0, k], 1], color=task_colour[t], linewidth=0.5,
                    alpha=0.5)
    _points(ax, xy, task_colour)
    found = drawn.spreads[label]
    words = [f"{name} {value:.3g}" for name, value in
             (("within a task", found.get("within")), ("across tasks", found.get("across")))
             if value is not None]
    ax.set_title(f"{label} around its mean\nspread " + ", ".join(words), fontsize=9)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("axis 1 of these directions (spread: mean pairwise distance / mean |δ|)",
                  fontsize=8)
    ax.tick_params(labelsize=7)
    handles = [Line2D([], [], marker="o", linestyle="", color=task_colour[i], label=str(t))
               for i, t in enumerate(tasks[:len(TASK_COLOURS)])]
    ax.legend(handles=handles, fontsize=6, loc="best", title="task (large: the prompt used)",
              title_fontsize=6)


@dataclass
class PositionMap:
    """What :func:`position_map` drew: ``moved`` (n, M), each position's mean direction norm
    over a method's tasks and draws, in mean token norms; ``nearest`` (n, M), the token each
    position's prompt sits nearest to (most common over the tasks; ``=``: still the manual
    token; ``k/T``: the share of tasks where it is); ``cosine`` (n, M), the prompt's mean
    cosine to the manual token there; ``rows``: the positions drawn (at most
    :data:`MAX_ROWS`)."""

    path: Path
    labels: list[str] = field(default_factory=list)
    moved: np.ndarray | None = None
    nearest: list[list[str]] = field(default_factory=list)
    cosine: np.ndarray | None = None  # (n, M)
    rows: list[int] = field(default_factory=list)  # the positions drawn


def short(text: str, width: int = 12) -> str:
    """A token as a short, printable label."""
    return ascii(text.strip() or text)[1:-1][:width]


def position_map(lm: FrozenCodeLM, prompts: dict[str, PromptSet], path: str | Path
                 ) -> PositionMap:
    """Save a heat map at ``path``: a row per context position (its manual token), a column
    per method; the colour is how far the prompt moved there, the text the token it now sits
    nearest to (cosine), for the directions each method used on its tasks."""
    context = lm.context_embedding().float().cpu()  # (n, d)
    context_ids = lm.template.context_ids
    token_norm = lm.mean_token_norm()
    drawn = PositionMap(Path(path), labels=list(prompts))
    moved, cells, cosines = [], [], []
    for prompt_set in prompts.values():
        directions = prompt_set.directions.float()
        moved.append((directions.norm(dim=-1).mean(dim=(0, 1)) / token_norm).numpy())
        used = context + directions[:, 0]  # (T, n, d): the prompts the method used
        ids, _ = nearest_ids(lm, used)  # (T, n, 1)
        cosines.append(F.cosine_similarity(used, context[None], dim=-1).mean(0).numpy())
        column = []
        for i, own in enumerate(context_ids):
            (top, count), = Counter(ids[:, i, 0].tolist()).most_common(1)
            text = "=" if top == own else short(lm.tokenizer.decode([top]))
            column.append(text + (f" {count}/{len(ids)}" if count < len(ids) else ""))
        cells.append(column)
    drawn.moved = np.stack(moved, axis=1)  # (n, M)
    drawn.cosine = np.stack(cosines, axis=1)
    drawn.nearest = [list(row) for row in zip(*cells)]
    drawn.rows = list(range(len(context_ids)))
    if len(drawn.rows) > MAX_ROWS:  # a long context: the positions that moved most, in order
        order = np.argsort(-drawn.moved.max(axis=1), kind="stable")
        drawn.rows = sorted(order[:MAX_ROWS].tolist())
    _draw_positions(drawn, [f"{i:2d} {short(lm.tokenizer.decode([context_ids[i]]))}"
                            for i in drawn.rows], len(context_ids))
    return drawn


def _draw_positions(drawn: PositionMap, rows: list[str], positions: int) -> None:
    moved = drawn.moved[drawn.rows]
    n, m = moved.shape
    figure = Figure(figsize=(max(4.8, 2.6 + 1.5 * m), 1.6 + 0.26 * n),
                    layout="constrained")
    ax = figure.subplots()
    top = max(float(moved.max()), 1e-9)
    image = ax.imshow(moved, cmap="YlOrRd", vmin=0, vmax=top, aspect="auto")
    for i, position in enumerate(drawn.rows):
        for j in range(m):
            text = f"{drawn.nearest[position][j]}  {drawn.cosine[position, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if moved[i, j] > 0.6 * top else "black")
    ax.set_xticks(range(m), drawn.labels, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(range(n), rows, fontsize=7, family="monospace")
    ax.set_ylabel("context position and its manual token", fontsize=8)
    bar = figure.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("|δ| at the position / mean token norm", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    which = f" (the {n} of {positions} that moved most)" if n < positions else ""
    ax.set_title(f"Each context position{which}: how far it moved (colour),\nthe token it "
                 "is nearest to now (=: still the manual token;\nk/T: on k of T tasks) and "
                 "its cosine to the manual token", fontsize=9)
    _save(figure, drawn.path)


def _save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
