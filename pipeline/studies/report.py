"""``ddpt report``'s page: one self-contained HTML file from a finished output folder, read from
its files only (no Ray, no model, no MLflow server; images inlined as base64 PNGs, CSS inline,
no external URL).

A comparison folder (``ddpt run``, ``ddpt sample``, ``ddpt evaluate``) needs ``metrics.json``
and ``samples.jsonl``; the page shows the configuration, the metrics table, every picture under
``charts/``, ``interpret/`` and ``arness/``, and a few examples side by side (instruction,
reference, each method's generation with its test verdict where execution ran). The extra
comparisons of ``data.extra_eval`` (``<folder>/<data set>/``) get a section each. Where the
folder holds its per-task table (``task_records.csv.gz``), each method against the reference
method on the same tasks (:mod:`pipeline.studies.paired`). An experiment folder (``ddpt
experiment``) needs ``results.json``: its tables of mean ± std, its paired figures
(``paired.json``) and its charts.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import math
from pathlib import Path

import yaml

from pipeline.config import DataConfig
from pipeline.paths import OutputFolderError, writable_folder
from pipeline.scoring.results import ResultStore
from pipeline.studies.experiment_paired import PAIRED, read_paired
from pipeline.studies.paired import folder_figures, verdict, without_paired

log = logging.getLogger(__name__)

REPORT = "report.html"
COMPARISON_FILES = ("metrics.json", "samples.jsonl")
EXPERIMENT_FILE = "results.json"
PICTURE_FOLDERS = ("charts", "interpret", "arness")
HIGHER_IS_BETTER = {"bleu4", "codebleu", "meteor", "chrf", "rouge_l", "exact_match", "passed"}
LOWER_IS_BETTER = {"code_ce"}
CAPTIONS = {
    "metrics.png": "quality metrics per method (a panel each; where paired figures exist, "
                   "each method's difference to the reference with its 95% interval)",
    "training.png": "training curves: loss per optimizer step of each training job",
    "directions.png": "what the prompts changed: each method's directions per task (the manual "
                      "prompt at the origin) and their spread within and across tasks",
    "positions.png": "per context position: how far each method moved it and its nearest "
                     "token now",
}
PAIRED_COLUMNS = ("method", "metric", "difference", "95% interval", "p", "test", "tasks",
                  "seeds", "detectable", "verdict")
VERDICT_COLOURS = {"passed": "#1a7f37", "failed": "#cf222e", "timeout": "#bc4c00",
                   "error": "#bc4c00"}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #1f2328;
       padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0 1em; }
th, td { border: 1px solid #d0d7de; padding: .25em .5em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; } th { background: #f6f8fa; }
.scroll { overflow-x: auto; } .best { font-weight: bold; background: #dafbe1; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { font-size: .85em; color: #57606a; }
.example { border: 1px solid #d0d7de; border-radius: 6px; padding: .5em 1em; margin: 1em 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: .6em; }
.card { border: 1px solid #d0d7de; border-radius: 4px; padding: .3em .6em; background: #fff; }
.card h4 { margin: .2em 0; font-size: .9em; } .reference { background: #f6f8fa; }
pre { white-space: pre-wrap; word-break: break-word; font-size: .8em; margin: .3em 0; }
.verdict { color: #fff; border-radius: 3px; padding: 0 .4em; font-size: .8em; }
.muted { color: #57606a; font-size: .8em; }
"""


def require(folder: Path, names: tuple[str, ...], what: str) -> None:
    """FileNotFoundError naming the first of ``names`` missing in ``folder``."""
    for name in names:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: {folder} is not a finished "
                                    f"{what} (run it to the end, or --resume it)")


