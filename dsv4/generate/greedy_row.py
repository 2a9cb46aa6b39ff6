"""One greedy row's whole speculative step (any n_draft k) as one function of static buffers, so a GPU replays it
as one CUDA graph with nothing launched around it but the copy of its few host inputs and the transfer of its
results.

The row's decoding state lives in `RowState`'s device buffers (width k + 1), with the main cache at positions
0 .. P-1 and the next token x_P chosen (not yet in the cache):
  * lanes [1, k+1, R, C]: the main lanes h_{P-k-1} .. h_{P-1}; ids [1, k+1]: the tokens x_{P-k} .. x_P;
  * x_logits [1, V]: the logits x_P was chosen from, x_finite [1]: whether they are all finite;
  * the MTP cache holds the pairs (h_t, x_{t+1}) for every t < P-k-1 (its positions may trail: see
    SpeculativeDecoder.begin).
`greedy_draft_verify` then, all on device data:
  1. catch-up and drafts: the MTP cache is checkpointed over 2k positions; the MTP block runs over the k + 1 pairs
     (h_{P-k-1}, x_{P-k}) .. (h_{P-1}, x_P), and d1 is the argmax of its logits at the last pair; each further
     draft d_{j+1} (j < k) is the argmax after one more MTP forward of the block's own last output lane with d_j.
     As in the batched step's drafting, a row drafts at most min(k, budget - 1) tokens (none when it does not go
     on after x_P) and stops after a drafted stop token; the drafts after its last are 0 and not counted;
  2. `greedy_verify` on the main cache over [x_P, d1 .. dk]: checkpoint, forward, acceptance a, kept count keep,
     rollback;
  3. the MTP cache keeps `keep` of its 2k appended pairs, all catch-up pairs (keep <= 1 + a <= k + 1): for a row
     that goes on (keep = 1 + a) it again holds the pairs t < P' - k - 1 at the new length P' = P + 1 + a; the
     catch-up pairs past it and the further drafts' approximate pairs are rolled back (the former to be made
     again, at the same positions, by the next step);
  4. the state moves on by 1 + a: lanes from [h_{P-k-1} .. h_{P-1}, h_P .. h_{P+k}], ids from
     [x_{P-k} .. x_P, d1 .. dk] then y (the argmax of target row a), the next logits target row a, their
     finiteness carried (each target row is checked once).
Its shapes never depend on a, and it reads no host value. The host stages budget, live flag and stop tokens in one
pinned tensor (`RowState.stage`: one copy up) and gets the packed results in one transfer. The step itself then
writes the next step's budget and live flag there (`_carry`), so further steps can be launched before its results
are read (SpeculativeDecoder.greedy_row_stream): a step launched after the row finished is dead (flag -1) and
changes nothing (both caches keep 0 tokens, the state stays). The MTP checkpoint spans 2k positions, so the step
needs 2k <= the window (`fits`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..cache import KVCache
from ..errors import InvalidArgument
from .fused_verify import greedy_verify


def fits(n_draft: int, window: int) -> bool:
    """Whether a step of n_draft drafts fits `greedy_draft_verify`: its MTP checkpoint spans 2 * n_draft
    positions, at most the window ring's."""
    return 1 <= n_draft and 2 * n_draft <= window


class RowState:
    """The device buffers of one row's state (module doc) for n_draft drafts and of its staged host inputs: host
    [1, 2 + n_stops] long, the row's budget, its mode (1: live, it goes on after x_P; 0: it emits x_P alone and
    finishes; -1: dead, finished before this step) and its stop tokens (-1 pads). Each step writes the next step's
    budget and mode."""

    def __init__(self, model, n_stops: int, device: torch.device, n_draft: int = 1):
        cfg = model.config
        self.n_draft = n_draft
        width = n_draft + 1
        self.lanes = torch.zeros(1, width, cfg.hc_mult, cfg.dim, dtype=model.dtype, device=device)
        self.ids = torch.zeros(1, width, dtype=torch.long, device=device)
        self.x_logits = torch.zeros(1, cfg.vocab_size, device=device)
        self.x_finite = torch.ones(1, dtype=torch.bool, device=device)
        self.host = torch.zeros(1, 2 + n_stops, dtype=torch.long, device=device)
        pin = self.host.is_cuda
        self._staging = torch.zeros(self.host.shape, dtype=torch.long, pin_memory=pin)
        self._staged = self._staging.numpy()   # (writes to it run no torch op)

    @property
    def width(self) -> int:
        """The lanes (and tokens) the state holds: n_draft + 1."""
        return self.n_draft + 1

    @property
    def n_stops(self) -> int:
        return self.host.shape[1] - 2

    def load(self, lanes: torch.Tensor, ids: torch.Tensor, x_logits: torch.Tensor) -> None:
        """Start from a row's state: lanes [1, k+1, R, C] (h_{P-k-1} .. h_{P-1}), ids [1, k+1] (x_{P-k} .. x_P),
        the logits [V] x_P was chosen from."""
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
    packed: torch.Tensor     # [1, PACKED + k] long: a, y, draft count, finite, keep, d1 .. dk (fused_verify's)
    logits: torch.Tensor     # [1, k+1, V] the logits of x_P and of d1 .. dk (the emitted tokens' first 1 + a rows)


