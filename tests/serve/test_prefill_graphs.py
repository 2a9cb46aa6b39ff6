"""Short prompt chunks as padded steps (dsv4.serve.prefill_graphs; on a CPU the eager step a GPU captures): a chunk
of n tokens run as a step of the next bucket, its padding rolled back, leaves the row at position + n with the
state and logits of an n-token forward (up to rounding: other shapes), touches no other row, and in the engine a
hit's suffix equals the same chunk of a cold prompt, bit for bit (both take the padded step)."""
from __future__ import annotations

import pytest
import torch

from dsv4 import ModelConfig
from dsv4.cache.row_state import row_state
from dsv4.model import Transformer
from dsv4.serve.engine import Engine
from dsv4.serve.prefill_graphs import PrefillGraphs
from dsv4.serve.prefix_cache import PrefixCache
from dsv4.serve.types import SamplingParams
from conftest import assert_rel_close, random_prompts


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.preset("tiny")).init_weights(seed=0).eval()


def _state(cache, n):
    return {k: v.clone() for k, v in row_state(cache, n).items()}


@pytest.mark.parametrize("start, n, formats", [(0, 5, ()), (37, 13, ()), (64, 32, ()), (101, 1, ()),
                                               (45, 11, ("fp8", "fp4"))])
def test_a_padded_chunk_equals_the_plain_forward_up_to_rounding(model, start, n, formats):
    ids = torch.tensor(random_prompts(model, [start + n + 24], 1)[0])
    plain, padded = model.new_cache(1, 256, *formats), model.new_cache(2, 256, *formats)
    with torch.no_grad():
        if start:
            model(ids[None, :start], cache=plain)
            model(ids[None, :start].expand(2, -1).contiguous(), cache=padded)
        other = _state(padded.select(0), start)
        want = model(ids[None, start:start + n], cache=plain, last_only=True)[:, -1]
        graphs = PrefillGraphs(model, padded, 32)
        got = graphs.run(1, ids[start:start + n].numpy())
        assert padded.lengths() == [start, start + n] and graphs.counters["chunks"] == 1
        assert_rel_close("logits", got, want, 1e-5)
        for k, v in _state(padded.select(1), start + n).items():   # the row continues as the plain one
            w = row_state(plain, start + n)[k]
            assert v.shape == w.shape and torch.equal(v.isinf(), w.isinf())
            if v.numel():
                assert_rel_close(k, v.nan_to_num(0, 0, 0), w.nan_to_num(0, 0, 0), 1e-5)
        assert all(torch.equal(v, other[k]) for k, v in _state(padded.select(0), start).items())   # untouched
        assert_rel_close("continued", model(ids[None, start + n:], cache=padded.select(1)),
                         model(ids[None, start + n:], cache=plain), 1e-5)


def test_chunks_beyond_the_buckets_or_the_room_are_not_taken(model):
    graphs = PrefillGraphs(model, model.new_cache(1, 40), 64)   # tiny's window is 32: buckets 16, 32
    assert graphs.max_tokens == 32 and graphs.bucket(33) is None and graphs.bucket(17) == 32
    assert graphs.takes(0, 8) and not graphs.takes(0, 33)
    with torch.no_grad():
        model(torch.tensor([[1] * 30]), cache=graphs.cache)
    assert not graphs.takes(0, 5)   # 30 + 16 > 40: the padding would not fit


@pytest.mark.parametrize("overlap", [False, True])
def test_hits_equal_cold_requests_through_padded_chunks(model, overlap):
    """Events of hits and whole-prompt hits equal those of the same prompts on an engine with an empty prefix
    cache, bit for bit; the short chunks (a hit's suffix, a cold prompt's last chunk) took the padded step."""
    base = random_prompts(model, [40], 6)[0]
    tails = random_prompts(model, [5, 9, 20], 7)
    reqs = [base + tails[0], base + tails[1], base + tails[1], base + tails[2], base]

    def engine():
        pc = PrefixCache(model, 1 << 26, 0, block=16, verify_model=False)
        return Engine(model, max_seq_len=128, prefill_chunk=32, overlap=overlap, prefix_cache=pc, prefill_graphs=32,
                      batch_invariant=False)
    warm = engine()
    for p in reqs:
        params = SamplingParams(max_tokens=3, temperature=0.8, seed=11, logprobs=2)
        cold = engine()
        got, want = warm.submit(p, params), cold.submit(p, params)
        warm.run_until_idle()
        cold.run_until_idle()
        assert [(e.token, e.logprob, e.top_logprobs, e.finish_reason) for e in got._events] == \
            [(e.token, e.logprob, e.top_logprobs, e.finish_reason) for e in want._events]
        assert cold.prefill_graphs.counters["chunks"] >= 1
    assert warm.stats()["prefix_hit_tokens"] == 32 + 49 + 32 + 32   # (blocks of 16; the repeat whole)
    # every chunk here fits a bucket: the first prompt's 16 + 16 + 13, the hits' suffixes 16 + 1, 16 + 12 and 8
    assert warm.prefill_graphs.counters["chunks"] == 8
