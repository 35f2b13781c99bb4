"""Sweep specifications: which flat config keys a Ray Tune sweep searches, how, and with what
settings. Core module (no Ray): :mod:`pipeline.distributed.tune` turns a :class:`Sweep` into Tune
objects.

A space file (YAML; see ``tune/*.yaml`` and docs/sweeps.md) has three sections::

    sweep:   num_samples, metric, mode, seed, eval_every, max_concurrent_trials,
             asha: {max_t, grace_period, reduction_factor}, preset, config
    fixed:   flat config keys set in every trial        {train.steps: 40}
    space:   flat config keys searched, one distribution each:
             {choice: [...]}, {grid: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]},
             {randint: [lo, hi]} (both ends included)

Everything is checked here, before Ray starts: unknown sections, settings and config keys, types,
and every value a distribution can produce (each choice, each range end) through RunConfig's own
validation, so ``denoiser.bottleneck: {choice: [8, -1]}`` fails at once and names the file and key.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

from pipeline.config import ConfigError, RunConfig, merge_file, preset_config
from pipeline.paths import PROJECT_ROOT
from pipeline.scoring.stats import PairedDifference, mean_difference
from pipeline.studies.specs import integer, known, mapping, read_spec

log = logging.getLogger(__name__)

SPACES_DIR = PROJECT_ROOT / "tune"
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
METRICS = ("dev_loss", "code_loss", "loss")  # what the Train workers report each step
# The summary's paired column: a trial's last-step dev loss minus the best trial's, per task.
VS_BEST_HEADER = "dev_loss - best [95% CI]"
# Keys the sweep sets in every trial itself (report cadence, where MLflow runs go).
CONTROLLED = ("train.eval_every", "train.log_every", "train.checkpoint_every", "tracking.uri",
              "tracking.experiment")


@dataclass(frozen=True)
class Distribution:
    """One searched key: ``kind`` is one of DISTRIBUTIONS; ``values`` are the options of
    choice/grid or ``(low, high)`` of a range."""

    kind: str
    values: tuple


@dataclass(frozen=True)
class Asha:
    """ASHA early stopping, in optimizer steps (the ``step`` each report carries)."""

    max_t: int  # the longest a trial runs; default: train.steps
    grace_period: int  # no trial is stopped before this step
    reduction_factor: float  # keep the best 1/reduction_factor at each rung


@dataclass
class Sweep:
    """A validated sweep: settings, search space, and the base configuration every trial
    starts from (preset, then config file, then ``fixed``, then ``--set``)."""

    source: str  # the space file, for messages
    base: RunConfig
    space: dict[str, Distribution]
    asha: Asha
    num_samples: int = 4
    metric: str = "dev_loss"
    mode: str = "min"
    seed: int | None = 0  # of the random search; None = a different sample each time
    eval_every: int = 10  # steps between dev evaluations = reports to Tune = checkpoints
    max_concurrent_trials: int | None = None  # None: from the cluster's resources
    fixed: dict[str, Any] = field(default_factory=dict)

    def trial_config(self, params: dict[str, Any]) -> RunConfig:
        """The configuration a trial trains: the base with the sampled ``params`` (flat keys).
        This is also the exported best configuration. Raises ConfigError on a bad combination."""
        return RunConfig.from_flat(params, base=self.base)

    def runtime_config(self, params: dict[str, Any], tracking_uri: str,
                       experiment: str) -> RunConfig:
        """:meth:`trial_config` plus what the sweep controls: a dev evaluation, a report and a
        checkpoint every ``eval_every`` steps, and the sweep's MLflow store and experiment."""
        every = self.eval_every
        return RunConfig.from_flat(
            {"train.eval_every": every, "train.log_every": every,
             "train.checkpoint_every": every, "tracking.uri": tracking_uri,
             "tracking.experiment": experiment}, base=self.trial_config(params))

    def trial_steps(self, params: dict[str, Any]) -> int:
        """``train.steps`` of a trial (the space may search it)."""
        return int(params.get("train.steps", self.base.train.steps))

    def settings(self) -> dict[str, Any]:
        """The sweep's settings as flat MLflow params of the parent run."""
        flat = {"sweep.source": self.source, "sweep.num_samples": self.num_samples,
                "sweep.metric": self.metric, "sweep.mode": self.mode, "sweep.seed": self.seed,
                "sweep.eval_every": self.eval_every,
                "sweep.max_concurrent_trials": self.max_concurrent_trials or "auto",
                **{f"sweep.asha.{k}": v for k, v in dataclasses.asdict(self.asha).items()}}
        flat.update({f"space.{k}": {d.kind: list(d.values)} for k, d in self.space.items()})
        return flat


