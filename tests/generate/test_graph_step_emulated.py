"""The speculative step's graph path (the MTP forwards and the fused greedy step as GraphSteps) on a CPU, with CUDA
graph capture and replay emulated with their semantics: capturing leaves the cache as it was, a replay runs no
Python bookkeeping (the cache's host side is GraphStep's), reads its static inputs and overwrites its static
outputs in place. The decoder must then give the eager decoder's tokens and caches, bit for bit: what it keeps
from a replay (drafts, lanes, logits, next tokens) must survive the next replays."""
import dataclasses

import pytest

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import agreeing_model, read_tensors
from dsv4.generate import SamplingConfig, speculative
from dsv4.generate.graphs import GraphStep
from dsv4.generate.speculative import SpeculativeDecoder


def _cache_tensors(cache):
    return [cache.positions] + [t for layer in cache.layers for t in [s.buf for s in layer.stores()]
                                + [x for st in layer.states() for x in (st.kv, st.score)]]


def _overwrite(static, fresh):
    """Write fresh outputs into the static ones, as a replay does (tensors, tuples of them, dataclasses)."""
    if isinstance(static, torch.Tensor):
        static.copy_(fresh)
    elif dataclasses.is_dataclass(static):
        for f in dataclasses.fields(static):
            _overwrite(getattr(static, f.name), getattr(fresh, f.name))
    else:
        for a, b in zip(static, fresh):
            _overwrite(a, b)


class _Undo(TorchDispatchMode):
    """Within: every storage an op writes to is copied first; `undo()` puts them back (what a capture, which runs
    no kernel, leaves: the caches and any state buffers the step updates, as they were)."""

    def __init__(self):
        super().__init__()
        self.saved = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                t = args[i] if i < len(args) else kwargs.get(arg.name)
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.saved:
                    st = t.untyped_storage()
                    self.saved[st.data_ptr()] = (st, st.clone())
        return func(*args, **kwargs)

    def undo(self) -> None:
        for st, copy in self.saved.values():
            st.copy_(copy)


def _caches(cache):
    return getattr(cache, "caches", (cache,))   # (a CacheGroup's caches)


def _states(cache):
    return [st for c in _caches(cache) for layer in c.layers for st in layer.states()]


class EmulatedGraphStep(GraphStep):
    """GraphStep whose capture and replay run fn eagerly with a graph's effects: capture leaves every tensor it
    writes and the host bookkeeping as they were; replay recomputes into the captured output tensors, and the
    Python bookkeeping fn runs (positions mirror, damage marks, journals) is undone as a replay would not run it.
    `replays` counts the replays."""
    replays = 0

    def _capture(self):
        journals = [st.journal for st in _states(self.cache)]
        with _Undo() as undo:
            self.outputs = self.fn(*self.inputs)
        undo.undo()
        for st, j in zip(_states(self.cache), journals):
            st.journal = j
        return "emulated"

    def _replay(self) -> None:
        hosts = [c.host_state() for c in _caches(self.cache)]
        journals = [st.journal for st in _states(self.cache)]
        for c, host in zip(_caches(self.cache), hosts):
            c.restore_host_state(([p - self.n_tokens for p in host[0]], [False] * len(host[1])))
        _overwrite(self.outputs, self.fn(*self.inputs))
        for c, host in zip(_caches(self.cache), hosts):
            c.restore_host_state(host)
        for st, j in zip(_states(self.cache), journals):
            st.journal = j
        EmulatedGraphStep.replays += 1


@torch.no_grad()
def test_graph_path_equals_eager_with_emulated_graphs(monkeypatch):
    monkeypatch.setattr(speculative, "GraphStep", EmulatedGraphStep)
    model = agreeing_model()
    prompts = [list(range(10, 37)), list(range(50, 81))]
    runs = []
    for graphed in (True, False):
        for n_rows in (1, 2):   # one row: the catch-up replays too; two: only the further drafts and the verify
            dec = SpeculativeDecoder(model, model.new_cache(2, 128), n_draft=2)
            dec.fixed_shapes = dec.graph_drafts = True
            dec.fuse_row = False   # (a single greedy row's own step: test_single_greedy_row_replays_...)
            for r in range(n_rows):
                dec.prefill(r, prompts[r])
            budgets, out = [30, 22][:n_rows], []
            for _ in range(12):
                res = dec.step_rows(slice(0, n_rows), [SamplingConfig(temperature=0)] * n_rows, [None] * n_rows,
                                    [()] * n_rows, budgets, verifier=(lambda n: None) if graphed else None)
                out.append([(r.tokens, r.accepted, r.logits) for r in res])
                budgets = [0 if r.finished else b - len(r.tokens) for b, r in zip(budgets, res)]
            if graphed:
                assert any(g.graph is not None for g in dec._fused_graphs.values())
            runs.append((out, _cache_tensors(dec.cache) + _cache_tensors(dec.mtp_cache), dec.stats["accepted"]))
    assert EmulatedGraphStep.replays > 10
    for (o1, c1, a1), (o2, c2, a2) in zip(runs[:2], runs[2:]):
        assert a1 == a2 > 0
        for s1, s2 in zip(o1, o2):
            for x, y in zip(s1, s2):
                assert x[:2] == y[:2] and torch.equal(x[2], y[2])
        assert all(torch.equal(p, q) for p, q in zip(c1, c2))


