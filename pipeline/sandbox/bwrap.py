"""bubblewrap's command line for one sandbox (docs/execution.md, "Isolation bwrap").

Standard library only (the supervisor server imports it).

    supervisor (caller's uid, outside; a child subreaper; in the program's cgroups)
      +- [root caller] bwrap as root, mount namespace only: folders others cannot enter on the
      |  way to Python's install are covered by tmpfs and Python is bound back, so that
      |  setpriv can switch to a random unprivileged uid that still reaches the interpreter
      +- bwrap (as that uid, or as the non-root caller): new user, mount, pid, net, ipc, uts
         and cgroup namespaces; no capabilities, no_new_privs, no further user namespaces,
         the seccomp filter
         +- init (pid 1, ``judge.init``): not dumpable; reaps; judges; when it exits the
            kernel kills everything left in the namespace (fork bombs too)
            +- worker (pid 2, ``worker.serve``): rlimits, the guard, the program's code
"""
from __future__ import annotations

import os
import shutil
import sys

from pipeline.sandbox.worker import ENV

HIDDEN = ("/tmp", "/var/tmp", "/run")   # with the caller's home: empty tmpfs in the sandbox


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def python_paths() -> list[str]:
    """Real paths of the interpreter's install and its import path."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)),
             *[p for p in sys.path if p and os.path.isdir(p)]}
    return sorted({os.path.realpath(p) for p in paths})


def closed_on_the_way(path: str, bits: int) -> str | None:
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
    python = python_paths()
    hidden = [*folders, *filter(None, (closed_on_the_way(p, 0o001) for p in python))]
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


def which(name: str) -> str:
    path = shutil.which(name, path=ENV["PATH"])
    if path is None:
        raise FileNotFoundError(f"{name} not found in {ENV['PATH']}")
    return path


def argv(job: dict, workdir: str, sandbox_uid: int | None, seccomp_fd: int,
         boot: list[str]) -> list[str]:
    """The command line that runs ``boot`` (init's command) in the sandbox."""
    bwrap = which("bwrap")
    size = str(max(4 * int(job["max_file_mb"]), 8) << 20)
    hidden, keep = _view([os.path.realpath(os.path.expanduser("~")), *HIDDEN])
    args = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--disable-userns", "--uid", "0",
            "--gid", "0", "--cap-drop", "ALL", "--die-with-parent", "--new-session",
            "--as-pid-1", "--seccomp", str(seccomp_fd), "--ro-bind", "/", "/", "--dev", "/dev",
            "--proc", "/proc", *_hide(hidden, keep), "--size", size, "--perms", "0700",
            "--tmpfs", workdir, "--size", size, "--perms", "1777", "--tmpfs", "/dev/shm"]
    for folder in (*hidden, "/dev", "/proc"):  # only the workdir and /dev/shm stay writable
        args += ["--remount-ro", folder]
    args += ["--chdir", workdir, "--clearenv"]
    for name, value in ENV.items():
        args += ["--setenv", name, value]
    args += ["--", *boot]
    if sandbox_uid is None:
        return args
    # bwrap run by an unprivileged uid binds only what that uid can reach (it resolves every
    # source path as that uid): a bwrap as root first brings Python's install within reach
    # (--dev-bind: the inner bwrap needs /dev/null and a writable-flagged /proc to mount its own)
    uid = str(sandbox_uid)
    return [bwrap, "--die-with-parent", "--cap-drop", "ALL", "--cap-add", "CAP_SETUID",
            "--cap-add", "CAP_SETGID", "--dev-bind", "/", "/", *_hide(*_view([])), "--",
            which("setpriv"), "--reuid", uid, "--regid", uid, "--clear-groups", "--", *args]
