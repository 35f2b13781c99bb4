"""The sandbox's init and judge: fork the program's process, then run the tests against it.

Standard library only; started by the supervisor as ``python -I -S -B -c BOOT`` (pid 1 of the
bwrap sandbox, or a plain process in ``process`` mode) with these descriptors:

    0 /dev/null, 1 and 2 the output pipe, REPORT_FD the report pipe (to the supervisor),
    JOB_FD the job and this code (marshalled), LIFE_FD the lifeline, TESTS_FD the tests

The worker (``worker.py``) is forked before the tests are read, and closes everything but its
two pipes to the judge: the tests, the report pipe and this process's memory are out of the
program's reach (init is not dumpable, so neither ptrace nor /proc/1/mem reach it, and the
seccomp filter denies ptrace). The judge runs the task's context (a HumanEval prompt) and the
tests itself; the program's names are proxies (``Remote``) whose calls run in the worker and
return plain values only. Every verdict line on the report pipe is the judge's.

Report lines (``wire`` literals): ("started",), ("case", index, status, message) with status in
passed, failed, error, died; ("stop", status, message) when no further case can run;
("died", wait status) when the program's process ended early; ("done",).
"""
from __future__ import annotations

import _signal
import _thread
import builtins
import os
import sys
import time

import pipeline.sandbox.cases as cases
import pipeline.sandbox.wire as wire
from pipeline.sandbox.worker import describe, dump, serve

REPORT_FD, JOB_FD, LIFE_FD, TESTS_FD = 3, 4, 5, 6
REPLY_LIMIT = 16 << 20    # bytes of one answer of the program (its parse tree takes ~30x that)
CONTEXT_FILE = "<context>"
_PR_SET_DUMPABLE = 4


def report(message: tuple) -> None:
    wire.write_line(REPORT_FD, wire.encode(message, lambda obj: -1))


def _prctl(option: int, value: int) -> None:
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}, {value}): {os.strerror(errno)}")


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode("utf-8", "surrogatepass")  # as the supervisor wrote it


def init(job: dict) -> None:
    """The sandbox's init: start the worker, judge, report (never returns)."""
    try:
        _prctl(_PR_SET_DUMPABLE, 0)
        _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # Python's handler would let it in
        sys.path.extend(p for p in job["site"] if p not in sys.path)
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
    except BaseException as exc:
        report(("stop", "error", dump(f"sandbox setup failed: {type(exc).__name__}: {exc}")))
        os._exit(121)
    worker = os.fork()
    if worker == 0:
        serve(job, requests_r, replies_w, lambda flag: _prctl(_PR_SET_DUMPABLE, flag))
    os.close(requests_r)
    os.close(replies_w)
    report(("started",))  # the wall-clock limit counts from here
    statuses: dict[int, int] = {}
    _thread.start_new_thread(_reap, (statuses,))
    # the supervisor holds the lifeline's other end: its end of file, when the supervisor stops
    # us or dies, ends init and so the sandbox
    _thread.start_new_thread(_end_with_lifeline, ())
    Judge(job, _read_all(TESTS_FD), worker, statuses, requests_w, replies_r).run()
    report(("done",))
    os._exit(0)  # under bwrap the kernel now kills whatever is left in the namespace


