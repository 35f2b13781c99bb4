"""The layout's import rules, read from the code (every import, lazy ones included).

``pipeline/`` has one room per layer: a folder, or a top-level module. A room imports only from
rooms on lower floors (never from its own floor's neighbours, never upwards), only the Ray glue
imports Ray, and DDPT's math imports neither the configuration, DeepSpeed nor MLflow.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"

# Lowest floor first. The docs' layout map (README) follows this list.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("method", "tracking", "paths", "quiet"),  # DDPT's math; MLflow bookkeeping; where files
    # are; which library noise is off
    ("baselines", "config"),  # the soft prompt; every option, typed and validated
    ("sandbox",),  # running untrusted code
    ("data",),  # examples, loaders and splits (a user's tests checked by the sandbox's rule)
    ("lm",),  # the model loader, the frozen LM, the template
    ("decoding",),  # greedy, sampling, SPA; masked-diffusion decoding
    ("scoring",),  # measures of records: text metrics, pass@k, execution, held-out loss, ...
    ("training",),  # the step loop, checkpoints, prompt-model registry, the training job
    ("generation",),  # the batch sampler: methods -> records (it scores nothing)
    ("studies",),  # comparisons, the main job, experiments, sweep specs, charts, the report
    ("distributed",),  # the Ray glue: the only room that imports Ray
    ("commands",),  # one module per `ddpt` subcommand: arguments in, a study called
    ("cli",),  # argparse only
)
RAY_ROOMS = {"distributed"}
# third-party (or project) modules a room must never import
FORBIDDEN = {"method": {"pipeline.config", "deepspeed", "mlflow", "ray"}}


def room_of(relative: Path) -> str:
    """pipeline/<room>/... or pipeline/<room>.py -> room."""
    return relative.parts[0].removesuffix(".py")


def imports_of(source: str, module: str) -> set[str]:
    """Absolute names of every module ``source`` imports (``module`` is its dotted name, for
    relative imports)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names.add(stem)
            # `from pipeline.lm import loader` may name a module: keep both candidates
            names.update(f"{stem}.{alias.name}" for alias in node.names if stem)
    return names


def violations(sources: dict[Path, str]) -> list[str]:
    """Every broken rule in ``sources`` ({path relative to pipeline/: text})."""
    floor = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}
    found = []
    for relative, source in sorted(sources.items()):
        room = room_of(relative)
        if relative.name == "__init__.py" and len(relative.parts) == 1:
            continue  # the package itself
        if room not in floor:
            found.append(f"{relative}: room {room!r} is on no floor of FLOORS")
            continue
        module = ".".join(("pipeline", *relative.with_suffix("").parts))
        names = imports_of(source, module)
        for name in sorted(n for n in names if n.split(".")[0] == "ray"):
            if room not in RAY_ROOMS:
                found.append(f"{relative}: imports {name} (only {sorted(RAY_ROOMS)} import Ray)")
                break
        for banned in sorted(FORBIDDEN.get(room, ())):
            if any(n == banned or n.startswith(banned + ".") for n in names):
                found.append(f"{relative}: imports {banned}, forbidden in {room}/")
        targets = {n.split(".")[1] for n in names if n.startswith("pipeline.")} - {room}
        for target in sorted(targets):
            if target not in floor:
                found.append(f"{relative}: imports pipeline.{target}, which is on no floor")
            elif floor[target] >= floor[room]:
                where = "its own floor" if floor[target] == floor[room] else "a higher floor"
                found.append(f"{relative}: imports pipeline.{target} from {where} ({target} on "
                             f"floor {floor[target]}, {room} on floor {floor[room]})")
    return found


def package_sources() -> dict[Path, str]:
    return {path.relative_to(PACKAGE): path.read_text() for path in PACKAGE.rglob("*.py")}


def test_the_package_keeps_its_layers():
    assert violations(package_sources()) == []


def test_every_room_is_on_a_floor():
    rooms = {room_of(p) for p in package_sources() if p != Path("__init__.py")}
    on_floors = {room for rooms_ in FLOORS for room in rooms_}
    assert rooms == on_floors


