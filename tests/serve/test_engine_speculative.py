"""The serving engine with MTP speculative decoding (CPU, tiny model with its MTP block): greedy output equals
plain decoding whatever else runs, seeded sampling repeats, stops and max_tokens bound what a row emits, and the
drafted / accepted counts reach stats()."""
from __future__ import annotations

import pytest
import torch

import dsv4
from conftest import agreeing_model
from dsv4.errors import InvalidArgument
from dsv4.generate.engine import generate
from dsv4.serve.engine import Engine
from dsv4.serve.types import SamplingParams

TINY = dsv4.ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def agreeing():
    """A model whose MTP block predicts what the main model will, so drafts are often accepted."""
    return agreeing_model()


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.vocab_size, (n,), generator=g).tolist() for n in lengths]


def run_staggered(engine, ps, params):
    """Submit the prompts one engine step apart (rows join while others decode) and run to the end."""
    handles = []
    for p in ps:
        handles.append(engine.submit(p, params))
        engine.step()
    engine.run_until_idle()
    return [list(h) for h in handles]


def toks(events):
    return [e.token for e in events if e.token is not None]


LENGTHS = [5, 23, 2, 37]


@pytest.mark.parametrize("n_draft", [1, 2, 3])   # (a row stepped alone: the fused step, generate.greedy_row)
def test_greedy_speculative_equals_plain_engine_and_generate(agreeing, n_draft):
    ps = prompts(LENGTHS)
    params = SamplingParams(max_tokens=9, temperature=0)
    spec = Engine(agreeing, max_batch=3, max_seq_len=64, prefill_chunk=8, speculative="mtp", n_draft=n_draft)
    plain = Engine(agreeing, max_batch=3, max_seq_len=64, prefill_chunk=8)
    got, want = run_staggered(spec, ps, params), run_staggered(plain, ps, params)
    assert [toks(e) for e in got] == [toks(e) for e in want]
    assert [toks(e) for e in got] == [generate(agreeing, [p], 9, prefill_chunk=8)[0] for p in ps]
    assert all(e[-1].finish_reason == "length" and len(toks(e)) == 9 for e in got)
    stats = spec.stats()
    assert stats["spec_accepted"] > 0 and stats["spec_drafted"] >= stats["spec_accepted"]
    assert stats["decode_tokens"] == 9 * len(ps) and stats["running"] == 0
    assert plain.stats()["spec_drafted"] == 0


def test_draft_count_shrinks_at_the_end_of_the_context(agreeing):
    """A request filling max_seq_len exactly still decodes (the drafts shrink to fit) and equals plain decoding."""
    p = prompts([20], seed=2)[0]
    params = SamplingParams(max_tokens=12, temperature=0)
    spec = Engine(agreeing, max_batch=1, max_seq_len=32, speculative="mtp", n_draft=3)
    plain = Engine(agreeing, max_batch=1, max_seq_len=32)
    assert toks(run_staggered(spec, [p], params)[0]) == toks(run_staggered(plain, [p], params)[0])


def test_seeded_sampling_repeats_and_logprobs_come_with_every_token(agreeing):
    ps = prompts([6, 11], seed=3)
    params = SamplingParams(max_tokens=8, temperature=0.8, top_k=20, seed=7, logprobs=2)
    runs = [run_staggered(Engine(agreeing, max_batch=2, max_seq_len=48, speculative="mtp", n_draft=2), ps, params)
            for _ in range(2)]
    assert [[(e.token, e.logprob) for e in r] for r in runs[0]] == [[(e.token, e.logprob) for e in r] for r in runs[1]]
    for events in runs[0]:
        assert len(toks(events)) == 8
        assert all(e.logprob is not None and e.logprob <= 0 and len(e.top_logprobs) == 2 for e in events)


def test_stop_tokens_and_max_tokens_end_a_row_exactly(agreeing):
    """A stop token met inside an accepted run ends the request with it (nothing after it); max_tokens counts every
    accepted token."""
    p = prompts([9], seed=4)[0]
    free = toks(run_staggered(Engine(agreeing, max_batch=1, max_seq_len=48), [p],
                              SamplingParams(max_tokens=12, temperature=0))[0])
    stop_at = next(i for i in range(2, 12) if free[i] not in free[:i])   # the first occurrence is the stop
    for n_draft in (1, 3):
        engine = Engine(agreeing, max_batch=2, max_seq_len=48, speculative="mtp", n_draft=n_draft)
        stopped = run_staggered(engine, [p], SamplingParams(max_tokens=12, temperature=0,
                                                             stop_token_ids=(free[stop_at],)))[0]
        assert toks(stopped) == free[:stop_at + 1] and stopped[-1].finish_reason == "stop"
        eos = Engine(agreeing, max_batch=1, max_seq_len=48, speculative="mtp", n_draft=n_draft,
                     eos_token_ids=(free[stop_at],))
        assert toks(run_staggered(eos, [p], SamplingParams(max_tokens=12, temperature=0))[0]) == free[:stop_at + 1]
        for m in (1, 2, 5):
            short = run_staggered(engine, [p], SamplingParams(max_tokens=m, temperature=0))[0]
            assert toks(short) == free[:m] and short[-1].finish_reason == "length"
        assert engine.stats()["running"] == 0


