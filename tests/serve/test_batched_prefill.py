"""Batched prefill in the serving engine (batch_invariant off): equal-length prompt chunks of several requests run
as one forward, each row at its own position, and every request still gets the tokens it gets alone (the
single-sequence `dsv4.generate` path is the oracle; logprobs agree to fp32 rounding, as batched decode's do)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv4 import ModelConfig
from dsv4.generate.engine import generate
from dsv4.model import Transformer
from dsv4.serve.engine import Engine
from dsv4.serve.prefix_cache import PrefixCache
from dsv4.serve.types import SamplingParams

PARAMS = SamplingParams(max_tokens=4, temperature=0, logprobs=0)
# fp32 logprobs of a row computed in a batch of B rows vs alone: GEMMs of other shapes sum in another order
# (observed ~5e-7 on the tiny model); a real difference (a wrong position, a neighbour's row) is O(1)
LOGPROB_ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.preset("tiny")).init_weights(seed=0).eval()


class Recorder:
    """The model, recording each cached forward's tokens shape [B, S] and its rows' start positions."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, ids, cache=None, **kw):
        self.calls.append((tuple(ids.shape), cache.lengths()))
        return self.inner(ids, cache=cache, **kw)

    def prefill_calls(self):
        return [(shape, starts) for shape, starts in self.calls if shape[1] > 1]


def prompts(model, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompt, chunk):
    """The request on an engine of one row (nothing to batch with): [(token, logprob)]."""
    engine = Engine(model, max_batch=1, max_seq_len=96, prefill_chunk=chunk)
    h = engine.submit(prompt, PARAMS)
    engine.run_until_idle()
    return [(e.token, e.logprob) for e in h]


def assert_as_alone(model, prompt, handle, chunk):
    got, want = [(e.token, e.logprob) for e in handle], alone(model, prompt, chunk)
    assert [t for t, _ in got] == [t for t, _ in want] == generate(model, [prompt], 4, prefill_chunk=chunk)[0]
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) <= LOGPROB_ATOL


def test_requests_prefilled_together_each_equal_the_request_alone(model):
    """A mix of prompt lengths arriving over several steps: chunks of one length batch, rows at different
    positions share a forward, and every request's tokens are its own."""
    rec = Recorder(model)
    lengths = [40, 5, 17, 17, 30, 8, 17, 3, 33, 16]
    ps = prompts(model, lengths)
    engine = Engine(rec, max_batch=10, max_seq_len=96, prefill_chunk=16, step_token_budget=64,
                    batch_invariant=False)
    hs = [engine.submit(ps[0], PARAMS)]
    engine.step()                                   # 40 tokens: chunks 0-16, 16-32, 32-40 (budget 64)
    hs += [engine.submit(p, PARAMS) for p in ps[1:]]
    engine.run_until_idle()
    calls = rec.prefill_calls()
    assert any(B > 1 and len(set(starts)) > 1 for (B, _), starts in calls), calls   # another row's position
    assert max(B for (B, _), _ in calls) >= 3
    assert sum(B * S for (B, S), _ in rec.calls if S > 1) + sum(
        B for (B, S), _ in rec.calls if S == 1) >= sum(lengths)
    assert len(calls) < len([n for n in lengths for _ in range(0, n, 16)])   # fewer forwards than chunks
    for p, h in zip(ps, hs):
        assert_as_alone(model, p, h, 16)


def test_batch_invariant_mode_prefills_one_request_per_forward(model):
    rec = Recorder(model)
    ps = prompts(model, [17, 17, 9])
    engine = Engine(rec, max_batch=3, max_seq_len=96, prefill_chunk=16, batch_invariant=True)
    hs = [engine.submit(p, PARAMS) for p in ps]
    engine.run_until_idle()
    assert [shape[0] for shape, _ in rec.prefill_calls()] == [1, 1, 1]
    for p, h in zip(ps, hs):   # bitwise: nothing else shares a request's prefill or decode forwards
        assert [(e.token, e.logprob) for e in h] == alone(model, p, 16)


def test_rows_that_are_not_adjacent_prefill_through_a_copy(model, monkeypatch):
    """Rows 0 and 2 freed while rows 1 and 3 decode: the two new prompts run one forward on a gathered copy of
    their rows, written back; the decoding rows in between are untouched."""
    first = prompts(model, [6, 6, 6, 6], seed=2)
    engine = Engine(model, max_batch=4, max_seq_len=96, batch_invariant=False)
    short, long = SamplingParams(max_tokens=2, temperature=0), SamplingParams(max_tokens=8, temperature=0)
    hs = [engine.submit(p, short if i % 2 == 0 else long) for i, p in enumerate(first)]
    engine.step()                                   # all four prefilled in one forward
    engine.step()                                   # rows 0 and 2 finish
    assert engine.stats()["running"] == 2 and engine._rows[1] is not None and engine._rows[3] is not None
    gathered = []
    real = engine.cache.gather_rows
    monkeypatch.setattr(engine.cache, "gather_rows", lambda rows: gathered.append(list(rows)) or real(rows))
    new = prompts(model, [9, 9], seed=3)
    hn = [engine.submit(p, PARAMS) for p in new]
    engine.run_until_idle()
    assert gathered == [[0, 2]]
    assert engine.cache.damaged_rows == []
    for p, h in zip(new, hn):
        assert_as_alone(model, p, h, 2048)
    for i in (1, 3):
        assert [e.token for e in hs[i]] == generate(model, [first[i]], 8)[0]


