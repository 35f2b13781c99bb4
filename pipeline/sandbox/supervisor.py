"""One program's supervisor, outside the sandbox: set it up, keep the time, read the judge.

Standard library only. A fresh fork of the server per program: it makes the program's cgroups,
starts the sandbox (``bwrap.argv``, or a plain process in ``process`` mode) with init's
descriptors (``judge.py``), counts the wall-clock limit from init's "started", reads the
judge's report, stops everything and turns the report into the verdict.
"""
from __future__ import annotations

import _signal
import fcntl
import marshal
import os
import secrets
import sys
import time

import pipeline.sandbox.bwrap as bwrap
import pipeline.sandbox.cases as cases
import pipeline.sandbox.cgroups as cgroups
import pipeline.sandbox.wire as wire
from pipeline.sandbox.judge import JOB_FD, LIFE_FD, REPORT_FD, TESTS_FD
from pipeline.sandbox.worker import dump

OUTPUT_TAIL = 4096        # bytes of the program's output kept (for crash messages)
REPORT_LIMIT = 1 << 20    # bytes of one report line
SECCOMP_FD = TESTS_FD + 1
# the in-sandbox modules, in import order (the server compiles them once: ``CODES``)
INSIDE = ("pipeline.sandbox.wire", "pipeline.sandbox.cases", "pipeline.sandbox.guard",
          "pipeline.sandbox.worker", "pipeline.sandbox.judge")
CODES: list = []
# init's command: the modules as the server compiled them, marshalled with the job on JOB_FD
BOOT = ("import marshal, sys, types\n"
        f"codes, job = marshal.load(open({JOB_FD}, 'rb'))\n"
        "for name, code in codes:\n"
        "    module = sys.modules[name] = types.ModuleType(name)\n"
        "    parent, _, child = name.rpartition('.')\n"
        "    if parent:\n"
        "        setattr(sys.modules[parent], child, module)\n"
        "    if code is None:\n"
        "        module.__path__ = []\n"
        "    else:\n"
        "        exec(code, module.__dict__)\n"
        "sys.modules['pipeline.sandbox.judge'].init(job)\n")
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP = 1, 36, 38, 22
ROOT_REFUSED = ("process isolation refuses to run programs as root (they would keep uid 0): "
                "use bwrap isolation, or run the harness as an unprivileged user")


def compile_inside() -> None:
    """Fill ``CODES`` (in the server, once)."""
    import importlib.util

    CODES[:] = [("pipeline", None), ("pipeline.sandbox", None)]
    for name in INSIDE:
        spec = importlib.util.find_spec(name)
        CODES.append((name, spec.loader.get_code(name)))  # type: ignore[union-attr]


def prctl(option: int, value: int, pointer: object = 0) -> None:
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(option, value, pointer, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}, {value}): {os.strerror(errno)}")


