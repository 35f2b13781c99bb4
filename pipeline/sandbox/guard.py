"""The in-process guard, a second layer in the program's process (like HumanEval's
``reliability_guard``): deny what tests never need. Python code can undo it; the sandbox's
namespaces, cgroups and seccomp filter are the first layer. Standard library only.
"""
from __future__ import annotations

import os
import sys

DENIED_OS = ("kill", "killpg", "system", "popen", "fork", "forkpty", "vfork", "posix_spawn",
             "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
             "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnvp", "remove",
             "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod",
             "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chdir", "fchdir",
             "setuid", "setgid", "setresuid", "setresgid", "link", "symlink", "mkfifo", "mknod")
# not register_at_fork: random, threading and logging call it when imported, and fork itself
# is denied


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _deny(name: str):
    def denied(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return denied


def install(workdir: str) -> None:
    """Disable process, file-removal, permission, socket and ctypes functions; refuse writes
    outside ``workdir``."""
    import _posixsubprocess
    import _socket
    import builtins
    import faulthandler
    import io
    import shutil as sh  # imported already (by tempfile)

    faulthandler.disable()
    for name in DENIED_OS:
        if hasattr(os, name):
            setattr(os, name, _deny(f"os.{name}"))
    sh.rmtree, sh.move, sh.chown = _deny("shutil.rmtree"), _deny("shutil.move"), \
        _deny("shutil.chown")
    # the C layer under subprocess and socket, so that neither needs importing here; socket must
    # not be imported before this (its classes would already derive from the real one)
    _posixsubprocess.fork_exec = _deny("subprocess.Popen")

    class NoSocket(_socket.socket):
        __slots__ = ()  # socket.socket, made from this if imported later, adds __weakref__

        def __init__(self, *args, **kwargs):
            raise PermissionError("sockets are disabled in the sandbox")

    _socket.socket = _socket.SocketType = NoSocket
    _socket.socketpair = _deny("socket")
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
