"""The results file keeps everything written and survives a torn last line."""
import pytest

from pipeline.scoring.results import ResultStore


def record(i, method="m"):
    return {"id": f"x{i}", "method": method, "generation": "g", "reference": "r"}


def test_append_and_resume(tmp_path):
    store = ResultStore(tmp_path / "samples.jsonl")
    store.append([record(0), record(1)])
    store.append([record(1), record(2, "other")])  # a retried example replaces, never duplicates
    assert store.done_ids("m") == {"x0", "x1"}
    assert len(store.load()) == 3


def test_torn_last_line_is_dropped_then_repaired(tmp_path):
    store = ResultStore(tmp_path / "samples.jsonl")
    store.append([record(0)])
    with open(store.path, "a") as handle:
        handle.write('{"id": "x1", "meth')  # a crash mid-write
    assert store.done_ids("m") == {"x0"}
    store.append([record(1)])
    assert store.done_ids("m") == {"x0", "x1"}


def test_corruption_in_the_middle_names_the_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match=r"samples.jsonl:1: missing field\(s\)"):
        ResultStore(path).load()
    path.write_text('nonsense\n{"id": "a", "method": "m", "generation": "", "reference": ""}\n')
    with pytest.raises(ValueError, match="samples.jsonl:1: not valid JSON"):
        ResultStore(path).load()
