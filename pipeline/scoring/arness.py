"""AR-ness of a masked-diffusion decode (DiffuCoder paper section 4.1, App. A.2; docs/dllm.md s7).

The input is a *reveal order* ``p_1..p_T`` over the L canvas positions (0-based, canvas-relative).

- Local AR-ness@k ("NTP@k"): ``I_local(t, k) = 1`` iff the k decodes before step t are exactly
  the k positions left of ``p_t``, in order: ``p_{t-i} = p_t - i`` for i = 1..k (the ordered
  form of the Fig. 3 caption, "a strictly increasing consecutive sequence"; the set form of A.2 is
  not implemented). Non-increasing in k.
- Global AR-ness@k ("FMS@k"): ``I_global(t, k) = 1`` iff ``p_t`` is among the k leftmost positions
  still masked before step t (all of them when fewer than k are left). Non-decreasing in k.

Conventions (ours; the paper leaves them open):

1. Order. Built from revealed positions, not step indices: empty steps are skipped and a step that
   reveals several tokens is flattened in the recorded order (descending confidence for top-k,
   :class:`pipeline.decoding.masked_diffusion.DecodingRecord`); each flattened reveal is one t,
   and ``M_{t-1}`` is updated reveal by reveal. From a history alone the order inside a step is
   unknown: :func:`order_from_history` uses ascending positions.
2. T = L, the canvas length. A reveal order shorter than L (a parity-mode decode that kept mask
   ids) counts the missing steps as 0.
3. Steps t <= k (local only). ``normalize="T"`` (default) sums over every t and divides by T;
   with ``prompt_prefix=True`` (default) the prompt counts as decoded left to right before step 1
   (so the last prompt position is "decoded at step 0", the one before it at step -1, ...): the
   first t <= k decodes score 1 iff they are exactly positions 0..t-1 in order. Pure AR decoding
   then gives 1 at every k, as the paper states. ``prompt_prefix=False`` makes them 0 (the
   paper's formula read literally; AR gives (T-k)/T). ``normalize="T-k"`` drops steps t <= k and
   divides by T - k (a third-party convention; NaN when T <= k). Global AR-ness always uses T.
4. A right-to-left decode has local AR-ness 0 and global AR-ness@1 = 1/T, not 0: the last reveal
   is forced (one mask left), and this is kept rather than special-cased.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

Order = Sequence[int] | np.ndarray | torch.Tensor


def _check(order: Order, L: int | None) -> tuple[np.ndarray, int]:
    p = np.asarray(order.tolist() if isinstance(order, torch.Tensor) else order, dtype=np.int64)
    T = len(p) if L is None else L
    if p.ndim != 1 or len(p) > T or (len(p) and (p.min() < 0 or p.max() >= T)):
        raise ValueError(f"order must be distinct positions in [0, {T}), got {p.tolist()[:20]}")
    if len(np.unique(p)) != len(p):
        raise ValueError("order repeats a position")
    return p, T


def _runs(p: np.ndarray, *, prompt_prefix: bool) -> np.ndarray:
    """r_t: how many decodes right before step t continue leftwards from p_t (inf: into the
    prompt prefix)."""
    r = np.zeros(len(p))
    for t in range(len(p)):
        if t == 0:
            r[t] = np.inf if prompt_prefix and p[0] == 0 else 0
        else:
            r[t] = r[t - 1] + 1 if p[t - 1] == p[t] - 1 else 0
    return r


def local_arness(order: Order, ks: Sequence[int], L: int | None = None, normalize: str = "T",
                 *, prompt_prefix: bool = True) -> np.ndarray:
    """Local AR-ness@k for each k in ``ks`` (len(ks),) of one reveal order."""
    if normalize not in ("T", "T-k"):
        raise ValueError(f"normalize must be 'T' or 'T-k', got {normalize!r}")
    p, T = _check(order, L)
    r = _runs(p, prompt_prefix=prompt_prefix and normalize == "T")
    out = []
    for k in ks:
        if normalize == "T":
            out.append(float((r >= k).sum()) / T)
        else:
            out.append(float((r[k:] >= k).sum()) / (T - k) if T > k else float("nan"))
    return np.asarray(out)


def global_ranks(order: Order, L: int | None = None) -> np.ndarray:
    """g_t: the rank (1 = leftmost) of p_t among the positions still masked before step t."""
    p, _ = _check(order, L)
    earlier_left = np.tril(p[None, :] < p[:, None], k=-1).sum(1)  # j < t with p_j < p_t
    return 1 + p - earlier_left


def global_arness(order: Order, ks: Sequence[int], L: int | None = None) -> np.ndarray:
    """Global AR-ness@k for each k in ``ks`` (len(ks),) of one reveal order."""
    _, T = _check(order, L)
    g = global_ranks(order, L)
    return np.asarray([float((g <= k).sum()) / T for k in ks])


@dataclass
class ArnessCurves:
    """Per-example AR-ness: ``local`` (B, len(ks_local)), ``global_`` (B, len(ks_global))."""

    ks_local: list[int]
    local: np.ndarray
    ks_global: list[int]
    global_: np.ndarray

    def mean(self) -> tuple[np.ndarray, np.ndarray]:
        return np.nanmean(self.local, axis=0), np.nanmean(self.global_, axis=0)


def arness_curves(orders: Sequence[Order], L: int | None = None, k_local: int = 9,
                  k_global: int = 4, normalize: str = "T", *, prompt_prefix: bool = True
                  ) -> ArnessCurves:
    """AR-ness@k for k = 1..k_local (local) and 1..k_global (global), one row per order (the
    paper plots 1..9 and 1..4). ``L`` defaults to each order's own length."""
    kl, kg = list(range(1, k_local + 1)), list(range(1, k_global + 1))
    loc = [local_arness(o, kl, L, normalize, prompt_prefix=prompt_prefix) for o in orders]
    glo = [global_arness(o, kg, L) for o in orders]
    return ArnessCurves(kl, np.stack(loc), kg, np.stack(glo))


