"""A run's data, ready to train on: documents -> a held-out split -> the tokenizer (given, resumed from the
run directory, or trained on the training split) -> cached train and validation token streams."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ...generate.tokenizer import Tokenizer
from ..config import TrainConfig
from ..tokenizer import train_bpe
from .corpus import read_documents, split_documents, stdlib_sources
from .tokens import cached_tokens

log = logging.getLogger(__name__)

__all__ = ["PreparedData", "prepare_data"]


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    tokenizer_dir: str         # OUT/tokenizer: copied into every checkpoint and the final export
    train: torch.Tensor        # 1-D token streams
    val: torch.Tensor


def prepare_data(cfg: TrainConfig, out: str) -> PreparedData:
    """The tokenizer and token streams of the run in `out` (caches under `cfg.data_cache` or OUT/data_cache, so
    a second call, or another rank after the first, only reads)."""
    docs = read_documents(cfg.data) if cfg.data else stdlib_sources(cfg.max_corpus_bytes)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.seed)
    tok_dir = os.path.join(out, "tokenizer")
    if cfg.tokenizer:
        tok = Tokenizer.from_dir(cfg.tokenizer)
        os.makedirs(tok_dir, exist_ok=True)
        tok.tok.save(os.path.join(tok_dir, "tokenizer.json"))
    elif os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        tok = Tokenizer.from_dir(tok_dir)
    else:
        vocab = cfg.model().vocab_size
        log.info("training a %d-entry byte-level BPE on %d documents", vocab, len(train_docs))
        tok = train_bpe((d.text for d in train_docs), vocab, tok_dir)
    cache = cfg.data_cache or os.path.join(out, "data_cache")
    return PreparedData(tok, tok_dir, cached_tokens(train_docs, tok, cache), cached_tokens(val_docs, tok, cache))
