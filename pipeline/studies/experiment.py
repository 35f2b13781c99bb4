"""Experiment specifications and their tables: several prompt models ("arms"), each trained with
several seeds on one or more data sets and compared on their evaluation sets, reported as mean
and standard deviation over the seeds. No Ray here: :mod:`pipeline.studies.experiment_job` runs
the spec (on Ray by default) and appends one result per (data set, arm, seed) as it finishes.

A spec file (YAML; ``experiments/*.yaml``)::

    experiment: {preset: main, seeds: [0, 1, 2], baseline_methods: [manual]}
    fixed:      {flat config keys set in every run}
    datasets:   {name: {flat config keys: the training data, its eval split, data.extra_eval}}
    arms:       {name: {set: {flat config keys}, methods: [comparison methods it gives],
                        sweep: a space file (tune/*.yaml, relative to the spec) that chose
                        the arm's searched keys}}

Every combination is checked through the configuration's own validation before anything runs,
and each error names the file and the key. An arm's ``sweep`` must train the arm's own model at
its budget (:func:`check_arm_sweep`), so a value copied from the sweep's best trial is one chosen
for this arm.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig, build_config, parse_overrides, preset_config
from pipeline.generation.sampler import check_methods, prompt_models_needed
from pipeline.studies.paired import check_reference
from pipeline.studies.specs import known, mapping, read_spec

SETTINGS = ("preset", "seeds", "baseline_methods")
BASELINE = "baseline"  # the untrained baselines' name among the arms (their runs' folder)


@dataclass(frozen=True)
class Arm:
    """One prompt model to train: its config overrides and the comparison rows it gives."""

    name: str
    overrides: dict[str, Any]
    methods: tuple[str, ...]
    sweep: Path | None = None  # the space file that chose its searched keys


@dataclass
class Experiment:
    source: str
    preset: str
    seeds: list[int]
    fixed: dict[str, Any]
    datasets: dict[str, dict[str, Any]]
    arms: list[Arm]
    baseline_methods: tuple[str, ...] = ("manual",)
    overrides: tuple[str, ...] = ()  # the command line's --set, already in ``fixed``
    reference: str = "manual"  # eval.reference_method: every method is paired with its runs

    def config(self, dataset: str, arm: Arm | None, seed: int) -> RunConfig:
        """The run of ``arm`` (None: the untrained baselines) with ``seed`` on ``dataset``."""
        flat = {**self.fixed, **self.datasets[dataset], **(arm.overrides if arm else {}),
                "train.seed": seed}
        try:
            return RunConfig.from_flat(flat, base=build_config(self.preset))
        except ConfigError as err:
            where = f"arms.{arm.name}" if arm else "baselines"
            raise ConfigError(f"{self.source}: datasets.{dataset} + {where}: {err}") from err

    def runs(self) -> list[tuple[str, Arm | None, int]]:
        """Every (data set, arm, seed) to run; the baselines once per data set (seed-free).
        Seed by seed, so an experiment cut short holds whole comparisons of every arm."""
        out: list[tuple[str, Arm | None, int]] = []
        for dataset in self.datasets:
            if self.baseline_methods:
                out.append((dataset, None, self.seeds[0]))
            out += [(dataset, arm, seed) for seed in self.seeds for arm in self.arms]
        return out

    def methods(self, arm: Arm | None) -> tuple[str, ...]:
        return arm.methods if arm else self.baseline_methods


def load_experiment(path: str | Path, overrides: list[str] | None = None,
                    only_arms: list[str] | None = None) -> Experiment:
    """Read and validate an experiment spec (every run's configuration is built once).
    ``overrides`` (``--set`` strings) join the spec's ``fixed`` settings, under the data sets'
    and arms' own (an arm still decides what it compares)."""
    source = str(path)
    data = read_spec(path, ("experiment", "fixed", "datasets", "arms"), "experiment file")
    settings = data["experiment"]
    known(settings, SETTINGS, source, "experiment")
    preset = settings.get("preset", "main")
    preset_config(preset, f"{source}: experiment.preset")
    seeds = settings.get("seeds", [0, 1, 2])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)):
        raise ConfigError(f"{source}: experiment.seeds: a list of integers, got {seeds!r}")
    if not data.get("datasets") or not data.get("arms"):
        raise ConfigError(f"{source}: name at least one entry in datasets and in arms")
    arms = [_arm(name, spec, source) for name, spec in data["arms"].items()]
    baselines = tuple(settings.get("baseline_methods", ["manual"]))
    check_methods(baselines, f"{source}: experiment.baseline_methods")
    if prompt_models_needed(baselines):
        raise ConfigError(f"{source}: experiment.baseline_methods: {list(baselines)} need "
                          "trained prompts; give them to an arm")
    every_method = [*baselines, *(m for arm in arms for m in arm.methods)]
    if only_arms is not None:  # some arms only: the rest can run later into the same output
        unknown = sorted(set(only_arms) - {arm.name for arm in arms} - {BASELINE})
        if unknown:
            raise ConfigError(f"--arms: {source} has no arm {unknown}; its arms: "
                              f"{[arm.name for arm in arms] + [BASELINE]}")
        arms = [arm for arm in arms if arm.name in only_arms]
        baselines = baselines if BASELINE in only_arms else ()
    fixed = {**data["fixed"], **parse_overrides(overrides or [])}
    datasets = {name: mapping(values, source, f"datasets.{name}")
                for name, values in data["datasets"].items()}
    experiment = Experiment(source, preset, seeds, fixed, datasets, arms, baselines,
                            tuple(overrides or ()))
    for dataset, arm, seed in experiment.runs():  # every combination valid, before any work
        experiment.reference = experiment.config(dataset, arm, seed).eval.reference_method
    check_reference(experiment.reference, every_method, where=f"{source}: ")
    for arm in experiment.arms:
        if arm.sweep is not None:
            for dataset in experiment.datasets:
                check_arm_sweep(experiment.config(dataset, arm, experiment.seeds[0]), arm,
                                f"{source}: arms.{arm.name}.sweep")
    return experiment


