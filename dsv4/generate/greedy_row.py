"""One greedy row's whole speculative step (any n_draft k) as one function of static buffers, so a GPU replays it
as one CUDA graph with nothing launched around it but the copy of its few host inputs and the transfer of its
results.

The row's decoding state lives in `RowState`'s device buffers (width k + 1), with the main cache at positions
0 .. P-1 and the next token x_P chosen (not yet in the cache):
  * lanes [1, k+1, R, C]: the main lanes h_{P-k-1} .. h_{P-1}; ids [1, k+1]: the tokens x_{P-k} .. x_P;
  * x_logits [1, V]: the logits x_P was chosen from;
  * the MTP cache holds the pairs (h_t, x_{t+1}) for every t < P-k-1 (its positions may trail: see
    SpeculativeDecoder.begin).
`greedy_draft_verify` then, all on device data:
  1. catch-up and drafts: the MTP cache is checkpointed over 2k positions; the MTP block runs over the k + 1 pairs
     (h_{P-k-1}, x_{P-k}) .. (h_{P-1}, x_P), and d1 is the argmax of its logits at the last pair; each further
     draft d_{j+1} (j < k) is the argmax after one more MTP forward of the block's own last output lane with d_j.
     As in the batched step's drafting, a row drafts at most min(k, budget - 1) tokens (none when it does not go
     on after x_P) and stops after a drafted stop token; the drafts after its last are 0 and not counted. (The
     forwards are fed the drafts as made: one after the last counted feeds only drafts not counted either and MTP
     pairs the rollback drops. Their positions, RoPE angles and window indices are made once for all of them:
     `Attention.plan_cached`.);
  2. the verify on the main cache over [x_P, d1 .. dk], as `fused_verify.greedy_verify` runs it (its start planned
     from the checkpoint, the kept count from one bound made with the drafts' count): checkpoint, forward,
     acceptance a, kept count keep, rollback;
  3. the MTP cache keeps `keep` of its 2k appended pairs, all catch-up pairs (keep <= 1 + a <= k + 1): for a row
     that goes on (keep = 1 + a) it again holds the pairs t < P' - k - 1 at the new length P' = P + 1 + a; the
     catch-up pairs past it and the further drafts' approximate pairs are rolled back (the former to be made
     again, at the same positions, by the next step);
  4. the state moves on by 1 + a: lanes from [h_{P-k-1} .. h_{P-1}, h_P .. h_{P+k}], ids from
     [x_{P-k} .. x_P, t_0 .. t_k] (t_j the argmax of target row j: d_{j+1} for j < a, then y = t_a), the next
     logits from [x_logits, target rows]: one gather each, by the same shift (0 for a dead row: its state stays).
     The packed finite flag covers x_P's logits and the emitted target rows (each row is checked when emitted).
Its shapes never depend on a, and it reads no host value. The host stages budget (0 when the row is not live),
a moves flag and stop tokens in one pinned tensor (`RowState.stage`: one copy up) and gets the packed results in one
transfer. The step itself then writes the next step's budget and flag there (`_carry`), so further steps can be
launched before its results are read (SpeculativeDecoder.greedy_row_stream): a step launched after the row finished
is dead (flag 0) and changes nothing (both caches keep 0 tokens, the state stays). The MTP checkpoint spans 2k
positions, so the step needs 2k <= the window (`fits`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..cache import KVCache
from ..errors import InvalidArgument
from ..model.attention import plan_window


def fits(n_draft: int, window: int) -> bool:
    """Whether a step of n_draft drafts fits `greedy_draft_verify`: its MTP checkpoint spans 2 * n_draft
    positions, at most the window ring's."""
    return 1 <= n_draft and 2 * n_draft <= window


