"""On-disk prefix reuse: save a sequence's cache state after n tokens; a later request that starts with the
same n tokens loads it and computes only the rest.

A stored prefix is one safetensors file holding, per layer, the window ring, the first n // ratio
compressed entries and indexer keys (raw records: exact whatever the storage format) and the compressor
states. It is keyed by sha256(model fingerprint, token ids); its metadata carries the fingerprint, the
token count, the token hash and a sha256 of every tensor's bytes. A file that is corrupt, truncated or
made for another model, storage format or token sequence is reported and ignored, never used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..cache import KVCache
from ..checkpoint.safetensors_io import CheckpointError, read_header

log = logging.getLogger(__name__)


def model_fingerprint(model, cache: KVCache) -> str:
    """Config, storage formats, numerics switches and a sample of every weight: any change gives a new key."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    quant_sim = any(getattr(m, "quant_sim", False) for m in model.modules())
    h.update(f"{cache.kv_dtype}|{cache.index_dtype}|{cache.dtype}|{quant_sim}".encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = torch.cat((flat[:16], flat[-16:], flat[:: max(1, flat.numel() // 64)][:64])).float().cpu()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _tokens_hash(fingerprint: str, tokens: Sequence[int]) -> str:
    return hashlib.sha256((fingerprint + ":" + ",".join(map(str, tokens))).encode()).hexdigest()


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class PrefixStore:
    """A directory of saved prefixes for one model and cache format."""

    def __init__(self, directory: str | os.PathLike, model, block: int = 1024):
        self.dir, self.model, self.block = os.fspath(directory), model, block
        os.makedirs(self.dir, exist_ok=True)
        self._fingerprint: dict[tuple, str] = {}

    def fingerprint(self, cache: KVCache) -> str:
        key = (cache.kv_dtype, cache.index_dtype, cache.dtype)
        if key not in self._fingerprint:
            self._fingerprint[key] = model_fingerprint(self.model, cache)
        return self._fingerprint[key]

    def _path(self, digest: str) -> str:
        return os.path.join(self.dir, f"{digest}.safetensors")

    def _lengths(self) -> list[int]:
        try:
            with open(os.path.join(self.dir, "lengths.json")) as f:
                return sorted(set(json.load(f)), reverse=True)
        except (OSError, ValueError):
            return []

    def boundaries(self, n_tokens: int) -> list[int]:
        """Where a prefill of n tokens stops to save: every `block` tokens, and at the end."""
        return sorted(set(range(self.block, n_tokens, self.block)) | {n_tokens})

    # ------------------------------------------------------------------ save / load one row
    def save(self, cache: KVCache, tokens: Sequence[int]) -> str:
        """Store the state of a one-row cache that holds exactly `tokens`."""
        if cache.batch_size != 1 or cache.lengths() != [len(tokens)]:
            raise ValueError(f"save needs a one-row cache at position {len(tokens)}, got lengths {cache.lengths()}")
        cache.check_intact()  # a row a failed step left half-written must never be stored
        fp = self.fingerprint(cache)
        n = len(tokens)
        tensors: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(cache.layers):
            tensors[f"{i}.window"] = layer.window_rows.buf[0]
            if layer.entry_rows is not None:
                tensors[f"{i}.entries"] = layer.entry_rows.buf[0, : n // layer.ratio]
            if layer.key_rows is not None:
                tensors[f"{i}.keys"] = layer.key_rows.buf[0, : n // layer.ratio]
            for tag, st in (("cstate", layer.compressor_state), ("istate", layer.indexer_state)):
                if st is not None:
                    tensors[f"{i}.{tag}.kv"], tensors[f"{i}.{tag}.score"] = st.kv[0], st.score[0]
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        digest = _tokens_hash(fp, tokens)
        meta = {"fingerprint": fp, "n_tokens": str(n), "tokens": digest, "sha256": _digest(tensors)}
        path = self._path(digest)
        save_file(tensors, path + ".tmp", metadata=meta)
        os.replace(path + ".tmp", path)  # never leave a half-written file under the real name
        lengths = set(self._lengths()) | {n}
        with open(os.path.join(self.dir, "lengths.json"), "w") as f:
            json.dump(sorted(lengths), f)
        return path

    def load(self, cache: KVCache, tokens: Sequence[int]) -> int:
        """Restore the longest stored prefix of `tokens` (shorter than `tokens`, so at least one token is left
        to compute) into a fresh one-row cache. Returns its length, 0 if none is usable."""
        if cache.batch_size != 1:
            raise ValueError("load needs a one-row cache (use cache.select(row))")
        fp = self.fingerprint(cache)
        for n in self._lengths():
            if n >= len(tokens):
                continue
            digest = _tokens_hash(fp, tokens[:n])
            path = self._path(digest)
            if not os.path.isfile(path):
                continue
            try:
                self._restore(cache, path, fp, digest, n)
                return n
            except (CheckpointError, ValueError, RuntimeError, OSError, KeyError) as e:
                log.warning("ignoring stored prefix %s: %s", path, e)
                cache.reset()
        return 0

    def _restore(self, cache: KVCache, path: str, fp: str, digest: str, n: int) -> None:
        read_header(path)  # size / header consistency (truncation)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fp or meta.get("tokens") != digest or meta.get("n_tokens") != str(n):
                raise ValueError("made for another model, cache format or token sequence")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if _digest(tensors) != meta.get("sha256"):
            raise ValueError("checksum mismatch (corrupt file)")
        cache.reset()
        for i, layer in enumerate(cache.layers):
            layer.window_rows.buf[0].copy_(tensors[f"{i}.window"])
            if layer.entry_rows is not None:
                layer.entry_rows.buf[0, : n // layer.ratio].copy_(tensors[f"{i}.entries"])
            if layer.key_rows is not None:
                layer.key_rows.buf[0, : n // layer.ratio].copy_(tensors[f"{i}.keys"])
            for tag, st in (("cstate", layer.compressor_state), ("istate", layer.indexer_state)):
                if st is not None:
                    st.kv[0].copy_(tensors[f"{i}.{tag}.kv"])
                    st.score[0].copy_(tensors[f"{i}.{tag}.score"])
        cache.end(n)
