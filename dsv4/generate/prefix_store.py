"""On-disk prefix reuse: save a sequence's cache state after n tokens; a later request that starts with the
same n tokens loads it and computes only the rest.

A stored prefix is one safetensors file holding, per layer, the window ring, the first n // ratio
compressed entries and indexer keys (raw records: exact whatever the storage format) and the compressor
states, and optionally its tail: what the forward that computed the last token gave besides the cache (tensors
named `tail.<name>`, e.g. `tail.logits`, the next token's logits), which lets a request of exactly those n tokens
skip its forward (`load_best(..., need=...)`; a file without them serves only longer requests). It is keyed by
sha256(model fingerprint, token ids); its metadata carries the fingerprint, the token count, the token hash and a
sha256 of every tensor's bytes. The model fingerprint covers every byte of
every parameter and buffer and every module setting (generate/fingerprint.py); it is recomputed at every load and
save (one pass over the weights), so a model changed in any way between two requests never gets the old one's
prefixes.

The store is a cache, and never the reason a generation fails: a file that is corrupt, truncated or made for
another model, storage format or token sequence is reported, removed and ignored; a directory that cannot be
written (read-only, full) is reported once and generation goes on without saving. Several processes may share a
directory: each file is written under a unique temporary name and renamed into place, and the index of stored
lengths (`lengths.json`) is updated under a file lock; an index that is missing or malformed is rebuilt from the
stored files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import struct
import tempfile
from typing import Callable, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize

from ..cache import KVCache
from ..cache.row_state import restore_row_state, row_state
from ..checkpoint.safetensors_io import CheckpointError, read_header
from .fingerprint import model_fingerprint

try:
    import fcntl
except ImportError:  # not POSIX: index updates are unlocked (one writer per directory)
    fcntl = None

log = logging.getLogger(__name__)

INDEX = "lengths.json"
TAIL = "tail."   # the name prefix of a stored prefix's tail tensors (the rest is the row state)
_LOCK = ".lengths.lock"
# what parsing a damaged file can raise (corrupt header JSON, bad offsets or dtypes, missing or misshapen tensors)
_DAMAGE = (CheckpointError, SafetensorError, ValueError, TypeError, KeyError, IndexError, OverflowError,
           struct.error)


class _Damaged(Exception):
    """A stored file whose content is unusable (removed from the store)."""


@dataclasses.dataclass
class StoreActivity:
    """What the store did: the prefix length each load restored (0: none) and each saved prefix's length."""
    loaded: list[int] = dataclasses.field(default_factory=list)
    saved: list[int] = dataclasses.field(default_factory=list)
    failed_saves: int = 0

    def report(self, prompt_tokens: int, where: str) -> str:
        """One line for a user: how much of a prompt of `prompt_tokens` tokens came from the store, what was saved."""
        reused = sum(self.loaded)
        line = (f"prefix store {where}: reused {reused} of {prompt_tokens} prompt tokens" if reused else
                f"prefix store {where}: no stored prefix matched")
        if self.saved:
            line += f"; saved {len(self.saved)} prefix{'es' if len(self.saved) > 1 else ''} " \
                    f"(up to {max(self.saved)} tokens)"
        if self.failed_saves:
            line += f"; {self.failed_saves} could not be written (see the warning)"
        return line


def store_fingerprint(model_fp: str, cache: KVCache) -> str:
    """A stored prefix's model key: the model's fingerprint and the cache's storage formats."""
    return hashlib.sha256(f"{model_fp}|{cache.kv_dtype}|{cache.index_dtype}|{cache.dtype}".encode()).hexdigest()


def _tokens_hash(fingerprint: str, tokens: Sequence[int]) -> str:
    return hashlib.sha256((fingerprint + ":" + ",".join(map(str, tokens))).encode()).hexdigest()


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _valid_lengths(value) -> bool:
    return isinstance(value, list) and all(type(n) is int and n > 0 for n in value)


