"""A real two-node Ray cluster on one Linux machine, as on a cluster with node-local disks.

Each node is a network namespace (a veth pair between them); the worker node also has a private
mount namespace where the ``hidden`` folders are empty and the Ray temp dir is its own, so code
that reads a path only the driver's machine has fails as on a real cluster. Needs root.

    with LocalNodes("work", hidden=["out"]) as nodes:
        nodes.start_head()
        nodes.add_worker()
        nodes.run(["ray", "job", "submit", "--address", nodes.dashboard_url, "--", ...])

CLI: ``python cluster/local_nodes_cli.py up --work DIR [--hide PATH ...]`` and
``python cluster/local_nodes_cli.py down --prefix P`` (after a crashed run).
"""
from __future__ import annotations

import contextlib
import glob
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

RAY_PORT = 6379
DASHBOARD_PORT = 8265
# Names from Ray 2.60's ray_config_def.h (also strings in its gcs_server binary). The GCS pings
# each raylet every second and marks it dead after 3 failed pings: a killed node is dead in ~4 s
# instead of ~30 s with the defaults (period 3 s, threshold 5, timeout 10 s).
# A worker node gives up on a lost head (GCS) after 5 s instead of 60 s: without GCS fault
# tolerance its raylet cannot join a new head, and exits.
HEALTH_ENV = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
              "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3",
              "RAY_gcs_rpc_server_reconnect_timeout_s": "5"}
# Fetch a URL from inside a namespace (the nodes' addresses answer only there), with the token
# the dashboard asks for.
# The nodes' Ray temp dirs, short on purpose: Ray's socket paths (temp dir + session name +
# sockets/plasma_store) must fit AF_UNIX's 107 bytes, which a pytest tmp_path leaves no room for.
TEMP_ROOT = "/tmp/ray-{prefix}"
_GET = ("import os, sys, urllib.request as u; sys.stdout.write(u.urlopen(u.Request(sys.argv[1], "
        "headers={'Authorization': 'Bearer ' + os.environ['RAY_AUTH_TOKEN']}), timeout=5)"
        ".read().decode())")


def _sh(*argv: str, check: bool = True) -> str:
    """Run a short admin command; its stdout, or RuntimeError with its stderr."""
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode:
        raise RuntimeError(f"{shlex.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def available() -> str | None:
    """None when this machine can run LocalNodes, else why not (for ``pytest.skip``)."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    name = f"ddptcheck{os.getpid()}"
    try:
        _sh("ip", "netns", "add", name)
        _sh("ip", "netns", "exec", name, "unshare", "--mount", "--propagation", "private",
            "mount", "-t", "tmpfs", "tmpfs", "/tmp")
    except RuntimeError as error:
        return str(error)
    finally:
        _sh("ip", "netns", "del", name, check=False)
    return None


def _netns_names(prefix: str) -> list[str]:
    # where `ip netns add` puts them; the glob is empty if the folder is not there
    return sorted(p.name for p in Path("/run/netns").glob(f"{glob.escape(prefix)}*"))


def _netns_pids(ns: str) -> list[int]:
    return [int(p) for p in _sh("ip", "netns", "pids", ns, check=False).split()]


def _host_links(prefix: str) -> list[str]:
    """Interfaces with the prefix in the host's namespace (lines ``3: name@peer: ...``)."""
    lines = _sh("ip", "-o", "link").splitlines()
    names = [line.split(":")[1].strip().split("@")[0] for line in lines]
    return [n for n in names if n.startswith(prefix)]


def _host_mounts(prefix: str) -> list[str]:
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if f"/{prefix}" in p]


