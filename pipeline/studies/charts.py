"""Pictures of a comparison, as PNGs: every metric per method (a bar panel per metric, mean ±
standard deviation where several seeds ran) and the training curves (a line per training job,
a panel per per-step metric, read from the jobs' MLflow runs).

Figures are built on :class:`matplotlib.figure.Figure` without pyplot: nothing global is kept
open, and the returned figure lets a caller (a test) read back the bars and the error bars.
"""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from pipeline.tracking import metric_history, read_run_file

CHARTS = "charts"  # the folder, in a comparison's (or an experiment's) output
METRICS_PNG, TRAINING_PNG = "metrics.png", "training.png"
TRAINING_METRICS = ("loss", "code_loss", "dev_loss")  # per-step metrics of a training job
COLUMNS = 4  # panels per row
Curves = dict[str, dict[str, list[tuple[int, float]]]]  # {job: {metric: [(step, value)]}}


def _grid(panels: int, width: float, height: float) -> tuple[Figure, list]:
    columns = min(COLUMNS, panels)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for spare in axes[panels:]:
        spare.set_visible(False)
    return figure, axes[:panels]


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def metric_chart(means: dict[str, dict[str, float]], path: str | Path,
                 std: dict[str, dict[str, float]] | None = None, title: str = "") -> Figure:
    """A bar panel per metric, a bar per method: ``means`` is ``{method: {metric: value}}``
    (metrics.json's layout); ``std`` the same shape, drawn as error bars (mean ± std). Metrics
    without a finite value for any method are left out. Saves the PNG at ``path``."""
    names = [n for n in dict.fromkeys(n for v in means.values() for n in v)
             if any(_finite(v.get(n)) for v in means.values())]
    if not names:
        raise ValueError(f"{path}: no numeric metric to chart")
    methods = list(means)
    colours = [f"C{i % 10}" for i in range(len(methods))]
    figure, axes = _grid(len(names), 3.4, 2.9)
    for ax, name in zip(axes, names):
        values = [v if _finite(v := means[m].get(name)) else math.nan for m in methods]
        errors = None
        if std is not None:
            errors = [e if _finite(e := std.get(m, {}).get(name)) else 0.0 for m in methods]
        bars = ax.bar(range(len(methods)), values, yerr=errors, color=colours, capsize=3,
                      error_kw={"elinewidth": 1})
        ax.bar_label(bars, fmt="%.3g", fontsize=6, padding=1)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.15)
    figure.suptitle(title or "metrics per method" + (" (mean ± std over seeds)" if std else ""))
    return _save(figure, path)


def training_chart(curves: Curves, path: str | Path, title: str = "") -> Figure:
    """A panel per per-step metric (``loss``, ``code_loss``, ``dev_loss`` where logged), a line
    per training job; ``curves`` is ``{job: {metric: [(step, value)]}}``. Saves the PNG."""
    names = [n for n in TRAINING_METRICS if any(c.get(n) for c in curves.values())]
    if not names:
        raise ValueError(f"{path}: no training curve to chart")
    figure, axes = _grid(len(names), 4.2, 3.0)
    for ax, name in zip(axes, names):
        for i, (job, metrics) in enumerate(curves.items()):
            points = metrics.get(name) or []
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=job, color=f"C{i % 10}",
                        marker="." if len(points) < 30 else None, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    figure.suptitle(title or "training curves (per optimizer step)")
    return _save(figure, path)


def _save(figure: Figure, path: str | Path) -> Figure:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)  # constrained layout: the panels and the title fit
    return figure


def training_curves(run_files: dict[str, Path]) -> Curves:
    """``{job: run pointer file}`` -> the jobs' per-step :data:`TRAINING_METRICS` from MLflow;
    jobs whose run file is missing are left out."""
    curves = {}
    for job, run_file in run_files.items():
        if not Path(run_file).is_file():
            continue
        saved = read_run_file(run_file)
        found = {name: metric_history(saved["uri"], saved["run_id"], name)
                 for name in TRAINING_METRICS}
        curves[job] = {name: points for name, points in found.items() if points}
    return curves


def comparison_charts(folder: Path, metrics: dict[str, dict[str, float]],
                      run_files: dict[str, Path], title: str = "") -> list[Path]:
    """A comparison's pictures in ``folder``: ``metrics.png`` and, when training jobs logged
    per-step metrics, ``training.png``. Returns the paths written."""
    written = [folder / METRICS_PNG]
    metric_chart(metrics, written[0], title=title)
    curves = training_curves(run_files)
    if any(curves.values()):
        written.append(folder / TRAINING_PNG)
        training_chart(curves, written[1])
    return written
