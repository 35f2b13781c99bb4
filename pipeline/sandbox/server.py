"""The sandbox's server side: run untrusted programs; standard library only, no ``pipeline``.

``python -I -S server.py --serve`` is the supervisor server that ``client.py`` starts: it reads
job lines (JSON) on stdin and, for each, forks a fresh supervisor that sets the program up,
enforces the limits and writes one verdict line on stdout. The same code, started by ``_BOOT``,
is the init of a bwrap sandbox (below). Nothing here may raise into the caller.

Isolation ``bwrap`` (bubblewrap, the sandbox tool Flatpak uses; chosen by ``auto`` when it works):
    supervisor (caller's uid, outside; a child subreaper)
      +- [root caller] bwrap as root, mount namespace only: folders others cannot enter on the
      |  way to Python's install are covered by tmpfs and Python is bound back, so that
      |  setpriv can switch to a random unprivileged uid that still reaches the interpreter
      +- bwrap (as that uid, or as the non-root caller): new user, mount, pid, net, ipc, uts
         (and cgroup) namespaces; no capabilities, no_new_privs, no further user namespaces
         +- init (pid 1, ``_init``): reaps, reports the program's exit status; when it exits
            the kernel kills everything left in the namespace (fork bombs too)
            +- program (pid 2): rlimits, the guard, the code
  * user: the program is the namespace's root without any capability, mapped to that random
    uid when the caller is root (so RLIMIT_NPROC applies and file permissions protect the
    caller's files), or to the caller's own uid otherwise.
  * mount: everything read-only; the caller's home, /tmp, /var/tmp and /run are empty tmpfs
    (Python's own install bound back when it lives there); the working directory and /dev/shm
    are small private tmpfs, gone afterwards; /dev is bwrap's minimal one, /proc the new pid
    namespace's.
  * pid: the program cannot signal the supervisor or the caller (``os.getppid()`` is init,
    which it may not signal); net: only a loopback of its own; ipc, uts: its own.
  * init ends when the supervisor's end of its lifeline pipe closes (the supervisor stopped the
    program, or died), and the namespace with it; bwrap dies with the supervisor too.
Isolation ``process`` (fallback where bwrap does not work, or forced): the program runs in its
own session under the supervisor, which takes any signal meant for "the parent"; as root it
switches to a random unprivileged uid when Python's install is readable by others. It has no
read-only view and no network or pid isolation: the guard below is then the main barrier.

In both modes the program also gets: rlimits (CPU time, address space, file size, processes,
no core dumps), a wall-clock timeout after which the whole tree is killed, a minimal
environment (PATH, LANG, HOME/TMPDIR = its working directory; nothing inherited), stdin from
/dev/null, and an in-process guard (like HumanEval's ``reliability_guard``): process, file
removal, permission, socket and ctypes functions disabled, and writes outside the working
directory refused. The guard is a second layer only: Python code can undo it.

A program passes only if it ran to its last line: then the runner reads a random nonce (made by
the supervisor after the fork, so not in the program's memory or text) from a private pipe and
returns it on another private pipe. ``sys.exit``, ``os._exit``, a crash or a printed fake
marker before that point cannot pass. Limits: code that deliberately hunts down the runner's
file descriptors inside its own process could forge the marker; the sandbox bounds what code
can do to the machine, it does not make a determined cheat impossible.
"""
from __future__ import annotations

# Only what init and the program need, and C modules rather than their Python wrappers (signal
# and json import enum and re): under bwrap each program starts a fresh interpreter, and these
# imports would cost more than most programs take to run. The supervisor's modules are imported
# where they are used (the server imports them once, in _serve).
import _json
import _signal
import _thread
import fcntl
import marshal
import os
import sys
import time
import types

