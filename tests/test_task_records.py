"""Per-task record tables: built from a real results store, written as deterministic gzip'd
CSV that round-trips byte for byte, read back with errors that name the line, and paired into
the statistics."""
from __future__ import annotations

import gzip
import math
import random

import pytest

from pipeline.scoring.results import ResultStore
from pipeline.scoring.task_records import (
    COLUMNS,
    TaskRecord,
    chain_label,
    compare_to_reference,
    paired_values,
    read_table,
    table_bytes,
    task_records,
    write_table,
)

CHAINS = {"manual": "greedy", "ddpt": "ddim-3 eta=0 + greedy"}


def store_with_records(path, statuses=None) -> ResultStore:
    """A results store as a comparison leaves it: sampled records, then the sandbox's
    statuses appended over them (the store keeps the last record of each key)."""
    store = ResultStore(path)
    sampled = [{"id": f"MBPP/{i}", "method": method, "generation": "x = 1",
                "reference": "x = 2", "code_ce": 0.5 + i / 7 + (0.1 if method == "ddpt" else 0)}
               for method in ("manual", "ddpt") for i in range(6)]
    store.append(sampled)
    scored = []
    for record in sampled:
        i = int(record["id"].split("/")[1])
        passed = i % 3 == 0 if record["method"] == "ddpt" else i == 0
        record = {**record, "status": "passed" if passed else "failed", "exec_message": "",
                  "cases_passed": 3 if passed else i % 3, "cases_total": 3}
        if statuses:
            record["statuses"] = statuses
        scored.append(record)
    store.append(scored)
    return store


def test_records_from_the_results_store(tmp_path):
    rows = task_records(store_with_records(tmp_path / "samples.jsonl").load(), seed=1,
                        chains=CHAINS)
    assert [(r.method, r.task_id) for r in rows][:2] == [("ddpt", "MBPP/0"), ("ddpt", "MBPP/1")]
    first = rows[0]
    assert first == TaskRecord("ddpt", 1, "MBPP/0", "passed", pytest.approx(0.6),
                               "ddim-3 eta=0 + greedy", 3, 3)
    assert (rows[1].cases_passed, rows[1].cases_total) == (1, 3)  # the sandbox's counts
    assert first.pass_fraction == 1.0 and rows[1].pass_fraction == 0.0
    sampled = task_records(store_with_records(tmp_path / "n4.jsonl",
                                              ["passed", "failed", "passed", "timeout"]).load(),
                           seed=0, chains=CHAINS)
    assert (sampled[0].samples_passed, sampled[0].samples_run) == (2, 4)
    assert sampled[0].pass_fraction == 0.5
    unexecuted = TaskRecord("manual", 0, "conala/1", "", 1.2, "greedy")
    assert math.isnan(unexecuted.pass_fraction)
    with pytest.raises(ValueError, match="no chain given for method 'ddpt'"):
        task_records(store_with_records(tmp_path / "x.jsonl").load(), seed=0,
                     chains={"manual": "greedy"})


def test_tables_round_trip_byte_for_byte(tmp_path):
    rows = task_records(store_with_records(tmp_path / "samples.jsonl",
                                           ["passed", "error"]).load(), seed=2, chains=CHAINS)
    rows.append(TaskRecord("manual", 2, 'odd, "quoted" id', "", None, "greedy"))
    rows.append(TaskRecord("ddpt", 2, "ce=1/3", "failed", 1 / 3, "deterministic + greedy"))
    rows.append(TaskRecord("ddpt", 2, "selected", "failed", None, "g", samples_passed=1,
                           samples_run=4, selected_status="passed", selected_sample=2,
                           visible_passed=3))
    path = write_table(tmp_path / "a" / "task_records.csv.gz", rows)
    data = path.read_bytes()
    assert data[4:8] == b"\0\0\0\0"  # gzip header time 0: no churn from the clock
    back = read_table(path)
    assert sorted(back, key=str) == sorted(rows, key=str)  # floats exact (shortest repr)
    assert back[[r.task_id for r in back].index("ce=1/3")].code_ce == 1 / 3
    assert table_bytes(back) == data
    shuffled = list(rows)
    random.Random(0).shuffle(shuffled)
    assert write_table(tmp_path / "b.csv.gz", shuffled).read_bytes() == data
    header = gzip.decompress(data).decode().splitlines()[0]
    assert header == ",".join(COLUMNS)


