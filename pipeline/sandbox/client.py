"""The caller's side of the sandbox: start the supervisor server, send it programs, read verdicts.

The server (``server.py``, run as ``python -I -S``) does all the work; this side only writes job
lines and reads JSON answers, so nothing a program does reaches the caller.
"""
from __future__ import annotations

import ast
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from typing import TYPE_CHECKING

import pipeline.sandbox.cases as cases
import pipeline.sandbox.cgroups as cgroups
import pipeline.sandbox.seccomp as seccomp
from pipeline.config import ISOLATIONS as MODES
from pipeline.sandbox.server import deadline_s
from pipeline.sandbox.supervisor import ROOT_REFUSED
from pipeline.sandbox.worker import ENV, MAX_MESSAGE

if TYPE_CHECKING:
    from pipeline.config import ExecutionConfig

STATUSES = ("passed", "failed", "timeout", "error")
SERVER_GRACE_S = 15.0     # beyond the server's own deadline for a supervisor: the server is stuck
_SERVER = os.path.join(os.path.dirname(os.path.realpath(__file__)), "server.py")
_FIX = ("execution.isolation=auto and bwrap never fall back to weaker isolation "
        "(docs/execution.md, 'Where the sandbox works')")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Program:
    """A program and its tests, which the sandbox runs apart: ``code`` in the program's process,
    ``tests`` (and ``context``, code of the task's own such as a HumanEval prompt) in the judge,
    out of the program's reach. ``names``: the program's globals the tests may use (None: all
    but those named like a built-in or a standard module, which keep their real meaning).
    ``tests=""``: no tests; the program's one case is to run to its end (docs/execution.md)."""

    code: str
    tests: str = ""
    context: str = ""
    names: tuple[str, ...] | None = None

    @classmethod
    def from_source(cls, source: str) -> Program:
        """Split one program text: its trailing statements that hold an assert (or HumanEval's
        ``def check`` and ``check(...)``) are its tests, the rest its code. Line numbers stay."""
        try:
            with warnings.catch_warnings():  # "\." in a plain string: the program's business
                warnings.simplefilter("ignore")
                body = ast.parse(source).body
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            return cls(source)
        start = len(body)
        while start > 0 and cases.has_assert(body[start - 1]):
            start -= 1
        if start == len(body) and len(body) >= 2 and _calls_check(body[-1], body):
            start = next(i for i, node in enumerate(body) if _is_check(node, body[-1]))
        if start == len(body) or (start and body[start - 1].end_lineno >= _first_line(body[start])):
            return cls(source)
        lines = source.splitlines(keepends=True)
        first = _first_line(body[start])
        return cls("".join(lines[:first - 1]), "\n" * (first - 1) + "".join(lines[first - 1:]))


def _first_line(node: ast.stmt) -> int:
    return min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])


def _calls_check(last: ast.stmt, body: list[ast.stmt]) -> bool:
    return isinstance(last, ast.Expr) and isinstance(last.value, ast.Call) \
        and isinstance(last.value.func, ast.Name) and any(_is_check(n, last) for n in body)


def _is_check(node: ast.stmt, call: ast.stmt) -> bool:
    return isinstance(node, ast.FunctionDef) and node.name == call.value.func.id  # type: ignore


@dataclass(frozen=True)
class ExecResult:
    """One program's outcome: ``status`` in STATUSES, a short ``message``, ``seconds`` (wall
    time from the sandbox's start to the verdict), and how many of its test cases passed (the
    status is ``passed`` only when all did). ``cases_run``: the cases the judge ran to a verdict
    of their own (passed, failed or raised), so 0 when the program's code failed, timed out or
    exited before the tests (or the tests' setup failed before their first case)."""

    status: str
    message: str
    seconds: float
    cases_passed: int = 0
    cases_total: int = 0
    cases_run: int = 0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


class SandboxError(RuntimeError):
    """The sandbox itself cannot work here (e.g. an isolation was required but is missing)."""


def _limits(config: ExecutionConfig) -> dict:
    return {"timeout_s": float(config.timeout_s), "cpu_s": int(config.cpu_s),
            "memory_mb": int(config.memory_mb), "max_file_mb": int(config.max_file_mb),
            "max_processes": int(config.max_processes)}


@cache
def _site_dirs() -> tuple[str, ...]:
    """The caller's site-packages folders: the program may import what the caller can."""
    return tuple(p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")
                 and os.path.isdir(p))


