"""Where graph-replayed and eager decode logprobs part (tests/gpu/test_serve_engine.py::
test_graph_decode_equals_eager_decode): the engine's workload of that test run four ways, and the largest
logprob difference of each against the graph run.

    python bench/graph_decode_probe.py          # needs a CUDA GPU

  graph         cuda_graphs=True: bucketed graph replays (fixed shapes, free rows ride along)
  graph-eager   the same steps and views, each bucket run eagerly instead of replayed: differs from `graph`
                only if replaying itself changes arithmetic
  eager-fixed   cuda_graphs=False, but every decode view reads all stored rows (fixed shapes): differs from
                `graph-eager` only by which rows share a forward (batch composition)
  eager         cuda_graphs=False as the test runs it: differs from `eager-fixed` only by the entries read

The suspect (read from the code, not yet run): the test's tiny model is fp32, so sparse_attn and the indexer take
the reference path (the Triton kernels take bf16/fp16), whose torch.softmax and einsum reduce over the whole index
list. With fixed shapes (the graph engine, replayed or eager) that list holds every stored entry, masked; without
(cuda_graphs=False) only the entries reached. The extra masked entries add exact zeros, but a reduction over
another length groups the same terms differently: ~1e-7 in fp32, tokens equal. Expected: `graph-eager` and
`eager-fixed` equal `graph` bitwise, `eager` alone differs.
"""
from __future__ import annotations

import torch

from dsv4 import ModelConfig
from dsv4.model import Transformer
from dsv4.serve.engine import Engine
from dsv4.serve.types import SamplingParams


class FixedShapesEngine(Engine):
    """Eager decode views that read every stored row, as the graph engine's views do."""

    def _decode_view(self, rows: range, graph: bool = False) -> None:
        real = self.cache.select
        self.cache.select = lambda r: real(r).set_fixed_shapes(True)
        try:
            super()._decode_view(rows, graph)
        finally:
            del self.cache.select


def run(model, ps, params, cls=Engine, eager_buckets=False, **kw):
    engine = cls(model, max_batch=8, max_seq_len=128, prefill_chunk=16, step_token_budget=32, **kw)
    if eager_buckets:   # the graph engine's bucket steps, run eagerly
        def bucket_step(b):
            view = engine.cache.select(slice(0, b)).set_fixed_shapes(True)
            return lambda ids: model(ids.view(-1, 1), cache=view)[:, -1]
        engine._graph = bucket_step
    hs = []
    for i, p in enumerate(ps):
        hs.append(engine.submit(p, params))
        if i % 2:
            engine.step()
    engine.run_until_idle()
    return [[(e.token, e.logprob) for e in h] for h in hs]


def main() -> None:
    model = Transformer(ModelConfig.preset("tiny")).init_weights(seed=0).cuda().eval()
    g = torch.Generator().manual_seed(1)
    ps = [torch.randint(0, 2048, (3 + (11 * i) % 40,), generator=g).tolist() for i in range(12)]
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=0)
    runs = {"graph": run(model, ps, params, cuda_graphs=True),
            "graph-eager": run(model, ps, params, cuda_graphs=True, eager_buckets=True),
            "eager-fixed": run(model, ps, params, cls=FixedShapesEngine, cuda_graphs=False),
            "eager": run(model, ps, params, cuda_graphs=False)}
    ref = runs["graph"]
    for name, got in runs.items():
        tokens = all([t for t, _ in a] == [t for t, _ in b] for a, b in zip(got, ref))
        diff = max(abs(x[1] - y[1]) for a, b in zip(got, ref) for x, y in zip(a, b))
        print(f"{name:12s} tokens equal to graph: {tokens}   max |logprob - graph's|: {diff:.3e}")


if __name__ == "__main__":
    main()
