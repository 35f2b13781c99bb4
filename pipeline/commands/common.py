"""What every command shares: the configuration from the command line and the tables it prints.
The backends the configuration asks for come from :mod:`pipeline.distributed.backends`."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import RunConfig, build_config, merge_file
from pipeline.scoring.task_records import FILENAME
from pipeline.studies.comparison import format_table
from pipeline.studies.paired import folder_paired_text


def overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides, with ``--data-dir`` as one more."""
    items = list(args.overrides)
    if getattr(args, "data_dir", None):
        items.append(f"data.data_dir={args.data_dir}")
    return items


def config_from_args(args: argparse.Namespace, extra: list[str] | None = None) -> RunConfig:
    """Preset, then --config, then --set (and ``extra`` overrides after them)."""
    return build_config(args.preset or "main", args.config,
                        [*overrides(args), *(extra or [])])


def config_on(base: RunConfig, args: argparse.Namespace) -> RunConfig:
    """``base``, then --config, then --set."""
    if args.config:
        base = merge_file(base, args.config)
    return base.with_overrides(overrides(args))


def print_tables(config: RunConfig, metrics: dict, output: str | Path) -> None:
    """One table per compared data set: the evaluation split, then each extra one (the
    ``<data set>/<method>`` keys of ``metrics``)."""
    extra = list(dict.fromkeys(m.split("/", 1)[0] for m in metrics if "/" in m))
    tables = {(config.data.dataset, config.data.eval_split): {
        m: v for m, v in metrics.items() if "/" not in m}}
    for name in extra:
        tables[(name, "test")] = {m.split("/", 1)[1]: v for m, v in metrics.items()
                                  if m.startswith(f"{name}/")}
    folders = [Path(output), *(Path(output) / name for name in extra)]
    for ((dataset, split), table), folder in zip(tables.items(), folders):
        print(f"\n{dataset} / {split} ({config.model.name}):")
        print(format_table(table))
        paired = folder_paired_text(folder, config.eval.reference_method)
        if paired:
            print(f"\n{paired}")
    print(f"\nwrote {output}/metrics.json, {output}/{FILENAME} and {output}/samples.jsonl"
          + "".join(f", {output}/{name}/" for name in extra))
