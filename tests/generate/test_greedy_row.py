"""A single greedy row's fused speculative step (dsv4.generate.greedy_row, n_draft 1 .. 3): the tokens of plain
greedy decoding, the main cache of plain decoding after every step (every acceptance count), the MTP cache and
drafts of the unfused step, stops and budgets kept (also inside a step's drafts), and rows moving between the fused
and the batched path."""
import pytest
import torch

import dsv4
from conftest import agreeing_model, read_tensors
from dsv4.generate import SamplingConfig
from dsv4.generate import speculative
from dsv4.generate.speculative import SpeculativeDecoder

GREEDY = SamplingConfig(temperature=0.0)
TINY = dsv4.ModelConfig.preset("tiny")   # window 32, ratios (0, 4, 16, 4 | MTP 0)


@pytest.fixture(scope="module")
def agreeing():
    return agreeing_model()


def _run(model, prompt, n, fuse_row=True, stops=(), n_draft=1):
    """Speculative greedy decoding of one row up to n tokens: per step (tokens, accepted), the decoder."""
    dec = SpeculativeDecoder(model, model.new_cache(1, len(prompt) + n + 8), n_draft=n_draft)
    dec.fuse_row = fuse_row
    dec.prefill(0, prompt)
    steps, total = [], 0
    while True:
        res = dec.step_row(0, GREEDY, None, stops, n - total)
        assert res.logits.argmax(-1).tolist() == res.tokens and res.finite
        steps.append((res.tokens, res.accepted, res.drafted))
        total += len(res.tokens)
        if res.finished:
            return steps, dec


