"""The main job: train DDPT and the prompt-tuning baseline, then compare every method.

Writes into the output folder:
    config.yaml        the resolved configuration
    ddpt/, prompt_tuning/   one training job each (``ddpt train``'s layout: checkpoint/, ray/)
    samples.jsonl      one line per (method, example): id, method, generation, reference, ...
    metrics.json       {method: {metric: value}}: text metrics, ``code_ce`` (held-out code
                       cross-entropy), prompt/generation seconds
    interpret/         nearest tokens and a t-SNE map per trained prompt model
    mlflow.db, mlartifacts/, mlflow_comparison.json   the MLflow comparison (unless
                       MLFLOW_TRACKING_URI or tracking.uri says otherwise): a parent run with a
                       child per training job and per method
Re-running with ``resume=True`` continues training from the last checkpoints and skips
generations already in samples.jsonl.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path

import torch

from pipeline.evaluation.comparison import (
    COMPARISON_FILE,
    interpret,
    log_methods,
    open_comparison,
    sample_into,
    score,
)
from pipeline.config import ConfigError, RunConfig
from pipeline.data.example import Example
from pipeline.data.loaders import load_examples
from pipeline.lm.frozen import FrozenCodeLM
from pipeline.evaluation.metrics import METRICS
from pipeline.lm.loader import build_lm
from pipeline.evaluation.results import ResultStore
from pipeline.evaluation.sampler import check_methods, prompt_models_needed
from pipeline.tracking import RunTracker, check_tracking_uri, resolve_tracking_uri
from pipeline.training.job import load_train_examples, run_training

log = logging.getLogger(__name__)

SOURCE_FLAGS = {"ddpt": "--checkpoint", "prompt_tuning": "--prompt-tuning"}  # ddpt sample's
DEFAULT_METHODS = ("manual", "prompt_tuning", "ddpt", "ddpt_ddim", "spa", "ddpt_spa")


def load_data(config: RunConfig, train: bool = True) -> tuple[list[Example], list[Example]]:
    """(training examples, evaluation examples); the training list is empty if not ``train``."""
    dc = config.data
    evaluation = load_examples(dc.dataset, dc.eval_split, dc.data_dir,
                               dc.max_eval_examples or None)
    return (load_train_examples(config) if train else []), evaluation


def check_before_work(config: RunConfig) -> None:
    """Cheap checks that would otherwise fail after training."""
    unknown = [m for m in config.eval.metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"eval.metrics: unknown {unknown}; known: {sorted(METRICS)}")
    if "meteor" in config.eval.metrics:
        from pipeline.evaluation.wordnet import ensure_wordnet

        ensure_wordnet()


def save_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    names = list(dict.fromkeys(name for values in metrics.values() for name in values))
    widths = [max(10, len(n) + 2) for n in names]
    header = f"{'method':<14}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths))
    rows = [f"{m:<14}" + "".join(f"{v.get(n, float('nan')):>{w}.4f}" for n, w in zip(names, widths))
            for m, v in metrics.items()]
    return "\n".join([header, "-" * len(header), *rows])


def with_tracking_uri(config: RunConfig, output: Path) -> RunConfig:
    """Pin the resolved MLflow URI, so that every job of the run (training jobs in their own
    folders included) logs into the same store."""
    uri = resolve_tracking_uri(output, config.tracking.uri)
    check_tracking_uri(uri)  # a bad URI fails here, before any work
    return dataclasses.replace(
        config, tracking=dataclasses.replace(config.tracking, uri=uri))


def compare_methods(config: RunConfig, output: Path, methods: list[str],
                    checkpoints: dict[str, Path], examples: list[Example], parent: RunTracker,
                    resume: bool, progress: bool = True, lm: FrozenCodeLM | None = None
                    ) -> dict[str, dict[str, float]]:
    """Sample and generate with every method, score, and log one MLflow child per method."""
    store = ResultStore(output / "samples.jsonl")
    if not resume and store.path.exists():
        store.path.unlink()
    began = time.perf_counter()
    sample_into(store, config, methods, examples, checkpoints, progress, lm)
    log.info("generated in %.0fs", time.perf_counter() - began)
    metrics = score(store, config, methods, examples)
    save_json(output / "metrics.json", metrics)
    lm = lm or build_lm(config)
    interpreted = interpret(config, checkpoints, lm, output / "interpret")
    log_methods(parent, config, metrics, store, checkpoints, interpreted)
    parent.log_artifact(output / "metrics.json")
    parent.log_artifact(store.path)
    parent.log_dict({"text": format_table(metrics)}, "table.json")
    return metrics


def run_main(config: RunConfig, output_dir: str | Path, resume: bool = False,
             methods: tuple[str, ...] = DEFAULT_METHODS, progress: bool = True) -> dict:
    """Train the prompt models the methods need (through :func:`run_training`: Ray + DeepSpeed
    by default), then compare the methods. Returns ``{method: {metric: value}}``."""
    output = Path(output_dir).resolve()
    check_methods(methods)
    if not resume and (output / COMPARISON_FILE).exists():
        raise ConfigError(f"{output} holds an earlier run: pass --resume to continue it, or "
                          "choose another --output")
    train_examples, eval_examples = load_data(config)  # data errors surface before any work
    check_before_work(config)
    config = with_tracking_uri(config, output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.train.seed)
    config.save(output / "config.yaml")

    with open_comparison(config, output, resume, list(methods)) as parent:
        began = time.perf_counter()
        lm = build_lm(config)
        log.info("model %s (%s template, context n=%d, d=%d) loaded in %.1fs",
                 config.model.name, lm.template.kind, lm.context_length, lm.hidden_size,
                 time.perf_counter() - began)
        checkpoints = {}
        for name in prompt_models_needed(methods):
            job = config.with_overrides([f"train.method={name}"])
            trained = run_training(job, output / name, resume, train_examples, progress, lm=lm,
                                   parent_run_id=parent.run_id, run_name=f"train-{name}")
            checkpoints[name] = trained.checkpoint
        return compare_methods(config, output, list(methods), checkpoints, eval_examples,
                               parent, resume, progress, lm)


def resolve_checkpoint(source: str, name: str, config: RunConfig, output: Path) -> Path:
    """A checkpoint folder, or an MLflow run id (``<id>`` or ``runs:/<id>``) whose
    ``checkpoint`` artifact is downloaded into ``output/checkpoints/<name>``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    path = Path(source)
    if path.is_dir():
        if not (path / "state.json").is_file():
            raise FileNotFoundError(f"{path}: not a checkpoint folder (no state.json)")
        return path.resolve()
    run_id = source.removeprefix("runs:/").strip("/").split("/")[0]
    if not re.fullmatch(r"[0-9a-f]{32}", run_id):
        raise FileNotFoundError(f"{SOURCE_FLAGS[name]} {source!r}: neither a checkpoint "
                                "folder nor an MLflow run id")
    target = output / "checkpoints" / name
    if (target / "checkpoint" / "state.json").is_file():
        return target / "checkpoint"
    target.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=config.tracking.uri)
    try:
        return Path(client.download_artifacts(run_id, "checkpoint", str(target)))
    except MlflowException as err:
        raise FileNotFoundError(f"MLflow run {run_id} at {config.tracking.uri}: no checkpoint "
                                f"artifact ({err})") from err


