"""Short prompt chunks of one row as CUDA-graph replays: a prefix-cache hit's suffix without ~500 eager launches.

An eager forward of a few dozen tokens is bound by its launches (hundreds of kernels, each a Python call), not by
its GPU work, so a hit's short suffix costs about what a whole decode step costs without graphs. A chunk of n
tokens at most the largest bucket runs here instead, as a step of the smallest bucket b >= n: the chunk's ids,
then b - n padding ids, through one forward that reads every stored row (fixed shapes), framed by a cache
checkpoint and a rollback that keeps only the first n tokens (`dsv4.cache.rollback`: the ring slots and
compressor states the padding wrote are put back; entry rows only the padding completed stay, unread). The
logits of the chunk's last token come back. No host value is read, so after one eager call per (row, bucket)
(kernels compile, rollback tables are built) the step is captured and replayed (`GraphStep`); on a CPU, or where
the capture fails, the same step runs eagerly with the same arithmetic.

A chunk's arithmetic here is not the eager n-token forward's (b tokens through the GEMMs, every stored row read):
the same up to rounding. So the engine sends every chunk that fits here, whether a hit's suffix or a cold prompt's
last chunk, which keeps a hit's logits equal to a cold prefill of the same chunks.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from ..cache import KVCache
from ..generate.fused_verify import host_checkpoint
from ..generate.graphs import GraphStep
from ..generate.host import to_device

__all__ = ["PrefillGraphs", "padded_chunk"]

BUCKETS = (16, 32, 64, 128)
PAD_ID = 0   # the padding's id: any id in the vocabulary (its rows are rolled back)


def padded_chunk(model, cache: KVCache, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Append the first keep[0] of ids [1, b] (the rest padding) to the one-row `cache` and return the fp32 logits
    of the last kept token [1, vocab]. Device work only (a CUDA graph can capture it); the host mirror of the
    cache's position is the caller's (it advances by b here: `KVCache.end_rollback` sets it)."""
    ckpt = cache.checkpoint(ids.shape[1])
    h = model.hidden(ids, cache=cache)                                          # [1, b, R, C]
    last = h.gather(1, (keep - 1).view(-1, 1, 1, 1).expand(-1, 1, *h.shape[2:]))
    logits = model.logits(last)[:, -1]
    cache.rollback_on_device(ckpt, keep)
    return logits


class PrefillGraphs:
    """`graphs.run(row, ids)`: the chunk `ids` (an int64 array of n <= `max_tokens` ids) appended to row `row` of
    `cache`, as above; returns its last token's logits [1, vocab]. `takes(row, n)` says whether a chunk of n tokens
    at the row's position runs here (a bucket holds it and the row has room for the padding). At most
    `max_graphs` captured steps are kept (least recently used dropped)."""

    def __init__(self, model, cache: KVCache, max_tokens: int, cuda_graphs: bool = True, max_graphs: int = 32):
        # (a checkpoint covers at most a window of tokens)
        self.buckets = [b for b in BUCKETS if b <= cache.config.window_size]
        self.max_tokens = min(max_tokens, self.buckets[-1]) if self.buckets else 0
        self.model, self.cache = model, cache
        self.graphs = cuda_graphs and cache.positions.is_cuda
        self.max_graphs = max_graphs
        self._views: dict[int, KVCache] = {}
        self._steps: OrderedDict[tuple[int, int], GraphStep] = OrderedDict()
        self.counters = dict(chunks=0, replays=0, captures=0)

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None) if 0 < n <= self.max_tokens else None

    def takes(self, row: int, n: int) -> bool:
        b = self.bucket(n)
        return b is not None and self.cache.lengths()[row] + b <= self.cache.max_seq_len

    def run(self, row: int, ids: np.ndarray) -> torch.Tensor:
        n = len(ids)
        b = self.bucket(n)
        view = self._view(row)
        start = view.lengths()
        padded = np.full((1, b), PAD_ID, dtype=np.int64)
        padded[0, :n] = ids
        inputs = (to_device(padded, self.cache.positions.device), to_device([n], self.cache.positions.device))
        self.counters["chunks"] += 1
        if self.graphs:
            step = self._steps.get((row, b))
            if step is None:
                step = self._steps[row, b] = GraphStep(lambda x, k: padded_chunk(self.model, view, x, k), view, b,
                                                       inputs, warmup=1)
                while len(self._steps) > self.max_graphs:
                    self._steps.popitem(last=False)
            self._steps.move_to_end((row, b))
            captured = step.graph is not None
            try:
                logits = step(*inputs).clone()   # (a static buffer the next replay overwrites)
            except Exception:
                self._steps.pop((row, b), None)   # (not trusted again: captured afresh)
                raise
            if step.graph is not None:
                self.counters["replays" if captured else "captures"] += 1
        else:
            logits = padded_chunk(self.model, view, *inputs)
        view.end_rollback(host_checkpoint(start, b), [n])
        return logits

    def _view(self, row: int) -> KVCache:
        """Row `row` as a one-row view reading every stored row (the same view, so its graphs stay valid)."""
        if row not in self._views:
            self._views[row] = self.cache.select(row).set_fixed_shapes(True)
        return self._views[row]
