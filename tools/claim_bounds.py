"""What a paired test could at best say of a pass@1 comparison whose per-task outcomes are gone.

Most tables of docs/results.md keep only counts (4 of 32 tasks against 1 of 32), not which
tasks passed. McNemar's exact test needs the pairing, but every pairing consistent with the
counts can be tried: this prints the smallest exact McNemar p-value any of them gives (the most
favourable case for a claim), the largest (at or below 0.05, the counts decide whatever the
pairing was), and the smallest pass@1 difference that many tasks detect at 80%
power for the reference's pass rate (``pipeline.scoring.stats.detectable_pass_difference``).
A best-case p above 0.05 means no arrangement of the tasks could have supported the claim.

    .venv/bin/python tools/claim_bounds.py "MBPP ddpt_ddim vs manual=4/1/32" \\
        "MBPP ddpt vs prompt tuning, 3 seeds=4,2,4/2,1,2/32"

``--from tools/results_claims.txt`` reads the comparisons of docs/results.md, whose bounds
table is this script's output for that file (tests/test_claim_bounds.py checks that they agree).
Each argument is ``LABEL=METHOD/REFERENCE/TASKS``: the tasks each passes, one count per seed,
comma-separated (a reference that ran once, like the manual prompt, is one count for every
seed). Printed as a Markdown table: per seed the best-case p; "pooled" treats the seeds' tasks as
separate tasks (optimistic: the seeds share their tasks), the most a pooled test could claim.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from scipy import stats

from pipeline.scoring.stats import detectable_pass_difference


def arrangements(method_passes: int, reference_passes: int, n_tasks: int
                 ) -> list[tuple[float, int, int]]:
    """(p, wins, losses) for every 2x2 table with these margins: wins are the tasks only the
    method passes, losses only the reference; p is the two-sided exact McNemar p-value."""
    for count, name in ((method_passes, "method"), (reference_passes, "reference")):
        if not 0 <= count <= n_tasks:
            raise ValueError(f"{name} passes {count} is not within 0..{n_tasks} tasks")
    lead = method_passes - reference_passes
    tables = []
    # wins - losses = lead; both passed = method - wins >= 0; neither = n - method - losses >= 0
    for wins in range(max(lead, 0), min(method_passes, n_tasks - reference_passes) + 1):
        losses = wins - lead
        p = 1.0 if wins + losses == 0 else float(stats.binomtest(wins, wins + losses,
                                                                 0.5).pvalue)
        tables.append((p, wins, losses))
    return tables


def best_case_mcnemar(method_passes: int, reference_passes: int, n_tasks: int
                      ) -> tuple[float, int, int]:
    """(p, wins, losses) of the arrangement with the smallest p: the most a claim could get."""
    return min(arrangements(method_passes, reference_passes, n_tasks))


def worst_case_mcnemar(method_passes: int, reference_passes: int, n_tasks: int) -> float:
    """The largest p of any arrangement: at or below 0.05, the counts decide whatever the
    pairing was."""
    return max(arrangements(method_passes, reference_passes, n_tasks))[0]


@dataclass(frozen=True)
class Comparison:
    """One claim's counts: passes per seed of the method and of the reference, on n tasks."""

    label: str
    method: tuple[int, ...]
    reference: tuple[int, ...]
    n_tasks: int

    def seeds(self) -> list[tuple[int, int]]:
        reference = self.reference * len(self.method) if len(self.reference) == 1 \
            else self.reference
        return list(zip(self.method, reference, strict=True))


def parse(argument: str) -> Comparison:
    """``LABEL=M1,M2/R1,R2/N`` -> Comparison; a clear error naming the argument otherwise."""
    label, _, counts = argument.rpartition("=")
    try:
        method, reference, n_tasks = counts.split("/")
        comparison = Comparison(label or counts, tuple(map(int, method.split(","))),
                                tuple(map(int, reference.split(","))), int(n_tasks))
        if len(comparison.reference) not in (1, len(comparison.method)):
            raise ValueError("the reference needs one count, or one per seed of the method")
        comparison.seeds()
    except ValueError as error:
        raise SystemExit(f"claim_bounds: {argument!r}: expected LABEL=M[,M..]/R[,R..]/TASKS "
                         f"({error})") from None
    return comparison


def row(comparison: Comparison) -> str:
    """One Markdown row: counts, each seed's best-case p, the pooled best case, detectable."""
    seeds, n = comparison.seeds(), comparison.n_tasks
    per_seed = [best_case_mcnemar(m, r, n)[0] for m, r in seeds]
    worst = max(worst_case_mcnemar(m, r, n) for m, r in seeds)
    pooled = best_case_mcnemar(sum(m for m, _ in seeds), sum(r for _, r in seeds),
                               n * len(seeds))[0]
    base_rate = sum(r for _, r in seeds) / (n * len(seeds))
    detectable = detectable_pass_difference(n, base_rate)
    counts = lambda passes: ", ".join(map(str, passes))
    return (f"| {comparison.label} | {counts(m for m, _ in seeds)} | {counts(r for _, r in seeds)}"
            f" | {n} x {len(seeds)} | {', '.join(f'{p:.2g}' for p in per_seed)} | "
            f"{pooled:.2g} | {worst:.2g} | {base_rate:.3f} | {detectable:.2f} |")


HEADER = ("| comparison | method's passes (per seed) | reference's passes | tasks x seeds | "
          "best-case McNemar p per seed | best-case p, seeds pooled | worst-case p (any seed) | "
          "reference's rate | smallest detectable (n tasks, 80% power) |\n" + "| --- " * 9 + "|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("comparisons", nargs="*", metavar="LABEL=M/R/TASKS")
    parser.add_argument("--from", dest="from_file", type=Path,
                        help="a file of comparisons, one a line (# starts a comment)")
    args = parser.parse_args(argv)
    comparisons = list(args.comparisons)
    if args.from_file is not None:
        lines = args.from_file.read_text().splitlines()
        comparisons += [line.strip() for line in lines
                        if line.strip() and not line.lstrip().startswith("#")]
    if not comparisons:
        parser.error("no comparisons: pass LABEL=M/R/TASKS arguments or --from FILE")
    print(table(comparisons))
    return 0


def table(comparisons: list[str]) -> str:
    """The Markdown table of these comparisons' bounds, header first."""
    return "\n".join([HEADER, *(row(parse(argument)) for argument in comparisons)])


if __name__ == "__main__":
    raise SystemExit(main())
