"""The program's process inside the sandbox: it runs the code and answers the judge's calls.

Standard library only. The judge (``judge.py``, the sandbox's init) forks this process before it
reads the tests, so the tests are never in its memory. After the code has run, the worker
answers requests on a pipe, one line each way (``wire``): call a function of the program, read
or set an attribute, iterate, index. What it answers is only ever a plain value or a handle:
the judge compares and decides, out of the program's reach.
"""
from __future__ import annotations

import os
import sys
import types

import pipeline.sandbox.wire as wire
from pipeline.sandbox.guard import install as install_guard

PROGRAM_FILE = "<program>"   # the program's file name in tracebacks
MAX_MESSAGE = 300            # characters of a verdict's message
REQUEST_LIMIT = 64 << 20     # bytes of one request line from the judge
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def dump(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."


def describe(exc: BaseException, source: str, filename: str, where: str = "line") -> str:
    """The exception's last line, plus where in ``source`` (named ``filename``) it was raised."""
    try:
        import traceback

        text = traceback.format_exception_only(type(exc), exc)[-1].strip()
    except BaseException:  # a hostile __str__, a sabotaged import
        text = type(exc).__name__
    text = text.removeprefix("pipeline.sandbox.judge.")  # ProgramError: no module needed
    line = getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    if line:
        lines = source.splitlines()
        code = lines[line - 1].strip() if 0 < line <= len(lines) else ""
        text += f" ({where} {line}: {code[:80]})" if code else f" ({where} {line})"
    return dump(text)


def set_limits(job: dict) -> None:
    """rlimits of the program's process (and of its children)."""
    import resource

    mb = 1024 * 1024
    cpu = int(job["cpu_s"])
    for limit, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU first, then KILL
                         (resource.RLIMIT_AS, (job["memory_mb"] * mb,) * 2),
                         (resource.RLIMIT_FSIZE, (job["max_file_mb"] * mb,) * 2),
                         (resource.RLIMIT_NPROC, (job["max_processes"],) * 2),
                         (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(limit, value)


def _settle(job: dict, dumpable) -> None:
    """The process's surroundings before any code of the program runs."""
    dumpable(1)  # init is not dumpable, and forks inherit that: /proc/self stays ours
    workdir = job["workdir"]
    os.chdir(workdir)
    os.umask(0o022)
    os.environ.clear()
    os.environ.update({**ENV, "HOME": workdir, "TMPDIR": workdir, "PWD": workdir})
    import tempfile  # here, before the guard: its own search for a folder removes a file

    tempfile.tempdir = workdir
    set_limits(job)
    for name in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
        del sys.modules[name]  # the sandbox's own modules are not the program's to import


def serve(job: dict, requests: int, replies: int, dumpable) -> None:
    """Run the program, then answer the judge until it closes ``requests`` (never returns)."""
    try:
        import fcntl

        # to 3 and 4 by way of fds >= 10 (a source may be a target); then everything else of
        # init's goes: its report, the lifeline, the tests' descriptor
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (requests, replies)]
        for target, fd in zip((3, 4), high):
            os.dup2(fd, target)
        os.closerange(5, 65536)
        requests, replies = 3, 4
        _settle(job, dumpable)
    except BaseException as exc:
        _send(replies, ("error", dump(f"sandbox setup failed: {type(exc).__name__}: {exc}")))
        os._exit(121)
    if job.get("guard", True):
        install_guard(job["workdir"])
    module = types.ModuleType("__main__")
    sys.modules["__main__"] = module
    source = job["code"]
    try:
        exec(compile(source, PROGRAM_FILE, "exec"), module.__dict__)  # the point
    except AssertionError as exc:
        _finish(replies, ("failed", describe(exc, source, PROGRAM_FILE)))
    except SystemExit as exc:
        _finish(replies, ("error", f"SystemExit({exc.code!r}) before the tests finished"))
    except BaseException as exc:
        _finish(replies, ("error", describe(exc, source, PROGRAM_FILE)))
    _send(replies, ("loaded",))
    _answer(module, source, requests, replies)


def _send(fd: int, message: tuple) -> None:
    wire.write_line(fd, wire.encode(message, lambda obj: -1))


def _finish(fd: int, message: tuple) -> None:
    try:
        _send(fd, message)
    finally:
        os._exit(0)


class _Objects:
    """The program's objects the judge holds handles to (kept alive here)."""

    def __init__(self) -> None:
        self.by_number: dict[int, object] = {}
        self.numbers: dict[int, int] = {}

    def number(self, obj: object) -> int:
        key = id(obj)
        if key not in self.numbers:
            self.numbers[key] = len(self.by_number)
            self.by_number[len(self.by_number)] = obj
        return self.numbers[key]

    def get(self, number: int) -> object:
        return self.by_number[number]


def _answer(module: types.ModuleType, source: str, requests: int, replies: int) -> None:
    objects, reader = _Objects(), wire.LineReader(requests, REQUEST_LIMIT)
    read, write_line, encode, decode, exit_ = (reader.line, wire.write_line, wire.encode,
                                               wire.decode, os._exit)
    while (line := read()) is not None:
        try:
            request = decode(line, objects.get)
            reply = ("ok", _serve(request, module, objects))
        except BaseException as exc:  # the program's own exception, reported as such
            reply = ("raise", type(exc).__name__, describe(exc, source, PROGRAM_FILE))
        try:
            text = encode(reply, objects.number)
        except (ValueError, RecursionError) as err:
            text = encode(("raise", "ValueError", f"the result cannot be judged: {err}"),
                          objects.number)
        write_line(replies, text)
    exit_(0)


def _serve(request: tuple, module: types.ModuleType, objects: _Objects) -> object:
    op, *args = request
    if op == "names":
        return _names(module, args[0])
    target = args[0]
    if op == "call":
        return target(*args[1], **args[2])
    if op == "getattr":
        return getattr(target, args[1])
    if op == "setattr":
        setattr(target, args[1], args[2])
        return None
    if op == "iter":
        return iter(target)
    if op == "next":
        return next(target)
    if op == "getitem":
        return target[args[1]]
    if op == "len":
        return len(target)
    raise ValueError(f"unknown request {op!r}")


def _names(module: types.ModuleType, wanted: list[str] | None) -> dict:
    """{name: ("module", its name) | ("object", the value)} for the program's globals."""
    names = wanted if wanted is not None else [n for n in module.__dict__ if not n.startswith("__")]
    found = {}
    for name in names:
        if name in module.__dict__:
            value = module.__dict__[name]
            found[name] = (("module", str(getattr(value, "__name__", name)))
                           if isinstance(value, types.ModuleType) else ("object", value))
    return found
