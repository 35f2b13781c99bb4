"""The configuration: validation names the field, conversions round-trip."""
import json
from pathlib import Path

import pytest

from pipeline.config import PRESETS, ConfigError, RunConfig, build_config


def test_defaults_follow_method_md():
    config = RunConfig()
    assert config.diffusion.timesteps == 2000 and config.diffusion.schedule == "linear"
    assert config.train.objective == "unrolled" and config.denoiser.bottleneck == 32
    assert config.prompt.context.startswith("Below is an instruction that describes a task.")


# What each preset resolved to before the dataclass defaults became the main job (they were the
# paper's set-up): `make run` (main), `--preset paper`, and every smoke-based test must not move.
PINNED = Path(__file__).with_name("presets_resolved.json")


@pytest.mark.parametrize("preset", ["main", "paper", "smoke"])
def test_presets_resolve_to_their_pinned_configuration(preset):
    assert build_config(preset).to_dict() == json.loads(PINNED.read_text())[preset]


def test_the_main_preset_is_the_defaults_and_what_ddpt_run_starts_from():
    from pipeline.cli import build_parser

    assert PRESETS["main"] == {} and build_config("main") == RunConfig() == build_config()
    assert build_parser().parse_args(["run"]).preset == "main"


def test_flat_round_trip():
    config = build_config("smoke", overrides=["denoiser.bottleneck=8", "train.lr=3e-4"])
    flat = config.to_flat()
    assert flat["denoiser.bottleneck"] == 8 and flat["train.lr"] == 3e-4
    assert RunConfig.from_flat(flat) == config


def test_file_round_trip(tmp_path):
    config = build_config("smoke", overrides=["eval.metrics=[bleu4, chrf]"])
    config.save(tmp_path / "c.yaml")
    assert RunConfig.load(tmp_path / "c.yaml") == config


def test_config_file_applies_on_top_of_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\ndiffusion:\n  schedule: cosine\n")
    config = build_config("smoke", str(path))
    assert config.train.steps == 7 and config.diffusion.schedule == "cosine"
    assert config.model.name == PRESETS["smoke"]["model"]["name"]  # the preset stays under it


