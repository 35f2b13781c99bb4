"""Start a real two-node Ray cluster on this machine (``cluster/local_nodes.py``) until Ctrl-C,
or clean up after a crashed one.

    sudo .venv/bin/python cluster/local_nodes_cli.py up --work DIR [--hide PATH ...]
    sudo .venv/bin/python cluster/local_nodes_cli.py down --prefix P
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import shutil
import signal
import sys
from collections.abc import Sequence

from local_nodes import TEMP_ROOT, LocalNodes, available, leftovers, teardown


def _up(work: str, hide: Sequence[str], num_cpus: int) -> None:
    """Start head + one worker, print how to use them, wait for Ctrl-C or SIGTERM, tear down."""
    # SIGTERM as an exception, so that the `with` tears everything down, during startup too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with LocalNodes(work, hidden=hide, num_cpus=num_cpus) as nodes:
        nodes.start_head()
        nodes.add_worker()
        head = f"ip netns exec {nodes.head_ns}"
        print("\n".join([
            f"head    {nodes.head_ip} (netns {nodes.head_ns}): Ray {nodes.address}, "
            f"dashboard {nodes.dashboard_url}",
            f"worker  {nodes.worker_ip} (netns {nodes.worker_ns}), hidden there: "
            f"{' '.join(map(str, nodes.hidden)) or '-'}",
            f"logs    {nodes.work}/head.log, worker0.log; Ray's in {nodes.temp}",
            "", "export " + " ".join(f"{k}={v}" for k, v in nodes.auth_env.items()),
            f"{head} {nodes.ray} job submit --address {nodes.dashboard_url} --working-dir . "
            "-- python script.py",
            f"{head} {sys.executable} script.py  # a driver: ray.init(address=\"{nodes.address}\")",
            "", "Ctrl-C or SIGTERM tears both down; after a crash: "
            f"{sys.executable} {sys.argv[0]} down --prefix {nodes.prefix}"]), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                signal.pause()


def _down(prefix: str) -> int:
    """Clean up what a crashed run left: namespaces, links, its Ray temp dirs."""
    teardown(prefix)
    for folder in glob.glob(TEMP_ROOT.format(prefix=glob.escape(prefix)) + "*"):
        shutil.rmtree(folder, ignore_errors=True)
    left = leftovers(prefix)
    print("\n".join(left) if left else f"nothing left with prefix {prefix!r}")
    return 1 if left else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start head + one worker until Ctrl-C/SIGTERM")
    up.add_argument("--work", required=True, help="folder for the nodes' logs")
    up.add_argument("--hide", action="append", default=[],
                    help="a folder the worker node sees empty (repeatable)")
    up.add_argument("--num-cpus", type=int, default=2)
    down = sub.add_parser("down", help="remove namespaces left by a crashed run")
    down.add_argument("--prefix", default="ddpt", help="namespace name prefix (default ddpt)")
    args = parser.parse_args(argv)
    if args.command == "down":
        return _down(args.prefix)
    if reason := available():
        parser.error(f"cannot run here: {reason}")
    _up(args.work, args.hide, args.num_cpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
