"""The README's first hour holds: it stays a front page (at most README_MAX_LINES lines), its
in-process example runs as written, its map of where the math lives names code that exists, and
every link and module path in README.md, docs/*.md and benchmarks/README.md points at a file of
this checkout."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
README_MAX_LINES = 200  # a front page; everything else lives in docs/
EXAMPLE_HEADING = "## DDPT in one process: an example"
MAP_HEADING = "## Where the math lives"

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
MODULE_PATH = re.compile(r"\bpipeline/[\w/]*\.py\b")
DOTTED = re.compile(r"(?<![\w./])pipeline(?:\.[a-z_]\w*)+")


def section(text: str, heading: str) -> list[str]:
    """The lines after the line ``heading`` up to the next heading of the same or a higher level
    (lines inside code fences are never headings)."""
    lines = text.splitlines()
    if heading not in lines:
        raise AssertionError(f"README.md has no line {heading!r}")
    level = len(heading) - len(heading.lstrip("#"))
    body, in_fence = [], False
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith(("```", "~~~")):
            in_fence = not in_fence
        elif not in_fence and re.match(rf"#{{1,{level}}} ", line):
            break
        body.append(line)
    return body


def first_python_block(text: str, heading: str) -> str:
    """The first ```python block in the section under ``heading``."""
    block, inside = [], False
    for line in section(text, heading):
        if not inside and line.strip() == "```python":
            inside = True
        elif inside and line.strip() == "```":
            return "\n".join(block) + "\n"
        elif inside:
            block.append(line)
    raise AssertionError(f"no ```python block under {heading!r}")


def prose(text: str) -> str:
    """Markdown without code fences and inline code (where brackets are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.lstrip("#").strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    body = FENCE.sub("", page.read_text())
    return {github_anchor(line) for line in body.splitlines() if re.match(r"#{1,6} ", line)}


def defined_names(path: Path) -> set[str]:
    """Top-level functions, classes and assignments of a module, and ``Class.member`` for the
    members of its classes."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}.{item.name}")
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(f"{node.name}.{item.target.id}")
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_the_readme_stays_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, at most {README_MAX_LINES}: move the detail to docs/")


# ---- the example --------------------------------------------------------------------------------
def test_the_block_is_found_by_its_heading_not_its_place():
    text = ("# T\n\n```python\nwrong = 1\n```\n\n" + EXAMPLE_HEADING + "\n\nSome text.\n\n"
            "```bash\nmake smoke\n```\n\n```python\nright = 2\n```\n\n```python\nlater = 3\n"
            "```\n\n## Next\n")
    assert first_python_block(text, EXAMPLE_HEADING) == "right = 2\n"
    with pytest.raises(AssertionError, match="no ```python block"):
        first_python_block(EXAMPLE_HEADING + "\n\n## Next\n\n```python\nx = 1\n```\n",
                           EXAMPLE_HEADING)


def test_the_readme_example_runs_as_written(capsys):
    code = first_python_block(README.read_text(), EXAMPLE_HEADING)
    assert len(code.splitlines()) <= 30, "the example should stay short"
    threads = torch.get_num_threads()
    # One thread: the tiny model's matrices are small, and on a busy 2-core machine a second
    # thread makes each step many times slower.
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "readme_example"}
    try:
        exec(compile(code, f"{README.name}: {EXAMPLE_HEADING}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "manual prompt" in printed and "generated" in printed, printed
    # The trained prompt is not the manual one, and it lowers the code loss the LM was trained on.
    assert namespace["delta"].abs().max() > 0
    assert namespace["ddpt_loss"] < namespace["manual_loss"] - 0.1, printed
    assert isinstance(namespace["code"], str)


# ---- the map of where the math lives ------------------------------------------------------------
def math_map() -> list[tuple[str, list[str]]]:
    """(module path, names) for each row of the README's table under MAP_HEADING."""
    rows = []
    for line in section(README.read_text(), MAP_HEADING):
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not MODULE_PATH.search(cells[-2]):
            continue
        rows.append((MODULE_PATH.search(cells[-2]).group(0), re.findall(r"`([\w.]+)`",
                                                                          cells[-1])))
    return rows


def test_the_math_map_names_what_the_code_defines():
    rows = math_map()
    assert len(rows) >= 10, "the map lost its table"
    missing = []
    for path, names in rows:
        assert names, f"a row for {path} names nothing"
        defined = defined_names(ROOT / path) if (ROOT / path).is_file() else set()
        missing += [f"{path}: {name}" for name in names if name not in defined]
    assert missing == []


# ---- links and paths ----------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_path_exists(page):
    text = page.read_text()
    missing = sorted({p for p in MODULE_PATH.findall(text) if not (ROOT / p).is_file()})
    for dotted in set(DOTTED.findall(text)):
        parts = dotted.split(".")
        # pipeline.a.b.name: some prefix of at least pipeline.a must be a module or package
        if not any((ROOT.joinpath(*parts[:i]).with_suffix(".py")).is_file()
                   or (ROOT.joinpath(*parts[:i]) / "__init__.py").is_file()
                   for i in range(2, len(parts) + 1)):
            missing.append(dotted)
    assert missing == []


def test_the_checks_catch_a_broken_page(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See [a](missing.md), [b](#nowhere), `[c](in-code.md)`, [d](https://x.org)"
                    " and `pipeline/ddpt.py`.\n\n## Here\n")
    links = LINK.findall(prose(page.read_text()))
    assert links == ["missing.md", "#nowhere", "https://x.org"]
    assert "nowhere" not in anchors(page) and "here" in anchors(page)
    assert MODULE_PATH.findall(page.read_text()) == ["pipeline/ddpt.py"]
    assert github_anchor("### Outputs of `ddpt run`") == "outputs-of-ddpt-run"


def test_the_layout_table_is_the_floors_of_test_layers():
    """The README's layout table lists every room of tests/test_layers.py's FLOORS, on its
    floor, and nothing else."""
    from test_layers import FLOORS

    section = README.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| `([\w.]+?)/?` \|", section, re.MULTILINE)
    table = {name.removesuffix(".py"): int(floor) for floor, name in rows}
    expected = {room: level + 1 for level, rooms in enumerate(FLOORS) for room in rooms}
    assert table == expected