@pytest.mark.parametrize("n_draft", [1, 3])
@torch.no_grad()
def test_single_greedy_row_replays_one_graph_per_step(monkeypatch, n_draft):
    """A single greedy row (generate.greedy_row): after the graph's capture each step is one replay of one graph
    over both caches, with the eager step's tokens, logits and caches bit for bit, and its state buffers carried
    from replay to replay (drafts accepted and rejected)."""
    monkeypatch.setattr(speculative, "GraphStep", EmulatedGraphStep)
    model = agreeing_model()
    runs = []
    for graphed in (True, False):
        dec = SpeculativeDecoder(model, model.new_cache(1, 96), n_draft=n_draft)
        dec.fixed_shapes = dec.graph_drafts = True
        dec.prefill(0, list(range(10, 37)))
        out, replays, left = [], [], 30
        while left:
            before = EmulatedGraphStep.replays
            res = dec.step_rows(slice(0, 1), [SamplingConfig(temperature=0)], [None], [()], [left],
                                verifier=(lambda n: None) if graphed else None)[0]
            replays.append(EmulatedGraphStep.replays - before)
            out.append((res.tokens, res.accepted, res.logits.clone()))
            left -= len(res.tokens)
        if graphed:
            assert not dec._mtp_graphs and not dec._fused_graphs          # no other graph
            assert [g.graph for _, g, _, _ in dec._row_steps.values()] == ["emulated"]
            assert dec.graph_count() == 1
            assert replays[3:] == [1] * (len(replays) - 3)                 # (2 eager calls, then the capture)
        runs.append((out, _cache_tensors(dec.cache) + _cache_tensors(dec.mtp_cache)))
    (o1, c1), (o2, c2) = runs
    assert {0, n_draft} <= {a for _, a, _ in o1}                          # none and all drafts accepted
    for x, y in zip(o1, o2):
        assert x[:2] == y[:2] and torch.equal(x[2], y[2])
    assert all(torch.equal(p, q) for p, q in zip(c1, c2))


@pytest.mark.parametrize("n_draft", [1, 3])
@torch.no_grad()
def test_pipelined_row_stream_on_the_graph_path(monkeypatch, n_draft):
    """greedy_row_stream on the graph path (each replay launched before the previous one's results are read, so
    those results must be taken from the static outputs before the next replay overwrites them; the capture comes
    mid-stream; the host mirrors advance by GraphStep's k + 1 per launch): the eager step_row loop's steps,
    logits and caches (every byte a later step reads) bit for bit."""
    monkeypatch.setattr(speculative, "GraphStep", EmulatedGraphStep)
    model = agreeing_model()
    prompt, n = list(range(10, 37)), 30
    runs = []
    for graphed in (True, False):
        dec = SpeculativeDecoder(model, model.new_cache(1, 96), n_draft=n_draft)
        dec.fixed_shapes = dec.graph_drafts = True
        dec.prefill(0, prompt)
        if graphed:
            steps = list(dec.greedy_row_stream(0, n, (), graphs=True))
            assert [g.graph for _, g, _, _ in dec._row_steps.values()] == ["emulated"]
        else:
            steps = []
            while not steps or not steps[-1].finished:
                steps.append(dec.step_row(0, SamplingConfig(temperature=0), None, (), n - sum(
                    len(r.tokens) for r in steps)))
        assert dec.cache.lengths() == dec.cache.positions.tolist()
        assert dec.mtp_cache.lengths() == dec.mtp_cache.positions.tolist()
        runs.append(([(r.tokens, r.accepted, r.drafted, r.finished) for r in steps], [r.logits for r in steps],
                     read_tensors(dec.cache) + read_tensors(dec.mtp_cache)))   # (the dead step's unread rows aside)
    (s1, l1, c1), (s2, l2, c2) = runs
    assert s1 == s2 and {0, n_draft} <= {a for _, a, _, _ in s1}
    assert all(torch.equal(x, y) for x, y in zip(l1, l2))
    assert all(torch.equal(p, q) for p, q in zip(c1, c2))
