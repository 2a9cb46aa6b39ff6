"""One-token decode steps replayed from a captured CUDA graph, so decoding is not bound by kernel launches.

A decode step launches hundreds of small kernels (norms, mHC, the compressors' state updates, indexer,
attention, experts); at batch 1 launching them costs more than running them. The step has no host
synchronisation and, with the cache in fixed-shape mode (every stored row read, masked by position), the
same shapes every step, so it can be captured once and replayed. Outputs equal the eager step's.

With `n_tokens` > 1 the step appends that many tokens per row (speculative decoding's verify) and, with
`checkpoint=True`, first takes the cache checkpoint (KVCache.checkpoint: device data alone) and returns the
hidden lanes with the logits; `rollback(keep)` then keeps keep[b] of the tokens per row, replayed from a second
graph (KVCache.rollback_on_device). A replay runs no Python, so the compressors' journal entries that the capture
recorded (static buffers each replay refills) are handed back to the cache after each replay.
"""
from __future__ import annotations

import warnings

import torch


class GraphDecoder:
    """`decoder(tokens)` appends one token to every row of `cache` and returns the logits [B, vocab]
    (`n_tokens` per row: [B, n_tokens, vocab]; with `checkpoint`, (hidden [B, n_tokens, R, C], logits) after
    taking `self.ckpt`, which `rollback` uses).

    The first `warmup` calls run eagerly (kernels compile, allocations settle); the next one captures the step
    and every later call replays it. The returned logits live in a static buffer that the next call
    overwrites. Anything else that runs the model on this cache (a prefill) must come before the first call.
    """

    def __init__(self, model, cache, warmup: int = 2, n_tokens: int = 1, checkpoint: bool = False):
        if not cache.positions.is_cuda:
            raise ValueError("GraphDecoder needs a cache on a CUDA device (use the eager model elsewhere)")
        self.model, self.cache, self.warmup = model, cache, warmup
        self.n_tokens, self.checkpoint = n_tokens, checkpoint
        device = cache.positions.device
        self.tokens = torch.zeros(cache.batch_size, n_tokens, dtype=torch.long, device=device)
        self.keep = torch.zeros(cache.batch_size, dtype=torch.long, device=device)   # rollback's input
        self.logits = None
        self.ckpt = None              # the checkpoint the last step took (the captured one once replaying)
        self.journal: list[list] | None = None   # per compressor state: the rows the captured step journals
        self.graph: torch.cuda.CUDAGraph | None = None
        self.rollback_graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self.eager = False  # set if the step could not be captured (an op that synchronises with the host)
        self.eager_rollback = False
        cache.set_fixed_shapes(True)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor):
        """tokens: [B, n_tokens] (or [B] for one) ids on the cache's device -> fp32 logits (see the class doc)."""
        tokens = tokens.reshape(tokens.shape[0], -1)
        if tokens.shape != self.tokens.shape:
            raise ValueError(f"got tokens {tuple(tokens.shape)} for a step of {self.n_tokens} token(s) on a cache of "
                             f"{self.tokens.shape[0]} rows")
        self.tokens.copy_(tokens)
        self.calls += 1
        if self.eager or (self.graph is None and self.calls <= self.warmup):
            return self._step()
        if self.graph is None:
            self.cache.check_intact()  # (a damaged cache is the caller's error, not a reason to decode eagerly)
            self._capture()
            if self.eager:
                return self._step()
        if self.checkpoint:   # the captured checkpoint's tensors refill on replay; its host side is this step's
            self.cache.check_intact()
            self.ckpt.starts = self.cache.lengths()
        # the graph advances the device positions itself; the host commits only once the replay has run
        self.cache.begin_step(self.n_tokens)
        self.graph.replay()
        self.cache.end(self.n_tokens, device=False)
        for st, rows in zip(self._states(), self.journal or ()):
            st.journal = list(rows)
        return self.logits

    @torch.no_grad()
    def rollback(self, keep: torch.Tensor) -> None:
        """Keep keep[b] ([B], device) of the last step's tokens per row: by device data alone, replayed from a
        graph once the step itself replays. The host positions are the caller's (KVCache.end_rollback)."""
        if not self.checkpoint or self.ckpt is None:
            raise RuntimeError("rollback needs a step taken with checkpoint=True")
        if self.graph is None or self.eager_rollback:   # an eager step's checkpoint is its own
            self.cache.rollback_on_device(self.ckpt, keep)
            return
        self.keep.copy_(keep)
        if self.rollback_graph is None:
            states = self._states()
            journals = [st.journal for st in states]
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.cache.rollback_on_device(self.ckpt, self.keep)
                self.rollback_graph = graph
            except RuntimeError as e:
                warnings.warn(f"speculative rollback could not be captured as a CUDA graph "
                              f"({str(e).splitlines()[0]}); rolling back eagerly")
                self.eager_rollback = True
            finally:
                for st, journal in zip(states, journals):
                    st.journal = journal
            if self.eager_rollback:
                self.cache.rollback_on_device(self.ckpt, self.keep)
                return
        self.rollback_graph.replay()
        for st in self._states():
            st.journal = None

    def _capture(self) -> None:
        """Capture one step. Capturing runs no kernel, so the cache is left as it was: the host-side bookkeeping
        the step's Python ran (positions mirror advanced, rows marked and cleared, journals opened) is restored,
        whether the capture succeeds or not; the first replay then runs this step."""
        before = self.cache.host_state()
        states = self._states()
        journals = [st.journal for st in states]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = self._step()
            if self.checkpoint:
                self.journal = [st.journal or [] for st in states]
        except RuntimeError as e:
            warnings.warn(f"decode step could not be captured as a CUDA graph ({str(e).splitlines()[0]}); "
                          "decoding eagerly")
            self.eager = True
            return
        finally:
            self.cache.restore_host_state(before)
            for st, journal in zip(states, journals):
                st.journal = journal
        self.graph = graph

    def _states(self) -> list:
        return [st for layer in self.cache.layers for st in layer.states()]

    def _step(self):
        if not self.checkpoint:
            return self.model(self.tokens, cache=self.cache)[:, -1]
        self.ckpt = self.cache.checkpoint(self.n_tokens)
        h = self.model.hidden(self.tokens, cache=self.cache)
        return h, self.model.logits(h)