MAX_MESSAGE = 300         # characters of a verdict's message
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
_OUTPUT_TAIL = 4096       # bytes of the program's output kept (for crash messages)
_VERDICT_MAX = 65536      # bytes read from the verdict pipe
_PROGRAM = "<program>"    # the program's file name in tracebacks
_SERVER = os.path.realpath(__file__)
# init runs this file's code as the server compiled it once (marshalled with the job on fd 6):
# compiling it again in each program's fresh interpreter would cost more than the program
_BOOT = ("import marshal; code, job = marshal.load(open(6, 'rb')); "
         f"env = {{'__name__': 'ddpt_sandbox', '__file__': {_SERVER!r}}}; exec(code, env); "
         "env['_init'](job)")
_code: types.CodeType | None = None  # set by _serve
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 36, 38
_NONCE_FD, _VERDICT_FD = 3, 4      # the program's private pipes
_CTL_FD, _JOB_FD, _LIFE_FD = 5, 6, 7  # under bwrap: init's reports, the job, the lifeline
_NONCE_BYTES = 16
_HIDDEN = ("/tmp", "/var/tmp", "/run")
def _prctl(option: int, value: int) -> None:
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}, {value}): {os.strerror(errno)}")


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, _signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _dump(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


class _quiet:
    """``with _quiet():`` ignores OSError (a process already gone, a pipe already empty)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type is not None and issubclass(exc_type, OSError)


# ---------------------------------------------------------------- inside the sandbox

def _set_limits(job: dict) -> None:
    import resource

    mb = 1024 * 1024
    cpu = int(job["cpu_s"])
    for limit, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU first, then KILL
                         (resource.RLIMIT_AS, (job["memory_mb"] * mb,) * 2),
                         (resource.RLIMIT_FSIZE, (job["max_file_mb"] * mb,) * 2),
                         (resource.RLIMIT_NPROC, (job["max_processes"],) * 2),
                         (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(limit, value)


def _guard(workdir: str) -> None:
    """The second layer, as HumanEval's reliability_guard: deny what tests never need."""
    import _posixsubprocess
    import _socket
    import builtins
    import faulthandler
    import io
    import shutil as sh  # imported already (by tempfile)

    faulthandler.disable()

    def deny(name: str):
        def denied(*args, **kwargs):
            raise PermissionError(f"{name} is disabled in the sandbox")
        return denied

    for name in ("kill", "killpg", "system", "popen", "fork", "forkpty", "vfork", "posix_spawn",
                 "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execlpe",
                 "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp",
                 "spawnvp", "remove", "unlink", "rmdir", "removedirs", "rename", "renames",
                 "replace", "truncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown",
                 "chroot", "chdir", "fchdir", "setuid", "setgid", "setresuid", "setresgid",
                 "link", "symlink", "mkfifo", "mknod"):  # not register_at_fork: random,
        # threading and logging call it when imported, and fork itself is denied
        if hasattr(os, name):
            setattr(os, name, deny(f"os.{name}"))
    sh.rmtree, sh.move, sh.chown = deny("shutil.rmtree"), deny("shutil.move"), deny("shutil.chown")
    # the C layer under subprocess and socket, so that neither needs importing here; socket must
    # not be imported before this (its classes would already derive from the real one)
    _posixsubprocess.fork_exec = deny("subprocess.Popen")

    class NoSocket(_socket.socket):
        __slots__ = ()  # socket.socket, made from this if imported later, adds __weakref__

        def __init__(self, *args, **kwargs):
            raise PermissionError("sockets are disabled in the sandbox")

    _socket.socket = _socket.SocketType = NoSocket
    _socket.socketpair = deny("socket")
    for name in ("ctypes", "_ctypes"):
        sys.modules[name] = None  # type: ignore[assignment]  # import now fails

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an already open descriptor
        return _under(os.path.realpath(os.path.join(workdir, os.fsdecode(path))), workdir)

    real_open, real_os_open = builtins.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"writing outside the working directory is denied: {file!r}")
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not inside(path):
            raise PermissionError(f"writing outside the working directory is denied: {path!r}")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = open_
    os.open = os_open


