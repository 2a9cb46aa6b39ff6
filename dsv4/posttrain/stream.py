"""Pre-training rows: documents joined into one token stream and cut into rows of a fixed length.

Why: every step then has the same shape ([batch, seq_len + 1 + n_mtp], as `dsv4 train` feeds), so a CUDA graph
captured on the first step replays for all, and no per-batch document layout is built. As in `dsv4 train`,
attention runs across the documents of a row (each ends in EOS) and every position is a target.
"""
from __future__ import annotations

import random
from typing import Iterator

import torch

from ..errors import InvalidArgument
from .chat_data import Example

__all__ = ["StreamRows"]


class StreamRows:
    """Batches of `batch_size` rows of `seq_len + extra` tokens (the inputs, then the `extra` tokens their
    next-token and MTP targets reach) read in order from the stream of every epoch's documents, each epoch
    shuffled by `seed` and the epoch; consecutive rows start `seq_len` tokens apart, so every token is a
    target once per epoch."""

    def __init__(self, examples: list[Example], batch_size: int, seq_len: int, extra: int, seed: int = 0):
        if batch_size < 1 or seq_len < 1:
            raise InvalidArgument(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        self.docs = [ex.tokens for ex in examples if ex.tokens]
        self.n_tokens = sum(len(d) for d in self.docs)
        if self.n_tokens < seq_len + extra:
            raise InvalidArgument(f"{self.n_tokens} tokens of documents do not fill one row of "
                                  f"{seq_len + extra} tokens")
        self.batch_size, self.seq_len, self.extra, self.seed = batch_size, seq_len, extra, seed

    @property
    def batches_per_epoch(self) -> int:
        return max(1, self.n_tokens // (self.batch_size * self.seq_len))

    def epoch(self, epoch: int) -> torch.Tensor:
        """The epoch's stream: its documents in their shuffled order, joined."""
        order = list(self.docs)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return torch.tensor([t for d in order for t in d], dtype=torch.long)

    def __iter__(self) -> Iterator[torch.Tensor]:
        S, window, need = self.seq_len, self.seq_len + self.extra, self.batch_size * self.seq_len + self.extra
        buf, epoch = self.epoch(0), 1
        while True:
            while len(buf) < need:
                buf = torch.cat([buf, self.epoch(epoch)])
                epoch += 1
            starts = torch.arange(self.batch_size)[:, None] * S
            yield buf[starts + torch.arange(window)]
            buf = buf[self.batch_size * S:]
