"""Read the built-in NL-to-code data sets and user JSONL files into `Example` records; other
user files go through `datasets` (pipeline.data.tables). `load_examples` is the entry point.

The raw files stay in the shared data folder (see its MANIFEST.md); nothing is copied into
the repository. Every record is validated before anything is returned, and every problem is
reported as a `DataError` naming the file, the 1-based line and the field.
"""
from __future__ import annotations

import ast
import gzip
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.data.example import Example
from pipeline.data.records import (
    ALL_RECORDS,
    MISSING_SPLIT,
    SPLITS,
    USER_FIELDS,
    DataError,
    carve,
    check_unique,
    user_record,
    user_splits,
)
from pipeline.data.tables import load_table_examples, table_kind
from pipeline.paths import PROJECT_ROOT

ENV_VAR = "DDPT_DATA_DIR"
_FIX_DIR = (f"Pass --data-dir DIR or set {ENV_VAR}=DIR to the shared data folder "
            "(the files come from it; see its MANIFEST.md)")
_Record = tuple[int, Any]  # (1-based line where the record starts, decoded JSON value)


# ---------------------------------------------------------------- locating files

def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder: `data_dir`, else $DDPT_DATA_DIR, else <project root>/../shared/data."""
    if data_dir is not None:
        path, source = Path(data_dir), "--data-dir"
    elif os.environ.get(ENV_VAR):
        path, source = Path(os.environ[ENV_VAR]), ENV_VAR
    else:
        path, source = PROJECT_ROOT.parent / "shared" / "data", "default"
    path = path.expanduser()
    if not path.is_dir():
        raise DataError(f"data folder not found (from {source})", path, hint=_FIX_DIR)
    return path


def _data_file(data_dir: Path, rel: str, dataset: str) -> Path:
    path = data_dir / rel
    if not path.is_file():
        raise DataError(f"missing data file of data set {dataset!r}", path,
                        hint=f"Expected {rel} under the data folder. {_FIX_DIR}")
    return path


# ---------------------------------------------------------------- reading raw files

def _read_text(path: Path) -> str:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read file ({e})", path) from None


def _read_jsonl(path: Path) -> list[_Record]:
    """(line, value) for each non-blank line of a JSON Lines file (optionally gzipped)."""
    records = []
    for lineno, text in enumerate(_read_text(path).splitlines(), 1):
        if text.strip():
            try:
                records.append((lineno, json.loads(text)))
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", path,
                                lineno) from None
    return records


def _read_json_array(path: Path) -> list[_Record]:
    """(start line, value) for each element of a JSON array, decoded element by element."""
    text, decoder = _read_text(path), json.JSONDecoder()
    pos, line, counted = 0, 1, 0

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def fail(problem: str, at: int) -> DataError:
        return DataError(problem, path, text.count("\n", 0, at) + 1)

    pos = skip_ws(pos)
    if not text.startswith("[", pos):
        raise fail("expected a JSON array of records ('[' not found)", pos)
    pos, records = skip_ws(pos + 1), []
    if text.startswith("]", pos):
        return records
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", path, e.lineno) from None
        records.append((line, value))
        pos = skip_ws(pos)
        if text.startswith(",", pos):
            pos = skip_ws(pos + 1)
        elif text.startswith("]", pos):
            break
        else:
            raise fail("malformed JSON: expected ',' or ']' after a record", pos)
    if skip_ws(pos + 1) != len(text):
        raise fail("malformed JSON: extra data after the closing ']'", pos + 1)
    return records


# ---------------------------------------------------------------- field validation

def _obj(rec: _Record, path: Path) -> dict:
    line, value = rec
    if not isinstance(value, dict):
        raise DataError(f"record is a JSON {type(value).__name__}, expected an object", path, line)
    return value


def _str(obj: dict, name: str, path: Path, line: int, *, required: bool = True,
         nonempty: bool = True, default: str | None = None) -> str | None:
    """obj[name] as a string; missing/null gives `default` unless `required`."""
    value = obj.get(name)
    need = "a non-empty string" if nonempty else "a string"
    if value is None:
        if required:
            raise DataError(f"missing (expected {need})", path, line, name)
        return default
    if not isinstance(value, str):
        raise DataError(f"got {type(value).__name__} {value!r:.40}, expected {need}", path,
                        line, name)
    if nonempty and not value.strip():
        raise DataError(f"empty (expected {need})", path, line, name)
    return value


def _nl(code: str) -> str:
    """Normalise Windows/old-Mac line ends to '\\n'."""
    return code.replace("\r\n", "\n").replace("\r", "\n")


# ---------------------------------------------------------------- built-in data sets

def load_conala(data_dir: Path, split: str) -> list[Example]:
    """CoNaLa curated: official train minus a seeded 200-record validation carve, and test."""
    file_split = "test" if split == "test" else "train"
    path = _data_file(data_dir, f"conala/conala-{file_split}.json", "conala")
    examples = []
    for index, rec in enumerate(_read_json_array(path)):
        obj, line = _obj(rec, path), rec[0]
        rewritten = _str(obj, "rewritten_intent", path, line, required=False, nonempty=False)
        intent = rewritten if rewritten and rewritten.strip() else _str(obj, "intent", path, line)
        examples.append(Example(
            id=f"conala-{file_split}-{index}", instruction=intent,
            output=_str(obj, "snippet", path, line),
            meta={"question_id": obj.get("question_id"), "source": str(path), "line": line}))
    if file_split == "test":
        return examples
    names = carve(len(examples), {"validation": 200})
    return [ex for ex, name in zip(examples, names) if name == split]


def load_codealpaca(data_dir: Path, split: str) -> list[Example]:
    """Code Alpaca 2k: no official split; seeded carve of test 200, validation 100, rest train."""
    path = _data_file(data_dir, "codealpaca/code_alpaca_2k.json", "codealpaca")
    examples = []
    for index, rec in enumerate(_read_json_array(path)):
        obj, line = _obj(rec, path), rec[0]
        examples.append(Example(
            id=f"codealpaca-{index}", instruction=_str(obj, "instruction", path, line),
            input=_str(obj, "input", path, line, required=False, nonempty=False, default=""),
            # two upstream records (237, 1859) have an empty output; they are kept
            output=_str(obj, "output", path, line, nonempty=False),
            meta={"index": index, "source": str(path), "line": line}))
    names = carve(len(examples), {"test": 200, "validation": 100})
    return [ex for ex, name in zip(examples, names) if name == split]


def load_humaneval(data_dir: Path, split: str) -> list[Example]:
    """HumanEval: 164 test problems; the reference output is the full runnable function."""
    path = _data_file(data_dir, "humaneval/HumanEval.jsonl.gz", "humaneval")
    examples = []
    for rec in _read_jsonl(path):
        obj, line = _obj(rec, path), rec[0]
        task_id, prompt, entry = (_str(obj, k, path, line)
                                  for k in ("task_id", "prompt", "entry_point"))
        examples.append(Example(
            id=task_id, instruction="Complete the following Python function:\n" + prompt,
            output=prompt + _str(obj, "canonical_solution", path, line),
            tests=_str(obj, "test", path, line) + f"\ncheck({entry})\n",
            meta={"entry_point": entry, "prompt": prompt, "source": str(path), "line": line}))
    return examples


_MBPP_TEST_INTRO = "Your code should pass this test:\n"  # before the first assert, in input
_MBPP_RANGES = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}


def load_mbpp(data_dir: Path, split: str) -> list[Example]:
    """MBPP (full): the upstream task-id split; tests = setup code, then the asserts."""
    path = _data_file(data_dir, "mbpp/mbpp.jsonl", "mbpp")
    lo, hi = _MBPP_RANGES[split]
    examples = []
    for rec in _read_jsonl(path):
        obj, line = _obj(rec, path), rec[0]
        task_id, asserts = obj.get("task_id"), obj.get("test_list")
        if type(task_id) is not int:
            raise DataError(f"got {task_id!r:.40}, expected an integer", path, line, "task_id")
        if not (isinstance(asserts, list) and asserts and all(isinstance(t, str) for t in asserts)):
            raise DataError("expected a non-empty list of assert strings", path, line, "test_list")
        setup = _str(obj, "test_setup_code", path, line, required=False, nonempty=False, default="")
        example = Example(
            id=f"mbpp-{task_id}", instruction=_str(obj, "text", path, line),
            input=_MBPP_TEST_INTRO + asserts[0],
            output=_nl(_str(obj, "code", path, line)),
            tests="\n".join(_nl(t) for t in ([setup] if setup.strip() else []) + asserts) + "\n",
            meta={"task_id": task_id, "challenge_test_list": obj.get("challenge_test_list", []),
                  # what the prompt shows: selection's visible test (pipeline/data/visible.py)
                  "visible_tests": "\n".join(_nl(t) for t in (
                      [setup] if setup.strip() else []) + asserts[:1]) + "\n",
                  "source": str(path), "line": line})
        if lo <= task_id <= hi:
            examples.append(example)
    return examples


def load_mbpp_functions(data_dir: Path, split: str) -> list[Example]:
    """MBPP in HumanEval's shape: the same tasks, splits and tests, but the instruction is a
    function to complete (the reference code's imports, the tested function's signature and a
    docstring with the task's text and its first test), as HumanEval asks. A prompt trained on
    MBPP's one-line instructions explains a given signature instead of completing it
    (docs/results.md): this is function-shaped training and dev data for HumanEval."""
    return [_as_function(example) for example in load_mbpp(data_dir, split)]


def _as_function(example: Example) -> Example:
    path, line = example.meta["source"], example.meta["line"]
    try:
        with warnings.catch_warnings():  # upstream regexes in plain strings ("\w"): not ours
            warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
            tree = ast.parse(example.output)
    except SyntaxError as error:
        raise DataError(f"the reference code does not parse ({error.msg})", path, line,
                        "code") from None
    # The tested function: the top-level def that the tests call first.
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    calls = {name: match.start() for name in functions
             if (match := re.search(rf"\b{re.escape(name)}\s*\(", example.tests))}
    if not calls:
        raise DataError("no top-level function of the reference code is called by its tests",
                        path, line, "code")
    entry = min(calls, key=calls.get)
    node = functions[entry]
    imports = [ast.get_source_segment(example.output, n) for n in tree.body
               if isinstance(n, (ast.Import, ast.ImportFrom))]
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    first_test = example.input.removeprefix(_MBPP_TEST_INTRO)
    # Escaped so that the docstring stays one valid string literal.
    text = f"{example.instruction.strip()}\n{first_test}".replace("\\", "\\\\")
    text = text.replace('"""', "'''")
    docstring = "\n".join(f"    {row}" if row.strip() else "" for row in text.splitlines())
    prompt = ("\n".join(imports) + "\n\n\n" if imports else "") + \
        f'def {entry}({ast.unparse(node.args)}){returns}:\n    """\n{docstring}\n    """\n'
    return replace(example, instruction="Complete the following Python function:\n" + prompt,
                   input="", meta={**example.meta, "entry_point": entry, "prompt": prompt})


# ---------------------------------------------------------------- user JSONL

def load_user_jsonl(path: str | os.PathLike, split: str,
                    columns: dict[str, str] | None = None) -> list[Example]:
    """A user's JSONL file: id, instruction, output, optional input/tests/split, extras to meta.
    ``columns`` maps a record field to the key it is read from (default: its own name)."""
    path, columns = Path(path).expanduser(), columns or {}
    if not path.is_file():
        raise DataError("user data file not found", path,
                        hint="Give an existing .jsonl/.jsonl.gz path (relative to the working "
                        "directory)")
    keys = {name: columns.get(name, name) for name in USER_FIELDS}
    examples, splits, seen = [], [], {}
    for rec in _read_jsonl(path):
        obj, line = _obj(rec, path), rec[0]

        def fail(problem: str, name: str, line: int = line) -> DataError:
            return DataError(problem, path, line, name, column=keys[name])

        record = user_record({name: obj.get(key) for name, key in keys.items()}, fail)
        check_unique(record["id"], seen, line, "line", fail)
        splits.append(record.pop("split"))
        extras = {k: v for k, v in obj.items() if k not in keys.values()}
        examples.append(Example(**record, meta={**extras, "source": str(path), "line": line}))
    if not examples:
        raise DataError("no records (the file is empty)", path)
    names = user_splits(splits, lambda i: DataError(
        MISSING_SPLIT, path, examples[i].meta["line"], "split", column=keys["split"]))
    return [ex for ex, name in zip(examples, names) if split in (name, ALL_RECORDS)]


# ---------------------------------------------------------------- entry point

Loader = Callable[[Path, str], list[Example]]
DATASETS: dict[str, Loader] = {
    "conala": load_conala, "codealpaca": load_codealpaca,
    "humaneval": load_humaneval, "mbpp": load_mbpp, "mbpp_functions": load_mbpp_functions,
}
DATASET_SPLITS: dict[str, tuple[str, ...]] = {
    "conala": SPLITS, "codealpaca": SPLITS, "humaneval": ("test",),
    "mbpp": tuple(_MBPP_RANGES), "mbpp_functions": tuple(_MBPP_RANGES),
}


def _is_user_file(dataset: str) -> bool:
    return dataset.endswith((".jsonl", ".jsonl.gz"))


def _check_split(dataset: str, split: str, valid: tuple[str, ...]) -> None:
    if split not in valid and split != ALL_RECORDS:
        only = f"{dataset} has only a {valid[0]!r} split" if len(valid) == 1 else ""
        raise DataError(f"unknown split {split!r} for data set {dataset!r}; valid splits: "
                        f"{', '.join(valid)}" + (f" ({only})" if only else ""))


def load_examples(dataset: str, split: str, data_dir: str | os.PathLike | None = None,
                  limit: int | None = None,
                  columns: dict[str, str] | None = None) -> list[Example]:
    """Examples of `split` of a built-in data set (see DATASETS), of a user .jsonl file, or of
    a file, folder or hub name read through `datasets` (pipeline.data.tables). ``columns``
    (``data.columns``) maps a user record's fields to the file's columns.

    `limit` keeps the first N in file order (the order is stable across calls). ``split``
    ``all`` (:data:`ALL_RECORDS`) is every record of the data set, split by split.
    """
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    if dataset in DATASETS:
        if columns:
            raise DataError(f"data.columns is for your own files; the built-in data set "
                            f"{dataset!r} has its own field mapping (docs/data.md)")
        _check_split(dataset, split, DATASET_SPLITS[dataset])
        folder = resolve_data_dir(data_dir)
        examples = [example for name in (DATASET_SPLITS[dataset] if split == ALL_RECORDS
                                         else (split,))
                    for example in DATASETS[dataset](folder, name)]
    elif _is_user_file(dataset):
        _check_split(dataset, split, SPLITS)
        examples = load_user_jsonl(dataset, split, columns)
    elif table_kind(dataset) is not None:
        examples = load_table_examples(dataset, split, columns)
    else:
        raise DataError(f"unknown data set {dataset!r}; known: {', '.join(DATASETS)}, a path to "
                        "a .jsonl, .json, .csv or .parquet file or to a folder, or a Hugging "
                        "Face hub name owner/name")
    return examples if limit is None else examples[:limit]
