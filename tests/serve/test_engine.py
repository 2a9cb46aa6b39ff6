"""The serving engine on the CPU with the tiny model: continuous batching gives every request the tokens it
gets alone, chunked prefill interleaves with decoding, and cancellations, bad input and failing forwards stay
confined to their request."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from dsv4 import ModelConfig
from dsv4.errors import InvalidArgument
from dsv4.generate.engine import generate
from dsv4.model import Transformer
from dsv4.serve.engine import Engine
from dsv4.serve.rows import Phase, decode_runs
from dsv4.serve.types import QueueFull, SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0)


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.preset("tiny")
    return Transformer(cfg).init_weights(seed=0).eval()


def prompts(model, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def tokens(handle):
    return [e.token for e in handle if e.token is not None]


def alone(model, prompt, params, **kw):
    engine = Engine(model, max_batch=1, max_seq_len=96, **kw)
    h = engine.submit(prompt, params)
    engine.run_until_idle()
    return list(h)


def test_32_concurrent_greedy_requests_each_equal_the_request_alone(model):
    ps = prompts(model, [1 + (7 * i) % 20 for i in range(32)])
    params = SamplingParams(max_tokens=3, temperature=0, logprobs=0)
    engine = Engine(model, max_batch=12, max_seq_len=96, prefill_chunk=8, step_token_budget=24)
    handles = []
    for i, p in enumerate(ps):          # arrivals spread over steps: rows are taken and given back meanwhile
        handles.append(engine.submit(p, params))
        if i % 3 == 2:
            engine.step()
    engine.run_until_idle()
    assert engine.stats()["running"] == 0 and engine.stats()["requests_finished"] == 32
    for i, (p, h) in enumerate(zip(ps, handles)):
        # bitwise: the logprobs too, which batched CPU matmuls would perturb in the last bits
        assert [(e.token, e.logprob) for e in h] == [(e.token, e.logprob) for e in alone(model, p, params,
                                                                                        prefill_chunk=8)]
        assert list(h)[-1].finish_reason == "length"
        if i % 8 == 0:
            assert tokens(h) == generate(model, [p], 3, prefill_chunk=8)[0]


def test_long_prompt_prefills_in_chunks_between_decode_steps(model):
    short, long = prompts(model, [4, 44])
    engine = Engine(model, max_batch=2, max_seq_len=96, prefill_chunk=8, step_token_budget=8)
    params = SamplingParams(max_tokens=12, temperature=0)
    h_short = engine.submit(short, params)
    engine.step()
    assert len(h_short._events) == 1            # the first token, from the prefill (a step decodes first)
    h_long = engine.submit(long, params)
    steps = 0
    while not h_long._events:
        before = len(h_short._events)
        engine.step()
        steps += 1
        assert len(h_short._events) == before + 1, "the running stream must get a token every step"
    assert steps == 6                           # 44 tokens, one chunk of 8 per step (budget 8 - 1 decode token)
    engine.run_until_idle()
    one_chunk = alone(model, long, params, prefill_chunk=64)
    assert tokens(h_long) == [e.token for e in one_chunk] == generate(model, [long], 12, prefill_chunk=8)[0]
    assert tokens(h_short) == generate(model, [short], 12)[0]


def test_a_queued_request_takes_a_row_only_in_a_step_that_runs_its_first_chunk(model):
    """Rows of requests whose chunk waits for a later step would sit in the prefill phase through that step's
    decode and keep it from replaying its CUDA graph: with prompts of one chunk, no row is ever left prefilling
    between steps, whatever the budget leaves over."""
    ps = prompts(model, [8] * 12 + [3, 5])
    engine = Engine(model, max_batch=6, max_seq_len=96, prefill_chunk=8, step_token_budget=20)
    params = SamplingParams(max_tokens=6, temperature=0)
    hs = [engine.submit(p, params) for p in ps]
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
        assert Phase.PREFILL not in engine.pool.phase, f"a row left prefilling after step {steps}"
    assert all(len(tokens(h)) == 6 for h in hs)
    assert [tokens(h) for h in hs[:2] + hs[-2:]] == [generate(model, [p], 6, prefill_chunk=8)[0]
                                                     for p in ps[:2] + ps[-2:]]


def test_sampled_requests_with_a_seed_are_reproducible_under_any_concurrency(model):
    p, *others = prompts(model, [9, 5, 17, 30, 12])
    params = SamplingParams(max_tokens=8, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    want = [e.token for e in alone(model, p, params)]
    engine = Engine(model, max_batch=4, max_seq_len=96)
    hs = [engine.submit(q, SamplingParams(max_tokens=8, temperature=1.0, seed=i)) for i, q in enumerate(others)]
    engine.step()
    h = engine.submit(p, params)
    engine.run_until_idle()
    assert tokens(h) == want
    assert [e.token for e in alone(model, p, SamplingParams(max_tokens=8, temperature=0.9, seed=99))] != want
    assert all(len(tokens(x)) == 8 for x in hs)


def test_cancelled_requests_free_their_rows_and_leave_clean_rows(model):
    ps = prompts(model, [6 + i for i in range(20)])
    engine = Engine(model, max_batch=4, max_seq_len=96, prefill_chunk=4, step_token_budget=8)
    params = SamplingParams(max_tokens=40, temperature=0)
    hs = [engine.submit(p, params) for p in ps]
    for _ in range(3):
        engine.step()
    for h in hs:
        h.cancel()
    engine.step()
    assert engine.stats()["running"] == 0 and engine.stats()["queue_len"] == 0
    assert all(list(h)[-1].finish_reason == "abort" for h in hs)
    assert engine.stats()["requests_cancelled"] == 20
    # the rows the cancelled requests held (and their compressor state) are reset when handed out again
    fresh = [engine.submit(p, GREEDY) for p in ps[:4]]
    engine.run_until_idle()
    assert [tokens(h) for h in fresh] == [generate(model, [p], 4)[0] for p in ps[:4]]


def test_bounded_queue_raises_queue_full(model):
    engine = Engine(model, max_batch=1, max_seq_len=32, max_queue=2)
    engine.submit([1, 2], GREEDY)
    engine.submit([1, 2], GREEDY)
    with pytest.raises(QueueFull):
        engine.submit([1, 2], GREEDY)
    engine.step()                               # one request takes the row: room in the queue again
    engine.submit([3], GREEDY)


@pytest.mark.parametrize("prompt, params, match", [
    ([], GREEDY, "empty"),
    ([1, 2048], GREEDY, r"prompt\[1\]=2048"),
    ([-1], GREEDY, r"prompt\[0\]=-1"),
    ([1.5], GREEDY, "integers"),
    ([3, True], GREEDY, r"prompt\[1\]=True"),
    ([1, 2**70], GREEDY, r"prompt\[1\]=1180591620717411303424"),
    (np.array([1.0, 2.0]), GREEDY, "integers"),
    (np.array([1, 2**64 - 1], dtype=np.uint64), GREEDY, r"prompt\[1\]=18446744073709551615"),
    ("hello", GREEDY, "list of token ids"),
    (list(range(30)), SamplingParams(max_tokens=3), "max_seq_len=32"),
    ([1], {"max_tokens": 3}, "SamplingParams"),
])
def test_invalid_requests_raise_invalid_argument(model, prompt, params, match):
    engine = Engine(model, max_batch=1, max_seq_len=32)
    with pytest.raises(InvalidArgument, match=match):
        engine.submit(prompt, params)
    assert engine.stats()["queue_len"] == 0


def test_prompt_check_takes_any_integer_sequence_the_same(model):
    """A list of ints (the fast path) and other integer sequences (checked token by token) give the same ids."""
    engine = Engine(model, max_batch=1, max_seq_len=32)
    ids = [0, 5, 2047, 7]
    for prompt in (ids, tuple(ids), np.array(ids), np.array(ids, dtype=np.uint16), torch.tensor(ids),
                   [np.int64(t) for t in ids]):
        arr = engine._prompt_ids(prompt)
        assert arr.dtype == np.int64 and arr.shape == (4,) and arr.tolist() == ids
        if isinstance(prompt, np.ndarray):   # (a copy: the caller may reuse its array)
            assert not np.shares_memory(arr, prompt)


def test_speculative_option_is_refused_clearly(model):
    with pytest.raises(InvalidArgument, match="speculative"):
        Engine(model, max_batch=1, max_seq_len=32, speculative="eagle")
    cfg = model.config
    no_mtp = Transformer(cfg.replace(n_mtp_layers=0, compress_ratios=cfg.compress_ratios[:cfg.n_layers]))
    with pytest.raises(InvalidArgument, match="MTP block"):
        Engine(no_mtp.init_weights(seed=0).eval(), max_batch=1, max_seq_len=32, speculative="mtp")


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failing_forward_ends_only_its_request(model, monkeypatch, overlap):
    ps = prompts(model, [5, 11, 8])
    engine = Engine(model, max_batch=3, max_seq_len=96, overlap=overlap)
    hs = [engine.submit(p, SamplingParams(max_tokens=6, temperature=0)) for p in ps]
    for _ in range(2 if overlap else 1):        # all three prefilled and decoding
        engine.step()
    layer = model.layers[2]
    real, calls = layer.forward, [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:                       # the second row's decode forward, midway through the model
            raise RuntimeError("injected fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", flaky)
    engine.step()
    monkeypatch.setattr(layer, "forward", real)
    engine.run_until_idle()
    last = [list(h)[-1] for h in hs]
    assert last[1].finish_reason == "error" and "injected fault" in last[1].error
    for i in (0, 2):
        assert last[i].finish_reason == "length"
        assert tokens(hs[i]) == generate(model, [ps[i]], 6)[0]
    assert engine.cache.damaged_rows == [] and engine.stats()["requests_failed"] == 1
    again = engine.submit(ps[1], SamplingParams(max_tokens=6, temperature=0))   # the row serves again
    engine.run_until_idle()
    assert tokens(again) == generate(model, [ps[1]], 6)[0]


class NaNOnToken:
    """The model, except that a prompt chunk holding token 7 gives NaN logits."""
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, ids, **kw):
        out = self.inner(ids, **kw)
        return out.masked_fill((ids == 7).any(-1).view(-1, 1, 1), float("nan"))


@pytest.mark.parametrize("overlap", [False, True])
def test_non_finite_logits_end_the_request_with_error(model, overlap):
    engine = Engine(NaNOnToken(model), max_batch=2, max_seq_len=32, overlap=overlap)
    bad, good = engine.submit([1, 7, 3], GREEDY), engine.submit([1, 2, 3], GREEDY)
    engine.run_until_idle()
    assert [(e.token, e.finish_reason) for e in bad] == [(None, "error")]
    assert "non-finite" in list(bad)[-1].error
    assert tokens(good) == generate(model, [[1, 2, 3]], 4)[0]


def test_logprobs_stop_tokens_and_eos(model):
    p = prompts(model, [10])[0]
    ref = generate(model, [p], 6)[0]
    events = alone(model, p, SamplingParams(max_tokens=6, temperature=0, logprobs=3))
    for e in events:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0][0] == e.token
        assert e.logprob == e.top_logprobs[0][1] <= 0
        assert e.top_logprobs[0][1] >= e.top_logprobs[1][1] >= e.top_logprobs[2][1]
    stopped = alone(model, p, SamplingParams(max_tokens=6, temperature=0, stop_token_ids=(ref[2],)))
    assert [e.token for e in stopped] == ref[:3] and stopped[-1].finish_reason == "stop"
    engine = Engine(model, max_batch=2, max_seq_len=96, eos_token_ids=(ref[1],))
    eos = engine.submit(p, SamplingParams(max_tokens=6, temperature=0))
    ignored = engine.submit(p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    engine.run_until_idle()
    assert tokens(eos) == ref[:2] and tokens(ignored) == ref


def test_background_thread_serves_blocking_and_asyncio_consumers(model):
    ps = prompts(model, [6, 13])
    engine = Engine(model, max_batch=2, max_seq_len=96).start()
    try:
        h = engine.submit(ps[0], GREEDY)
        assert tokens(h) == generate(model, [ps[0]], 4)[0]

        async def consume():
            handle = engine.submit(ps[1], GREEDY)
            return [e.token async for e in handle]

        assert asyncio.run(consume()) == generate(model, [ps[1]], 4)[0]
    finally:
        engine.stop()
    assert engine.stats()["requests_finished"] == 2


def test_a_consumer_that_stops_listening_cancels_its_request(model):
    engine = Engine(model, max_batch=2, max_seq_len=96).start()
    try:
        async def hang_up_after_two():
            stream = engine.submit([5, 6, 7], SamplingParams(max_tokens=50, temperature=0)).__aiter__()
            got = [await stream.__anext__(), await stream.__anext__()]
            await stream.aclose()
            return got

        for _ in range(3):
            assert len(asyncio.run(hang_up_after_two())) == 2
        h = engine.submit([5, 6, 7], SamplingParams(max_tokens=50, temperature=0))
        for _ in h:
            break
        assert list(h)[-1].finish_reason == "abort"
    finally:
        engine.stop()
    assert engine.stats()["running"] == 0 and engine.stats()["requests_cancelled"] == 4


def test_prefix_cache_hooks_reuse_a_shared_prefix(model, tmp_path):
    from dsv4.generate.prefix_store import PrefixStore
    store = PrefixStore(tmp_path, model, block=8)
    system, a, b = prompts(model, [20, 5, 7])
    engine = Engine(model, max_batch=2, max_seq_len=96, prefill_chunk=8, prefix_cache=store)
    first = engine.submit(system + a, GREEDY)
    engine.run_until_idle()
    second = engine.submit(system + b, GREEDY)
    engine.run_until_idle()
    assert second.cached_tokens == 16 and engine.stats()["prefix_hit_tokens"] == 16
    assert tokens(first) == generate(model, [system + a], 4, prefill_chunk=8)[0]
    assert tokens(second) == generate(model, [system + b], 4, prefill_chunk=8)[0]


def test_a_whole_prompt_hit_runs_no_prefill_and_samples_as_the_cold_request(model):
    """A prompt sent again is restored whole with its logits: no prefill forward, the first token (sampled with
    the request's seed, logprobs too) and the rest are the cold request's; one more token computes just that."""
    from dsv4.serve.prefix_cache import PrefixCache
    p = prompts(model, [21], seed=9)[0]
    params = SamplingParams(max_tokens=5, temperature=0.8, seed=3, logprobs=2)
    pc = PrefixCache(model, 1 << 28, 0, block=8, verify_model=False)
    engine = Engine(model, max_batch=2, max_seq_len=96, prefill_chunk=16, prefix_cache=pc)
    fed = []
    real = engine.model
    engine.model = lambda ids, **kw: fed.append(ids.shape[1]) or real(ids, **kw)
    runs = []
    for q in (p, p, p + [5]):
        fed.clear()
        h = engine.submit(q, params)
        engine.run_until_idle()
        runs.append((h.cached_tokens, list(fed), list(h)))   # (tokens fed per forward: prefill, then decode)
    cold = alone(model, p, params, prefill_chunk=8)   # (the chunks the block saves made)
    first = [(e.token, e.logprob, e.top_logprobs) for e in runs[0][2]]
    assert runs[0][:2] == (0, [8, 8, 5, 1, 1, 1, 1]) and first == [(e.token, e.logprob, e.top_logprobs) for e in cold]
    assert runs[1][:2] == (21, [1, 1, 1, 1]) and [(e.token, e.logprob, e.top_logprobs) for e in runs[1][2]] == first
    assert runs[2][:2] == (21, [1, 1, 1, 1, 1])   # the extension: its one new token, then the decode steps
    assert tokens(runs[2][2]) == tokens(alone(model, p + [5], params, prefill_chunk=8))
    assert engine.stats()["prefix_hit_tokens"] == 42 and engine.stats()["prefix_lookup_tokens"] == 21 + 21 + 22


def test_decode_runs_never_cover_a_prefilling_row():
    F, P, D = Phase.FREE, Phase.PREFILL, Phase.DECODE
    assert decode_runs([D, F, D, P, D, D, F, F]) == [range(0, 3), range(4, 6)]
    assert decode_runs([P, F, D, F]) == [range(2, 3)]
    assert decode_runs([F, P, F]) == []
