"""A task's tests, split into the steps the judge runs: setup statements and test cases.

Standard library only (it runs inside the sandbox too), and only the compiler's own syntax
tree (``compile(..., PyCF_ONLY_AST)``): importing ``ast`` would cost each sandbox more than the
split itself. The rule (docs/execution.md, "Test cases"):

* HumanEval's shape (a top-level ``def check(candidate)`` and, last, one call ``check(X)``): the
  other top-level statements are setup, then ``candidate = X``, then each statement of the body
  of ``check`` (its docstring left out);
* any other tests: each top-level statement.

Of these, a statement that contains an ``assert`` (outside a nested ``def``, ``class`` or
``lambda``) is a case; the others are setup, run in order before the cases that follow them. If
no statement contains an assert, the whole tests are one case. Tests with no statement that can
fail (empty, only comments, or only ``pass`` and constants such as a docstring or ``...``) cannot
judge a program (every program would pass): ``split`` raises ValueError. The data loaders call
``split`` on a user's tests, so such a record is refused when its file is read.
"""
from __future__ import annotations

import _ast

PyCF_ONLY_AST = 0x400
TESTS_FILE = "<tests>"    # the tests' file name in tracebacks
_SCOPES = (_ast.FunctionDef, _ast.AsyncFunctionDef, _ast.ClassDef, _ast.Lambda)

Step = tuple[str, object]  # ("setup" | "case", a statement node)


def split(tests: str) -> list[Step]:
    """The steps of ``tests``, in order. Raises ValueError if they do not parse or hold nothing."""
    try:
        tree = compile(tests, TESTS_FILE, "exec", PyCF_ONLY_AST)
    except SyntaxError as err:
        raise ValueError(f"the tests do not parse: {err.msg} (line {err.lineno})") from None
    except (ValueError, MemoryError, RecursionError) as err:
        raise ValueError(f"the tests do not parse: {type(err).__name__}") from None
    if not tree.body:
        raise ValueError("the tests hold no statement (only comments or blank lines)")
    if all(_inert(node) for node in tree.body):
        raise ValueError("the tests hold no statement that can fail (only `pass` or constants)")
    statements = _humaneval(tree.body) or list(tree.body)
    steps = [("case" if has_assert(node) else "setup", node) for node in statements]
    if not any(kind == "case" for kind, _ in steps):
        return [("case", _ast.Module(body=list(tree.body), type_ignores=[]))]
    return steps


def _inert(node) -> bool:
    """A statement that can never fail: ``pass``, or a constant alone (a docstring, ``...``)."""
    return isinstance(node, _ast.Pass) or (isinstance(node, _ast.Expr)
                                           and isinstance(node.value, _ast.Constant))


def count(tests: str) -> int:
    """How many cases ``tests`` hold (ValueError as ``split``)."""
    return sum(kind == "case" for kind, _ in split(tests))


def compiled(node) -> object:
    """A step's code object (line numbers are the tests' own)."""
    module = node if isinstance(node, _ast.Module) else _ast.Module(body=[node], type_ignores=[])
    return compile(module, TESTS_FILE, "exec")


def _humaneval(body: list) -> list | None:
    """The flattened statements of HumanEval-shaped tests; None for any other shape."""
    last = body[-1]
    if not (isinstance(last, _ast.Expr) and isinstance(last.value, _ast.Call)
            and isinstance(last.value.func, _ast.Name) and len(last.value.args) == 1
            and not last.value.keywords):
        return None
    name = last.value.func.id
    defs = [node for node in body[:-1] if isinstance(node, _ast.FunctionDef) and node.name == name]
    if len(defs) != 1 or len(defs[0].args.args) != 1 or _irregular(defs[0]):
        return None
    check, argument = defs[0], last.value.args[0]
    target = _ast.Name(id=check.args.args[0].arg, ctx=_ast.Store())
    bind = _ast.Assign(targets=[target], value=argument)
    for node in (target, bind):  # compile() needs positions: the call's
        for field in ("lineno", "col_offset", "end_lineno", "end_col_offset"):
            setattr(node, field, getattr(last, field))
    inner = list(check.body)
    if inner and isinstance(inner[0], _ast.Expr) and isinstance(inner[0].value, _ast.Constant) \
            and isinstance(inner[0].value.value, str):
        inner = inner[1:]  # the docstring
    return [node for node in body[:-1] if node is not check] + [bind] + inner


def _irregular(check) -> bool:
    """Does ``check`` need to stay a function (decorators, defaults, or a statement that only
    makes sense in a function body: return, yield, global, nonlocal)?"""
    if check.decorator_list or check.args.defaults or check.args.vararg or check.args.kwarg \
            or check.args.kwonlyargs or check.args.posonlyargs:
        return True
    stack = list(check.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (_ast.Return, _ast.Yield, _ast.YieldFrom, _ast.Await, _ast.Global,
                             _ast.Nonlocal)):
            return True
        if not isinstance(node, _SCOPES):
            stack.extend(_children(node))
    return False


def has_assert(node) -> bool:
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, _ast.Assert):
            return True
        if not isinstance(current, _SCOPES):  # a def's asserts run when it is called
            stack.extend(_children(current))
    return False


def _children(node) -> list:
    found = []
    for field in node._fields:
        value = getattr(node, field, None)
        if isinstance(value, _ast.AST):
            found.append(value)
        elif isinstance(value, list):
            found.extend(item for item in value if isinstance(item, _ast.AST))
    return found
