"""One greedy row's whole speculative step (n_draft 1) as one function of static buffers, so a GPU replays it as one
CUDA graph with nothing launched around it but the copy of its few host inputs and the transfer of its results.

The row's decoding state lives in `RowState`'s device buffers, with the main cache at positions 0 .. P-1 and the
next token x_P chosen (not yet in the cache):
  * lanes [1, 2, R, C]: the main lanes h_{P-2}, h_{P-1}; ids [1, 2]: the tokens x_{P-1}, x_P;
  * x_logits [1, V]: the logits x_P was chosen from, x_finite [1]: whether they are all finite;
  * the MTP cache holds the pairs (h_t, x_{t+1}) for every t < P-2 (its positions may trail: see
    SpeculativeDecoder.begin).
`greedy_draft_verify` then, all on device data:
  1. catch-up and draft: the MTP block over the pairs (h_{P-2}, x_{P-1}), (h_{P-1}, x_P), with the MTP cache
     checkpointed; the draft d1 is the argmax of its logits at the last pair (0, and no draft, for a row that does
     not go on after x_P);
  2. `greedy_verify` on the main cache over [x_P, d1]: checkpoint, forward, acceptance a, kept count keep, rollback;
  3. the MTP cache keeps `keep` of its two pairs: for a row that goes on (keep = 1 + a) it again holds the pairs
     t < P' - 2 at the new length P' = P + 1 + a (with a = 0 the pair (h_{P-1}, x_P) is rolled back, to be made
     again, at the same position, by the next step);
  4. the state moves on by 1 + a: lanes from [h_{P-2}, h_{P-1}, h_P, h_{P+1}], ids [x_P or d1, y] (y = the argmax
     of target row a), the next logits target row a, their finiteness carried (each target row is checked once).
Its shapes never depend on a, and it reads no host value. The host stages budget, live flag and stop tokens in one
pinned tensor (`RowState.stage`: one copy up) and gets the packed results in one transfer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..cache import KVCache
from ..errors import InvalidArgument
from .fused_verify import greedy_verify

WIDTH = 2   # pairs of the MTP catch-up and tokens of the verify: n_draft + 1, with n_draft 1


class RowState:
    """The device buffers of one row's state (module doc) and of its staged host inputs: host [1, 2 + n_stops]
    long, the row's budget, its live flag (it goes on after x_P) and its stop tokens (-1 pads)."""

    def __init__(self, model, n_stops: int, device: torch.device):
        cfg = model.config
        self.lanes = torch.zeros(1, WIDTH, cfg.hc_mult, cfg.dim, dtype=model.dtype, device=device)
        self.ids = torch.zeros(1, WIDTH, dtype=torch.long, device=device)
        self.x_logits = torch.zeros(1, cfg.vocab_size, device=device)
        self.x_finite = torch.ones(1, dtype=torch.bool, device=device)
        self.host = torch.zeros(1, 2 + n_stops, dtype=torch.long, device=device)
        pin = self.host.is_cuda
        self._staging = torch.zeros(self.host.shape, dtype=torch.long, pin_memory=pin)
        self._staged = self._staging.numpy()   # (writes to it run no torch op)

    @property
    def n_stops(self) -> int:
        return self.host.shape[1] - 2

    def load(self, lanes: torch.Tensor, ids: torch.Tensor, x_logits: torch.Tensor) -> None:
        """Start from a row's state: lanes [1, 2, R, C] (h_{P-2}, h_{P-1}), ids [1, 2] (x_{P-1}, x_P), the logits
        [V] x_P was chosen from."""
        self.lanes.copy_(lanes)
        self.ids.copy_(ids)
        self.x_logits.copy_(x_logits.view(1, -1))
        self.x_finite.copy_(torch.isfinite(self.x_logits).all(-1))

    def stage(self, budget: int, live: bool, stops: tuple[int, ...]) -> None:
        """The step's host inputs into `host`, from pinned memory without a wait. The staging buffer is reused:
        the previous step's copy has run, as every step waits for its results."""
        if len(stops) > self.n_stops:
            raise InvalidArgument(f"{len(stops)} stop tokens for a row state of {self.n_stops}")
        row = self._staged[0]
        row[0], row[1] = budget, int(live)
        row[2:] = -1
        row[2:2 + len(stops)] = stops
        self.host.copy_(self._staging, non_blocking=True)


@dataclass
class RowOut:
    packed: torch.Tensor     # [1, PACKED + 1] long: a, y, draft count, finite, keep, d1 (fused_verify's layout)
    logits: torch.Tensor     # [1, 2, V] the logits of x_P and of d1 (the emitted tokens' first 1 + a rows)


def greedy_draft_verify(model, main: KVCache, mtp: KVCache, state: RowState) -> RowOut:
    """One speculative step of the single row of `main` and `mtp` (module doc): the same tokens and main cache as
    plain greedy decoding. Updates `state` and both caches' device positions; the host mirrors are the caller's
    (KVCache.end_rollback of starts + 2 by the packed keep)."""
    if main.batch_size != 1 or mtp.batch_size != 1:
        raise InvalidArgument("greedy_draft_verify steps one row")
    lanes, ids = state.lanes, state.ids
    budget_live = state.host[:, :2].T                                 # [2, 1]
    stop_t = state.host[:, 2:]
    live = state.host[:, 1] > 0
    block = model.mtp[0]
    mtp_ckpt = mtp.checkpoint(WIDTH)
    pos0 = mtp.begin(ids.shape)
    out = block(lanes, model.embed(ids), ids, pos0, mtp.layer(0))
    mtp.end(WIDTH)
    draft_logits = ops.linear_fp32(block.collapse(out[:, -1:]), model.head.weight)[:, -1]   # [1, V]
    drafts = torch.where(live, draft_logits.argmax(-1), 0)[:, None]   # [1, 1]
    res = greedy_verify(model, main, ids[:, 1], drafts, live.long(), stop_t, budget_live, x_finite=state.x_finite)
    a = res.a
    mtp.rollback_on_device(mtp_ckpt, res.keep)
    logits = torch.cat((state.x_logits[:, None], res.target[:, :1]), 1)
    shift = (a + 1)[:, None] + torch.arange(WIDTH, device=a.device)   # [1, 2]: positions P-1+a, P+a of P-2 ..
    R, C = lanes.shape[2:]
    lanes.copy_(torch.cat((lanes, res.h), 1).gather(1, shift[:, :, None, None].expand(-1, -1, R, C)))
    ids.copy_(torch.stack((torch.cat((ids, drafts), 1).gather(1, shift[:, :1])[:, 0], res.y), 1))
    state.x_logits.copy_(res.target.gather(1, a.view(-1, 1, 1).expand(-1, 1, res.target.shape[2]))[:, 0])
    state.x_finite.copy_(res.row_finite.gather(1, a[:, None])[:, 0])
    return RowOut(res.packed, logits)
