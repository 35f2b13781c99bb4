"""Ray Data glue: examples -> a tokenized Dataset, and a worker's shard -> training batches.

Tokenization runs in ``map_batches`` actors that build the tokenizer once each; rows carry token
id lists, which workers pad into :class:`~pipeline.lm.frozen.Batch` es.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import ray.data
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline.config import RunConfig
from pipeline.data.example import Example
from pipeline.data.tables import table_rows
from pipeline.lm.frozen import Batch, FrozenCodeLM
from pipeline.lm.loader import load_hf_config, load_tokenizer
from pipeline.lm.template import SPAN_NAMES, EncodedExample, PromptTemplate


class TokenizeExamples:
    """A ``map_batches`` callable class: renders and tokenizes a batch of example rows."""

    def __init__(self, config: dict[str, Any]):
        run_config = RunConfig.from_dict(config)
        tokenizer = load_tokenizer(run_config.model)
        encoder_decoder = load_hf_config(run_config.model).is_encoder_decoder
        self.template = PromptTemplate(tokenizer, run_config.prompt,
                                       is_encoder_decoder=encoder_decoder)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"id": [], "prompt_ids": [], "context_start": [], "target_ids": [],
                                **{f"span_{name}": [] for name in SPAN_NAMES}}
        for i in range(len(batch["id"])):
            example = Example(id=str(batch["id"][i]), instruction=str(batch["instruction"][i]),
                              output=str(batch["output"][i]), input=str(batch["input"][i]))
            encoded = self.template.encode(example)
            out["id"].append(encoded.id)
            out["prompt_ids"].append(np.asarray(encoded.prompt_ids, dtype=np.int64))
            out["context_start"].append(encoded.context_start)
            out["target_ids"].append(np.asarray(encoded.target_ids, dtype=np.int64))
            for name in SPAN_NAMES:  # token positions: conditions and SPA anchors need them
                out[f"span_{name}"].append(np.asarray(encoded.spans.get(name, ()),
                                                      dtype=np.int64))
        return out


def example_rows(examples: list[Example], config: RunConfig) -> ray.data.Dataset:
    """The examples as Ray Data rows (id, instruction, input, output): read from their
    `datasets` table with ``ray.data.from_huggingface`` when they are a user table's records
    (pipeline.data.tables), else from Python rows."""
    columns = ["id", "instruction", "input", "output"]
    table = table_rows(examples, config.data.dataset, config.data.columns)
    if table is not None:
        return ray.data.from_huggingface(table.select_columns(columns))
    return ray.data.from_items([{name: getattr(e, name) for name in columns} for e in examples])


def tokenized_dataset(examples: list[Example], config: RunConfig) -> ray.data.Dataset:
    dataset = example_rows(examples, config).map_batches(
        TokenizeExamples, fn_constructor_kwargs={"config": config.to_dict()}, batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=config.distributed.data_cpus,
    )
    # Each epoch of a streamed dataset re-runs the pipeline, tokenizer actor start included.
    return dataset.materialize() if config.distributed.cache_tokenized else dataset


class CollateEncoded(NumpyBatchCollateFn):
    """Token-id rows -> a padded :class:`Batch` (runs on the training worker)."""

    def __init__(self, lm: FrozenCodeLM):
        self.lm = lm

    def __call__(self, batch: dict[str, np.ndarray]) -> Batch:
        return self.lm.collate(to_encoded(batch))


def to_encoded(batch: dict[str, np.ndarray]) -> list[EncodedExample]:
    return [
        EncodedExample(id=str(batch["id"][i]), prompt_ids=batch["prompt_ids"][i].tolist(),
                       context_start=int(batch["context_start"][i]),
                       target_ids=batch["target_ids"][i].tolist(),
                       spans={name: tuple(batch[f"span_{name}"][i].tolist())
                              for name in SPAN_NAMES if f"span_{name}" in batch})
        for i in range(len(batch["id"]))
    ]


def shard_batches(shard, lm: FrozenCodeLM, batch_size: int, seed: int, epoch: int = 0,
                  skip: int = 0) -> Iterator[tuple[int, int, Batch]]:
    """Endless ``(epoch, index_in_epoch, Batch)`` from a worker's shard, epoch after epoch,
    full batches only (ranks must run the same number of steps), shuffled per epoch with a
    seeded local buffer. ``skip`` drops the first batches of the first epoch (a resume)."""
    while True:
        index = 0
        iterator = shard.iter_torch_batches(
            batch_size=batch_size, drop_last=True, collate_fn=CollateEncoded(lm),
            local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed * 7919 + epoch,
        )
        for batch in iterator:
            if index >= skip:
                yield epoch, index, batch
            index += 1
        if index == 0:
            raise RuntimeError(f"a training worker's data shard holds fewer than {batch_size} "
                               "examples: use more data, fewer workers or a smaller batch")
        epoch, skip = epoch + 1, 0


def one_pass(shard, lm: FrozenCodeLM, batch_size: int) -> Iterator[Batch]:
    """Every example of a worker's shard once, in order, as Batches (for statistics)."""
    yield from shard.iter_torch_batches(batch_size=batch_size, collate_fn=CollateEncoded(lm))
