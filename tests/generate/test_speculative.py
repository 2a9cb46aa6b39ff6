"""MTP speculative decoding: exact cache rollback, greedy output equal to plain decoding, the sampling rule keeps
the target distribution, drafts never pass a stop token."""
import pytest
import torch

import dsv4
from conftest import agreeing_model
from dsv4.errors import InvalidArgument
from dsv4.generate import SamplingConfig
from dsv4.generate.speculative import SpeculativeDecoder, accept_drafts

TINY = dsv4.ModelConfig.preset("tiny")   # window 32, ratios (0, 4, 16, 4 | MTP 0), one MTP block


@pytest.fixture(scope="module")
def model():
    return dsv4.Transformer(TINY).init_weights(seed=3).eval()


@pytest.fixture(scope="module")
def agreeing():
    return agreeing_model()


def _tensors(cache, decoded=False):
    """Everything of the cache a later step reads (the stores as stored, or `decoded` to floats): the positions,
    window rings, compressor states, and per row the compressed entries and indexer keys of its complete groups.
    (Rows past those are never read unmasked: a rollback leaves there what rejected tokens wrote, as a reset
    leaves an earlier sequence's rows, and the scratch row takes masked-out writes.)"""
    out = [cache.positions]
    lengths = cache.lengths()
    for layer in cache.layers:
        for s in layer.stores():
            if s is layer.window_rows:
                out.append(s.read(s.rows) if decoded else s.buf)
                continue
            for b, n in enumerate(lengths):
                rows = s.buf[b:b + 1, :n // layer.ratio]
                out.append(s._decode(rows) if decoded else rows)
        out += [t for st in layer.states() for t in (st.kv, st.score)]
    return out


def _prefill(model, lengths, seed=0, **dtypes):
    g = torch.Generator().manual_seed(seed)
    cache = model.new_cache(len(lengths), 128, **dtypes)
    prompts = [torch.randint(0, TINY.vocab_size, (1, n), generator=g) for n in lengths]
    for r, p in enumerate(prompts):
        model(p, cache=cache.select(r))
    return cache


# prompt lengths around the window (32) and group boundaries (4, 16): a 5-token step crosses them
LENGTHS = [27, 30, 31, 33, 46, 47]


@pytest.mark.parametrize("fixed", [False, True], ids=["reached-rows", "fixed-shapes"])
@pytest.mark.parametrize("dtypes", [{}, {"kv_dtype": "fp8", "index_dtype": "fp4"}], ids=["fp32", "fp8-fp4"])
@torch.no_grad()
def test_rollback_to_nothing_is_bitwise(model, dtypes, fixed):
    """Whatever the stored format (float rows or FP8 / FP4 byte records), rejecting every token of a step puts
    back every byte a later step reads, and the next step's logits are bitwise those of a cache that never took
    the step."""
    cache, untouched = _prefill(model, LENGTHS, **dtypes), _prefill(model, LENGTHS, **dtypes)
    cache.set_fixed_shapes(fixed)         # (fixed: every stored row read, masked by position, as a CUDA graph does)
    untouched.set_fixed_shapes(fixed)
    before = [t.clone() for t in _tensors(cache)]
    ring, state = cache.layers[0].window_rows.buf.clone(), cache.layers[1].compressor_state.kv.clone()
    ckpt = cache.checkpoint(5)
    model(torch.randint(0, TINY.vocab_size, (len(LENGTHS), 5)), cache=cache)
    assert not torch.equal(ring, cache.layers[0].window_rows.buf)             # the step wrote both
    assert not torch.equal(state, cache.layers[1].compressor_state.kv)
    cache.rollback(ckpt, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, _tensors(cache)))
    assert cache.lengths() == LENGTHS
    nxt = torch.randint(0, TINY.vocab_size, (len(LENGTHS), 3))
    assert torch.equal(model(nxt, cache=cache), model(nxt, cache=untouched))


