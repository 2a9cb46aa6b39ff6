"""Incremental decoding with the cache equals the full forward, for any chunking, ragged batches and long
multi-turn extension (fp32, relative max logit error <= 1e-5)."""
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
    "one-shot": [300], "1x300": [1] * 300, "3x100": [3] * 100, "4x75": [4] * 75,
    "127-128-45": [127, 128, 45], "129-171": [129, 171], "500-cut": [300],
    "mixed": [5, 1, 17, 64, 1, 1, 2, 100, 9, 100],
}


@pytest.mark.parametrize("name", sorted(CHUNKINGS))
def test_any_chunking_equals_full_forward(model, name):
    tokens = _tokens(300)
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


def test_long_multi_turn_extension_does_not_drift(model):
    """Prompt, hundreds of decode steps, a new user turn (chunked prefill on top of the cache), more decode:
    the logits of the last turn still equal a cold full forward over the whole conversation."""
    turns = [("prefill", 150), ("decode", 120), ("prefill", 77), ("decode", 130), ("prefill", 33), ("decode", 90)]
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
    assert_rel_close("last turn", inc[:, -90:], full[:, -90:], TOL)


def test_reset_starts_a_new_sequence(model):
    tokens = _tokens(60, b=1)
    with torch.no_grad():
        cache = model.new_cache(1, 128)
        model(_tokens(70, b=1, seed=9), cache=cache)
        cache.reset()
        assert_rel_close("after reset", model(tokens, cache=cache), model(tokens), TOL)


def test_quantised_storage_is_lossless_under_quant_sim(model):
    """With the QAT simulation on, FP8 KV records (584-B layout) and FP4 indexer keys hold exactly the
    values the model computed: results equal a cache storing the same rows in bf16."""
    tokens = _tokens(120, b=1, seed=4)
    model.set_quant_sim(True)
    try:
        with torch.no_grad():
            ref = _run_chunks(model, tokens, [50] + [1] * 70, model.new_cache(1, 128, "bf16", "bf16"))
            q = _run_chunks(model, tokens, [50] + [1] * 70, model.new_cache(1, 128, "fp8", "fp4"))
            exact = _run_chunks(model, tokens, [50] + [1] * 70, model.new_cache(1, 128, "auto", "fp4"))
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