def _reap(statuses: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            time.sleep(0.05)
            continue
        statuses[pid] = status


def _end_with_lifeline() -> None:
    while os.read(LIFE_FD, 64):
        pass
    os._exit(0)


class ProgramGone(BaseException):
    """The program's process ended (a BaseException: a test's ``except Exception`` must not
    hide it)."""


class ProgramError(Exception):
    """An exception of the program's that is not a built-in one."""


class Remote:
    """The judge's stand-in for an object of the program's: calls, attributes, items and
    iteration go to the worker; equality is identity and truth is refused, so the program's
    own ``__eq__`` or ``__bool__`` never decide a test."""

    __slots__ = ("_number",)
    judge: Judge

    def __init__(self, number: int) -> None:
        object.__setattr__(self, "_number", number)

    def __call__(self, *args, **kwargs):
        return self.judge.ask("call", self, args, kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self.judge.ask("getattr", self, name)

    def __setattr__(self, name: str, value) -> None:
        self.judge.ask("setattr", self, name, value)

    def __iter__(self):
        return self.judge.ask("iter", self)

    def __next__(self):
        return self.judge.ask("next", self)

    def __getitem__(self, key):
        return self.judge.ask("getitem", self, key)

    def __len__(self) -> int:
        return self.judge.ask("len", self)

    def __bool__(self) -> bool:
        raise TypeError("the truth of an object of the program's is not judged (return a "
                        "plain value: bool, int, str, list, ...)")

    def __repr__(self) -> str:
        return f"<the program's object #{self._number}>"


def _exception(name: str, message: str) -> BaseException:
    """The program's exception as the tests may catch it: the built-in class of that name."""
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            exc = kind(message)
        except TypeError:  # a constructor that wants more (UnicodeDecodeError)
            exc = ProgramError(message)
    else:
        exc = ProgramError(message)
    exc.sandbox_message = message  # type: ignore[attr-defined]
    return exc


class Judge:
    """Runs the tests against the worker's program and reports every case."""

    def __init__(self, job: dict, tests: str, worker: int, statuses: dict[int, int],
                 requests: int, replies: int) -> None:
        self.job, self.tests, self.worker, self.statuses = job, tests, worker, statuses
        self.requests, self.replies = requests, wire.LineReader(replies, REPLY_LIMIT)
        self.remotes: dict[int, Remote] = {}
        self.gone = False
        Remote.judge = self

    def run(self) -> None:
        steps = None
        if self.tests:  # "" only for a program given without tests: one case, its end
            try:
                steps = cases.split(self.tests)
            except ValueError as err:
                report(("stop", "error", dump(str(err))))
                return
        if not self._loaded():
            return
        if steps is None:
            report(("case", 0, "passed", ""))
            return
        namespace = self._namespace()
        if namespace is not None:
            self._steps(steps, namespace)

    def ask(self, *request):
        """Send a request to the worker and return its plain answer (or raise its exception)."""
        if self.gone:
            raise ProgramGone()
        try:
            text = wire.encode(request, self._number)
        except (TypeError, ValueError, RecursionError) as err:
            raise TypeError(f"the tests passed what the program cannot receive: {err}") from None
        try:
            wire.write_line(self.requests, text)
            answer = self.replies.line()
        except BrokenPipeError:
            answer = None
        except ValueError as err:
            raise ProgramError(f"the program's answer is too long ({err})") from None
        if answer is None:
            self.gone = True
            raise ProgramGone()
        try:
            reply = wire.decode(answer, self._remote)
        except ValueError as err:
            raise ProgramError(f"the program answered what is not a plain value ({err})") from None
        if type(reply) is tuple and len(reply) == 2 and reply[0] == "ok":
            return reply[1]
        if type(reply) is tuple and len(reply) == 3 and reply[0] == "raise" \
                and type(reply[1]) is str and type(reply[2]) is str:
            raise _exception(reply[1], dump(reply[2]))
        raise ProgramError("the program's answer is malformed")

    def _number(self, obj: object) -> int:
        if type(obj) is Remote:
            return obj._number
        raise TypeError(f"a {type(obj).__name__} is not a plain value")

    def _remote(self, number: int) -> Remote:
        if number not in self.remotes:
            self.remotes[number] = Remote(number)
        return self.remotes[number]

    def _loaded(self) -> bool:
        """Wait until the program's code has run; report why not if it failed."""
        try:
            text = self.replies.line()
            message = None if text is None else wire.decode(text, self._remote)
        except ValueError:
            message = ()
        if message is None:
            self._died()
            return False
        if message == ("loaded",):
            return True
        if type(message) is tuple and len(message) == 2 and message[0] in ("failed", "error") \
                and type(message[1]) is str:
            report(("stop", message[0], dump(message[1])))
        else:
            report(("stop", "error", "the program's process sent a malformed report"))
        return False

    def _namespace(self) -> dict | None:
        """The tests' globals: the task's context, run here, then the program's names."""
        namespace: dict = {"__name__": "__main__", "__builtins__": builtins}
        context = self.job.get("context") or ""
        try:
            if context:
                exec(compile(context, CONTEXT_FILE, "exec"), namespace)
        except BaseException as exc:
            report(("stop", "error", "the task's context failed: "
                    + describe(exc, context, CONTEXT_FILE)))
            return None
        names = self.job.get("names")
        try:
            found = self.ask("names", names)
        except ProgramGone:
            self._died()
            return None
        except BaseException as exc:
            report(("stop", "error", dump(f"the program's names: {exc}")))
            return None
        for name, entry in (found.items() if type(found) is dict else ()):
            if not (type(name) is str and type(entry) is tuple and len(entry) == 2):
                continue
            kind, value = entry
            stdlib = name in sys.stdlib_module_names
            if kind == "module":  # the real module: a standard one by the name the tests use
                module = _import(name if stdlib else value)
                if module is not None:
                    namespace[name] = module
            elif not (stdlib or names is None and hasattr(builtins, name)):
                namespace[name] = value
        return namespace

    def _steps(self, steps: list, namespace: dict) -> None:
        index = 0
        for kind, node in steps:
            try:
                exec(cases.compiled(node), namespace)
                outcome = ("passed", "")
            except ProgramGone:
                outcome = ("died", "")
            except BaseException as exc:
                failed = isinstance(exc, AssertionError)
                outcome = ("failed" if failed else "error", self._message(exc))
            if self.gone:
                outcome = ("died", "")
            if kind == "case":
                report(("case", index, *outcome))
                index += 1
            elif outcome[0] not in ("passed", "died"):
                report(("stop", outcome[0], dump("in the tests' setup: " + outcome[1])))
                return
            if self.gone:
                self._died()
                return

    def _message(self, exc: BaseException) -> str:
        message = getattr(exc, "sandbox_message", None)
        if isinstance(message, str) and message:
            return message
        return describe(exc, self.tests, cases.TESTS_FILE, "tests line")

    def _died(self) -> None:
        """Report how the program's process ended (killed if it only closed its pipe)."""
        self.gone = True
        for attempt in range(400):
            if self.worker in self.statuses:
                break
            if attempt == 200:
                os.kill(self.worker, 9)
            time.sleep(0.01)
        report(("died", self.statuses.get(self.worker, -1)))


def _import(name: object):
    if type(name) is not str:
        return None
    try:
        __import__(name)
        return sys.modules[name]
    except BaseException:
        return None
