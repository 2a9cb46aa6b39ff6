"""The engine's CUDA-graph decode path on a CPU with every graph replay a no-op, to measure what a GPU step costs
the host: the Python of the engine step, the speculative step and the graphs' own bookkeeping, plus the eager ops
between the replays (on a CPU, small tensors: about a GPU launch each). The model runs once per graph, at its
"capture" (its outputs become the static buffers every later replay leaves as they are), so a step's cost is the
host's alone, whatever the model's size.

The replayed steps compute nothing: the tokens repeat and the device positions stop at the capture's while the
host mirror advances, which no host code reads. Use it for timing and profiling only.

    with stubbed_graphs():
        graph_path(engine)           # an Engine on a CPU: its decode and speculative steps take the graph path
        engine.step()
"""
from __future__ import annotations

import contextlib

import torch

from dsv4.generate import graphs, speculative
from dsv4.serve import engine as engine_module


REPLAY_COUNT = {"count": 0}   # replays run (counted, not run), for counting them per step


class _NoReplay:
    def replay(self) -> None:
        REPLAY_COUNT["count"] += 1


class StubGraphDecoder(graphs.GraphDecoder):
    """GraphDecoder on any device: the capture runs the step once eagerly (its outputs kept, the cache's host
    side restored, as a capture leaves it), every replay runs nothing."""

    def __init__(self, model, cache, warmup: int = 2, n_tokens: int = 1, checkpoint: bool = False):
        # (the base class refuses a CPU cache: its set-up, without that check)
        self.model, self.cache, self.warmup = model, cache, warmup
        self.n_tokens, self.checkpoint = n_tokens, checkpoint
        device = cache.positions.device
        self.tokens = torch.zeros(cache.batch_size, n_tokens, dtype=torch.long, device=device)
        self.keep = torch.zeros(cache.batch_size, dtype=torch.long, device=device)
        self.logits, self.ckpt, self.journal, self.graph, self.rollback_graph = None, None, None, None, None
        self.calls, self.eager, self.eager_rollback = 0, False, False
        cache.set_fixed_shapes(True)

    def _capture(self) -> None:
        before = self.cache.host_state()
        states = self._states()
        journals = [st.journal for st in states]
        try:
            self.logits = self._step()
            if self.checkpoint:
                self.journal = [st.journal or [] for st in states]
        finally:
            self.cache.restore_host_state(before)
            for st, journal in zip(states, journals):
                st.journal = journal
        self.graph = _NoReplay()


    def rollback(self, keep: torch.Tensor) -> None:
        """The rollback graph's replay runs nothing either (the input copy and the journals' hand-back do)."""
        if self.graph is None or self.eager_rollback:
            return super().rollback(keep)
        self.keep.copy_(keep)
        REPLAY_COUNT["count"] += 1
        for st in self._states():
            st.journal = None


class StubGraphStep(graphs.GraphStep):
    """GraphStep whose capture runs fn once eagerly (the outputs kept) and whose replay runs nothing."""

    def _capture(self):
        states = [st for layer in self.cache.layers for st in layer.states()]
        journals = [st.journal for st in states]
        self.outputs = self.fn(*self.inputs)
        for st, journal in zip(states, journals):
            st.journal = journal
        return _NoReplay()

    def _replay(self) -> None:
        REPLAY_COUNT["count"] += 1


@contextlib.contextmanager
def stubbed_graphs():
    """Within: the engine's GraphDecoder and the speculative decoder's GraphStep are the stubs above."""
    saved = engine_module.GraphDecoder, speculative.GraphStep
    engine_module.GraphDecoder, speculative.GraphStep = StubGraphDecoder, StubGraphStep
    try:
        yield
    finally:
        engine_module.GraphDecoder, speculative.GraphStep = saved


def graph_path(engine: engine_module.Engine, buckets: tuple[int, ...] = (1,)) -> engine_module.Engine:
    """Make `engine` (on a CPU, before its first decode step) take the CUDA-graph decode path, as on a GPU: graph
    buckets `buckets`, the speculative decoder's fixed shapes and graphed drafts on. Step it within
    `stubbed_graphs()`."""
    engine.graph_buckets = sorted(b for b in buckets if b <= engine.max_batch)
    if engine.spec is not None:
        engine.spec.fixed_shapes = engine.spec.graph_drafts = True
    return engine


__all__ = ["REPLAY_COUNT", "StubGraphDecoder", "StubGraphStep", "graph_path", "stubbed_graphs"]
