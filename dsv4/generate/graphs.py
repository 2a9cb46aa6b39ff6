"""One-token decode steps replayed from a captured CUDA graph, so decoding is not bound by kernel launches.

A decode step launches hundreds of small kernels (norms, mHC, the compressors' state updates, indexer,
attention, experts); at batch 1 launching them costs more than running them. The step has no host
synchronisation and, with the cache in fixed-shape mode (every stored row read, masked by position), the
same shapes every step, so it can be captured once and replayed. Outputs equal the eager step's.
"""
from __future__ import annotations

import warnings

import torch


class GraphDecoder:
    """`decoder(tokens)` appends one token to every row of `cache` and returns the logits [B, vocab].

    The first `warmup` calls run eagerly (kernels compile, allocations settle); the next one captures the step
    and every later call replays it. The returned logits live in a static buffer that the next call
    overwrites. Anything else that runs the model on this cache (a prefill) must come before the first call.
    """

    def __init__(self, model, cache, warmup: int = 2):
        if not cache.positions.is_cuda:
            raise ValueError("GraphDecoder needs a cache on a CUDA device (use the eager model elsewhere)")
        self.model, self.cache, self.warmup = model, cache, warmup
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.positions.device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self.eager = False  # set if the step could not be captured (an op that synchronises with the host)
        cache.set_fixed_shapes(True)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B] or [B, 1] ids on the cache's device -> fp32 logits [B, vocab]."""
        tokens = tokens.reshape(-1, 1)
        if tokens.shape[0] != self.tokens.shape[0]:
            raise ValueError(f"got {tokens.shape[0]} tokens for a cache of {self.tokens.shape[0]} rows")
        self.tokens.copy_(tokens)
        self.calls += 1
        if self.eager or (self.graph is None and self.calls <= self.warmup):
            return self._step()
        if self.graph is None:
            self.cache.check_intact()  # (a damaged cache is the caller's error, not a reason to decode eagerly)
            self._capture()
            if self.eager:
                return self._step()
        # the graph advances the device positions itself; the host commits only once the replay has run
        self.cache.begin_step(1)
        self.graph.replay()
        self.cache.end(1, device=False)
        return self.logits

    def _capture(self) -> None:
        """Capture one step. Capturing runs no kernel, so the cache is left as it was: the host-side bookkeeping
        the step's Python ran (positions mirror advanced, rows marked and cleared) is restored, whether the
        capture succeeds or not; the first replay then runs this step."""
        before = self.cache.host_state()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = self._step()
        except RuntimeError as e:
            warnings.warn(f"decode step could not be captured as a CUDA graph ({str(e).splitlines()[0]}); "
                          "decoding eagerly")
            self.eager = True
            return
        finally:
            self.cache.restore_host_state(before)
        self.graph = graph

    def _step(self) -> torch.Tensor:
        return self.model(self.tokens, cache=self.cache)[:, -1]
