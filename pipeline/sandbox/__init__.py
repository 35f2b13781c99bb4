"""Run untrusted Python programs (generated code plus its tests) in a sandbox.

The public API. ``client.py`` is the caller's side (it starts the server and reads verdicts);
the server (``server.py``) forks one supervisor (``supervisor.py``) per program, which starts
the sandbox (``bwrap.py``, ``cgroups.py``, ``seccomp.py``); inside it the judge
(``judge.py``) runs the tests against the program's process (``worker.py``), exchanging
plain values only (``wire.py``; docs/execution.md).
"""
from pipeline.sandbox.client import (
    MODES,
    STATUSES,
    ExecResult,
    Program,
    SandboxError,
    probe,
    resolve_isolation,
    run_program,
    run_programs,
)

__all__ = ["MODES", "STATUSES", "ExecResult", "Program", "SandboxError", "probe",
           "resolve_isolation", "run_program", "run_programs"]