def default_space_file(preset: str | None) -> Path:
    """``tune/smoke.yaml`` for the smoke preset, else ``tune/default.yaml``."""
    return SPACES_DIR / ("smoke.yaml" if preset == "smoke" else "default.yaml")


def load_sweep(path: str | Path, preset: str | None = None, config_file: str | None = None,
               overrides: list[str] | None = None) -> Sweep:
    """Read and validate a space file. ``preset`` and ``config_file`` (the command line's) win
    over the file's ``sweep.preset`` / ``sweep.config``; ``overrides`` (``--set``) apply last."""
    path = Path(path)
    source = str(path)
    settings, fixed, raw_space = _read_space_file(path)
    base = _base_config(path, settings, fixed, raw_space, preset=preset,
                        config_file=config_file, overrides=overrides)
    space = {key: _distribution(key, spec, base, source) for key, spec in raw_space.items()}
    if "train.lr" in space and base.train.method == "prompt_tuning" and \
            base.train.prompt_tuning_lr is not None:
        raise ConfigError(f"{source}: space.train.lr: prompt tuning trains at "
                          f"train.prompt_tuning_lr={base.train.prompt_tuning_lr}, so train.lr "
                          "changes nothing; search train.prompt_tuning_lr")

    setting = {f.name: f.default for f in dataclasses.fields(Sweep)
               if f.default is not dataclasses.MISSING}
    setting.update(settings)  # the file's settings over the defaults of Sweep
    eval_every = integer(setting["eval_every"], source, "sweep.eval_every", low=1)
    metric = setting["metric"]
    if metric not in METRICS:
        raise ConfigError(f"{source}: sweep.metric: {metric!r} is not one of {list(METRICS)}")
    mode = setting["mode"]
    if mode not in ("min", "max"):
        raise ConfigError(f"{source}: sweep.mode: {mode!r} is not 'min' or 'max'")
    seed = setting["seed"]
    if seed is not None:
        seed = integer(seed, source, "sweep.seed", low=0)
    concurrency = setting["max_concurrent_trials"]
    if concurrency not in (None, "auto"):
        concurrency = integer(concurrency, source, "sweep.max_concurrent_trials", low=1)
    return Sweep(
        source=source, base=base, space=space,
        asha=_asha(settings.get("asha"), source, base, space, eval_every),
        num_samples=integer(setting["num_samples"], source, "sweep.num_samples", low=1),
        metric=metric, mode=mode, seed=seed, eval_every=eval_every,
        max_concurrent_trials=None if concurrency in (None, "auto") else concurrency,
        fixed=dict(fixed),
    )


def _read_space_file(path: Path) -> tuple[dict, dict, dict]:
    """The (sweep, fixed, space) sections of a space file, checked for shape."""
    source = str(path)
    sections = read_spec(path, ("sweep", "fixed", "space"), "space file")
    settings, fixed, raw_space = sections["sweep"], sections["fixed"], sections["space"]
    known(settings, ("num_samples", "metric", "mode", "seed", "eval_every",
                     "max_concurrent_trials", "asha", "preset", "config"), source, "sweep")
    if not raw_space:
        raise ConfigError(f"{source}: space: name at least one config key to search")
    return settings, fixed, raw_space


