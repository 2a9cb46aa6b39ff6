"""Continuous batching over a fixed pool of cache rows: requests join and leave the running batch at every step.

One cache of `max_batch` rows is made once. A request takes the lowest free row (reset first) when its prefill
is about to start, and each engine step runs, in order:

  1. cancellations (a client hung up): the request ends with "abort" and its row is free again;
  2. decode: every decoding row gets one token. A forward advances every row of its cache view, so a view never
     covers a row still prefilling; free rows inside a view are fed a dummy token and are reset before they are
     handed out. With `batch_invariant` on a CPU each decoding row is its own view (CPU matmuls sum a row
     differently at batch 1 and batch 4, so batching would make a request's tokens depend on its neighbours);
     on a GPU the rows run batched, in runs split at prefilling rows, under `dsv4.ops.batch_invariant()`, and
     with `cuda_graphs` a step with no prefilling row below the smallest captured bucket holding every decoding
     row replays that bucket's CUDA graph. Eager decode steps then read every stored row (masked by position)
     as the graphs do, so a row's arithmetic is the same whether its step was replayed or ran eagerly;
  3. prefill, with what is left of `step_token_budget` after the decode's tokens: rounds of whole chunks, each
     round one chunk of each of up to `max_prefill_rows` requests, the oldest first, then queued requests
     admitted (a free row; with a prefix cache the longest stored prefix is loaded: a prompt stored whole, with
     its logits, runs no chunk and samples its first token at once) while budget and rows last;
     a step always runs at least one chunk, and a chunk that does not fit waits, with everything behind it, for
     the next step. Admission only when a chunk runs keeps rows of waiting requests free, so they never split a
     decode or keep it from replaying its graph. Chunk boundaries are fixed by the request alone (every
     `prefill_chunk` tokens from where its prefill starts, plus the prefix cache's save boundaries), the
     boundaries `dsv4.generate` uses. With `batch_invariant` off a round's chunks of equal length run as one
     forward over their rows, each row at its own position (a forward feeds every row the same number of tokens,
     so other lengths run as forwards of their own; adjacent rows go through a view of the cache, others through
     a copy of the rows written back after): the GEMMs see 8 prompts of 1K tokens as one 8K-token batch. Batching
     changes a row's arithmetic only at the rounding level, as batched decode does, so it is left off with
     `batch_invariant` on: a chunk then runs on its request's row alone, in shapes the request fixes, so it uses
     the fastest kernels and a prompt's logits never depend on what else is queued (bitwise); batch-invariant
     kernels for prefill would cost ~10x. A prompt whose last chunk runs samples its first token at once;
  4. each row's logits are sampled with the request's own parameters and seeded generator; the token (with
     logprobs if asked, from the untempered logits as OpenAI reports them) is sent to the request's stream;
     a stop token, end of sequence, `max_tokens` or non-finite logits ends it and frees its row.

A decode step's inputs are the rows' last sampled tokens, kept on the device (`_next`), so launching a step needs
nothing from the host. With `overlap` (the default on a GPU) step 4 is deferred: a step launches its decode, then
hands out the previous step's results (the host's stop checks, events and row frees run while the device computes
this step), then prefills. A request seen to end at step t has already been fed to step t + 1: that slot's result is
dropped, and the row, freed after the launch, holds one token more (saved with it to the prefix cache). A request
gets the same events either way (the one sampled token per step, from its own generator, is the same; bitwise
with `batch_invariant`, otherwise up to the rounding-level effects of a batch that holds that one extra row).
`trace=path` writes one JSON line per step (`dsv4.serve.steptrace`; `bench/engine_trace.py` summarises it).

A request that ends saves its row to the prefix cache (the tokens the row holds, no tail) in two parts: a copy of
the row's state taken at once (`PrefixCache.snapshot`: queued on the device before anything can reset or advance
the row), stored (hashed, indexed: `save_snapshot`) `saves_per_step` per step once the step's forwards are launched,
all of them when the engine idles or stops, and before a lookup every queued one its prompt extends (the next turn
of a chat hits it). `warm_up()` runs the shapes serving meets (prompt chunks of one and many rows, every CUDA-graph
bucket) before any request, leaving the engine as it was.

With `speculative="mtp"` the model's MTP block drafts `n_draft` tokens per decoding row and one main forward over
the same decode views verifies them (`dsv4.generate.speculative`): prefill chunks also fill the MTP cache, the
first token is chosen at the row's first speculative step, each accepted token goes out as its own event, and a
row's stop tokens and `max_tokens` bound what it emits (its token budget). Free rows in a view ride along with
budget 0 (rolled back whole). The draft count shrinks near `max_seq_len`, so no extra room is asked at submit.
Drafts, acceptance and the next tokens stay on the device and come to the host in one wait per step. With
`cuda_graphs` a step with no prefilling row below the smallest bucket holding every decoding row replays that
bucket's captured graphs: the verify forward over 1 + n_draft tokens per row with its cache checkpoint (one graph
per bucket and verify width), the rollback of the rejected tokens (by device data), the further drafts' MTP
forwards and, for a single row, its MTP catch-up; the sampling and acceptance run eagerly between them. Eager
speculative steps read every stored row as the graphs do. Prompts are prefilled one request per forward
(`SpeculativeDecoder.extend` fills one row of both caches). A lone greedy row with nothing else pending (no queued
request, no prefilling row; with `cuda_graphs`, on row 0) decodes through a `SpeculativeDecoder.greedy_row_stream`
held across steps, each of its steps launched before the previous one's results are read (so sending a step's
tokens overlaps the device's next step); the stream is closed, its step in flight settled and that step's tokens
sent, as soon as anything else is pending, the request ends or the engine stops, and the batched steps go on from
the same caches. Its steps read fixed shapes, as graphs do: without graphs its logprobs can differ from the batched
steps' in the last bits (greedy tokens only on a near tie).

With `prefill_graphs=N` a prompt chunk of one request of at most N tokens (a prefix-cache hit's suffix, a short
prompt, a prompt's last chunk) runs as a padded step replayed from a CUDA graph captured per (row, step size)
(`dsv4.serve.prefill_graphs`): an eager forward of a few dozen tokens costs its launches, not its GPU work. Such
chunks run one row per forward, for cold prompts and hits alike, so a hit's logits still equal a cold prefill's.

A forward that raises (out of memory, a kernel fault) fails only the requests whose rows it ran on (for a batched
prefill, every request of the forward) with finish_reason "error"; those rows (and any the cache marks damaged) are
reset and the engine keeps serving.
"""
from __future__ import annotations

