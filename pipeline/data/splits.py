"""The splits a run reads, from its ``data`` section: what it trains on, the held-out dev set
of the dev loss, and what it evaluates on (with tests, for execution). Every problem surfaces
here, before any model is loaded."""
from __future__ import annotations

import itertools
import math
import random

from pipeline.config import DataConfig
from pipeline.data.example import Example, missing_tests
from pipeline.data.loaders import DataError, load_examples
from pipeline.data.records import ALL_RECORDS


def train_examples(data: DataConfig) -> list[Example]:
    """``data.train_split``, the first ``data.max_train_examples`` (0: all)."""
    return load_examples(data.dataset, data.train_split, data.data_dir,
                         data.max_train_examples or None, data.columns)


def dev_examples(data: DataConfig) -> list[Example]:
    """The first ``data.max_dev_examples`` of ``data.dev_split``: the held-out set of the dev
    loss (``train.eval_every``, sweeps). A missing or empty split fails here."""
    try:
        examples = load_examples(data.dataset, data.dev_split, data.data_dir,
                                 data.max_dev_examples or None, data.columns)
    except DataError as err:
        raise DataError(f"data.dev_split={data.dev_split!r}: {err}; set data.dev_split to "
                        "another split") from err
    if not examples:
        raise DataError(f"data.dev_split={data.dev_split!r}: the split of {data.dataset} is "
                        "empty")
    return examples


def eval_examples(data: DataConfig) -> list[Example]:
    """``data.max_eval_examples`` tasks of ``data.eval_split`` (0: all), chosen as
    ``data.eval_sample`` says (:func:`take_sample`), in file order."""
    examples = load_examples(data.dataset, data.eval_split, data.data_dir, None, data.columns)
    return take_sample(examples, data.max_eval_examples, data.eval_sample, data.sample_seed)


_GOLDEN = (math.sqrt(5) - 1) / 2  # 1 / phi: the step of the most evenly spread sequence


def spread_order(count: int, seed: int) -> list[int]:
    """Every position 0..count-1 once, in a seeded order whose every prefix is spread evenly
    over the positions: the j-th is ``floor(count * frac(u + j / phi))`` (the golden ratio's
    Kronecker sequence from a start u drawn with ``seed``), skipping positions already taken.
    After m points the sequence's gaps are at most about 2.6 / m (the three-gap theorem), so
    the first N positions leave no stretch much longer than 2.6 count / N unsampled, and every
    position is reached within about 3 count steps."""
    start, order, taken = random.Random(seed).random(), [], set()
    for step in itertools.takewhile(lambda _: len(order) < count, itertools.count()):
        position = int(count * ((start + step * _GOLDEN) % 1.0))
        if position not in taken:
            taken.add(position)
            order.append(position)
    return order


def take_sample(examples: list[Example], count: int, how: str, seed: int) -> list[Example]:
    """``count`` of ``examples`` (0, or count >= len: all of them), kept in file order:
    ``how='first'``, the first ones; ``how='spread'``, those at the first ``count`` positions of
    :func:`spread_order` (so a sample of N holds every smaller sample of the same seed)."""
    if not count or count >= len(examples):
        return list(examples)
    if how == "first":
        return list(examples[:count])
    if how != "spread":
        raise ValueError(f"unknown sample {how!r}; known: 'spread', 'first'")
    chosen = set(spread_order(len(examples), seed)[:count])
    return [example for index, example in enumerate(examples) if index in chosen]


def record_count(data: DataConfig) -> int:
    """How many records ``data.dataset`` holds, over all its splits."""
    return len(load_examples(data.dataset, ALL_RECORDS, data.data_dir, None, data.columns))


def tested_eval_examples(data: DataConfig) -> list[Example]:
    """:func:`eval_examples`; a DataError (naming file and field) unless all have tests."""
    examples = eval_examples(data)
    if not examples:
        raise DataError(f"split {data.eval_split!r} of data set {data.dataset!r} has no examples",
                        hint="Check data.eval_split (for a user file: each record's 'split')")
    untested = missing_tests(examples)
    if untested:
        source = examples[0].meta.get("source", data.dataset)
        first = next(ex for ex in examples if ex.id == untested[0]).meta
        raise DataError(
            f"{len(untested)} of {len(examples)} examples of split {data.eval_split!r} have no "
            f"tests (ids {', '.join(map(repr, untested[:5]))}"
            f"{', ...' if len(untested) > 5 else ''}); execution needs Python that raises when "
            "the code is wrong", source, first.get("line"), "tests", row=first.get("row"),
            column=data.columns.get("tests", "tests"))
    return examples
