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
