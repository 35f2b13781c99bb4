"""Shared fixtures: tiny random models built in code and a handful of examples (from
tests/helpers.py)."""
from __future__ import annotations

import os

import pytest
import torch

from helpers import EXAMPLES, make_lm
from pipeline.data.example import Example
from pipeline.lm.frozen import FrozenCodeLM

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(params=["tiny-llama", "tiny-t5"])
def tiny_lm(request) -> FrozenCodeLM:
    return make_lm(request.param)


@pytest.fixture
def examples() -> list[Example]:
    return list(EXAMPLES)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: intra-op threads only add contention
    (10x slower on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def no_ray_left_behind():
    """Shut down a Ray that a module's tests started in this process (``ddpt`` commands run
    in-process call ``ray.init`` and, as a CLI, leave the shutdown to their exit). A Ray left
    running breaks the next module's ``ray.init``, and a later ``ray stop`` kills it under this
    process: Ray's core worker then exits pytest with status 1, no summary printed."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