def load_seccomp(bpf: bytes) -> None:
    """Install the compiled filter on this process (``process`` mode; bwrap does it itself)."""
    import ctypes

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    rules = ctypes.create_string_buffer(bpf, len(bpf))
    prctl(_PR_SET_NO_NEW_PRIVS, 1)
    prctl(_PR_SET_SECCOMP, 2, ctypes.byref(Program(len(bpf) // 8, ctypes.addressof(rules))))


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("ddpt-sandbox")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _start(job: dict, workdir: str, fds: list[int], sandbox_uid: int | None,
           group: cgroups.Group | None) -> None:
    """The supervisor's child: join the cgroups, become the sandbox (never returns)."""
    report = fds[REPORT_FD]
    try:
        if group is not None:
            group.join(os.getpid())
        boot = [sys.executable, "-I", "-S", "-B", "-c", BOOT]
        if job["mode"] == "bwrap":
            command = bwrap.argv(job, workdir, sandbox_uid, SECCOMP_FD, boot)
        else:
            command = boot
            os.setsid()  # its own session: kill(0, ...) reaches nobody else
            prctl(_PR_SET_PDEATHSIG, _signal.SIGKILL)  # dies with its supervisor
            if job["seccomp"]:  # where pyseccomp is installed (docs/execution.md)
                load_seccomp(bytes.fromhex(job["seccomp"]))
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in fds]  # a source may be a target
        for target, fd in enumerate(high):
            os.dup2(fd, target)
        report = REPORT_FD
        os.closerange(len(fds), 65536)
        os.chdir(workdir if job["mode"] == "process" else "/")
        os.execv(command[0], command)
    except BaseException as exc:
        wire.write_line(report, wire.encode(("stop", "error", dump(
            f"sandbox setup failed: {type(exc).__name__}: {exc}")), lambda obj: -1))
        os._exit(121)


def children() -> list[int]:
    """Our children's pids (bwrap, or its init once bwrap is gone: we are a subreaper)."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return [int(pid) for pid in f.read().split()]
    except OSError:
        return []


class Supervisor:
    """Runs one job; ``verdict()`` returns the answer's fields."""

    def __init__(self, job: dict) -> None:
        self.job, self.bwrap = job, job["mode"] == "bwrap"
        self.out = bytearray()
        self.started: float | None = None  # when init reported the program's start
        self.cases: dict[int, tuple[str, str]] = {}
        self.stop: tuple[str, str] | None = None
        self.died: int | None = None  # the worker's wait status, when it ended early
        self.done = False
        self.group: cgroups.Group | None = None

    def verdict(self) -> dict:
        import shutil
        import tempfile

        try:
            total = cases.count(self.job["tests"]) if self.job["tests"] else 1
        except ValueError as err:
            return self._answer("error", str(err), 0)
        if self.job["mode"] == "process" and os.geteuid() == 0:
            return self._answer("error", ROOT_REFUSED, total)
        workdir = tempfile.mkdtemp(prefix="run-", dir=self.job.get("root"))
        try:
            if self.job.get("cgroups"):
                self.group = cgroups.Group(self.job["cgroups"], self.job["batch"],
                                           f"p{self.job['id']}")
                self.group.create(int(self.job["memory_mb"]), int(self.job["max_processes"]))
            return self._answer(*self._supervise(workdir, total), total)
        finally:
            if self.group is not None:
                self.group.remove()
            shutil.rmtree(workdir, ignore_errors=True)

    def _answer(self, status: str, message: str, total: int) -> dict:
        passed = sum(1 for outcome, _ in self.cases.values() if outcome == "passed")
        ran = sum(1 for outcome, _ in self.cases.values() if outcome != "died")
        return {"status": status, "message": dump(message), "cases_passed": passed,
                "cases_total": total, "cases_run": ran}

    def _supervise(self, workdir: str, total: int) -> tuple[str, str]:
        root = os.geteuid() == 0
        # secrets, not random: every supervisor is a fork of the server, random's state too
        sandbox_uid = (1 << 30) + secrets.randbelow(1 << 30) if root else None
        if root:
            os.setgroups([])  # nothing below inherits the caller's supplementary groups
        if self.bwrap:
            prctl(_PR_SET_CHILD_SUBREAPER, 1)  # bwrap's init is ours if bwrap dies first
        out_r, out_w = os.pipe()
        report_r, report_w = os.pipe()
        life_r, life_w = os.pipe()  # the write end stays here: exec closes it in the child
        # the tests go on a descriptor of their own, which init reads after forking the worker
        inside = {**{k: v for k, v in self.job.items() if k != "tests"}, "workdir": workdir}
        fds = [os.open("/dev/null", os.O_RDONLY), out_w, out_w] + [-1] * (SECCOMP_FD - 2)
        fds[REPORT_FD], fds[LIFE_FD] = report_w, life_r
        fds[JOB_FD] = _memfd(marshal.dumps((CODES, inside)))
        fds[TESTS_FD] = _memfd(self.job["tests"].encode("utf-8", "surrogatepass"))
        fds[SECCOMP_FD] = _memfd(bytes.fromhex(self.job["seccomp"]))
        began = time.monotonic()
        pid = os.fork()
        if pid == 0:
            for fd in (out_r, report_r, life_w):
                os.close(fd)
            _start(self.job, workdir, fds, sandbox_uid, self.group)
        for fd in {*fds}:
            os.close(fd)
        self.total = total
        timed_out = self._wait(out_r, report_r, began)
        os.close(life_w)  # init ends at its end of file
        self._stop(pid)
        self._drain(out_r, report_r)
        for fd in (out_r, report_r):
            os.close(fd)
        return self._judge(timed_out=timed_out)

    def _wait(self, out_r: int, report_r: int, began: float) -> bool:
        """Collect output and the report until the judge is done; True on the wall-clock limit."""
        import selectors

        limit = float(self.job["timeout_s"])

        def left() -> float:  # the sandbox's own set-up (bounded by the limit) is not counted
            return (self.started or began) + limit - time.monotonic()

        sel = selectors.DefaultSelector()
        for fd in (out_r, report_r):
            sel.register(fd, selectors.EVENT_READ)
        self.report = bytearray()
        try:
            while not self.done:
                # past the deadline, still read what is there: on a loaded machine we may wake
                # late, with the judge's last lines already waiting
                wait = left()
                for key, _ in sel.select(max(wait, 0)):
                    if not self._read(key.fd, out_r):
                        sel.unregister(key.fd)
                        if key.fd == report_r:
                            return False  # init is gone
                if wait <= 0 and not self.done and left() <= 0:
                    return True
            return False
        finally:
            sel.close()

    def _read(self, fd: int, out_r: int) -> bool:
        """Read one chunk from ``fd`` into its buffer; False at end of file."""
        chunk = os.read(fd, 65536)
        if fd == out_r:
            self.out += chunk
            del self.out[:-OUTPUT_TAIL]
            return bool(chunk)
        self.report += chunk
        while (end := self.report.find(b"\n")) >= 0:
            self._take(bytes(self.report[:end]).decode("utf-8", "replace"))
            del self.report[:end + 1]
        if len(self.report) > REPORT_LIMIT:
            del self.report[:]
        return bool(chunk)

    def _take(self, line: str) -> None:
        """One report line of the judge's (only init writes on the report pipe)."""
        try:
            message = wire.decode(line, lambda number: None)
        except ValueError:
            return
        if type(message) is not tuple or not message:
            return
        kind, *fields = message
        if kind == "started" and self.started is None:  # only the first one counts
            self.started = time.monotonic()
        elif kind == "case" and len(fields) == 3 and type(fields[0]) is int \
                and fields[1] in ("passed", "failed", "error", "died"):
            self.cases.setdefault(fields[0], (fields[1], str(fields[2])))
        elif kind == "stop" and len(fields) == 2 and self.stop is None:
            self.stop = (str(fields[0]), str(fields[1]))
        elif kind == "died" and len(fields) == 1 and type(fields[0]) is int:
            self.died = fields[0]
        elif kind == "done":
            self.done = True

    def _stop(self, pid: int) -> None:
        """Kill what is left: the bwrap sandbox (through its init) or the program's session."""
        if self.bwrap:
            # killed, bwrap leaves its child to us (a subreaper): kill our children and reap
            # until none is left (init's exit returns once the kernel has killed the rest of
            # its namespace)
            targets = [pid]
            while True:
                for target in targets:
                    try:
                        os.kill(target, _signal.SIGKILL)
                    except OSError:
                        pass
                try:
                    os.waitpid(-1, 0)
                except ChildProcessError:
                    return
                targets = children()
        try:
            os.killpg(pid, _signal.SIGKILL)
        except OSError:
            pass
        os.waitpid(pid, 0)

    def _drain(self, out_r: int, report_r: int) -> None:
        for fd in (out_r, report_r):
            os.set_blocking(fd, False)
            try:
                while self._read(fd, out_r):
                    pass
            except OSError:
                pass

    def _judge(self, *, timed_out: bool) -> tuple[str, str]:
        """The verdict: passed when the judge passed every case and finished."""
        total = self.total
        if self.done and total > 0 and all(self.cases.get(i, ("",))[0] == "passed"
                                           for i in range(total)):
            return "passed", ""
        for index in range(total):  # the first case that did not pass decides
            outcome = self.cases.get(index)
            if outcome is None:
                break
            if outcome[0] == "died":
                return self._death()
            if outcome[0] != "passed":
                return outcome
        if self._memory_exceeded() or (self.died is not None and not timed_out):
            return self._death()
        if timed_out:
            return "timeout", f"wall-clock limit of {self.job['timeout_s']:g}s exceeded"
        if self.stop is not None:
            return self.stop
        if self.out.startswith(b"bwrap:"):  # bwrap could not set the sandbox up
            return "error", f"sandbox setup failed: {self.out.decode(errors='replace').strip()}"
        return "error", "the sandbox's init ended without a verdict"

    def _memory_exceeded(self) -> bool:
        return self.group is not None and self.group.oom_kills() > 0

    def _death(self) -> tuple[str, str]:
        """Why the program's process ended before the tests did."""
        if self._memory_exceeded():
            return "error", (f"memory limit of {self.job['memory_mb']} MB exceeded (the "
                             "sandbox's processes, files and shared memory together)")
        code = self.died
        if code is None or code < 0:
            return "error", "the program's process ended without a status"
        if os.WIFSIGNALED(code):
            sig = os.WTERMSIG(code)
            if sig == _signal.SIGXCPU:
                return "timeout", f"CPU time limit of {self.job['cpu_s']}s exceeded"
            if sig == _signal.SIGXFSZ:
                return "error", f"file size limit of {self.job['max_file_mb']} MB exceeded"
            import signal

            return "error", f"killed by {signal.Signals(sig).name}"
        tail = self.out.decode(errors="replace").strip().splitlines()[-1:] or [""]
        how = f"exited with code {os.WEXITSTATUS(code)} before its tests finished"
        return "error", f"{how}: {tail[0]}" if tail[0] else how
