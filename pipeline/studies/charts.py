"""Pictures of a comparison, as PNGs: the quality metrics per method and the training curves (a
line per training job, a panel per per-step metric, read from the jobs' MLflow runs).

The metrics chart has one panel per quality metric (:func:`quality_metrics`: pass@k, ``code_ce``
and the text metrics; no timings, counts or always-zero ``exact_match``). Where ``metrics.json``
holds a metric's paired figures against the reference method (``pass_at_1_diff``,
``..._diff_low``, ``..._diff_high``, ``..._diff_p``: :func:`pipeline.scoring.stats.metric_names`)
the panel is a forest plot: a row per method, its difference to the reference with the 95%
interval, a zero line, the reference on the top row. Otherwise it is a bar per method (mean ±
standard deviation where several seeds ran: an experiment's chart).

Figures are built on :class:`matplotlib.figure.Figure` without pyplot: nothing global is kept
open, and the returned figure lets a caller (a test) read back the bars and the intervals.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from matplotlib.figure import Figure

from pipeline.scoring.stats import metric_names
from pipeline.tracking import metric_history, read_run_file

CHARTS = "charts"  # the folder, in a comparison's (or an experiment's) output
METRICS_PNG, TRAINING_PNG = "metrics.png", "training.png"
TRAINING_METRICS = ("loss", "code_loss", "dev_loss")  # per-step metrics of a training job
# The quality metrics, in panel order after pass@k; the rest of metrics.json (seconds, counts,
# AR-ness, prompt spread, the paired figures themselves) is in the table, not the chart.
QUALITY = ("code_ce", "bleu4", "codebleu", "chrf", "rouge_l", "meteor", "exact_match")
LOWER_IS_BETTER = frozenset({"code_ce"})
PASS_AT = re.compile(r"pass_at_(\d+)")
COLUMNS = 4  # panels per row
Metrics = dict[str, dict[str, float]]  # {method: {metric: value}}, metrics.json's layout
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


def quality_metrics(means: Metrics) -> list[str]:
    """The metrics to chart, in order: ``pass_at_<k>`` by k, then :data:`QUALITY`'s; each only
    where some method has a finite value, ``exact_match`` only where one is non-zero (on code
    it is nearly always 0, and a panel of zeros says nothing)."""
    present = {n for values in means.values() for n, v in values.items() if _finite(v)}
    passes = sorted((n for n in present if PASS_AT.fullmatch(n)),
                    key=lambda n: int(PASS_AT.fullmatch(n).group(1)))
    names = passes + [n for n in QUALITY if n in present]
    if "exact_match" in names and not any(v.get("exact_match") for v in means.values()
                                          if _finite(v.get("exact_match"))):
        names.remove("exact_match")
    return names


def differences(means: Metrics, metric: str) -> dict[str, tuple[float, float, float, float]]:
    """``{method: (difference, low, high, p)}`` of the methods whose paired figures for
    ``metric`` are in ``means`` (a missing low/high/p is NaN); empty where none are."""
    names = metric_names(metric)
    found = {}
    for method, values in means.items():
        if _finite(values.get(names["difference"])):
            found[method] = tuple(float(v) if _finite(v := values.get(names[key])) else math.nan
                                  for key in ("difference", "low", "high", "p_value"))
    return found


def infer_reference(means: Metrics, metric: str) -> str | None:
    """The method the paired figures of ``metric`` are relative to: the one method with the
    metric but no figures of its own, else the first whose figures are all zero (a method
    compared with itself); None when neither is found."""
    paired = differences(means, metric)
    unpaired = [m for m, v in means.items() if _finite(v.get(metric)) and m not in paired]
    if len(unpaired) == 1:
        return unpaired[0]
    itself = [m for m, (d, low, high, _) in paired.items() if d == low == high == 0]
    return itself[0] if itself else None


def metric_chart(means: Metrics, path: str | Path, std: Metrics | None = None,
                 title: str = "", *, reference: str | None = None,
                 intervals: bool = True) -> Figure:
    """A panel per quality metric (:func:`quality_metrics`) of ``means`` (``{method: {metric:
    value}}``): a forest plot of each method's difference to ``reference`` (inferred when None:
    :func:`infer_reference`) with its 95% interval where ``intervals`` and the paired figures
    exist, else a bar per method, with error bars of ``std`` (same shape: mean ± std over
    seeds) where given. Saves the PNG at ``path``."""
    names = quality_metrics(means)
    if not names:
        raise ValueError(f"{path}: no quality metric to chart (pass@k, {', '.join(QUALITY)})")
    colours = {m: f"C{i % 10}" for i, m in enumerate(means)}
    figure, axes = _grid(len(names), 3.6, 2.9)
    references = []
    for ax, name in zip(axes, names):
        found = differences(means, name) if intervals else {}
        if found:
            chosen = reference or infer_reference(means, name)
            _forest(ax, means, name, found, chosen, colours)
            references.append(chosen or "the reference")
        else:
            _bars(ax, means, name, std, colours)
    what = "quality metrics per method" + (" (mean ± std over seeds)" if std else "")
    if references:
        what += ("; forest panels: paired difference to " + " / ".join(dict.fromkeys(references))
                 + " on the same tasks, 95% bootstrap interval, p-value")
    figure.suptitle(title + "\n" + what if title else what, fontsize=10)
    return _save(figure, path)


def _bars(ax, means: Metrics, name: str, std: Metrics | None, colours: dict[str, str]) -> None:
    methods = list(means)
    values = [v if _finite(v := means[m].get(name)) else math.nan for m in methods]
    errors = None
    if std is not None:
        errors = [e if _finite(e := std.get(m, {}).get(name)) else 0.0 for m in methods]
    bars = ax.bar(range(len(methods)), values, yerr=errors, capsize=3,
                  color=[colours[m] for m in methods], error_kw={"elinewidth": 1})
    ax.bar_label(bars, fmt="%.3g", fontsize=6, padding=1)
    ax.set_title(name + (" (lower is better)" if name in LOWER_IS_BETTER else ""), fontsize=9)
    ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.margins(y=0.15)


def _forest(ax, means: Metrics, name: str, found: dict[str, tuple[float, float, float, float]],
            reference: str | None, colours: dict[str, str]) -> None:
    """Rows top to bottom: the reference at 0, then each method's difference and interval,
    labelled with the method's own value; the p-value to the right of its interval."""
    rows = ([reference] if reference in means else []) + [m for m in found if m != reference]
    for y, method in enumerate(rows):
        if method == reference and method not in found:
            ax.plot([0], [y], marker="D", color="black", markerfacecolor="white", linestyle="")
            continue
        difference, low, high, p = found[method]
        span = ([[difference - low], [high - difference]] if _finite(low) and _finite(high)
                else None)  # no interval (one task): the point alone
        ax.errorbar([difference], [y], xerr=span, fmt="o", color=colours[method], capsize=3,
                    markersize=4, elinewidth=1.2)
        if _finite(p):
            ax.annotate(f"p={p:.2g}", (high if _finite(high) else difference, y), fontsize=6,
                        xytext=(4, 2), textcoords="offset points", color="#444444")
    ax.axvline(0, color="#888888", linewidth=0.8, linestyle="--", zorder=0)
    labels = [f"{m}{' (ref.)' if m == reference else ''}  {_value(means[m].get(name))}"
              for m in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the reference on top
    better = "lower" if name in LOWER_IS_BETTER else "higher"
    ax.set_title(f"{name}: method − {reference or 'reference'}", fontsize=9)
    ax.set_xlabel(f"difference ({better} is better)", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    ax.margins(x=0.25)


def _value(value: object) -> str:
    return f"{value:.3g}" if _finite(value) else "n/a"


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


def comparison_charts(folder: Path, metrics: Metrics, run_files: dict[str, Path],
                      title: str = "", *, reference: str | None = None) -> list[Path]:
    """A comparison's pictures in ``folder``: ``metrics.png`` (paired figures relative to
    ``reference``, inferred when None) and, when training jobs logged per-step metrics,
    ``training.png``. Returns the paths written."""
    written = [folder / METRICS_PNG]
    metric_chart(metrics, written[0], title=title, reference=reference)
    curves = training_curves(run_files)
    if any(curves.values()):
        written.append(folder / TRAINING_PNG)
        training_chart(curves, written[1])
    return written
