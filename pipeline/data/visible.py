"""A task's *visible test*: the part of its tests that its prompt already shows, as Python the
sandbox can run (test-time selection, docs/execution.md "Selection by a visible test").

* MBPP (and ``mbpp_functions``): the setup code and the first assert, which the prompt shows
  (``Your code should pass this test: ...``); the loader keeps them as
  ``meta["visible_tests"]``. A user's JSONL record may carry its own ``visible_tests`` field
  (extra fields go to ``meta``).
* HumanEval-shaped tasks (``meta`` holds ``prompt`` and ``entry_point``): the examples in the
  entry point's docstring. Doctests first (``>>> expr`` and the output line(s) below it): a
  literal output gives ``assert (expr) == (output)``; with no output, a comparison
  (``>>> f(x) == y``, as several docstrings write their examples) gives ``assert f(x) == y``
  and any other expression ``assert (expr) is None`` (doctest shows nothing for None); a
  statement (``>>> x = 1``) runs as setup. Without doctests,
  example lines ``entry(args) OP value`` (OP one of ``==``, ``==>``, ``=>``, ``->``, ``➞``,
  ``returns``, ``should return``, ``# returns``; not a lone ``=``, which the
  docstrings also use for prose such as ``tri(4) = 3``) whose arguments and value are Python
  literals give ``assert entry(args) == value``. Anything else (prose examples, ``Input: ...
  Output: ...`` blocks, outputs that are not literals such as ``true``) is not parsed.

A task without either has no visible test (``None``); selection then keeps the first candidate.
"""
from __future__ import annotations

import ast
import doctest
import re
import warnings

from pipeline.data.example import Example

VISIBLE_FIELD = "visible_tests"  # meta key (MBPP's loader, a user's JSONL field)
_OPERATOR = re.compile(r"\s*(==>|=>|==|->|➞|(?:#\s*)?(?:should\s+)?returns?\b)\s*")
_BULLET = re.compile(r"^[*\-]\s+")


def visible_tests(example: Example) -> str | None:
    """The task's visible test as Python (asserts, and setup before them), or None when the
    task shows none that can be parsed."""
    given = example.meta.get(VISIBLE_FIELD)
    if isinstance(given, str) and given.strip():
        return given
    prompt, entry = example.meta.get("prompt"), example.meta.get("entry_point")
    if not (isinstance(prompt, str) and isinstance(entry, str) and entry):
        return None
    docstring = _docstring(prompt, entry)
    lines = _doctest_lines(docstring) or _example_lines(docstring, entry)
    return "\n".join(lines) + "\n" if any(line.startswith("assert ") for line in lines) else None


def _parse(source: str, mode: str = "exec") -> ast.AST | None:
    try:
        with warnings.catch_warnings():  # "\d" in a docstring's example: not ours to report
            warnings.simplefilter("ignore")
            return ast.parse(source, mode=mode)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None


def _docstring(prompt: str, entry: str) -> str:
    """The entry point's docstring (the whole prompt if it does not parse or has none)."""
    tree = _parse(prompt)
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry:
            return ast.get_docstring(node) or prompt
    return prompt


def _literal(text: str) -> str | None:
    """``text`` (less a trailing full stop, then as it is) as the source of a Python literal,
    normalised (comments dropped), else None."""
    for candidate in (text.strip().removesuffix(".").strip(), text.strip()):
        tree = _parse(candidate, "eval") if candidate else None
        if tree is None:
            continue
        try:
            ast.literal_eval(tree)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        return ast.unparse(tree)
    return None


def _doctest_lines(docstring: str) -> list[str]:
    """Setup statements and asserts from the docstring's ``>>>`` examples."""
    try:
        examples = doctest.DocTestParser().get_examples(docstring)
    except ValueError:  # inconsistent indentation in an example
        return []
    lines = []
    for example in examples:
        source = example.source.strip()
        expression = _parse(source, "eval")
        if expression is not None:  # normalised: a comment must not swallow the parenthesis
            source = ast.unparse(expression)
        is_expression = expression is not None
        if not example.want.strip():
            if is_expression and isinstance(expression.body, ast.Compare):
                lines.append(f"assert {source}")  # `>>> f(x) == y`: a check of itself
            elif is_expression:
                lines.append(f"assert ({source}) is None")
            elif _parse(source) is not None:
                lines.append(source)
            continue
        expected = _literal(example.want)
        if is_expression and expected is not None:
            lines.append(f"assert ({source}) == ({expected})")
    return lines


def _example_lines(docstring: str, entry: str) -> list[str]:
    """Asserts from lines such as ``entry([1, 2]) ==> 3`` (literal arguments and value)."""
    lines = []
    for raw in docstring.splitlines():
        line = _BULLET.sub("", raw.strip())
        if not line.startswith(entry + "("):
            continue
        for match in _OPERATOR.finditer(line):
            call, value = line[:match.start()], line[match.end():]
            expected = _literal(value)
            if expected is None and "#" in value:  # a comment after the value
                expected = _literal(value.split("#")[0])
            if expected is not None and _is_literal_call(call, entry):
                lines.append(f"assert {ast.unparse(_parse(call.strip(), 'eval'))} == {expected}")
                break
    return lines


def _is_literal_call(source: str, entry: str) -> bool:
    """``entry(...)`` with Python literals as its arguments."""
    tree = _parse(source.strip(), "eval")
    if tree is None or not isinstance(tree.body, ast.Call):
        return False
    call = tree.body
    if not (isinstance(call.func, ast.Name) and call.func.id == entry):
        return False
    try:
        for node in [*call.args, *(k.value for k in call.keywords)]:
            ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return not any(isinstance(a, ast.Starred) for a in call.args)