def test_a_prefix_cache_hit_batched_with_misses(model):
    """A prompt restored from the prefix cache at position 16 prefills its rest in the same forwards as two
    prompts that miss (from position 0); every save boundary is kept and all three get their own tokens."""
    cache = PrefixCache(model, 1 << 30, 0, block=8, verify_model=False)
    system, a, b, m1, m2 = prompts(model, [16, 5, 7, 7, 7], seed=4)
    rec = Recorder(model)
    engine = Engine(rec, max_batch=3, max_seq_len=96, prefill_chunk=8, prefix_cache=cache, batch_invariant=False)
    engine.submit(system + a, PARAMS)
    engine.run_until_idle()
    rec.calls.clear()
    hit, miss1, miss2 = (engine.submit(p, PARAMS) for p in (system + b, m1, m2))
    engine.run_until_idle()
    assert (hit.cached_tokens, miss1.cached_tokens, miss2.cached_tokens) == (16, 0, 0)
    # the hit's one chunk 16-23 (no save stop before the prompt's end) batches with the misses' 0-7
    assert rec.prefill_calls() == [((3, 7), [16, 0, 0])], rec.calls
    for p, h in zip((system + b, m1, m2), (hit, miss1, miss2)):
        assert [e.token for e in h] == generate(model, [p], 4, prefill_chunk=8)[0]
    rec.calls.clear()
    again = engine.submit(m1, PARAMS)               # stored whole with its logits at the prompt's end: no prefill
    engine.run_until_idle()
    assert again.cached_tokens == 7 and rec.prefill_calls() == [] and len(rec.calls) == 3   # the 3 decode steps
    first, *rest = list(again)
    assert (first.token, first.logprob) == (list(miss1)[0].token, list(miss1)[0].logprob)   # the same logits
    assert [e.token for e in rest] == [e.token for e in list(miss1)[1:]]


def test_a_failing_batched_prefill_ends_its_requests_only(model, monkeypatch):
    """A batched prefill forward that raises midway (on a gathered copy of rows 0 and 2) ends both of its
    requests with "error"; the request decoding in between keeps its tokens and the rows serve again."""
    engine = Engine(model, max_batch=3, max_seq_len=96, batch_invariant=False)
    a, b, c = prompts(model, [6, 6, 6], seed=5)
    one = SamplingParams(max_tokens=1, temperature=0)
    first = engine.submit(a, one)
    keep = engine.submit(b, SamplingParams(max_tokens=6, temperature=0))
    last = engine.submit(c, one)
    engine.step()                                   # rows 0..2 prefilled together; rows 0 and 2 are done
    assert [list(h)[-1].finish_reason for h in (first, last)] == ["length", "length"]
    gathered = []
    real_gather = engine.cache.gather_rows
    monkeypatch.setattr(engine.cache, "gather_rows", lambda rows: gathered.append(list(rows)) or real_gather(rows))
    layer, real = model.layers[1], model.layers[1].forward

    def flaky(x, *args, **kwargs):
        if x.shape[:2] == (2, 9):
            raise RuntimeError("injected fault")
        return real(x, *args, **kwargs)
    monkeypatch.setattr(layer, "forward", flaky)
    hit = [engine.submit(p, SamplingParams(max_tokens=3, temperature=0)) for p in prompts(model, [9, 9], seed=6)]
    engine.step()
    monkeypatch.setattr(layer, "forward", real)
    assert gathered == [[0, 2]] and [list(h)[-1].finish_reason for h in hit] == ["error", "error"]
    assert all("injected fault" in list(h)[-1].error for h in hit)
    engine.run_until_idle()
    assert [e.token for e in keep] == generate(model, [b], 6)[0]
    assert engine.cache.damaged_rows == []
    again = engine.submit(a, SamplingParams(max_tokens=3, temperature=0))
    engine.run_until_idle()
    assert [e.token for e in again] == generate(model, [a], 3)[0]


class _OpCount(TorchDispatchMode):
    """Counts the aten ops run outside the model's forwards (each one a kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.n, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and func.__name__.split(".")[0] not in ("view", "slice", "select", "alias", "detach",
                                                                    "expand", "unsqueeze", "lift_fresh", "empty"):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _ops_around_forward(model, rows: int) -> tuple[int, int]:
    """(aten ops of one engine step prefilling `rows` 8-token prompts in one forward, outside that forward;
    the cache's state stacks)."""
    engine = Engine(model, max_batch=rows, max_seq_len=9, prefill_chunk=8, step_token_budget=8 * rows,
                    max_prefill_rows=rows, cuda_graphs=False, batch_invariant=False)
    for i in range(rows):
        engine.submit([(5 * i + j) % 2048 for j in range(8)], SamplingParams(max_tokens=1, temperature=0))
    counter, real = _OpCount(), model.forward

    def paused(*a, **k):
        counter.paused = True
        try:
            return real(*a, **k)
        finally:
            counter.paused = False
    model.forward = paused
    try:
        with counter:
            engine.step()
    finally:
        del model.forward
    assert engine.counters["prefill_tokens"] == 8 * rows and not engine.has_work
    return counter.n, len(engine.cache._state_stacks)


def test_a_prefill_step_costs_a_few_kernels_per_row_besides_its_forward(model):
    one, stacks = _ops_around_forward(model, 1)
    eight, _ = _ops_around_forward(model, 8)
    # per added row: its reset at admission, one copy per state stack and its position (4 here; two ops per
    # compressor state of every layer, 11, would fail), with one op to spare; the first tokens' sampling and
    # hand-out are one batch
    assert eight - one <= 7 * (stacks + 2), (one, eight, stacks)
