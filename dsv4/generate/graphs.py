"""One-token decode steps replayed from a captured CUDA graph, so decoding is not bound by kernel launches.

A decode step launches hundreds of small kernels (norms, mHC, the compressors' state updates, indexer,
attention, experts); at batch 1 launching them costs more than running them. The step has no host
synchronisation and, with the cache in fixed-shape mode (every stored row read, masked by position), the
same shapes every step, so it can be captured once and replayed. Outputs equal the eager step's.

With `n_tokens` > 1 the step appends that many tokens per row (speculative decoding's verify) and, with
`hidden=True`, returns the hidden lanes too. A cache checkpoint open around a step (KVCache.checkpoint) makes the
compressors journal their token rows; a replay runs no Python, so the journal entries the capture recorded (static
buffers the replay refills) are handed to the open checkpoint after each replay.
"""
from __future__ import annotations

import warnings

import torch


class GraphDecoder:
    """`decoder(tokens)` appends one token to every row of `cache` and returns the logits [B, vocab]
    (`n_tokens` per row: [B, n_tokens, vocab]; with `hidden`, (hidden [B, n_tokens, R, C], logits)).

    The first `warmup` calls run eagerly (kernels compile, allocations settle); the next one captures the step
    and every later call replays it. The returned logits live in a static buffer that the next call
    overwrites. Anything else that runs the model on this cache (a prefill) must come before the first call.
    """

    def __init__(self, model, cache, warmup: int = 2, n_tokens: int = 1, hidden: bool = False):
        if not cache.positions.is_cuda:
            raise ValueError("GraphDecoder needs a cache on a CUDA device (use the eager model elsewhere)")
        self.model, self.cache, self.warmup = model, cache, warmup
        self.n_tokens, self.hidden = n_tokens, hidden
        self.tokens = torch.zeros(cache.batch_size, n_tokens, dtype=torch.long, device=cache.positions.device)
        self.logits = None
        self.journal: list[list] | None = None   # per compressor state: the rows the captured step journals
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self.eager = False  # set if the step could not be captured (an op that synchronises with the host)
        cache.set_fixed_shapes(True)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
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
        # the graph advances the device positions itself; the host commits only once the replay has run
        journals = [st.journal for st in self._states()]
        if any(j is not None for j in journals) and self.journal is None:
            raise RuntimeError("this step was captured with no cache checkpoint open: its replay cannot journal "
                               "the compressors' rows for a rollback (open the checkpoint before every call)")
        self.cache.begin_step(self.n_tokens)
        self.graph.replay()
        self.cache.end(self.n_tokens, device=False)
        for journal, rows in zip(journals, self.journal or ()):
            if journal is not None:
                journal.extend(rows)
        return self.logits

    def _capture(self) -> None:
        """Capture one step. Capturing runs no kernel, so the cache is left as it was: the host-side bookkeeping
        the step's Python ran (positions mirror advanced, rows marked and cleared) is restored, whether the
        capture succeeds or not; the first replay then runs this step."""
        before = self.cache.host_state()
        states = self._states()
        journals = [st.journal for st in states]
        for st, journal in zip(states, journals):   # a fresh list: the capture's entries are kept apart
            st.journal = None if journal is None else []
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = self._step()
            if all(j is not None for j in journals) and journals:
                self.journal = [st.journal for st in states]
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
        if self.n_tokens == 1 and not self.hidden:
            return self.model(self.tokens, cache=self.cache)[:, -1]
        h = self.model.hidden(self.tokens, cache=self.cache)
        logits = self.model.logits(h)
        return (h, logits) if self.hidden else logits