@pytest.mark.parametrize("keep,dtypes", [([0, 1, 2, 3, 4, 5], {}), ([5, 4, 3, 2, 1, 0], {}),
                                         ([3, 5, 1, 4, 2, 2], {}),
                                         ([2, 3, 4, 5, 0, 1], {"kv_dtype": "fp8", "index_dtype": "fp4"})])
@torch.no_grad()
def test_rollback_equals_plain_decode(model, keep, dtypes):
    """Verify 5 tokens, keep keep[b] of them: every cache tensor and the next logits match decoding only those
    one by one. Within fp32 rounding, not bitwise: the kept tokens were computed in a 5-token step (other matmul
    shapes, the chunk attention path) where plain decoding uses 1-token steps."""
    g = torch.Generator().manual_seed(7)
    new = torch.randint(0, TINY.vocab_size, (len(LENGTHS), 5), generator=g)
    spec, plain = _prefill(model, LENGTHS, **dtypes), _prefill(model, LENGTHS, **dtypes)
    ckpt = spec.checkpoint(5)
    model(new, cache=spec)
    spec.rollback(ckpt, keep)
    for r, k in enumerate(keep):
        for i in range(k):
            model(new[r:r + 1, i:i + 1], cache=plain.select(r))
    assert spec.lengths() == plain.lengths() == [n + k for n, k in zip(LENGTHS, keep)]
    nxt = torch.randint(0, TINY.vocab_size, (len(LENGTHS), 2), generator=g)
    if not dtypes:
        for a, b in zip(_tensors(spec), _tensors(plain)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(nxt, cache=spec), model(nxt, cache=plain), rtol=1e-4, atol=1e-4)
        return
    # FP8 / FP4 records: a value that fp32 rounding moves across a quantisation step stores the neighbouring code
    # (at most 1/8 of the value for FP8's 3 mantissa bits), and that step reaches the later layers' inputs, so
    # compare the decoded rows within one step
    for a, b in zip(_tensors(spec, decoded=True), _tensors(plain, decoded=True)):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.15, atol=0.02)
    torch.testing.assert_close(model(nxt, cache=spec), model(nxt, cache=plain), rtol=0.05, atol=0.05)


@torch.no_grad()
def test_rollback_across_several_steps_and_refusals(model):
    """A checkpoint may span several steps (the MTP drafts); rollback refuses counts the rows never appended."""
    spec, plain = _prefill(model, [30, 47]), _prefill(model, [30, 47])
    ckpt = spec.checkpoint(3)
    toks = torch.tensor([[5, 6, 7], [8, 9, 10]])
    for i in range(3):
        model(toks[:, i:i + 1], cache=spec)
    with pytest.raises(ValueError, match="keep"):
        spec.rollback(ckpt, [4, 0])
    spec.rollback(ckpt, [2, 1])
    model(toks[:1, :2], cache=plain.select(0))
    model(toks[1:, :1], cache=plain.select(1))
    for a, b in zip(_tensors(spec), _tensors(plain)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="window_size"):
        spec.checkpoint(TINY.window_size + 1)


def _speculative(model, prompt, n, cfg, seed=0, stops=(), n_draft=3):
    cache = model.new_cache(1, len(prompt) + n + 8)
    dec = SpeculativeDecoder(model, cache, n_draft=n_draft)
    dec.prefill(0, prompt)
    gen = torch.Generator().manual_seed(seed)
    out = []
    while True:
        res = dec.step_row(0, cfg, gen, stops, n - len(out))
        assert res.logits.shape == (len(res.tokens), model.config.vocab_size)
        if cfg.temperature == 0:   # each token's logits are the ones it was chosen from
            assert res.logits.argmax(-1).tolist() == res.tokens
        out += res.tokens
        assert len(out) <= n
        if res.finished:
            return out, dec


GREEDY = SamplingConfig(temperature=0.0)


