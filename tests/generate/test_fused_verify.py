"""The fused greedy step (`greedy_verify`: checkpoint, verify, acceptance, rollback in one function) against the
unfused path (checkpoint, verify forward, `accept_batch`, kept counts, rollback_on_device): the same tokens and
counts, and every cache tensor bit for bit after the rollback, with rows accepting every count 0..k (drafts made
from plain greedy decoding's own tokens, then a wrong one), a budget-finished row and a drafted stop."""
import pytest
import torch

import dsv4
from conftest import agreeing_model
from dsv4.generate import SamplingConfig
from dsv4.generate.fused_verify import PACKED, greedy_verify, host_checkpoint, kept_counts
from dsv4.generate.speculative import SpeculativeDecoder, accept_batch

TINY = dsv4.ModelConfig.preset("tiny")   # window 32, ratios (0, 4, 16, 4): a 4-token step crosses group ends
LENGTHS = [27, 30, 31, 33, 46, 47]


@pytest.fixture(scope="module")
def model():
    return dsv4.Transformer(TINY).init_weights(seed=3).eval()


def _tensors(cache):
    return [cache.positions] + [t for layer in cache.layers for t in [s.buf for s in layer.stores()]
                                + [x for st in layer.states() for x in (st.kv, st.score)]]


def _prefilled(model, prompts, **dtypes):
    cache = model.new_cache(len(prompts), 96, **dtypes)
    for r, p in enumerate(prompts):
        model(p, cache=cache.select(r))
    return cache


def _greedy_chain(model, prompts, x, k):
    """Each row's next k greedy tokens after x (plain one-token decoding)."""
    cache = _prefilled(model, prompts)
    tok, out = x.clone(), []
    for _ in range(k):
        tok = model(tok[:, None], cache=cache)[:, -1].argmax(-1)
        out.append(tok)
    return torch.stack(out, 1)


@pytest.mark.parametrize("dtypes", [{}, {"kv_dtype": "fp8", "index_dtype": "fp4"}], ids=["fp32", "fp8-fp4"])
@torch.no_grad()
def test_greedy_verify_equals_the_unfused_step(model, dtypes):
    g = torch.Generator().manual_seed(0)
    k = 3
    prompts = [torch.randint(0, TINY.vocab_size, (1, n), generator=g) for n in LENGTHS]
    x = torch.randint(0, TINY.vocab_size, (len(LENGTHS),), generator=g)
    chain = _greedy_chain(model, prompts, x, k)
    right = [0, 1, 2, 3, 3, 2]                               # drafts equal to the chain before a wrong one
    drafts = torch.stack([torch.where(torch.arange(k) < j, c, (c + 1) % TINY.vocab_size)
                          for j, c in zip(right, chain)])
    n_drafts = torch.tensor([3, 3, 3, 3, 3, 2])              # row 5: one draft fewer (a drafted stop cut it)
    stop_t = torch.tensor([[-1], [-1], [-1], [-1], [int(chain[4, 2])], [-1]])   # row 4 accepts its stop token
    budgets, live = [50, 50, 50, 3, 50, 50], [True, True, True, True, True, True]   # row 3 ends on its budget
    budget_live = torch.tensor([budgets, live], dtype=torch.long)

    unfused = _prefilled(model, prompts, **dtypes)
    starts = unfused.lengths()
    ckpt = unfused.checkpoint(k + 1)
    h = model.hidden(torch.cat((x[:, None], drafts), 1), cache=unfused)
    target = model.logits(h)
    greedy = [SamplingConfig(temperature=0)] * len(LENGTHS)
    a, y = accept_batch(target, torch.zeros(len(LENGTHS), k, TINY.vocab_size), drafts, n_drafts, greedy,
                        [None] * len(LENGTHS), [k] * len(LENGTHS))
    keep = kept_counts(a, drafts, stop_t, budget_live)
    unfused.rollback_on_device(ckpt, keep)
    unfused.end_rollback(ckpt, keep.tolist())

    fused = _prefilled(model, prompts, **dtypes)
    out = greedy_verify(model, fused, x, drafts, n_drafts, stop_t, budget_live)
    packed = out.packed
    fused.end_rollback(host_checkpoint(starts, k + 1), packed[:, 4].tolist())

    assert a.tolist() == [0, 1, 2, 3, 3, 2]                  # every accepted count 0..k occurs
    assert keep.tolist() == [1, 2, 3, 3, 3, 3]               # row 3: budget reached; row 4: its stop accepted
    assert torch.equal(out.h, h) and torch.equal(out.target, target)
    assert packed[:, :PACKED].tolist() == [[int(a[b]), int(y[b]), int(n_drafts[b]), 1, int(keep[b])]
                                           for b in range(len(LENGTHS))]
    assert torch.equal(packed[:, PACKED:], drafts)
    assert fused.lengths() == unfused.lengths() == [n + int(c) for n, c in zip(LENGTHS, keep)]
    for p, q in zip(_tensors(fused), _tensors(unfused)):
        assert torch.equal(p, q)


@torch.no_grad()
def test_fused_decoder_steps_equal_unfused():
    """SpeculativeDecoder with and without `fuse_greedy`: the same results every step (tokens, logits, counts)
    and the same main and MTP caches, bit for bit, rows finishing on their budgets along the way."""
    model = agreeing_model()
    prompts = [list(range(10, 37)), list(range(50, 81)), list(range(5, 38))]
    runs = []
    for fuse in (True, False):
        dec = SpeculativeDecoder(model, model.new_cache(3, 96), n_draft=2)
        dec.fuse_greedy = fuse
        for r, p in enumerate(prompts):
            dec.prefill(r, p)
        budgets, steps = [17, 9, 23], []
        cfgs = [SamplingConfig(temperature=0)] * 3
        for _ in range(10):
            res = dec.step_rows(slice(0, 3), cfgs, [None] * 3, [(), (7,), ()], budgets)
            steps.append([(r.tokens, r.drafted, r.accepted, r.finished, r.logits) for r in res])
            budgets = [0 if r.finished else b - len(r.tokens) for b, r in zip(budgets, res)]
        runs.append((steps, _tensors(dec.cache) + _tensors(dec.mtp_cache), dict(dec.stats)))
    (s1, c1, st1), (s2, c2, st2) = runs
    assert st1 == st2 and st1["accepted"] > 0
    for r1, r2 in zip(s1, s2):
        for a, b in zip(r1, r2):
            assert a[:4] == b[:4] and torch.equal(a[4], b[4])
    assert all(torch.equal(p, q) for p, q in zip(c1, c2))