def _processes(needle: str) -> list[str]:
    """Processes (anywhere) whose command line mentions ``needle``: Ray's all name the temp dir."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if needle in text and int(cmdline.parent.name) != os.getpid():
            found.append(f"{cmdline.parent.name}: {text[:200]}")
    return found


def leftovers(prefix: str = "ddpt") -> list[str]:
    """What LocalNodes with names starting with ``prefix`` left on this machine; [] when clean."""
    found = [f"netns {ns} (pids {_netns_pids(ns)})" for ns in _netns_names(prefix)]
    found += [f"link {name}" for name in _host_links(prefix)]
    found += [f"mount {point}" for point in _host_mounts(prefix)]
    found += [f"process {p}" for p in _processes(TEMP_ROOT.format(prefix=prefix))]
    found += [f"folder {p}" for p in glob.glob(TEMP_ROOT.format(prefix=glob.escape(prefix)) + "*")]
    return found


def _kill_netns(names: Sequence[str], grace: float) -> None:
    """SIGTERM every process in the namespaces, SIGKILL what is left after ``grace`` seconds,
    again until none is left (a dying raylet may still fork)."""
    deadline, sig = time.monotonic() + grace, signal.SIGTERM
    signalled: set[int] = set()
    for _ in range(300):
        pids = [pid for ns in names for pid in _netns_pids(ns)]
        if not pids:
            return
        if time.monotonic() >= deadline:
            sig = signal.SIGKILL
        for pid in pids:
            if sig == signal.SIGKILL or pid not in signalled:
                with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                    os.kill(pid, sig)
                signalled.add(pid)
        time.sleep(0.1)
    raise RuntimeError(f"processes survive SIGKILL in {names}: {pids}")


def teardown(prefix: str, grace: float = 3.0) -> None:
    """Kill every process in the namespaces named ``prefix*`` and delete them (the veth goes
    with them); also links left in the host namespace."""
    names = _netns_names(prefix)
    _kill_netns(names, grace)
    for ns in names:
        _sh("ip", "netns", "del", ns, check=False)
    for link in _host_links(prefix):
        _sh("ip", "link", "del", link, check=False)


def _free_block() -> tuple[str, str]:
    """Two addresses of a /30 in 10.213.0.0/16 that no host interface overlaps."""
    used = [ipaddress.ip_interface(line.split()[3]).network
            for line in _sh("ip", "-o", "addr").splitlines() if line.split()[2] == "inet"]
    base, blocks = int(ipaddress.IPv4Address("10.213.0.0")), 1 << 14
    for i in range(blocks):  # start at a pid-dependent block: concurrent runs pick different ones
        net = ipaddress.ip_network((base + 4 * ((os.getpid() + i) % blocks), 30))
        if not any(net.overlaps(u) for u in used):
            head, worker = net.hosts()
            return str(head), str(worker)
    raise RuntimeError("no free /30 in 10.213.0.0/16")


def _find(nodes: list[dict], skip: Collection[str] = (), **want: Any) -> str | None:
    """The id of the first node not in ``skip`` with the fields in ``want``."""
    return next((n["node_id"] for n in nodes if n["node_id"] not in skip
                 and all(n[k] == v for k, v in want.items())), None)


class LocalNodes:
    """A head node and (at most) one worker node, each in its own network namespace."""

    def __init__(self, work: str | Path, hidden: Sequence[str | Path] = (), num_cpus: int = 2,
                 object_store_mb: int = 256, prefix: str | None = None) -> None:
        self.prefix = prefix or f"ddpt{os.getpid()}-"
        self.head_ns, self.worker_ns = f"{self.prefix}h", f"{self.prefix}w"
        if len(self.worker_ns) > 15:  # also the veth names, and Linux caps those at 15
            raise ValueError(f"prefix {self.prefix!r} too long for an interface name")
        if _netns_names(self.prefix):
            raise RuntimeError(f"namespaces {self.prefix}* exist: another LocalNodes uses them")
        self.work = Path(work).resolve()
        self.temp = Path(TEMP_ROOT.format(prefix=self.prefix))
        self.hidden = [Path(p).resolve() for p in hidden]
        for path in self.hidden:
            if not path.is_dir() or self.temp.is_relative_to(path):
                raise ValueError(f"hidden {path}: not a folder, or it holds the Ray temp dir")
        self.num_cpus, self.object_store_mb = num_cpus, object_store_mb
        self.head_ip, self.worker_ip = _free_block()
        self.ray = str(Path(sys.executable).with_name("ray"))  # the venv's, not $PATH's
        # Ray 2.60 turns token auth on for `ray start --head` (the dashboard answers 401 without
        # it) and takes the token from ~/.ray; a fresh one in the environment instead, for the
        # nodes and for whatever run() starts, as the KubeRay config passes it to its pods.
        self.auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.head_node_id: str | None = None
        self.worker_node_id: str | None = None
        self._head: subprocess.Popen | None = None
        self._worker: subprocess.Popen | None = None
        self._heads_started = self._workers_started = 0
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            self._make_network()
        except BaseException:
            teardown(self.prefix)
            raise

    def _make_network(self) -> None:
        for ns in (self.head_ns, self.worker_ns):
            _sh("ip", "netns", "add", ns)
        # each veth end is named like its namespace and created in it, never in the host's
        _sh("ip", "link", "add", self.head_ns, "netns", self.head_ns, "type", "veth",
            "peer", "name", self.worker_ns, "netns", self.worker_ns)
        for ns, ip in ((self.head_ns, self.head_ip), (self.worker_ns, self.worker_ip)):
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", ns)
            _sh("ip", "-n", ns, "link", "set", ns, "up")

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{RAY_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head_ip}:{DASHBOARD_PORT}"

    def _wrap(self, argv: Sequence[str], node: str, cwd: Any) -> list[str]:
        """``argv`` run inside a node: the head's netns, or the running worker's netns and
        mount namespace (``nsenter`` into its ``ray start``, so it sees what the node sees)."""
        if node == "head":
            return ["ip", "netns", "exec", self.head_ns, *argv]
        if node != "worker":
            raise ValueError(f"node must be 'head' or 'worker', not {node!r}")
        if self._worker is None or self._worker.poll() is not None:
            raise RuntimeError("no worker node is running")
        return ["nsenter", f"--target={self._worker.pid}", "--net", "--mount",
                f"--wd={cwd or os.getcwd()}", "--", *argv]

    def _env(self, extra: dict | None) -> dict:
        return {**os.environ, **self.auth_env, **(extra or {})}

    def _node_env(self, ns: str) -> dict:
        # this Python first on PATH: a job's `python` entrypoint is then the one Ray runs on.
        # Gloo (torch.distributed on CPU) takes its address from the host name, which resolves
        # to 127.0.0.1 here: the node's veth is named instead, as NCCL/GLOO_SOCKET_IFNAME name
        # the cluster network on a machine with several interfaces.
        return {**HEALTH_ENV, "PATH": f"{Path(self.ray).parent}:{os.environ.get('PATH', '')}",
                "GLOO_SOCKET_IFNAME": ns}

    def popen(self, argv: Sequence[str], node: str = "head", env: dict | None = None,
              **kwargs: Any) -> subprocess.Popen:
        """``subprocess.Popen`` of ``argv`` inside ``node``; the environment is os.environ, the
        cluster's token (``auth_env``) and ``env``."""
        return subprocess.Popen(self._wrap(argv, node, kwargs.get("cwd")), env=self._env(env),
                                **kwargs)

    def run(self, argv: Sequence[str], node: str = "head", env: dict | None = None,
            **kwargs: Any) -> subprocess.CompletedProcess:
        """``subprocess.run`` of ``argv`` inside ``node``, with the environment of ``popen``."""
        return subprocess.run(self._wrap(argv, node, kwargs.get("cwd")), env=self._env(env),
                              **kwargs)

    def pids(self, node: str) -> list[int]:
        """The processes in ``node``'s network namespace (``head`` or ``worker``)."""
        return _netns_pids(self.head_ns if node == "head" else self.worker_ns)

    def nodes(self) -> list[dict]:
        """The cluster's nodes (alive and dead) from the head's state API: dicts with
        ``node_id``, ``node_ip``, ``state`` ("ALIVE"/"DEAD"), ``is_head_node``..."""
        url = f"{self.dashboard_url}/api/v0/nodes?limit=1000"
        done = self.run([sys.executable, "-c", _GET, url], capture_output=True, text=True,
                        timeout=30)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            raise RuntimeError(f"state API unreachable: {last}")
        return json.loads(done.stdout)["data"]["result"]["result"]

    def _wait(self, what: str, found: Callable[[list[dict]], str | None], timeout: float,
              proc: subprocess.Popen | None, log: Path) -> str:
        """Poll the nodes until ``found`` returns a node id; RuntimeError with the tail of ``log``
        when ``proc`` exits or ``timeout`` passes."""
        deadline, error = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                error = f"its process exited with {proc.returncode}"
                break
            try:
                if node_id := found(self.nodes()):
                    return node_id
            except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
                error = str(e)  # the dashboard not up yet, say
            time.sleep(0.5)
        tail = log.read_text(errors="replace").splitlines()[-30:] if log.exists() else []
        raise RuntimeError(f"{what} not within {timeout:.0f} s ({error}); tail of {log}:\n"
                           + "\n".join(tail))

    def start_head(self, timeout: float = 120) -> str:
        """Start the head node (GCS, dashboard, raylet); returns its node id once the state API
        lists it alive."""
        if self._head is not None:
            raise RuntimeError("the head is already started")
        k, self._heads_started = self._heads_started, self._heads_started + 1
        log = self.work / ("head.log" if k == 0 else f"head{k}.log")
        argv = [self.ray, "start", "--head", "--node-ip-address", self.head_ip,
                "--port", str(RAY_PORT), "--dashboard-host", self.head_ip,
                "--dashboard-port", str(DASHBOARD_PORT), "--num-cpus", str(self.num_cpus),
                "--object-store-memory", str(self.object_store_mb << 20),
                "--temp-dir", str(self.temp / "head"), "--disable-usage-stats", "--block"]
        with log.open("w") as out:
            self._head = self.popen(argv, env=self._node_env(self.head_ns), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.head_node_id = self._wait("the head", lambda nodes: _find(
            nodes, is_head_node=True, state="ALIVE"), timeout, self._head, log)
        return self.head_node_id

    def add_worker(self, timeout: float = 120) -> str:
        """Start a worker node (again after ``kill_worker``: a new node id, same netns); returns
        its node id once the head lists it alive."""
        if self._head is None:
            raise RuntimeError("start_head() first")
        if self._worker is not None and self._worker.poll() is None:
            raise RuntimeError("a worker node is running: kill_worker() first")
        k, self._workers_started = self._workers_started, self._workers_started + 1
        own, head_temp = self.temp / f"worker{k}", self.temp / "head"
        own.mkdir(parents=True)
        known = {n["node_id"] for n in self.nodes()}
        # A private mount namespace, as on a machine of its own: its own /dev/shm (object
        # store), its own Ray temp dir at the head's path (a folder of its own bound over it),
        # and an empty tmpfs over each hidden folder. Mounts here never reach the host.
        setup = ["set -e", "mount -t tmpfs tmpfs /dev/shm",
                 f"mount --bind {shlex.quote(str(own))} {shlex.quote(str(head_temp))}",
                 *(f"mount -t tmpfs tmpfs {shlex.quote(str(p))}" for p in self.hidden),
                 'exec "$@"']
        argv = ["ip", "netns", "exec", self.worker_ns, "unshare", "--mount",
                "--propagation", "private", "sh", "-c", "\n".join(setup), "sh",
                self.ray, "start", "--address", self.address, "--node-ip-address", self.worker_ip,
                "--num-cpus", str(self.num_cpus),
                "--object-store-memory", str(self.object_store_mb << 20),
                "--temp-dir", str(head_temp), "--block"]
        log = self.work / f"worker{k}.log"
        with log.open("w") as out:
            # every exec in the chain keeps the pid: self._worker.pid is `ray start` in the node
            env = self._env(self._node_env(self.worker_ns))
            self._worker = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        self.worker_node_id = self._wait(f"worker node {k}", lambda nodes: _find(
            nodes, known, node_ip=self.worker_ip, state="ALIVE"), timeout, self._worker, log)
        return self.worker_node_id

    def kill_worker(self, timeout: float = 30) -> float:
        """SIGKILL every process of the worker node, as if its machine died; returns the seconds
        until the head marked the node dead."""
        if self._worker is None:
            raise RuntimeError("no worker node to kill")
        start, node_id = time.monotonic(), self.worker_node_id
        _kill_netns([self.worker_ns], grace=0)
        self._worker.wait()
        self._worker = None
        log = self.work / f"worker{self._workers_started - 1}.log"
        self._wait(f"node {node_id} dead", lambda nodes: _find(
            nodes, node_id=node_id, state="DEAD"), timeout, None, log)
        return time.monotonic() - start

    def kill_head(self, worker_timeout: float = 60) -> float:
        """SIGKILL every process of the head node (GCS, raylet, dashboard, the jobs' drivers,
        whatever ``popen`` started there), as if its machine died; then wait for the worker
        node to exit by itself (its raylet gives up on the lost GCS: without GCS fault tolerance
        it cannot join a new head). Returns those seconds; ``start_head`` starts a new cluster."""
        if self._head is None:
            raise RuntimeError("no head to kill")
        _kill_netns([self.head_ns], grace=0)
        self._head.wait()
        self._head, start = None, time.monotonic()
        try:
            if self._worker is not None:
                self._worker.wait(worker_timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the worker node runs {worker_timeout:.0f} s after the head "
                               "died") from None
        return time.monotonic() - start

    def close(self) -> None:
        """Kill both nodes, delete the namespaces, move the Ray temp dir (logs) into the work
        folder; RuntimeError if anything is left on the machine."""
        try:
            teardown(self.prefix)
        finally:
            for proc in filter(None, (self._head, self._worker)):
                proc.wait(timeout=10)  # reaped: not a zombie
            self._head = self._worker = None
        if self.temp.exists():
            _move_logs(self.temp, self.work)
        left = leftovers(self.prefix)
        if left:
            raise RuntimeError("LocalNodes left behind:\n  " + "\n  ".join(left))

    def __enter__(self) -> LocalNodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _move_logs(temp: Path, work: Path) -> None:
    """Move the nodes' Ray temp dirs to ``work/ray`` (``ray.1``, ... if taken), without the
    sockets and pipes a copy across file systems could not take."""
    dest, n = work / "ray", 0
    while dest.exists():
        n += 1
        dest = work / f"ray.{n}"
    try:
        temp.rename(dest)
    except OSError:  # another file system
        shutil.copytree(temp, dest, symlinks=True, ignore=lambda root, names: [
            n for n in names if not (os.path.isdir(os.path.join(root, n))
                                     or os.path.isfile(os.path.join(root, n)))])
        shutil.rmtree(temp)
