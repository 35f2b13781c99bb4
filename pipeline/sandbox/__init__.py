"""Run untrusted Python programs (generated code plus its tests) in a sandbox.

The public API. ``client.py`` is the caller's side (it starts the server and reads verdicts);
``server.py`` is the supervisor server that runs the programs (docs/execution.md).
"""
from pipeline.sandbox.client import (
    MODES,
    STATUSES,
    ExecResult,
    SandboxError,
    probe,
    resolve_isolation,
    run_program,
    run_programs,
)

__all__ = ["MODES", "STATUSES", "ExecResult", "SandboxError", "probe", "resolve_isolation",
           "run_program", "run_programs"]
