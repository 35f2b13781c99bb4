"""A real two-node Ray cluster on one machine (cluster/local_nodes.py): the worker node does not
see the driver's folders, and a killed node is noticed and can be replaced."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import load_local_nodes

REPO = Path(__file__).resolve().parent.parent


local_nodes = load_local_nodes()

# A driver on the head node: the alive nodes, and whether a task pinned to each sees the file.
PROBE = """
import json, os, sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=sys.argv[1])

@ray.remote(num_cpus=1)
def look(path):
    return ray.get_runtime_context().get_node_id(), os.path.exists(path)

alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
seen = ray.get([look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(sys.argv[2]) for node in alive])
print(json.dumps({"alive": alive, "seen": seen}))
"""


def _probe(nodes, marker: Path) -> tuple[set[str], dict[str, bool]]:
    done = nodes.run([sys.executable, "-c", PROBE, nodes.address, str(marker)],
                     capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    seen = dict(result["seen"])
    assert set(seen) == set(result["alive"])  # each task ran on the node it was pinned to
    return set(result["alive"]), seen


@pytest.mark.slow
def test_two_nodes_hide_the_drivers_folder_and_replace_a_killed_node(tmp_path):
    reason = local_nodes.available()
    if reason:
        pytest.skip(f"no network namespaces here: {reason}")
    out = tmp_path / "out"
    out.mkdir()
    marker = out / "marker"
    marker.write_text("driver only")
    nodes = local_nodes.LocalNodes(tmp_path / "work", hidden=[out])
    try:
        head = nodes.start_head()
        first = nodes.add_worker()
        assert _probe(nodes, marker) == ({head, first}, {head: True, first: False})
        # what run(node="worker") sees is the node's own view too
        assert nodes.run(["test", "-e", str(marker)], node="worker").returncode == 1

        dead_after = nodes.kill_worker()
        assert dead_after < 20
        assert {n["node_id"]: n["state"] for n in nodes.nodes()}[first] == "DEAD"

        second = nodes.add_worker()
        assert second != first
        assert _probe(nodes, marker) == ({head, second}, {head: True, second: False})
    finally:
        nodes.close()  # raises if anything is left
    assert local_nodes.leftovers(nodes.prefix) == []
    assert marker.read_text() == "driver only"  # the worker's tmpfs never covered the host's
    assert (tmp_path / "work" / "ray" / "worker1").is_dir()  # both nodes' logs were kept
