"""Training and evaluation windows from a 1-D token stream. A training batch is a pure function of (seed,
step), so resuming at step s reproduces the batches of an uninterrupted run with no loader state to save
beyond what checks that the data is the same."""
from __future__ import annotations

import hashlib

import torch


class TokenLoader:
    """Batches of `batch_size` contiguous windows of `seq_len + extra` tokens at random offsets (`extra`
    tokens past the inputs feed the next-token and MTP targets)."""

    def __init__(self, stream: torch.Tensor, batch_size: int, seq_len: int, extra: int = 1, seed: int = 0):
        _check_stream(stream, seq_len, extra)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.stream, self.batch_size, self.seq_len, self.extra, self.seed = stream, batch_size, seq_len, extra, seed

    def batch(self, step: int) -> torch.Tensor:
        """[batch_size, seq_len + extra] int64; the same for the same (seed, step) on any machine."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        window = self.seq_len + self.extra
        g = torch.Generator().manual_seed(_mix(self.seed, step))
        starts = torch.randint(0, len(self.stream) - window + 1, (self.batch_size, 1), generator=g)
        return self.stream[starts + torch.arange(window)].long()

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len, "extra": self.extra,
                "n_tokens": len(self.stream)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume with the saved seed; a different stream length or batch shape means the run would not
        continue on the same data, so it is an error rather than a silent change."""
        mine = self.state_dict()
        diff = [f"{k}: saved {state.get(k)}, now {mine[k]}" for k in mine if k != "seed" and state.get(k) != mine[k]]
        if diff:
            raise ValueError("the saved loader state does not match this data/loader (" + "; ".join(diff) + ")")
        self.seed = int(state["seed"])


def eval_batches(stream: torch.Tensor, batch_size: int, seq_len: int, extra: int = 1,
                 max_batches: int | None = None) -> list[torch.Tensor]:
    """Fixed evaluation batches [batch_size, seq_len + extra] (int64) from the start of `stream`. Window i
    starts at i * seq_len: the inputs never overlap and each token after the first is a next-token target
    exactly once (consecutive windows share only their `extra` tail). Only whole batches are returned,
    unless the stream holds fewer than `batch_size` windows: then one smaller batch of all of them."""
    _check_stream(stream, seq_len, extra)
    if batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ValueError(f"batch_size={batch_size} and max_batches={max_batches} must be >= 1")
    n_windows = (len(stream) - extra) // seq_len
    n_batches = n_windows // batch_size
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    sizes = [batch_size] * n_batches or [n_windows]
    idx = torch.arange(seq_len + extra)
    batches, start = [], 0
    for b in sizes:
        starts = (start + torch.arange(b)).unsqueeze(1) * seq_len
        batches.append(stream[starts + idx].long())
        start += b
    return batches


def _check_stream(stream: torch.Tensor, seq_len: int, extra: int) -> None:
    if stream.dim() != 1 or stream.is_floating_point():
        raise ValueError(f"expected a 1-D integer token stream, got {tuple(stream.shape)} {stream.dtype}")
    if seq_len < 1 or extra < 0:
        raise ValueError(f"seq_len={seq_len} must be >= 1 and extra={extra} >= 0")
    if len(stream) < seq_len + extra:
        raise ValueError(f"the token stream has {len(stream)} tokens, fewer than one window of "
                         f"seq_len + extra = {seq_len + extra}")


def _mix(seed: int, step: int) -> int:
    """A 63-bit generator seed from (seed, step) with no collisions between nearby pairs (unlike seed + step)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest(), "big") >> 1
