"""Prefix caching across requests: a row's whole cache state after n tokens (window ring, compressor states,
compressed entries, indexer keys, position: `dsv4.cache.row_state`) kept in memory, keyed by (model fingerprint,
cache formats, the n tokens), so a request that starts with a stored prefix computes only the rest.

Tiers, each LRU under a byte budget: the model's device first, then host RAM (pinned when the device is CUDA, so
copies overlap); evicting from the device tier demotes an entry to the host tier, evicting from the host tier
drops it or, with a `PrefixStore`, writes it to disk (where other processes and later runs find it too). A hit
restores the same bytes the saving row held, so the logits that follow are exactly those of a cold prefill
computed in the same chunks.

The engine's side (all one-row caches: `cache.select(row)`; safe to call from several threads):

    pc = PrefixCache(model, device_bytes, host_bytes, store=None, block=256, split_before=())
    n, tail = pc.load_full(row, prompt)  # restore the longest cached prefix (0: miss); the row should be empty:
                                         # on a hit it is overwritten. n == len(prompt) (tail: {"logits": ...}):
                                         # the whole prompt, nothing to compute; else tail is None
    for stop in pc.boundaries(len(prompt), prompt[-1]):   # prefill from n, stopping at each boundary > n to
        ...; pc.save(row, prompt[:stop], tail={"logits": that chunk's last logits})   # save
    ...                                 # generation
    pc.save(row, prompt + generated[:-1])     # at the end: exactly the tokens the row holds (no tail), or in two
    snap = pc.snapshot(row, tokens[, tail])   # parts: a copy of the row now (no hashing, no wait for the device),
    pc.save_snapshot(snap)                    # stored later, once the row may have moved on
    pc.stats()                          # counters and tier sizes, for /metrics

Token ids may be given as a list or as an array; an int64 array (the serving engine converts each prompt once) is
read as it is, with no conversion per call.

An entry's tail is what the forward that computed its last token gave besides the cache: the next token's logits
(exact bytes), and for the speculative decoder the last position's lanes too (`SpeculativeDecoder.tail`).
`load_full(row, tokens, need)` restores all of `tokens` only from an entry whose tail has every name in `need`, so
a prompt sent again costs no forward at all (its first token is sampled from the stored logits), and a prompt
extended by anything, however short, computes just its new tokens in one forward; `load(row, tokens)` restores only
prefixes shorter than `tokens` (the caller computes the last token itself). An entry without a tail (the save at the
end of a generation, whose logits the engine does not keep; a store file written without one) serves only longer
prompts, and a save of tokens already held keeps the held entry as it is (a tail computed in other chunks would not
be its state's own), so an exact repeat of such tokens restores the longest shorter entry.

`boundaries(n, last_token)` is every `block` tokens below n, and n; also n - 1 when the prompt's last token is in
`split_before`. That is for chat templates that rewrite a prompt's last token in the next turn: V4's in thinking
mode ends a prompt with `<think>` and writes the same turn as `... <｜Assistant｜></think>reply` in the next
prompt, which then shares all but the last token (`dsv4 serve` passes the `<think>` id). With thinking off, the
next turn starts with prompt N + reply N (+ the end-of-sentence token), so the save at the end of the generation
is the one that lets it hit everything but its new user message.

Lookups never compare tokens with stored entries: a hash chain over the query's blocks (h0 = the key
fingerprint, h[b+1] = sha256(h[b], block b's tokens)) names the block node each stored length hangs off, and the
index maps node -> the lengths stored under it; the query checks, deepest node first, only those lengths, each by
one dict lookup of sha256(node, the tokens past the node, n). A request's saves reuse the chain its lookup
hashed (they store prefixes of its prompt).

The model fingerprint (every byte of every weight and buffer, every module setting) is recomputed by every
lookup that would restore something (`verify_model=True`, the default: one pass over the weights on their
device, so a hit of a few hundred tokens on a large model costs about what it saves; a miss costs nothing), and
its value reused by the saves that follow. With `verify_model=False` it is recomputed only when a parameter,
buffer or module was replaced or a tensor changed in place through autograd's version counter (a write through
`.data` or a kernel writing weights out of band is not seen: call `refresh()` after one); that check reads the
modules' own tensor dicts, over a module list taken again after any submodule assignment in the process. Entries of a model that changed are dropped from
memory at once.

An entry saved after a shorter held prefix of the same tokens (its parent) keeps only what grew since: the
compressed entries and indexer keys past the parent's, plus the fixed-size window ring and compressor states. So
the entries saved at every block of one long prompt take memory linear in its length (the final state plus one
window and compressor state per block), and a hit restores the chain's pieces in order. The device tier demotes
in LRU order (the chain stays whole across tiers); the host tier drops the least recently used entry that
nothing was saved on top of, and an entry that leaves memory takes its descendants with it (each written whole
to the store when there is one). A hit refreshes the LRU place of its whole chain.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..cache import KVCache
from ..cache.row_state import GROWING, RowStateCopy, clone_tensors, restore_row_pieces, row_state, state_nbytes
from ..errors import InvalidArgument
from ..generate.fingerprint import model_fingerprint
from ..generate.prefix_store import TAIL, PrefixStore, store_fingerprint

__all__ = ["PrefixCache", "RowSnapshot"]

log = logging.getLogger(__name__)

TIERS = ("device", "host")


@dataclasses.dataclass
class _Entry:
    key: bytes
    node: bytes               # the block node it hangs off: h[n // block]
    n: int
    state: dict[str, torch.Tensor]   # the row state's pieces, and the tail as TAIL + name
    nbytes: int
    fp: str                   # the key fingerprint and the tokens: what the store names its file by
    tokens: np.ndarray | None  # (kept only when there is a store)
    on_disk: bool = False
    copied: object = None     # a CUDA event: the state's copy to pinned host memory is done when it completes
    parent: "_Entry | None" = None   # holds the compressed entries of the first `base` tokens
    base: int = 0
    children: list = dataclasses.field(default_factory=list)

    def has_tail(self, need: Sequence[str]) -> bool:
        return all(TAIL + k in self.state for k in need)

    def wait(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None

    def chain(self) -> list["_Entry"]:
        """Root first, this entry last: the pieces a restore puts together."""
        out, e = [], self
        while e is not None:
            out.append(e)
            e = e.parent
        return out[::-1]

    def whole_state(self) -> dict[str, torch.Tensor]:
        """The state of all n tokens in one dict (what the on-disk store keeps)."""
        chain = self.chain()
        if len(chain) == 1:
            return self.state
        for e in chain:
            e.wait()
        return {k: torch.cat([e.state[k].cpu() for e in chain]) if k.endswith(GROWING) else v
                for k, v in self.state.items()}


@dataclasses.dataclass(eq=False)
class RowSnapshot:
    """A copy of a one-row cache's state holding `tokens` (`PrefixCache.snapshot`): the tokens (int64 ids), the copy
    of the row's state (`RowStateCopy`: its tensors named when first read, by `state`), the row's cache, whose
    storage formats (not its contents, which have moved on) key the entry, and a copy of the tail to store with it
    (or None)."""
    tokens: np.ndarray
    copy: RowStateCopy
    formats: KVCache
    tail: dict[str, torch.Tensor] | None = None

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The row state's tensors by name (views of the copy)."""
        return self.copy.tensors()

    @property
    def ratios(self) -> list[int]:
        """Each layer's compression ratio (to cut the compressed entries past a stored parent)."""
        return self.copy.ratios

    def piece(self, start: int) -> dict[str, torch.Tensor]:
        """`row_state(row, n, start)` of the row as it was: the compressed entries and indexer keys past the
        first `start` tokens', the rest whole (views)."""
        if not start:
            return dict(self.state)
        return {k: v[start // self.ratios[int(k.split(".", 1)[0])]:] if k.endswith(GROWING) else v
                for k, v in self.state.items()}


def _ids(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as one int64 array: the form every method works on (an int64 array is taken as it is, so a caller
    that holds its prompt as one, as the serving engine does, pays no conversion per call)."""
    if isinstance(tokens, np.ndarray) and tokens.dtype == np.int64 and tokens.ndim == 1:
        return tokens
    return np.asarray(tokens, dtype=np.int64).reshape(-1)


class _Chain:
    """The query's hash chain: node(b) = h[b], key(n) = the key of its first n tokens."""

    def __init__(self, fingerprint: str, ids: np.ndarray, block: int, upto: int):
        self.block = block
        self.data = ids[:upto].tobytes()
        h = hashlib.sha256(fingerprint.encode()).digest()
        self.nodes = [h]
        step = 8 * block
        for b in range(upto // block):
            h = hashlib.sha256(h + self.data[b * step:(b + 1) * step]).digest()
            self.nodes.append(h)

    def key(self, n: int) -> bytes:
        b = n // self.block
        return hashlib.sha256(self.nodes[b] + self.data[8 * b * self.block: 8 * n] + n.to_bytes(8, "little")).digest()


class PrefixCache:
    """Cached row states for one model, in device and host memory tiers (optionally over a PrefixStore)."""

    def __init__(self, model, device_bytes: int, host_bytes: int, store: PrefixStore | None = None,
                 block: int = 256, *, verify_model: bool = True, split_before: Iterable[int] = ()):
        for name, v in (("device_bytes", device_bytes), ("host_bytes", host_bytes)):
            if type(v) is not int or v < 0:
                raise InvalidArgument(f"PrefixCache: {name} must be a byte count >= 0, got {v!r}")
        if type(block) is not int or block <= 0:
            raise InvalidArgument(f"PrefixCache: block must be a positive token count, got {block!r}")
        self.model, self.store, self.block, self.verify_model = model, store, block, verify_model
        self.split_before = frozenset(int(t) for t in split_before)
        self.budget = {"device": device_bytes, "host": host_bytes}
        self.device = next(model.parameters()).device
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._tiers: dict[str, OrderedDict[bytes, _Entry]] = {t: OrderedDict() for t in TIERS}
        self._bytes = {t: 0 for t in TIERS}
        self._index: dict[bytes, dict[int, int]] = {}   # block node -> {stored length: entries}
        self._lock = threading.RLock()
        self._model_fp: str | None = None
        self._stamp: tuple | None = None
        self._modules: list | None = None
        self._modules_seen = -1
        self._memo: tuple | None = None   # (fp, tokens, their _Chain): see _chain
        self._steady = 0                  # inside steady_weights (nesting depth)
        self._steady_stamp: tuple | None = None
        _watch_module_assignments()
        self.counters = dict(lookups=0, hits=0, lookup_tokens=0, hit_tokens=0, saves=0, store_hits=0,
                             store_saves=0, device_evictions=0, host_evictions=0, fingerprint_passes=0)

    # ------------------------------------------------------------------ the engine's interface
    def boundaries(self, n_tokens: int, last_token: int | None = None) -> list[int]:
        """Where a prefill of n tokens stops to save: every `block` tokens below n, and n (saved with its tail:
        the same prompt hits whole, any extension of it hits all of it), and n - 1 when the prompt's last token is
        one of `split_before` (see the module docstring)."""
        if n_tokens < 1:
            return []
        split = {n_tokens - 1} if n_tokens > 1 and last_token in self.split_before else set()
        return sorted(set(range(self.block, n_tokens, self.block)) | {n_tokens} | split)

    def load(self, cache_row: KVCache, tokens: Sequence[int]) -> int:
        """Restore the longest cached prefix of `tokens` shorter than `tokens` into a one-row cache; return its
        length (0: none, the row untouched)."""
        return self._load(cache_row, tokens, None)[0]

    def load_full(self, cache_row: KVCache, tokens: Sequence[int],
                  need: Sequence[str] = ("logits",)) -> tuple[int, dict[str, torch.Tensor] | None]:
        """`load`, but all of `tokens` may be restored too, from an entry whose tail has every name in `need`:
        then (len(tokens), a copy of that tail on the model's device), and the caller runs no forward at all;
        otherwise (length, None) as `load` gives it."""
        return self._load(cache_row, tokens, tuple(need))

    def _load(self, cache_row: KVCache, tokens: Sequence[int],
              need: tuple[str, ...] | None) -> tuple[int, dict[str, torch.Tensor] | None]:
        _check_row(cache_row, "load")
        full = need is not None
        tokens = _ids(tokens)   # (once: the lookup, the store and the insert below all read this array)
        with self._lock:
            self.counters["lookups"] += 1
            self.counters["lookup_tokens"] += len(tokens)
            passes = self.counters["fingerprint_passes"]
            fp = self._fingerprint(cache_row, recompute=False)
            n, entry = self._find(fp, tokens, need=need)
            stored = self.store is not None and any(m < len(tokens) + full for m in self.store.lengths())
            fresh = self.counters["fingerprint_passes"] > passes
            if self.verify_model and not fresh and (entry is not None or stored):  # only a restore needs it
                checked = self._fingerprint(cache_row, recompute=True)
                if checked != fp:  # the model changed: its entries were dropped
                    fp, (n, entry) = checked, self._find(checked, tokens, need=need)
            tail = None
            if stored:
                m, tail = self.store.load_best(cache_row, tokens.tolist(), fp, n, need)
                if m:
                    self.counters["store_hits"] += 1
                    self._insert(fp, tokens[:m], cache_row, on_disk=True, tail=tail)
                    n, entry = m, None
                    tail = {k: v.to(self.device) for k, v in tail.items()} if tail is not None else None
            if entry is not None:
                try:
                    restore_row_pieces(cache_row, [(e.base, e.state) for e in entry.chain()], n)
                    self._touch(entry)
                    if n == len(tokens):   # (a copy: the caller's sampling and decoding own it)
                        tail = {k[len(TAIL):]: v.to(self.device, copy=True, non_blocking=True)
                                for k, v in entry.state.items() if k.startswith(TAIL)}
                except (KeyError, RuntimeError) as e:  # a row too short for it (the row is left reset)
                    log.warning("prefix cache: a %d-token prefix does not fit this row (%s)", n, e)
                    n = 0
            if n:
                self.counters["hits"] += 1
                self.counters["hit_tokens"] += n
            return n, tail

    def save(self, cache_row: KVCache, tokens: Sequence[int], tail: dict[str, torch.Tensor] | None = None) -> None:
        """Keep the state of a one-row cache that holds exactly `tokens` (already kept: refresh its LRU place),
        with `tail`: what the forward that computed the last token gave besides the cache (e.g. {"logits": the
        next token's logits}), which a `load_full` of exactly these tokens returns instead of a forward."""
        _check_row(cache_row, "save")
        tokens = _ids(tokens)
        if cache_row.lengths() != [len(tokens)]:
            raise InvalidArgument(f"PrefixCache.save: the row holds {cache_row.lengths()[0]} tokens, "
                                  f"not the {len(tokens)} given")
        if not len(tokens):
            return
        with self._lock:
            fp = self._fingerprint(cache_row, recompute=False)
            chain = self._chain(fp, tokens)   # (hashed once: _insert and _find reuse it)
            key = chain.key(len(tokens))
            for tier in TIERS:
                if key in self._tiers[tier]:   # (kept as it is: a tail computed in other chunks than its state
                    self._touch(self._tiers[tier][key])   # would not be the state's own)
                    return
            self._insert(fp, tokens, cache_row, chain, tail=tail)

    def snapshot(self, cache_row: KVCache, tokens: Sequence[int],
                 tail: dict[str, torch.Tensor] | None = None) -> "RowSnapshot":
        """A copy, taken now, of the state of a one-row cache that holds exactly `tokens` (and of `tail`, as `save`
        takes it), for `save_snapshot` to store later, once the row has moved on: a few copies queued on the device
        (`RowStateCopy`: one per stacked tensor and per kind of compressed record; no wait for the device, no
        hashing, no lookup, no per-tensor views), so a server can take it the moment a request ends, or a prompt's
        last chunk has run, and leave the rest of the save for later."""
        _check_row(cache_row, "snapshot")
        if cache_row.lengths() != [len(tokens)]:
            raise InvalidArgument(f"PrefixCache.snapshot: the row holds {cache_row.lengths()[0]} tokens, "
                                  f"not the {len(tokens)} given")
        ids = _ids(tokens)
        return RowSnapshot(ids.copy() if ids is tokens else ids, RowStateCopy(cache_row, len(ids)), cache_row,
                           {k: v.detach().clone() for k, v in tail.items()} if tail is not None else None)

    def save_snapshot(self, snap: "RowSnapshot") -> None:
        """`save` of the row a `snapshot` was taken of, as it was then (with the tail it took)."""
        if not len(snap.tokens):
            return
        with self._lock:
            fp = self._fingerprint(snap.formats, recompute=False)
            tokens = _ids(snap.tokens)
            chain = self._chain(fp, tokens)
            key = chain.key(len(tokens))
            for tier in TIERS:
                if key in self._tiers[tier]:
                    self._touch(self._tiers[tier][key])
                    return
            self._insert(fp, tokens, None, chain, snapshot=snap, tail=snap.tail)

    @contextmanager
    def steady_weights(self) -> Iterator[None]:
        """Within, the model's weights are taken to stay as they are (a serving engine's step, which only runs
        the model): the weights stamp that `verify_model=False` compares is read once, not at every lookup and
        save (a walk over every parameter: ~1-2 ms on a 43-layer model, twice per request). A change between
        blocks is seen at the next block's first lookup or save."""
        with self._lock:
            self._steady += 1
        try:
            yield
        finally:
            with self._lock:
                self._steady -= 1
                if not self._steady:
                    self._steady_stamp = None

    def stats(self) -> dict:
        """Counters (lookups, hits, lookup_tokens, hit_tokens, hit_rate = hit_tokens / lookup_tokens, saves,
        store_hits, store_saves, device_evictions, host_evictions, fingerprint_passes) and, per tier, `entries`,
        `bytes` and `budget` ({"device": ..., "host": ...})."""
        with self._lock:
            c = dict(self.counters)
            c["hit_rate"] = c["hit_tokens"] / c["lookup_tokens"] if c["lookup_tokens"] else 0.0
            c["entries"] = {t: len(self._tiers[t]) for t in TIERS}
            c["bytes"] = dict(self._bytes)
            c["budget"] = dict(self.budget)
            return c

    def refresh(self) -> None:
        """Recompute the model fingerprint now (after changing weights in a way autograd does not see)."""
        with self._lock:
            self._model_fp = None

    def flush(self) -> None:
        """Write every entry held in memory to the store (e.g. before shutting down); they stay in memory."""
        with self._lock:
            if self.store is not None:
                for tier in TIERS:
                    for e in self._tiers[tier].values():
                        self._spill(e)

    # ------------------------------------------------------------------ keys
    def _fingerprint(self, cache: KVCache, recompute: bool) -> str:
        stamp = self._steady_stamp if self._steady and self._steady_stamp is not None else self._weights_stamp()
        if self._steady:
            self._steady_stamp = stamp
        if recompute or self._model_fp is None or stamp != self._stamp:
            fp = model_fingerprint(self.model)
            self.counters["fingerprint_passes"] += 1
            if self._model_fp is not None and fp != self._model_fp:
                self._clear()  # another model: none of the entries can hit again
            self._model_fp, self._stamp = fp, stamp
        return store_fingerprint(self._model_fp, cache)

    def _weights_stamp(self) -> tuple:
        """Identity, autograd version and storage of every parameter and buffer: what `verify_model=False`
        compares. Read from the modules' own dicts (a quarter of the cost of `parameters()` and `buffers()`,
        whose recursive walk took ~4 ms per call on a 1,400-tensor model), over a module list taken again
        whenever any module was assigned a submodule since (`_module_assignments`)."""
        if self._modules is None or self._modules_seen != _module_assignments:
            self._modules_seen = _module_assignments   # (read first: an assignment during the walk is seen next time)
            self._modules = list(self.model.modules())
        return tuple((id(t), t._version, t.data_ptr()) for m in self._modules for d in (m._parameters, m._buffers)
                     for t in d.values() if t is not None)

    def _chain(self, fp: str, ids: np.ndarray) -> _Chain:
        """The hash chain of the int64 ids: the last one made, when `ids` begins the ids it was made for (the
        saves of a request hash prefixes of the prompt its load hashed: ~1 ms per 32K tokens saved each), else a
        new one."""
        memo = self._memo
        if memo is not None and memo[0] == fp and len(ids) <= len(memo[1]) and \
                np.array_equal(ids, memo[1][:len(ids)]):
            return memo[2]
        chain = _Chain(fp, ids, self.block, len(ids))
        self._memo = (fp, ids.copy(), chain)
        return chain

    def _find(self, fp: str, tokens: np.ndarray, chain: _Chain | None = None,
              need: tuple[str, ...] | None = None) -> tuple[int, _Entry | None]:
        """The longest held prefix shorter than `tokens` (with `need`, all of `tokens` too, when that entry's
        tail has every name in `need`): (its length, its entry), (0, None) if none. `chain`: the query's chain
        under `fp` when the caller has it (over all of `tokens` or more)."""
        full = need is not None
        if len(tokens) < 2 - full or not self._index:
            return 0, None
        chain = chain or self._chain(fp, tokens)
        for b in range(len(chain.nodes) - 1, -1, -1):
            for n in sorted(self._index.get(chain.nodes[b], ()), reverse=True):
                if n < len(tokens) + full:
                    key = chain.key(n)
                    for tier in TIERS:
                        entry = self._tiers[tier].get(key)
                        if entry is not None and (n < len(tokens) or entry.has_tail(need)):
                            return n, entry
        return 0, None

    # ------------------------------------------------------------------ tiers
    def _insert(self, fp: str, tokens: np.ndarray, cache_row: KVCache | None, chain: _Chain | None = None,
                on_disk: bool = False, tail: dict[str, torch.Tensor] | None = None,
                snapshot: "RowSnapshot | None" = None) -> None:
        """Keep the state of the one-row cache holding `tokens` (or of the `snapshot` taken of one; past the
        longest held shorter prefix, if any) and its tail."""
        chain = chain or self._chain(fp, tokens)
        n = len(tokens)
        base, parent = self._find(fp, tokens, chain)
        if parent is not None:  # most recent first; this can evict, rarely the parent's own chain: look again
            self._touch(parent)
            base, parent = self._find(fp, tokens, chain)
        state = row_state(cache_row, n, start=base) if snapshot is None else snapshot.piece(base)
        owned = snapshot is not None and base == 0   # (the snapshot's tensors are a copy already: kept as they are)
        state.update({TAIL + k: v.detach().to(self.device) for k, v in (tail or {}).items()})
        kept = tokens.copy() if self.store is not None else None
        entry = _Entry(chain.key(n), chain.nodes[n // self.block], n, state, state_nbytes(state), fp, kept, on_disk,
                       parent=parent, base=base)
        self.counters["saves"] += 1
        lengths = self._index.setdefault(entry.node, {})
        lengths[n] = lengths.get(n, 0) + 1
        if parent is not None:
            parent.children.append(entry)
        if entry.nbytes <= self.budget["device"]:
            entry.state = state if owned else clone_tensors(state)
            self._add("device", entry)
        else:
            self._demote(entry)

    def _add(self, tier: str, entry: _Entry) -> None:
        self._tiers[tier][entry.key] = entry
        self._bytes[tier] += entry.nbytes
        while self._bytes[tier] > self.budget[tier]:
            self.counters[f"{tier}_evictions"] += 1
            if tier == "device":  # demoted: its chain stays whole
                old = next(iter(self._tiers[tier].values()))
                self._remove(old)
                self._demote(old)
            else:  # dropped, descendants too: the least recently used entry nothing was saved on top of
                held = self._tiers[tier].values()
                self._drop(next((e for e in held if not e.children), None) or next(iter(held)))

    def _remove(self, entry: _Entry) -> bool:
        """Take an entry out of whichever tier holds it; False when none does."""
        for tier in TIERS:
            if self._tiers[tier].pop(entry.key, None) is not None:
                self._bytes[tier] -= entry.nbytes
                return True
        return False

    def _demote(self, entry: _Entry) -> None:
        """Move an entry (held by no tier now) into the host tier (or past it, when larger than its budget)."""
        if entry.nbytes > self.budget["host"]:
            self._drop(entry)
            return
        host = clone_tensors(entry.state, torch.device("cpu"), pin_memory=self._pin, non_blocking=self._pin)
        if self._pin:
            entry.copied = torch.cuda.Event()
            entry.copied.record()
        entry.state = host
        self._add("host", entry)

    def _drop(self, entry: _Entry) -> None:
        """An entry leaves memory (to the store when there is one), and with it every entry saved on top of it:
        they cannot be restored without it."""
        for child in list(entry.children):
            self._drop(child)
        self._spill(entry)
        self._remove(entry)
        self._unindex(entry)
        if entry.parent is not None:
            entry.parent.children.remove(entry)
            entry.parent = None

    def _unindex(self, entry: _Entry) -> None:
        lengths = self._index[entry.node]
        lengths[entry.n] -= 1
        if not lengths[entry.n]:
            del lengths[entry.n]
            if not lengths:
                del self._index[entry.node]

    def _spill(self, entry: _Entry) -> None:
        if self.store is None or entry.on_disk:
            return
        entry.wait()
        if self.store.save_state(entry.whole_state(), entry.tokens.tolist(), entry.fp) is not None:
            self.counters["store_saves"] += 1
            entry.on_disk = True

    def _touch(self, entry: _Entry) -> None:
        """A hit: the entry, then its ancestors, most recently used; those on the host go back to the device tier
        when they fit."""
        for e in entry.chain()[::-1]:
            self._touch_one(e)

    def _touch_one(self, entry: _Entry) -> None:
        for tier in TIERS:
            if entry.key in self._tiers[tier]:
                if tier == "host" and entry.nbytes <= self.budget["device"]:
                    del self._tiers["host"][entry.key]
                    self._bytes["host"] -= entry.nbytes
                    entry.state = {k: v.to(self.device, non_blocking=True) for k, v in entry.state.items()}
                    self._add("device", entry)
                else:
                    self._tiers[tier].move_to_end(entry.key)
                return

    def _clear(self) -> None:
        for tier in TIERS:
            self._tiers[tier].clear()
            self._bytes[tier] = 0
        self._index.clear()


_module_assignments = 0   # submodules assigned to any module so far (once a PrefixCache exists)
_watching = False


def _count_assignment(module, name, value) -> None:
    global _module_assignments
    _module_assignments += 1


def _watch_module_assignments() -> None:
    """Count every submodule assignment in the process (torch's global hook), so that a PrefixCache walks its
    model's modules again only after one: a module swapped in brings tensors the cached list would not see."""
    global _watching
    if not _watching:
        torch.nn.modules.module.register_module_module_registration_hook(_count_assignment)
        _watching = True


def _check_row(cache: KVCache, what: str) -> None:
    if not isinstance(cache, KVCache) or cache.batch_size != 1:
        raise InvalidArgument(f"PrefixCache.{what} needs a one-row KVCache (cache.select(row)), got "
                              f"{getattr(cache, 'batch_size', type(cache).__name__)} rows")
