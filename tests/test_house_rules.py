"""House rules read from the code, over all of ``pipeline/``: at most 6 positional parameters,
flags (bool parameters) keyword-only, and nothing in ``pipeline/decoding/`` that only tests call
(each function there is used by the running path). Size limits and layers: test_layers.py."""
from __future__ import annotations

import ast
from pathlib import Path

from test_layers import package_sources

MAX_POSITIONAL = 6
# (file, function, parameter) allowed to break the flag rule, each with its reason.
FLAGS_ALLOWED = {
    ("config.py", "_check", "ok"),  # an assertion's condition, not a switch
}
# (file, function) allowed more than MAX_POSITIONAL positional parameters: none today.
POSITIONAL_ALLOWED: set[tuple[str, str]] = set()


def _functions(source: str):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _positional(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.arg]:
    """The parameters a caller may pass by position (``self`` and ``cls`` not counted)."""
    params = [*node.args.posonlyargs, *node.args.args]
    return params[1:] if params and params[0].arg in ("self", "cls") else params


def too_many_positional(sources: dict[Path, str]) -> list[str]:
    found = []
    for path, source in sorted(sources.items()):
        for node in _functions(source):
            count = len(_positional(node))
            if count > MAX_POSITIONAL and (str(path), node.name) not in POSITIONAL_ALLOWED:
                found.append(f"{path}:{node.lineno} {node.name}: {count} positional parameters")
    return found


def positional_flags(sources: dict[Path, str]) -> list[str]:
    """Parameters annotated ``bool`` that a caller may pass by position."""
    found = []
    for path, source in sorted(sources.items()):
        for node in _functions(source):
            for param in _positional(node):
                annotation = ast.unparse(param.annotation) if param.annotation else ""
                if annotation.split("|")[0].strip() == "bool" and \
                        (str(path), node.name, param.arg) not in FLAGS_ALLOWED:
                    found.append(f"{path}:{node.lineno} {node.name}({param.arg}: bool) "
                                 "is positional")
    return found


def unused_in_decoding(sources: dict[Path, str]) -> list[str]:
    """Functions, classes and public methods of ``decoding/`` that no code of the package names
    outside their own definition: only tests would call them."""
    used: dict[str, list[tuple[Path, int]]] = {}
    for path, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            name = node.id if isinstance(node, ast.Name) else \
                node.attr if isinstance(node, ast.Attribute) else None
            if name:
                used.setdefault(name, []).append((path, node.lineno))
    found = []
    for path, source in sorted(sources.items()):
        if path.parts[0] != "decoding":
            continue
        tree = ast.parse(source)
        defined = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        defined += [m for c in tree.body if isinstance(c, ast.ClassDef) for m in c.body
                    if isinstance(m, ast.FunctionDef) and not m.name.startswith("__")]
        for node in defined:
            elsewhere = [(p, line) for p, line in used.get(node.name, [])
                         if not (p == path and node.lineno <= line <= node.end_lineno)]
            if not elsewhere:
                found.append(f"{path}:{node.lineno} {node.name}")
    return found


def test_at_most_six_positional_parameters():
    assert too_many_positional(package_sources()) == []


def test_flags_are_keyword_only():
    assert positional_flags(package_sources()) == []


def test_nothing_in_decoding_is_only_called_by_tests():
    assert unused_in_decoding(package_sources()) == []


def test_the_rules_catch_what_they_forbid():
    source = ("def seven(a, b, c, d, e, f, g):\n    pass\n"
              "class C:\n    def six(self, a, b, c, d, e, f, *, g=1):\n        pass\n"
              "def flag(x, quick: bool = False):\n    pass\n"
              "def fine(x, *, quick: bool | None = None):\n    pass\n")
    assert too_many_positional({Path("lm/x.py"): source}) == [
        "lm/x.py:1 seven: 7 positional parameters"]
    assert positional_flags({Path("lm/x.py"): source}) == [
        "lm/x.py:6 flag(quick: bool) is positional"]
    decoding = {Path("decoding/x.py"): "def used():\n    return 1\ndef twin():\n    return used()\n"
                                       "class R:\n    def only_tests(self):\n        pass\n",
                Path("generation/y.py"): "from pipeline.decoding.x import used\nused()\nR()\n"}
    assert unused_in_decoding(decoding) == ["decoding/x.py:3 twin", "decoding/x.py:6 only_tests"]
