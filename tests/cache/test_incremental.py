"""Incremental decoding with the cache equals the full forward, for any chunking, ragged batches and long
multi-turn extension (fp32, relative max logit error <= 1e-5).

The tiny preset has a 32-token window, CSA ratio 4 (index top-k 8) and HCA ratio 16, so about 70 tokens cross
every boundary kind: the window ring wraps (at 32 and 64), CSA and HCA groups complete (every 4 / 16 tokens), the
indexer selects among more entries than its top-k (after 36 tokens), and chunks or decode steps start and end
inside groups. The default run keeps that; the same tests over hundreds of tokens are marked `slow`
(`python -m pytest -m slow`)."""
import pytest
import torch

import dsv4
from conftest import assert_rel_close

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    cfg = dsv4.ModelConfig.preset("tiny")  # window 32, CSA ratio 4, HCA ratio 16: 300 tokens = 75 / 18 groups
    return dsv4.Transformer(cfg).init_weights(seed=1).eval()


def _tokens(n, b=2, seed=0):
    return torch.randint(0, 2048, (b, n), generator=torch.Generator().manual_seed(seed))


def _run_chunks(model, tokens, chunks, cache):
    out, p = [], 0
    for c in chunks:
        out.append(model(tokens[:, p:p + c], cache=cache))
        p += c
    return torch.cat(out, 1)


CHUNKINGS = {
    "one-shot": [300], "3x100": [3] * 100, "4x75": [4] * 75,
    "127-128-45": [127, 128, 45], "129-171": [129, 171], "500-cut": [300],
    "mixed": [5, 1, 17, 64, 1, 1, 2, 100, 9, 100],
    # token by token from position 0: 70 steps cross every boundary kind (module docstring), 300 many times each
    "1x70": [1] * 70, "1x300": [1] * 300,
}
SLOW = {"1x300"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in sorted(CHUNKINGS)])
def test_any_chunking_equals_full_forward(model, name):
    tokens = _tokens(sum(CHUNKINGS[name]))
    with torch.no_grad():
        full = model(tokens)
        inc = _run_chunks(model, tokens, CHUNKINGS[name], model.new_cache(2, 512))
    assert_rel_close(f"chunking {name}", inc, full, TOL)


def test_ragged_rows_prefilled_apart_then_decoded_together(model):
    lens, steps = [37, 150, 5], 40
    seqs = [_tokens(L + steps, b=1, seed=i) for i, L in enumerate(lens)]
    with torch.no_grad():
        cache = model.new_cache(3, 256)
        for r, (t, L) in enumerate(zip(seqs, lens)):
            model(t[:, :L], cache=cache.select(r))
        assert cache.lengths() == lens
        outs = []
        for s in range(steps):
            outs.append(model(torch.cat([t[:, L + s:L + s + 1] for t, L in zip(seqs, lens)]), cache=cache))
        inc = torch.cat(outs, 1)
        for r, (t, L) in enumerate(zip(seqs, lens)):
            assert_rel_close(f"row {r}", inc[r:r + 1], model(t)[:, L:], TOL)


TURNS = {
    # every turn after the first starts inside a CSA and an HCA group (turns start at 0, 37, 66, 89, 110, 123;
    # the last ends at 141), each decode turn wraps the window ring and completes an HCA group, and the third
    # prefill completes one inside its chunk
    "short": [("prefill", 37), ("decode", 29), ("prefill", 23), ("decode", 21), ("prefill", 13), ("decode", 18)],
    "long": [("prefill", 150), ("decode", 120), ("prefill", 77), ("decode", 130), ("prefill", 33), ("decode", 90)],
}


@pytest.mark.parametrize("name", ["short", pytest.param("long", marks=pytest.mark.slow)])
def test_long_multi_turn_extension_does_not_drift(model, name):
    """Prompt, many decode steps, a new user turn (chunked prefill on top of the cache), more decode: the
    logits of the last turn still equal a cold full forward over the whole conversation."""
    turns = TURNS[name]
    last = turns[-1][1]
    total = sum(n for _, n in turns)
    tokens = _tokens(total, b=1, seed=3)
    with torch.no_grad():
        full = model(tokens)
        cache, outs, p = model.new_cache(1, 1024), [], 0
        for kind, n in turns:
            if kind == "prefill":
                outs.append(model(tokens[:, p:p + n], cache=cache))
            else:
                outs.extend(model(tokens[:, i:i + 1], cache=cache) for i in range(p, p + n))
            p += n
    inc = torch.cat(outs, 1)
    assert_rel_close("whole conversation", inc, full, TOL)
    assert_rel_close("last turn", inc[:, -last:], full[:, -last:], TOL)