@cache
def cgroup_layout() -> dict:
    """Where the sandboxes' cgroups go (cached; CgroupError when they cannot be made)."""
    return cgroups.detect()


def _controls(mode: str) -> tuple[dict | None, str]:
    """(cgroup layout, seccomp filter in hex) for ``mode``: both required under bwrap, used
    where they work under process isolation."""
    if mode == "bwrap":
        return cgroup_layout(), seccomp.filter_bpf().hex()
    try:
        layout: dict | None = cgroup_layout()
    except (cgroups.CgroupError, OSError):
        layout = None
    try:
        bpf = seccomp.filter_bpf().hex()
    except seccomp.SeccompError:
        bpf = ""
    return layout, bpf


def job_fields(limits: dict, mode: str, root: str, *, guard: bool, layout: dict | None = None,
               batch: str = "", bpf: str = "") -> dict:
    """What every job line of a batch carries besides its ``id`` and program."""
    return {"mode": mode, "guard": guard, "site": _site_dirs(), "root": root, "cgroups": layout,
            "batch": batch, "seccomp": bpf, **limits}


def _program_fields(program: str | Program) -> dict:
    if isinstance(program, str):
        program = Program.from_source(program)
    return {"code": program.code, "tests": program.tests, "context": program.context,
            "names": list(program.names) if program.names is not None else None}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _ServerStuck(Exception):
    pass


class Server:
    """One supervisor server (a child process in its own session) and its JSON-lines pipes."""

    def __init__(self) -> None:
        # -S: site's start-up (.pth files) costs more than most programs; site dirs come in jobs
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", _SERVER, "--serve"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV, cwd="/",
            start_new_session=True, close_fds=True)
        self.out, self.buffer = self.proc.stdout.fileno(), b""

    def send(self, job: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(job).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            raise _ServerStuck(f"the sandbox server died ({err})") from err

    def receive(self, deadline: float) -> dict:
        """The next answer line; _ServerStuck when none comes before ``deadline``."""
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.out], [], [], left)[0]:
                raise _ServerStuck("the sandbox did not answer in time")
            chunk = os.read(self.out, 65536)
            if not chunk:
                raise _ServerStuck(f"the sandbox server died (exit {self.proc.poll()})")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def close(self, *, kill: bool = False) -> None:
        if kill:
            _kill_group(self.proc.pid)
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=SERVER_GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc.pid)
            self.proc.wait()
        self.proc.stdout.close()