def _arm(name: str, spec: Any, source: str) -> Arm:
    if not isinstance(spec, dict) or set(spec) - {"set", "methods", "sweep"} or \
            "methods" not in spec:
        raise ConfigError(f"{source}: arms.{name}: a mapping with 'set' (config keys), "
                          "'methods' (comparison rows) and optionally 'sweep' (a space file)")
    methods = tuple(spec["methods"])
    check_methods(methods, f"{source}: arms.{name}.methods")
    if len(prompt_models_needed(methods)) != 1:
        raise ConfigError(f"{source}: arms.{name}.methods: {list(methods)} must all use one "
                          "trained prompt model (the arm's)")
    overrides = dict(spec.get("set") or {})
    needed = prompt_models_needed(methods)[0]
    if overrides.get("train.method", "ddpt") != needed:
        raise ConfigError(f"{source}: arms.{name}: methods use {needed!r} but train.method is "
                          f"{overrides.get('train.method', 'ddpt')!r}")
    sweep = spec.get("sweep")
    if sweep is not None and not (isinstance(sweep, str) and sweep.strip()):
        raise ConfigError(f"{source}: arms.{name}.sweep: a space file's path, got {sweep!r}")
    return Arm(name, overrides, methods,
               None if sweep is None else (Path(source).parent / sweep).resolve())


# What a sweep must share with the arm it chose settings for: the trained model, its data and
# budget. Not: the seed, the report cadence, the hardware (device, dtype, autocast).
_SWEEP_MATCHED = ("model.", "prompt.", "diffusion.", "denoiser.", "train.", "data.dataset",
                  "data.train_split", "data.max_train_examples", "data.columns")
_SWEEP_FREE = ("model.device", "model.dtype", "train.seed", "train.lm_autocast",
               "train.log_every", "train.checkpoint_every", "train.eval_every")


