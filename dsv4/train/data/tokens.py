"""Documents -> one token stream (each document ends with EOS, so the model learns where documents stop and
windows may span documents), with an on-disk cache so a restart does not re-tokenize the corpus."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from ...generate.tokenizer import Tokenizer
from .corpus import Document

_CHUNK = 256  # documents per encode_batch call: parallel, without holding every Encoding of the corpus


def tokenize_documents(docs: list[Document], tok: Tokenizer) -> torch.Tensor:
    """1-D int32 stream: each document's tokens followed by `tok.eos_id`."""
    if tok.eos_id is None:
        raise ValueError("the tokenizer has no EOS token, which separates documents in the stream")
    eos = np.array([tok.eos_id], dtype=np.int32)
    parts = []
    with tqdm(total=len(docs), desc="tokenizing", unit="doc", disable=len(docs) <= 1000) as bar:
        for start in range(0, len(docs), _CHUNK):
            chunk = [d.text for d in docs[start:start + _CHUNK]]
            for enc in tok.tok.encode_batch(chunk, add_special_tokens=False):
                parts += [np.asarray(enc.ids, dtype=np.int32), eos]
            bar.update(len(chunk))
    return torch.from_numpy(np.concatenate(parts))


def cached_tokens(docs: list[Document], tok: Tokenizer, cache_path: str | os.PathLike | None) -> torch.Tensor:
    """`tokenize_documents`, saved as `<cache_path>/tokens-<key>.npy` (a folder) and loaded from there
    next time. The key hashes the tokenizer and every document's name and text, so any change to either
    makes a new file instead of reusing a stale one."""
    if cache_path is None:
        return tokenize_documents(docs, tok)
    h = hashlib.sha256(tok.tok.to_str().encode())
    h.update(str(tok.eos_id).encode())
    for d in docs:
        h.update(f"\0{d.name}\0{len(d.text)}\0".encode())
        h.update(d.text.encode())
    file = os.path.join(os.fspath(cache_path), f"tokens-{h.hexdigest()[:20]}.npy")
    if os.path.isfile(file):
        return torch.from_numpy(np.load(file))
    stream = tokenize_documents(docs, tok)
    os.makedirs(os.path.dirname(file), exist_ok=True)
    tmp = f"{file}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, stream.numpy())
    os.replace(tmp, file)  # atomic: an interrupted save never leaves a truncated cache file behind
    return stream