def _clean(text: str) -> str:
    """Text any writer can store: characters UTF-8 cannot hold (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _result(answer: dict) -> ExecResult:
    status = str(answer.get("status"))
    if status not in STATUSES:
        return ExecResult("error", _clean(f"the sandbox answered {status!r}"[:MAX_MESSAGE]), 0.0)
    return ExecResult(status, _clean(str(answer.get("message", ""))[:MAX_MESSAGE]),
                      float(answer.get("seconds", 0.0)), int(answer.get("cases_passed", 0)),
                      int(answer.get("cases_total", 0)), int(answer.get("cases_run", 0)))


OnResult = Callable[[ExecResult], object] | None


def _execute(programs: Sequence[str | Program], limits: dict, mode: str, workers: int, *,
             guard: bool, on_result: OnResult = None) -> list[ExecResult]:
    """Run ``programs`` through a server, ``workers`` at a time; results in input order.

    A supervisor that stalls is killed alone by the server (its program gets an error); if the
    server itself stalls or dies, its whole process group is killed, the programs in flight get
    an error, and a new server runs the rest.
    """
    layout, bpf = _controls(mode)
    # the working directories live in one folder of ours: gone at the end even if a supervisor
    # was killed before it could clean up (0o711: a sandbox uid may enter, not list); the
    # cgroups in one batch folder, likewise
    root = tempfile.mkdtemp(prefix="ddpt-sandbox-")
    os.chmod(root, 0o711)
    batch = cgroups.make_batch(layout) if layout else ""
    common = job_fields(limits, mode, root, guard=guard, layout=layout, batch=batch, bpf=bpf)
    results: list[ExecResult | None] = [None] * len(programs)
    pending = deque(range(len(programs)))
    try:
        _run_all(programs, common, workers, results, pending, on_result)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if layout and not cgroups.remove_batch(layout, batch):
            log.warning("sandbox: cgroup batch %s stayed busy; the next batch removes it", batch)
    return results  # type: ignore[return-value]  # every slot is filled


def _run_all(programs: Sequence[str | Program], common: dict, workers: int,
             results: list[ExecResult | None], pending: deque, on_result: OnResult) -> None:
    def done(index: int, result: ExecResult) -> None:
        results[index] = result
        if on_result is not None:
            on_result(result)

    patience = deadline_s(common) + SERVER_GRACE_S
    while pending:
        server, flight = Server(), {}
        try:
            while pending or flight:
                while pending and len(flight) < workers:
                    index = pending.popleft()
                    server.send({"id": index, **_program_fields(programs[index]), **common})
                    flight[index] = time.monotonic()
                answer = server.receive(min(flight.values()) + patience)
                index = int(answer["id"])
                if flight.pop(index, None) is not None:
                    done(index, _result(answer))
        except _ServerStuck as err:
            server.close(kill=True)
            for index, sent in flight.items():
                done(index, ExecResult("error", str(err), time.monotonic() - sent))
        except BaseException:  # e.g. KeyboardInterrupt: leave no server behind
            server.close(kill=True)
            raise
        else:
            server.close()


_PROBE = Program("import fractions, heapq, json\n\ndef one():\n    return json.loads('[1]')\n",
                 "assert one() == [1]\n")


@cache
def probe(mode: str) -> ExecResult:
    """Run a trivial program with isolation ``mode`` once per process (cached)."""
    limits = {"timeout_s": 20.0, "cpu_s": 10, "memory_mb": 1024, "max_file_mb": 16,
              "max_processes": 16}
    return _execute([_PROBE], limits, mode, 1, guard=True)[0]


def _missing_for_bwrap() -> str:
    """Why bwrap isolation cannot work here, with what to install or enable ("" if it can)."""
    if sys.platform != "linux":
        return "it needs Linux"
    for tool, package in (("bwrap", "bubblewrap"), ("setpriv", "util-linux")):
        if shutil.which(tool, path=ENV["PATH"]) is None and (tool == "bwrap" or os.geteuid() == 0):
            return f"{tool} not found on {ENV['PATH']} (Debian: apt-get install {package})"
    try:
        cgroup_layout()
        seccomp.filter_bpf()
    except (cgroups.CgroupError, seccomp.SeccompError, OSError) as err:
        return str(err)
    result = probe("bwrap")
    return "" if result.passed else f"a probe program did not pass: {result.message}"


@cache  # probe once per process
def resolve_isolation(requested: str = "auto") -> str:
    """``bwrap`` or ``process``: what ``requested`` (auto, bwrap, process) means here.

    ``auto`` and ``bwrap`` need bubblewrap, the cgroups and the seccomp filter, and raise
    SandboxError saying what to install or enable when one is missing (never a silent fallback);
    ``process`` refuses to run as root.
    """
    if requested not in MODES:
        raise ValueError(f"isolation {requested!r} is not one of {list(MODES)}")
    if requested == "process":
        if os.geteuid() == 0:
            raise SandboxError(ROOT_REFUSED)
        return "process"
    why = _missing_for_bwrap()
    if why:
        raise SandboxError(f"bwrap isolation does not work here: {why}; {_FIX}")
    return "bwrap"


def run_program(program: str | Program, config: ExecutionConfig, *, isolation: str | None = None,
                guard: bool = True) -> ExecResult:
    """Run one program in the sandbox: a ``Program``, or one text (code followed by its tests,
    split by ``Program.from_source``).

    ``isolation`` defaults to ``config.isolation``; ``guard=False`` leaves out the in-process
    guard (only to test the OS layer on its own).
    """
    mode = resolve_isolation(isolation or config.isolation)
    return _execute([program], _limits(config), mode, 1, guard=guard)[0]


def run_programs(programs: Sequence[str | Program], config: ExecutionConfig, *,
                 guard: bool = True, progress: bool = False) -> list[ExecResult]:
    """Run programs in parallel (``config.workers``, 0 = cores); results in input order."""
    if not programs:
        return []
    mode = resolve_isolation(config.isolation)
    workers = min(len(programs), config.workers or os.cpu_count() or 1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(programs), desc="execute", unit="program")
    try:
        return _execute(programs, _limits(config), mode, workers, guard=guard,
                        on_result=bar and (lambda _: bar.update(1)))
    finally:
        if bar is not None:
            bar.close()