class RowState:
    """The device buffers of one row's state (module doc) for n_draft drafts and of its staged host inputs: host
    [1, 2 + n_stops] long, the row's budget while it is live (it goes on after x_P: at least 2; at most 1 when it
    is not: it emits x_P alone and finishes), whether the step emits x_P at all (1; 0: dead, the row finished
    before this step) and its stop tokens (-1 pads). Each step writes the next step's budget and flag."""

    def __init__(self, model, n_stops: int, device: torch.device, n_draft: int = 1):
        cfg = model.config
        self.n_draft = n_draft
        width = n_draft + 1
        self.lanes = torch.zeros(1, width, cfg.hc_mult, cfg.dim, dtype=model.dtype, device=device)
        self.ids = torch.zeros(1, width, dtype=torch.long, device=device)
        self.x_logits = torch.zeros(1, cfg.vocab_size, device=device)
        self.host = torch.zeros(1, 2 + n_stops, dtype=torch.long, device=device)
        pin = self.host.is_cuda
        self._staging = torch.zeros(self.host.shape, dtype=torch.long, pin_memory=pin)
        self._staged = self._staging.numpy()   # (writes to it run no torch op)
        # the step's constants, made outside any capture: 0 .. k, and the MTP forwards' index offsets
        self.steps = torch.arange(width, device=device)
        self.plan_memo: dict = {}

    @property
    def width(self) -> int:
        """The lanes (and tokens) the state holds: n_draft + 1."""
        return self.n_draft + 1

    @property
    def n_stops(self) -> int:
        return self.host.shape[1] - 2

    @property
    def x_finite(self) -> torch.Tensor:
        """[1] whether x_logits are all finite (the step checks them with the rows it emits)."""
        return torch.isfinite(self.x_logits).all(-1)

    def load(self, lanes: torch.Tensor, ids: torch.Tensor, x_logits: torch.Tensor) -> None:
        """Start from a row's state: lanes [1, k+1, R, C] (h_{P-k-1} .. h_{P-1}), ids [1, k+1] (x_{P-k} .. x_P),
        the logits [V] x_P was chosen from."""
        self.lanes.copy_(lanes)
        self.ids.copy_(ids)
        self.x_logits.copy_(x_logits.view(1, -1))

    def stage(self, budget: int, live: bool, stops: tuple[int, ...]) -> None:
        """The step's host inputs into `host`, from pinned memory without a wait. The staging buffer is reused:
        the previous step's copy has run, as every step waits for its results."""
        if len(stops) > self.n_stops:
            raise InvalidArgument(f"{len(stops)} stop tokens for a row state of {self.n_stops}")
        row = self._staged[0]
        row[0], row[1] = budget if live else 0, 1
        row[2:] = -1
        row[2:2 + len(stops)] = stops
        self.host.copy_(self._staging, non_blocking=True)


@dataclass
class RowOut:
    packed: torch.Tensor     # [1, PACKED + k] long: a, y, draft count, finite, keep, d1 .. dk (fused_verify's)
    logits: torch.Tensor     # [1, k+1, V] the logits of x_P and of d1 .. dk (the emitted tokens' first 1 + a rows)


