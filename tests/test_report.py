"""The pictures (quality metrics with intervals or error bars, training curves, the prompts'
directions) and `ddpt report`'s
self-contained page, from a real run of the pipeline on the tiny model in this process."""
from __future__ import annotations

import base64
import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.container import BarContainer, ErrorbarContainer
from mlflow import MlflowClient

from helpers import EXAMPLES, make_lm
from pipeline.cli import main
from pipeline.config import PRESETS, RunConfig
from pipeline.generation.sampler import BatchSampler
from pipeline.scoring.diversity import pairwise_spread
from pipeline.scoring.results import ResultStore
from pipeline.scoring.stats import as_metrics, pass_rate_difference
from pipeline.scoring.task_records import FILENAME, compare_to_reference, read_table
from pipeline.studies.charts import infer_reference, metric_chart, quality_metrics, training_chart
from pipeline.studies.experiment import aggregate, experiment_charts
from pipeline.studies.interpret import PromptSet, interpret
from pipeline.studies.prompt_pictures import MAX_ROWS, direction_map, position_map, short
from pipeline.studies.report import build_report, write_report
from pipeline.tracking import child_runs
from pipeline.training.loop import train_local

PNG = b"\x89PNG\r\n\x1a\n"
INTERPRET_PICTURES = ("interpret/directions.png", "interpret/positions.png")
METRICS = {"manual": {"bleu4": 0.1, "code_ce": 2.5, "unused": float("nan")},
           "ddpt": {"bleu4": 0.3, "code_ce": 2.0, "unused": float("nan")}}


def panels(figure) -> dict[str, object]:
    return {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}