def write_report(folder: str | Path, path: str | Path | None = None, examples: int = 4) -> Path:
    """Write the page for ``folder`` to ``path`` (default ``<folder>/report.html``); where it
    goes is checked before anything is read."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: " + ("a file, not an output folder" if folder.exists()
                                                 else "no such output folder"))
    path = Path(path) if path else folder / REPORT
    if path.is_dir():
        raise OutputFolderError(f"{path} is a folder: --report names the page's file")
    writable_folder(path.parent)
    page = build_report(folder, examples)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def build_report(folder: Path, examples: int = 4) -> str:
    """The HTML page of an experiment folder or of a comparison folder and its extra ones."""
    if (folder / EXPERIMENT_FILE).is_file() or (folder / "experiment.yaml").is_file():
        require(folder, (EXPERIMENT_FILE,), "`ddpt experiment` output")
        body = _experiment_section(folder)
    else:
        require(folder, COMPARISON_FILES, "comparison (`ddpt run`, `sample` or `evaluate`)")
        config = _config(folder)
        extra = DataConfig(**(config.get("data") or {})).extra_sets
        for name in extra:
            require(folder / name, COMPARISON_FILES, f"comparison on {name}")
        body = _comparison_section(folder, config, examples)
        body += "".join(_comparison_section(folder / name, _config(folder / name), examples)
                        for name in extra)
    title = f"DDPT report: {folder.name}"
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{_e(title)}</h1><p class=\"muted\">{_e(str(folder))}</p>{body}</body></html>\n")


def _e(text: object) -> str:
    """HTML-escaped text; a character UTF-8 cannot hold (a lone surrogate from a program's
    message or a data file) is shown as its escape (``\\udcff``), as samples.jsonl stores it."""
    return html.escape(str(text).encode("utf-8", "backslashreplace").decode("utf-8"))


def _config(folder: Path) -> dict:
    """The folder's resolved configuration as a plain dict ({} without config.yaml)."""
    path = folder / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _comparison_section(folder: Path, config: dict, examples: int) -> str:
    metrics = json.loads((folder / "metrics.json").read_text())
    records = ResultStore(folder / "samples.jsonl").by_method()
    data, model = config.get("data") or {}, config.get("model") or {}
    heading = " / ".join(str(x) for x in (data.get("dataset"), data.get("eval_split")) if x)
    facts = {"model": model.get("name"), "examples": len({r["id"] for rs in records.values()
                                                          for r in rs}),
             "methods": ", ".join(metrics), "train steps": (config.get("train") or {}).get(
                 "steps"), "folder": folder.name}
    facts_html = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in facts.items()
                         if v not in (None, ""))
    return (f"<section><h2>{_e(heading or folder.name)}</h2><ul>{facts_html}</ul>"
            f"<h3>Metrics</h3>{metrics_table(without_paired(metrics))}{_paired(folder)}"
            f"<h3>Pictures</h3>{_pictures(folder)}"
            f"<h3>Examples</h3>{_examples(folder, metrics, records, examples)}</section>")


def _paired(folder: Path) -> str:
    """Each method against the reference, from the folder's per-task table (nothing without
    one, or with one method)."""
    found = folder_figures(folder)
    if not found or not found[1]:
        return ""
    reference, figures = found
    head = "".join(f"<th>{name}</th>" for name in PAIRED_COLUMNS)
    rows = []
    for method, by_metric in figures.items():
        for metric, f in by_metric.items():
            interval = "n/a" if math.isnan(f.low) else f"[{f.low:+.3f}, {f.high:+.3f}]"
            cells = (method, metric, f"{f.difference:+.3f}", interval, f"{f.p_value:.2g}",
                     f.test, f.n_tasks, f.n_seeds,
                     "none" if math.isinf(f.detectable) else f"{f.detectable:.3f}", verdict(f))
            marked = ' class="best"' if f.decided() else ""
            rows.append("<tr>" + "".join(f"<td{marked}>{_e(c)}</td>" for c in cells) + "</tr>")
    return (f"<h3>Paired against {_e(reference)}</h3><p class=\"muted\">Method minus "
            f"{_e(reference)} on the same tasks: 95% paired bootstrap interval; p from McNemar's "
            "exact test (pass@1, one seed), the sign-flip test (code_ce) or the bootstrap "
            "(several seeds); detectable: the smallest difference these tasks find 4 times in 5 "
            "(docs/statistics.md). Marked: the interval excludes 0 and p &lt;= 0.05.</p>"
            f"<div class=\"scroll\"><table><tr>{head}</tr>{''.join(rows)}</table></div>")


