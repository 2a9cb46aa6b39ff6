"""The serving engine's held stream for a lone greedy speculative row (CPU, tiny model with an agreeing MTP block):
a request decoding alone goes through `SpeculativeDecoder.greedy_row_stream` with the events and counters of the
engine's step-by-step speculative path and plain decoding's tokens; a request arriving, a cancellation or the
engine stopping closes the stream (its step in flight settled and sent) and every request stays exact."""
from __future__ import annotations

import pytest
import torch

import dsv4
from conftest import agreeing_model
from dsv4.generate.speculative import SpeculativeDecoder
from dsv4.serve.engine import Engine
from dsv4.serve.types import SamplingParams

TINY = dsv4.ModelConfig.preset("tiny")
KW = dict(max_batch=2, max_seq_len=96)


@pytest.fixture(scope="module")
def agreeing():
    return agreeing_model()


@pytest.fixture
def streams(monkeypatch):
    """Counts what goes through the engine's streams: those opened, the tokens of the steps they yield, and the
    steps their closes settle (which the stream does not yield)."""
    log = {"opened": 0, "tokens": 0, "settled": 0}
    real = SpeculativeDecoder.greedy_row_stream

    class Counted(list):
        def __init__(self, target):
            super().__init__()
            self.target = target

        def append(self, res):
            log["settled"] += 1
            self.target.append(res)

    def counting(self, row, max_new, stop_ids=(), graphs=None, verifier=None, settled=None):
        log["opened"] += 1
        inner = real(self, row, max_new, stop_ids, graphs, verifier, None if settled is None else Counted(settled))

        def steps():
            try:
                for res in inner:
                    log["tokens"] += len(res.tokens)
                    yield res
            finally:
                inner.close()
        return steps()
    monkeypatch.setattr(SpeculativeDecoder, "greedy_row_stream", counting)
    return log


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.vocab_size, (n,), generator=g).tolist() for n in lengths]


def toks(events):
    return [e.token for e in events if e.token is not None]


def alone(model, prompt, params, **kw):
    """A request's events served alone by an engine built with `kw`."""
    engine = Engine(model, **KW, **kw)
    h = engine.submit(prompt, params)
    engine.run_until_idle()
    return list(h), engine


def plain(model, prompt, params):
    return toks(alone(model, prompt, params)[0])


@pytest.mark.parametrize("n_draft", [1, 3])
def test_a_lone_greedy_request_streams_with_the_step_paths_events_and_counters(agreeing, streams, monkeypatch,
                                                                                n_draft):
    """Every token of a lone greedy request comes out of one stream: plain decoding's tokens, the logprobs of plain
    decoding's logits, and the same events and counters as the engine's step-by-step speculative path."""
    p = prompts([19])[0]
    params = SamplingParams(max_tokens=17, temperature=0, logprobs=2)
    got, engine = alone(agreeing, p, params, speculative="mtp", n_draft=n_draft)
    assert streams == {"opened": 1, "tokens": 17, "settled": 0} and engine._stream is None
    want, _ = alone(agreeing, p, params)
    assert toks(got) == toks(want) and got[-1].finish_reason == "length"
    for e, w in zip(got, want):
        assert e.logprob == pytest.approx(w.logprob, abs=1e-4)
        assert [t for t, _ in e.top_logprobs] == [t for t, _ in w.top_logprobs]
    monkeypatch.setattr(Engine, "_streamable", lambda self: None)   # the step_rows path, one step at a time
    stepped, ref = alone(agreeing, p, params, speculative="mtp", n_draft=n_draft)
    assert streams["opened"] == 1
    assert [(e.token, e.finish_reason) for e in got] == [(e.token, e.finish_reason) for e in stepped]
    assert [e.logprob for e in got] == pytest.approx([e.logprob for e in stepped], abs=1e-5)
    counted = ("decode_tokens", "spec_drafted", "spec_accepted", "requests_finished", "prefill_tokens")
    assert {k: engine.stats()[k] for k in counted} == {k: ref.stats()[k] for k in counted}
    assert engine.spec.stats == ref.spec.stats
    assert engine.stats()["spec_drafted"] == engine.spec.stats["drafted"] >= engine.stats()["spec_accepted"] > 0
    assert engine.stats()["running"] == 0


