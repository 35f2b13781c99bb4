"""Comparing trained prompt models (``ddpt sample``): methods with prompt models trained already
(a checkpoint folder or an MLflow run id each), on the sampler pool, on the evaluation split and
on each ``data.extra_eval`` set (``<output>/<data set>/``), as the main job does; the
comparisons land in MLflow like its."""
from __future__ import annotations

import re
from pathlib import Path

from pipeline.config import ConfigError, RunConfig, check_fresh_output
from pipeline.data.splits import eval_examples
from pipeline.generation.sampler import check_methods, prompt_models_needed
from pipeline.studies.backends import LOCAL, Backends
from pipeline.studies.comparison import (
    COMPARISON_FILE,
    check_before_work,
    open_comparison,
    run_comparison,
    with_tracking_uri,
)
from pipeline.studies.main_job import compare_on_extra, extra_examples
from pipeline.studies.paired import check_reference
from pipeline.training.checkpoint import CONFIG_FILE, STATE_FILE, check_checkpoint
from pipeline.training.job import CHECKPOINT
from pipeline.training.prompt_models import PROMPT_MODELS


def local_checkpoint(source: str, name: str) -> Path | None:
    """The checkpoint folder ``source`` names, checked (:func:`check_checkpoint`) and holding
    a ``name`` prompt model: the folder itself or a training job's output folder holding one as
    ``checkpoint/`` (``runs/main/ddpt``). None when ``source`` is no folder (an MLflow run id)."""
    path = Path(source)
    if not path.is_dir():
        return None
    for folder in (path, path / CHECKPOINT):
        if (folder / STATE_FILE).is_file():
            return _checked(folder.resolve(), name)
    raise FileNotFoundError(f"{path}: not a checkpoint folder (no {STATE_FILE} in it or in "
                            f"its {CHECKPOINT}/)")


def _checked(folder: Path, name: str) -> Path:
    check_checkpoint(folder)
    method = RunConfig.load(folder / CONFIG_FILE).train.method
    if method != name:
        raise ConfigError(f"{folder} holds a {method} prompt model, not a {name} one: pass it "
                          f"with {PROMPT_MODELS[method].checkpoint_flag}")
    return folder


def resolve_checkpoint(source: str, name: str, config: RunConfig, output: Path) -> Path:
    """A checkpoint folder (:func:`local_checkpoint`), or an MLflow run id (``<id>`` or
    ``runs:/<id>``) whose ``checkpoint`` artifact is downloaded into
    ``output/checkpoints/<name>``; checked either way."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if (folder := local_checkpoint(source, name)) is not None:
        return folder
    run_id = source.removeprefix("runs:/").strip("/").split("/")[0]
    if not re.fullmatch(r"[0-9a-f]{32}", run_id):
        raise FileNotFoundError(f"{PROMPT_MODELS[name].checkpoint_flag} {source!r}: neither a "
                                "checkpoint folder nor an MLflow run id")
    target = output / "checkpoints" / name
    if (target / CHECKPOINT / STATE_FILE).is_file():
        return _checked(target / CHECKPOINT, name)
    target.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=config.tracking.uri)
    try:
        return _checked(Path(client.download_artifacts(run_id, CHECKPOINT, str(target))), name)
    except MlflowException as err:
        raise FileNotFoundError(f"MLflow run {run_id} at {config.tracking.uri}: no checkpoint "
                                f"artifact ({err})") from err


def run_sample(config: RunConfig, output_dir: str | Path, sources: dict[str, str],
               methods: tuple[str, ...], *, backends: Backends = LOCAL, resume: bool = False,
               progress: bool = True) -> dict:
    """Compare ``methods`` with already trained prompt models (``sources``: prompt model name
    -> checkpoint folder or MLflow run id), on ``data.eval_split`` and each ``data.extra_eval``.
    Returns ``{method: metrics}``, with ``<data set>/<method>`` keys for the extra data sets."""
    output = Path(output_dir).resolve()
    check_methods(methods, "--methods")
    reference = check_reference(config.eval.reference_method, methods)
    missing = [p for p in prompt_models_needed(methods) if p not in sources]
    if missing:
        flags = ", ".join(PROMPT_MODELS[p].checkpoint_flag for p in missing)
        raise ConfigError(f"methods {list(methods)} need trained prompt models: pass {flags}")
    check_fresh_output(output, (COMPARISON_FILE,), "comparison", resume=resume)
    for name in prompt_models_needed(methods):  # a damaged checkpoint folder fails at once
        local_checkpoint(sources[name], name)
    examples, extra = eval_examples(config.data), extra_examples(config)
    check_before_work(config)
    config = with_tracking_uri(config, output)
    output.mkdir(parents=True, exist_ok=True)
    checkpoints = {name: resolve_checkpoint(sources[name], name, config, output)
                   for name in prompt_models_needed(methods)}
    config.save(output / "config.yaml")
    with open_comparison(config, output, list(methods), resume=resume) as parent:
        for name, path in checkpoints.items():
            parent.set_tag(f"ddpt.checkpoint.{name}", path)
        metrics = run_comparison(config, output, list(methods), checkpoints, examples,
                                 parent=parent, open_pool=backends.pool(config, checkpoints, None),
                                 resume=resume, progress=progress, reference=reference)
    metrics.update(compare_on_extra(config, output, methods, checkpoints, extra,
                                    backends=backends, resume=resume, progress=progress,
                                    reference=reference))
    return metrics
