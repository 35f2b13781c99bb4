"""Run untrusted Python programs in a sandbox (see ``server.py`` and docs/execution.md)."""
from pipeline.sandbox.server import (ExecResult, SandboxError, probe_namespaces,
                                     resolve_isolation, run_program, run_programs)

__all__ = ["ExecResult", "SandboxError", "probe_namespaces", "resolve_isolation", "run_program",
           "run_programs"]
