"""Speculative decoding with CUDA graphs (skipped without CUDA): the verify forward replayed from a captured graph
(GraphDecoder with n_tokens > 1) leaves the cache and gives the tokens of the eager verify, rollback included; the
engine's graph steps give the eager engine's tokens and logprobs, greedy equal to plain decoding."""
from __future__ import annotations

import pytest
import torch

from conftest import agreeing_model, engine_outputs, read_tensors
from dsv4.generate import SamplingConfig, generate
from dsv4.generate.graphs import GraphDecoder, GraphStep
from dsv4.generate.speculative import SpeculativeDecoder
from dsv4.serve.types import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def model():
    torch.backends.cuda.matmul.allow_tf32 = False
    return agreeing_model().cuda()


def _graph_verifier(model, cache):
    """The verifier SpeculativeDecoder.step_rows takes: one captured verify per token count, over rows 0-1."""
    graphs: dict[int, GraphDecoder] = {}

    def verifier(n_tokens):
        if n_tokens not in graphs:
            graphs[n_tokens] = GraphDecoder(model, cache.select(slice(0, 2)), n_tokens=n_tokens, checkpoint=True)
        return graphs[n_tokens]
    verifier.graphs = graphs
    return verifier


@pytest.mark.parametrize("n_draft", [1, 3])
def test_graph_verify_equals_eager_verify(model, n_draft):
    """Two decoders on equal caches, one verifying through a captured graph (after its warm-up calls, so most steps
    replay), one eagerly with fixed shapes: same tokens every step (greedy and seeded sampling rows), and the same
    cache bytes a later step reads at the end (the rollback of a replayed step used the journal the capture recorded)."""
    prompts = [list(range(100, 130)), list(range(200, 241))]
    cfgs = [SamplingConfig(temperature=0), SamplingConfig(temperature=1.0)]
    outs, caches = [], []
    for graphed in (False, True):
        cache = model.new_cache(2, 160)
        dec = SpeculativeDecoder(model, cache, n_draft=n_draft)
        dec.fixed_shapes = True
        for r, p in enumerate(prompts):
            dec.prefill(r, p)
        verifier = _graph_verifier(model, cache)
        gens = [None, torch.Generator(device="cuda").manual_seed(7)]
        out = [[], []]
        for _ in range(12):
            res = dec.step_rows(slice(0, 2), cfgs, gens, [(), ()], [40 - len(o) for o in out],
                                verifier if graphed else None)
            for o, r in zip(out, res):
                o += r.tokens
        if graphed:
            assert any(g.graph is not None and g.rollback_graph is not None for g in verifier.graphs.values()), \
                "no verify step and rollback were captured (see the capture warnings)"
        outs.append(out)
        caches.append(read_tensors(cache))
    assert outs[0] == outs[1]
    assert all(torch.equal(a, b) for a, b in zip(*caches))


def _run(model, ps, params, **kw):
    return engine_outputs(model, ps, params, max_batch=4, **kw)


