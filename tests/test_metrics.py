"""Tests for pipeline.scoring.metrics and pipeline.scoring.wordnet (offline WordNet for
METEOR)."""

from __future__ import annotations

import os

import nltk
import pytest

from pipeline.scoring import metrics, wordnet
from pipeline.scoring.metrics import METRICS, compute_metrics

CODE = [
    "def add(a, b):\n    return a + b",
    "def is_even(n):\n    total = n % 2\n    return total == 0",
]
OTHER = [
    "SELECT name FROM users WHERE age > 30;",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.fixture(autouse=True, scope="module")
def _tmp_cache(tmp_path_factory):
    """Keep the default WordNet cache (used by meteor) out of the user's home directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDPT_CACHE_DIR", str(tmp_path_factory.mktemp("ddpt_cache")))
        yield


def test_every_metric_is_bounded_and_ranks_a_match_above_unrelated_text():
    for name, metric in METRICS.items():
        same, unrelated = metric(CODE, CODE), metric(OTHER, CODE)
        assert 0.0 <= unrelated < same <= 1.0 + 1e-9, (name, unrelated, same)


def test_perfect_prediction_scores_one():
    scores = compute_metrics(CODE, CODE)
    for name in ("bleu4", "chrf", "rouge_l", "exact_match"):
        assert scores[name] == 1.0, name
    assert scores["meteor"] > 0.99
    assert scores["codebleu"] > 0.99


def test_completely_different_scores_low():
    scores = compute_metrics(OTHER, CODE)
    assert scores["bleu4"] < 0.05
    assert scores["chrf"] < 0.2
    assert scores["rouge_l"] < 0.1
    assert scores["meteor"] < 0.1
    assert scores["exact_match"] == 0.0
    # codebleu 0.7.0 counts a zero data-flow match as 1 ("or 1"), so its floor is 0.25
    assert scores["codebleu"] < 0.4


def test_all_scores_in_unit_interval():
    preds = ["def add(x, y):\n    return x + y", "def is_even(n):\n    return n % 2 == 0"]
    for name, value in compute_metrics(preds, CODE).items():
        assert 0.0 < value < 1.0 or name == "exact_match", (name, value)


def test_bleu4_known_value():
    # hyp "the cat sat on the mat" vs ref "the cat is on the mat": clipped n-gram precisions
    # 5/6, 3/5, 1/4 and 0/3 4-grams, which sacrebleu's default "exp" smoothing turns into
    # 1 / (2 * 3); equal lengths so no brevity penalty: BLEU = geometric mean of the four.
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25  # = (1/48) ** 0.25 ~ 0.3799
    got = metrics.bleu4(["the cat sat on the mat"], ["the cat is on the mat"])
    assert got == pytest.approx(expected, abs=1e-9)
    assert got == pytest.approx(0.3799, abs=1e-4)


def test_bleu4_is_corpus_level():
    # corpus BLEU pools n-gram counts over sentences (no zero counts here, so no smoothing):
    # 1-grams (5+4)/(6+4), 2-grams (3+3)/(5+3), 3-grams (1+2)/(4+2), 4-grams (0+1)/(3+1)
    preds = ["the cat sat on the mat", "a b c d"]
    refs = ["the cat is on the mat", "a b c d"]
    pooled = (9 / 10 * 6 / 8 * 3 / 6 * 1 / 4) ** 0.25  # ~ 0.5390
    assert metrics.bleu4(preds, refs) == pytest.approx(pooled, abs=1e-9)


def test_exact_match_normalises_whitespace():
    preds = ["  def f():\n\treturn   1\n", "x = 1", "x=1"]
    refs = ["def f(): return 1", "x = 1", "x = 1"]
    assert metrics.exact_match(preds, refs) == pytest.approx(2 / 3)


def test_meteor_uses_wordnet_synonyms():
    # "car" and "auto" share a WordNet synset (car.n.01); without WordNet they would not match.
    # (nltk stems unmatched words before its synonym stage, so pairs like big/large -> "larg" miss.)
    synonym = metrics.meteor(["I drive my car to work"], ["I drive my auto to work"])
    unrelated = metrics.meteor(["I drive my pen to work"], ["I drive my auto to work"])
    assert synonym > 0.99
    assert unrelated < 0.9


def test_empty_prediction_does_not_crash():
    scores = compute_metrics(["", ""], CODE)
    for name in ("bleu4", "chrf", "rouge_l", "meteor", "exact_match"):
        assert scores[name] == 0.0, name
    assert scores["codebleu"] <= 0.25 + 1e-9  # the library's data-flow floor, see metrics.codebleu


def test_metrics_pair_each_prediction_with_its_own_reference():
    """Reordering the (prediction, reference) pairs changes nothing; pairing a prediction with
    another example's reference does."""
    preds = ["def add(x, y):\n    return x + y", "def is_even(n):\n    return n % 2 == 0"]
    forward, backward = compute_metrics(preds, CODE), compute_metrics(preds[::-1], CODE[::-1])
    assert forward == pytest.approx(backward)
    crossed = compute_metrics(preds, CODE[::-1])
    assert all(crossed[name] < forward[name] for name in ("bleu4", "chrf", "rouge_l", "meteor"))


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="3 predictions.*2 references"):
        compute_metrics(["a", "b", "c"], ["a", "b"])
    with pytest.raises(ValueError):
        metrics.bleu4(["a"], ["a", "b"])


