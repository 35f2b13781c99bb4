"""Run untrusted Python programs (generated code plus its tests) in a sandbox.

Programs never run in the caller. ``run_programs`` starts one supervisor server
(``python -I -S`` on this very file, standard library only, imports done once); for each
program the server forks a fresh supervisor, which sets the program up, enforces the limits and
answers one verdict line. The caller only reads JSON, so nothing a program does reaches it.

Isolation ``namespaces`` (Linux with user namespaces; chosen by ``auto`` when it works):
    supervisor (caller's uid, outside)
      +- helper: unshare(user, mount, pid, net, ipc, uts); the supervisor writes its uid/gid map
         +- init (pid 1 of the new pid namespace): reaps, reports the program's exit status;
            when it exits the kernel kills everything left in the namespace (fork bombs too)
            +- program (pid 2): sets up the view below, drops every capability, runs the code
  * user: the program's uid is the namespace's root, mapped to a random unprivileged host uid
    when the caller is root (so RLIMIT_NPROC applies and file permissions protect the caller's
    files), or to the caller's own uid otherwise; all capabilities (bounding set included) are
    dropped and no_new_privs is set, so it cannot remount, ptrace, or regain privileges.
  * mount: every mount is read-only (recursive mount_setattr); the caller's home, /tmp,
    /var/tmp and /run are hidden under empty tmpfs (Python's own install is bound back when it
    lives there); the working directory and /dev/shm are small private tmpfs, gone afterwards.
  * pid: the program sees only its own namespace: it cannot signal the supervisor or the caller
    (``os.getppid()`` is the namespace's init, which it may not signal).
  * net: a new network namespace with only a down loopback: no connection anywhere.
Isolation ``process`` (fallback where namespaces are unavailable, or forced): the program runs in
its own session under the supervisor, which takes any signal meant for "the parent"; as root it
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

import ctypes
import fcntl
import json
import os
import secrets
import selectors
import shutil
import signal
import sys
import tempfile
import time
import traceback
import types

MAX_MESSAGE = 300         # characters of a verdict's message
_OUTPUT_TAIL = 4096       # bytes of the program's output kept (for crash messages)
_VERDICT_MAX = 65536      # bytes read from the verdict pipe
_PROGRAM = "<program>"    # the program's file name in tracebacks
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_CAPBSET_DROP = 1, 4, 24
_PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE = 442, -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 1, 2
_NONCE_FD, _VERDICT_FD = 3, 4      # the program's private pipes
_NONCE_BYTES = 16
_HIDDEN = ("/tmp", "/var/tmp", "/run")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc: ctypes.CDLL | None = None


def _c(name: str, *args) -> int:
    """Call libc ``name``; raise OSError naming it on failure."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    result = getattr(_libc, name)(*args)
    if result == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}{args[:2]}: {os.strerror(errno)}")
    return result


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _c("mount", enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _dump(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."


# ---------------------------------------------------------------- inside the sandbox

def _python_paths() -> list[str]:
    """Real paths of the interpreter's install and import path (must stay readable)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)),
             *[p for p in sys.path if p and os.path.isdir(p)]}
    return sorted({os.path.realpath(p) for p in paths})


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _outermost(paths: list[str]) -> list[str]:
    return sorted(p for p in set(paths) if not any(_under(p, q) for q in paths if q != p))


def _view_plan() -> tuple[list[str], list[str]]:
    """(folders to hide under an empty tmpfs, Python folders inside them to bind back).

    Hidden: the caller's home, /tmp, /var/tmp, /run, and any folder others cannot enter on the
    way to Python's install (so the unprivileged sandbox uid can still import the stdlib).
    Computed outside the namespaces, where the caller's home and uid are still known.
    """
    python = _python_paths()
    hidden = [os.path.realpath(os.path.expanduser("~")), *_HIDDEN]
    for path in python:
        parts = path.split("/")
        for i in range(2, len(parts) + 1):
            if not os.stat("/".join(parts[:i])).st_mode & 0o001:
                hidden.append("/".join(parts[:i]))
                break
    hidden = _outermost([p for p in hidden if p != "/" and os.path.isdir(p)])
    keep = _outermost([p for p in python if any(_under(p, h) for h in hidden)])
    return hidden, keep


def _build_view(workdir: str, file_mb: int, hidden: list[str], keep: list[str]) -> None:
    """The mount namespace's view: all read-only, private places hidden, a private workdir.

    Runs as the namespace's root with its capabilities, before any untrusted code.
    """
    # O_PATH handles first: once the tmpfs covers a folder, what is under it is out of reach
    handles = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in keep}
    os.setresgid(0, 0, 0)  # the mapped, unprivileged uid: new files need a mapped owner
    os.setresuid(0, 0, 0)
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    for folder in hidden:
        _mount("tmpfs", folder, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
    for path, fd in handles.items():
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
        os.close(fd)
    os.makedirs(workdir, exist_ok=True)
    attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
    _c("syscall", _SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, ctypes.byref(attr),
       ctypes.sizeof(attr))
    size = f"size={max(4 * file_mb, 8)}m"
    _mount("tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV, f"{size},mode=0700")
    if os.path.isdir("/dev/shm"):
        _mount("tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, f"{size},mode=1777")
    try:  # this pid namespace's /proc; without it the (read-only) host /proc stays
        _mount("proc", "/proc", "proc", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except OSError:
        pass
    # an import tried while the view was half built may have cached "no such folder"
    for path, finder in list(sys.path_importer_cache.items()):
        if finder is None:
            del sys.path_importer_cache[path]
    import importlib

    importlib.invalidate_caches()


def _drop_privileges() -> None:
    """No capabilities now or after any exec, and no way to gain privileges."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _c("prctl", _PR_CAPBSET_DROP, cap, 0, 0, 0)
    _c("prctl", _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    _c("capset", ctypes.byref(header), ctypes.byref(data))
    _c("prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


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
    import builtins
    import faulthandler
    import io
    import shutil as sh
    import socket
    import subprocess as sp

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
                 "link", "symlink", "mkfifo", "mknod", "register_at_fork"):
        if hasattr(os, name):
            setattr(os, name, deny(f"os.{name}"))
    sh.rmtree, sh.move, sh.chown = deny("shutil.rmtree"), deny("shutil.move"), deny("shutil.chown")
    sp.Popen = deny("subprocess.Popen")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("sockets are disabled in the sandbox")

    socket.socket = NoSocket
    socket.socketpair = socket.create_connection = deny("socket")
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
        text = traceback.format_exception_only(type(exc), exc)[-1].strip()
    except BaseException:  # noqa: BLE001  # a hostile __str__
        text = type(exc).__name__
    line = getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == _PROGRAM:
            line = frame.lineno
    if line:
        lines = source.splitlines()
        code = lines[line - 1].strip() if 0 < line <= len(lines) else ""
        text += f" (line {line}: {code[:80]})" if code else f" (line {line})"
    return _dump(text)


def _run(source: str, guard: bool, workdir: str) -> None:
    """Execute the program in a fresh ``__main__``; send the verdict; never return."""
    read, write, exit_, dumps = os.read, os.write, os._exit, json.dumps

    def verdict(status: str, message: str = "", nonce: str = "") -> None:
        line = dumps({"status": status, "message": message, "nonce": nonce}) + "\n"
        try:
            _write_all(_VERDICT_FD, line.encode())
        finally:
            exit_(0)

    if guard:
        _guard(workdir)
    module = types.ModuleType("__main__")
    sys.modules["__main__"] = module
    try:
        exec(compile(source, _PROGRAM, "exec"), module.__dict__)  # noqa: S102  # the point
    except AssertionError as exc:
        verdict("failed", _describe(exc, source))
    except SystemExit as exc:
        verdict("error", f"SystemExit({exc.code!r}) before the tests finished")
    except BaseException as exc:  # noqa: BLE001
        verdict("error", _describe(exc, source))
    # only here, after the last line, does the nonce leave its pipe
    nonce = b""
    while len(nonce) < _NONCE_BYTES * 2 and (chunk := read(_NONCE_FD, 64)):
        nonce += chunk
    write(_VERDICT_FD, b"")  # keep `write` referenced: the program may have replaced os.write
    verdict("passed", nonce=nonce.decode())


def _program(job: dict, workdir: str, fds: dict[str, int], namespaces: bool,
             sandbox_uid: int | None) -> None:
    """The program's process: confine itself, then run the code (never returns)."""
    # every descriptor to fds >= 10 first: a source may be one of the targets 0-4
    fds = {name: fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for name, fd in fds.items()}
    try:
        os.setsid()  # its own session: kill(0, ...) reaches nobody else
        if namespaces:
            _build_view(workdir, job["max_file_mb"], *job["view"])
            _drop_privileges()
        else:
            _c("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # dies with its supervisor
            if sandbox_uid is not None:
                os.setresgid(sandbox_uid, sandbox_uid, sandbox_uid)
                os.setresuid(sandbox_uid, sandbox_uid, sandbox_uid)
            _c("prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        os.chdir(workdir)
        os.umask(0o022)
        os.environ.clear()
        os.environ.update({**ENV, "HOME": workdir, "TMPDIR": workdir, "PWD": workdir})
        tempfile.tempdir = workdir
        null = fcntl.fcntl(os.open("/dev/null", os.O_RDONLY), fcntl.F_DUPFD, 10)
        for target, fd in ((0, null), (1, fds["out"]), (2, fds["out"]),
                           (_NONCE_FD, fds["nonce"]), (_VERDICT_FD, fds["verdict"])):
            os.dup2(fd, target)
        _set_limits(job)
    except BaseException as exc:  # noqa: BLE001
        _write_all(fds["ctl"], f"setup {type(exc).__name__}: {exc}\n".encode())
        os._exit(121)
    os.closerange(_VERDICT_FD + 1, 65536)  # the supervisor's pipes included
    _run(job["program"], bool(job["guard"]), workdir)


def _init(job: dict, workdir: str, fds: dict[str, int]) -> None:
    """pid 1 of the namespace: start the program, reap everything, report its status."""
    _c("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _c("prctl", _PR_SET_DUMPABLE, 0, 0, 0, 0)  # the program may not ptrace us
    child = os.fork()
    if child == 0:
        _program(job, workdir, fds, True, None)
    for name in ("out", "nonce", "verdict"):
        os.close(fds[name])
    while True:
        pid, status = os.wait()
        if pid == child:
            break
    _write_all(fds["ctl"], f"status {status}\n".encode())
    os._exit(0)  # the kernel now kills whatever is left in the namespace


def _helper(job: dict, workdir: str, fds: dict[str, int], sync: int, go: int) -> None:
    """Enter new namespaces, wait for the id map, start the namespace's init."""
    _c("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    try:
        _c("unshare", _CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET
           | _CLONE_NEWIPC | _CLONE_NEWUTS)
    except OSError as exc:
        _write_all(sync, f"E{exc}".encode())
        os._exit(1)
    _write_all(sync, b"k")
    if os.read(go, 1) != b"g":
        os._exit(1)
    _c("prctl", _PR_SET_DUMPABLE, 0, 0, 0, 0)
    init = os.fork()
    if init == 0:
        _init(job, workdir, fds)
    for name in ("out", "nonce", "verdict"):
        os.close(fds[name])
    _write_all(fds["ctl"], f"pid {init}\n".encode())
    os.waitpid(init, 0)
    os._exit(0)


def _map_ids(pid: int, sandbox_uid: int) -> None:
    """The helper's namespace root is ``sandbox_uid`` (root caller) or the caller's own ids."""
    if os.geteuid() == 0:
        uid = gid = sandbox_uid
    else:  # an unprivileged caller may map only itself, and must deny setgroups first
        uid, gid = os.geteuid(), os.getegid()
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


def _python_readable_by_others() -> bool:
    """Can an unrelated uid reach and read the interpreter's files?"""
    for path in _python_paths():
        parts = path.split("/")
        for i in range(2, len(parts) + 1):
            mode = os.stat("/".join(parts[:i]) or "/").st_mode
            if not mode & 0o005:
                return False
    return True


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
                    os.kill(int(name), signal.SIGKILL)
            except (OSError, StopIteration, ValueError):
                continue
        if not found:
            return
        time.sleep(0.01)


class _Supervisor:
    """Runs one job; ``verdict()`` returns (status, message)."""

    def __init__(self, job: dict) -> None:
        self.job, self.namespaces = job, job["mode"] == "namespaces"
        self.out, self.verdict_bytes = bytearray(), bytearray()
        self.exit_status: int | None = None
        self.init_pid: int | None = None
        self.setup_error = ""
        self.nonce = ""

    def verdict(self) -> tuple[str, str]:
        workdir = tempfile.mkdtemp(prefix="run-", dir=self.job.get("root"))
        try:
            return self._supervise(workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _supervise(self, workdir: str) -> tuple[str, str]:
        root = os.geteuid() == 0
        # secrets, not random: every supervisor is a fork of the server, random's state too
        sandbox_uid = (1 << 30) + secrets.randbelow(1 << 30) if root else None
        if root:
            os.setgroups([])  # nothing below inherits the caller's supplementary groups
        if root and not self.namespaces:
            if _python_readable_by_others():
                os.chown(workdir, sandbox_uid, sandbox_uid)
            else:
                sandbox_uid = None  # stays root: only the guard protects the caller's files
        out_r, out_w = os.pipe()
        nonce_r, nonce_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        fds = {"out": out_w, "nonce": nonce_r, "verdict": verdict_w, "ctl": ctl_w}
        sync_r, sync_w = os.pipe()
        go_r, go_w = os.pipe()
        if self.namespaces:
            self.job["view"] = _view_plan()
        began = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                for fd in (out_r, nonce_w, verdict_r, ctl_r, sync_r, go_w):
                    os.close(fd)  # else the nonce pipe never reaches end of file
                if self.namespaces:
                    _helper(self.job, workdir, fds, sync_w, go_r)
                else:
                    _program(self.job, workdir, fds, False, sandbox_uid)
            finally:
                os._exit(120)
        # nonce_r stays open here until the nonce is written: a program that ends at once must
        # not turn that write into a broken pipe
        for fd in (out_w, verdict_w, ctl_w, sync_w, go_r):
            os.close(fd)
        if self.namespaces:
            answer = os.read(sync_r, 4096)
            if answer != b"k":
                os.waitpid(pid, 0)
                return "error", _dump(f"sandbox setup failed: {answer[1:].decode() or 'no answer'}")
            _map_ids(pid, sandbox_uid or 0)
            os.write(go_w, b"g")
        # the nonce is born after the fork: it never was in the program's memory
        self.nonce = secrets.token_hex(_NONCE_BYTES)
        _write_all(nonce_w, self.nonce.encode())
        os.close(nonce_w)
        os.close(nonce_r)
        timed_out = self._wait(pid, out_r, verdict_r, ctl_r, began)
        self._stop(pid, sandbox_uid)
        self._drain(out_r, verdict_r, ctl_r)
        for fd in (out_r, verdict_r, ctl_r, sync_r, go_w):
            os.close(fd)
        return self._judge(timed_out)

    def _wait(self, pid: int, out_r: int, verdict_r: int, ctl_r: int, began: float) -> bool:
        """Collect output until the program's status is known; True on the wall-clock limit."""
        deadline = began + float(self.job["timeout_s"])
        # the status comes from init over ctl (namespaces) or from waiting on the child
        pidfd = None if self.namespaces else os.pidfd_open(pid)
        sel = selectors.DefaultSelector()
        for fd in (out_r, verdict_r, ctl_r, pidfd):
            if fd is not None:
                sel.register(fd, selectors.EVENT_READ)
        try:
            while self.exit_status is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return True
                for key, _ in sel.select(left):
                    if key.fd == pidfd:
                        self.exit_status = os.waitpid(pid, 0)[1]
                    elif not self._read(key.fd, out_r, verdict_r, ctl_r):
                        sel.unregister(key.fd)
                        if key.fd == ctl_r and self.namespaces and self.exit_status is None:
                            self.exit_status = -1  # helper and init gone without a status
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
            if kind == "pid":
                self.init_pid = int(value)
            elif kind == "status":
                self.exit_status = int(value)
            elif kind == "setup":
                self.setup_error = value
        return bool(chunk)

    def _stop(self, pid: int, sandbox_uid: int | None) -> None:
        """Kill what is left: the namespace (through its init) or the program's session."""
        if self.namespaces:
            for target in (self.init_pid, pid):
                if target:
                    with _quiet():
                        os.kill(target, signal.SIGKILL)
            os.waitpid(pid, 0)  # returns once init and so the whole namespace are gone
            return
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
            return "error", "the sandbox's helper died"
        if os.WIFSIGNALED(code):
            sig = os.WTERMSIG(code)
            if sig == signal.SIGXCPU:
                return "timeout", f"CPU time limit of {self.job['cpu_s']}s exceeded"
            if sig == signal.SIGXFSZ:
                return "error", f"file size limit of {self.job['max_file_mb']} MB exceeded"
            return "error", f"killed by {signal.Signals(sig).name}"
        tail = self.out.decode(errors="replace").strip().splitlines()[-1:] or [""]
        how = f"exited with code {os.WEXITSTATUS(code)} before its tests finished"
        return "error", _dump(f"{how}: {tail[0]}" if tail[0] else how)


class _quiet:
    """``with _quiet():`` ignores OSError (a process already gone, a pipe already empty)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type is not None and issubclass(exc_type, OSError)


def _answer(job: dict) -> None:
    """A forked supervisor: run one job, write its verdict line, exit (never returns)."""
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the job lines are the server's, not ours
        os.close(null)
        _c("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the server killed: so are we
        began = time.monotonic()
        try:
            status, message = _Supervisor(job).verdict()
        except Exception as exc:  # noqa: BLE001  # report, never crash silently
            status, message = "error", _dump(f"sandbox failure: {type(exc).__name__}: {exc}")
        line = json.dumps({"id": job["id"], "status": status, "message": message,
                           "seconds": round(time.monotonic() - began, 4)}) + "\n"
        os.write(1, line.encode())  # one write below PIPE_BUF: answers never interleave
    finally:
        os._exit(0)


def _serve() -> None:
    """Server entry: job lines (JSON) on stdin; a forked supervisor answers each on stdout."""
    # imported once here instead of in every program (the guard and the set-up need them)
    import faulthandler  # noqa: F401
    import importlib  # noqa: F401
    import io  # noqa: F401
    import resource  # noqa: F401
    import socket  # noqa: F401
    import subprocess  # noqa: F401

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
