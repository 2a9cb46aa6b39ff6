"""SFT batches: tokenised conversations -> rows of input ids with next-token (and MTP) targets on the assistant's
tokens only, several conversations packed into one row where asked.

Targets never cross a document: the last position of a document predicts nothing (its next token is another
document's), and MTP depth k at position t is trained only while t+k+2 lies in the same document. With packing
the batch carries a `PackedDocuments` layout, so the model's attention keeps the documents apart too; a batch
whose rows hold one document each (the rest padding) needs none, since attention is causal.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import InvalidArgument
from ..model.documents import PackedDocuments
from .buckets import bucketed
from .chat_data import Example

__all__ = ["IGNORE", "Batch", "fit_examples", "pack_rows", "make_batch", "SFTBatches"]

log = logging.getLogger(__name__)

IGNORE = -100   # target of a position that trains nothing (F.cross_entropy's ignore_index)


@dataclass
class Batch:
    tokens: torch.Tensor                 # [B, S] input ids
    targets: torch.Tensor                # [B, S] token t+1, or IGNORE
    mtp_inputs: list[torch.Tensor]       # per MTP depth k: [B, S] token t+k+1 of the same document (else filler)
    mtp_targets: list[torch.Tensor]      # per MTP depth k: [B, S] token t+k+2, or IGNORE
    docs: PackedDocuments | None = None  # the rows' documents where a row holds several
    lengths: list[list[int]] = field(default_factory=list)   # documents' lengths per row (padding excluded)

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        docs = None if self.docs is None else self.docs.to(device)
        return Batch(move(self.tokens), move(self.targets), [move(t) for t in self.mtp_inputs],
                     [move(t) for t in self.mtp_targets], docs, self.lengths)

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


def fit_examples(examples: list[Example], seq_len: int) -> list[Example]:
    """Examples cut to `seq_len` tokens (a warning counts them); those left with no trained target are dropped."""
    if seq_len < 2:
        raise InvalidArgument(f"seq_len must be >= 2, got {seq_len}")
    out, cut, dropped = [], 0, 0
    for ex in examples:
        if len(ex.tokens) > seq_len:
            cut += 1
            ex = Example(ex.tokens[:seq_len], ex.mask[:seq_len], ex.where)
        if any(ex.mask[1:]):
            out.append(ex)
        else:
            dropped += 1
    if cut:
        log.warning("%d of %d conversations are longer than seq_len=%d tokens and were cut (%d left nothing to "
                    "train on and were dropped)", cut, len(examples), seq_len, dropped)
    if not out:
        raise InvalidArgument(f"no conversation has an assistant token within seq_len={seq_len} tokens")
    return out


def pack_rows(examples: list[Example], seq_len: int, pack: bool = True) -> list[list[Example]]:
    """Rows of at most `seq_len` tokens: first-fit of the examples in order (pack), or one example per row."""
    if not pack:
        return [[ex] for ex in examples]
    rows: list[list[Example]] = []
    free: list[int] = []
    for ex in examples:
        n = len(ex.tokens)
        i = next((i for i, f in enumerate(free) if f >= n), None)
        if i is None:
            rows.append([ex])
            free.append(seq_len - n)
        else:
            rows[i].append(ex)
            free[i] -= n
    return rows


def make_batch(rows: list[list[Example]], n_mtp: int, pad_id: int, bucket: int = 1, length: int | None = None
               ) -> Batch:
    """Tensors for rows of examples, each row padded to the longest row (rounded up to a multiple of `bucket`:
    buckets.py), or to `length` where given (an empty row is all padding). Built whole-batch (not document by
    document: a pre-training batch of 64 x 512 packed tokens holds ~1,500 short documents, and per-document
    tensor writes took ~0.4 s, longer than a GPU step)."""
    lengths = [[len(ex.tokens) for ex in row] for row in rows]
    S = length if length is not None else bucketed(max(sum(ls) for ls in lengths), bucket)
    if S < max(sum(ls) for ls in lengths):
        raise InvalidArgument(f"rows of up to {max(sum(ls) for ls in lengths)} tokens do not fit length={S}")
    B = len(rows)
    flat_tok, flat_mask, flat_pos, flat_len = [], [], [], []
    for row, ls in zip(rows, lengths):
        pad = S - sum(ls)
        for ex, n in zip(row, ls):
            flat_tok += ex.tokens
            flat_mask += ex.mask
            flat_pos += range(n)
            flat_len += [n] * n
        flat_tok += [pad_id] * pad
        flat_mask += [0] * pad
        flat_pos += [0] * pad
        flat_len += [0] * pad                       # padding: no document, so nothing is read or trained there
    tok = torch.tensor(flat_tok, dtype=torch.long).view(B, S)
    trained = torch.tensor(flat_mask, dtype=torch.bool).view(B, S)
    pos = torch.tensor(flat_pos, dtype=torch.long).view(B, S)
    doc_len = torch.tensor(flat_len, dtype=torch.long).view(B, S)
    shift_max = n_mtp + 1
    tok_ext = torch.cat([tok, tok.new_full((B, shift_max), pad_id)], 1)
    trained_ext = torch.cat([trained, trained.new_zeros((B, shift_max))], 1)

    def ahead(x: torch.Tensor, k: int) -> torch.Tensor:   # x[:, t + k] at position t
        return x[:, k:k + S]

    # the main head (shift 0) and MTP depth k (shift k + 1): position t reads token t + shift and predicts token
    # t + shift + 1, both of this document
    def target(shift: int) -> torch.Tensor:
        ok = (pos + shift + 1 < doc_len) & ahead(trained_ext, shift + 1)
        return torch.where(ok, ahead(tok_ext, shift + 1), IGNORE)

    targets = target(0)
    mtp_in = [torch.where(pos + k + 1 < doc_len, ahead(tok_ext, k + 1), pad_id) for k in range(n_mtp)]
    mtp_tg = [target(k + 1) for k in range(n_mtp)]
    docs = None
    if any(len(row) > 1 for row in rows):   # pads count as a document of their own
        docs = PackedDocuments([ls + ([S - sum(ls)] if sum(ls) < S else []) for ls in lengths], S)
    return Batch(tok, targets, mtp_in, mtp_tg, docs, lengths)


class SFTBatches:
    """Batches of `batch_size` rows over epochs: each epoch shuffles the conversations (by `seed` and the
    epoch), packs them into rows and deals the rows out in order; a last partial batch is kept. Each batch's
    length is rounded up to a multiple of `bucket` (buckets.py). `fixed`: every batch has one shape, `row_len`
    (seq_len rounded up to the bucket) by `batch_size` rows (for a CUDA graph, which replays one shape); an
    epoch's last partial batch is dropped (its conversations come again, elsewhere, in the next epoch's order),
    or, where it is the epoch's only batch, filled with empty rows."""

    def __init__(self, examples: list[Example], batch_size: int, seq_len: int, n_mtp: int, pad_id: int, *,
                 pack: bool = True, seed: int = 0, bucket: int = 1, fixed: bool = False):
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
        self.examples = fit_examples(examples, seq_len)
        self.batch_size, self.seq_len, self.n_mtp, self.pad_id = batch_size, seq_len, n_mtp, pad_id
        self.pack, self.seed, self.bucket, self.fixed = pack, seed, bucket, fixed
        self.row_len = bucketed(seq_len, bucket)

    def epoch(self, epoch: int) -> list[list[list[Example]]]:
        """The epoch's batches (lists of rows)."""
        order = list(self.examples)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        rows = pack_rows(order, self.seq_len, self.pack)
        batches = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        if self.fixed and len(batches) > 1 and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch(0))

    def __iter__(self) -> Iterator[Batch]:
        epoch = 0
        while True:
            for rows in self.epoch(epoch):
                if self.fixed:
                    yield make_batch(rows + [[]] * (self.batch_size - len(rows)), self.n_mtp, self.pad_id,
                                     length=self.row_len)
                else:
                    yield make_batch(rows, self.n_mtp, self.pad_id, self.bucket)
            epoch += 1
