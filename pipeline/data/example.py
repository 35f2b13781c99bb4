"""The one record type every data set is read into."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Example:
    """One NL-to-code task.

    The template renders it as ``context | instruction (+ input) -> output``; only the
    context is ever tuned, the rest stays plain tokens.

    Attributes:
        id: unique within its data set and split (results are keyed by it).
        instruction: the natural-language task description.
        output: the reference code (the training target and the metric reference).
        input: optional extra input shown after the instruction ("" when absent).
        tests: optional Python that raises when the program is wrong; it is run *after*
            the generated code (MBPP's ``test_setup_code`` and asserts, HumanEval's
            ``check(entry_point)``, the user's own ``tests``).
        meta: free-form provenance (source file, line, original ids).
    """

    id: str
    instruction: str
    output: str
    input: str = ""
    tests: str | None = None
    meta: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return asdict(self)


def missing_tests(examples: list[Example] | tuple[Example, ...]) -> list[str]:
    """Ids of examples that carry no tests (they cannot be executed)."""
    return [ex.id for ex in examples if not (ex.tests or "").strip()]