def _describe(exc: BaseException, source: str) -> str:
    """The exception's last line, plus where in the program it was raised."""
    try:
        import traceback

        text = traceback.format_exception_only(type(exc), exc)[-1].strip()
    except BaseException:  # a hostile __str__, a sabotaged import
        text = type(exc).__name__
    line = getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _PROGRAM:
            line = tb.tb_lineno
        tb = tb.tb_next
    if line:
        lines = source.splitlines()
        code = lines[line - 1].strip() if 0 < line <= len(lines) else ""
        text += f" (line {line}: {code[:80]})" if code else f" (line {line})"
    return _dump(text)


def _run(source: str, guard: bool, workdir: str) -> None:
    """Execute the program in a fresh ``__main__``; send the verdict; never return."""
    read, write, exit_, quote = os.read, os.write, os._exit, _json.encode_basestring_ascii

    def verdict(status: str, message: str = "", nonce: str = "") -> None:
        # a JSON line made with json's own string encoder (json itself, with re, costs more to
        # import than most programs take to run)
        line = (f'{{"status": {quote(status)}, "message": {quote(message)}, '
                f'"nonce": {quote(nonce)}}}\n')
        try:
            _write_all(_VERDICT_FD, line.encode())
        finally:
            exit_(0)

    if guard:
        _guard(workdir)
    module = types.ModuleType("__main__")
    sys.modules["__main__"] = module
    try:
        exec(compile(source, _PROGRAM, "exec"), module.__dict__)  # the point
    except AssertionError as exc:
        verdict("failed", _describe(exc, source))
    except SystemExit as exc:
        verdict("error", f"SystemExit({exc.code!r}) before the tests finished")
    except BaseException as exc:
        verdict("error", _describe(exc, source))
    # only here, after the last line, does the nonce leave its pipe
    nonce = b""
    while len(nonce) < _NONCE_BYTES * 2 and (chunk := read(_NONCE_FD, 64)):
        nonce += chunk
    write(_VERDICT_FD, b"")  # keep `write` referenced: the program may have replaced os.write
    verdict("passed", nonce=nonce.decode())


def _program(job: dict, workdir: str, fds: dict[str, int], sandbox_uid: int | None,
             confine: bool) -> None:
    """The program's process: confine itself (``process`` mode), run the code (never returns).

    Under bwrap there is nothing left to confine: bwrap has confined init, and so this fork.
    """
    # every descriptor to fds >= 10 first: a source may be one of the targets 0-4
    fds = {name: fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for name, fd in fds.items()}
    try:
        os.setsid()  # its own session: kill(0, ...) reaches nobody else
        if confine:
            _prctl(_PR_SET_PDEATHSIG, _signal.SIGKILL)  # dies with its supervisor
            if sandbox_uid is not None:
                os.setresgid(sandbox_uid, sandbox_uid, sandbox_uid)
                os.setresuid(sandbox_uid, sandbox_uid, sandbox_uid)
            _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        os.chdir(workdir)
        os.umask(0o022)
        os.environ.clear()
        os.environ.update({**ENV, "HOME": workdir, "TMPDIR": workdir, "PWD": workdir})
        import tempfile  # here, before the guard: its own search for a folder removes a file

        tempfile.tempdir = workdir
        null = fcntl.fcntl(os.open("/dev/null", os.O_RDONLY), fcntl.F_DUPFD, 10)
        for target, fd in ((0, null), (1, fds["out"]), (2, fds["out"]),
                           (_NONCE_FD, fds["nonce"]), (_VERDICT_FD, fds["verdict"])):
            os.dup2(fd, target)
        _set_limits(job)
        _write_all(fds["ctl"], b"started\n")  # the wall-clock limit counts from here
    except BaseException as exc:
        _write_all(fds["ctl"], f"setup {type(exc).__name__}: {exc}\n".encode())
        os._exit(121)
    os.closerange(_VERDICT_FD + 1, 65536)  # the supervisor's pipes included
    _run(job["program"], bool(job["guard"]), workdir)


def _end_with_lifeline() -> None:
    while os.read(_LIFE_FD, 64):
        pass
    os._exit(0)


