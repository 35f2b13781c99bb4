"""pass@k: the chance that at least one of k generations for a task passes its tests.

With n generations per task of which c pass, the unbiased estimator (Chen et al. 2021,
"Evaluating Large Language Models Trained on Code", eq. 1) is

    pass@k = E_tasks[ 1 - C(n - c, k) / C(n, k) ],

computed in the numerically stable product form 1 - prod_{i=n-c+1}^{n} (1 - k / i).
With n = 1 (greedy decoding) pass@1 is simply the share of tasks whose program passed.

MLflow forbids '@' in metric names, so the metric names are ``pass_at_<k>`` everywhere
(metrics.json and MLflow alike).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

PASSED = "passed"


def metric_name(k: int) -> str:
    """``pass_at_<k>``: the name pass@k goes by in metrics.json and MLflow."""
    return f"pass_at_{k}"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task with ``n`` generations of which ``c`` passed."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset holds a passing generation
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_metrics(statuses: Mapping[str, Sequence[str]], ks: Iterable[int] = (1,)
                      ) -> dict[str, float]:
    """``{"pass_at_1": ..., "pass_at_<k>": ...}``: the mean over tasks of pass@k.

    ``statuses`` maps each task id to the statuses of its n generations (n may differ per task,
    but every k must be <= each task's n). pass@1 is always included. No tasks gives NaN.
    """
    ks = sorted({1, *ks})
    for task, runs in statuses.items():
        if len(runs) < ks[-1]:
            raise ValueError(f"pass@{ks[-1]}: task {task!r} has only {len(runs)} generation(s)")
    metrics = {}
    for k in ks:
        values = [pass_at_k(len(runs), sum(s == PASSED for s in runs), k)
                  for runs in statuses.values()]
        metrics[metric_name(k)] = sum(values) / len(values) if values else math.nan
    return metrics