def test_reset_starts_a_new_sequence(model):
    tokens = _tokens(60, b=1)
    with torch.no_grad():
        cache = model.new_cache(1, 128)
        model(_tokens(70, b=1, seed=9), cache=cache)
        cache.reset()
        assert_rel_close("after reset", model(tokens, cache=cache), model(tokens), TOL)


@pytest.mark.parametrize("chunks", [pytest.param([37] + [1] * 30, id="37+1x30"),
                                    pytest.param([50] + [1] * 70, id="50+1x70", marks=pytest.mark.slow)])
def test_quantised_storage_is_lossless_under_quant_sim(model, chunks):
    """With the QAT simulation on, FP8 KV records (584-B layout) and FP4 indexer keys hold exactly the
    values the model computed: results equal a cache storing the same rows in bf16. The prefill ends inside a
    CSA and an HCA group; the decode steps wrap the window ring, complete CSA and HCA groups, and the indexer
    picks its top 8 of up to 16 FP4 keys."""
    tokens = _tokens(sum(chunks), b=1, seed=4)
    model.set_quant_sim(True)
    try:
        with torch.no_grad():
            ref = _run_chunks(model, tokens, chunks, model.new_cache(1, 128, "bf16", "bf16"))
            q = _run_chunks(model, tokens, chunks, model.new_cache(1, 128, "fp8", "fp4"))
            exact = _run_chunks(model, tokens, chunks, model.new_cache(1, 128, "auto", "fp4"))
            full = model(tokens)
    finally:
        model.set_quant_sim(False)
    assert torch.equal(q, ref)
    # Rounding to FP8/FP4 turns last-ulp differences between chunked and whole-sequence matmuls into
    # occasional one-step differences of a quantised value, so only approximate equality holds here.
    assert_rel_close("fp4 keys, fp32 kv", exact, full, 5e-3)


def test_cache_errors(model):
    cache = model.new_cache(2, 16)
    with pytest.raises(ValueError, match="batch 1"):
        model(_tokens(4, b=1), cache=cache)
    model(_tokens(10), cache=cache)
    with pytest.raises(ValueError, match="cache full"):
        model(_tokens(7), cache=cache)
    with pytest.raises(ValueError, match="fp4"):
        model.new_cache(1, 16, kv_dtype="fp4")


def test_fixed_shape_decode_equals_dynamic(model):
    """Fixed-shape mode (what CUDA-graph decoding captures: every stored row read, masked by position)
    gives the same logits as reading only the rows reached so far, for ragged rows and a long decode."""
    tokens = _tokens(90, b=2, seed=7)
    outs = []
    with torch.no_grad():
        for fixed in (False, True):
            cache = model.new_cache(2, 128).set_fixed_shapes(fixed)
            model(tokens[:1, :37], cache=cache.select(0))
            model(tokens[1:, :50], cache=cache.select(1))  # rows at different positions
            outs.append(torch.cat([model(tokens[:, i:i + 1], cache=cache) for i in range(50, 90)], 1))
    assert_rel_close("fixed vs dynamic shapes", outs[1], outs[0], TOL)


def test_broadcast_row_continues_like_the_source(model):
    """A prompt prefilled in one row and broadcast to all rows decodes in each row as in the source row."""
    tokens = _tokens(60, b=1, seed=3)
    nxt = _tokens(5, b=3, seed=4)
    with torch.no_grad():
        cache = model.new_cache(3, 80)
        model(tokens, cache=cache.select(1))
        cache.broadcast_row(1)
        assert cache.lengths() == [60] * 3 and cache.positions.tolist() == [60] * 3
        got = model(nxt, cache=cache)
        for r in range(3):
            alone = model.new_cache(1, 80)
            model(tokens, cache=alone)
            assert_rel_close(f"row {r}", got[r:r + 1], model(nxt[r:r + 1], cache=alone), TOL)