def order_from_history(history: Sequence[torch.Tensor], x_init: torch.Tensor, prompt_len: int,
                       mask_id: int) -> list[torch.Tensor]:
    """Reveal orders (canvas-relative, ascending within a step) from history frames (B, N),
    for decodes that only expose a history (the reference's ``output_history``)."""
    prev, orders = x_init, [[] for _ in range(x_init.shape[0])]
    for frame in history:
        new = (prev == mask_id) & (frame != mask_id)
        for b in range(frame.shape[0]):
            orders[b].append(new[b].nonzero()[:, 0] - prompt_len)
        prev = frame
    return [torch.cat(o) for o in orders]


def plot_arness(curves: ArnessCurves | dict[str, ArnessCurves], path: str | Path) -> Path:
    """PNG: mean local and global AR-ness against k (one line per label, band = +-1 std)."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    curves = {"": curves} if isinstance(curves, ArnessCurves) else curves
    fig = Figure(figsize=(9, 3.5))
    axes = fig.subplots(1, 2)
    for label, c in curves.items():
        for ax, ks, v in ((axes[0], c.ks_local, c.local), (axes[1], c.ks_global, c.global_)):
            mu, sd = np.nanmean(v, 0), np.nanstd(v, 0)
            ax.plot(ks, mu, marker="o", label=label or None)
            ax.fill_between(ks, mu - sd, mu + sd, alpha=0.2)
            ax.set_xticks(ks)
    for ax, name in zip(axes, ("local AR-ness@k", "global AR-ness@k"), strict=True):
        ax.set(xlabel="k", ylabel=name, ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        if any(curves):
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_first_step_confidence(conf: np.ndarray | torch.Tensor, path: str | Path) -> Path:
    """PNG: first-step confidence against canvas position, ``conf`` (B, L) or (L,), NaN where
    a position was not masked; thin lines per row, thick the mean (the "entropy sink")."""
    from matplotlib.figure import Figure

    c = np.atleast_2d(conf.float().numpy() if isinstance(conf, torch.Tensor) else conf)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for row in c:
        ax.plot(row, color="0.7", linewidth=0.8)
    ax.plot(np.nanmean(c, 0), color="C0", linewidth=2, label="mean")
    ax.set(xlabel="canvas position", ylabel="first-step confidence")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def arness_from_record(record, **kwargs) -> ArnessCurves:
    """:func:`arness_curves` of a :class:`DecodingRecord`'s orders with T = its canvas length."""
    return arness_curves(record.orders(), L=record.canvas_len, **kwargs)


def rollout_arness(record, k_local: int = 9, k_global: int = 4) -> dict[str, float]:
    """Mean AR-ness of one batch of rollouts from its :class:`DecodingRecord` (every row, the
    whole canvas, T = L): ``arness_local_at_<k>`` for k = 1..k_local and
    ``arness_global_at_<k>`` for k = 1..k_global, the names the comparisons use, as floats
    for a training loop's metrics (coupled-GRPO logs them each round)."""
    local, global_ = arness_from_record(record, k_local=k_local, k_global=k_global).mean()
    return {**{f"arness_local_at_{k}": float(v) for k, v in enumerate(local, start=1)},
            **{f"arness_global_at_{k}": float(v) for k, v in enumerate(global_, start=1)}}