def check_arm_sweep(config: RunConfig, arm: Arm, where: str) -> None:
    """A ConfigError naming ``where`` unless ``arm.sweep`` (a space file) trains the arm's
    model (``config``: the arm's run) with the same data and budget, apart from the keys it
    searches, and the arm sets every key it searches (the chosen values go there)."""
    from pipeline.studies.sweep import load_sweep

    sweep = load_sweep(arm.sweep)
    unset = sorted(key for key in sweep.space if key not in arm.overrides)
    if unset:
        raise ConfigError(f"{where}: {arm.sweep} searches {unset}; set them in the arm's 'set' "
                          "(to the sweep's chosen values)")
    ours, theirs = config.to_flat(), sweep.base.to_flat()
    differ = [f"{key}: {theirs[key]!r} in the sweep, {ours[key]!r} here" for key in ours
              if key.startswith(_SWEEP_MATCHED) and key not in _SWEEP_FREE
              and key not in sweep.space and ours[key] != theirs[key]]
    if differ:
        raise ConfigError(f"{where}: {arm.sweep} trains another model than the arm: "
                          + "; ".join(differ))


# ---- results ------------------------------------------------------------------------------------
@dataclass
class Row:
    """Mean and standard deviation over seeds of one (evaluation set, arm, method)."""

    eval_set: str
    arm: str
    method: str
    seeds: int
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    chain: str = ""  # what ran: the prompt's chain and the decoding (studies.chains)


def read_results(path: Path) -> list[dict]:
    """The results file: one JSON object per line ({dataset, eval_set, arm, seed, method,
    chain, metrics, ...})."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def aggregate(results: list[dict]) -> list[Row]:
    """Rows in first-seen order; the std is the sample standard deviation (0 for one seed)."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    chains: dict[tuple[str, str, str], str] = {}
    for result in results:
        key = (result["eval_set"], result["arm"], result["method"])
        groups[key].append(result["metrics"])
        chains[key] = chains.get(key) or result.get("chain", "")
    rows = []
    for (eval_set, arm, method), runs in groups.items():
        row = Row(eval_set, arm, method, len(runs), chain=chains[(eval_set, arm, method)])
        for name in runs[0]:
            values = [r[name] for r in runs if isinstance(r.get(name), (int, float))]
            values = [v for v in values if not math.isnan(v)]
            if values:
                row.mean[name] = statistics.fmean(values)
                row.std[name] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def markdown_table(rows: list[Row], metrics: list[str], eval_set: str) -> str:
    """One evaluation set's rows as a Markdown table of ``mean ± std`` (n seeds); a method is
    named with what ran (``ddpt_ddim (ddim-3 eta=0 + greedy)``) where that is known."""
    head = "| arm | method | seeds | " + " | ".join(metrics) + " |"
    lines = [head, "| " + " | ".join(["---"] * (3 + len(metrics))) + " |"]
    for row in (r for r in rows if r.eval_set == eval_set):
        cells = [_cell(row, name) for name in metrics]
        method = f"{row.method} ({row.chain})" if row.chain else row.method
        lines.append(f"| {row.arm} | {method} | {row.seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(row: Row, name: str) -> str:
    if name not in row.mean:
        return ""
    mean, std = row.mean[name], row.std[name]
    digits = 0 if abs(mean) >= 1000 else 3 if abs(mean) < 10 else 1
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if row.seeds > 1 else "")


def experiment_charts(rows: list[Row], folder: Path) -> list[Path]:
    """``<folder>/<eval set>_metrics.png`` per evaluation set: a bar per (arm, method) in each
    quality metric's panel, with error bars of the standard deviation over seeds where several
    ran. No intervals: a seed's paired figures averaged over seeds are not the pooled interval
    (that one resamples tasks and seeds together: pipeline/scoring/stats.py)."""
    from pipeline.studies.charts import metric_chart

    written = []
    for eval_set in dict.fromkeys(row.eval_set for row in rows):
        chosen = {f"{r.arm}/{r.method}": r for r in rows if r.eval_set == eval_set}
        several = any(r.seeds > 1 for r in chosen.values())
        path = folder / f"{eval_set}_metrics.png"
        metric_chart({k: r.mean for k, r in chosen.items()}, path,
                     std={k: r.std for k, r in chosen.items()} if several else None,
                     title=f"{eval_set}: arm/method, mean ± std over seeds", intervals=False)
        written.append(path)
    return written