class PrefixStore:
    """A directory of saved prefixes for one model and cache format."""

    def __init__(self, directory: str | os.PathLike, model, block: int = 1024):
        self.dir, self.model, self.block = os.fspath(directory), model, block
        self.activity = StoreActivity()
        self._warned: set[str] = set()
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:
            self._warn_once("write", "prefix store %s cannot be created (%s): nothing will be reused or saved",
                            self.dir, e)

    def fingerprint(self, cache: KVCache) -> str:
        """The key's model part: the model as it is now (all weights, buffers and settings) and the cache's
        storage formats. Recomputed on every call."""
        return store_fingerprint(model_fingerprint(self.model), cache)

    def _path(self, digest: str) -> str:
        return os.path.join(self.dir, f"{digest}.safetensors")

    def _warn_once(self, kind: str, msg: str, *args) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(msg, *args)

    def boundaries(self, n_tokens: int) -> list[int]:
        """Where a prefill of n tokens stops to save: every `block` tokens, and at the end."""
        return sorted(set(range(self.block, n_tokens, self.block)) | {n_tokens})

    # ------------------------------------------------------------------ the index of stored lengths
    def lengths(self) -> list[int]:
        """The prefix lengths stored (for any token sequence, any model), longest first."""
        return self._lengths()

    def _lengths(self) -> list[int]:
        """The prefix lengths stored (for any token sequence), longest first."""
        path = os.path.join(self.dir, INDEX)
        try:
            with open(path) as f:
                lengths = json.load(f)
            if not _valid_lengths(lengths):
                raise ValueError(f"expected a list of positive token counts, got {str(lengths)[:80]}")
        except FileNotFoundError:
            lengths = self._rebuild_index(None)
        except (OSError, ValueError) as e:  # (ValueError covers bad JSON and bad UTF-8)
            lengths = self._rebuild_index(f"{path} is malformed ({e})")
        return sorted(set(lengths), reverse=True)

    def _stored_lengths(self) -> list[int]:
        """n_tokens of every stored file whose header reads (the index's content, recovered from the files)."""
        out = set()
        for entry in os.scandir(self.dir):
            if entry.name.endswith(".safetensors"):
                try:
                    with safe_open(entry.path, framework="pt") as f:
                        n = int((f.metadata() or {})["n_tokens"])
                    if n > 0:
                        out.add(n)
                except (*_DAMAGE, OSError):
                    continue  # a damaged file is reported when a load reaches it
        return sorted(out)

    def _rebuild_index(self, problem: str | None) -> list[int]:
        try:
            lengths = self._stored_lengths()
        except OSError:
            return []  # no directory: nothing stored
        if problem:
            self._warn_once("index", "prefix store: %s; rebuilt from the %d stored lengths", problem, len(lengths))
        if lengths or problem:
            try:
                self._update_index(lambda old: [*old, *lengths])
            except OSError as e:
                self._warn_once("write", "prefix store %s cannot be written (%s): generation continues without "
                                "saving prefixes", self.dir, e)
        return lengths

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive hold of the index among processes (and threads, each opening its own lock file)."""
        with open(os.path.join(self.dir, _LOCK), "a") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            yield  # (closing the file releases the lock)

    def _update_index(self, update: Callable[[list[int]], list[int]]) -> None:
        """Read, update and atomically replace the index under the lock (a malformed index reads as empty)."""
        path = os.path.join(self.dir, INDEX)
        with self._locked():
            try:
                with open(path) as f:
                    old = json.load(f)
                old = old if _valid_lengths(old) else []
            except (OSError, ValueError):
                old = []
            data = json.dumps(sorted(set(update(old)))).encode()
            self._write_atomic(path, data)

    def _write_atomic(self, path: str, data: bytes) -> None:
        """Write under a unique temporary name in the same directory, then rename onto `path`: readers and other
        writers only ever see a whole file."""
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

    # ------------------------------------------------------------------ save / load one row
    def save(self, cache: KVCache, tokens: Sequence[int], fingerprint: str | None = None) -> str | None:
        """Store the state of a one-row cache that holds exactly `tokens`. Returns the file's path, or None when
        the directory cannot be written (reported once per store). `fingerprint`: `self.fingerprint(cache)` taken
        by a caller that saves several prefixes with the weights unchanged in between (one pass over them)."""
        if cache.batch_size != 1 or cache.lengths() != [len(tokens)]:
            raise ValueError(f"save needs a one-row cache at position {len(tokens)}, got lengths {cache.lengths()}")
        return self.save_state(row_state(cache, len(tokens)), tokens, fingerprint or self.fingerprint(cache))

    def save_state(self, state: dict[str, torch.Tensor], tokens: Sequence[int], fingerprint: str,
                   tail: dict[str, torch.Tensor] | None = None) -> str | None:
        """Store a row state (`dsv4.cache.row_state` after len(tokens) tokens) under `fingerprint` (as
        `fingerprint(cache)` gives it), with its `tail` if given (see the module doc). Returns the file's path, or
        None when the directory cannot be written."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        tensors.update({TAIL + k: v.detach().to("cpu").contiguous() for k, v in (tail or {}).items()})
        n = len(tokens)
        digest = _tokens_hash(fingerprint, tokens)
        meta = {"fingerprint": fingerprint, "n_tokens": str(n), "tokens": digest, "sha256": _digest(tensors)}
        path = self._path(digest)
        try:
            self._write_atomic(path, serialize(tensors, metadata=meta))
            self._update_index(lambda old: [*old, n])
        except OSError as e:
            self.activity.failed_saves += 1
            self._warn_once("write", "prefix store %s cannot be written (%s): generation continues without saving "
                            "prefixes", self.dir, e)
            return None
        self.activity.saved.append(n)
        return path

    def load(self, cache: KVCache, tokens: Sequence[int]) -> int:
        """Restore the longest stored prefix of `tokens` (shorter than `tokens`, so at least one token is left
        to compute) into a fresh one-row cache. Returns its length, 0 if none is usable."""
        if cache.batch_size != 1:
            raise ValueError("load needs a one-row cache (use cache.select(row))")
        stored = any(n < len(tokens) for n in self._lengths())  # (no pass over the weights when nothing fits)
        n = self.load_longer(cache, tokens, self.fingerprint(cache), 0) if stored else 0
        self.activity.loaded.append(n)
        return n

    def load_longer(self, cache: KVCache, tokens: Sequence[int], fingerprint: str, shorter: int) -> int:
        """Restore the longest stored prefix of `tokens` longer than `shorter` tokens and shorter than `tokens`,
        stored under `fingerprint`, into a one-row cache. Returns its length, 0 if none is usable (the cache
        is then untouched unless a stored prefix failed to fit it, which resets it)."""
        return self.load_best(cache, tokens, fingerprint, shorter)[0]

    def load_best(self, cache: KVCache, tokens: Sequence[int], fingerprint: str, shorter: int,
                  need: Sequence[str] | None = None) -> tuple[int, dict[str, torch.Tensor] | None]:
        """`load_longer`, but with `need` (tail names, e.g. ("logits",)) all of `tokens` may be restored too, from
        a file whose tail has every name in `need`: returns (length, that tail) then, (length, None) otherwise."""
        full = need is not None
        for n in (n for n in self._lengths() if shorter < n < len(tokens) + full):
            digest = _tokens_hash(fingerprint, tokens[:n])
            path = self._path(digest)
            if not os.path.isfile(path):
                continue
            try:
                tensors = self._read(path, fingerprint, digest, n)
            except _Damaged as e:
                log.warning("ignoring stored prefix %s: %s (removed)", path, e)
                with contextlib.suppress(OSError):
                    os.remove(path)
                continue
            except OSError as e:
                log.warning("ignoring stored prefix %s: cannot read it (%s)", path, e)
                continue
            tail = {k[len(TAIL):]: v for k, v in tensors.items() if k.startswith(TAIL)}
            if n == len(tokens) and not all(k in tail for k in need):
                continue  # (a file without the tail serves only longer requests)
            try:
                self._restore(cache, tensors, n)
                return n, tail if n == len(tokens) else None
            except (KeyError, RuntimeError) as e:  # e.g. a cache too short for this prefix
                log.warning("ignoring stored prefix %s: does not fit this cache (%s)", path, e)
        return 0, None

    @staticmethod
    def _read(path: str, fp: str, digest: str, n: int) -> dict[str, torch.Tensor]:
        """The file's tensors, after checking its structure, its key and the checksum of its bytes."""
        try:
            read_header(path)  # size / header consistency (truncation)
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("fingerprint") != fp or meta.get("tokens") != digest or meta.get("n_tokens") != str(n):
                    raise ValueError("made for another model, cache format or token sequence")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if _digest(tensors) != meta.get("sha256"):
                raise ValueError("checksum mismatch (corrupt file)")
        except _DAMAGE as e:
            raise _Damaged(str(e) or type(e).__name__) from None
        return tensors

    @staticmethod
    def _restore(cache: KVCache, tensors: dict[str, torch.Tensor], n: int) -> None:
        restore_row_state(cache, tensors, n)
