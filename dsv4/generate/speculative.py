"""MTP speculative decoding (docs/architecture.md#mtp): the MTP block drafts tokens, one main forward verifies them,
and the cache keeps exactly the accepted ones.

Per row and step, with the main cache holding positions 0 .. P-1 and the next token x_P already chosen:
  1. draft: the MTP block pairs the main lanes h_t with the embedding of token t+1 and predicts token t+2. Its
     own cache (KVCache(mtp=True)) holds those pairs for every t < P-1; the step appends the pairs still missing
     (the tokens accepted last step, then (h_{P-1}, x_P)) in one MTP forward, whose last output gives d1. Further
     drafts apply the same block again to its own output lanes (its stand-in for h_P, h_P+1, ...), one MTP step
     per draft; those approximate pairs are rolled back afterwards. Only the first MTP block drafts: every preset
     and the official checkpoints have one (n_mtp_layers = 1); `n_draft` sets how many tokens it drafts.
  2. verify: one main forward over [x_P, d1 .. dk] gives the target distributions p_0 .. p_k.
  3. accept (`accept_drafts`): greedy, the longest prefix where d_i = argmax p_{i-1}; sampling, the standard
     rejection rule (accept d_i with probability min(1, p(d_i) / q(d_i)), q the MTP distribution it was drawn
     from; on a rejection draw from norm(max(0, p - q)); when all are accepted draw a bonus token from p_k), so
     the tokens are distributed exactly as plain sampling's. Drafting stops at a drafted stop token, and the
     tokens emitted never pass a stop token or the row's token budget.
  4. roll back: the main cache keeps x_P and the accepted drafts (KVCache.checkpoint / rollback restore the window
     ring, compressed entries, indexer keys and compressor states the rejected ones wrote); the MTP cache drops
     the approximate pairs. The next token (correction or bonus) is carried to the next step.

Rows are stepped one at a time (B = 1 forwards on views of the shared caches); each row's output equals what it
would be alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .. import ops
from ..cache import KVCache
from ..errors import InvalidArgument
from .sampling import SamplingConfig, probabilities, sample

PREFILL_CHUNK = 4096


@dataclass
class StepResult:
    """One row's speculative step: the tokens it emitted (in order), the target logits each was chosen from
    ([len(tokens), vocab], raw fp32, for logprobs), the drafts made and how many were accepted, and whether the
    row finished (a stop token or its budget) with the last of them."""
    tokens: list[int]
    logits: torch.Tensor
    drafted: int
    accepted: int
    finished: bool


@dataclass
class _Row:
    logits: torch.Tensor                 # [vocab] the main logits the next token is (to be) chosen from
    next_token: int | None               # the chosen next token (not yet emitted nor in the caches)
    pending_h: torch.Tensor              # [1, n, R, C] main lanes of the positions not yet paired in the MTP cache
    pending_ids: list[int] = field(default_factory=list)   # the tokens after them, but the last one's (n - 1)


class SpeculativeDecoder:
    """Speculative decoding of the rows of `cache` with the model's first MTP block as the drafter.

        dec = SpeculativeDecoder(model, cache)           # the MTP cache is built to match
        first_logits = dec.prefill(row, prompt_ids)       # prompt through both caches
        result = dec.step_row(row, cfg, generator, stop_ids, budget)   # each decode step, per decoding row

    A step emits 1 + accepted tokens; `stats` counts drafted and accepted tokens. Each row may have its own
    SamplingConfig, generator, stops and budget. The MTP cache only shapes the drafts, never the output: the
    verify forward and the acceptance rule decide every token."""

    def __init__(self, model, cache: KVCache, mtp_cache: KVCache | None = None, n_draft: int = 1):
        cfg = model.config
        if cfg.n_mtp_layers < 1:
            raise InvalidArgument("speculative decoding needs a model with an MTP block (config n_mtp_layers >= 1)")
        if isinstance(n_draft, bool) or not isinstance(n_draft, int) or not 1 <= n_draft < cfg.window_size:
            raise InvalidArgument(f"n_draft={n_draft!r}: must be an integer in 1..{cfg.window_size - 1} "
                                  "(the verify step must fit in the window ring)")
        self.model, self.cache, self.n_draft = model, cache, n_draft
        self.mtp_cache = mtp_cache if mtp_cache is not None else KVCache(
            cfg, cache.batch_size, cache.max_seq_len, cache.kv_dtype, cache.index_dtype, cache.dtype,
            cache.positions.device, mtp=True)
        if self.mtp_cache.batch_size != cache.batch_size or not self.mtp_cache.mtp:
            raise InvalidArgument("mtp_cache must be a KVCache(mtp=True) with as many rows as the cache")
        self.rows: dict[int, _Row] = {}
        self.stats = {"drafted": 0, "accepted": 0, "steps": 0}

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    # ------------------------------------------------------------------ prompt
    @torch.no_grad()
    def prefill(self, row: int, tokens: Sequence[int], chunk: int = PREFILL_CHUNK) -> torch.Tensor:
        """Start row `row` on a prompt (both caches reset): returns the main logits [vocab] after its last token.
        The MTP cache takes the prompt's pairs (h_t, token t+1) chunk by chunk."""
        if not tokens:
            raise InvalidArgument("prefill needs a non-empty prompt")
        main, mtp = self.cache.select(row).reset(), self.mtp_cache.select(row).reset()
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        pending = None
        for a in range(0, len(tokens), chunk):
            h = self.model.hidden(ids[:, a:a + chunk], cache=main)
            pending = h if pending is None else torch.cat((pending, h), 1)
            if pending.shape[1] > 1:   # pairs whose next token is known: every pending position but the last
                n = pending.shape[1] - 1
                start = a + h.shape[1] - pending.shape[1]
                self._mtp(mtp, pending[:, :n], ids[0, start + 1:start + 1 + n].tolist())
                pending = pending[:, n:]
        logits = self.model.logits(pending)[0, -1]
        self.rows[row] = _Row(logits=logits, next_token=None, pending_h=pending)
        return logits

    def release(self, row: int) -> None:
        """Forget a row's state (its cache rows are the caller's to reuse)."""
        self.rows.pop(row, None)

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def step(self, rows: Sequence[int], cfg: SamplingConfig, generator: torch.Generator | None = None,
             stop_ids: Sequence[int] = (), budgets: Sequence[int] | None = None) -> list[StepResult]:
        """`step_row` for each row in `rows` with the same settings; budgets[i] caps row i's tokens."""
        budgets = [self.cache.max_seq_len] * len(rows) if budgets is None else budgets
        return [self.step_row(r, cfg, generator, stop_ids, b) for r, b in zip(rows, budgets)]

    @torch.no_grad()
    def step_row(self, row: int, cfg: SamplingConfig, gen: torch.Generator | None = None,
                 stop_ids: Sequence[int] = (), budget: int | None = None) -> StepResult:
        """One speculative step of `row` (after `prefill`): at most `budget` (>= 1) tokens, ending at the first
        stop token. A finished row's last token is not fed to the cache (as in plain decoding)."""
        if row not in self.rows:
            raise InvalidArgument(f"row {row} has no prompt: call prefill(row, tokens) before step_row")
        st = self.rows[row]
        stops = set(int(t) for t in stop_ids)
        budget = self.cache.max_seq_len if budget is None else budget
        if budget < 1:
            raise InvalidArgument(f"budget={budget}: a step emits at least one token")
        main, mtp = self.cache.select(row), self.mtp_cache.select(row)
        if st.next_token is None:
            st.next_token = int(sample(st.logits.unsqueeze(0), cfg, gen)[0])
        x, x_logits = st.next_token, st.logits.unsqueeze(0)
        if x in stops or budget <= 1:
            return StepResult([x], x_logits, 0, 0, True)
        room = main.max_seq_len - main.lengths()[0] - 1            # the verify appends k + 1 tokens
        k = max(0, min(self.n_draft, budget - 1, room))
        drafts, draft_logits = self._draft(mtp, st, x, k, cfg, gen, stops)
        ckpt = main.checkpoint(len(drafts) + 1)
        ids = torch.tensor([[x] + drafts], dtype=torch.long, device=self.device)
        h = self.model.hidden(ids, cache=main)
        target = self.model.logits(h)[0]                           # [k + 1, vocab]
        a, y = accept_drafts(target, draft_logits, drafts, cfg, gen)
        finished = (a > 0 and drafts[a - 1] in stops) or 1 + a >= budget
        main.rollback(ckpt, a if finished else a + 1)              # a finished row's last token is not fed
        self.stats["drafted"] += len(drafts)
        self.stats["accepted"] += a
        self.stats["steps"] += 1
        st.next_token, st.logits, st.pending_h, st.pending_ids = y, target[a], h[:, :a + 1], drafts[:a]
        return StepResult([x] + drafts[:a], torch.cat((x_logits, target[:a])), len(drafts), a, finished)

    def _draft(self, mtp: KVCache, st: _Row, x: int, k: int, cfg: SamplingConfig, gen,
               stops: set[int]) -> tuple[list[int], torch.Tensor | None]:
        """Up to k drafts (fewer after a drafted stop token) and the MTP logits they were drawn from [n, vocab].
        The MTP cache ends holding the exact pairs up to (h_{P-1}, x_P)."""
        if k == 0:
            return [], None
        lanes, logits = self._mtp(mtp, st.pending_h, st.pending_ids + [x])
        ckpt = mtp.checkpoint(k - 1) if k > 1 else None
        drafts, all_logits = [], []
        while True:
            drafts.append(int(sample(logits.unsqueeze(0), cfg, gen)[0]))
            all_logits.append(logits)
            if len(drafts) == k or drafts[-1] in stops:
                break
            lanes, logits = self._mtp(mtp, lanes[:, -1:], drafts[-1:])
        if ckpt is not None:
            mtp.rollback(ckpt, 0)
        return drafts, torch.stack(all_logits)

    def _mtp(self, mtp: KVCache, lanes: torch.Tensor, next_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP block over lanes [1, n, R, C] paired with next_ids (n), appended to its cache: its output
        lanes and the logits [vocab] at the last position."""
        block = self.model.mtp[0]
        ids = torch.tensor([next_ids], dtype=torch.long, device=self.device)
        pos0 = mtp.begin(ids.shape)
        out = block(lanes, self.model.embed(ids), ids, pos0, mtp.layer(0))
        mtp.end(ids.shape[1])
        return out, ops.linear_fp32(block.collapse(out[:, -1:]), self.model.head.weight)[0, -1]


def accept_drafts(target_logits: torch.Tensor, draft_logits: torch.Tensor | None, drafts: Sequence[int],
                  cfg: SamplingConfig, gen: torch.Generator | None = None) -> tuple[int, int]:
    """(accepted count a, next token) for drafts d_1..d_k given the target logits [k+1, vocab] at the positions
    [x, d_1 .. d_k] and the draft logits [k, vocab] each d_i was drawn from (under the same SamplingConfig).
    The next token is target p_a's (greedy: argmax; sampling: the residual norm(max(0, p_a - q_a)) after a
    rejection, p_k itself after none), so a + 1 tokens follow the target distribution exactly."""
    k = len(drafts)
    if cfg.temperature == 0:
        best = target_logits.argmax(-1).tolist()
        a = 0
        while a < k and drafts[a] == best[a]:
            a += 1
        return a, best[a]
    p = _normalised(probabilities(target_logits, cfg))
    if k:
        q = _normalised(probabilities(draft_logits, cfg))
        d = torch.tensor(drafts, device=p.device)
        p_d = p[:-1].gather(1, d[:, None])[:, 0]
        q_d = q.gather(1, d[:, None])[:, 0]
        u = torch.rand(k, generator=gen, device=p.device)
        rejected = (u * q_d >= p_d).tolist()                         # accept with probability min(1, p/q)
        for i, rej in enumerate(rejected):
            if rej:
                residual = (p[i] - q[i]).clamp(min=0)
                if float(residual.sum()) <= 0:                       # p == q up to rounding: nothing to correct
                    residual = p[i]
                return i, int(torch.multinomial(residual, 1, generator=gen))
    return k, int(torch.multinomial(p[k], 1, generator=gen))


def _normalised(probs: torch.Tensor) -> torch.Tensor:
    return probs / probs.sum(-1, keepdim=True)
