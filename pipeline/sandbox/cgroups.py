"""Control groups for the sandboxes: one memory, CPU and pids group per program.

Standard library only (the supervisor server imports it). A batch of programs gets a folder
``ddpt-<client pid>-<random>`` below the caller's own groups; each program a group
below that, with

* memory: ``execution.memory_mb`` for everything the sandbox's processes charge (their own
  memory, the tmpfs and memfd files and shared memory they first touch, kernel memory such as
  the inodes of many small files); beyond it the kernel's OOM killer ends the program;
* CPU: a quota of one CPU and a group of its own, so many processes (or sessions) of one
  program get one program's share of the machine, not one share each;
* pids: ``max_processes`` + 8 tasks (threads count), whatever their uid.

cgroup v1 (one hierarchy per controller, this project's machines) and v2 (one unified tree)
are both handled; ``detect`` says which and raises ``CgroupError`` naming what is missing.
"""
from __future__ import annotations

import os
import signal
import time

CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000
EXTRA_TASKS = 8   # bwrap, setpriv, init and the worker besides the program's own processes
_V1_ENABLE = "mount the memory, cpu and pids cgroup controllers"


class CgroupError(RuntimeError):
    """The sandbox's control groups cannot be made here."""


def _mounts() -> list[tuple[str, str, str, list[str]]]:
    """(file system type, mount point, root within the file system, super options)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            dash = fields.index("-")
            found.append((fields[dash + 1], fields[4], fields[3], fields[dash + 3].split(",")))
    return found


def _own_groups() -> dict[str, str]:
    """{controller: this process's group path} ("" for the v2 tree)."""
    groups = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                groups[controller] = path
    return groups


def _under_mount(point: str, root: str, path: str) -> str:
    if root != "/" and (path == root or path.startswith(root + "/")):
        path = path[len(root):]
    return os.path.join(point, path.lstrip("/"))


def detect() -> dict:
    """{"version": 1, "bases": {controller: folder}} or {"version": 2, "bases": {"": folder}}:
    where this process may make the sandboxes' groups. Raises CgroupError saying why not."""
    mounts, own = _mounts(), _own_groups()
    v1 = {}
    for controller in CONTROLLERS:
        for fstype, point, root, options in mounts:
            if fstype == "cgroup" and controller in options and controller in own:
                v1[controller] = _under_mount(point, root, own[controller])
                break
    if len(v1) == len(CONTROLLERS):
        _check_writable(v1, 1)
        return {"version": 1, "bases": v1}
    unified = [(point, root) for fstype, point, root, _ in mounts if fstype == "cgroup2"]
    if not unified or "" not in own:
        missing = [c for c in CONTROLLERS if c not in v1]
        raise CgroupError(f"no cgroup controller for {', '.join(missing)} ({_V1_ENABLE}, or "
                          "boot with cgroup v2)")
    base = _under_mount(*unified[0], own[""])
    enabled = _read(os.path.join(base, "cgroup.subtree_control")).split()
    if [c for c in CONTROLLERS if c not in enabled]:
        raise CgroupError(
            f"cgroup v2: {base}/cgroup.subtree_control has {enabled or 'nothing'}, the sandbox "
            "needs memory, cpu and pids enabled for the groups it makes below its own: run the "
            "harness in a cgroup delegated to it with those controllers (systemd: "
            "Delegate=yes; a container: a writable cgroup namespace)")
    _check_writable({"": base}, 2)
    return {"version": 2, "bases": {"": base}}


def _check_writable(bases: dict[str, str], version: int) -> None:
    probe = f"ddpt-probe-{os.getpid()}-{os.urandom(4).hex()}"
    for controller, base in bases.items():
        try:
            os.mkdir(os.path.join(base, probe))
            os.rmdir(os.path.join(base, probe))
        except OSError as err:
            what = controller or "v2"
            raise CgroupError(f"cannot make a {what} cgroup below {base} ({err.strerror}): run "
                              "the harness as root or in a cgroup delegated to its user") from None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class Group:
    """One program's groups (one folder per controller under v1, one folder under v2)."""

    def __init__(self, layout: dict, batch: str, name: str) -> None:
        self.version = layout["version"]
        self.paths = {c: os.path.join(base, batch, name) for c, base in layout["bases"].items()}

    def _file(self, controller: str, name: str) -> str:
        return os.path.join(self.paths["" if self.version == 2 else controller], name)

    def create(self, memory_mb: int, max_processes: int) -> None:
        for path in self.paths.values():
            os.mkdir(path, 0o755)
        limit, tasks = str(memory_mb << 20), str(max_processes + EXTRA_TASKS)
        if self.version == 1:
            settings = [("memory", "memory.limit_in_bytes", limit),
                        ("memory", "memory.memsw.limit_in_bytes", limit),  # with swap accounting
                        ("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)),
                        ("cpu", "cpu.cfs_quota_us", str(CPU_PERIOD_US)),
                        ("pids", "pids.max", tasks)]
        else:
            settings = [("memory", "memory.max", limit), ("memory", "memory.swap.max", "0"),
                        ("cpu", "cpu.max", f"{CPU_PERIOD_US} {CPU_PERIOD_US}"),
                        ("pids", "pids.max", tasks)]
        for controller, name, value in settings:
            path = self._file(controller, name)
            if "swap" in name and not os.path.exists(path):
                continue  # no swap accounting: no swap to limit
            _write(path, value)

    def join(self, pid: int) -> None:
        """Move process ``pid`` (and so all it starts later) into the groups."""
        for path in self.paths.values():
            _write(os.path.join(path, "cgroup.procs"), str(pid))

    def oom_kills(self) -> int:
        """How many processes the memory limit killed."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in _read(self._file("memory", name)).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> bool:
        """Kill whatever is left in the groups and remove them; False if one stays busy."""
        return all(remove_folder(path) for path in self.paths.values())


def remove_folder(path: str, wait_s: float = 2.0) -> bool:
    """Kill the processes of the group at ``path`` (and of its children) and remove it all."""
    if not os.path.isdir(path):
        return True
    for child in os.listdir(path):
        if os.path.isdir(os.path.join(path, child)):
            remove_folder(os.path.join(path, child), wait_s)
    deadline = time.monotonic() + wait_s
    while True:
        for pid in _read(os.path.join(path, "cgroup.procs")).split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)


def make_batch(layout: dict) -> str:
    """A new batch folder below each base (and stale ones of dead clients removed)."""
    name = f"ddpt-{os.getpid()}-{os.urandom(4).hex()}"
    for base in layout["bases"].values():
        _sweep(base)
        os.mkdir(os.path.join(base, name), 0o755)
        if layout["version"] == 2:
            _write(os.path.join(base, name, "cgroup.subtree_control"),
                   " ".join(f"+{c}" for c in CONTROLLERS))
    return name


def remove_batch(layout: dict, batch: str) -> bool:
    return all(remove_folder(os.path.join(base, batch)) for base in layout["bases"].values())


def _sweep(base: str) -> None:
    """Remove the batch folders of clients that died without removing them."""
    for name in os.listdir(base):
        parts = name.split("-")
        if len(parts) == 3 and parts[0] == "ddpt" and parts[1].isdigit():
            try:
                os.kill(int(parts[1]), 0)
            except ProcessLookupError:
                remove_folder(os.path.join(base, name), wait_s=0.5)
            except OSError:
                pass
