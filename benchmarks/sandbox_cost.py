"""The sandbox's cost per program, before and after issue 30, side by side in one run.

    python benchmarks/sandbox_cost.py                  # 40 programs per arm, 2 workers, 3 rounds
    python benchmarks/sandbox_cost.py --before REV --programs 20 --rounds 2

"Before" is the sandbox of the commit before the one that added ``pipeline/sandbox/judge.py``
(or ``--before REV``): its ``pipeline/sandbox/`` is taken out of git into a temporary folder as
a package of its own (``old_sandbox``), so both run from this checkout with the same Python,
data and configuration. Each arm runs in a fresh interpreter, arms alternate (before, after,
before, ...), and each reports per program: wall time (the batch's wall time / programs) and
CPU time of the whole tree (server, supervisors, bwraps, init, the program: the children's
rusage, which accumulates as each process is reaped) plus the caller's own CPU. Medians over
the rounds, and after / before. Workloads: ``trivial`` (one assert) and ``mbpp`` (MBPP's first
test tasks with their reference solutions: before as one text, after as code + tests judged
apart, as ``ddpt evaluate`` runs them). On a shared machine wall time mostly measures the
neighbours: the load average is printed; CPU time is the steadier figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARM = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from pipeline.config import ExecutionConfig
from pipeline.data.loaders import load_examples
from pipeline.scoring.execution import build_program
arm, workload, count, workers = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
if workload == "trivial":
    examples = None
    texts = ["def two():\n    return 1 + 1\n\nassert two() == 2\n"] * count
else:
    examples = load_examples("mbpp", "test")[:count]
    texts = [build_program(e, e.output) for e in examples]
if arm == "before":
    from old_sandbox import run_programs
    programs = texts
else:
    from pipeline.sandbox import run_programs
    from pipeline.scoring.execution import program_for
    programs = texts if examples is None else [program_for(e, e.output) for e in examples]
config = ExecutionConfig(workers=workers)
run_programs(programs[:1], config)  # the isolation's probe and imports, not timed
began, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
results = run_programs(programs, config)
wall = time.perf_counter() - began
after, own = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
tree = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
print(json.dumps({"wall": wall / count, "tree_cpu": tree / count,
                  "passed": sum(r.status == "passed" for r in results)}))
"""


def before_revision() -> str:
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--",
                            "pipeline/sandbox/judge.py"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    if not added:
        raise SystemExit("no commit adds pipeline/sandbox/judge.py here: give --before REV")
    return added[-1] + "^"


def extract_old(revision: str, folder: Path) -> None:
    """``pipeline/sandbox/`` at ``revision`` as the package ``old_sandbox`` in ``folder``."""
    names = subprocess.run(["git", "ls-tree", "--name-only", revision, "pipeline/sandbox/"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    package = folder / "old_sandbox"
    package.mkdir()
    for name in names:
        if name.endswith(".py"):
            text = subprocess.run(["git", "show", f"{revision}:{name}"], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout
            (package / Path(name).name).write_text(text.replace("pipeline.sandbox",
                                                                "old_sandbox"))


def run_arm(folder: Path, arm: str, workload: str, count: int, workers: int) -> dict:
    done = subprocess.run([sys.executable, "-c", ARM, str(folder), arm, workload, str(count),
                           str(workers)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {arm} arm failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="the revision whose sandbox is 'before'")
    parser.add_argument("--programs", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="trivial,mbpp")
    args = parser.parse_args()
    revision = args.before or before_revision()
    print(f"before: {subprocess.run(['git', 'rev-parse', '--short', revision], cwd=ROOT, capture_output=True, text=True).stdout.strip()}"  # noqa: E501
          f"; {args.programs} programs per arm, {args.workers} workers, {args.rounds} rounds")
    with tempfile.TemporaryDirectory(prefix="sandbox-cost-") as tmp:
        extract_old(revision, Path(tmp))
        for workload in args.workloads.split(","):
            figures: dict[str, list[dict]] = {"before": [], "after": []}
            for round_ in range(args.rounds):
                for arm in ("before", "after"):
                    figures[arm].append(run_arm(Path(tmp), arm, workload, args.programs,
                                                args.workers))
                print(f"  {workload} round {round_ + 1}: load {os.getloadavg()[0]:.1f}; "
                      + "; ".join(f"{arm} {f[-1]['wall'] * 1e3:.0f} ms wall, "
                                  f"{f[-1]['tree_cpu'] * 1e3:.0f} ms CPU, "
                                  f"{f[-1]['passed']} passed" for arm, f in figures.items()))
            medians = {arm: {key: statistics.median(f[key] for f in runs)
                             for key in ("wall", "tree_cpu")} for arm, runs in figures.items()}
            print(f"{workload}: per program, median of {args.rounds}")
            print(f"  {'':10} {'before':>10} {'after':>10} {'after/before':>13}")
            for key, label in (("wall", "wall ms"), ("tree_cpu", "CPU ms")):
                old, new = medians["before"][key], medians["after"][key]
                print(f"  {label:10} {old * 1e3:10.1f} {new * 1e3:10.1f} {new / old:13.2f}")


if __name__ == "__main__":
    main()