def _base_config(path: Path, settings: dict, fixed: dict, raw_space: dict, *,
                 preset: str | None, config_file: str | None, overrides: list[str] | None
                 ) -> RunConfig:
    """What every trial starts from: preset, config file, ``fixed``, then ``--set``."""
    source = str(path)
    base = preset_config(preset or settings.get("preset") or "main", f"{source}: sweep.preset")
    if config_file is None and settings.get("config"):
        config_file = str((path.parent / str(settings["config"])).resolve())
    if config_file:
        base = merge_file(base, config_file)
    for key in [*fixed, *raw_space]:
        _check_key(key, source, "fixed" if key in fixed else "space")
    both = sorted(set(fixed) & set(raw_space))
    if both:
        raise ConfigError(f"{source}: {both} both fixed and searched: keep one")
    try:
        base = RunConfig.from_flat(fixed, base=base)
    except ConfigError as err:
        raise ConfigError(f"{source}: fixed: {err}") from err
    base = base.with_overrides(overrides or [])
    if base.distributed.backend != "ray":
        raise ConfigError(f"{source}: distributed.backend must be 'ray': every trial is a Ray "
                          "Train run")
    return base


def _asha(raw: Any, source: str, base: RunConfig, space: dict, eval_every: int) -> Asha:
    asha_raw = mapping(raw, source, "sweep.asha")
    known(asha_raw, ("max_t", "grace_period", "reduction_factor"), source, "sweep.asha")
    if asha_raw.get("max_t") is None and "train.steps" in space:
        raise ConfigError(f"{source}: sweep.asha.max_t: required when the space searches "
                          "train.steps")
    max_t = integer(asha_raw.get("max_t", base.train.steps), source, "sweep.asha.max_t", low=1)
    grace = integer(asha_raw.get("grace_period", eval_every), source, "sweep.asha.grace_period",
                    low=1)
    factor = asha_raw.get("reduction_factor", 2)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1:
        raise ConfigError(f"{source}: sweep.asha.reduction_factor: must be a number > 1, "
                          f"got {factor!r}")
    if grace > max_t:
        raise ConfigError(f"{source}: sweep.asha.grace_period: {grace} is beyond max_t={max_t}")
    return Asha(max_t=max_t, grace_period=grace, reduction_factor=float(factor))


def _check_key(key: Any, source: str, where: str) -> None:
    """A flat ``section.field`` key of RunConfig that the sweep does not control itself."""
    known = list(RunConfig().to_flat())
    if key not in known:
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; keys are 'section.field'"
        raise ConfigError(f"{source}: {where}: unknown config key {key!r}{hint}")
    if key in CONTROLLED:
        raise ConfigError(f"{source}: {where}: {key} is set by the sweep itself "
                          "(sweep.eval_every sets the report cadence)")


def _valid(key: str, value: Any, base: RunConfig, source: str) -> Any:
    """``value`` as RunConfig types it (``"3e-4"`` -> 3e-4), or a ConfigError naming the key."""
    try:
        return RunConfig.from_flat({key: value}, base=base).to_flat()[key]
    except ConfigError as err:
        raise ConfigError(f"{source}: space.{key}: {value!r} is not a valid value: {err}") from err


def _field_type(key: str) -> tuple[type, ...]:
    """The types a flat config key takes (``float`` for ``train.lr``)."""
    section, name = key.split(".")
    hint = get_type_hints(get_type_hints(RunConfig)[section])[name]
    return tuple(t for t in get_args(hint) if t is not type(None)) or (hint,)


def _distribution(key: str, spec: Any, base: RunConfig, source: str) -> Distribution:
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
        raise ConfigError(f"{source}: space.{key}: expected one of "
                          f"{{{', '.join(f'{d}: ...' for d in DISTRIBUTIONS)}}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: space.{key}: {kind} needs a non-empty list")
        return Distribution(kind, tuple(_valid(key, v, base, source) for v in values))
    if not isinstance(values, list) or len(values) != 2:
        raise ConfigError(f"{source}: space.{key}: {kind} needs [low, high]")
    wanted = int if kind == "randint" else float
    takes = _field_type(key)
    if wanted not in takes:
        names = "/".join(t.__name__ for t in takes)
        raise ConfigError(f"{source}: space.{key}: {kind} draws {wanted.__name__}s, but {key} "
                          f"takes {names}: use " + ("randint or choice" if int in takes
                                                     else "uniform, loguniform or choice"))
    low, high = (_valid(key, v, base, source) for v in values)
    if not low < high:
        raise ConfigError(f"{source}: space.{key}: {kind} needs low < high, got {values}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{source}: space.{key}: loguniform needs low > 0, got {low}")
    return Distribution(kind, (low, high))


