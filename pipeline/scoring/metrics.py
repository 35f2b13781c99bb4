"""Text and code generation metrics on a 0-1 scale (as in the DDPT paper), from established
libraries.

Every metric takes ``(predictions, references)``: two equally long lists of strings, one
reference per prediction. All are deterministic.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable

import sacrebleu
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer

MetricFn = Callable[[list[str], list[str]], float]

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_WORDNET_READY = False


def _validate(predictions: list[str], references: list[str]) -> None:
    """Raise ValueError unless both lists are non-empty and equally long."""
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: {len(predictions)} predictions, "
            f"{len(references)} references"
        )
    if not predictions:
        raise ValueError("no predictions to score (empty inputs)")


def _tokenize(text: str) -> list[str]:
    """Words and single punctuation characters (avoids nltk's punkt, which needs a download)."""
    return _TOKEN_RE.findall(text)


def bleu4(predictions: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU (13a tokenizer, n-grams up to 4, exponential smoothing) / 100."""
    _validate(predictions, references)
    # min(): a perfect corpus scores 100.00000000000004 from float rounding in sacrebleu
    return min(1.0, sacrebleu.corpus_bleu(predictions, [references]).score / 100.0)


def codebleu(predictions: list[str], references: list[str]) -> float:
    """codebleu 0.7.0 ``calc_codebleu(..., lang="python")["codebleu"]`` (equal weights 0.25 each).

    Every data set is scored as Python, although CodeAlpaca mixes languages (and prose), so its
    syntax and data-flow parts are approximate there. Library quirk, kept for comparability: the
    data-flow part enters as ``dataflow_match_score or 1``, so a corpus whose data-flow match is 0
    (e.g. empty or unrelated predictions) still gets 0.25 from it; the floor is 0.25, not 0.

    The library's data-flow part numbers variables in ``set`` order (``normalize_dataflow_item``),
    which follows Python's per-process string hashing: the same corpus scored in two processes
    differed by up to 4e-4. So it runs in a child interpreter with ``PYTHONHASHSEED=0``: one value
    per corpus, on every run and machine.
    """
    _validate(predictions, references)
    done = subprocess.run([sys.executable, "-c", _CODEBLEU_CHILD], capture_output=True, text=True,
                          input=json.dumps([references, predictions]),
                          env={**os.environ, "PYTHONHASHSEED": "0"}, check=False)
    if done.returncode:
        raise RuntimeError(f"codebleu failed: {done.stderr.strip()[-2000:]}")
    return float(done.stdout.split()[-1])


_CODEBLEU_CHILD = """import json, sys
from codebleu import calc_codebleu
references, predictions = json.load(sys.stdin)
print(calc_codebleu(references, predictions, lang="python")["codebleu"])
"""


def meteor(predictions: list[str], references: list[str]) -> float:
    """Mean nltk ``meteor_score([ref_tokens], hyp_tokens)`` (WordNet synonyms; regex tokens)."""
    _validate(predictions, references)
    global _WORDNET_READY
    if not _WORDNET_READY:
        from pipeline.scoring.wordnet import ensure_wordnet

        ensure_wordnet()
        _WORDNET_READY = True
    scores = [meteor_score([_tokenize(r)], _tokenize(p)) for p, r in zip(predictions, references)]
    return sum(scores) / len(scores)


def chrf(predictions: list[str], references: list[str]) -> float:
    """sacrebleu corpus chrF (character 6-grams, beta 2, no word n-grams) / 100."""
    _validate(predictions, references)
    return min(1.0, sacrebleu.corpus_chrf(predictions, [references]).score / 100.0)


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean rouge_score ``rougeL`` F-measure (its tokenizer lowercases and drops
    non-alphanumerics)."""
    _validate(predictions, references)
    scores = [_ROUGE.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return sum(scores) / len(scores)


def _normalize_ws(text: str) -> str:
    return " ".join(text.split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of pairs equal after stripping and collapsing runs of whitespace."""
    _validate(predictions, references)
    hits = [_normalize_ws(p) == _normalize_ws(r) for p, r in zip(predictions, references)]
    return sum(hits) / len(hits)


METRICS: dict[str, MetricFn] = {
    "bleu4": bleu4,
    "codebleu": codebleu,
    "meteor": meteor,
    "chrf": chrf,
    "rouge_l": rouge_l,
    "exact_match": exact_match,
}


def compute_metrics(
    predictions: list[str], references: list[str], names: list[str] | None = None
) -> dict[str, float]:
    """Compute the named metrics (all of ``METRICS`` by default) as ``{name: score in [0, 1]}``."""
    predictions, references = list(predictions), list(references)
    _validate(predictions, references)
    names = list(METRICS) if names is None else list(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known metrics: {sorted(METRICS)}")
    return {name: METRICS[name](predictions, references) for name in names}