def _init(job: dict) -> None:
    """pid 1 of the bwrap sandbox (``_BOOT``): start the program, reap everything, report."""
    sys.path.extend(p for p in job["site"] if p not in sys.path)
    fds = {"out": 1, "nonce": _NONCE_FD, "verdict": _VERDICT_FD, "ctl": _CTL_FD}
    child = os.fork()
    if child == 0:
        _program(job, job["workdir"], fds, None, confine=False)
    for fd in (0, 1, 2, _NONCE_FD, _VERDICT_FD):
        os.close(fd)
    # the supervisor holds the lifeline's other end: its end of file, when the supervisor stops
    # us or dies, ends init and so the sandbox (bwrap's --die-with-parent cannot reach across
    # the root bwrap, which may not signal the sandbox uid)
    _thread.start_new_thread(_end_with_lifeline, ())
    while True:
        pid, status = os.wait()
        if pid == child:
            break
    _write_all(_CTL_FD, f"status {status}\n".encode())
    os._exit(0)  # the kernel now kills whatever is left in the namespace


# ---------------------------------------------------------------- the supervisor

def _python_paths() -> list[str]:
    """Real paths of the interpreter's install, its import path and this file's folder."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(_SERVER),
             *[p for p in sys.path if p and os.path.isdir(p)]}
    return sorted({os.path.realpath(p) for p in paths})


def _closed_on_the_way(path: str, bits: int) -> str | None:
    """The first folder on the way to ``path`` (itself included) that lacks ``bits`` for others."""
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        if not os.stat("/".join(parts[:i])).st_mode & bits:
            return "/".join(parts[:i])
    return None


def _outermost(paths: list[str]) -> list[str]:
    return sorted(p for p in set(paths) if not any(_under(p, q) for q in paths if q != p))


def _view(folders: list[str]) -> tuple[list[str], list[str]]:
    """(folders to cover with an empty tmpfs, Python folders inside them to bind back).

    ``folders`` plus any folder others cannot enter on the way to Python's install (an
    unprivileged uid could not reach the interpreter through it, nor could bwrap run as that
    uid bind it). Computed outside, where the caller's home and uid are still known.
    """
    python = _python_paths()
    hidden = [*folders, *filter(None, (_closed_on_the_way(p, 0o001) for p in python))]
    hidden = _outermost([p for p in hidden if p != "/" and os.path.isdir(p)])
    keep = _outermost([p for p in python if any(_under(p, h) for h in hidden)])
    return hidden, keep


def _hide(hidden: list[str], keep: list[str]) -> list[str]:
    """bwrap arguments: an empty tmpfs on each of ``hidden``, ``keep`` bound back read-only."""
    args: list[str] = []
    for folder in hidden:
        args += ["--size", str(1 << 20), "--tmpfs", folder]
    made: set[str] = set()
    for path in keep:
        top = next(h for h in hidden if _under(path, h))
        parts = path[len(top):].strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):  # else bwrap makes the folders on the way 0700
            folder = "/".join([top.rstrip("/"), *parts[:i]])
            if folder not in made:
                args += ["--dir", folder]
                made.add(folder)
        args += ["--ro-bind", path, path]
    return args


def _which(name: str) -> str:
    import shutil

    path = shutil.which(name, path=ENV["PATH"])
    if path is None:
        raise FileNotFoundError(f"{name} not found in {ENV['PATH']}")
    return path


def _bwrap_argv(job: dict, sandbox_uid: int | None) -> list[str]:
    """The command line that runs ``_init`` in the sandbox (see the module's docstring)."""
    bwrap, workdir = _which("bwrap"), job["workdir"]
    size = str(max(4 * int(job["max_file_mb"]), 8) << 20)
    hidden, keep = _view([os.path.realpath(os.path.expanduser("~")), *_HIDDEN])
    argv = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--disable-userns", "--uid", "0",
            "--gid", "0", "--cap-drop", "ALL", "--die-with-parent", "--new-session",
            "--as-pid-1", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            *_hide(hidden, keep), "--size", size, "--perms", "0700", "--tmpfs", workdir,
            "--size", size, "--perms", "1777", "--tmpfs", "/dev/shm"]
    for folder in (*hidden, "/dev", "/proc"):  # only the workdir and /dev/shm stay writable
        argv += ["--remount-ro", folder]
    argv += ["--chdir", workdir, "--clearenv"]
    for name, value in ENV.items():
        argv += ["--setenv", name, value]
    argv += ["--", sys.executable, "-I", "-S", "-B", "-c", _BOOT]
    if sandbox_uid is None:
        return argv
    # bwrap run by an unprivileged uid binds only what that uid can reach (it resolves every
    # source path as that uid): a bwrap as root first brings Python's install within reach
    # (--dev-bind: the inner bwrap needs /dev/null and a writable-flagged /proc to mount its own)
    uid = str(sandbox_uid)
    return [bwrap, "--die-with-parent", "--cap-drop", "ALL", "--cap-add", "CAP_SETUID",
            "--cap-add", "CAP_SETGID", "--dev-bind", "/", "/", *_hide(*_view([])), "--",
            _which("setpriv"), "--reuid", uid, "--regid", uid, "--clear-groups", "--", *argv]


