"""The caller's side of the sandbox: start the supervisor server, send it programs, read verdicts.

The server (``server.py``, run as ``python -I -S``) does all the work; this side only writes job
lines and reads JSON answers, so nothing a program does reaches the caller.
"""
from __future__ import annotations

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
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from typing import TYPE_CHECKING

from pipeline.sandbox.server import ENV, MAX_MESSAGE

if TYPE_CHECKING:
    from pipeline.config import ExecutionConfig

STATUSES = ("passed", "failed", "timeout", "error")
MODES = ("auto", "bwrap", "process")
SERVER_GRACE_S = 15.0     # a verdict later than the wall-clock limit plus this: server is stuck
_SERVER = os.path.join(os.path.dirname(os.path.realpath(__file__)), "server.py")
_PROBE = "import fractions, heapq, json\nassert json.loads('[1]') == [1]\n"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecResult:
    """One program's outcome: ``status`` in STATUSES, a short ``message``, and ``seconds``
    (wall time from the sandbox's start to the verdict)."""

    status: str
    message: str
    seconds: float

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


def job_fields(limits: dict, mode: str, guard: bool, root: str) -> dict:
    """What every job line of a batch carries besides its ``id`` and ``program``."""
    return {"mode": mode, "guard": guard, "site": _site_dirs(), "root": root, **limits}


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

    def close(self, kill: bool = False) -> None:
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


def _result(answer: dict) -> ExecResult:
    status = str(answer.get("status"))
    if status not in STATUSES:
        return ExecResult("error", f"the sandbox answered {status!r}", 0.0)
    return ExecResult(status, str(answer.get("message", ""))[:MAX_MESSAGE],
                      float(answer.get("seconds", 0.0)))


OnResult = Callable[[ExecResult], object] | None


def _execute(programs: Sequence[str], limits: dict, mode: str, guard: bool, workers: int,
             on_result: OnResult = None) -> list[ExecResult]:
    """Run ``programs`` through a server, ``workers`` at a time; results in input order.

    If the server stalls or dies (it should not: each supervisor enforces its own limits), its
    whole process group is killed, the programs in flight get an error, and a new server runs
    the rest.
    """
    # the working directories live in one folder of ours: gone at the end even if a supervisor
    # was killed before it could clean up (0o711: a sandbox uid may enter, not list)
    root = tempfile.mkdtemp(prefix="ddpt-sandbox-")
    os.chmod(root, 0o711)
    common = job_fields(limits, mode, guard, root)
    results: list[ExecResult | None] = [None] * len(programs)
    pending = deque(range(len(programs)))
    try:
        _run_all(programs, common, workers, results, pending, on_result)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results  # type: ignore[return-value]  # every slot is filled


def _run_all(programs: Sequence[str], common: dict, workers: int,
             results: list[ExecResult | None], pending: deque, on_result: OnResult) -> None:
    def done(index: int, result: ExecResult) -> None:
        results[index] = result
        if on_result is not None:
            on_result(result)

    while pending:
        server, flight = Server(), {}
        try:
            while pending or flight:
                while pending and len(flight) < workers:
                    index = pending.popleft()
                    server.send({"id": index, "program": programs[index], **common})
                    flight[index] = time.monotonic()
                answer = server.receive(min(flight.values()) + common["timeout_s"]
                                        + SERVER_GRACE_S)
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


@cache
def probe(mode: str) -> ExecResult:
    """Run a trivial program with isolation ``mode`` once per process (cached)."""
    limits = {"timeout_s": 20.0, "cpu_s": 10, "memory_mb": 1024, "max_file_mb": 16,
              "max_processes": 16}
    return _execute([_PROBE], limits, mode, True, 1)[0]


@cache  # probe and warn once per process
def resolve_isolation(requested: str = "auto") -> str:
    """``bwrap`` or ``process``: what ``requested`` (auto, bwrap, process) means here.

    Raises SandboxError when ``bwrap`` is required but does not work on this machine.
    """
    if requested not in MODES:
        raise ValueError(f"isolation {requested!r} is not one of {list(MODES)}")
    if requested == "process":
        return "process"
    if sys.platform != "linux":
        why = "it needs Linux"
    elif shutil.which("bwrap", path=ENV["PATH"]) is None:
        why = "bwrap not found (Debian: apt-get install bubblewrap)"
    else:
        result = probe("bwrap")
        if result.passed:
            return "bwrap"
        why = result.message
    if requested == "bwrap":
        raise SandboxError(f"bwrap isolation does not work here: {why}")
    log.warning("sandbox: bwrap isolation does not work here (%s); falling back to process "
                "isolation, which relies on rlimits and the in-process guard (docs/execution.md)",
                why)
    return "process"


def run_program(program: str, config: ExecutionConfig, *, isolation: str | None = None,
                guard: bool = True) -> ExecResult:
    """Run one program (code followed by its tests) in the sandbox.

    ``isolation`` defaults to ``config.isolation``; ``guard=False`` leaves out the in-process
    guard (only to test the OS layer on its own).
    """
    mode = resolve_isolation(isolation or config.isolation)
    return _execute([program], _limits(config), mode, guard, 1)[0]


def run_programs(programs: Sequence[str], config: ExecutionConfig, *, guard: bool = True,
                 progress: bool = False) -> list[ExecResult]:
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
        return _execute(programs, _limits(config), mode, guard, workers,
                        on_result=bar and (lambda _: bar.update(1)))
    finally:
        if bar is not None:
            bar.close()
