"""Batch sampling, in one process: prompts for a method, code for a batch of examples.

A *method* says which prompt the frozen LM gets and how it decodes (:data:`METHODS`). A
:class:`BatchSampler` loads the LM and the trained prompt models once and turns
``(method, examples)`` into one result record per example. A *pool* runs ``(method, examples)``
tasks: :class:`LocalPool` with one BatchSampler in this process (``pool.backend: local``), the
Ray pool (:mod:`pipeline.distributed.sampler_pool`) with one per actor. Everything a record
holds is a function of (config, checkpoints, method, example), never of the batch or the actor
it ran on, so a retried batch reproduces its records exactly.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from pipeline.config import METHOD_NAMES, ConfigError, DecodingConfig, RunConfig, SampleConfig
from pipeline.data.example import Example
from pipeline.decoding.autoregressive import decode_code, generate, generate_samples
from pipeline.lm.frozen import FrozenCodeLM
from pipeline.training.prompt_models import PROMPT_MODELS, is_conditional, sampling_args

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """prompt: None (the manual prompt) or the trained prompt model it samples from (a name in
    :data:`~pipeline.training.prompt_models.PROMPT_MODELS`); sampler: the reverse chain for DDPT
    prompts; decoding: the decoding strategy ('greedy' or 'spa')."""

    prompt: str | None = None
    sampler: str | None = None
    decoding: str = "greedy"
    help: str = ""


METHODS: dict[str, Method] = {
    "manual": Method(help="the manual prompt (delta = 0), greedy"),
    "prompt_tuning": Method("prompt_tuning", help="the soft prompt learned directly, greedy"),
    "ddpt": Method("ddpt", "ddpm", help="DDPT, prompts from the DDPM chain (T steps), greedy"),
    "ddpt_ddim": Method("ddpt", "ddim", help="DDPT, prompts from DDIM (S steps), greedy"),
    "spa": Method(decoding="spa", help="the manual prompt, SPA decoding"),
    "ddpt_spa": Method("ddpt", "ddim", "spa", help="DDPT (DDIM prompts) with SPA decoding"),
}
if tuple(METHODS) != METHOD_NAMES:  # eval.reference_method's choices name these, in order
    raise RuntimeError(f"sampler METHODS {list(METHODS)} differ from pipeline.config's "
                       f"METHOD_NAMES {list(METHOD_NAMES)}")


def check_methods(methods: list[str] | tuple[str, ...], field: str = "methods") -> None:
    """ConfigError naming ``field`` (where the names came from) for an unknown method."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"{field}: unknown method(s) {unknown}; known: {list(METHODS)}")


def prompt_models_needed(methods: list[str] | tuple[str, ...]) -> list[str]:
    """The trained prompt models these methods sample from, in registry order."""
    return [p for p in PROMPT_MODELS if any(METHODS[m].prompt == p for m in methods)]


def check_decoding(config: RunConfig, *, diffusion_model: bool) -> None:
    """A masked-diffusion LM decodes with ``decoding.strategy: diffusion``, and only it does."""
    strategy = config.decoding.strategy
    if diffusion_model and strategy != "diffusion":
        raise ConfigError(f"decoding.strategy: model.name={config.model.name!r} is a masked-"
                          f"diffusion LM; set decoding.strategy=diffusion (not {strategy!r})")
    if not diffusion_model and strategy == "diffusion":
        raise ConfigError(f"decoding.strategy: 'diffusion' needs a masked-diffusion LM "
                          f"(tiny-dream, a Dream/DiffuCoder folder), not {config.model.name!r}")
    if diffusion_model and config.execution.prompt_samples:
        raise ConfigError("execution.prompt_samples: not built for masked-diffusion LMs (their "
                          "n draws come from decoding.diffusion_temperature)")
    if diffusion_model and config.execution.num_samples > 1 and \
            config.decoding.diffusion_temperature == 0:
        raise ConfigError("decoding.diffusion_temperature: 0 gives execution.num_samples "
                          "identical draws; set it > 0 for pass@k with n > 1")


def example_seed(seed: int, example_id: str) -> int:
    """A per-example seed that does not depend on the batch the example lands in."""
    return zlib.crc32(f"{seed}:{example_id}".encode())


def task_fields(example: Example) -> dict[str, str]:
    """What a record keeps of its task, for reading it without the data: the instruction and
    the input (when there is one)."""
    return {"instruction": example.instruction, **({"input": example.input} if example.input
                                                    else {})}


def method_sample_config(method: Method, config: SampleConfig) -> SampleConfig:
    return dataclasses.replace(config, sampler=method.sampler or config.sampler)


def method_decoding(method: Method, config: DecodingConfig) -> DecodingConfig:
    return dataclasses.replace(config, strategy=method.decoding)


