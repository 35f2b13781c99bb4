"""``ddpt prepare``: what is set up once (the embedded model's conversion, WordNet's copy)."""
from __future__ import annotations

import argparse

from pipeline.lm.loader import prepare_embedded
from pipeline.scoring.wordnet import ensure_wordnet


def main(args: argparse.Namespace) -> None:
    print(f"embedded model: {prepare_embedded(force=args.force)}")
    print(f"WordNet for METEOR: {ensure_wordnet()}")