def test_a_sampled_or_stopping_lone_request(agreeing, streams):
    """A sampled lone request never streams; a greedy one that meets its stop token inside the stream ends there."""
    p = prompts([9], seed=4)[0]
    alone(agreeing, p, SamplingParams(max_tokens=6, temperature=0.8, seed=3), speculative="mtp", n_draft=2)
    assert streams["opened"] == 0
    free = plain(agreeing, p, SamplingParams(max_tokens=16, temperature=0))
    stop_at = next(i for i in range(3, 16) if free[i] not in free[:i])
    got, engine = alone(agreeing, p, SamplingParams(max_tokens=16, temperature=0, stop_token_ids=(free[stop_at],)),
                        speculative="mtp", n_draft=2)
    assert toks(got) == free[:stop_at + 1] and got[-1].finish_reason == "stop"
    assert streams["opened"] == 1 and streams["tokens"] == stop_at + 1 and engine.stats()["running"] == 0


@pytest.mark.parametrize("n_draft", [1, 3])
def test_a_request_arriving_closes_the_stream_and_both_stay_exact(agreeing, streams, n_draft):
    """A second request queued while the first streams: the stream is closed (its step in flight settled and sent),
    both rows go on by the batched path, and once the second ends the first streams again; both get their solo
    tokens."""
    a, b = prompts([11, 6], seed=2)
    pa, pb = SamplingParams(max_tokens=48, temperature=0), SamplingParams(max_tokens=5, temperature=0)
    engine = Engine(agreeing, **KW, speculative="mtp", n_draft=n_draft)
    ha = engine.submit(a, pa)
    for _ in range(4):   # (its prefill, then three streamed steps)
        engine.step()
    assert engine._stream is not None and streams["opened"] == 1
    hb = engine.submit(b, pb)
    engine.step()
    assert engine._stream is None and streams["settled"] == 1
    engine.run_until_idle()
    assert toks(ha) == plain(agreeing, a, pa) and toks(hb) == plain(agreeing, b, pb)
    assert streams["opened"] == 2 and streams["settled"] == 1   # (the last stream ended with its request)
    assert engine.stats()["decode_tokens"] == 48 + 5 and engine.stats()["running"] == 0


def test_cancelling_mid_stream_frees_the_row_at_once(agreeing, streams):
    """A streaming request cancelled: its row is free after the next step (the step in flight settled, its tokens
    not sent), the tokens it got are its solo ones, and the next request on that row is exact."""
    a, c = prompts([13, 8], seed=3)
    params = SamplingParams(max_tokens=40, temperature=0)
    engine = Engine(agreeing, **KW, speculative="mtp", n_draft=2)
    ha = engine.submit(a, params)
    for _ in range(4):
        engine.step()
    ha.cancel()
    engine.step()
    events = list(ha)
    assert events[-1].finish_reason == "abort" and engine._stream is None
    assert engine.stats()["running"] == 0 and engine.stats()["requests_cancelled"] == 1
    assert toks(events) == plain(agreeing, a, params)[:len(toks(events))] and len(toks(events)) == streams["tokens"]
    assert streams["settled"] == 1
    hc = engine.submit(c, params)
    engine.run_until_idle()
    assert toks(hc) == plain(agreeing, c, params) and streams["opened"] == 2


def test_stopping_the_engine_closes_the_stream(agreeing, streams):
    """stop() mid-stream sends the settled step's tokens and leaves nothing in flight; stepping on from there
    gives the solo tokens."""
    a = prompts([10], seed=5)[0]
    params = SamplingParams(max_tokens=30, temperature=0)
    engine = Engine(agreeing, **KW, speculative="mtp", n_draft=2)
    h = engine.submit(a, params)
    for _ in range(3):
        engine.step()
    sent = streams["tokens"]
    engine.stop()
    assert engine._stream is None and streams["settled"] == 1
    assert engine.stats()["decode_tokens"] > sent   # (the settled step's tokens went out)
    engine.run_until_idle()
    assert toks(h) == plain(agreeing, a, params) and streams["opened"] == 2