def run_sample(config: RunConfig, output_dir: str | Path, sources: dict[str, str],
               methods: tuple[str, ...], resume: bool = False, progress: bool = True) -> dict:
    """Compare ``methods`` with already trained prompt models (``sources``: 'ddpt' /
    'prompt_tuning' -> checkpoint folder or MLflow run id). Returns ``{method: metrics}``."""
    output = Path(output_dir).resolve()
    check_methods(methods)
    missing = [p for p in prompt_models_needed(methods) if p not in sources]
    if missing:
        flags = ", ".join(SOURCE_FLAGS[p] for p in missing)
        raise ConfigError(f"methods {list(methods)} need trained prompt models: pass {flags}")
    if not resume and (output / COMPARISON_FILE).exists():
        raise ConfigError(f"{output} holds an earlier comparison: pass --resume to continue "
                          "it, or choose another --output")
    _, examples = load_data(config, train=False)
    check_before_work(config)
    config = with_tracking_uri(config, output)
    output.mkdir(parents=True, exist_ok=True)
    checkpoints = {name: resolve_checkpoint(sources[name], name, config, output)
                   for name in prompt_models_needed(methods)}
    config.save(output / "config.yaml")
    with open_comparison(config, output, resume, list(methods)) as parent:
        for name, path in checkpoints.items():
            parent.set_tag(f"ddpt.checkpoint.{name}", path)
        return compare_methods(config, output, list(methods), checkpoints, examples, parent,
                               resume, progress)
