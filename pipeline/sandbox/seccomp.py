"""The sandbox's seccomp filter: system calls a program never gets (they fail with EPERM).

Built once per process with libseccomp (through ``pyseccomp``) and handed to the supervisor as
a compiled BPF program, which bwrap loads (``--seccomp FD``) for the sandbox's init and
everything below it. System calls of another architecture (32-bit ones on x86-64) kill the
process: libseccomp's default for a foreign architecture.
"""
from __future__ import annotations

import errno
import tempfile
from functools import cache

DENIED = (
    # memory outside what the rlimits see (the memory cgroup counts it too)
    "memfd_create", "memfd_secret", "shmget", "shmat", "shmctl", "shmdt", "msgget", "msgsnd",
    "msgrcv", "msgctl", "semget", "semop", "semtimedop", "semctl",
    # other processes: reading or writing their memory, taking their descriptors
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd",
    "kcmp",
    # kernel surfaces no test needs (the usual container denials)
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "keyctl", "add_key", "request_key", "personality", "acct",
    "quotactl", "lookup_dcookie", "fanotify_init", "open_by_handle_at", "name_to_handle_at",
)


class SeccompError(RuntimeError):
    """The filter cannot be built here."""


@cache
def filter_bpf() -> bytes:
    """The compiled filter (raises SeccompError saying what to install)."""
    try:
        import pyseccomp
    except ImportError as err:
        raise SeccompError(f"pyseccomp is not installed ({err}): pip install pyseccomp "
                           "(it needs libseccomp2: apt-get install libseccomp2)") from None
    try:
        rules = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
        for name in DENIED:
            try:
                rules.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
            except (ValueError, RuntimeError, OSError):
                continue  # a call this architecture (or this libseccomp) does not know
        with tempfile.TemporaryFile() as f:
            rules.export_bpf(f)
            f.seek(0)
            return f.read()
    except (OSError, RuntimeError, AttributeError, ValueError) as err:
        raise SeccompError(f"libseccomp could not build the filter ({err}): apt-get install "
                           "libseccomp2") from None