class GraphStep:
    """`step(*inputs)`: fn(*inputs) -> outputs, a forward that appends n_tokens to every row of `cache`, replayed
    from a CUDA graph: after `warmup` eager calls the next one captures it, every later call copies the inputs
    into static buffers (same shapes as `example`) and replays. The outputs are static buffers the next call
    overwrites. As in GraphDecoder, the host bookkeeping of the cache advances around each replay."""

    def __init__(self, fn, cache, n_tokens: int, example: tuple[torch.Tensor, ...], warmup: int = 2):
        self.fn, self.cache, self.n_tokens, self.warmup = fn, cache, n_tokens, warmup
        self.inputs = tuple(torch.empty_like(x) for x in example)
        self.outputs = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls, self.eager = 0, False

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor):
        for buf, x in zip(self.inputs, inputs):
            if buf.shape != x.shape:
                raise ValueError(f"GraphStep input of shape {tuple(x.shape)}, captured for {tuple(buf.shape)}")
            buf.copy_(x)
        self.calls += 1
        if self.eager or (self.graph is None and self.calls <= self.warmup):
            return self.fn(*self.inputs)
        if self.graph is None:
            self.cache.check_intact()
            before = self.cache.host_state()
            try:
                self.graph = self._capture()
            except RuntimeError as e:
                warnings.warn(f"step could not be captured as a CUDA graph ({str(e).splitlines()[0]}); running it "
                              "eagerly")
                self.eager = True
            finally:
                self.cache.restore_host_state(before)
            if self.eager:
                return self.fn(*self.inputs)
        self.cache.begin_step(self.n_tokens)
        self._replay()
        self.cache.end(self.n_tokens, device=False)
        return self.outputs

    def _capture(self):
        """Capture fn on the static inputs (no kernel runs); `self.outputs` become its static outputs."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs = self.fn(*self.inputs)
        return graph

    def _replay(self) -> None:
        self.graph.replay()


class CacheGroup:
    """Several caches that one captured step appends n_tokens to each (speculative decoding's main and MTP caches
    in one graph): GraphStep's host bookkeeping (intact checks, position mirrors, damage marks) over all of them."""

    def __init__(self, *caches):
        self.caches = caches

    @property
    def layers(self) -> list:
        return [layer for c in self.caches for layer in c.layers]

    def check_intact(self) -> None:
        for c in self.caches:
            c.check_intact()

    def host_state(self) -> list:
        return [c.host_state() for c in self.caches]

    def restore_host_state(self, state: list) -> None:
        for c, s in zip(self.caches, state):
            c.restore_host_state(s)

    def begin_step(self, n_tokens: int) -> None:
        for c in self.caches:
            c.begin_step(n_tokens)

    def end(self, n_tokens: int, device: bool = True) -> None:
        for c in self.caches:
            c.end(n_tokens, device)