def mtp_forward(model, mtp: KVCache, lanes: torch.Tensor, ids: torch.Tensor, pos0: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first MTP block over lanes [B, n, R, C] paired with the next tokens ids [B, n], appended to `mtp`: its
    output lanes and the logits [B, vocab] at the last position. `pos0` [B]: the forward's start positions as
    `Attention.plan_cached` makes them for several forwards of one step inside a checkpoint of `mtp`; the device
    positions then stay (the rollback sets them)."""
    block = model.mtp[0]
    planned = pos0 is not None
    pos0 = mtp.begin(ids.shape, pos0)
    out = block(lanes, model.embed(ids), ids, pos0, mtp.layer(0))
    mtp.end(ids.shape[1], device=not planned)
    return out, ops.linear_fp32(block.collapse(out[:, -1:]), model.head.weight)[:, -1]


def greedy_draft_verify(model, main: KVCache, mtp: KVCache, state: RowState) -> RowOut:
    """One speculative step of the single row of `main` and `mtp` (module doc): the same tokens and main cache as
    plain greedy decoding. Updates `state` and both caches' device positions; the host mirrors are the caller's
    (KVCache.end_rollback of the starts + k + 1 (main) and + 2k (MTP) by the packed keep)."""
    if main.batch_size != 1 or mtp.batch_size != 1:
        raise InvalidArgument("greedy_draft_verify steps one row")
    k = state.n_draft
    lanes, ids, host = state.lanes, state.ids, state.host
    moves, stop_t = host[:, 1], host[:, 2:]                           # (moves: 0 for a dead step)
    left = host[:, 0] - 1                                             # [1] the budget after x_P (< 1: not live)
    # 1. catch-up and drafts (fed the drafts as made)
    mtp_ckpt = mtp.checkpoint(2 * k, planned=True)
    spans = [(0, k + 1)] + [(k + j, 1) for j in range(1, k)]         # (the catch-up, then one token each)
    starts = model.mtp[0].attn.plan_cached(mtp.layer(0), mtp_ckpt.parts.positions, mtp_ckpt.parts.slots, spans,
                                           model.dtype, state.plan_memo)
    out, draft_logits = mtp_forward(model, mtp, lanes, ids, starts[0])
    made = [ids[:, -1], draft_logits.argmax(-1)]
    for j in range(1, k):
        out, draft_logits = mtp_forward(model, mtp, out[:, -1:], made[-1][:, None], starts[j])
        made.append(draft_logits.argmax(-1))
    made_t = torch.stack(made, 1)                                     # [1, k+1]: x_P, the drafts as made
    # the drafts counted: up to a drafted stop token and min(k, budget - 1), none when the row is not live;
    # `cap`: the accepted count at which the row stops (an accepted stop, or its budget; < 1 when it is not live),
    # the least of `left` and the first stop's index among x_P, d1 .. dk (a live row's x_P is none)
    no_stop = (made_t[:, :, None] != stop_t[:, None]).all(-1)        # [1, k+1]
    cap = torch.where(no_stop, left[:, None], state.steps).amin(-1)
    n_drafts = cap.clamp(0, k)
    counted = state.steps <= n_drafts[:, None]                        # [1, k+1]: x_P and the counted drafts
    verify_ids = made_t * counted                                     # (the drafts after the count: 0)
    drafts = verify_ids[:, 1:]
    # 2. verify, acceptance, kept count, rollback of both caches
    ckpt = main.checkpoint(k + 1, planned=True)
    (start,) = plan_window(main.layer(0), ckpt.parts.positions, ckpt.parts.slots, [(0, k + 1)], model.dtype,
                           state.plan_memo)
    h = model.hidden(verify_ids, cache=main, pos0=start)
    target = model.logits(h)                                          # [1, k+1, V]
    best = target.argmax(-1)                                          # [1, k+1]
    a = torch.where(drafts == best[:, :k], n_drafts[:, None], state.steps[:k]).amin(-1)   # (the first miss, or n)
    on = a < cap                                                      # it goes on after x_P and a drafts
    keep = a + on
    main.rollback_on_device(ckpt, keep)
    mtp.rollback_on_device(mtp_ckpt, keep)
    y = best.gather(1, a[:, None])[:, 0]
    logits = torch.cat((state.x_logits[:, None], target), 1)         # [1, k+2, V]: x_P's, then the target rows
    finite = _finite_rows(logits).cumprod(-1).gather(1, a[:, None])   # [1, 1]: rows 0 .. a (x_P, d1 .. da)
    packed = torch.cat((a[:, None], y[:, None], n_drafts[:, None], finite, keep[:, None], drafts), 1)
    # 4. the state moves on by 1 + a (0: a dead row's state stays; a row that is not live has a = 0)
    shift = (a + moves)[:, None] + state.steps                        # [1, k+1]
    R, C = lanes.shape[2:]
    torch.gather(torch.cat((lanes, h), 1), 1, shift[:, :, None, None].expand(-1, -1, R, C), out=lanes)
    torch.gather(torch.cat((ids, best), 1), 1, shift, out=ids)        # (best[:a] are d1 .. da, then y)
    torch.index_select(logits, 1, shift[:, 0], out=state.x_logits[:, None])
    _carry(state, on, left - a, y, stop_t)
    return RowOut(packed, logits[:, :k + 1])


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., n] whether each row of x [..., n, V] is all finite: x - x is 0 for a finite x and NaN for an infinite
    or NaN one (three ops; torch.isfinite and all are five)."""
    return (x - x == 0).all(-1)


def _carry(state: RowState, on: torch.Tensor, left: torch.Tensor, y: torch.Tensor, stop_t: torch.Tensor) -> None:
    """The next step's budget and flag into `state.host`, from this step's outcome (device data): a row that goes
    on (`on`: live, and not finished with this step's 1 + a tokens; `left` its budget after them) emits y next,
    live with budget `left` while y is no stop token (and more than one token is left: else `left` is 1, not
    live either), else not live (budget 0); any other row is dead (flag 0, budget 0). So steps launched before
    this one's results are read need nothing staged."""
    torch.stack((left * (on & (y[:, None] != stop_t).all(-1)), on), 1, out=state.host[:, :2])