def mtp_forward(model, mtp: KVCache, lanes: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first MTP block over lanes [B, n, R, C] paired with the next tokens ids [B, n], appended to `mtp`: its
    output lanes and the logits [B, vocab] at the last position."""
    block = model.mtp[0]
    pos0 = mtp.begin(ids.shape)
    out = block(lanes, model.embed(ids), ids, pos0, mtp.layer(0))
    mtp.end(ids.shape[1])
    return out, ops.linear_fp32(block.collapse(out[:, -1:]), model.head.weight)[:, -1]


def greedy_draft_verify(model, main: KVCache, mtp: KVCache, state: RowState) -> RowOut:
    """One speculative step of the single row of `main` and `mtp` (module doc): the same tokens and main cache as
    plain greedy decoding. Updates `state` and both caches' device positions; the host mirrors are the caller's
    (KVCache.end_rollback of the starts + k + 1 (main) and + 2k (MTP) by the packed keep)."""
    if main.batch_size != 1 or mtp.batch_size != 1:
        raise InvalidArgument("greedy_draft_verify steps one row")
    k = state.n_draft
    lanes, ids = state.lanes, state.ids
    budget_live = state.host[:, :2].clamp(min=0).T                   # [2, 1] (a dead row: not live)
    stop_t = state.host[:, 2:]
    live = state.host[:, 1] > 0
    dead = state.host[:, 1] < 0
    limit = torch.where(live, (state.host[:, 0] - 1).clamp(max=k), 0)   # [1] the drafts the row may make
    mtp_ckpt = mtp.checkpoint(2 * k)
    out, draft_logits = mtp_forward(model, mtp, lanes, ids)
    alive = limit > 0
    drafts, counted = [], []
    for j in range(k):
        if j:
            alive = alive & (limit > j)
        drafts.append(torch.where(alive, draft_logits.argmax(-1), 0))
        counted.append(alive)
        if j == k - 1:
            break
        out, draft_logits = mtp_forward(model, mtp, out[:, -1:], drafts[j][:, None])
        alive = alive & ~(drafts[j][:, None] == stop_t).any(-1)       # drafting stops after a drafted stop
    drafts_t = torch.stack(drafts, 1)                                 # [1, k]
    n_drafts = torch.stack(counted, 1).long().sum(1)                  # [1]
    res = greedy_verify(model, main, ids[:, -1], drafts_t, n_drafts, stop_t, budget_live, x_finite=state.x_finite)
    a = res.a
    mtp.rollback_on_device(mtp_ckpt, res.keep)
    logits = torch.cat((state.x_logits[:, None], res.target[:, :k]), 1)
    shift = (a + 1)[:, None] + torch.arange(k + 1, device=a.device)   # [1, k+1]: positions P-k+a .. P+a of P-k-1 ..
    R, C = lanes.shape[2:]
    moved_lanes = torch.cat((lanes, res.h), 1).gather(1, shift[:, :, None, None].expand(-1, -1, R, C))
    moved_ids = torch.cat((torch.cat((ids, drafts_t), 1).gather(1, shift[:, :k]), res.y[:, None]), 1)
    x_logits = res.target.gather(1, a.view(-1, 1, 1).expand(-1, 1, res.target.shape[2]))[:, 0]
    lanes.copy_(torch.where(dead.view(-1, 1, 1, 1), lanes, moved_lanes))   # (a dead row's state stays)
    ids.copy_(torch.where(dead[:, None], ids, moved_ids))
    state.x_logits.copy_(torch.where(dead[:, None], state.x_logits, x_logits))
    state.x_finite.copy_(torch.where(dead, state.x_finite, res.row_finite.gather(1, a[:, None])[:, 0]))
    _carry(state, live, a, res.keep, res.y, stop_t)
    return RowOut(res.packed, logits)


def _carry(state: RowState, live: torch.Tensor, a: torch.Tensor, keep: torch.Tensor, y: torch.Tensor,
           stop_t: torch.Tensor) -> None:
    """The next step's budget and mode into `state.host`, from this step's outcome (device data): a live row
    that did not finish (it keeps x and its a accepted drafts: keep = a + 1) has emitted 1 + a tokens and goes
    on with y, live while y is no stop token and more than one token is left, else emitting y alone (mode 0);
    any other row is dead (-1). So steps launched before this one's results are read need nothing staged."""
    budget = state.host[:, 0]
    go = live & (keep > a)
    left = budget - 1 - a
    on = go & ~(y[:, None] == stop_t).any(-1) & (left > 1)
    mode = torch.where(on, 1, torch.where(go, 0, -1))
    state.host[:, :2].copy_(torch.stack((torch.where(live, left, budget), mode), 1))
