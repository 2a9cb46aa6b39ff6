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
        self.cache.select(row).reset()
        self.begin(row)
        for a in range(0, len(tokens), chunk):
            logits = self.extend(row, tokens[a:a + chunk])
        return logits

    def begin(self, row: int) -> None:
        """Start row `row` on a new prompt whose main cache row is already placed (reset, or loaded with a cached
        prefix): the MTP cache row is reset and the row's state forgotten. With a loaded prefix the MTP cache
        lacks that prefix's pairs and its positions trail the main cache's; the MTP block is window-only, so this
        costs acceptance over its first window of tokens, never correctness."""
        self.mtp_cache.select(row).reset()
        self.rows.pop(row, None)

    @torch.no_grad()
    def extend(self, row: int, tokens: Sequence[int]) -> torch.Tensor:
        """Append prompt tokens to row `row` (after `begin`, or `prefill` of an earlier part): the main cache
        takes them, the MTP cache the pairs whose next token is now known. Returns the main logits [vocab] after
        the last one, from which the row's next token is chosen at its first step."""
        if not tokens:
            raise InvalidArgument("extend needs at least one token")
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        h = self.model.hidden(ids, cache=self.cache.select(row))
        st = self.rows.get(row)
        pending = h if st is None else torch.cat((st.pending_h, h), 1)
        next_ids = ids[0] if st is not None else ids[0, 1:]          # token t+1 for each pending position but the last
        n = pending.shape[1] - 1
        if n:
            self._mtp(self.mtp_cache.select(row), pending[:, :n], [next_ids.tolist()])
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
        """`step_row` for each row in `rows` (any rows, one at a time) with the same settings."""
        budgets = [None] * len(rows) if budgets is None else budgets
        return [self.step_row(r, cfg, generator, stop_ids, b) for r, b in zip(rows, budgets)]

    def step_row(self, row: int, cfg: SamplingConfig, gen: torch.Generator | None = None,
                 stop_ids: Sequence[int] = (), budget: int | None = None) -> StepResult:
        """One speculative step of `row` (after `prefill`): at most `budget` (>= 1) tokens, ending at the first
        stop token. A finished row's last token is not fed to the cache (as in plain decoding)."""
        return self.step_rows(slice(row, row + 1), [cfg], [gen], [stop_ids], [budget])[0]

    @torch.no_grad()
    def step_rows(self, rows: slice, cfgs: Sequence[SamplingConfig], gens: Sequence[torch.Generator | None],
                  stop_ids: Sequence[Sequence[int]], budgets: Sequence[int | None]) -> list[StepResult]:
        """One speculative step of every row of the contiguous `rows`, each with its own settings, batched: the
        MTP catch-up per row (its length is what the row accepted last step), then the further drafts and the
        verify as [rows, ...] forwards. Every row drafts the same count k (padding after a row's own limit: its
        budget or a drafted stop). A row with budget 0 is skipped: it rides along in the forwards and is rolled
        back whole (its caches and state untouched, no token), so idle rows may sit inside the slice; every row
        needs room for the n_draft + 1 tokens of the verify."""
        idx = range(self.cache.batch_size)[rows]
        budgets = [self.cache.max_seq_len if b is None else b for b in budgets]
        if len(budgets) != len(idx) or any(b < 0 for b in budgets):
            raise InvalidArgument(f"budgets={budgets}: needs one count >= 0 per row of {rows} (0 skips the row)")
        for r, b in zip(idx, budgets):
            if b and r not in self.rows:
                raise InvalidArgument(f"row {r} has no prompt: call prefill(row, tokens) before stepping it")
        main, mtp = self.cache.select(rows), self.mtp_cache.select(rows)
        states = [self.rows[r] if b else _SKIPPED for r, b in zip(idx, budgets)]
        stops = [set(int(t) for t in s) for s in stop_ids]
        for st, cfg, gen in zip(states, cfgs, gens):
            if st.next_token is None:
                st.next_token = int(sample(st.logits.unsqueeze(0), cfg, gen)[0])
        xs = [st.next_token for st in states]
        live = [x not in st_ and b > 1 for x, st_, b in zip(xs, stops, budgets)]   # rows that go on after x
        k = max(0, min(self.n_draft, self.cache.max_seq_len - max(main.lengths()) - 1))
        limits = [min(k, b - 1) if ok else 0 for ok, b in zip(live, budgets)]
        drafts, draft_logits = self._draft(mtp, states, xs, k, limits, cfgs, gens, stops)
        ckpt = main.checkpoint(k + 1)
        ids = torch.tensor([[x] + d + [0] * (k - len(d)) for x, d in zip(xs, drafts)], device=self.device)
        h = self.model.hidden(ids, cache=main)
        target = self.model.logits(h)                              # [B, k + 1, vocab]
        results, keep = [], []
        for i, st in enumerate(states):
            x_logits = st.logits.unsqueeze(0)
            if not budgets[i]:
                results.append(StepResult([], x_logits[:0], 0, 0, False))
                keep.append(0)
                continue
            if not live[i]:
                results.append(StepResult([xs[i]], x_logits, 0, 0, True))
                keep.append(0)
                continue
            d = drafts[i]
            a, y = accept_drafts(target[i, :len(d) + 1], draft_logits[i, :len(d)], d, cfgs[i], gens[i])
            finished = (a > 0 and d[a - 1] in stops[i]) or 1 + a >= budgets[i]
            keep.append(a if finished else a + 1)                  # a finished row's last token is not fed
            self.stats["drafted"] += len(d)
            self.stats["accepted"] += a
            self.stats["steps"] += 1
            st.next_token, st.logits, st.pending_h, st.pending_ids = y, target[i, a], h[i:i + 1, :a + 1], d[:a]
            results.append(StepResult([xs[i]] + d[:a], torch.cat((x_logits, target[i, :a])), len(d), a, finished))
        main.rollback(ckpt, keep)
        return results

    def _draft(self, mtp: KVCache, states: list[_Row], xs: list[int], k: int, limits: list[int],
               cfgs: Sequence[SamplingConfig], gens, stops: list[set[int]]) -> tuple[list[list[int]], torch.Tensor]:
        """Per row up to limits[b] drafts (fewer after a drafted stop token) and the MTP logits [B, k, vocab]
        they were drawn from. The MTP cache ends holding each drafting row's exact pairs up to (h_{P-1}, x_P)."""
        B, V = len(states), self.model.config.vocab_size
        drafts: list[list[int]] = [[] for _ in states]
        lane_shape = (self.model.config.hc_mult, self.model.config.dim)
        logits = torch.zeros(B, max(k, 1), V, device=self.device)
        if k == 0:
            return drafts, logits
        lanes = torch.zeros(B, 1, *lane_shape, dtype=self.model.dtype, device=self.device)
        for i, (st, x) in enumerate(zip(states, xs)):              # catch-up: lengths differ per row
            if limits[i]:
                out, logits[i, 0] = self._mtp(mtp.select(i), st.pending_h, [st.pending_ids + [x]])
                lanes[i] = out[0, -1:]
        ckpt = mtp.checkpoint(k - 1) if k > 1 else None
        for j in range(k):
            for i in range(B):
                if len(drafts[i]) == j < limits[i] and (j == 0 or drafts[i][-1] not in stops[i]):
                    drafts[i].append(int(sample(logits[i, j:j + 1], cfgs[i], gens[i])[0]))
            if j == k - 1:
                break
            feed = [[d[j] if len(d) > j else 0] for d in drafts]
            lanes, logits[:, j + 1] = self._mtp(mtp, lanes, feed)
        if ckpt is not None:
            mtp.rollback(ckpt, 0)
        return drafts, logits

    def _mtp(self, mtp: KVCache, lanes: torch.Tensor, next_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP block over lanes [B, n, R, C] paired with next_ids [B][n], appended to its cache: its output
        lanes and the logits [B, vocab] at the last position."""
        block = self.model.mtp[0]
        ids = torch.tensor(next_ids, dtype=torch.long, device=self.device)
        pos0 = mtp.begin(ids.shape)
        out = block(lanes, self.model.embed(ids), ids, pos0, mtp.layer(0))
        mtp.end(ids.shape[1])
        return out, ops.linear_fp32(block.collapse(out[:, -1:]), self.model.head.weight)[:, -1]


_SKIPPED = _Row(logits=torch.zeros(1), next_token=0, pending_h=torch.zeros(0))   # a budget-0 row's stand-in


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