def _format(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "–"
    return f"{value:.4g}" if isinstance(value, (int, float)) else _e(value)


def _best(name: str, values: list) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(set(numbers)) < 2 or not (name in HIGHER_IS_BETTER or name.startswith("pass_at")
                                     or name in LOWER_IS_BETTER):
        return None  # nothing to tell apart, or no known direction
    return min(numbers) if name in LOWER_IS_BETTER else max(numbers)


def metrics_table(metrics: dict[str, dict[str, float]], std: dict | None = None) -> str:
    """``{method: {metric: value}}`` as an HTML table, a row per method; the best value of a
    metric with a known direction is marked; ``std`` (same shape) adds ``± std``."""
    names = list(dict.fromkeys(n for values in metrics.values() for n in values))
    best = {n: _best(n, [v.get(n) for v in metrics.values()]) for n in names}
    head = "".join(f"<th>{_e(n)}</th>" for n in names)
    rows = []
    for method, values in metrics.items():
        cells = []
        for name in names:
            value = values.get(name, "")
            spread = (std or {}).get(method, {}).get(name)
            text = _format(value) + (f" ± {_format(spread)}" if spread else "")
            marked = best[name] is not None and value == best[name]
            cells.append(("<td class=\"best\">" if marked else "<td>") + f"{text}</td>")
        rows.append(f"<tr><td>{_e(method)}</td>{''.join(cells)}</tr>")
    return (f"<div class=\"scroll\"><table><tr><th>method</th>{head}</tr>{''.join(rows)}"
            "</table></div>")


def _pictures(folder: Path) -> str:
    paths = [p for sub in PICTURE_FOLDERS for p in sorted((folder / sub).rglob("*.png"))]
    if not paths:
        return "<p class=\"muted\">no pictures in this folder</p>"
    return "".join(image(p, f"{p.relative_to(folder)}: {CAPTIONS.get(p.name, p.stem)}")
                   for p in paths)


def image(path: Path, caption: str) -> str:
    """A PNG inlined as a base64 data URI, with its caption."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img alt=\"{_e(path.name)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _examples(folder: Path, metrics: dict, records: dict[str, list[dict]], count: int) -> str:
    """The first ``count`` examples (the first method's order): the task, the reference and
    each method's generation with its verdict."""
    by_method = {m: {str(r["id"]): r for r in records.get(m, [])} for m in metrics}
    first = next((m for m in metrics if by_method[m]), None)
    if first is None or count <= 0:
        return "<p class=\"muted\">no generations</p>"
    ids = list(by_method[first])[:count]
    tasks = _tasks(folder, [by_method[first][i] for i in ids])
    blocks = []
    for example_id in ids:
        record = by_method[first][example_id]
        task = tasks.get(example_id, {})
        cards = [_card("reference", record.get("reference", ""), None, "reference")]
        cards += [_card(m, r.get("generation", ""), r) if (r := by_method[m].get(example_id))
                  else _card(m, "(not generated)", None) for m in metrics]
        given = f"<pre>{_e(task['input'])}</pre>" if task.get("input") else ""
        blocks.append(f"<div class=\"example\"><h4>{_e(example_id)}</h4>"
                      f"<p>{_e(task.get('instruction', '(instruction not stored)'))}</p>{given}"
                      f"<div class=\"grid\">{''.join(cards)}</div></div>")
    return "".join(blocks)


def _card(title: str, code: str, record: dict | None, kind: str = "") -> str:
    """One generation (or the reference) with its verdict and the sandbox's message."""
    verdict, extra = "", ""
    if record is not None and "status" in record:
        status = str(record["status"])
        colour = VERDICT_COLOURS.get(status, "#57606a")
        verdict = f" <span class=\"verdict\" style=\"background:{colour}\">{_e(status)}</span>"
        if record.get("exec_message"):
            extra += f"<div class=\"muted\">{_e(str(record['exec_message'])[:300])}</div>"
    if record is not None and isinstance(record.get("code_ce"), (int, float)):
        extra += f"<div class=\"muted\">code_ce {record['code_ce']:.3f}</div>"
    return (f"<div class=\"card {kind}\"><h4>{_e(title)}{verdict}</h4>{extra}"
            f"<pre>{_e(code)}</pre></div>")


def _tasks(folder: Path, records: list[dict]) -> dict[str, dict]:
    """id -> {"instruction", "input"}: from the records (``ddpt run`` stores them), else read
    from the data the folder's config.yaml names (older folders); {} if that fails."""
    if all("instruction" in r for r in records):
        return {str(r["id"]): r for r in records}
    from pipeline.config import ConfigError, RunConfig
    from pipeline.data.loaders import DataError
    from pipeline.data.splits import eval_examples

    try:
        examples = eval_examples(RunConfig.load(folder / "config.yaml").data)
    except (OSError, ConfigError, DataError) as err:
        log.warning("%s: the instructions are not in samples.jsonl, nor readable (%s)",
                    folder, err)
        return {}
    return {str(e.id): {"instruction": e.instruction, "input": e.input} for e in examples}


def _experiment_paired(folder: Path, eval_set: str) -> str:
    """An experiment's paired figures of one evaluation set (``paired.json``), pooled over
    seeds and each seed's."""
    path = folder / PAIRED
    found = [row for row in read_paired(path) if row.eval_set == eval_set] if path.is_file() \
        else []
    if not found:
        return ""
    seeds = sorted({s for row in found for s in row.seeds})
    head = "".join(f"<th>{_e(n)}</th>" for n in ("method", "against", "metric", "pooled",
                                                 *(f"seed {s}" for s in seeds), "verdict"))
    rows = []
    for row in found:
        for metric, pooled in row.pooled.items():
            cells = (row.method, row.reference, metric, pooled.format(),
                     *(row.seeds.get(s, {})[metric].format() if metric in row.seeds.get(s, {})
                       else "" for s in seeds), verdict(pooled))
            rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
        if row.error:
            rows.append(f"<tr><td>{_e(row.method)}</td><td>{_e(row.reference)}</td>"
                        f"<td colspan=\"{len(seeds) + 3}\">{_e(row.error)}</td></tr>")
    return (f"<h4>{_e(eval_set)}: paired against the reference on the same tasks (pooled: "
            "tasks x seeds bootstrap; docs/statistics.md)</h4>"
            f"<div class=\"scroll\"><table><tr>{head}</tr>{''.join(rows)}</table></div>")


def _experiment_section(folder: Path) -> str:
    rows = json.loads((folder / EXPERIMENT_FILE).read_text())
    sections, pictures = [], []
    for eval_set in dict.fromkeys(r["eval_set"] for r in rows):
        chosen = [r for r in rows if r["eval_set"] == eval_set]
        names = [f"{r['arm']}/{r['method']} ({r['seeds']} seed{'s' * (r['seeds'] != 1)})"
                 for r in chosen]
        means = {name: r["mean"] for name, r in zip(names, chosen)}
        std = {name: r["std"] for name, r in zip(names, chosen)}
        sections.append(f"<h3>{_e(eval_set)}: mean ± std over seeds</h3>"
                        f"{metrics_table(means, std)}{_experiment_paired(folder, eval_set)}")
        chart = folder / "charts" / f"{eval_set}_metrics.png"
        if chart.is_file():
            pictures.append(image(chart, f"{chart.relative_to(folder)}: every metric per "
                                  "arm/method, mean ± std over seeds"))
    note = ("<p class=\"muted\">Each run's own page: <code>ddpt report --output "
            f"{_e(folder)}/&lt;data set&gt;/&lt;arm&gt;/seed&lt;k&gt;</code></p>")
    return (f"<section><h2>Experiment</h2>{''.join(sections)}<h3>Pictures</h3>"
            f"{''.join(pictures) or '<p class=muted>no charts</p>'}{note}</section>")