def test_speculative_refuses_unknown_modes(agreeing):
    with pytest.raises(InvalidArgument, match="speculative"):
        Engine(agreeing, max_batch=1, max_seq_len=32, speculative="eagle")
    with pytest.raises(InvalidArgument, match="n_draft"):
        Engine(agreeing, max_batch=1, max_seq_len=32, speculative="mtp", n_draft=0)


def test_prefix_cache_hit_with_speculation_equals_the_cold_request(agreeing):
    """A second request sharing a cached prefix starts its MTP cache after the prefix (drafting from fewer pairs);
    its greedy tokens are still the cold request's, and drafts are still accepted."""
    from dsv4.serve.prefix_cache import PrefixCache

    shared = prompts([40], seed=5)[0]
    ps = [shared + [7, 8], shared + [9]]
    params = SamplingParams(max_tokens=8, temperature=0)
    pc = PrefixCache(agreeing, 1 << 26, 1 << 26, block=16)
    engine = Engine(agreeing, max_batch=2, max_seq_len=64, prefill_chunk=16, prefix_cache=pc, speculative="mtp",
                    n_draft=2)
    got = [run_staggered(engine, [p], params)[0] for p in ps]
    assert engine.stats()["prefix_hit_tokens"] >= 32
    accepted = engine.stats()["spec_accepted"]
    assert accepted > 0
    plain = Engine(agreeing, max_batch=1, max_seq_len=64, prefill_chunk=16)
    assert [toks(e) for e in got] == [toks(run_staggered(plain, [p], params)[0]) for p in ps]


@pytest.mark.parametrize("n_draft", [1, 2])
def test_a_whole_prompt_hit_with_speculation_runs_no_forward(agreeing, n_draft):
    """A prompt stored whole (its logits and last lanes along) starts decoding without a forward and picks its
    first token at its first step; extensions compute only their new tokens. Entries a plain engine saved have no
    lanes: the speculative engine falls back to the longest shorter prefix. Greedy tokens are the cold ones."""
    from dsv4.serve.prefix_cache import PrefixCache

    p = prompts([40], seed=7)[0]
    params = SamplingParams(max_tokens=8, temperature=0)
    plain = Engine(agreeing, max_batch=1, max_seq_len=64, prefill_chunk=16)
    want = {len(q): toks(run_staggered(plain, [q], params)[0]) for q in (p, p + [3], p + [3, 4, 5])}
    pc = PrefixCache(agreeing, 1 << 26, 1 << 26, block=16)
    engine = Engine(agreeing, max_batch=2, max_seq_len=64, prefill_chunk=16, prefix_cache=pc, speculative="mtp",
                    n_draft=n_draft)
    extended, real = [], engine.spec.extend
    engine.spec.extend = lambda row, tokens: extended.append(len(tokens)) or real(row, tokens)
    for q, cached, forwards in ((p, 0, [16, 16, 8]), (p, 40, []), (p + [3], 40, [1]), (p + [3, 4, 5], 41, [2])):
        extended.clear()
        h = engine.submit(q, params)
        engine.run_until_idle()
        assert (h.cached_tokens, extended, toks(list(h))) == (cached, forwards, want[len(q)])
    assert engine.stats()["prefix_hit_tokens"] == 40 + 40 + 41 and engine.stats()["spec_accepted"] > 0
    primed = PrefixCache(agreeing, 1 << 26, 1 << 26, block=16)
    run_staggered(Engine(agreeing, max_batch=1, max_seq_len=64, prefill_chunk=16, prefix_cache=primed), [p], params)
    engine = Engine(agreeing, max_batch=2, max_seq_len=64, prefill_chunk=16, prefix_cache=primed, speculative="mtp",
                    n_draft=2)
    h = engine.submit(p, params)
    engine.run_until_idle()
    assert h.cached_tokens == 32 and toks(list(h)) == want[40]


@pytest.mark.parametrize("n_draft", [1, 2])
def test_batched_views_with_free_rows_riding_along(agreeing, n_draft):
    """The GPU path's batching (one step_rows call per run of rows, free rows inside it with budget 0, rows
    accepting different counts) on the CPU: more requests than rows, so rows free up and are retaken mid-run."""
    ps = prompts([5, 23, 2, 37, 9, 14], seed=6)
    params = SamplingParams(max_tokens=7, temperature=0)
    spec = Engine(agreeing, max_batch=4, max_seq_len=64, prefill_chunk=8, speculative="mtp", n_draft=n_draft,
                  batch_invariant=False)
    plain = Engine(agreeing, max_batch=4, max_seq_len=64, prefill_chunk=8)
    assert [toks(e) for e in run_staggered(spec, ps, params)] == [toks(e) for e in run_staggered(plain, ps, params)]
    assert spec.stats()["spec_accepted"] > 0 and spec.stats()["running"] == 0