@pytest.mark.parametrize("n_draft", [1, 2, 3])
@torch.no_grad()
def test_fused_row_equals_plain_decoding_step_by_step(agreeing, n_draft):
    """40 tokens from a 27-token prompt (past the window wrap at 32 and groups of 4 and 16), with every acceptance
    count 0 .. n_draft: every step takes the fused path (`greedy_draft_verify` runs), after every step the main
    cache equals plain decoding's of the same tokens (fp32 rounding: the verify runs n_draft + 1 token steps) and
    the MTP cache holds the pairs t < P - n_draft - 1, the tokens are plain decoding's, and the steps accept what
    the unfused step accepts (the same drafts: the MTP cache holds the same pairs)."""
    n, prompt = 40, list(range(10, 37))
    plain_tokens = dsv4.generate(agreeing, [prompt], n)[0]
    dec = SpeculativeDecoder(agreeing, agreeing.new_cache(1, 80), n_draft=n_draft)
    plain = agreeing.new_cache(1, 80)
    agreeing(torch.tensor([prompt]), cache=plain)
    dec.prefill(0, prompt)
    calls = []
    real = speculative.greedy_draft_verify
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speculative, "greedy_draft_verify", lambda *a: calls.append(1) or real(*a))
        out, accepted = [], []
        while len(out) < n:
            before = len(calls)
            res = dec.step_row(0, GREEDY, budget=n - len(out))
            assert len(calls) == before + 1                         # every step took the fused path
            out += res.tokens
            accepted.append(res.accepted)
            fed = out if not res.finished else out[:-1]             # (a finished row's last token is not fed)
            while plain.lengths()[0] < len(prompt) + len(fed):
                agreeing(torch.tensor([[fed[plain.lengths()[0] - len(prompt)]]]), cache=plain)
            assert dec.cache.lengths() == plain.lengths()
            if not res.finished:
                assert dec.mtp_cache.lengths() == [plain.lengths()[0] - n_draft - 1]
            for a, b in zip(read_tensors(dec.cache), read_tensors(plain)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert out == plain_tokens
    assert set(range(n_draft + 1)) <= set(accepted)             # every acceptance count met
    unfused, ref = _run(agreeing, prompt, n, fuse_row=False, n_draft=n_draft)
    assert [a for _, a, _ in unfused] == accepted
    # the MTP caches agree on every pair both hold (the fused one holds t < P - k - 1, the unfused t < P - 1 - a)
    lengths = (dec.mtp_cache.lengths()[0], ref.mtp_cache.lengths()[0])
    W, n = TINY.window_size, min(lengths)
    slots = [p % W for p in range(max(0, max(lengths) - W), n)]   # (the longer one's ring holds n .. too)
    for mine, theirs in zip(dec.mtp_cache.layers, ref.mtp_cache.layers):
        torch.testing.assert_close(mine.window_rows.buf[:, slots], theirs.window_rows.buf[:, slots],
                                   rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("n_draft", [1, 2, 3])
def test_fused_row_keeps_stops_and_budgets(agreeing, n_draft):
    """A stop token met as an accepted draft (drafting stops after it), as the step's own first token (no draft:
    the row stops with it), or a budget ending inside a step's drafts: the output ends where plain decoding's
    does, and every step drafts and accepts what the batched step does (its drafting rule)."""
    prompt = list(range(7, 30))
    plain = dsv4.generate(agreeing, [prompt], 24)[0]
    cut = 0
    for stop_at in (4, 9, 15):
        stop = plain[stop_at]
        want = plain[:plain.index(stop) + 1]
        steps, dec = _run(agreeing, prompt, 24, stops=(stop, 99999), n_draft=n_draft)
        assert [t for toks, _, _ in steps for t in toks] == want
        assert dec.rows[0].fused is not None
        assert steps == _run(agreeing, prompt, 24, stops=(stop, 99999), n_draft=n_draft, fuse_row=False)[0]
        toks, a, drafted = steps[-1]
        cut += 0 < a == drafted < n_draft                       # the stop accepted as a draft before the k-th
    assert cut or n_draft == 1
    for budget in (1, 2, 3, 7, 8):
        steps, dec = _run(agreeing, prompt, budget, n_draft=n_draft)
        assert [t for toks, _, _ in steps for t in toks] == plain[:budget]
        assert dec.cache.lengths() == [len(prompt) + budget - 1]
        assert steps == _run(agreeing, prompt, budget, n_draft=n_draft, fuse_row=False)[0]


@pytest.fixture(scope="module")
def rejecting():
    return dsv4.Transformer(TINY).init_weights(seed=3).eval()   # (random weights: every draft rejected)


@pytest.mark.parametrize("which,n_draft", [("agreeing", 1), ("rejecting", 1), ("agreeing", 3), ("rejecting", 3)])
@torch.no_grad()
def test_rows_move_between_the_fused_and_the_batched_path(which, n_draft, request):
    """Two rows stepped together (the batched path) and alone (the fused path) in turn, so each enters the fused
    form from the states the batched step leaves (a drafts accepted: a + 1 lanes pending, and the MTP cache
    rewound over its last n_draft - a pairs) and leaves it again: each row's output is its plain greedy output,
    and every step of a row alone takes the fused path."""
    model = request.getfixturevalue(which)
    prompts = [list(range(100, 120)), [42] * 33]
    n = 20
    plain = [dsv4.generate(model, [p], n)[0] for p in prompts]
    dec = SpeculativeDecoder(model, model.new_cache(2, 80), n_draft=n_draft)
    for r, p in enumerate(prompts):
        dec.prefill(r, p)
    outs, i, fused = [[], []], 0, 0
    while any(len(o) < n for o in outs):
        left = [n - len(o) for o in outs]
        if i % 3 == 0 and all(left):
            res = dec.step_rows(slice(0, 2), [GREEDY] * 2, [None] * 2, [(), ()], left)
            assert all(dec.rows[r].fused is None for r in range(2))
        else:
            r = i % 2 if left[i % 2] else 1 - i % 2
            res = [None, None]
            res[r] = dec.step_row(r, GREEDY, budget=left[r])
            assert dec.rows[r].fused is not None
            fused += 1
        for o, x in zip(outs, res):
            if x is not None:
                o += x.tokens
        i += 1
    assert outs == plain and fused >= 4


@torch.no_grad()
def test_rewind_then_append_equals_appending_alone():
    """KVCache.rewind on a window-only cache (past the ring's wrap): one token back, then a 2-token chunk from
    there, leaves the cache and gives the logits of that chunk appended alone, bit for bit; a cache with
    compressors refuses."""
    cfg = dsv4.ModelConfig.preset("tiny")
    cfg.compress_ratios = (0,) * len(cfg.compress_ratios)
    model = dsv4.Transformer(cfg).init_weights(seed=1).eval()
    prompt, chunk = torch.arange(3, 43)[None], torch.tensor([[5, 6]])
    a, b = model.new_cache(1, 64), model.new_cache(1, 64)
    model(prompt, cache=a)
    model(prompt, cache=b)
    model(torch.tensor([[9]]), cache=b)
    b.rewind()
    assert torch.equal(model(chunk, cache=a), model(chunk, cache=b))
    assert a.lengths() == b.lengths() == [42]
    for x, y in zip(read_tensors(a), read_tensors(b)):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="window rings alone"):
        agreeing_model().new_cache(1, 8).rewind()


@pytest.mark.parametrize("n_draft", [1, 3])
@pytest.mark.parametrize("fuse_row", [True, False])
@torch.no_grad()
def test_extend_after_decoding_continues_the_row(agreeing, fuse_row, n_draft):
    """More prompt tokens appended to a row that has decoded (a chat's next turn on the same row), whether its
    state is in the fused form or holds several pending lanes: decoding goes on as plain decoding of the whole
    sequence, drafts accepted."""
    prompt, turn = list(range(100, 120)), [7, 8, 9]
    dec = SpeculativeDecoder(agreeing, agreeing.new_cache(1, 96), n_draft=n_draft)
    dec.fuse_row = fuse_row
    dec.prefill(0, prompt)
    out = []
    while len(out) < 8 or (not fuse_row and dec.rows[0].pending_h.shape[1] < 2):
        out += dec.step_row(0, GREEDY).tokens
    assert (dec.rows[0].fused is not None) == fuse_row
    dec.extend(0, turn)
    again = []
    while len(again) < 10:
        again += dec.step_row(0, GREEDY, budget=10 - len(again)).tokens
    assert again == dsv4.generate(agreeing, [prompt + out + turn], 10)[0]
    assert dec.stats["accepted"] > 0


@pytest.mark.parametrize("which", ["agreeing", "rejecting"])
@torch.no_grad()
def test_a_resumed_row_enters_the_fused_form_once_it_has_the_lanes(which, request):
    """A row resumed from a prefix cache's tail (one lane pending, no MTP pair known before it) takes the batched
    step until its pending lanes and the pairs those steps made give the last n_draft + 1 lanes (with every draft
    rejected, after n_draft steps), then the fused one; its output is plain greedy decoding's."""
    model, k, n = request.getfixturevalue(which), 3, 16
    prompt = list(range(7, 30))
    dec = SpeculativeDecoder(model, model.new_cache(1, 64), n_draft=k)
    dec.prefill(0, prompt)
    tail = dec.tail(0)
    dec.begin(0)
    dec.resume(0, tail)
    out, fused, accepted = [], [], []
    while len(out) < n:
        res = dec.step_row(0, GREEDY, budget=n - len(out))
        out += res.tokens
        fused.append(dec.rows[0].fused is not None)
        accepted.append(res.accepted)
    assert out == dsv4.generate(model, [prompt], n)[0]
    assert fused[-1] and fused == sorted(fused)                 # batched steps, then fused ones only
    if which == "rejecting":
        assert set(accepted) == {0} and fused.index(True) == k
