"""``ddpt config``: the resolved configuration, as YAML (reload it with ``--config``)."""
from __future__ import annotations

import argparse

from pipeline.commands.common import config_from_args


def main(args: argparse.Namespace) -> None:
    print(config_from_args(args))
