"""The splits a run reads, from its ``data`` section: what it trains on, the held-out dev set
of the dev loss, and what it evaluates on (with tests, for execution). Every problem surfaces
here, before any model is loaded."""
from __future__ import annotations

from pipeline.config import DataConfig
from pipeline.data.example import Example, missing_tests
from pipeline.data.loaders import DataError, load_examples


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
    """The first ``data.max_eval_examples`` of ``data.eval_split``: a fixed subset."""
    return load_examples(data.dataset, data.eval_split, data.data_dir,
                         data.max_eval_examples or None, data.columns)


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