@pytest.mark.parametrize("which", ["model", "agreeing"])
def test_greedy_equals_plain(which, request):
    """From a 20-token prompt 40 tokens cross the window wrap (32) and groups of 4 and 16."""
    m = request.getfixturevalue(which)
    prompt = list(range(100, 120))
    plain = dsv4.generate(m, [prompt], 40)[0]
    spec, dec = _speculative(m, prompt, 40, GREEDY)
    assert spec == plain
    rate = dec.stats["accepted"] / dec.stats["drafted"]
    print(f"{which}: acceptance {rate:.2f} over {dec.stats['steps']} steps")
    if which == "agreeing":
        assert rate > 0.6 and dec.stats["steps"] < 20
    assert dec.cache.lengths() == [len(prompt) + 40 - 1]   # the final token is not fed, as in plain decoding


def test_interleaved_rows_equal_alone(agreeing):
    """Rows of one cache stepped in turn, as an engine does, each give their own greedy output; a row restarted
    by prefill forgets its old state."""
    prompts = [list(range(100, 120)), list(range(7, 12)), [42] * 33]
    plain = [dsv4.generate(agreeing, [p], 16)[0] for p in prompts]
    dec = SpeculativeDecoder(agreeing, agreeing.new_cache(3, 80), n_draft=2)
    dec.prefill(0, list(range(500, 540)))
    dec.step_row(0, GREEDY)
    outs = [[] for _ in prompts]
    for r, p in enumerate(prompts):
        dec.prefill(r, p)
    while any(len(o) < 16 for o in outs):
        for r, o in enumerate(outs):
            if len(o) < 16:
                o += dec.step_row(r, GREEDY, budget=16 - len(o)).tokens
    assert outs == plain


def test_batched_rows_equal_alone(agreeing):
    """step_rows over a slice: rows accept different counts each step, have their own budgets and stops, and
    finish at different steps (then ride along with budget 0, untouched, as does a row never prefilled); each
    equals its plain greedy output."""
    prompts = [list(range(100, 120)), list(range(7, 12)), [42] * 33]
    budgets = [18, 11, 18]
    plain = [dsv4.generate(agreeing, [p], n)[0] for p, n in zip(prompts, budgets)]
    stops = [(), (), (plain[2][6],)]
    want = [plain[0], plain[1], plain[2][:plain[2].index(stops[2][0]) + 1]]
    dec = SpeculativeDecoder(agreeing, agreeing.new_cache(4, 80), n_draft=3)
    for r, p in enumerate(prompts):
        dec.prefill(r, p)
    outs, done = [[] for _ in prompts], [False] * 3
    while not all(done):
        left = [0 if d else n - len(o) for n, o, d in zip(budgets, outs, done)] + [0]
        res = dec.step_rows(slice(0, 4), [GREEDY] * 4, [None] * 4, stops + [()], left)
        assert res[3].tokens == []
        for r, x in enumerate(res[:3]):
            outs[r] += x.tokens
            if x.finished:
                done[r] = True
    assert outs == want
    assert dec.cache.lengths() == [len(p) + len(o) - 1 for p, o in zip(prompts, outs)] + [0]
    assert dec.stats["accepted"] > dec.stats["steps"]


def test_bad_arguments_are_refused(model):
    with pytest.raises(InvalidArgument, match="n_draft"):
        SpeculativeDecoder(model, model.new_cache(1, 64), n_draft=TINY.window_size)
    no_mtp = dsv4.Transformer(TINY.replace(n_mtp_layers=0, compress_ratios=TINY.compress_ratios[:4]))
    with pytest.raises(InvalidArgument, match="n_mtp_layers"):
        SpeculativeDecoder(no_mtp, no_mtp.new_cache(1, 64))
    dec = SpeculativeDecoder(model, model.new_cache(1, 64))
    with pytest.raises(InvalidArgument, match="prefill"):
        dec.step_row(0, GREEDY)


def test_drafted_stop_is_never_passed(agreeing):
    prompt = list(range(300, 310))
    plain = dsv4.generate(agreeing, [prompt], 30)[0]
    stop = plain[9]
    spec, _ = _speculative(agreeing, prompt, 30, GREEDY, stops=(stop,))
    assert spec == plain[:plain.index(stop) + 1]


