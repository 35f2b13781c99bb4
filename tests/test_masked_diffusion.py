"""Masked-diffusion decoding: the reference fixtures in parity mode, and the default mode."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import DREAM_FIXTURES
from pipeline.decoding.masked_diffusion import (
    DiffusionSettings,
    completion_ids,
    diffusion_generate,
    reveal_count,
    step_times,
)
from pipeline.decoding.model_fns import dream_model_fn, spa_model_fn
from pipeline.lm.dream import load_dream, random_dream, tiny_dream_config

pytestmark = pytest.mark.usefixtures("one_thread")



FIX = DREAM_FIXTURES
TORCH = torch.__version__.split("+")[0]
needs_fixtures = pytest.mark.skipif(not (FIX / "cases.jsonl").is_file(),
                                    reason=f"Dream fixtures absent at {FIX}")


def _records() -> dict[str, dict]:
    """Every case id -> the record valid on this torch (a version-specific file's record
    replaces the base one when its torch_versions contain the installed version)."""
    out: dict[str, dict] = {}
    for name in ("cases.jsonl", f"cases-torch-{TORCH}.jsonl"):
        path = FIX / name
        if path.is_file():
            for line in path.read_text().splitlines():
                r = json.loads(line)
                if TORCH in r["torch_versions"] or (not r["draws_random"] and r["id"] not in out):
                    out[r["id"]] = r
    return out


@pytest.fixture(scope="module")
def fixture_model():
    return load_dream(FIX / "tiny-dream")


def _mismatches(model, records: list[dict]) -> list[str]:
    bad = []
    for r in records:
        s = DiffusionSettings(**r["settings"], parity=True)
        B = r["batch_size"]
        torch.manual_seed(r["seed"])
        out = diffusion_generate(model, torch.tensor(r["input_ids"]),
                                 torch.tensor(r["attention_mask"]), s,
                                 model.config.mask_token_id, output_history=True)
        rec = out.record
        got = {
            "sequences": out.sequences.tolist(),
            "history": [h.tolist() for h in out.history],
            "revealed": [[sorted(rec.positions[b][i].tolist()) for b in range(B)]
                         for i in range(s.steps)],
        }
        if "num_transfer" in r:
            got["num_transfer"] = rec.num_transfer[:, 0].tolist()
        if "remasked" in r:
            got["remasked"] = [[rec.remasked[b][i].tolist() for b in range(B)]
                               for i in range(s.steps)]
        bad += [f"{r['id']}: {k}" for k, v in got.items() if v != r[k]]
    return bad


@needs_fixtures
def test_parity_rng_free_cases_on_any_torch(fixture_model):
    cases = [r for r in _records().values() if not r["draws_random"]]
    assert len(cases) == 108  # docs/dllm.md's count: nothing silently dropped
    assert _mismatches(fixture_model, cases) == []


@needs_fixtures
def test_parity_rng_cases_on_this_torch(fixture_model):
    cases = [r for r in _records().values() if r["draws_random"] and TORCH in r["torch_versions"]]
    if not cases:
        pytest.skip(f"no RNG-drawing fixture record was made on torch {TORCH}")
    assert any("remasked" in r for r in cases) and any(r["quirks"] for r in cases)
    assert _mismatches(fixture_model, cases) == []


def transfer_schedule(L: int, S: int, eps: float = 1e-3) -> list[int]:
    """K per step for one row of L masks under the confidence algs, from the decoder's own
    step_times and reveal_count (float32 as the reference): S = L <= 768 gives [0, 1, ..., 1,
    2]."""
    times, left, out = step_times(S, eps), L, []
    for i in range(S):
        k = int(reveal_count(torch.tensor(left) / 1, times[i], times[i + 1], last=i == S - 1))
        out.append(k)
        left -= k
    return out


def test_transfer_schedule_counts():
    for L in (16, 32, 256, 512, 768):
        assert transfer_schedule(L, L) == [0] + [1] * (L - 2) + [2]
    k = transfer_schedule(1024, 1024)
    assert k[:3] == [0, 0, 1] and k[-1] == 3 and set(k[2:-1]) == {1} and sum(k) == 1024
    assert transfer_schedule(256, 128) == [1] + [2] * 126 + [3]
    assert transfer_schedule(256, 64) == [3] + [4] * 62 + [5]
    assert transfer_schedule(100, 7) == [14] * 6 + [16]


@needs_fixtures
def test_transfer_schedule_matches_single_row_fixtures():
    n = 0
    for r in _records().values():
        if "num_transfer" in r and r["batch_size"] == 1 and "mask_token_decoded" not in r["quirks"]:
            s = r["settings"]
            assert transfer_schedule(s["max_new_tokens"], s["steps"]) == r["num_transfer"], r["id"]
            n += 1
    assert n > 50


@pytest.fixture(scope="module")
def tiny():
    return random_dream(tiny_dream_config(64, 63, 0, 2), seed=1)


@pytest.mark.parametrize("parity", [True, False])
@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus", "topk_margin"])
def test_left_padded_row_equals_single_row(tiny, parity, alg):
    a = torch.tensor([[5, 9, 14, 22, 7]])
    b = torch.tensor([[30, 31, 4, 8, 12, 40, 41, 6]])
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1), b])
    am = torch.ones_like(batch)
    am[0, :3] = 0
    s = DiffusionSettings(max_new_tokens=10, steps=10, alg=alg, parity=parity)
    alone = diffusion_generate(tiny, a, None, s, 63).sequences
    both = diffusion_generate(tiny, batch, am, s, 63).sequences
    assert torch.equal(both[0, 3:], alone[0])
    assert torch.equal(both[1], diffusion_generate(tiny, b, None, s, 63).sequences[0])


def test_generator_determinism(tiny):
    x = torch.randint(3, 63, (3, 6), generator=torch.Generator().manual_seed(0))
    s = DiffusionSettings(max_new_tokens=24, steps=12, alg="maskgit_plus", alg_temp=0.5,
                          temperature=1.0, top_p=0.95)
    runs = [diffusion_generate(tiny, x, None, s, 63, generator=torch.Generator().manual_seed(k))
            for k in (7, 7, 8)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert runs[0].record.orders()[0].tolist() == runs[1].record.orders()[0].tolist()
    assert not torch.equal(runs[0].sequences, runs[2].sequences)


def _mask_loving(V: int, mask_id: int, bad_id: int):
    """A stub whose logits favour the mask id and an id outside the valid vocabulary, with a
    per-row, per-position pseudo-random remainder."""
    def fn(x):
        g = torch.Generator().manual_seed(int(x.sum()))
        z = torch.randn(*x.shape, V, generator=g)
        z[..., mask_id] += 3.0
        z[..., bad_id] += 3.0
        return z
    return fn


@pytest.mark.parametrize("alg", ["origin", "entropy", "maskgit_plus"])
def test_default_mode_fixes_the_quirks(alg):
    V, m, valid = 40, 38, 38  # ids 38 (mask) and 39 lie at or beyond the valid vocabulary
    x = torch.randint(3, 30, (2, 4), generator=torch.Generator().manual_seed(0))
    x[1, 1] = m  # a mask id inside the prompt: the default mode leaves it alone
    L = 12
    base = {"max_new_tokens": L, "steps": 6, "alg": alg, "temperature": 1.0}
    fn = _mask_loving(V, m, 39)
    quirky = diffusion_generate(fn, x, None, DiffusionSettings(**base, parity=True), m,
                                generator=torch.Generator().manual_seed(0))
    assert (quirky.sequences[:, 4:] == m).any()  # the reference keeps drawing the mask id
    out = diffusion_generate(fn, x, None, DiffusionSettings(**base), m, valid_vocab_size=valid,
                             generator=torch.Generator().manual_seed(0), output_history=True)
    canvas = out.sequences[:, 4:]
    assert not (canvas == m).any() and int(canvas.max()) < valid
    assert torch.equal(out.sequences[:, :4], x)
    for b in range(2):
        assert sorted(out.record.order(b).tolist()) == list(range(L))  # each revealed once
        assert all(len(r) == 0 for r in out.record.remasked[b])
    for prev, nxt in zip(out.history, out.history[1:], strict=False):
        assert not ((prev != m) & (nxt == m)).any()  # never re-masked


def test_default_mode_gives_each_row_its_own_k(tiny):
    # A tokens hook pins row 0's first canvas slot, so the rows' masked counts differ.
    def pin(step, x, logits):
        x[0, 6] = 17
        return x
    x = torch.randint(3, 63, (2, 6), generator=torch.Generator().manual_seed(2))
    s = DiffusionSettings(max_new_tokens=8, steps=4, alg="entropy")
    out = diffusion_generate(tiny, x, None, s, 63, tokens_hook=pin)
    nt = out.record.num_transfer
    assert nt[:, 0].sum() == 7 and nt[:, 1].sum() == 8
    assert not (out.sequences == 63).any()


def test_record_order_and_first_step_confidence(tiny):
    x = torch.randint(3, 63, (2, 5), generator=torch.Generator().manual_seed(3))
    s = DiffusionSettings(max_new_tokens=16, steps=4, alg="entropy")
    rec = diffusion_generate(tiny, x, None, s, 63).record
    first = rec.first_step_confidence
    assert first.shape == (2, 21)
    assert torch.isnan(first[:, :5]).all() and torch.isfinite(first[:, 5:]).all()
    for b in range(2):
        for c in rec.confidences[b]:
            assert torch.all(c[:-1] >= c[1:])  # within a step: descending confidence
        # the step-0 picks are the most confident canvas positions of step 0
        picks = rec.positions[b][0]
        best = first[b].nan_to_num(-1e9).topk(len(picks)).indices
        assert set(picks.tolist()) == set(best.tolist())


def test_prompt_embeds_and_spa(tiny):
    x = torch.randint(3, 63, (2, 9), generator=torch.Generator().manual_seed(4))
    span = torch.zeros(2, 9, dtype=torch.bool)
    span[:, 2:5] = True
    own = tiny.get_input_embeddings()(x)[span].view(2, 3, -1)
    plain = dream_model_fn(tiny)(x)
    assert torch.equal(dream_model_fn(tiny, None, own, span)(x), plain)
    shifted = dream_model_fn(tiny, None, own + 0.5, span)(x)
    assert (shifted - plain).abs().max() > 1e-3
    anchor = torch.zeros(2, 9, dtype=torch.bool)
    anchor[:, 1] = True
    torch.testing.assert_close(spa_model_fn(tiny, None, anchor, omega=1.0)(x), plain)
    emb = tiny.get_input_embeddings()(x).masked_fill(anchor[..., None], 0.0)
    masked = tiny(inputs_embeds=emb).logits
    torch.testing.assert_close(spa_model_fn(tiny, None, anchor, omega=0.0)(x), masked)
    s = DiffusionSettings(max_new_tokens=6, steps=6, alg="entropy")
    out = diffusion_generate(spa_model_fn(tiny, None, anchor, omega=2.0), x, None, s, 63)
    assert not (out.sequences == 63).any()


def test_settings_validation():
    for bad, field in [({"steps": 0}, "steps"), ({"alg": "greedy"}, "alg"),
                       ({"eps": 0.0}, "eps"), ({"top_p": 0.0}, "top_p"),
                       ({"top_k": 0}, "top_k"), ({"temperature": -1.0}, "temperature"),
                       ({"alg": "origin", "alg_temp": 0.5}, "alg_temp"),
                       ({"max_new_tokens": True}, "max_new_tokens"), ({"parity": 1}, "parity")]:
        with pytest.raises(ValueError, match=field):
            DiffusionSettings(**{"max_new_tokens": 4, "steps": 4, **bad})


def test_completion_ids_cut_and_drop():
    """Cut at the first stop id (eos 1, pad 0, 6), drop mask ids (9) and ids beyond the
    tokenizer (12), as the harness's decoding does."""
    seq = torch.tensor([[5, 5, 3, 12, 9, 4, 1, 6], [5, 5, 7, 0, 8, 8, 8, 8],
                        [5, 5, 2, 3, 4, 6, 7, 8]])
    assert completion_ids(seq, 2, {1, 0, 6}, mask_id=9, vocab_size=10) == [[3, 4], [7], [2, 3, 4]]
    assert completion_ids(seq, 2, {1, 0, 6}, mask_id=9)[0] == [3, 12, 4]