def test_engine_speculative_graphs_equal_eager_and_plain(model):
    g = torch.Generator().manual_seed(1)
    ps = [torch.randint(0, 2048, (3 + (11 * i) % 40,), generator=g).tolist() for i in range(6)]
    params = SamplingParams(max_tokens=14, temperature=0, logprobs=0)
    graphs, with_graphs = _run(model, ps, params, speculative="mtp", n_draft=2, cuda_graphs=True)
    fused = [g for g in graphs.spec._fused_graphs.values() if g.graph is not None]
    assert fused, "no fused greedy step (verify, acceptance, rollback) was captured (see the capture warning)"
    assert graphs.stats()["spec_accepted"] > 0
    _, eager = _run(model, ps, params, speculative="mtp", n_draft=2, cuda_graphs=False)
    assert [[t for t, _ in e] for e in with_graphs] == [[t for t, _ in e] for e in eager]
    # (the eager engine reads only the rows reached, the graphs every row: logprobs agree to rounding)
    assert all(abs(a[1] - b[1]) < 1e-5 for x, y in zip(with_graphs, eager) for a, b in zip(x, y) if a[1] is not None)
    _, plain = _run(model, ps, params, cuda_graphs=True)
    assert [[t for t, _ in e] for e in with_graphs] == [[t for t, _ in e] for e in plain]
    single = SamplingParams(max_tokens=40, temperature=0)   # one greedy stream: bucket 1, one graph per step
    one, got = _run(model, ps[:1], single, speculative="mtp", cuda_graphs=True)
    assert [g.graph is not None for _, g, _, _ in one.spec._row_steps.values()] == [True]
    assert not one.spec._mtp_graphs and not one.spec._fused_graphs
    assert got == _run(model, ps[:1], single, cuda_graphs=True)[1]
    # n_draft 3: the 3-token prompt leaves 2 MTP pairs to rewind over, so the first step is a batched one (its MTP
    # graphs never captured), and every later step replays the single row's graph
    three, got3 = _run(model, ps[:1], single, speculative="mtp", n_draft=3, cuda_graphs=True)
    assert [g.graph is not None for _, g, _, _ in three.spec._row_steps.values()] == [True]
    assert not any(g.graph is not None for g in [*three.spec._mtp_graphs.values(), *three.spec._fused_graphs.values()])
    assert got3 == got
    one_sampled = SamplingParams(max_tokens=20, temperature=0.8, seed=5)   # bucket 1 sampled: the catch-up graphs
    one, got = _run(model, ps[:1], one_sampled, speculative="mtp", cuda_graphs=True)
    assert any(key[0] == "catch-up" and g.graph is not None for key, g in one.spec._mtp_graphs.items())
    assert got == _run(model, ps[:1], one_sampled, speculative="mtp", cuda_graphs=False)[1]
    sampled = SamplingParams(max_tokens=14, temperature=0.8, seed=3)
    assert _run(model, ps, sampled, speculative="mtp", cuda_graphs=True)[1] == \
        _run(model, ps, sampled, speculative="mtp", cuda_graphs=False)[1]


@pytest.mark.parametrize("n_draft", [1, 3])
def test_fused_graph_step_equals_unfused_graph_step(model, n_draft):
    """All-greedy rows: the fused step replayed from one graph (checkpoint, verify, acceptance, rollback) gives the
    tokens of the unfused graphed step (verify graph, eager acceptance, rollback graph) every step, and the same
    cache bytes at the end, main and MTP."""
    prompts = [list(range(100, 130)), list(range(200, 241))]
    cfgs = [SamplingConfig(temperature=0)] * 2
    outs, caches = [], []
    for fuse in (True, False):
        cache = model.new_cache(2, 160)
        dec = SpeculativeDecoder(model, cache, n_draft=n_draft)
        dec.fixed_shapes = dec.graph_drafts = True
        dec.fuse_greedy = fuse
        for r, p in enumerate(prompts):
            dec.prefill(r, p)
        verifier = _graph_verifier(model, cache)
        out = [[], []]
        for _ in range(12):
            res = dec.step_rows(slice(0, 2), cfgs, [None, None], [(), ()], [40 - len(o) for o in out], verifier)
            for o, r in zip(out, res):
                o += r.tokens
        if fuse:
            assert any(g.graph is not None for g in dec._fused_graphs.values()), "the fused step was not captured"
        outs.append(out)
        caches.append(read_tensors(cache) + read_tensors(dec.mtp_cache))
    assert outs[0] == outs[1]
    assert all(torch.equal(a, b) for a, b in zip(*caches))


def test_engine_speculative_graphs_whole_prompt_prefix_hits(model):
    """With CUDA graphs, a prompt restored whole from the prefix cache (its logits and last lanes along, no
    forward) and its one-token extension decode the tokens of the plain engine, and the resumed rows draft."""
    from dsv4.serve.engine import Engine
    from dsv4.serve.prefix_cache import PrefixCache
    g = torch.Generator().manual_seed(2)
    p = torch.randint(0, 2048, (37,), generator=g).tolist()
    params = SamplingParams(max_tokens=12, temperature=0)
    pc = PrefixCache(model, 1 << 28, 0, block=16, verify_model=False)
    spec = Engine(model, max_batch=4, max_seq_len=128, prefill_chunk=16, prefix_cache=pc, speculative="mtp",
                  n_draft=2, cuda_graphs=True)
    got = []
    for q in (p, p, p, p + [5]):
        h = spec.submit(q, params)
        spec.run_until_idle()
        got.append((h.cached_tokens, [e.token for e in h]))
    assert [c for c, _ in got] == [0, 37, 37, 37] and spec.stats()["spec_accepted"] > 0
    plain = {len(q): [t for t, _ in _run(model, [q], params, cuda_graphs=True)[1][0]] for q in (p, p + [5])}
    assert [t for _, t in got] == [plain[37]] * 3 + [plain[38]]


