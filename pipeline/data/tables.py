"""User data read through Hugging Face `datasets`: a JSON, CSV or Parquet file, a folder written
by ``save_to_disk`` (or a folder of such files), or a hub name (``owner/name``, needs a network).

``data.columns`` maps a record field to the file's column. Every row is validated as a user JSONL
record is, before anything is returned; a problem is a `DataError` naming the file, the 1-based
row and the field (and its column). The validated records are also kept as one
`datasets.Dataset`: the table the Ray path hands to ``ray.data.from_huggingface``. `datasets` is
imported only when such data is read.
"""
from __future__ import annotations

import functools
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pipeline.data.example import Example
from pipeline.data.records import (
    ALL_RECORDS,
    MISSING_SPLIT,
    SPLITS,
    USER_FIELDS,
    DataError,
    check_unique,
    user_record,
    user_splits,
)
from pipeline.paths import cache_dir

if TYPE_CHECKING:
    import datasets

TABLE_SUFFIXES = {".json": "json", ".csv": "csv", ".parquet": "parquet"}  # datasets' builders
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REQUIRED = ("instruction", "output")
ROW_COLUMNS = ("id", "instruction", "input", "output", "tests")  # a record as a table row


@dataclass(frozen=True)
class Table:
    """A user's data read through `datasets`: every record, validated, in file order."""

    source: str  # the path or hub name, as errors name it
    examples: tuple[Example, ...]
    split_of: tuple[str, ...]  # each example's split
    splits: tuple[str, ...]  # the valid split names
    rows: datasets.Dataset  # the examples as ROW_COLUMNS, one row each, same order


def table_kind(dataset: str) -> str | None:
    """'file', 'folder' or 'hub' when ``data.dataset`` is read through `datasets`, else None
    (a built-in name, a .jsonl file, or an unknown name)."""
    path = Path(dataset).expanduser()
    if dataset.endswith((".jsonl", ".jsonl.gz")):
        return None
    if path.suffix.lower() in TABLE_SUFFIXES:
        return "file"
    if path.is_dir():
        return "folder"
    return "hub" if _HUB_NAME.match(dataset) else None


def read_table(dataset: str, columns: dict[str, str] | None = None) -> Table:
    """The table ``dataset`` names, its columns mapped by ``columns``; read once per process
    while the file stays unchanged."""
    kind = table_kind(dataset)
    if kind is None:
        raise DataError(f"{dataset!r} is not a file, folder or hub name read through datasets")
    where = dataset if kind == "hub" else str(Path(dataset).expanduser().resolve())
    return _read_cached(dataset, kind, tuple(sorted((columns or {}).items())),
                        (where, *_stamp(dataset)))


def load_table_examples(dataset: str, split: str,
                        columns: dict[str, str] | None = None) -> list[Example]:
    """Examples of ``split`` of a user's table (see `read_table`); ``all``: every row."""
    table = read_table(dataset, columns)
    if split == ALL_RECORDS:
        return list(table.examples)
    if split not in table.splits:
        raise DataError(f"unknown split {split!r} for data set {dataset!r}; valid splits: "
                        f"{', '.join(table.splits)}")
    return [ex for ex, name in zip(table.examples, table.split_of) if name == split]


def table_rows(examples: list[Example], dataset: str,
               columns: dict[str, str] | None = None) -> datasets.Dataset | None:
    """The rows of ``dataset``'s table these examples were read as (a `datasets.Dataset` of
    ROW_COLUMNS, in their order), for ``ray.data.from_huggingface``; None when ``dataset`` is
    not read through `datasets` or the examples are not all records of it."""
    if table_kind(dataset) is None:
        return None
    table = read_table(dataset, columns)
    indices = [ex.meta.get("index") for ex in examples]
    if not all(isinstance(i, int) and 0 <= i < len(table.examples) and table.examples[i] == ex
               for i, ex in zip(indices, examples)):
        return None
    return table.rows.select(indices)


# ---------------------------------------------------------------- reading

def _stamp(dataset: str) -> tuple[int, ...]:
    """Changes when the file or folder does (the cache key); () for a hub name."""
    path = Path(dataset).expanduser()
    files = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
    return tuple(n for p in files if p.is_file() for n in (p.stat().st_mtime_ns, p.stat().st_size))


@functools.lru_cache(maxsize=4)
def _read_cached(dataset: str, kind: str, columns: tuple[tuple[str, str], ...],
                 stamp: tuple) -> Table:
    """`read_table`'s work; ``stamp`` (the absolute path, mtimes and sizes) keys the cache."""
    source, parts = _read_parts(dataset, kind)
    return _validate(source, parts, dict(columns))


def _load(source: str, *args: Any, from_disk: bool = False, **kwargs: Any) -> Any:
    """``datasets.load_dataset`` into the project's cache folder (``load_from_disk`` with
    ``from_disk``); its errors as a DataError naming ``source``."""
    import datasets

    try:
        if from_disk:
            return datasets.load_from_disk(*args, **kwargs)
        return datasets.load_dataset(*args, cache_dir=str(cache_dir() / "datasets"), **kwargs)
    except Exception as err:  # datasets and pyarrow raise many kinds; all mean "cannot read it"
        raise DataError(f"datasets cannot read it ({type(err).__name__}: {err})", source,
                        hint="Give a JSON, CSV or Parquet file, or a folder written by "
                        "save_to_disk (docs/data.md)") from err