def test_metric_chart_draws_a_panel_per_quality_metric_and_a_bar_per_method(tmp_path):
    figure = metric_chart(METRICS, tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:8] == PNG
    found = panels(figure)
    assert list(found) == ["code_ce (lower is better)", "bleu4"]  # the all-NaN one left out
    ax = found["code_ce (lower is better)"]
    assert [p.get_height() for p in ax.patches] == [2.5, 2.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["manual", "ddpt"]
    assert not ax.containers[0].errorbar  # one seed: no error bars


def test_the_chart_leaves_out_timings_counts_and_an_all_zero_exact_match(tmp_path):
    values = {"pass_at_5": 0.4, "pass_at_1": 0.2, "bleu4": 0.1, "meteor": 0.3, "chrf": 30.0,
              "exact_match": 0.0, "prompt_seconds": 3.0, "generate_seconds": 90.0,
              "prompt_share": 0.03, "passed": 2, "total": 10, "arness_local_at_1": 0.5,
              "prompt_spread_per_condition": 0.1, "pass_at_1_diff_detectable": 0.3}
    metrics = {"manual": values, "ddpt": {**values, "pass_at_1": 0.3}}
    assert quality_metrics(metrics) == ["pass_at_1", "pass_at_5", "bleu4", "chrf", "meteor"]
    assert list(panels(metric_chart(metrics, tmp_path / "q.png"))) == [
        "pass_at_1", "pass_at_5", "bleu4", "chrf", "meteor"]
    metrics["ddpt"]["exact_match"] = 0.1  # one method matches once: now it says something
    assert quality_metrics(metrics)[-1] == "exact_match"


def test_paired_figures_become_a_forest_panel_with_each_methods_interval(tmp_path):
    """Each method's difference to the reference (stats.py's figures, as metrics.json holds
    them) is drawn with its 95% interval; a metric without figures keeps its bars."""
    rng = np.random.default_rng(0)
    outcomes = {m: (rng.random(40) < rate).astype(float)
                for m, rate in (("manual", 0.1), ("prompt_tuning", 0.2), ("ddpt", 0.5))}
    metrics = {m: {"pass_at_1": o.mean(), "bleu4": 0.2} for m, o in outcomes.items()}
    figures = {}
    for method in ("prompt_tuning", "ddpt"):
        figures[method] = pass_rate_difference(outcomes[method], outcomes["manual"],
                                               resamples=500)
        metrics[method].update(as_metrics(figures[method]))
    assert infer_reference(metrics, "pass_at_1") == "manual"
    found = panels(metric_chart(metrics, tmp_path / "f.png"))
    assert list(found) == ["pass_at_1: method − manual", "bleu4"]
    ax = found["pass_at_1: method − manual"]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        f"manual (ref.)  {outcomes['manual'].mean():.3g}",
        f"prompt_tuning  {outcomes['prompt_tuning'].mean():.3g}",
        f"ddpt  {outcomes['ddpt'].mean():.3g}"]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    for (row, method), container in zip(enumerate(("prompt_tuning", "ddpt"), start=1), bars):
        data, _, (spans,) = container.lines
        assert data.get_xdata().tolist() == [figures[method].difference]
        [[(low, y0), (high, y1)]] = spans.get_segments()
        assert (low, high) == pytest.approx((figures[method].low, figures[method].high))
        assert y0 == y1 == row
    assert figures["ddpt"].low > 0  # the test data decide: the interval clears zero
    assert [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--"] == [0]
    assert f"p={figures['ddpt'].p_value:.2g}" in [t.get_text() for t in ax.texts]
    assert isinstance(found["bleu4"].containers[0], BarContainer)
    # an experiment's chart: seed means (intervals=False), bars only
    assert isinstance(panels(metric_chart(metrics, tmp_path / "e.png", intervals=False))[
        "pass_at_1"].containers[0], BarContainer)


def test_error_bars_are_mean_plus_minus_std(tmp_path):
    """Several seeds: aggregated rows of a results file, charted with their standard
    deviation (the experiment's chart)."""
    results = [{"eval_set": "mbpp", "arm": arm, "method": "ddpt_ddim", "seed": seed,
                "metrics": {"pass_at_1": value, "code_ce": 3.0 - value}}
               for arm, values in (("a", (0.1, 0.3)), ("b", (0.5, 0.5))) for seed, value in
               enumerate(values)]
    rows = aggregate(results)
    [path] = experiment_charts(rows, tmp_path)
    assert path == tmp_path / "mbpp_metrics.png" and path.read_bytes()[:8] == PNG
    figure = metric_chart({f"{r.arm}/{r.method}": r.mean for r in rows}, tmp_path / "e.png",
                          std={f"{r.arm}/{r.method}": r.std for r in rows})
    ax = panels(figure)["pass_at_1"]
    [bars] = [c for c in ax.containers if isinstance(c, BarContainer)]
    _, _, (lines,) = bars.errorbar.lines
    spans = [(seg[0][1], seg[1][1]) for seg in lines.get_segments()]
    expected_std = [rows[0].std["pass_at_1"], 0.0]
    assert expected_std[0] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    for (low, high), row, std in zip(spans, rows, expected_std):
        assert low == pytest.approx(row.mean["pass_at_1"] - std)
        assert high == pytest.approx(row.mean["pass_at_1"] + std)


def test_training_chart_draws_a_line_per_job(tmp_path):
    curves = {"ddpt": {"loss": [(1, 3.0), (2, 2.5)], "code_loss": [(1, 2.9), (2, 2.4)]},
              "prompt_tuning": {"loss": [(1, 3.0), (2, 2.0)]}}
    figure = training_chart(curves, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG
    found = panels(figure)
    assert list(found) == ["loss", "code_loss"]
    lines = {line.get_label(): line.get_ydata().tolist() for line in found["loss"].lines}
    assert lines == {"ddpt": [3.0, 2.5], "prompt_tuning": [3.0, 2.0]}


def test_the_direction_map_has_a_point_per_task_and_method_and_is_deterministic(tmp_path):
    n, d = 3, 4
    generator = torch.Generator().manual_seed(0)
    plane = torch.linalg.qr(torch.randn(n * d, 2, generator=generator))[0]  # (n*d, 2)

    def in_plane(count: int) -> torch.Tensor:  # directions the 2-D projection keeps whole
        return (torch.randn(count, 2, generator=generator) @ plane.T).reshape(count, n, d)

    ddpt = PromptSet(in_plane(6).reshape(3, 2, n, d), tasks=["a", "b", "c"], label="ddpt_ddim")
    tuned = PromptSet(in_plane(1)[None], label="prompt_tuning")
    prompts = {"prompt_tuning": tuned, "ddpt_ddim": ddpt}
    first = direction_map(prompts, tmp_path / "1.png", token_norm=1.0)
    again = direction_map(prompts, tmp_path / "2.png", token_norm=1.0)
    assert first.path.read_bytes()[:8] == PNG
    assert first.path.read_bytes() == again.path.read_bytes()
    assert {k: v.shape for k, v in first.coords.items()} == {
        "manual": (1, 1, 2), "prompt_tuning": (1, 1, 2), "ddpt_ddim": (3, 2, 2)}
    assert first.coords["manual"].tolist() == [[[0.0, 0.0]]]  # the manual prompt: delta = 0
    for label, prompt_set in prompts.items():
        np.testing.assert_array_equal(first.coords[label], again.coords[label])
        lengths = prompt_set.directions.flatten(2).norm(dim=-1).double().numpy()
        np.testing.assert_allclose(np.linalg.norm(first.coords[label], axis=-1), lengths,
                                   rtol=1e-6)
    assert first.shares.sum() == pytest.approx(1.0)
    every = np.concatenate([xy.reshape(-1, 2) for xy in first.coords.values()])
    assert (every.sum(0) >= 0).all()  # the axes' signs: the points lie on their positive side
    assert first.spreads == {"prompt_tuning": {}, "ddpt_ddim": {
        "within": pytest.approx(np.mean([pairwise_spread(t) for t in ddpt.directions])),
        "across": pytest.approx(pairwise_spread(ddpt.directions[:, 0]))}}
    assert set(first.local) == {"ddpt_ddim"} and first.local["ddpt_ddim"].shape == (3, 2, 2)
    mean = ddpt.directions.flatten(2).mean((0, 1))
    assert first.cosines == {("prompt_tuning", "ddpt_ddim"): pytest.approx(F.cosine_similarity(
        tuned.directions.flatten(), mean, dim=0).item(), abs=1e-6)}


def test_the_position_map_names_the_token_a_moved_position_now_sits_on(tmp_path):
    lm = make_lm("tiny-llama")
    context = lm.context_embedding().float()  # (n, d)
    table = lm.model.get_input_embeddings().weight.float().detach()
    target = next(t for t in range(len(table)) if t not in lm.template.context_ids
                  and lm.tokenizer.decode([t]).strip())
    delta = torch.zeros(3, 1, *context.shape)  # 3 tasks, one draw each
    delta[:, 0, 1] = table[target] - context[1]  # every task: position 1 is now that token
    delta[1:, 0, 2] = table[target] - context[2]  # two tasks of three: position 2 too
    delta[0, 0, -1] = 0.5 * context[-1]  # the last position moves, and shows among the rows
    drawn = position_map(lm, {"ddpt": PromptSet(delta, tasks=["a", "b", "c"])},
                         tmp_path / "p.png")
    assert drawn.path.read_bytes()[:8] == PNG
    name = short(lm.tokenizer.decode([target]))
    assert drawn.nearest[0] == ["="] and drawn.nearest[1] == [name]
    assert drawn.nearest[2] == [f"{name} 2/3"]
    token_norm = lm.mean_token_norm()
    assert drawn.moved[0, 0] == 0 and drawn.cosine[0, 0] == pytest.approx(1.0)
    assert drawn.cosine[1, 0] == pytest.approx(F.cosine_similarity(table[target], context[1],
                                                                   dim=0).item(), abs=1e-5)
    assert drawn.moved[1, 0] == pytest.approx(
        (table[target] - context[1]).norm().item() / token_norm, rel=1e-5)
    n = lm.context_length  # the tiny tokenizer's context is long: the rows are capped
    assert n > MAX_ROWS and len(drawn.rows) == MAX_ROWS and {1, 2, n - 1} <= set(drawn.rows)
    assert drawn.rows == sorted(drawn.rows)


@pytest.mark.parametrize("condition, prompts, per_task", [
    ("instruction", "shared", True),  # a conditional model: a prompt per task
    ("none", "per_example", True),    # noise per example
    ("none", "shared", False),        # one prompt for all: noise draws of it
])
def test_interpret_shows_the_directions_each_method_used(tmp_path, condition, prompts,
                                                         per_task):
    lm = make_lm("tiny-llama")
    config = RunConfig.from_dict(PRESETS["smoke"]).with_overrides([
        "train.steps=2", "train.batch_size=3", f"denoiser.condition={condition}",
        f"sample.prompts={prompts}"])
    config.prompt = lm.template.config  # the template the tiny LM was built with
    checkpoints = {}
    for method in ("ddpt", "prompt_tuning"):
        job = config.with_overrides([f"train.method={method}"])
        train_local(job, lm, EXAMPLES, checkpoint_dir=tmp_path / method, progress=False)
        checkpoints[method] = tmp_path / method
    folder = tmp_path / "interpret"
    done = interpret(config, checkpoints, lm, folder, EXAMPLES,
                     ["manual", "prompt_tuning", "ddpt_ddim"], num_tasks=4, draws=3)
    assert set(done.folders) == {"ddpt", "prompt_tuning"}
    assert all((f / "nearest_tokens.json").is_file() for f in done.folders.values())
    assert done.pictures == [folder / "directions.png", folder / "positions.png"]
    assert all(p.read_bytes()[:8] == PNG for p in done.pictures)
    n, d = lm.context_length, lm.hidden_size
    assert done.prompts["prompt_tuning"].directions.shape == (1, 1, n, d)  # nothing random
    ddpt = done.prompts["ddpt"]
    assert ddpt.label == "ddpt_ddim" and ddpt.directions.shape == (4 if per_task else 1, 3, n, d)
    assert ddpt.tasks == ([e.id for e in EXAMPLES[:4]] if per_task else None)
    used = BatchSampler(config, checkpoints, lm).directions("ddpt_ddim", EXAMPLES[:4])
    torch.testing.assert_close(ddpt.directions[:, 0], used[:len(ddpt.directions)].float())
    assert not torch.allclose(ddpt.directions[:, 0], ddpt.directions[:, 1])  # other noise


def test_a_folder_without_metrics_is_refused_by_name(tmp_path, capsys):
    (tmp_path / "samples.jsonl").write_text("")
    assert main(["report", "--output", str(tmp_path)]) == 2
    assert f"{tmp_path / 'metrics.json'} is missing" in capsys.readouterr().err


def test_lone_surrogates_are_shown_escaped_and_the_page_is_kept(tmp_path, capsys):
    """chr(0xDCFF) in a generation, a sandbox message, a reference or an instruction (as
    samples.jsonl reads them back): the page is written, valid UTF-8, each shown as \\udcff."""
    odd = chr(0xDCFF)
    RunConfig().with_overrides(["data.extra_eval=[]"]).save(tmp_path / "config.yaml")
    (tmp_path / "metrics.json").write_text(json.dumps({"manual": {"pass_at_1": 0.0}}))
    ResultStore(tmp_path / "samples.jsonl").append([{
        "id": "t0", "method": "manual", "instruction": f"say {odd}", "input": "",
        "generation": f"print('{odd}')", "reference": f"x = '{odd}'", "status": "error",
        "exec_message": f"ValueError: {odd}"}])
    assert main(["report", "--output", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_bytes().decode("utf-8")
    for shown in ("say \\udcff", "print(&#x27;\\udcff&#x27;)", "x = &#x27;\\udcff&#x27;",
                  "ValueError: \\udcff"):
        assert shown in page, shown
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.html")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A whole `ddpt run` in this process: tiny model, local training and sampling, MBPP with
    HumanEval as the extra comparison (both executed: verdicts per example)."""
    out = tmp_path_factory.mktemp("report") / "run"
    code = main(["run", "--preset", "smoke", "--output", str(out), "--no-progress",
                 "--set", "distributed.backend=local", "--set", "pool.backend=local",
                 "--set", "train.steps=3", "--set", "data.dataset=mbpp",
                 "--set", "data.max_eval_examples=3", "--set", "data.extra_eval=[humaneval]",
                 "--set", "data.max_extra_eval_examples=2"])
    assert code == 0
    return out


def images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in
            re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


@pytest.mark.slow
def test_a_run_writes_its_pictures_and_logs_them_to_the_comparison(finished_run):
    for folder in (finished_run, finished_run / "humaneval"):
        for picture in ("charts/metrics.png", "charts/training.png", *INTERPRET_PICTURES):
            assert (folder / picture).read_bytes()[:8] == PNG, folder / picture
    saved = json.loads((finished_run / "mlflow_comparison.json").read_text())
    client = MlflowClient(saved["uri"])
    logged = {a.path for folder in ("charts", "interpret")
              for a in client.list_artifacts(saved["run_id"], folder)}
    assert {"charts/metrics.png", "charts/training.png", *INTERPRET_PICTURES} <= logged


@pytest.mark.slow
def test_the_report_is_one_self_contained_page(finished_run, capsys):
    assert main(["report", "--output", str(finished_run), "--examples", "2"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == finished_run / "report.html"
    page = path.read_text()
    assert "http://" not in page and "https://" not in page
    assert re.findall(r'src="([^"]{0,22})', page) == ["data:image/png;base64,"] * page.count(
        "src=")
    pictures = images(page)
    assert len(pictures) == 8 and all(p[:8] == PNG for p in pictures)  # 4 per comparison
    sections = page.split("<section>")[1:]
    assert [re.search("<h2>(.*?)</h2>", s).group(1) for s in sections] == [
        "mbpp / test", "humaneval / test"]
    for folder, section in zip((finished_run, finished_run / "humaneval"), sections):
        metrics = json.loads((folder / "metrics.json").read_text())
        records = ResultStore(folder / "samples.jsonl").by_method()
        for method, values in metrics.items():
            row = re.search(rf"<tr><td>{method}</td>(.*?)</tr>", section).group(1)
            assert f"{values['code_ce']:.4g}" in row and f"{values['pass_at_1']:.4g}" in row
            first = sorted(records[method], key=lambda r: str(r["id"]))[0]
            assert first["status"] in ("passed", "failed", "timeout", "error")
        example = records["manual"][0]
        block = section[section.index(f"<h4>{example['id']}</h4>"):]
        block = block[:block.index('<div class="example">') if '<div class="example">' in
                      block else len(block)]
        assert html.escape(example["instruction"][:30]) in block
        assert block.count('class="verdict"') == len(metrics)  # each method's verdict


@pytest.mark.slow
def test_a_run_pairs_every_method_with_the_reference(finished_run, capsys):
    """The per-task table round-trips the run's records; metrics.json, the methods' MLflow
    runs, `ddpt compare` and the report hold the figures computed from it."""
    for folder in (finished_run, finished_run / "humaneval"):
        rows = read_table(folder / FILENAME)
        records = ResultStore(folder / "samples.jsonl").load()
        assert sorted((r.method, r.task_id, r.status, r.code_ce, r.cases_passed, r.cases_total)
                      for r in rows) == sorted(
            (r["method"], str(r["id"]), r["status"], r["code_ce"], r["cases_passed"],
             r["cases_total"]) for r in records)
        figures = compare_to_reference(rows, "manual")
        metrics = json.loads((folder / "metrics.json").read_text())
        assert set(figures) == set(metrics) - {"manual"}
        assert metrics["manual"]["code_ce_diff"] == 0  # the reference against itself
        saved = json.loads((folder / "mlflow_comparison.json").read_text())
        logged = {run.data.tags["ddpt.method"]: run.data.metrics
                  for run in child_runs(saved["uri"], saved["run_id"])
                  if run.data.tags.get("ddpt.role") == "method"}
        for method, by_metric in figures.items():
            assert set(by_metric) == {"pass_at_1", "code_ce"}
            for figure in by_metric.values():
                for name, value in as_metrics(figure).items():
                    assert metrics[method][name] == pytest.approx(value, nan_ok=True), name
                    assert logged[method][name] == pytest.approx(value, nan_ok=True), name
        client = MlflowClient(saved["uri"])
        assert FILENAME in {a.path for a in client.list_artifacts(saved["run_id"])}
    assert main(["compare", "--output", str(finished_run)]) == 0
    printed = capsys.readouterr().out
    assert "paired against manual" in printed
    for method, by_metric in compare_to_reference(read_table(finished_run / FILENAME),
                                                  "manual").items():
        for metric, figure in by_metric.items():
            assert re.search(rf"^{method} +{metric} +{re.escape(figure.format())}", printed,
                             re.MULTILINE), (method, metric)
    assert main(["compare", "--output", str(finished_run), "--reference", "nosuch"]) == 2
    assert "--reference: 'nosuch' is not one of the compared methods" in capsys.readouterr().err
    page = build_report(finished_run)
    assert page.count("<h3>Paired against manual</h3>") == 2  # MBPP and HumanEval


@pytest.mark.slow
def test_a_report_of_an_unfinished_folder_names_the_missing_file(finished_run, tmp_path,
                                                                 capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns(
        "mlartifacts", "ddpt", "prompt_tuning", "report.html"))
    (copy / "humaneval" / "metrics.json").unlink()  # the extra comparison did not finish
    assert main(["report", "--output", str(copy)]) == 2
    assert f"{copy / 'humaneval' / 'metrics.json'} is missing" in capsys.readouterr().err
    (copy / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"metrics\.json is missing"):
        write_report(copy)
    assert not (copy / "report.html").exists()


def test_an_experiment_report_shows_mean_and_std(tmp_path):
    results = [{"eval_set": "mbpp", "arm": "a", "method": "ddpt_ddim", "seed": s,
                "metrics": {"pass_at_1": v}} for s, v in enumerate((0.25, 0.75))]
    rows = aggregate(results)
    (tmp_path / "results.json").write_text(json.dumps([r.__dict__ for r in rows]))
    experiment_charts(rows, tmp_path / "charts")
    page = build_report(tmp_path)
    assert "a/ddpt_ddim (2 seeds)" in page and "0.5 ± 0.3536" in page
    assert len(images(page)) == 1