import contextlib
import itertools
import operator
import random
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from .. import ops
from ..errors import InvalidArgument
from ..generate.graphs import GraphDecoder
from ..generate.host import HostCopy, to_device
from ..generate.host import to_host as _to_host
from ..generate.sampling import SamplingConfig, sample
from ..generate.speculative import SpeculativeDecoder, StepResult
from .prefill_graphs import PrefillGraphs
from .handle import RequestHandle
from .rows import Phase, RowPool, bucket_for, decode_runs
from .steptrace import StepTrace
from .types import QueueFull, SamplingParams, TokenEvent

__all__ = ["Engine", "RequestHandle"]

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(eq=False)
class _Request:
    handle: RequestHandle
    ids: np.ndarray                     # the prompt as int64 ids (what the prefix cache hashes and the forwards read)
    params: SamplingParams
    seed: int
    row: int | None = None
    done: int = 0                       # prompt tokens in the cache
    stored: int = 0                     # the longest prompt prefix the prefix cache holds (loaded or saved by it)
    stops: list[int] = field(default_factory=list)   # prefill chunk ends still to reach
    saves: set[int] = field(default_factory=set)     # prefix lengths to store on the way
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    sampling: SamplingConfig | None = None


@dataclass(eq=False)
class _Pending:
    """A sampled step on its way to the host: rows[i]'s token for reqs[i] (None: a free row riding along), the
    finiteness flags and the asked-for logprobs (`want`: the indices that asked)."""
    reqs: list[_Request | None]
    want: list[int]
    fetch: list[torch.Tensor]
    copy: HostCopy | None = None


@dataclass(eq=False)
class _Stream:
    """A lone greedy speculative row decoding as `SpeculativeDecoder.greedy_row_stream` across engine steps: its
    request, the generator, and where a close puts the StepResult of the step it settles (`settled`)."""
    req: _Request
    steps: Iterator[StepResult]
    graphs: bool
    settled: list[StepResult]


