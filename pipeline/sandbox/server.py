"""The sandbox's server: ``python -I -S -B server.py --serve``, started by ``client.py``.

Standard library only; it imports the sandbox's other server-side modules without running
``pipeline/__init__.py`` (``_packages``). It reads job lines (JSON) on stdin and forks a fresh
supervisor (``supervisor.py``) for each, in a process group of its own, which writes one answer
line on stdout. A supervisor that has not answered long after its limits allow (it should not
happen: each enforces its own) is killed alone, its cgroups removed, and the server answers an
error for that program only: the programs beside it keep their verdicts. Nothing here may
raise into the caller.
"""
from __future__ import annotations

import os
import sys
import time

GRACE_S = 15.0  # beyond a supervisor's own bound (setup + run, 2 x timeout_s): it is stuck
_HERE = os.path.dirname(os.path.realpath(__file__))


def deadline_s(job: dict) -> float:
    """How long a job's supervisor may take before it counts as stuck: its set-up and its run
    are each bounded by ``timeout_s``, plus a grace for a loaded machine."""
    return 2 * float(job["timeout_s"]) + float(job.get("grace_s", GRACE_S))


def _packages() -> None:
    """Make ``pipeline.sandbox.*`` importable from this folder without pipeline's __init__."""
    import types

    for name, path in (("pipeline", os.path.dirname(_HERE)), ("pipeline.sandbox", _HERE)):
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package


def _answer(job: dict) -> None:
    """A forked supervisor: run one job, write its answer line, exit (never returns)."""
    try:
        import json

        from pipeline.sandbox.supervisor import Supervisor, prctl

        os.setpgid(0, 0)  # the server may kill us, and what we started, alone
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the job lines are the server's, not ours
        os.close(null)
        prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: the server killed, so are we
        began = time.monotonic()
        try:
            fields = Supervisor(job).verdict()
        except Exception as exc:  # report, never crash silently
            fields = {"status": "error", "cases_passed": 0, "cases_total": 0,
                      "message": f"sandbox failure: {type(exc).__name__}: {exc}"[:300]}
        line = json.dumps({"id": job["id"], **fields,
                           "seconds": round(time.monotonic() - began, 4)}) + "\n"
        os.write(1, line.encode())  # one write below PIPE_BUF: answers never interleave
    finally:
        os._exit(0)


def _stuck(job: dict, pid: int, began: float) -> None:
    """Kill a supervisor that outlived its deadline, remove its cgroups, answer for it."""
    import json
    import signal

    import pipeline.sandbox.cases as cases
    import pipeline.sandbox.cgroups as cgroups

    for kill in (os.killpg, os.kill):  # the group, and the process if it had none yet
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if job.get("cgroups"):
        cgroups.Group(job["cgroups"], job["batch"], f"p{job['id']}").remove()
    try:
        total = cases.count(job["tests"]) if job["tests"] else 1
    except ValueError:
        total = 0
    message = (f"the sandbox's supervisor did not answer within {deadline_s(job):g}s"
               " and was stopped")
    os.write(1, (json.dumps({"id": job["id"], "status": "error", "message": message,
                             "cases_passed": 0, "cases_total": total,
                             "seconds": round(time.monotonic() - began, 4)}) + "\n").encode())


def _serve() -> None:
    """Server entry: job lines (JSON) on stdin; a forked supervisor answers each on stdout."""
    _packages()
    # imported once here instead of in every supervisor (forks share them)
    import ctypes  # noqa: F401
    import json
    import marshal  # noqa: F401
    import secrets  # noqa: F401
    import selectors
    import shutil  # noqa: F401
    import signal  # noqa: F401
    import tempfile  # noqa: F401

    import pipeline.sandbox.supervisor as supervisor

    supervisor.compile_inside()
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ)
    flights: dict[int, tuple[dict, float, int]] = {}  # pidfd -> (job, start, pid)
    pending, reading = b"", True
    while reading or flights:
        now = time.monotonic()
        waits = [start + deadline_s(job) - now for job, start, _ in flights.values()
                 if start != float("inf")]
        for key, _ in sel.select(max(min(waits), 0) if waits else None):
            if key.fd == 0:
                chunk = os.read(0, 1 << 16)
                reading = bool(chunk)
                if not reading:
                    sel.unregister(0)
                pending += chunk
                while b"\n" in pending:
                    line, _, pending = pending.partition(b"\n")
                    job = json.loads(line)
                    sys.path.extend(p for p in job.get("site", ()) if p not in sys.path)
                    pid = os.fork()
                    if pid == 0:
                        _answer(job)
                    pidfd = os.pidfd_open(pid)
                    sel.register(pidfd, selectors.EVENT_READ)
                    flights[pidfd] = (job, time.monotonic(), pid)
            else:  # a supervisor ended
                os.waitpid(flights.pop(key.fd)[2], 0)
                sel.unregister(key.fd)
                os.close(key.fd)
        now = time.monotonic()
        for pidfd, (job, start, pid) in list(flights.items()):
            if now > start + deadline_s(job):
                _stuck(job, pid, start)
                flights[pidfd] = (job, float("inf"), pid)  # reaped when its pidfd fires


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
