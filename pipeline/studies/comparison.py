"""The comparison harness: every method on the same examples, scored the same way, side by side
in MLflow: a parent run (tag ``ddpt.role=comparison``) with a child run per method
(``ddpt.role=method``) and, for ``ddpt run``, per training job (``ddpt.role=train``), all with
the same metric names. The run tree and how to read it in MLflow's UI: docs/sampling.md.

``ddpt compare`` reads the table back from MLflow (:func:`comparison_table`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from mlflow import MlflowClient

from pipeline.config import ConfigError, RunConfig
from pipeline.data.example import Example, missing_tests
from pipeline.generation.sampler import METHODS, SamplerPool, method_sample_config
from pipeline.lm.frozen import FrozenCodeLM
from pipeline.scoring.execution import score_execution
from pipeline.scoring.heldout import score_method
from pipeline.scoring.results import ResultStore
from pipeline.scoring.task_records import read_table
from pipeline.studies.charts import CHARTS, comparison_charts
from pipeline.studies.interpret import interpret
from pipeline.studies.paired import (
    comparison_metrics,
    method_chains,
    without_paired,
    write_comparison_table,
)
from pipeline.tracking import (
    ROLE_TAG,
    RunTracker,
    TrackingError,
    check_tracking_uri,
    child_runs,
    open_run,
    read_run_file,
    resolve_tracking_uri,
)

log = logging.getLogger(__name__)

COMPARISON_FILE = "mlflow_comparison.json"  # {"uri", "run_id"} of the parent run


def with_tracking_uri(config: RunConfig, output: Path) -> RunConfig:
    """Pin the resolved MLflow URI, so that every job of the run (training jobs in their own
    folders included) logs into the same store; a bad URI fails here, before any work."""
    uri = resolve_tracking_uri(output, config.tracking.uri)
    check_tracking_uri(uri)
    return dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, uri=uri))


def open_comparison(config: RunConfig, output: Path, methods: list[str], *, resume: bool,
                    parent_run_id: str | None = None) -> RunTracker:
    """The comparison's parent run (itself a child of ``parent_run_id``, an experiment's, when
    given); re-attached on resume."""
    uri = resolve_tracking_uri(output, config.tracking.uri)
    return open_run(output / COMPARISON_FILE, uri, config.tracking.experiment_name(config),
                    "compare", resume=resume, role="comparison", output=output,
                    params=config.to_flat(), tags={"ddpt.methods": ",".join(methods)},
                    parent_run_id=parent_run_id)


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def sample_into(store: ResultStore, config: RunConfig, methods: list[str],
                examples: list[Example], open_pool: Callable[[], SamplerPool], *,
                progress: bool = True) -> None:
    """Generate every (method, example) the store lacks on the pool that ``open_pool`` starts
    (only when there is work); each batch is appended to the store as it finishes."""
    done = {m: store.done_ids(m) for m in methods}
    tasks = [(m, chunk) for m in methods
             for chunk in _batches([e for e in examples if e.id not in done[m]],
                                   config.eval.batch_size)]
    if not tasks:
        return
    pool = open_pool()
    try:
        pool.run(tasks, store.append, progress=progress)
    finally:
        pool.close()


def score(store: ResultStore, config: RunConfig, methods: list[str],
          examples: list[Example]) -> dict[str, dict[str, float]]:
    """Per method: the text metrics, ``code_ce`` (mean held-out cross-entropy of the reference
    code under the method's prompt), time spent sampling prompts vs generating, and, when the
    examples carry tests, execution-based ``pass_at_<k>`` (the sandbox; statuses go into the
    store's records)."""
    executable = bool(examples) and not missing_tests(examples)
    if not executable and len(missing_tests(examples)) < len(examples):
        log.warning("some examples carry tests and some do not: no pass@k (docs/execution.md)")
    records = store.by_method()
    ids = {e.id for e in examples}
    metrics = {}
    for method in methods:
        rows = [r for r in records.get(method, []) if r["id"] in ids]
        values = score_method(store, method, examples, config.eval.metrics)
        # Batch-level timings are repeated on each of the batch's records.
        prompt = sum(r["prompt_seconds"] / r["batch_size"] for r in rows)
        generate = sum(r["generate_seconds"] / r["batch_size"] for r in rows)
        values.update(code_ce=sum(r["code_ce"] for r in rows) / len(rows),
                      prompt_seconds=prompt, generate_seconds=generate,
                      prompt_share=prompt / max(prompt + generate, 1e-9))
        if executable:
            values.update(score_execution(store, method, examples, config.execution))
        values.update(arness_metrics(rows))
        metrics[method] = values
    return metrics


def arness_metrics(rows: list[dict]) -> dict[str, float]:
    """Mean AR-ness@k over a masked-diffusion method's records (``arness_local_at_<k>``,
    ``arness_global_at_<k>``); empty for autoregressive methods."""
    if not rows or "arness_local" not in rows[0]:
        return {}
    values = {}
    for kind in ("local", "global"):
        table = np.array([r[f"arness_{kind}"] for r in rows], dtype=float)  # (examples, k)
        values.update({f"arness_{kind}_at_{k}": float(v)
                       for k, v in enumerate(np.nanmean(table, 0), start=1)})
    return values


def arness_plots(rows: list[dict], folder: Path, method: str) -> list[Path]:
    """AR-ness against k and first-step confidence by position, as PNGs in ``folder``."""
    from pipeline.scoring.arness import ArnessCurves, plot_arness, plot_first_step_confidence

    if not rows or "arness_local" not in rows[0]:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    local = np.array([r["arness_local"] for r in rows], dtype=float)
    global_ = np.array([r["arness_global"] for r in rows], dtype=float)
    curves = ArnessCurves(list(range(1, local.shape[1] + 1)), local,
                          list(range(1, global_.shape[1] + 1)), global_)
    confidence = np.array([r["first_step_confidence"] for r in rows], dtype=float)
    return [plot_arness({method: curves}, folder / f"{method}_arness.png"),
            plot_first_step_confidence(confidence, folder / f"{method}_first_step_confidence.png")]


@torch.no_grad()
def diversity(config: RunConfig, checkpoints: dict[str, Path], lm: FrozenCodeLM,
              examples: list[Example], methods: list[str], *, num_examples: int = 8,
              samples: int = 8) -> dict[str, dict[str, float]]:
    """Per method: the spread of its sampled directions, for ``samples`` noise draws on each of
    the first ``num_examples`` examples and across them (:mod:`pipeline.scoring.diversity`),
    with the method's own sampler; 0 for the manual prompt (one point), so that every method
    has the same metric names."""
    from pipeline.scoring.diversity import prompt_diversity
    from pipeline.training.checkpoint import load_prompt_model
    from pipeline.training.prompt_models import is_conditional, sampling_args

    chunk = examples[:num_examples]
    if len(chunk) < 2:
        return {}
    models = {name: load_prompt_model(path, map_location=lm.device)[0]
              for name, path in checkpoints.items()}
    condition = lm.condition(lm.collate(lm.encode(chunk)).to(lm.device))
    out = {}
    for method in methods:
        spec = METHODS[method]
        if spec.prompt not in models:
            out[method] = {"prompt_spread_per_condition": 0.0,
                           "prompt_spread_across_conditions": 0.0}
            continue
        model = models[spec.prompt]
        args = sampling_args(method_sample_config(spec, config.sample), model)
        rows = len(chunk) * samples
        if is_conditional(model):
            args["condition"] = condition.repeat_interleave(samples, 0)
        generators = [torch.Generator().manual_seed(config.sample.seed + i) for i in range(rows)]
        draws = model.sample_directions(rows, generators, **args).float()
        per_condition = draws.reshape(len(chunk), samples, *draws.shape[1:])
        out[method] = prompt_diversity(per_condition, per_condition[:, 0])
    return out


def method_params(config: RunConfig, method: str, checkpoints: dict[str, Path]) -> dict:
    """What a method ran (its MLflow params): decoding, prompt model, chain, sizes."""
    spec, dc = METHODS[method], config.decoding
    params = {"method": method, "decoding": spec.decoding, "prompt": spec.prompt or "manual"}
    if dc.strategy == "diffusion":  # a masked-diffusion LM: SPA methods run two canvases
        params.update(decoding="diffusion" + ("+spa" if spec.decoding == "spa" else ""),
                      diffusion_steps=dc.diffusion_steps or config.eval.max_new_tokens,
                      diffusion_alg=dc.diffusion_alg,
                      diffusion_temperature=dc.diffusion_temperature)
    if spec.prompt:
        sample = method_sample_config(spec, config.sample)
        params.update(sampler=sample.sampler, prompts=sample.prompts,
                      checkpoint=str(checkpoints.get(spec.prompt, "")),
                      steps=sample.ddim_steps if sample.sampler == "ddim"
                      else config.diffusion.timesteps, eta=sample.eta)
    if spec.prompt in checkpoints:
        from pipeline.training.checkpoint import load_prompt_model
        from pipeline.training.prompt_models import parameter_count

        model = load_prompt_model(checkpoints[spec.prompt])[0]
        params["prompt_model_parameters"] = parameter_count(model)
        if hasattr(model, "chain"):  # what the model really runs (its own chain, if trained on one)
            chain, steps, eta = model.chain(sample.sampler, sample.ddim_steps, sample.eta)
            params.update(chain=chain, steps=steps, eta=eta)
    if spec.decoding == "spa":
        params.update(spa_omega=config.decoding.spa_omega,
                      spa_anchors=",".join(config.decoding.spa_anchors))
    return params


def log_methods(parent: RunTracker, config: RunConfig, metrics: dict[str, dict[str, float]],
                store: ResultStore, params: dict[str, dict],
                interpreted: dict[str, Path], *, pictures: Sequence[Path] = ()) -> dict[str, str]:
    """One child run per method under ``parent`` (re-used on resume) with its ``params``
    (:func:`method_params`), its prompt model's nearest tokens and the prompt ``pictures`` under
    ``interpret/``; returns method -> run id."""
    existing = {run.data.tags.get("ddpt.method"): run.info.run_id
                for run in child_runs(parent.uri, parent.run_id)
                if run.data.tags.get(ROLE_TAG) == "method"}
    by_method = store.by_method()
    run_ids = {}
    for method, values in metrics.items():
        if method in existing:
            child = RunTracker.resume(parent.uri, existing[method])
        else:
            child = RunTracker.start(parent.uri, config.tracking.experiment_name(config), method,
                                     params=params[method],
                                     tags={ROLE_TAG: "method", "ddpt.method": method},
                                     parent_run_id=parent.run_id)
        with child:
            child.log_metrics(values)
            child.log_dict(sorted(by_method.get(method, []), key=lambda r: str(r["id"])),
                           "samples.json")
            if METHODS[method].prompt in interpreted:
                child.log_artifacts(interpreted[METHODS[method].prompt], "interpret")
                for picture in pictures:
                    child.log_artifact(picture, "interpret")
            for plot in arness_plots(by_method.get(method, []), store.path.parent / "arness",
                                     method):
                child.log_artifact(plot, "arness")
        run_ids[method] = child.run_id
    return run_ids


def comparison_table(uri: str, parent_run_id: str) -> dict[str, dict[str, float]]:
    """{method: {metric: value}} of a comparison, read back from MLflow."""
    runs = [r for r in child_runs(uri, parent_run_id) if r.data.tags.get(ROLE_TAG) == "method"]
    order = MlflowClient(tracking_uri=uri).get_run(parent_run_id).data.tags.get(
        "ddpt.methods", "").split(",")
    runs.sort(key=lambda r: (order.index(r.data.tags["ddpt.method"])
                             if r.data.tags["ddpt.method"] in order else len(order)))
    return {r.data.tags["ddpt.method"]: dict(r.data.metrics) for r in runs}


def find_comparison(uri: str, experiment: str | None = None, output: str | Path | None = None
                    ) -> str:
    """The parent run id: from ``output``'s run file, else the latest comparison in
    ``experiment``."""
    if output is not None:
        run_file = Path(output) / COMPARISON_FILE
        if not run_file.is_file():
            raise FileNotFoundError(f"{run_file}: no comparison was run in {output}")
        return read_run_file(run_file)["run_id"]
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment) if experiment else None
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise TrackingError(f"{uri}: no experiment {experiment!r}; there are {names}")
    runs = client.search_runs([found.experiment_id], f"tags.`{ROLE_TAG}` = 'comparison'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise TrackingError(f"{uri}: experiment {experiment!r} holds no comparison run")
    return runs[0].info.run_id


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """``{method: {metric: value}}`` as a fixed-width text table, a row per method (the paired
    figures are :func:`~pipeline.studies.paired.format_paired`'s)."""
    metrics = without_paired(metrics)
    names = list(dict.fromkeys(name for values in metrics.values() for name in values))
    widths = [max(10, len(n) + 2) for n in names]
    header = f"{'method':<14}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths))
    rows = [f"{m:<14}" + "".join(f"{v.get(n, float('nan')):>{w}.4f}" for n, w in zip(names, widths))
            for m, v in metrics.items()]
    return "\n".join([header, "-" * len(header), *rows])


def training_run_files(checkpoints: dict[str, Path]) -> dict[str, Path]:
    """The MLflow run pointer of each prompt model's training job, beside its checkpoint
    folder (``<job>/checkpoint`` and ``<job>/mlflow_run.json``), where there is one."""
    from pipeline.training.job import RUN_FILE

    return {name: Path(path).parent / RUN_FILE for name, path in checkpoints.items()
            if (Path(path).parent / RUN_FILE).is_file()}


def check_before_work(config: RunConfig) -> None:
    """Cheap checks that would otherwise fail after training: the decoding strategy against the
    model, the metric names, WordNet."""
    from pipeline.generation.sampler import check_decoding
    from pipeline.lm.loader import is_diffusion_model
    from pipeline.scoring.metrics import METRICS

    check_decoding(config, diffusion_model=is_diffusion_model(config.model))
    unknown = [m for m in config.eval.metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"eval.metrics: unknown {unknown}; known: {sorted(METRICS)}")
    if "meteor" in config.eval.metrics:
        from pipeline.scoring.wordnet import ensure_wordnet

        ensure_wordnet()


def save_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def run_comparison(config: RunConfig, output: Path, methods: list[str],
                   checkpoints: dict[str, Path], examples: list[Example], *,
                   parent: RunTracker, open_pool: Callable[[], SamplerPool], resume: bool,
                   progress: bool = True, lm: FrozenCodeLM | None = None,
                   reference: str | None = None) -> dict[str, dict[str, float]]:
    """Sample and generate with every method, score, write the per-task table, pair each
    method with ``reference`` (None: no paired figures), chart (``charts/``), interpret, and
    log one MLflow child run per method under ``parent``. Returns ``{method: {metric:
    value}}``, the paired figures (``pass_at_1_diff``, ...) among them."""
    import time

    from pipeline.lm.loader import build_lm

    store = ResultStore(output / "samples.jsonl")
    if not resume and store.path.exists():
        store.path.unlink()
    began = time.perf_counter()
    sample_into(store, config, methods, examples, open_pool, progress=progress)
    log.info("generated in %.0fs", time.perf_counter() - began)
    metrics = score(store, config, methods, examples)
    lm = lm or build_lm(config)
    for method, spread in diversity(config, checkpoints, lm, examples, methods).items():
        metrics[method].update(spread)
    params = {method: method_params(config, method, checkpoints) for method in methods}
    table = write_comparison_table(store, output, (e.id for e in examples),
                                   seed=config.train.seed, chains=method_chains(params))
    for method, values in comparison_metrics(read_table(table), reference, methods).items():
        metrics[method].update(values)
    save_json(output / "metrics.json", metrics)
    pictures = comparison_charts(output / CHARTS, metrics, training_run_files(checkpoints),
                                 title=f"{config.data.dataset} / {config.data.eval_split} "
                                 f"({config.model.name}, {len(examples)} examples)")
    interpreted = interpret(config, checkpoints, lm, output / "interpret", examples, methods)
    log_methods(parent, config, metrics, store, params, interpreted.folders,
                pictures=interpreted.pictures)
    parent.log_artifact(output / "metrics.json")
    parent.log_artifact(store.path)
    parent.log_artifact(table)
    if reference is not None:
        parent.set_tag("ddpt.reference_method", reference)
    for picture in pictures:
        parent.log_artifact(picture, CHARTS)
    for picture in interpreted.pictures:
        parent.log_artifact(picture, "interpret")
    parent.log_dict({"text": format_table(metrics)}, "table.json")
    return metrics