class BatchSampler:
    """The LM and the prompt models, loaded once; generates for batches of examples.

    Args:
        config: the run's configuration (model, prompt, sample, decoding, eval).
        checkpoints: prompt model name ('ddpt', 'prompt_tuning') -> checkpoint folder.
        lm: an already loaded LM to reuse (the local backend); built from ``config`` if None.
    """

    def __init__(self, config: RunConfig, checkpoints: dict[str, str | Path],
                 lm: FrozenCodeLM | None = None):
        from pipeline.lm.loader import build_lm
        from pipeline.training.checkpoint import load_prompt_model

        self.config = config
        self.lm = lm or build_lm(config)
        check_decoding(config, diffusion_model=self.lm.is_diffusion)
        self.prompt_models = {}
        for name, path in checkpoints.items():
            model, saved, _ = load_prompt_model(path, map_location=self.lm.device)
            if saved.model.name != config.model.name:
                log.warning("%s was trained with model %r, sampling with %r", path,
                            saved.model.name, config.model.name)
            if model.hidden_size != self.lm.hidden_size:
                raise ConfigError(f"{path}: prompt model width {model.hidden_size} does not "
                                  f"match model.name={config.model.name!r} ({self.lm.hidden_size})")
            self.prompt_models[name] = model.eval()
        self._shared: dict[str, torch.Tensor] = {}  # method -> its one shared direction

    def directions(self, method_name: str, examples: list[Example]) -> torch.Tensor | None:
        """The prompt direction per example, (B, n, d), or None for the manual prompt."""
        method = METHODS[method_name]
        if method.prompt is None:
            return None
        if method.prompt not in self.prompt_models:
            raise ConfigError(f"method {method_name!r} needs a trained {method.prompt!r} "
                              "checkpoint")
        model, sample, args = self._sampling(method, examples)
        # A conditional model gives a prompt per task (each row its example's condition); an
        # unconditional one with shared prompts samples its one prompt once.
        if not is_conditional(model) and sample.prompts == "shared":
            if method_name not in self._shared:
                generator = torch.Generator().manual_seed(sample.seed)
                self._shared[method_name] = model.sample_directions(1, generator, **args)[0]
            return self._shared[method_name].expand(len(examples), -1, -1)
        # One chain per example, all run as one batch (one denoiser call per step), seeded by
        # its id (or all by sample.seed: shared noise): an example's prompt does not depend on
        # the other rows of its batch.
        generators = [torch.Generator().manual_seed(
            sample.seed if sample.prompts == "shared" else example_seed(sample.seed, e.id))
            for e in examples]
        return model.sample_directions(len(examples), generators, **args)

    def _sampling(self, method: Method, examples: list[Example], repeat: int = 1
                  ) -> tuple[torch.nn.Module, SampleConfig, dict]:
        """The method's prompt model, its sample settings and ``sample_directions`` keywords;
        a conditional model's condition per example, each repeated ``repeat`` times."""
        model = self.prompt_models[method.prompt]
        sample = method_sample_config(method, self.config.sample)
        args = sampling_args(sample, model)
        if is_conditional(model):
            lm = self.lm
            condition = lm.condition(lm.collate(lm.encode(examples)).to(lm.device))
            args["condition"] = condition.repeat_interleave(repeat, dim=0)
        return model, sample, args

    @torch.no_grad()
    def run(self, method_name: str, examples: list[Example]) -> list[dict]:
        """One record per example: id, method, generation, reference, instruction (and input),
        code_ce (the reference code's cross-entropy under this prompt), and the batch's
        prompt/generation seconds."""
        method = METHODS[method_name]
        began = time.perf_counter()
        delta = self.directions(method_name, examples)
        prompted = time.perf_counter()
        lm, ec = self.lm, self.config.eval
        batch = lm.collate(lm.encode(examples)).to(lm.device)
        code_ce = lm.code_loss(batch, delta, per_example=True).tolist()
        scored = time.perf_counter()
        if lm.is_diffusion:
            generations, extras, samples = self._diffusion(method, examples, delta)
        else:
            decoding = method_decoding(method, self.config.decoding)
            generations = generate(lm, examples, delta, ec.max_new_tokens, decoding=decoding)
            extras = [{} for _ in examples]
            if method.prompt == "ddpt" and self.config.execution.prompt_samples:
                samples = self._prompt_samples(method_name, examples, decoding)
            else:
                samples = self._samples(examples, delta, decoding)
        done = time.perf_counter()
        records = [{"id": e.id, "method": method_name, "generation": g, "reference": e.output,
                    **task_fields(e), "code_ce": ce, "batch_size": len(examples),
                    "prompt_seconds": prompted - began, "generate_seconds": done - scored, **x}
                   for e, g, ce, x in zip(examples, generations, code_ce, extras)]
        for record, drawn in zip(records, samples or []):
            record["samples"] = drawn
        return records

    def _diffusion(self, method: Method, examples: list[Example], delta: torch.Tensor | None
                   ) -> tuple[list[str], list[dict], list[list[str]] | None]:
        """Masked-diffusion decoding (SPA's two canvases for SPA methods): the generations,
        each example's AR-ness and first-step confidences, and n draws per example when
        ``execution.num_samples`` > 1 (decoding.diffusion_temperature > 0)."""
        from pipeline.decoding.dllm import generate_ids_diffusion
        from pipeline.scoring.arness import arness_from_record

        lm, decoding, length = self.lm, self.config.decoding, self.config.eval.max_new_tokens
        spa = method.decoding == "spa"
        batch = lm.collate(lm.encode(examples), with_targets=False).to(lm.device)
        # Seeded by the batch's ids: a retried batch decodes the same way.
        seed = example_seed(decoding.seed, ",".join(e.id for e in examples))
        rows, record = generate_ids_diffusion(
            lm, batch, delta, length, decoding, spa=spa,
            generator=torch.Generator(lm.device).manual_seed(seed))
        curves = arness_from_record(record)
        first = record.first_step_confidence[:, batch.input_ids.shape[1]:]
        extras = [{"arness_local": curves.local[i].tolist(),
                   "arness_global": curves.global_[i].tolist(),
                   "first_step_confidence": first[i].nan_to_num(0.0).tolist()}
                  for i in range(len(examples))]
        n = self.config.execution.num_samples
        samples = None
        if n > 1:
            encoded = [e for e in lm.encode(examples) for _ in range(n)]
            repeated = lm.collate(encoded, with_targets=False).to(lm.device)
            drawn, _ = generate_ids_diffusion(
                lm, repeated, None if delta is None else delta.repeat_interleave(n, 0), length,
                decoding, spa=spa, generator=torch.Generator(lm.device).manual_seed(seed + 1))
            texts = decode_code(lm, drawn)
            samples = [texts[i:i + n] for i in range(0, len(texts), n)]
        return decode_code(lm, rows), extras, samples

    def _prompt_samples(self, method_name: str, examples: list[Example],
                        decoding: DecodingConfig) -> list[list[str]] | None:
        """``execution.num_samples`` n prompts per example, each from its own noise (seeded by
        the example's id and the draw's index), each decoded with the method's decoding: the
        prompt distribution's pass@k, against temperature samples at equal n."""
        n = self.config.execution.num_samples
        if n == 1:
            return None
        model, sample, args = self._sampling(METHODS[method_name], examples, repeat=n)
        generators = [torch.Generator().manual_seed(example_seed(sample.seed, f"{e.id}#{j}"))
                      for e in examples for j in range(n)]
        deltas = model.sample_directions(len(examples) * n, generators, **args)
        repeated = [e for e in examples for _ in range(n)]
        texts = generate(self.lm, repeated, deltas, self.config.eval.max_new_tokens,
                         decoding=decoding)
        return [texts[i:i + n] for i in range(0, len(texts), n)]

    def _samples(self, examples: list[Example], delta: torch.Tensor | None,
                 decoding: DecodingConfig) -> list[list[str]] | None:
        """``execution.num_samples`` sampled generations per example for pass@k (None when
        n = 1: greedy pass@1 scores ``generation``). SPA methods sample from SPA's logits."""
        n = self.config.execution.num_samples
        if n == 1:
            return None
        if decoding.strategy == "spa":
            sampled = dataclasses.replace(decoding, spa_sample=True)
        else:
            sampled = dataclasses.replace(decoding, strategy="sample")
        # Seeded by the batch's ids: a retried batch draws the same samples.
        seed = example_seed(decoding.seed, ",".join(e.id for e in examples))
        return generate_samples(self.lm, examples, n, delta, self.config.eval.max_new_tokens,
                                decoding=sampled, generator=torch.Generator().manual_seed(seed))


Task = tuple[str, list[Example]]  # (method, examples)


class SamplerPool(Protocol):
    """Runs tasks; ``on_records`` gets each task's records once, as it finishes."""

    def run(self, tasks: list[Task], on_records: Callable[[list[dict]], None], *,
            progress: bool = True) -> None: ...

    def close(self) -> None: ...


class LocalPool:
    """One :class:`BatchSampler` in this process (``pool.backend: local``)."""

    def __init__(self, config: RunConfig, checkpoints: dict[str, str | Path],
                 lm: FrozenCodeLM | None = None):
        self.sampler = BatchSampler(config, checkpoints, lm=lm)

    def run(self, tasks: list[Task], on_records: Callable[[list[dict]], None], *,
            progress: bool = True) -> None:
        from pipeline.generation.progress import MethodProgress

        lines = MethodProgress(tasks, enabled=progress)
        try:
            for method, chunk in tasks:
                on_records(self.sampler.run(method, chunk))
                lines.done(method, len(chunk))
        finally:
            lines.close()

    def close(self) -> None:
        pass
