"""The live lines of generation: one per method, examples done / examples to do."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from tqdm.auto import tqdm


class MethodProgress:
    """``tasks``: the ``(method, examples)`` batches about to run; :meth:`done` per batch."""

    def __init__(self, tasks: Sequence[tuple[str, Sequence]], *, enabled: bool = True):
        totals: Counter[str] = Counter()
        for method, examples in tasks:
            totals[method] += len(examples)
        width = max((len(m) for m in totals), default=0)
        self.bars = {method: tqdm(total=count, desc=f"generate {method:<{width}}", unit="ex",
                                  position=i, leave=True, disable=not enabled,
                                  dynamic_ncols=True)
                     for i, (method, count) in enumerate(totals.items())}

    def done(self, method: str, count: int) -> None:
        bar = self.bars[method]
        if bar.n == 0:  # its clock from its first batch, not from the pool's start
            bar.reset(total=bar.total)
        bar.update(count)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