def _exec_bwrap(job: dict, fds: dict[str, int], life: int, sandbox_uid: int | None) -> None:
    """The supervisor's child: become bwrap, which runs ``_init`` (never returns)."""
    ctl = fds["ctl"]
    try:
        argv = _bwrap_argv(job, sandbox_uid)
        job_fd = os.memfd_create("job")
        _write_all(job_fd, marshal.dumps((_code, job)))
        os.lseek(job_fd, 0, os.SEEK_SET)
        null = os.open("/dev/null", os.O_RDONLY)
        sources = [null, fds["out"], fds["out"], fds["nonce"], fds["verdict"], ctl, job_fd,
                   life]
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in sources]  # a source may be a target
        for target, fd in enumerate(high):
            os.dup2(fd, target)
        ctl = _CTL_FD
        os.closerange(len(sources), 65536)
        os.chdir("/")
        os.execv(argv[0], argv)
    except BaseException as exc:
        _write_all(ctl, f"setup {type(exc).__name__}: {exc}\n".encode())
        os._exit(121)


def _children() -> list[int]:
    """Our children's pids (bwrap, or its init once bwrap is gone: we are a subreaper)."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return [int(pid) for pid in f.read().split()]
    except OSError:
        return []


def _python_readable_by_others() -> bool:
    """Can an unrelated uid reach and read the interpreter's files?"""
    return not any(_closed_on_the_way(path, 0o005) for path in _python_paths())


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` (the process mode's leftovers), a few rounds."""
    for _ in range(5):
        found = False
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/status") as f:
                    line = next(x for x in f if x.startswith("Uid:"))
                if int(line.split()[1]) == uid:
                    found = True
                    os.kill(int(name), _signal.SIGKILL)
            except (OSError, StopIteration, ValueError):
                continue
        if not found:
            return
        time.sleep(0.01)


class _Supervisor:
    """Runs one job; ``verdict()`` returns (status, message)."""

    def __init__(self, job: dict) -> None:
        self.job, self.bwrap = job, job["mode"] == "bwrap"
        self.out, self.verdict_bytes = bytearray(), bytearray()
        self.exit_status: int | None = None
        self.started: float | None = None  # when the program's own code began
        self.setup_error = ""
        self.nonce = ""
        self.life = -1  # the write end of init's lifeline

    def verdict(self) -> tuple[str, str]:
        import shutil
        import tempfile

        workdir = tempfile.mkdtemp(prefix="run-", dir=self.job.get("root"))
        try:
            return self._supervise(workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _supervise(self, workdir: str) -> tuple[str, str]:
        import secrets

        root = os.geteuid() == 0
        # secrets, not random: every supervisor is a fork of the server, random's state too
        sandbox_uid = (1 << 30) + secrets.randbelow(1 << 30) if root else None
        if root:
            os.setgroups([])  # nothing below inherits the caller's supplementary groups
        if self.bwrap:
            self.job["workdir"] = workdir  # the same path inside, a private tmpfs there
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # bwrap's init is ours if bwrap dies first
        elif root:
            if _python_readable_by_others():
                os.chown(workdir, sandbox_uid, sandbox_uid)
            else:
                sandbox_uid = None  # stays root: only the guard protects the caller's files
        out_r, out_w = os.pipe()
        life_r, self.life = os.pipe()  # the write end stays here: exec closes it in the child
        nonce_r, nonce_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        fds = {"out": out_w, "nonce": nonce_r, "verdict": verdict_w, "ctl": ctl_w}
        began = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                for fd in (out_r, nonce_w, verdict_r, ctl_r):
                    os.close(fd)  # else the nonce pipe never reaches end of file
                if self.bwrap:
                    _exec_bwrap(self.job, fds, life_r, sandbox_uid)
                else:
                    _program(self.job, workdir, fds, sandbox_uid, confine=True)
            finally:
                os._exit(120)
        # nonce_r stays open here until the nonce is written: a program that ends at once must
        # not turn that write into a broken pipe
        for fd in (out_w, verdict_w, ctl_w, life_r):
            os.close(fd)
        # the nonce is born after the fork: it never was in the program's memory
        self.nonce = secrets.token_hex(_NONCE_BYTES)
        _write_all(nonce_w, self.nonce.encode())
        os.close(nonce_w)
        os.close(nonce_r)
        timed_out = self._wait(pid, out_r, verdict_r, ctl_r, began)
        self._stop(pid, sandbox_uid)
        self._drain(out_r, verdict_r, ctl_r)
        for fd in (out_r, verdict_r, ctl_r):
            os.close(fd)
        return self._judge(timed_out)

    def _wait(self, pid: int, out_r: int, verdict_r: int, ctl_r: int, began: float) -> bool:
        """Collect output until the program's status is known; True on the wall-clock limit."""
        import selectors

        limit = float(self.job["timeout_s"])

        def left() -> float:  # the sandbox's own set-up (bounded by the limit) is not counted
            return (self.started or began) + limit - time.monotonic()

        # the status comes from init over ctl (bwrap) or from waiting on the child
        pidfd = None if self.bwrap else os.pidfd_open(pid)
        sel = selectors.DefaultSelector()
        for fd in (out_r, verdict_r, ctl_r, pidfd):
            if fd is not None:
                sel.register(fd, selectors.EVENT_READ)
        try:
            while self.exit_status is None:
                # past the deadline, still read what is there: on a loaded machine we may wake
                # late, with the program's status (or its start) already waiting
                wait = left()
                for key, _ in sel.select(max(wait, 0)):
                    if key.fd == pidfd:
                        self.exit_status = os.waitpid(pid, 0)[1]
                    elif not self._read(key.fd, out_r, verdict_r, ctl_r):
                        sel.unregister(key.fd)
                        if key.fd == ctl_r and self.bwrap and self.exit_status is None:
                            self.exit_status = -1  # bwrap and init gone without a status
                if wait <= 0 and self.exit_status is None and left() <= 0:
                    return True
            return False
        finally:
            sel.close()
            if pidfd is not None:
                os.close(pidfd)

    def _read(self, fd: int, out_r: int, verdict_r: int, ctl_r: int) -> bool:
        """Read one chunk from ``fd`` into its buffer; False at end of file."""
        if fd == ctl_r:
            return self._read_ctl(ctl_r)
        chunk = os.read(fd, 65536)
        if fd == out_r:
            self.out += chunk
            del self.out[:-_OUTPUT_TAIL]
        elif len(self.verdict_bytes) < _VERDICT_MAX:
            self.verdict_bytes += chunk
        return bool(chunk)

    def _read_ctl(self, ctl_r: int) -> bool:
        os.set_blocking(ctl_r, False)
        try:
            chunk = os.read(ctl_r, 4096)
        except BlockingIOError:
            return True
        for line in chunk.decode(errors="replace").splitlines():
            kind, _, value = line.partition(" ")
            if kind == "started":
                self.started = time.monotonic()
            elif kind == "status":
                self.exit_status = int(value)
            elif kind == "setup":
                self.setup_error = value
        return bool(chunk)

    def _stop(self, pid: int, sandbox_uid: int | None) -> None:
        """Kill what is left: the bwrap sandbox (through its init) or the program's session."""
        os.close(self.life)  # init ends at its end of file
        if self.bwrap:
            # killed, bwrap leaves its child to us (a subreaper): kill our children and reap
            # until none is left (init's exit returns once the kernel has killed the rest of
            # its namespace)
            targets = [pid]
            while True:
                for target in targets:
                    with _quiet():
                        os.kill(target, _signal.SIGKILL)
                try:
                    os.waitpid(-1, 0)
                except ChildProcessError:
                    return
                targets = _children()
        _kill_group(pid)
        if sandbox_uid is not None:
            _kill_uid(sandbox_uid)
        with _quiet():
            os.waitpid(pid, 0)

    def _drain(self, *fds: int) -> None:
        for fd in fds:
            os.set_blocking(fd, False)
            with _quiet():
                while self._read(fd, fds[0], fds[1], fds[2]):
                    pass

    def _judge(self, timed_out: bool) -> tuple[str, str]:
        import json

        lines = self.verdict_bytes.decode(errors="replace").strip().splitlines()
        try:
            verdict = json.loads(lines[-1]) if lines else {}
            status, message = verdict.get("status"), str(verdict.get("message", ""))
        except (ValueError, AttributeError):
            verdict, status, message = {}, None, ""
        if status == "passed" and self.nonce and verdict.get("nonce") == self.nonce:
            return "passed", ""
        if timed_out:
            return "timeout", f"wall-clock limit of {self.job['timeout_s']:g}s exceeded"
        if status in ("failed", "error") and message:
            return status, _dump(message)
        if self.setup_error:
            return "error", _dump(f"sandbox setup failed: {self.setup_error}")
        code = self.exit_status
        if code is None or code < 0:
            if self.out.startswith(b"bwrap:"):  # bwrap could not set the sandbox up
                return "error", _dump(f"sandbox setup failed: {self.out.decode().strip()}")
            return "error", "the sandbox's helper died"
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
        return "error", _dump(f"{how}: {tail[0]}" if tail[0] else how)


def _answer(job: dict) -> None:
    """A forked supervisor: run one job, write its verdict line, exit (never returns)."""
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the job lines are the server's, not ours
        os.close(null)
        _prctl(_PR_SET_PDEATHSIG, _signal.SIGKILL)  # the server killed: so are we
        began = time.monotonic()
        try:
            status, message = _Supervisor(job).verdict()
        except Exception as exc:  # report, never crash silently
            status, message = "error", _dump(f"sandbox failure: {type(exc).__name__}: {exc}")
        import json

        line = json.dumps({"id": job["id"], "status": status, "message": message,
                           "seconds": round(time.monotonic() - began, 4)}) + "\n"
        os.write(1, line.encode())  # one write below PIPE_BUF: answers never interleave
    finally:
        os._exit(0)


def _serve() -> None:
    """Server entry: job lines (JSON) on stdin; a forked supervisor answers each on stdout."""
    # imported once here instead of in every supervisor and program (not socket: the guard)
    import ctypes  # noqa: F401
    import faulthandler  # noqa: F401
    import io  # noqa: F401
    import json
    import resource  # noqa: F401
    import secrets  # noqa: F401
    import selectors  # noqa: F401
    import shutil  # noqa: F401
    import signal  # noqa: F401
    import tempfile  # noqa: F401
    import traceback  # noqa: F401


    global _code
    with open(_SERVER, "rb") as f:
        _code = compile(f.read(), _SERVER, "exec")
    children: set[int] = set()
    for line in sys.stdin.buffer:
        job = json.loads(line)
        sys.path.extend(p for p in job.get("site", ()) if p not in sys.path)
        pid = os.fork()
        if pid == 0:
            _answer(job)
        children.add(pid)
        while children:  # reap the supervisors that are done
            done, _ = os.waitpid(-1, os.WNOHANG)
            if not done:
                break
            children.discard(done)
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
