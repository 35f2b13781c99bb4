"""What ran, by name: each compared method's prompt chain and decoding (``ddim-3 eta=0 +
greedy``), read back from a comparison's MLflow method runs, whose params record the chain the
prompt model really ran (``chain``, ``steps``, ``eta``: a model trained through its
``train.unroll_steps`` DDIM chain samples on it, whatever ``sample.ddim_steps`` says)."""
from __future__ import annotations

from pathlib import Path

from pipeline.scoring.task_records import chain_label
from pipeline.studies.comparison import COMPARISON_FILE
from pipeline.tracking import ROLE_TAG, child_runs, read_run_file


def comparison_chains(folder: str | Path) -> dict[str, str]:
    """``{method: chain label}`` of the comparison in ``folder`` (``ddpt run``, ``ddpt sample``
    or an experiment's run folder); empty when it has none."""
    pointer = Path(folder) / COMPARISON_FILE
    if not pointer.is_file():
        return {}
    saved = read_run_file(pointer)
    return {run.data.tags["ddpt.method"]: chain_label(run.data.params)
            for run in child_runs(saved["uri"], saved["run_id"])
            if run.data.tags.get(ROLE_TAG) == "method" and "decoding" in run.data.params}


def chains_text(chains: dict[str, str]) -> str:
    """The lines ``ddpt run`` and ``ddpt sample`` print under their tables."""
    if not chains:
        return ""
    width = max(len(method) for method in chains) + 2
    return "\n".join(["what ran (a DDPT prompt's chain, then the decoding):",
                      *(f"  {method:<{width}}{label}" for method, label in chains.items())])