@pytest.mark.parametrize("override, message", [
    ("diffusion.schedule=quadratic", "diffusion.schedule: 'quadratic' is not one of"),
    ("train.steps=0", "train.steps: must be > 0"),
    ("train.steps=1.5", "train.steps: expected an integer"),
    ("train.ema_rate=2", r"train.ema_rate: must be in \(0, 1\]"),
    ("denoiser.width=3", r"unknown field\(s\) \['denoiser.width'\]"),
    ("trainer.steps=3", "unknown section 'trainer'"),
    ("model.trust_remote_code=maybe", "model.trust_remote_code: expected true/false"),
    ("steps=3", "expected 'section.field'"),
    ("data.columns={prompt: question}", r"data.columns: unknown record field\(s\) \['prompt'\]"),
    ("data.columns={output: 3}", "data.columns.output: expected str, got 3"),
    ("data.columns={output: ' '}", "data.columns.output: expected a column name"),
    ("data.columns=[instruction]", "data.columns: expected a mapping"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("main", overrides=[override])


def test_data_columns_round_trip(tmp_path):
    """data.columns from --set and from a file; it survives the flat form and YAML."""
    config = build_config("smoke", overrides=["data.columns={instruction: q, output: a}"])
    assert config.data.columns == {"instruction": "q", "output": "a"}
    assert RunConfig.from_flat(config.to_flat()) == config
    config.save(tmp_path / "c.yaml")
    assert RunConfig.load(tmp_path / "c.yaml") == config
    assert RunConfig().data.columns == {} and RunConfig().data.columns is not \
        RunConfig().data.columns
    one = config.with_overrides(["data.columns.input=context"])  # one entry, as MLflow logs it
    assert one.data.columns == {"instruction": "q", "output": "a", "input": "context"}
    with pytest.raises(ConfigError, match=r"data.columns: unknown record field\(s\) \['q'\]"):
        config.with_overrides(["data.columns.q=x"])


def test_bad_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        build_config("main", str(path))
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown field\(s\) \['train.stepz'\]"):
        build_config("main", str(path))
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        build_config("main", str(tmp_path / "missing.yaml"))


def test_batch_must_split_over_ray_workers():
    with pytest.raises(ConfigError, match="does not split evenly over distributed.num_workers=2"):
        build_config("main", overrides=["train.batch_size=7"])
    build_config("main", overrides=["train.batch_size=7", "distributed.backend=local"])


def test_the_written_out_default_config_matches_the_defaults():
    """cluster/configs/embedded-cpu.yaml says every value equals the default (device pinned)."""
    path = Path(__file__).resolve().parent.parent / "cluster" / "configs" / "embedded-cpu.yaml"
    written = build_config("main", str(path))
    expected = build_config("main", overrides=["model.device=cpu"])
    assert written.to_flat() == expected.to_flat()


def test_yaml_1_1_words_stay_strings(tmp_path):
    """`off`, `on`, `yes`, `no` are strings (YAML 1.2), on the command line and in files; only
    true/false are booleans. PyYAML's YAML 1.1 made `--set train.lm_autocast=off` a bool."""
    from pipeline.config import build_config, load_yaml

    assert build_config(overrides=["train.lm_autocast=off"]).train.lm_autocast == "off"
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lm_autocast: off\n")
    assert build_config(config_file=str(path)).train.lm_autocast == "off"
    assert load_yaml("[on, yes, no, true, False]") == ["on", "yes", "no", True, False]


def test_one_reader_for_config_files_sweep_spaces_and_experiment_specs(tmp_path):
    """Every YAML file is read by one reader and every preset looked up by one function: the
    same errors, each naming the file (and the key a preset came from)."""
    from pipeline.studies.experiment import load_experiment
    from pipeline.studies.sweep import load_sweep

    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    for load, what in ((lambda path: build_config("main", str(path)), "config file"),
                       (load_sweep, "space file"), (load_experiment, "experiment file")):
        with pytest.raises(ConfigError, match=f"list.yaml: a {what} holds a mapping, not a list"):
            load(listed)
        with pytest.raises(ConfigError, match=f"missing.yaml: {what} not found"):
            load(tmp_path / "missing.yaml")
    spec = tmp_path / "spec.yaml"
    spec.write_text("experiment: {preset: huge}\ndatasets: {a: {}}\narms: {}\n")
    with pytest.raises(ConfigError, match=r"spec.yaml: experiment.preset: unknown preset 'huge'; "
                       r"known: \['main', 'paper', 'smoke'\]"):
        load_experiment(spec)


@pytest.mark.parametrize("override, message", [
    ("execution.cpu_s=100000000000000000000", "execution.cpu_s: must be in (0, 86400]"),
    ("execution.cpu_s=1e20", "execution.cpu_s: expected an integer"),
    ("execution.cpu_s=1.0e20", "execution.cpu_s: expected an integer"),
    ("execution.max_file_mb=9999999999999", "execution.max_file_mb: must be in (0, 1048576]"),
    ("execution.memory_mb=0", "execution.memory_mb: must be in (0, 1048576]"),
    ("execution.timeout_s=inf", "execution.timeout_s: must be a finite number, got inf"),
    ("execution.timeout_s=.inf", "execution.timeout_s: must be a finite number, got inf"),
    ("execution.timeout_s=nan", "execution.timeout_s: must be a finite number, got nan"),
    ("execution.timeout_s=86401", "execution.timeout_s: must be in (0, 86400], got 86401.0"),
    ("train.weight_decay=-inf", "train.weight_decay: must be a finite number"),
])
def test_sandbox_limits_and_non_finite_numbers_fail_at_config_time(override, message):
    with pytest.raises(ConfigError) as err:
        build_config("main", overrides=[override])
    assert str(err.value).startswith(message), str(err.value)


def test_the_largest_sandbox_limits_pass():
    config = build_config("main", overrides=[
        "execution.timeout_s=86400", "execution.cpu_s=86400", "execution.memory_mb=1048576",
        "execution.max_file_mb=1048576"])
    assert config.execution.cpu_s == 86400 and config.execution.max_file_mb == 2 ** 20


def _violations(bounds) -> list:
    """Values that break ``bounds`` (a field's metadata["bounds"])."""
    values = []
    if bounds.choices is not None:
        values.append("__no_such_choice__")
    for low in (bounds.gt, bounds.ge):
        if low is not None:
            values.append(low - 1)
    for high in (bounds.lt, bounds.le):
        if high is not None:
            values.append(high + 1)
    if bounds.nonempty:
        values.append("  ")
    if bounds.at_least_one:
        values.append([])
    return values


def test_every_bound_is_checked_and_names_its_field():
    """Bounds live in the fields' metadata and are checked in one place: every bound of every
    field rejects a value past it, through --set, with the field's section.name."""
    import dataclasses

    checked = 0
    for section in dataclasses.fields(RunConfig):
        for item in dataclasses.fields(getattr(RunConfig(), section.name)):
            for value in _violations(item.metadata["bounds"]):
                key = f"{section.name}.{item.name}"
                with pytest.raises(ConfigError) as err:
                    RunConfig.from_flat({key: value}, base=RunConfig.from_dict(
                        {"distributed": {"backend": "local"}}))
                assert str(err.value).startswith(f"{key}: "), str(err.value)
                checked += 1
    assert checked > 70