@pytest.mark.parametrize("n_draft", [1, 3])
def test_single_greedy_row_graph_equals_eager_and_two_graph_step(model, n_draft, monkeypatch):
    """One greedy row (generate.greedy_row): the whole step replayed from one captured graph (one replay per step
    once captured, no other graph) gives the eager fused step's tokens, logits and cache bytes (main and MTP) bit
    for bit, and the tokens of the multi-graph step (MTP catch-up and further-draft graphs, fused verify graph) and
    of plain decoding; drafts are accepted and rejected."""
    replays = []
    real = GraphStep._replay
    monkeypatch.setattr(GraphStep, "_replay", lambda self: replays.append(self) or real(self))
    prompt = list(range(100, 140))
    runs = []
    for graphed, fuse_row in ((True, True), (False, True), (True, False)):
        cache = model.new_cache(1, 160)
        dec = SpeculativeDecoder(model, cache, n_draft=n_draft)
        dec.fixed_shapes = dec.graph_drafts = True
        dec.fuse_row = fuse_row
        dec.prefill(0, prompt)
        out, accepted, logits, per_step = [], [], [], []
        while len(out) < 60:
            before = len(replays)
            res = dec.step_rows(slice(0, 1), [SamplingConfig(temperature=0)], [None], [()], [60 - len(out)],
                                (lambda n: None) if graphed else None)[0]   # (greedy: no verifier called)
            per_step.append(len(replays) - before)
            out += res.tokens
            accepted.append(res.accepted)
            logits.append(res.logits.clone())
        if graphed and fuse_row:
            assert [g.graph is not None for _, g, _, _ in dec._row_steps.values()] == [True], \
                "the single row's step was not captured (see the capture warning)"
            assert not dec._mtp_graphs and not dec._fused_graphs
            assert per_step[3:] == [1] * (len(per_step) - 3)       # (2 eager calls, the capture, then replays)
        runs.append((out, accepted, logits, read_tensors(cache) + read_tensors(dec.mtp_cache)))
    (o1, a1, l1, c1), (o2, a2, l2, c2), (o3, _, _, _) = runs
    assert o1 == o2 == o3 == generate(model, [prompt], 60)[0]
    assert a1 == a2 and min(a1) == 0 and max(a1) >= min(n_draft, 2)
    assert all(torch.equal(x, y) for x, y in zip(l1, l2))
    assert all(torch.equal(x, y) for x, y in zip(c1, c2))


@pytest.mark.parametrize("n_draft", [1, 3])
def test_pipelined_row_stream_equals_the_graphed_step_loop(model, n_draft):
    """greedy_row_stream with CUDA graphs (each replay launched before the last one's results are read, the
    graph captured mid-stream) gives the graphed step_rows loop's steps (tokens, counts, logits) and cache bytes,
    with a stop token and a budget met inside a step's drafts: plain decoding's tokens."""
    prompt, n = list(range(100, 140)), 60
    plain = generate(model, [prompt], n)[0]
    for stops in ((), (plain[37], 99999)):
        runs = []
        for stream in (False, True):
            dec = SpeculativeDecoder(model, model.new_cache(1, 160), n_draft=n_draft)
            dec.fixed_shapes = dec.graph_drafts = True
            dec.prefill(0, prompt)
            if stream:
                steps = list(dec.greedy_row_stream(0, n, stops, graphs=True))
            else:
                steps = []
                while not steps or not steps[-1].finished:
                    res = dec.step_rows(slice(0, 1), [SamplingConfig(temperature=0)], [None], [stops],
                                        [n - sum(len(r.tokens) for r in steps)], lambda k: None)[0]
                    res.logits = res.logits.clone()   # (a static buffer the next replay overwrites)
                    steps.append(res)
            assert [g.graph is not None for _, g, _, _ in dec._row_steps.values()] == [True]
            dec.cache.check_intact()
            assert dec.cache.lengths() == dec.cache.positions.tolist()
            runs.append(([(r.tokens, r.accepted, r.drafted, r.finished) for r in steps], [r.logits for r in steps],
                         read_tensors(dec.cache) + read_tensors(dec.mtp_cache)))
        (s1, l1, c1), (s2, l2, c2) = runs
        assert s1 == s2
        want = plain if not stops else plain[:plain.index(stops[0]) + 1]
        assert [t for toks, _, _, _ in s2 for t in toks] == want
        assert all(torch.equal(x, y) for x, y in zip(l1, l2))
        assert all(torch.equal(x, y) for x, y in zip(c1, c2))