def _read_parts(dataset: str, kind: str) -> tuple[str, dict[str, datasets.Dataset]]:
    """(the source as errors name it, {split name: rows}); the name is "" for a table without
    named splits: a file, a Dataset, or a data set with only a train split."""
    import datasets

    path = Path(dataset).expanduser()
    if kind == "file":
        if not path.is_file():
            raise DataError("user data file not found", path, hint="Give an existing file "
                            "(relative to the working directory) or a folder")
        return str(path), {"": _load(str(path), TABLE_SUFFIXES[path.suffix.lower()],
                                     data_files=str(path), split="train")}
    if kind == "folder":
        saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        loaded = _load(str(path), str(path), from_disk=saved)
        source = str(path)
    else:
        _check_hub(dataset)
        loaded, source = _load(dataset, dataset), dataset
    if isinstance(loaded, datasets.Dataset):
        return source, {"": loaded}
    if list(loaded) == ["train"]:
        return source, {"": loaded["train"]}
    return source, dict(loaded)


def _check_hub(name: str) -> None:
    """Fail fast, naming data.dataset, when the hub is off or cannot be reached."""
    import datasets

    hint = ("A data.dataset that is neither a built-in name nor an existing file or folder is "
            "read as a Hugging Face hub name (owner/name), which needs a network; give a local "
            "file or folder instead (docs/data.md)")
    if datasets.config.HF_HUB_OFFLINE:
        raise DataError(f"data.dataset={name!r}: a hub name, but the hub is off "
                        "(HF_HUB_OFFLINE is set)", hint=hint)
    url = urlparse(datasets.config.HF_ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as err:
        raise DataError(f"data.dataset={name!r}: a hub name, but {url.geturl()} cannot be "
                        f"reached ({err})", hint=hint) from None


# ---------------------------------------------------------------- validation

def _column_map(part: datasets.Dataset, columns: dict[str, str],
                where: str) -> dict[str, str | None]:
    """Record field -> the column it is read from (None: absent, the field's default). A
    required or explicitly mapped column that is absent is a DataError naming it."""
    have, found = set(part.column_names), {}
    for name in USER_FIELDS:
        column = columns.get(name, name)
        if column in have:
            found[name] = column
        elif name in columns or name in _REQUIRED:
            raise DataError(f"column {column!r} not found; the columns are {sorted(have)}",
                            where, field=name, column=column, hint="Map the field to a column "
                            f"with data.columns, e.g. --set 'data.columns={{{name}: my_column}}'")
        else:
            found[name] = None
    return found


def _part_records(part: datasets.Dataset, part_name: str, where: str, columns: dict[str, str],
                  start: int) -> tuple[list[Example], list[str | None]]:
    """The examples of one part (indices from ``start``) and each one's ``split`` value."""
    mapping = _column_map(part, columns, where)
    if part_name:
        mapping["split"] = None  # the part's name is its split
    values = part.select_columns([c for c in mapping.values() if c]).to_dict()
    examples, given, seen = [], [], {}
    for row in range(1, len(part) + 1):
        def fail(problem: str, name: str, row: int = row) -> DataError:
            return DataError(problem, where, field=name, row=row, column=mapping[name])

        obj = {name: values[c][row - 1] for name, c in mapping.items() if c}
        obj.setdefault("id", f"{part_name or 'row'}-{row}")
        record = user_record(obj, fail)
        check_unique(record["id"], seen, row, "row", fail)
        given.append(record.pop("split"))
        examples.append(Example(**record, meta={"source": where, "row": row,
                                                "index": start + len(examples)}))
    return examples, given


def _validate(source: str, parts: dict[str, datasets.Dataset],
              columns: dict[str, str]) -> Table:
    """Every row of every part, checked and turned into an Example."""
    import datasets

    named = "" not in parts  # a data set with named splits
    if "split" in columns and named:
        raise DataError(f"data.columns maps 'split', but the data set has its own splits "
                        f"({', '.join(parts)}); drop the mapping", source)
    examples, given = [], []
    for part_name, part in parts.items():
        where = f"{source} [{part_name}]" if part_name else source
        part_examples, part_given = _part_records(part, part_name, where, columns, len(examples))
        examples += part_examples
        given += [part_name] * len(part_examples) if part_name else part_given
    if not examples:
        raise DataError("no records (the table is empty)", source)
    if named:
        split_of, splits = given, tuple(parts)
    else:
        split_of, splits = user_splits(given, lambda i: DataError(
            MISSING_SPLIT, source, field="split", row=examples[i].meta["row"],
            column=columns.get("split", "split"))), SPLITS
    rows = datasets.Dataset.from_dict(
        {name: [getattr(ex, name) for ex in examples] for name in ROW_COLUMNS},
        features=datasets.Features({name: datasets.Value("string") for name in ROW_COLUMNS}))
    return Table(source, tuple(examples), tuple(split_of), splits, rows)