def test_accept_rule_keeps_the_target_distribution():
    """Context-free target p_i and draft q_i over 5 tokens: the first emitted token is distributed as p_0, the
    second (when the first was an accepted draft) as p_1, whatever q. The two usual mistakes, accepting every
    draft (tokens ~ q) or drawing the correction from p instead of the residual, are each farther from p_0 than
    three times the bound."""
    g = torch.Generator().manual_seed(0)
    first = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    target = torch.cat((first.log()[None], torch.randn(2, 5, generator=g)))
    draft = torch.cat((first.flip(0).log()[None], torch.randn(1, 5, generator=g)))
    cfg = SamplingConfig(temperature=1.0)
    p, q = target.softmax(-1), draft.softmax(-1)
    n, bound = 4000, 0.045
    firsts, seconds = torch.zeros(5), torch.zeros(5)
    for _ in range(n):
        d = torch.multinomial(q, 1, generator=g)[:, 0].tolist()
        a, y = accept_drafts(target, draft, d, cfg, g)
        out = d[:a] + [y]
        firsts[out[0]] += 1
        if a >= 1:
            seconds[out[1]] += 1

    def tv(x, ref):
        return 0.5 * float((x / x.sum() - ref).abs().sum())
    assert tv(firsts, p[0]) < bound, (firsts / n, p[0])
    assert tv(seconds, p[1]) < 1.5 * bound, (seconds / seconds.sum(), p[1])
    kept = torch.minimum(p[0], q[0])
    assert tv(q[0], p[0]) > 3 * bound
    assert tv(kept + (1 - kept.sum()) * p[0], p[0]) > 3 * bound


def test_sampled_speculative_matches_plain_sampling():
    """End to end on a 6-token vocabulary (a one-layer model, random MTP block: many rejections): the marginals
    of the 2nd and 3rd generated tokens of speculative sampling (2 drafts, so both come from drafts, corrections
    or bonus tokens) against their exact distribution under plain sampling, computed by enumeration. Few samples
    (CPU time), but enough for the wiring (which p and q meet which draft): the right rule lands near 0.02 in
    total variation, accepting every draft or pairing each draft with the next position's p near 0.45; the
    rule's finer mistakes are the test above's."""
    cfg_m = TINY.replace(vocab_size=6, n_layers=1, compress_ratios=(4, 0), dim=32, n_heads=2, q_lora_rank=32,
                         o_lora_rank=32, o_groups=1, moe_inter_dim=32, n_routed_experts=4, n_hash_layers=0,
                         bos_token_id=0, eos_token_id=1)
    m = dsv4.Transformer(cfg_m).init_weights(seed=5).eval()
    with torch.no_grad():
        m.head.weight.mul_(20)   # context-dependent distributions far from uniform (random init is near uniform)
    prompt = [2, 3, 4, 5, 2]
    second, third = torch.zeros(6), torch.zeros(6)
    with torch.no_grad():
        p1 = m(torch.tensor([prompt]))[0, -1].softmax(-1)
        for a in range(6):
            p2 = m(torch.tensor([prompt + [a]]))[0, -1].softmax(-1)
            second += p1[a] * p2
            for b in range(6):
                third += p1[a] * p2[b] * m(torch.tensor([prompt + [a, b]]))[0, -1].softmax(-1)
    n = 120
    cache = m.new_cache(1, 16)
    dec = SpeculativeDecoder(m, cache, n_draft=2)
    emp2, emp3 = torch.zeros(6), torch.zeros(6)
    for seed in range(n):
        dec.prefill(0, prompt)
        gen, out = torch.Generator().manual_seed(seed), []
        while len(out) < 3:
            out += dec.step([0], SamplingConfig(temperature=1.0), gen, (), [3 - len(out)])[0].tokens
        emp2[out[1]] += 1
        emp3[out[2]] += 1
    assert dec.stats["accepted"] < dec.stats["drafted"]
    for emp, ref in ((emp2, second), (emp3, third)):
        assert 0.5 * float((emp / n - ref).abs().sum()) < 0.2, (emp / n, ref)