class Engine:
    """Serves many requests on one model: `submit(prompt, params)` returns a RequestHandle whose events stream
    as the background loop (`start()`) or explicit `step()` calls produce them. See the module doc."""

    def __init__(self, model, tokenizer=None, *, max_batch: int = 64, max_seq_len: int = 4096,
                 kv_dtype: str = "auto", index_dtype: str = "auto", prefill_chunk: int = 2048,
                 step_token_budget: int = 8192, max_prefill_rows: int = 16, max_queue: int = 256,
                 eos_token_ids: Sequence[int] = (),
                 prefix_cache=None, speculative: str | None = None, n_draft: int = 1, cuda_graphs: bool = True,
                 batch_invariant: bool = True, overlap: bool | None = None, trace: str | None = None,
                 saves_per_step: int = 2, prefill_graphs: int = 0):
        for name, value in (("max_batch", max_batch), ("max_seq_len", max_seq_len),
                            ("prefill_chunk", prefill_chunk), ("step_token_budget", step_token_budget),
                            ("max_prefill_rows", max_prefill_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"Engine {name}={value!r}: must be a positive integer")
        if isinstance(saves_per_step, bool) or not isinstance(saves_per_step, int) or saves_per_step < 0:
            raise InvalidArgument(f"Engine saves_per_step={saves_per_step!r}: must be an integer >= 0")
        if isinstance(prefill_graphs, bool) or not isinstance(prefill_graphs, int) or prefill_graphs < 0:
            raise InvalidArgument(f"Engine prefill_graphs={prefill_graphs!r}: must be a token count >= 0")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise InvalidArgument(f"Engine max_queue={max_queue!r}: must be an integer >= 0")
        if speculative not in (None, "mtp"):
            raise InvalidArgument(f"Engine speculative={speculative!r}: must be None or 'mtp'")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.prefill_chunk, self.step_token_budget, self.max_queue = prefill_chunk, step_token_budget, max_queue
        self.max_prefill_rows = max_prefill_rows
        eos = list(eos_token_ids)
        if not eos and getattr(tokenizer, "eos_id", None) is not None:
            eos = [tokenizer.eos_id]
        self.eos_token_ids = frozenset(int(t) for t in eos)
        self.prefix_cache = prefix_cache
        self.batch_invariant = batch_invariant
        self.batched_prefill = not batch_invariant and speculative is None   # (see the module doc)
        self.vocab_size = model.config.vocab_size
        self.device = model.embed.weight.device
        if batch_invariant and self.device.type == "cuda" and model.embed.weight.dtype == torch.float32:
            warnings.warn("Engine batch_invariant: the batch-invariant GPU kernels cover bf16 / fp16 models; with this "
                          "float32 model a request's logprobs can still change with the batch in the last bits "
                          "(convert it with model.to_dtype(torch.bfloat16))", stacklevel=2)
        self.cache = model.new_cache(max_batch, max_seq_len, kv_dtype, index_dtype)
        self.speculative = speculative
        self.spec = SpeculativeDecoder(model, self.cache, n_draft=n_draft) if speculative == "mtp" else None
        self.pool = RowPool(max_batch)
        self._rows: list[_Request | None] = [None] * max_batch
        self._queue: list[_Request] = []
        self._admitted: list[_Request] = []          # prefilling requests, oldest first
        self._lock = threading.Condition()           # guards the queue and wakes the loop
        self._step_lock = threading.Lock()           # one step at a time (the loop or a caller's step())
        self._ids = itertools.count()
        self._seeds = random.Random()
        self._thread: threading.Thread | None = None
        self._stopping = False
        use_graphs = cuda_graphs and self.cache.positions.is_cuda
        self.graph_buckets = sorted({b for b in GRAPH_BUCKETS if b < max_batch} | {max_batch}) if use_graphs else []
        self._graphs: dict[int, GraphDecoder] = {}
        self._spec_graphs: dict[tuple[int, int], GraphDecoder] = {}   # (bucket, verify width) -> graph
        if self.spec is not None and use_graphs:
            self.spec.fixed_shapes = self.spec.graph_drafts = True
        # Decode inputs stay on the device: each row's last sampled token. With `overlap` (default: on a GPU, and
        # never with `speculative`) a step's results go to the host while the next step runs (see the module doc).
        self.overlap = (self.device.type == "cuda" if overlap is None else bool(overlap)) and speculative is None
        self._next = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        # prompt chunks of one row up to this many tokens: padded steps, replayed from CUDA graphs with `cuda_graphs`
        # on a GPU (dsv4.serve.prefill_graphs); never with `speculative` (its prefill fills the MTP cache too)
        self.prefill_graphs = (PrefillGraphs(model, self.cache, prefill_graphs, cuda_graphs=cuda_graphs)
                               if prefill_graphs and speculative is None else None)
        if self.prefill_graphs is not None and not self.prefill_graphs.max_tokens:
            self.prefill_graphs = None
        self._pending: deque[_Pending] = deque()
        self._stream: _Stream | None = None   # a lone greedy speculative row's held stream (see `_stream_step`)
        # end-of-request and prompt-end prefix saves: the row's state copied when the request ends (or its prompt's
        # last chunk has run), stored (hashed, indexed) `saves_per_step` per step once the step's forwards are
        # launched (see `_finish`, `_save_prefix`)
        self.saves_per_step = saves_per_step
        self._saves: deque = deque()
        self._fresh: set[int] = set()   # ids of the prompt-end snapshots this step queued (stored from the next one)
        self.trace = StepTrace(trace, dict(max_batch=max_batch, overlap=self.overlap, speculative=speculative,
                                           graph_buckets=self.graph_buckets, step_token_budget=step_token_budget,
                                           max_prefill_rows=max_prefill_rows, prefill_chunk=prefill_chunk,
                                           device=str(self.device))) if trace else None
        self.counters = dict(prefill_tokens=0, decode_tokens=0, prefix_lookup_tokens=0, prefix_hit_tokens=0,
                             spec_drafted=0, spec_accepted=0, requests_finished=0, requests_failed=0,
                             requests_cancelled=0, steps=0)

    # ------------------------------------------------------------------ the public surface
    def submit(self, prompt: Sequence[int], params: SamplingParams) -> RequestHandle:
        """Queue a request (thread-safe). Raises InvalidArgument for a bad prompt or parameters, QueueFull when
        `max_queue` requests are already waiting for a row."""
        if not isinstance(params, SamplingParams):
            raise InvalidArgument(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = self._prompt_ids(prompt)
        if len(ids) + params.max_tokens > self.max_seq_len:
            raise InvalidArgument(f"prompt of {len(ids)} tokens + max_tokens={params.max_tokens} exceeds the "
                                  f"engine's max_seq_len={self.max_seq_len}")
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            handle = RequestHandle(f"req-{next(self._ids)}", len(ids), self)
            self._queue.append(_Request(handle, ids, params, seed))
            self._lock.notify_all()
        return handle

    def start(self) -> "Engine":
        """Run steps on a background thread until stop() (idempotent)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="dsv4-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background loop (after its current step); requests in flight stay where they are."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._thread = None
        with self._step_lock:
            self._end_stream()   # (no step left in flight: its tokens go out now)
            self._drain_saves()
        if self.trace is not None:
            self.trace.flush()

    def stats(self) -> dict:
        with self._lock:
            queue_len = len(self._queue)
        return dict(self.counters, queue_len=queue_len, running=self.pool.busy, max_batch=self.max_batch)

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._queue) or self.pool.busy > 0

    @torch.no_grad()
    def step(self) -> None:
        """One engine step (see the module doc). The background loop calls it; tests may call it directly."""
        with self._step_lock, self._steady_weights():
            trace = self.trace
            if trace is not None:
                trace.begin()
                before = self.counters["prefill_tokens"]
            self.counters["steps"] += 1
            self._fresh.clear()
            self._reap_cancelled()
            earlier = len(self._pending)
            decoded = self._decode()
            # with overlap: the earlier steps' results, while this step's decode runs on the device
            self._deliver_pending(keep=len(self._pending) - earlier)
            self._prefill(self.step_token_budget - decoded)
            if self.pool.busy == 0:   # only rows whose requests have ended rode along: nothing left to hand out
                self._deliver_pending()
            # (the device runs this step's forwards meanwhile; an idle engine stores the rest at once)
            self._drain_saves(None if not self.has_work else self.saves_per_step, fresh=False)
            if trace is not None:
                trace.end(prefill_tokens=self.counters["prefill_tokens"] - before, queue=len(self._queue),
                          running=self.pool.busy, pending=len(self._pending))

    @torch.no_grad()
    def warm_up(self, prompts: Sequence[tuple] | None = None, buckets: bool = True) -> float:
        """Run the shapes serving will meet before any request arrives, so that kernel compilation (Triton JIT,
        torch.compile's static then dynamic compiles of the cache codecs) and CUDA-graph capture do not land on
        the first requests' steps; returns the seconds it took. The engine must be idle and not yet started.

        Synthetic greedy requests go through the engine's own steps, in groups run one after the other:
        `prompts`, a list of (requests, prompt length[, max_tokens[, temperature]]) groups (default max_tokens 2,
        greedy; on a GPU: one prompt of a whole chunk, `max_prefill_rows` shorter ones batched, one of a chunk
        and 3 tokens, which runs a chunk at a later position, and half as many rows of longer prompts: the static
        and dynamic compiles of one and many rows; on a CPU, one 2-token prompt), then,
        with `buckets`, b requests for each CUDA-graph bucket b, decoding together long enough for the bucket's
        graphs (speculative ones too, for greedy and sampled rows) to be captured. Nothing of it shows afterwards:
        every row is reset and free, and the counters, the prefix cache (not used meanwhile) and the trace (not
        written) are as they were.
        """
        with self._lock:
            if self._queue or self.pool.busy or (self._thread is not None and self._thread.is_alive()):
                raise RuntimeError("Engine.warm_up needs an idle engine that has not been started")
        t0 = time.perf_counter()
        self._drain_saves()   # (the prefix cache is set aside meanwhile)
        groups = list(self._warm_up_prompts() if prompts is None else prompts)
        if buckets:   # (rows admitted max_prefill_rows per round, then 2 eager calls, a capture and a replay)
            tokens_per_step = 1 + (self.spec.n_draft if self.spec is not None else 0)
            per_step = max(1, min(self.max_prefill_rows, self.step_token_budget // 3))   # (admissions per step)
            for temperature in (0.0, 1.0) if self.spec is not None else (0.0,):   # (greedy steps run fused)
                groups += [(b, 2, (5 + -(-b // per_step)) * tokens_per_step, temperature) for b in self.graph_buckets]
        saved = (dict(self.counters), self.prefix_cache, self.trace,
                 dict(self.spec.stats) if self.spec is not None else None)
        self.prefix_cache, self.trace = None, None
        try:
            for group in groups:
                n_reqs, length = int(group[0]), int(group[1])
                max_tokens = int(group[2]) if len(group) > 2 else 2
                temperature = float(group[3]) if len(group) > 3 else 0.0
                length = max(1, min(length, self.max_seq_len - max_tokens))
                if n_reqs < 1 or length + max_tokens > self.max_seq_len:
                    continue
                with self._lock:
                    for i in range(min(n_reqs, self.max_batch)):
                        prompt = (7 * i + np.arange(length, dtype=np.int64)) % self.vocab_size
                        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True)
                        self._queue.append(_Request(RequestHandle(f"warm-up-{i}", length, self), prompt, params, i))
                self.run_until_idle()
        finally:
            self._reset_rows()
            self.counters.clear()
            self.counters.update(saved[0])
            self.prefix_cache, self.trace = saved[1], saved[2]
            if self.spec is not None:
                self.spec.stats.clear()
                self.spec.stats.update(saved[3])
        return time.perf_counter() - t0

    def _warm_up_prompts(self) -> list[tuple[int, int]]:
        """The default prompt groups of `warm_up` (see there)."""
        if self.device.type != "cuda":
            return [(1, 2)]
        rows = min(self.max_prefill_rows, self.max_batch)
        chunk = max(2, min(self.prefill_chunk, self.step_token_budget))
        short = max(2, min(chunk // 2, self.step_token_budget // rows))
        if short % 16 == 0:   # (Triton specialises integer arguments divisible by 16: meet both kinds)
            short -= 1
        groups = [(1, chunk), (rows, short), (1, chunk + 3)]
        if rows > 2:   # (a load's usual batch: fewer rows of longer chunks, a multiple of 16, e.g. 8 x 1K)
            groups.append((rows // 2, max(2, min(chunk, self.step_token_budget // (rows // 2)) // 16 * 16)))
        if self.prefill_graphs is not None:   # each padded step size on row 0 twice: kernels compiled, then its
            top = self.prefill_graphs.bucket(self.prefill_graphs.max_tokens)   # graph captured (other rows capture
            groups += [(1, b) for b in self.prefill_graphs.buckets if b <= top for _ in range(2)]   # on their 2nd)
        return groups

    def _reset_rows(self) -> None:
        """Every row empty and free, its next input 0: as a new engine's."""
        self._deliver_pending()
        for r in range(self.max_batch):
            if self._rows[r] is not None:
                self._finish(self._rows[r], TokenEvent(None, finish_reason="abort"))
        self._queue.clear()
        self._admitted.clear()
        self.cache.reset()
        if self.spec is not None:
            self.spec.mtp_cache.reset()
            for r in range(self.max_batch):
                self.spec.release(r)
        self._next.zero_()

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Step until no request is queued or running (for scripts and tests without the background thread)."""
        for _ in range(max_steps):
            if not self.has_work:
                return
            self.step()
        raise RuntimeError(f"engine still busy after {max_steps} steps")

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            if self.trace is not None and not self.has_work:
                self.trace.flush()   # (an idle engine: its trace is on disk while nothing happens)
            with self._lock:
                self._lock.wait_for(lambda: self._stopping or self._queue or self.pool.busy > 0)
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a bug outside any one forward: end the running requests, keep serving
                warnings.warn(f"engine step failed ({type(e).__name__}: {e}); its running requests end with error")
                self._fail([r for r, req in enumerate(self._rows) if req is not None], e)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _prompt_ids(self, prompt: Sequence[int]) -> np.ndarray:
        """The prompt's token ids as a new int64 array (converted once, here: the prefix cache hashes it and the
        forwards read it), or InvalidArgument naming the first bad id. An integer array (what the HTTP API sends)
        costs one copy; a list of ints a few C-speed passes (a 32K-token prompt in ~2 ms)."""
        if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__len__"):
            raise InvalidArgument(f"prompt must be a list of token ids, got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise InvalidArgument("prompt is empty: give at least one token id")
        ids = None
        if type(prompt) is list and operator.countOf(map(type, prompt), int) == len(prompt):
            try:
                ids = np.fromiter(prompt, dtype=np.int64, count=len(prompt))
            except OverflowError:   # an id beyond int64: the loop below names it
                ids = None
        elif isinstance(prompt, np.ndarray) and prompt.ndim == 1 and prompt.dtype.kind in "iu":
            ids = prompt.astype(np.int64)   # (a copy, as the caller may reuse its array; a wrapped uint64 is < 0)
        if ids is not None and 0 <= ids.min() and ids.max() < self.vocab_size:
            return ids
        tokens = []   # anything else, token by token, so that an error names the first bad one
        for i, t in enumerate(prompt):
            if isinstance(t, bool) or not hasattr(t, "__index__"):
                raise InvalidArgument(f"prompt[{i}]={t!r}: token ids must be integers")
            t = int(t)
            if not 0 <= t < self.vocab_size:
                raise InvalidArgument(f"prompt[{i}]={t}: token id out of the vocabulary [0, {self.vocab_size})")
            tokens.append(t)
        return np.asarray(tokens, dtype=np.int64)

    # ------------------------------------------------------------------ step parts
    def _reap_cancelled(self) -> None:
        with self._lock:
            gone = [q for q in self._queue if q.handle.cancelled]
            self._queue = [q for q in self._queue if not q.handle.cancelled]
        for req in gone + [r for r in self._rows if r is not None and r.handle.cancelled]:
            self._finish(req, TokenEvent(None, finish_reason="abort"))

    def _admit(self, budget: int | None = None) -> _Request | None:
        """The oldest queued request on the lowest free row (None when none waits or every row is busy), its
        chunk stops set and any stored prefix of its prompt loaded. A request whose whole prompt is stored with
        its tail (a full hit) needs no prefill: it decodes from the next step (its first token sampled now from
        the stored logits, or chosen at its first speculative step), and the next queued request is admitted.
        With `budget`, a request whose first chunk might not fit it stays queued (None): a first chunk is at
        most min(prefill_chunk, prompt length) tokens, a stored prefix only shortens it. A row taken for a chunk
        that waits would hold a prefilling row through the next step's decode, which then cannot replay its
        CUDA graph."""
        while True:
            with self._lock:
                if not self._queue or Phase.FREE not in self.pool.phase:
                    return None
                if budget is not None and min(self.prefill_chunk, len(self._queue[0].ids)) > budget:
                    return None
                req = self._queue.pop(0)
            row = self.pool.take()
            req.row = row
            self._rows[row] = req
            view = self.cache.select(row).reset()
            if self.spec is not None:
                self.spec.begin(row)
            req.sampling = SamplingConfig(temperature=req.params.temperature, top_p=req.params.top_p,
                                          top_k=req.params.top_k)
            if req.params.temperature > 0:
                req.generator = torch.Generator(device=self.device).manual_seed(req.seed)
            start, tail = self._load_prefix(req, view)
            req.done = req.handle.cached_tokens = start
            if tail is not None:   # a full hit
                self.pool.phase[row] = Phase.DECODE
                if self.spec is None:
                    self._emit([req], tail["logits"].unsqueeze(0))
                continue
            n = len(req.ids)
            req.stops = sorted(set(range(start + self.prefill_chunk, n, self.prefill_chunk)) | req.saves | {n})
            self._admitted.append(req)
            return req

    def _load_prefix(self, req: _Request, view) -> tuple[int, dict | None]:
        """Load the longest stored prefix of the request's prompt into its (reset) row and set the saves of its
        prefill: (its length, and for a full hit the tail the prompt's last forward left, with which the row
        continues). A prefix cache with `load_full` may return the whole prompt; one without, shorter ones."""
        if self.prefix_cache is None:
            return 0, None
        n, start, tail = len(req.ids), 0, None
        self._drain_saves(prompt=req.ids)   # (a queued save this prompt extends may serve it)
        load_full = getattr(self.prefix_cache, "load_full", None)
        try:
            if load_full is not None:
                start, tail = load_full(view, req.ids, self._tail_names())
                start = int(start)
            else:
                start = int(self.prefix_cache.load(view, req.ids))
            if not 0 <= start < n + (tail is not None) or view.lengths() != [start]:
                raise RuntimeError(f"prefix cache loaded {start} tokens of a {n}-token prompt into a row at "
                                   f"position {view.lengths()[0]}")
            if tail is not None and self.spec is not None:
                self.spec.resume(req.row, tail)
        except Exception as e:  # a broken prefix cache costs the hit, never the request
            warnings.warn(f"prefix cache load failed ({e}); prefilling the whole prompt")
            view.reset()
            if self.spec is not None:
                self.spec.begin(req.row)
            start, tail = 0, None
        self.counters["prefix_lookup_tokens"] += n
        self.counters["prefix_hit_tokens"] += start
        req.stored = start
        boundaries = getattr(self.prefix_cache, "boundaries", None)
        points = boundaries(n, int(req.ids[-1])) if load_full else boundaries(n) if boundaries else [n]
        req.saves = {b for b in points if b > start}
        return start, tail

    def _tail_names(self) -> tuple[str, ...]:
        """What a full hit needs besides the row's state: the next token's logits (and, speculating, the last
        position's lanes: `SpeculativeDecoder.tail`)."""
        return ("logits",) if self.spec is None else ("logits", "hidden")

    def _prefill(self, budget: int) -> None:
        """Rounds of prompt chunks under `budget` tokens (at least one chunk per step; see the module doc)."""
        ran = False
        while not ran or budget > 0:
            picked, budget = self._pick_round(budget, first=not ran)
            if not picked:
                return
            ran = True
            if not self.batched_prefill:
                for req in picked:
                    self._trace_prefill(1)
                    self._prefill_rows([req])
                continue
            by_length: dict[int, list[_Request]] = {}
            for req in picked:   # one forward takes chunks of one length: [B, S] tokens
                by_length.setdefault(req.stops[0] - req.done, []).append(req)
            for length, group in by_length.items():
                if self.prefill_graphs is not None and self.prefill_graphs.bucket(length) is not None:
                    for req in group:   # (one row per padded step)
                        self._trace_prefill(1)
                        self._prefill_rows([req])
                    continue
                self._trace_prefill(len(group))
                self._prefill_rows(sorted(group, key=lambda r: r.row))

    def _trace_prefill(self, rows: int) -> None:
        if self.trace is not None:
            self.trace.add("prefill_forwards", 1)
            self.trace.add("prefill_rows", rows)

    def _pick_round(self, budget: int, first: bool) -> tuple[list[_Request], int]:
        """One round: the next chunk of each prefilling request, the oldest first, then of newly admitted ones,
        while the chunks fit `budget` (the first chunk of a step's first round always does) and
        `max_prefill_rows` is not reached. Returns the requests and the budget left."""
        picked: list[_Request] = []

        def take(req: _Request) -> bool:
            nonlocal budget
            n = req.stops[0] - req.done
            if n > budget and not (first and not picked):
                return False
            picked.append(req)
            budget -= n
            return True
        for req in list(self._admitted):
            if len(picked) == self.max_prefill_rows or not take(req):
                return picked, budget   # nobody jumps a chunk that waits for the next step
        while len(picked) < self.max_prefill_rows and budget > 0:
            req = self._admit(None if first and not picked else budget)
            if req is None or not take(req):
                break
        return picked, budget

    def _prefill_rows(self, reqs: list[_Request]) -> None:
        """Run the next prompt chunk (all of one length) of each request in one forward; a prompt whose last
        chunk ran samples its first token. A forward that raises ends all of them with "error"."""
        rows, stop = [req.row for req in reqs], [req.stops[0] for req in reqs]
        adjacent = rows == list(range(rows[0], rows[0] + len(rows)))
        try:
            if self.spec is not None:   # (batched_prefill is off: one request)
                req = reqs[0]
                logits = self.spec.extend(req.row, req.ids[req.done:stop[0]].tolist()).unsqueeze(0)
            elif len(reqs) == 1 and self.prefill_graphs is not None and \
                    self.prefill_graphs.takes(rows[0], stop[0] - reqs[0].done):
                logits = self.prefill_graphs.run(rows[0], reqs[0].ids[reqs[0].done:stop[0]])   # [1, vocab]
            else:
                # [B, S] on the host: the model checks them there and sends them on without waiting for the device
                ids = torch.from_numpy(np.stack([req.ids[req.done:e] for req, e in zip(reqs, stop)]))
                view = self.cache.select(slice(rows[0], rows[-1] + 1)) if adjacent else self.cache.gather_rows(rows)
                logits = self.model(ids, cache=view, last_only=True)[:, -1]
                if not adjacent:
                    self.cache.scatter_rows(rows, view)
        except Exception as e:
            self._fail(rows, e)
            return
        started: list[int] = []
        saves: list[tuple[int, int, _Request, int]] = []
        for i, (req, end) in enumerate(zip(reqs, stop)):
            self.counters["prefill_tokens"] += end - req.done
            req.done = req.stops.pop(0)
            if end in req.saves:
                saves.append((i, req.row, req, end))
                req.stored = end
            if end == len(req.ids):
                self._admitted.remove(req)
                self.pool.phase[req.row] = Phase.DECODE
                started.append(i)
        if started and self.spec is None:   # speculative rows choose their first token at their first step
            # (some rows: indexed by a tensor sent ahead; a list index would be a blocking copy, a wait on the device)
            picked = logits if len(started) == len(reqs) else logits.index_select(0, to_device(started, self.device))
            self._emit([reqs[i] for i in started], picked)
        # then the saves, with the tail of the chunk's forward (a request of exactly these tokens then needs none):
        # a first token (without overlap, a whole request of one token) goes out before their copies and hashing.
        # The rows are as the forward left them: a request that ended above only had its row marked free.
        for i, row, req, end in saves:
            tail = {"logits": logits[i]} if self.spec is None else self.spec.tail(row)
            self._save_prefix(self.cache.select(row), req.ids[:end], tail=tail, defer=end == len(req.ids))

    def _decode(self) -> int:
        """One step of every decoding row; returns the tokens it fed (one per decoding row), which the step's
        prefill budget leaves to it."""
        if self.spec is not None:
            streamed = self._streamable()
            if streamed is not None:
                self._stream_step(streamed)
                return 1
            self._end_stream()
        phase = self.pool.phase
        decoding = self.pool.rows(Phase.DECODE)
        if not decoding:
            return 0
        hi = decoding[-1] + 1
        bucket = bucket_for(hi, self.graph_buckets)
        if self.spec is not None:
            if bucket is not None and Phase.PREFILL not in phase[:bucket]:
                self._spec_view(range(bucket), graph=True)
                return len(decoding)
            runs = ([range(r, r + 1) for r in decoding] if self.batch_invariant and not self.cache.positions.is_cuda
                    else decode_runs(list(phase)))
            for rows in runs:
                self._spec_view(rows)
            return len(decoding)
        if bucket is not None and Phase.PREFILL not in phase[:bucket]:
            self._decode_view(range(bucket), graph=True)
        elif self.batch_invariant and not self.cache.positions.is_cuda:
            for r in decoding:
                self._decode_view(range(r, r + 1))
        else:
            for rows in decode_runs(list(phase)):
                self._decode_view(rows)
        return len(decoding)

    def _decode_view(self, rows: range, graph: bool = False) -> None:
        """One token for every decoding row in `rows` (a stale one for free rows) in one forward. The inputs are
        the rows' last sampled tokens, read on the device (`_next`), so launching needs no result on the host."""
        lengths = self.cache.lengths()
        for r in rows:   # a free row that rode along with earlier steps must not run out of room
            if self._rows[r] is None and lengths[r] + 1 > self.max_seq_len:
                self.cache.select(r).reset()
        ids = self._next[rows.start:rows.stop]
        view = None if graph else self.cache.select(slice(rows.start, rows.stop))   # (a graph has its own view)
        if view is not None and self.graph_buckets:   # (a view's layers are its own: prefill views keep reading
            view.set_fixed_shapes(True)                #  only the rows reached)
        live = [self._rows[r] if self._rows[r] is not None and self.pool.phase[r] is Phase.DECODE else None
                for r in rows]
        if self.trace is not None:
            self.trace.launch()
            self.trace.add("decode_rows", sum(req is not None for req in live))
            self.trace.set("graph", len(rows) if graph else None)
        try:
            with self._invariant():
                if graph:
                    logits = self._graph(len(rows))(ids)
                else:
                    logits = self.model(ids.view(-1, 1), cache=view)[:, -1]
        except Exception as e:
            if graph:   # a graph whose replay failed is not trusted again: the bucket is captured afresh
                self._graphs.pop(len(rows), None)
            self._fail(list(rows), e)
            return
        n_live = sum(req is not None for req in live)
        self.counters["decode_tokens"] += n_live
        if n_live:
            self._emit(live, logits, rows)

    def _spec_view(self, rows: range, graph: bool = False) -> None:
        """One speculative step of every decoding row in `rows` in one batch (free rows ride along with budget 0):
        each accepted token is its own event, in order. With `graph` (rows 0 .. bucket - 1) the verify forward
        replays the bucket's CUDA graph."""
        lengths = self.cache.lengths()
        for r in rows:   # a free row keeps its stale length until reset: the verify needs room in every row
            if self._rows[r] is None and lengths[r]:
                self.cache.select(r).reset()
                self.spec.mtp_cache.select(r).reset()
        reqs = [self._rows[r] if self.pool.phase[r] is Phase.DECODE else None for r in rows]
        budgets = [req.params.max_tokens - len(req.generated) if req is not None else 0 for req in reqs]
        stops = [self._stop_ids(req) if req is not None else () for req in reqs]
        cfgs = [req.sampling if req is not None else SamplingConfig() for req in reqs]
        gens = [req.generator if req is not None else None for req in reqs]
        verifier = (lambda n_tokens: self._spec_graph(len(rows), n_tokens)) if graph else None
        try:
            with self._invariant():
                results = self.spec.step_rows(slice(rows.start, rows.stop), cfgs, gens, stops, budgets, verifier)
        except Exception as e:
            if graph:   # a graph whose replay failed is not trusted again: the bucket is captured afresh
                for key in [key for key in self._spec_graphs if key[0] == len(rows)]:
                    del self._spec_graphs[key]
                self.spec.drop_graphs()
            self._fail(list(rows), e)
            return
        for req, stop_ids, res in zip(reqs, stops, results):
            if req is not None:
                self._send_step(req, stop_ids, res)

    def _send_step(self, req: _Request, stop_ids: tuple[int, ...], res: StepResult) -> None:
        """Send a request the tokens of its speculative step, each its own event, ending it at a stop token, its
        `max_tokens` or non-finite logits; the counters take the step's tokens, drafts and accepted drafts."""
        self.counters["decode_tokens"] += len(res.tokens)
        self.counters["spec_drafted"] += res.drafted
        self.counters["spec_accepted"] += res.accepted
        if not res.finite:
            self._finish(req, TokenEvent(None, finish_reason="error",
                                         error="the model produced non-finite logits for this request"),
                         failed=True)
            return
        for j, token in enumerate(res.tokens):
            event = self._event(req, token, res.logits[j])
            req.generated.append(token)
            if token in stop_ids:
                event.finish_reason = "stop"
            elif len(req.generated) >= req.params.max_tokens:
                event.finish_reason = "length"
            if event.finish_reason is None:
                req.handle._push(event)
            else:
                self._finish(req, event)
                return

    # ------------------------------------------------------------------ a lone greedy row's held stream
    def _streamable(self) -> _Request | None:
        """The request that may decode through a held `greedy_row_stream`: the one decoding row when it is greedy
        and nothing else is pending (no queued request, no prefilling row); None otherwise. With CUDA graphs, row 0
        only: its single-row step is the graph `warm_up` captures and bucket 1 replays (another row would capture
        one of its own while serving)."""
        decoding = self.pool.rows(Phase.DECODE)
        if len(decoding) != 1 or self.pool.busy != 1 or (self.graph_buckets and decoding[0] != 0):
            return None
        with self._lock:
            if self._queue:
                return None
        req = self._rows[decoding[0]]
        return req if req is not None and req.params.temperature == 0 else None

    def _stream_step(self, req: _Request) -> None:
        """One step of the lone greedy row: the next StepResult of its held stream (opened at its first such step,
        budget and stops as `_spec_view` gives them), each step launched before the previous one is read, so the
        host's sending of a step's tokens overlaps the device's next step. A stream that raises fails the row."""
        if self._stream is not None and self._stream.req is not req:
            self._end_stream()
        if self._stream is None:
            graphs = bool(self.graph_buckets)   # (then row 0: its captured step, bucket 1's verify for the rest)
            verifier = (lambda n_tokens: self._spec_graph(1, n_tokens)) if graphs else None
            settled: list[StepResult] = []
            steps = self.spec.greedy_row_stream(req.row, req.params.max_tokens - len(req.generated),
                                                self._stop_ids(req), graphs, verifier, settled)
            self._stream = _Stream(req, steps, graphs, settled)
        try:
            with self._invariant():
                res = next(self._stream.steps)
        except Exception as e:   # (StopIteration too: a stream ends only with a step that ends the request)
            self._stream_failed(e)
            return
        self._send_step(req, self._stop_ids(req), res)

    def _end_stream(self) -> None:
        """Close the held stream (if any) and send its request the tokens of the step in flight, which the close
        settles: the row's caches and state are then exactly the step loop's, for the batched path to go on."""
        stream = self._stream
        if stream is None:
            return
        try:
            with self._invariant():
                stream.steps.close()
        except Exception as e:
            self._stream_failed(e)
            return
        self._stream = None
        if stream.settled and stream.req.row is not None:
            self._send_step(stream.req, self._stop_ids(stream.req), stream.settled.pop())

    def _drop_stream(self, req: _Request) -> None:
        """Close the held stream of a request that ends (its settled step, if any, is not sent)."""
        stream = self._stream
        if stream is None or stream.req is not req:
            return
        self._stream = None
        try:
            with self._invariant():
                stream.steps.close()
        except Exception as e:   # (the row is reset before it is handed out again)
            warnings.warn(f"closing the speculative stream of an ending request failed ({type(e).__name__}: {e})")

    def _stream_failed(self, error: Exception) -> None:
        """The held stream raised: its request ends with "error" and its row is reset, as a failed forward's; with
        graphs the single-row steps and the bucket-1 verify are captured afresh."""
        stream, self._stream = self._stream, None
        if stream.graphs:
            for key in [key for key in self._spec_graphs if key[0] == 1]:
                del self._spec_graphs[key]
            self.spec.drop_graphs()
        row = stream.req.row
        if row is not None:
            self._fail([row], error)

    def _stop_ids(self, req: _Request) -> tuple[int, ...]:
        eos = () if req.params.ignore_eos else tuple(self.eos_token_ids)
        return tuple(req.params.stop_token_ids) + eos

    def _event(self, req: _Request, token: int, logits: torch.Tensor) -> TokenEvent:
        """The event for `token` chosen from the row of logits [vocab]; logprobs (if asked) of the model's
        distribution, before temperature / top-k / top-p."""
        event, p = TokenEvent(token), req.params
        if p.logprobs is not None:
            logp = torch.log_softmax(logits.float(), dim=-1)
            top = logp.topk(min(p.logprobs, logp.shape[0])) if p.logprobs else None
            event.logprob = float(logp[token])
            event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        return event

    def _graph(self, bucket: int) -> GraphDecoder:
        if bucket not in self._graphs:
            self._graphs[bucket] = GraphDecoder(self.model, self.cache.select(slice(0, bucket)))
        return self._graphs[bucket]

    def _spec_graph(self, bucket: int, n_tokens: int) -> GraphDecoder:
        """The captured speculative verify step of rows 0 .. bucket - 1 over n_tokens per row."""
        if (bucket, n_tokens) not in self._spec_graphs:
            self._spec_graphs[bucket, n_tokens] = GraphDecoder(self.model, self.cache.select(slice(0, bucket)),
                                                               n_tokens=n_tokens, checkpoint=True)
        return self._spec_graphs[bucket, n_tokens]

    def _steady_weights(self):
        """The prefix cache's `steady_weights` for a step (its weights stamp read once per step, not per request's
        lookup and save), if it has one."""
        steady = getattr(self.prefix_cache, "steady_weights", None)
        return steady() if steady is not None else contextlib.nullcontext()

    def _invariant(self):
        return ops.batch_invariant(self.batch_invariant)

    # ------------------------------------------------------------------ tokens out
    def _emit(self, reqs: list[_Request | None], logits: torch.Tensor, rows: range | None = None) -> None:
        """Choose each request's next token from its row of logits [n, vocab] (reqs[i] None: a free row of the
        decode view `rows`, whose token is a dummy), keep the tokens on the device as the rows' next inputs, and
        send them (`_deliver`): at once, or with `overlap` once the next step has been launched. Tokens (greedy,
        or drawn with each request's own generator), finiteness and the asked-for logprobs are computed on the
        device and come to the host in one wait."""
        logits = logits.float()
        tokens = logits.argmax(-1)
        sampled = [i for i, req in enumerate(reqs) if req is not None and req.params.temperature > 0]
        if sampled:
            tokens = tokens.clone()
            for i in sampled:
                tokens[i] = sample(logits[i:i + 1], reqs[i].sampling, reqs[i].generator)[0]
        if rows is not None:
            self._next[rows.start:rows.stop] = tokens
        else:
            self._next.index_copy_(0, to_device([req.row for req in reqs], self.device), tokens)
        fetch = [tokens, torch.isfinite(logits).all(-1)]
        want = [i for i, req in enumerate(reqs) if req is not None and req.params.logprobs is not None]
        if want:   # (indexed by a tensor sent ahead: a list index would be a blocking copy, a wait on the device)
            idx = to_device(want, self.device)
            picked = logits.index_select(0, idx)
            logp = torch.log_softmax(picked, dim=-1)
            k = min(max(reqs[i].params.logprobs for i in want), logp.shape[-1])
            top = logp.topk(k) if k else None
            fetch += [self._chosen_logprobs([reqs[i] for i in want], picked, logp, tokens.index_select(0, idx))]
            fetch += [top.indices, top.values] if top is not None else []
        pending = _Pending(reqs, want, fetch)
        if self.overlap:
            pending.copy = HostCopy(fetch)
            self._pending.append(pending)
        else:
            self._deliver(pending)

    def _deliver_pending(self, keep: int = 0) -> None:
        """Send the results of every pending step but the last `keep` ones, oldest first."""
        while len(self._pending) > keep:
            self._deliver(self._pending.popleft())

    def _deliver(self, pending: _Pending) -> None:
        """Send each request its token and finish the requests that are done. A request that ended since the
        step was sampled (cancelled, failed, or, with overlap, done one step before: its row ran once more) is
        skipped."""
        t, cpu = time.perf_counter(), time.thread_time() if self.trace is not None else 0.0
        host = pending.copy.wait() if pending.copy is not None else _to_host(pending.fetch)
        waited = time.perf_counter()
        if self.trace is not None:
            self.trace.waited(waited - t, time.thread_time() - cpu)
        reqs, want = pending.reqs, pending.want
        chosen, finite = host[0], host[1]
        logprob = dict(zip(want, host[2])) if want else {}
        tops = dict(zip(want, zip(host[3], host[4]))) if want and len(host) > 3 else {}
        emitted = finished = 0
        for i, req in enumerate(reqs):
            if req is None or req.row is None:
                continue
            if not finite[i]:
                self._finish(req, TokenEvent(None, finish_reason="error",
                                             error="the model produced non-finite logits for this request"),
                             failed=True)
                finished += 1
                continue
            p, token = req.params, chosen[i]
            event = TokenEvent(token)
            if p.logprobs is not None:
                event.logprob = logprob[i]
                ids, values = tops.get(i, ((), ()))
                event.top_logprobs = list(zip(ids[:p.logprobs], values[:p.logprobs]))
            req.generated.append(token)
            emitted += 1
            if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
                event.finish_reason = "stop"
            elif len(req.generated) >= p.max_tokens:
                event.finish_reason = "length"
            if event.finish_reason is None:
                req.handle._push(event)
            else:
                self._finish(req, event)
                finished += 1
        if self.trace is not None:
            self.trace.add("deliver_ms", 1e3 * (time.perf_counter() - waited))
            self.trace.add("emitted", emitted)
            self.trace.add("finished", finished)

    def _chosen_logprobs(self, reqs: list[_Request], logits: torch.Tensor, logp: torch.Tensor,
                         tokens: torch.Tensor) -> torch.Tensor:
        """The reported log-probability of each chosen token [n], on the device: OpenAI's convention, the model's
        raw distribution (`logp` = log_softmax(logits)). A subclass may report another distribution's."""
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def _finish(self, req: _Request, event: TokenEvent, failed: bool = False) -> None:
        """Send the last event and free the request's row (the row is reset when it is next handed out)."""
        save = None
        self._drop_stream(req)
        if req.row is not None:
            if not failed and event.finish_reason in ("stop", "length") and req.generated:
                # the cache holds the prompt and every generated token but the last (which was never fed), or with
                # overlap the last too (the step after it was launched before the request was seen to end)
                view = self.cache.select(req.row)
                held = np.concatenate((req.ids, np.asarray(req.generated, dtype=np.int64)))
                held = held if view.lengths() == [len(held)] else held[:-1]
                if len(held) > req.stored:   # (else it is the prompt, which the prefix cache holds already)
                    save = view, held
            self._rows[req.row] = None
            if self.spec is not None:
                self.spec.release(req.row)
            self.pool.free(req.row)
            if req in self._admitted:
                self._admitted.remove(req)
            req.row = None
        key = {"abort": "requests_cancelled", "error": "requests_failed"}.get(event.finish_reason or "",
                                                                              "requests_finished")
        self.counters[key] += 1
        # the row is only marked free (nothing resets it before the next admission): a snapshot taken after the
        # last event is sent still copies the row as the request left it; a cache without snapshots saves first
        later = save is not None and hasattr(self.prefix_cache, "snapshot")
        if save is not None and not later:
            self._save_at_end(*save)
        req.handle._push(event)
        if later:
            self._save_at_end(*save)

    def _fail(self, rows: list[int], error: Exception) -> None:
        """A forward over `rows` raised: end their requests with "error" and reset the rows (and any row the
        cache marks damaged), so the other requests go on."""
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
        for r in sorted(set(rows) | set(self.cache.damaged_rows)):
            req = self._rows[r]
            if req is not None:
                self._finish(req, TokenEvent(None, finish_reason="error", error=message), failed=True)
            self.cache.select(r).reset()
            if self.spec is not None:
                self.spec.mtp_cache.select(r).reset()
                self.spec.release(r)

    def _save_at_end(self, view, tokens: np.ndarray) -> None:
        """The save at a request's end: a copy of its row's state now (queued on the device, before anything can
        reuse the row), stored by `_drain_saves` later in the step or in a later one, once the step's forwards
        are launched; at once with a prefix cache that takes no snapshots."""
        if self.prefix_cache is None or view.lengths() != [len(tokens)]:
            return
        if not hasattr(self.prefix_cache, "snapshot"):
            self._save_prefix(view, tokens)
            return
        t = time.perf_counter()
        try:
            self._saves.append(self.prefix_cache.snapshot(view, tokens))
        except Exception as e:  # storing is an optimisation: never fail a request for it
            warnings.warn(f"prefix cache snapshot of {len(tokens)} tokens failed ({e})")
        if self.trace is not None:
            self.trace.add("save_ms", 1e3 * (time.perf_counter() - t))

    def _drain_saves(self, limit: int | None = None, prompt: np.ndarray | None = None, fresh: bool = True) -> None:
        """Store up to `limit` (None: all) of the queued snapshots, oldest first (with `fresh` False, stopping at
        one this step queued at a prompt's end: with overlap its first token goes out in the next step, before
        it); with `prompt` (int64 ids), only those of a prefix of it (before its lookup, which they may serve: the
        next turn of a chat, a prompt sent again)."""
        if not self._saves:
            return
        t = time.perf_counter()
        if prompt is not None:
            hits = [snap for snap in self._saves   # (the ends first: most snapshots are of other prompts)
                    if len(snap.tokens) <= len(prompt) and snap.tokens[-1] == prompt[len(snap.tokens) - 1]
                    and snap.tokens[0] == prompt[0] and np.array_equal(prompt[:len(snap.tokens)], snap.tokens)]
            for snap in hits:
                self._saves.remove(snap)
        else:
            hits = []
            while self._saves and (limit is None or len(hits) < limit) and \
                    (fresh or limit is None or id(self._saves[0]) not in self._fresh):
                hits.append(self._saves.popleft())
        for snap in hits:
            try:
                self.prefix_cache.save_snapshot(snap)
            except Exception as e:  # storing is an optimisation: never fail a request for it
                warnings.warn(f"prefix cache save of {len(snap.tokens)} tokens failed ({e})")
        if self.trace is not None and hits:
            self.trace.add("save_ms", 1e3 * (time.perf_counter() - t))

    def _save_prefix(self, view, tokens: Sequence[int], tail: dict | None = None, defer: bool = False) -> None:
        """Store the row's state (holding exactly `tokens`), with the tail of its last forward when given and the
        prefix cache keeps tails (one with `load_full`). With `defer` (the save at a prompt's end) and a prefix
        cache that takes snapshots, a snapshot now, stored from the next step on (`_drain_saves`), after this
        step's first tokens have gone out, or before a lookup it may serve."""
        if self.prefix_cache is None or view.lengths() != [len(tokens)]:
            return
        keeps_tail = tail is not None and hasattr(self.prefix_cache, "load_full")
        try:
            if defer and hasattr(self.prefix_cache, "snapshot"):
                snap = self.prefix_cache.snapshot(view, tokens, tail=tail if keeps_tail else None)
                self._saves.append(snap)
                self._fresh.add(id(snap))
            elif keeps_tail:
                self.prefix_cache.save(view, tokens, tail=tail)
            else:
                self.prefix_cache.save(view, tokens)
        except Exception as e:  # storing is an optimisation: never fail a request for it
            warnings.warn(f"prefix cache save of {len(tokens)} tokens failed ({e})")
