"""Rewards for execution-reward RL (method.md section 5): what a generated program earns.

The execution reward of one program, from the sandbox's verdict (:class:`ExecResult`):

    reward = cases_passed / cases_total                  the share of the task's asserts that pass
             + parse_bonus * [the code parses]           non-empty, and ast.parse accepts it
             + run_bonus * [it parses and ran to its tests]   ExecResult.cases_run > 0

"Ran to its tests" means the judge ran at least one test case to a verdict of its own (passed,
failed, or raised inside the case): the code loaded without an error, a timeout or an exit.
So a program whose every assert fails still earns both bonuses, one that raises a NameError in
every case too (its code ran), and a syntax error, a timeout while loading, or an empty answer
earns nothing. With the defaults (0.05 each) the reward lies in [0, 1.1].

A reward is any ``(tasks, codes) -> Scored`` (one task per code: a task repeated G times for its
group): the loop does not care where the numbers come from (a toy reward in tests).
"""
from __future__ import annotations

import ast
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.config import ExecutionConfig, RLConfig
from pipeline.data.example import Example
from pipeline.sandbox import ExecResult, run_programs
from pipeline.scoring.execution import program_for


@dataclass
class Scored:
    """The rewards of B programs and per-program indicators (lists of B floats, named as the
    round logs their means: ``pass_rate``, ``case_rate``, ``parse_rate``, ``run_rate``)."""

    rewards: list[float]
    details: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def cat(cls, parts: list[Scored]) -> Scored:
        """The programs of several batches, in order (the details all batches share)."""
        names = [name for name in parts[0].details if all(name in p.details for p in parts)]
        return cls([r for p in parts for r in p.rewards],
                   {name: [v for p in parts for v in p.details[name]] for name in names})


Reward = Callable[[list[Example], list[str]], Scored]


def parses(code: str) -> bool:
    """Non-empty Python that ``ast.parse`` accepts."""
    if not code.strip():
        return False
    try:
        with warnings.catch_warnings():  # "\." in a plain string: the code's business
            warnings.simplefilter("ignore")
            ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def execution_reward(result: ExecResult, *, parsed: bool, parse_bonus: float,
                     run_bonus: float) -> float:
    """One program's reward (the module's formula); ``parsed``: :func:`parses` of its code."""
    cases = result.cases_passed / result.cases_total if result.cases_total else 0.0
    ran = parsed and result.cases_run > 0
    return cases + parse_bonus * parsed + run_bonus * ran


class ExecutionReward:
    """The sandbox's reward (``rl.parse_bonus``, ``rl.run_bonus``; the sandbox's limits from
    ``execution``): every program of a call runs in one parallel batch."""

    def __init__(self, execution: ExecutionConfig, rl: RLConfig):
        self.execution, self.parse_bonus, self.run_bonus = execution, rl.parse_bonus, rl.run_bonus

    def __call__(self, tasks: list[Example], codes: list[str]) -> Scored:
        if len(tasks) != len(codes):
            raise ValueError(f"{len(codes)} programs for {len(tasks)} tasks")
        programs = [program_for(task, code) for task, code in zip(tasks, codes)]
        results = run_programs(programs, self.execution)
        parsed = [parses(program.code) and bool(code.strip())
                  for program, code in zip(programs, codes)]
        rewards = [execution_reward(r, parsed=p, parse_bonus=self.parse_bonus,
                                    run_bonus=self.run_bonus) for r, p in zip(results, parsed)]
        return Scored(rewards, {
            "pass_rate": [float(r.passed) for r in results],
            "case_rate": [r.cases_passed / r.cases_total if r.cases_total else 0.0
                          for r in results],
            "parse_rate": [float(p) for p in parsed],
            "run_rate": [float(p and r.cases_run > 0) for r, p in zip(results, parsed)]})