def test_unknown_metric_raises():
    with pytest.raises(ValueError, match="nope") as err:
        compute_metrics(["a"], ["a"], names=["bleu4", "nope"])
    assert "exact_match" in str(err.value)  # lists the known names


def test_empty_inputs_raise():
    with pytest.raises(ValueError, match="empty"):
        compute_metrics([], [])
    with pytest.raises(ValueError):
        metrics.meteor([], [])


def test_selected_names_only():
    assert compute_metrics(["x"], ["x"], names=["exact_match"]) == {"exact_match": 1.0}


@pytest.mark.filterwarnings("ignore:The multilingual functions:UserWarning")  # omw_reader=None
def test_ensure_wordnet_idempotent(tmp_path):
    cache = tmp_path / "nltk_data"
    root = wordnet.ensure_wordnet(cache_dir=cache)
    folder = cache / "corpora" / "wordnet"
    assert root == cache.resolve()
    assert str(root) in nltk.data.path
    for name in ("lexnames", "index.noun", "data.noun", "noun.exc", "index.sense", "cntlist.rev"):
        assert (folder / name).is_file(), name
        assert not (folder / name).is_symlink(), name
    stamp = os.stat(folder / "data.noun").st_mtime_ns

    assert wordnet.ensure_wordnet(cache_dir=cache) == root  # second call: no rebuild
    assert os.stat(folder / "data.noun").st_mtime_ns == stamp
    assert nltk.data.path.count(str(root)) == 1
    assert sorted(p.name for p in (cache / "corpora").iterdir()) == ["wordnet"]  # no temp leftovers

    from nltk.corpus import wordnet as wn
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    assert wn.synsets("dog")[0].lexname() == "noun.animal"
    # and this very folder (nltk.corpus.wordnet may have been loaded from another one earlier)
    assert WordNetCorpusReader(str(folder), None).synsets("dog")[0].lexname() == "noun.animal"


def test_missing_lexnames_raises_with_path(tmp_path):
    missing = tmp_path / "nowhere" / "lexnames"
    with pytest.raises(RuntimeError, match=str(missing)):
        wordnet.ensure_wordnet(cache_dir=tmp_path / "nltk_data", lexnames_path=missing)
    assert not (tmp_path / "nltk_data" / "corpora" / "wordnet").exists()


def test_missing_system_wordnet_names_debian_packages(tmp_path, monkeypatch):
    monkeypatch.setattr(wordnet, "SYSTEM_WORDNET_DIR", tmp_path / "no_wordnet")
    with pytest.raises(RuntimeError) as err:
        wordnet.ensure_wordnet(cache_dir=tmp_path / "nltk_data")
    assert "apt-get install -y wordnet-base wordnet-sense-index" in str(err.value)


def test_default_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPT_CACHE_DIR", str(tmp_path / "c"))
    (tmp_path / "d").mkdir()
    monkeypatch.setenv("DDPT_DATA_DIR", str(tmp_path / "d"))
    assert wordnet.default_cache_dir() == tmp_path / "c" / "nltk_data"
    assert wordnet.default_lexnames_path() == tmp_path / "d" / "wordnet" / "lexnames"


# A generation and its reference (MBPP 31, from a make run) whose data-flow match in codebleu
# 0.7.0 depends on the process's string hashing: 0.259 under PYTHONHASHSEED=1, 0.241 under 2.
HASH_SENSITIVE = (
    "def find_top_k_most_frequent(lst, k):\n    heapq.heapify(0, len(lst) - 1)\n    max_k = k\n"
    "    for i in range(len(lst) - 1, -1, -1):\n        if i > max_k:\n            max_k = i\n"
    "    heapq.heapify(0, len(lst) - 1)\n    return max(lst, max_k)\n\n"
    "def find_top_k_most_frequent(lst, k):\n    return max_k - 1",
    "def func(nums, k):\n    import collections\n    d = collections.defaultdict(int)\n"
    "    for row in nums:\n        for i in row:\n            d[i] += 1\n    temp = []\n"
    "    import heapq\n    for key, v in d.items():\n        if len(temp) < k:\n"
    "            temp.append((v, key))\n            if len(temp) == k:\n"
    "                heapq.heapify(temp)\n        else:\n            if v > temp[0][0]:\n"
    "                heapq.heappop(temp)\n                heapq.heappush(temp, (v, key))\n"
    "    result = []\n    while temp:\n        v, key = heapq.heappop(temp)\n"
    "        result.append(key)\n    return result",
)
_SCORE = ("import json, sys\nfrom pipeline.scoring.metrics import codebleu\n"
          "from codebleu import calc_codebleu\np, r = json.loads(sys.argv[1])\n"
          "print(json.dumps([codebleu([p], [r]), calc_codebleu([r], [p], lang='python')"
          "['codebleu']]))")


def test_codebleu_does_not_depend_on_the_processs_string_hashing():
    import json
    import subprocess
    import sys

    scores = [json.loads(subprocess.run(
        [sys.executable, "-c", _SCORE, json.dumps(HASH_SENSITIVE)], capture_output=True,
        text=True, check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout)
        for seed in ("1", "2")]
    (ours_1, library_1), (ours_2, library_2) = scores
    assert library_1 != library_2  # the library alone follows the hash seed
    assert ours_1 == ours_2