@pytest.mark.parametrize("path, source, expected", [
    ("lm/frozen.py", "from pipeline.training.loop import run_steps\n", "a higher floor"),
    ("lm/frozen.py", "def f():\n    from pipeline.scoring import metrics\n", "a higher floor"),
    ("scoring/heldout.py", "from pipeline.generation.sampler import METHODS\n", "a higher floor"),
    ("studies/comparison.py", "from pipeline.distributed.backends import CONFIGURED\n",
     "a higher floor"),
    ("sandbox/client.py", "from pipeline.data.example import Example\n", "a higher floor"),
    ("baselines/soft_prompt.py", "import pipeline.config\n", "its own floor"),
    ("generation/sampler.py", "import ray\n", "only ['distributed'] import Ray"),
    ("method/prompt.py", "from pipeline.config import DenoiserConfig\n", "forbidden in method/"),
    ("method/prompt.py", "import deepspeed\n", "forbidden in method/"),
    ("method/prompt.py", "from mlflow import MlflowClient\n", "forbidden in method/"),
    ("newroom/x.py", "import torch\n", "on no floor"),
    ("training/loop.py", "from ..commands import run\n", "a higher floor"),
])
def test_a_forbidden_import_is_caught(path, source, expected):
    found = violations({Path(path): source})
    assert found and all(expected in f or "forbidden" in f or "higher" in f for f in found), found
    assert any(expected in f for f in found), found


def test_allowed_imports_pass():
    allowed = {Path("training/loop.py"): "from pipeline.method.prompt import DiffusionPrompt\n"
                                         "from .checkpoint import save_checkpoint\nimport torch\n",
               Path("distributed/train.py"): "import ray\nfrom pipeline.training import job\n"}
    assert violations(allowed) == []


def module_cycles(sources: dict[Path, str]) -> list[list[str]]:
    """Import circles between the package's modules (every import, lazy ones included)."""
    modules = {}  # dotted name -> (source, the name relative imports resolve against)
    for path, source in sources.items():
        dotted = ".".join(("pipeline", *path.with_suffix("").parts))
        name = dotted.removesuffix(".__init__")
        modules[name] = (source, dotted)
    graph = {}
    for name, (source, anchor) in modules.items():
        targets = set()
        for imported in imports_of(source, anchor):
            # `from pipeline.lm import loader` names pipeline.lm.loader when that is a module
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_circles():
    assert module_cycles(package_sources()) == []


def test_a_circle_is_caught():
    circle = {Path("training/job.py"): "from pipeline.training.loop import run_steps\n",
              Path("training/loop.py"): "def f():\n    from pipeline.training import job\n"}
    assert module_cycles(circle) == [["pipeline.training.job", "pipeline.training.loop",
                                      "pipeline.training.job"]]


# Size limits of the layout issue: files a reader can hold, functions that do one thing.
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
LONG_FILES_ALLOWED = {Path("config.py")}


def oversized(sources: dict[Path, str]) -> list[str]:
    """Files over MAX_FILE_LINES (bar the allowed ones) and functions over MAX_FUNCTION_LINES."""
    found = []
    for path, source in sorted(sources.items()):
        lines = source.count("\n") + (not source.endswith("\n"))
        if lines > MAX_FILE_LINES and path not in LONG_FILES_ALLOWED:
            found.append(f"{path}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path}:{node.lineno} {node.name}: {length} lines")
    return found


def test_files_and_functions_stay_short():
    assert oversized(package_sources()) == []


def test_a_long_function_is_caught():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    source = "def long():\n" + body
    assert oversized({Path("method/x.py"): source}) == [
        f"method/x.py:1 long: {MAX_FUNCTION_LINES + 1} lines"]
    assert oversized({Path("config.py"): "\n" * 500}) == []
    assert oversized({Path("lm/x.py"): "\n" * 500}) == ["lm/x.py: 500 lines"]