# ---- results -------------------------------------------------------------------------------------
@dataclass
class TrialSummary:
    """One trial as the sweep reports it."""

    trial_id: str
    status: str  # completed | stopped_early | failed | unfinished
    params: dict[str, Any]
    step: int | None = None  # the last step reported to Tune
    metric: float | None = None  # its last reported value of the sweep's metric
    error: str | None = None
    run_id: str | None = None  # the MLflow child run
    # Its last step's dev loss minus the best trial's, paired over the dev tasks both scored
    # (None: no per-task losses, e.g. stopped early, failed, or an older sweep; or the best)
    vs_best: PairedDifference | None = None

    def record(self) -> dict[str, Any]:
        """The trial as a JSON-safe dict (trials.json): non-finite figures become null."""
        record = dataclasses.asdict(self)
        if record["vs_best"] is not None:
            record["vs_best"] = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                                 for k, v in record["vs_best"].items()}
        return record


def trial_status(sweep: Sweep, params: dict[str, Any], step: int | None, *, failed: bool
                 ) -> str:
    if failed:
        return "failed"
    if step is None:
        return "unfinished"
    return "completed" if step >= min(sweep.trial_steps(params), sweep.asha.max_t) \
        else "stopped_early"


def pick_best(sweep: Sweep, trials: list[TrialSummary]) -> TrialSummary | None:
    """The best trial by its last reported metric, among the trials that ran to the end (a
    trial ASHA stopped early only counts when none did)."""
    scored = [t for t in trials if t.status != "failed" and t.metric is not None
              and math.isfinite(t.metric)]
    completed = [t for t in scored if t.status == "completed"]
    pool = completed or scored
    if not pool:
        return None
    sign = 1.0 if sweep.mode == "min" else -1.0
    return min(pool, key=lambda t: sign * t.metric)


def compare_to_best(trials: list[TrialSummary], best: TrialSummary | None,
                    losses: Callable[[TrialSummary], dict[str, float] | None]) -> None:
    """Set each completed trial's :attr:`TrialSummary.vs_best`: its per-task dev losses (from
    ``losses``, None when it kept none) minus the best trial's, on the tasks both scored
    (:func:`~pipeline.scoring.stats.mean_difference`: bootstrap interval, sign-flip p). Trials
    stopped early or failed, and pairs with fewer than 2 tasks in common, get none; so does a
    trial whose losses file is damaged (a warning names it: the sweep's summary is still
    written)."""
    def read(trial: TrialSummary) -> dict[str, float] | None:
        try:
            return losses(trial)
        except ValueError as err:
            log.warning("trial %s: not paired with the best trial: %s", trial.trial_id, err)
            return None

    reference = read(best) if best is not None else None
    for trial in trials:
        trial.vs_best = None
        if reference is None or trial.trial_id == best.trial_id or trial.status != "completed":
            continue
        own = read(trial)
        common = [task for task in reference if own is not None and task in own]
        if len(common) >= 2:
            trial.vs_best = mean_difference([own[t] for t in common],
                                            [reference[t] for t in common], metric="dev_loss")


def _vs_best_cell(trial: TrialSummary, best: TrialSummary | None) -> str:
    if trial.vs_best is not None:
        return trial.vs_best.format(3)
    return "reference" if best is not None and trial.trial_id == best.trial_id else "–"


def format_trials(sweep: Sweep, trials: list[TrialSummary], best: TrialSummary | None) -> str:
    """A plain-text table: one line per trial, the searched values, status, step, metric and
    the paired dev-loss difference to the best trial (``–``: no per-task losses to pair)."""
    keys = list(sweep.space)
    header = ["trial", "status", "step", sweep.metric, VS_BEST_HEADER, *keys]
    rows = [[("* " if best and t.trial_id == best.trial_id else "  ") + t.trial_id, t.status,
             "" if t.step is None else str(t.step),
             "" if t.metric is None else f"{t.metric:.4f}", _vs_best_cell(t, best),
             *[_short(t.params.get(k)) for k in keys]] for t in trials]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
             for r in [header, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