def test_bad_tables_name_the_file_and_line(tmp_path):
    bad_header = tmp_path / "header.csv.gz"
    bad_header.write_bytes(gzip.compress(b"method,seed\nddpt,0\n"))
    with pytest.raises(ValueError, match=r"header\.csv\.gz:1: header"):
        read_table(bad_header)
    bad_cell = tmp_path / "cell.csv.gz"
    # the columns of the first committed tables (before test-time selection's) still read
    text = (",".join(COLUMNS[:10]) + "\nddpt,0,t1,passed,0.5,greedy,3,3,,\n"
            "ddpt,one,t2,passed,0.5,g,,,,\n")
    bad_cell.write_bytes(gzip.compress(text.encode()))
    with pytest.raises(ValueError, match=r"cell\.csv\.gz:3: column 'seed': 'one'"):
        read_table(bad_cell)
    bad_cell.write_bytes(gzip.compress(text.split("ddpt,one")[0].encode()))
    assert read_table(bad_cell) == [TaskRecord("ddpt", 0, "t1", "passed", 0.5, "greedy", 3, 3)]
    bad_cell.write_bytes(gzip.compress(",".join(COLUMNS[:9]).encode() + b"\n"))
    with pytest.raises(ValueError, match=r"cell\.csv\.gz:1: header"):
        read_table(bad_cell)
    not_gzip = tmp_path / "plain.csv.gz"
    not_gzip.write_text("method\n")
    with pytest.raises(ValueError, match="not a gzip'd"):
        read_table(not_gzip)


def test_chain_labels_from_method_params():
    assert chain_label({"method": "manual", "decoding": "greedy", "prompt": "manual"}) == "greedy"
    assert chain_label({"decoding": "greedy", "sampler": "ddim", "chain": "ddim", "steps": 3,
                        "eta": 0.0}) == "ddim-3 eta=0 + greedy"
    assert chain_label({"decoding": "greedy", "chain": "deterministic", "steps": 1,
                        "eta": 0.0}) == "deterministic + greedy"
    assert chain_label({"decoding": "diffusion+spa", "diffusion_steps": 128}) == \
        "diffusion+spa-128"


def seeded_rows() -> list[TaskRecord]:
    """A seed-free manual prompt (run once, seed 0) and DDPT in seeds 0-2 on 40 tasks."""
    rows = [TaskRecord("manual", 0, f"t{i:02d}", "passed" if i < 2 else "failed", 1.0 + i / 40,
                       "greedy") for i in range(40)]
    rows += [TaskRecord("ddpt", seed, f"t{i:02d}", "passed" if i < 4 + seed else "failed",
                        0.9 + i / 40, "ddim-3 eta=0 + greedy")
             for seed in range(3) for i in range(40)]
    return rows


def test_pairing_and_comparison_against_the_reference():
    rows = seeded_rows()
    tasks, ours, theirs = paired_values(rows, "ddpt", "manual", "pass_fraction")
    assert len(tasks) == 40 and ours.shape == (40, 3) and theirs.shape == (40, 1)
    pooled = compare_to_reference(rows, "manual", resamples=2000)
    assert set(pooled) == {"ddpt"}
    assert pooled["ddpt"]["pass_at_1"].n_seeds == 3
    assert pooled["ddpt"]["pass_at_1"].difference == pytest.approx((4 + 5 + 6) / 120 - 2 / 40)
    assert pooled["ddpt"]["code_ce"].difference == pytest.approx(-0.1)
    seed_two = compare_to_reference(rows, "manual", seed=2, resamples=2000)["ddpt"]
    assert seed_two["pass_at_1"].test == "mcnemar-exact"
    assert seed_two["pass_at_1"].difference == pytest.approx(4 / 40)
    # the data's own solutions have no code_ce: pass@1 only
    solutions = [TaskRecord("canonical", 0, f"t{i:02d}", "passed", None, "canonical")
                 for i in range(40)]
    against = compare_to_reference([*rows, *solutions], "manual", resamples=500)
    assert set(against["canonical"]) == {"pass_at_1"} and set(against["ddpt"]) == {
        "pass_at_1", "code_ce"}
    # an unexecuted data set gives code_ce only
    text_only = [TaskRecord(r.method, r.seed, r.task_id, "", r.code_ce, r.chain) for r in rows]
    assert set(compare_to_reference(text_only, "manual", resamples=500)["ddpt"]) == {"code_ce"}
    with pytest.raises(ValueError, match=r"differ in 1 task\(s\), e.g. \['t39'\]"):
        compare_to_reference([r for r in rows if not (r.method == "manual" and r.task_id ==
                                                      "t39")], "manual")
    with pytest.raises(ValueError, match="no rows for method 'prompt_tuning'"):
        paired_values(rows, "ddpt", "prompt_tuning", "code_ce")


def test_a_method_run_once_is_set_against_every_seed_of_the_reference():
    """The manual prompt (one run) against a baseline trained over 3 seeds: its column beside
    each seed's, so the figure is the negative of the baseline against it, pooled over the
    same seeds; one seed's figure pairs that seed alone."""
    rows = seeded_rows()
    tasks, ours, theirs = paired_values(rows, "manual", "ddpt", "pass_fraction")
    assert ours.shape == theirs.shape == (40, 3) and (ours == ours[:, :1]).all()
    forward = compare_to_reference(rows, "manual", resamples=2000)["ddpt"]
    backward = compare_to_reference(rows, "ddpt", resamples=2000)["manual"]
    for metric in ("pass_at_1", "code_ce"):
        assert backward[metric].difference == pytest.approx(-forward[metric].difference)
        assert backward[metric].n_seeds == forward[metric].n_seeds == 3
    seed_zero = compare_to_reference(rows, "ddpt", seed=0, resamples=500)["manual"]
    assert seed_zero["pass_at_1"].n_seeds == 1
