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

A step keeps its per-row values on the device (drafts and their counts, the acceptance `accept_batch`, the next
tokens, the counts the caches keep) and brings them to the host in one transfer at its end; the rollback runs on
that device data before it (KVCache.rollback_on_device), and the few host inputs go up without a wait. So nothing
in a step waits for the device until the transfer, and with CUDA graphs (serve.engine) the MTP forwards, the
verify with its checkpoint and the rollback each replay a captured graph.

A single greedy row (a lone greedy stream: the serving engine's bucket of one) with n_draft k runs its whole step
as `greedy_row.greedy_draft_verify`: a fixed-width MTP catch-up of the last k + 1 positions, the k drafts, the
verify, the acceptance and the rollback of both caches, with the row's state (last k + 1 main lanes and tokens, the
next token's logits and their finiteness) carried in device buffers from step to step, so with CUDA graphs a step
is one replay between one staged input copy and one result transfer. A row enters that form from any state that
gives it the last k + 1 main lanes: its m pending lanes (the MTP cache lacks their pairs) and, when m < k + 1, the
k + 1 - m lanes before them from `_Row.prev` (the MTP cache's last pairs, which the entry rewinds, on a window-only
MTP cache, to be made again by the step). A row whose state gives fewer (a prompt resumed from a prefix cache, or a
rewind the cache cannot do) takes the batched path until it does. It leaves the fused form, copying its state back
(k + 1 lanes pending), when a step takes the batched path (more rows, sampling, no room for k drafts).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..cache import CacheCheckpoint, KVCache
from ..errors import InvalidArgument
from .fused_verify import PACKED, greedy_accept, greedy_verify, host_checkpoint, kept_counts
from .graphs import CacheGroup, GraphStep
from .greedy_row import RowState, fits, greedy_draft_verify, mtp_forward
from .host import HostCopy, to_device, to_host
from .sampling import SamplingConfig, probabilities, sample

PREFILL_CHUNK = 4096
GREEDY = SamplingConfig(temperature=0.0)


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
    finite: bool = True     # every logit of `logits` is finite (else the model broke down for this row)
    # (with CUDA graphs, a single greedy row's `logits` are a static buffer its next step overwrites: read them first)


@dataclass
class _Pairs:
    """Pairs (main lanes, next tokens) the MTP cache holds last, as chunks, oldest first: lanes [1, m, R, C] and
    tokens [m'] (the same total in both). Kept unjoined: a batched step only relists them, and they are joined
    (one cat each) only when a row enters the fused form."""
    lanes: list[torch.Tensor]
    ids: list[torch.Tensor]

    @property
    def count(self) -> int:
        return sum(x.shape[1] for x in self.lanes)

    def then(self, lanes: torch.Tensor, ids: list[torch.Tensor], n: int) -> "_Pairs":
        """These pairs followed by lanes and the tokens `ids` (chunks), less the leading chunks the last n
        pairs do not reach."""
        return _Pairs(_tail(self.lanes + [lanes], n, 1), _tail(self.ids + ids, n, 0))

    def last(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last n pairs: lanes [1, n, R, C], tokens [n]."""
        return torch.cat(self.lanes, 1)[:, -n:], torch.cat(self.ids)[-n:]


def _tail(chunks: list[torch.Tensor], n: int, dim: int) -> list[torch.Tensor]:
    """The chunks from the last one whose start lies within the last n elements along `dim` (all, when fewer)."""
    total, i = 0, len(chunks)
    while i and total < n:
        i -= 1
        total += chunks[i].shape[dim]
    return chunks[i:]


@dataclass
class _Row:
    logits: torch.Tensor                 # [vocab] the main logits the next token is (to be) chosen from
    next_token: int | None               # the chosen next token (not yet emitted nor in the caches)
    pending_h: torch.Tensor              # [1, n, R, C] main lanes of the positions not yet paired in the MTP cache
    pending_ids: torch.Tensor            # [n - 1] the tokens after them, but the last one's (on the device)
    next_id: torch.Tensor | None = None  # [1] next_token on the device
    # the MTP cache's last pairs, just before the pending lanes' positions (what a single greedy row's step needs,
    # up to n_draft of them, to start from fewer than n_draft + 1 pending lanes); None when not known
    prev: _Pairs | None = None
    fused: RowState | None = None        # the row's state lives there (the fields above but next_token are stale)


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
        self.fixed_shapes = False   # eager verify forwards read every stored row, as a captured verify does
        self.graph_drafts = False   # with a verifier (graphs), the MTP forwards replay CUDA graphs too
        self._mtp_graphs: dict[tuple, GraphStep] = {}
        # all-greedy steps run `greedy_verify` (with a verifier: one captured graph per rows, width and stop count)
        self.fuse_greedy = True
        self._fused_graphs: dict[tuple, GraphStep] = {}
        # and a single greedy row runs its whole step as `greedy_draft_verify` (with a verifier and
        # graph_drafts: one captured graph per row and stop count), its state kept on the device between steps
        self.fuse_row = True
        self._row_steps: dict[tuple, tuple] = {}   # (row, stops, graphs, fixed) -> _row_state
        self._mtp_windowed = all(not layer.ratio for layer in self.mtp_cache.layers)   # (KVCache.rewind)
        self._idle_logits = torch.zeros(cfg.vocab_size, device=self.device)   # (a skipped row's stand-in)
        self._fixed_views: dict[tuple[int, int], tuple[KVCache, KVCache]] = {}
        self._stop_tables: dict[tuple, torch.Tensor] = {}
        self._zero = torch.zeros(1, dtype=torch.long, device=self.device)
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
        st = self.rows.get(row)
        if st is not None and st.fused is not None:
            self._unfuse(st)
        h = self.model.hidden(ids, cache=self.cache.select(row))
        pending = h if st is None else torch.cat((st.pending_h, h), 1)
        # token t+1 for each pending position but the last
        next_ids = torch.cat((st.pending_ids, ids[0])) if st is not None else ids[0, 1:]
        n = pending.shape[1] - 1
        prev = None
        if n:
            self._mtp(self.mtp_cache.select(row), pending[:, :n], next_ids[None])
            j = min(n, self.n_draft)   # (the pairs just made, after those the row's MTP cache held last)
            before = st.prev if st is not None and st.prev is not None else _Pairs([], [])
            prev = before.then(pending[:, n - j:n], [next_ids[n - j:n]], self.n_draft)
            pending = pending[:, n:]
        logits = self.model.logits(pending)[0, -1]
        self.rows[row] = _Row(logits=logits, next_token=None, pending_h=pending, pending_ids=ids[0, :0], prev=prev)
        return logits

    def tail(self, row: int) -> dict[str, torch.Tensor]:
        """What row `row` holds besides its caches right after an `extend`: the main logits of its next token and
        its last position's main lanes (the pair the MTP cache still lacks). A prefix cache keeps them with the
        row's state so that `resume` can start the same prompt without a forward."""
        st = self.rows[row]
        if st.fused is not None:
            self._unfuse(st)
        return {"logits": st.logits, "hidden": st.pending_h[:, -1:]}

    def resume(self, row: int, tail: dict[str, torch.Tensor]) -> None:
        """Start row `row` (after `begin`, its main cache row loaded with a whole prompt) from the `tail` an
        `extend` of that prompt left: as if that extend had just run, except that the MTP cache lacks the prompt's
        pairs (see `begin`)."""
        h = tail["hidden"]
        self.rows[row] = _Row(logits=tail["logits"], next_token=None, pending_h=h,
                              pending_ids=torch.zeros(0, dtype=torch.long, device=h.device))

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
                  stop_ids: Sequence[Sequence[int]], budgets: Sequence[int | None],
                  verifier: Callable[[int], Callable] | None = None) -> list[StepResult]:
        """One speculative step of every row of the contiguous `rows`, each with its own settings, batched: the
        MTP catch-up per row (its length is what the row accepted last step), then the further drafts and the
        verify as [rows, ...] forwards. Every row drafts the same count k (padding after a row's own limit: its
        budget or a drafted stop). A row with budget 0 is skipped: it rides along in the forwards and is rolled
        back whole (its caches and state untouched, no token), so idle rows may sit inside the slice; every row
        needs room for the n_draft + 1 tokens of the verify.

        Drafts, acceptance and the next tokens stay on the device; the step's results reach the host in one
        transfer (a row's first step also waits for its first token, which decides whether it drafts at all).
        The verify takes the main cache's checkpoint, and the rejected tokens are rolled back by device data
        (the kept counts computed on the device), so nothing waits for the host before the transfer.
        `verifier(n_tokens)`, when given, supplies the verify instead of `EagerVerify`: the same interface on its
        own view of these rows (generate.graphs.GraphDecoder with checkpoint=True: both the verify and the
        rollback replay captured CUDA graphs)."""
        idx = range(self.cache.batch_size)[rows]
        budgets = [self.cache.max_seq_len if b is None else b for b in budgets]
        if len(budgets) != len(idx) or any(b < 0 for b in budgets):
            raise InvalidArgument(f"budgets={budgets}: needs one count >= 0 per row of {rows} (0 skips the row)")
        for r, b in zip(idx, budgets):
            if b and r not in self.rows:
                raise InvalidArgument(f"row {r} has no prompt: call prefill(row, tokens) before stepping it")
        main, mtp = self._views(idx)
        states = [self.rows[r] if b else None for r, b in zip(idx, budgets)]
        stops = [set(int(t) for t in s) for s in stop_ids]
        first = [i for i, st in enumerate(states) if st is not None and st.next_token is None]
        if first:   # a row's first step: its first token decides whether it drafts (one wait)
            chosen = torch.cat([sample(states[i].logits.unsqueeze(0), cfgs[i], gens[i]) for i in first])
            for i, (x, token) in enumerate(zip(chosen.tolist(), chosen)):
                states[first[i]].next_token, states[first[i]].next_id = x, token.view(1)
        k = max(0, min(self.n_draft, self.cache.max_seq_len - max(main.lengths()) - 1))
        if k == self.n_draft and self._row_path(states, cfgs):
            graphs = verifier is not None and self.graph_drafts
            return [self._row_step(idx.start, states[0], budgets[0], stops[0], stop_ids[0], graphs)]
        for st in states:
            if st is not None and st.fused is not None:
                self._unfuse(st)
        xs = [st.next_token if st is not None else 0 for st in states]
        x_ids = torch.cat([st.next_id if st is not None else self._zero for st in states])       # [B]
        live = [x not in st_ and b > 1 for x, st_, b in zip(xs, stops, budgets)]   # rows that go on after x
        limits = [min(k, b - 1) if ok else 0 for ok, b in zip(live, budgets)]
        stop_t = self._stop_table(stop_ids)                          # [B, n_stops] (-1 pads)
        if self.fixed_shapes:
            mtp.set_fixed_shapes(True)
        drafts, n_drafts, draft_logits = self._draft(mtp, idx.start, states, x_ids, k, limits, cfgs, gens, stop_t,
                                                     graphs=verifier is not None and self.graph_drafts)
        if self.fuse_greedy and all(cfgs[i].temperature == 0 for i, st in enumerate(states) if st is not None):
            return self._fused_step(main, idx.start, states, xs, x_ids, drafts, n_drafts, stop_t, budgets, live,
                                    stops, graphs=verifier is not None)
        if verifier is None and self.fixed_shapes:
            main.set_fixed_shapes(True)
        verify = verifier(k + 1) if verifier is not None else EagerVerify(self.model, main)
        main = verify.cache
        ids = torch.cat((x_ids[:, None], drafts), 1)                  # [B, k + 1]
        h, target = verify(ids)                                       # takes the checkpoint, then [B, k + 1, ...]
        if verifier is not None:
            h, target = h.clone(), target.clone()                     # (static buffers the next replay overwrites)
        a_dev, y_dev = accept_batch(target, draft_logits, drafts, n_drafts, cfgs, gens,
                                    [lim if ok else -1 for lim, ok in zip(limits, live)])
        keep_dev = kept_counts(a_dev, drafts, stop_t, to_device([budgets, live], self.device))
        verify.rollback(keep_dev)                                     # by data: no wait for the host
        idle = target[0, 0]                                           # (a skipped row's stand-in: ignored)
        x_logits = torch.stack([st.logits if st is not None else idle for st in states])
        emitted = torch.arange(k + 1, device=target.device) < a_dev[:, None]          # target rows sent out
        finite = (torch.isfinite(target).all(-1) | ~emitted).all(-1) & torch.isfinite(x_logits).all(-1)
        a_host, y_host, d_host, n_host, fin_host, keep_host = to_host([a_dev, y_dev, drafts, n_drafts, finite,
                                                                       keep_dev])
        return self._results(states, xs, live, budgets, stops, a_host, y_host, d_host, n_host, fin_host, drafts,
                             y_dev, h, target, main, verify.ckpt, keep_host, x_ids)

    def _fused_step(self, main: KVCache, first: int, states: list[_Row | None], xs: list[int], x_ids: torch.Tensor,
                    drafts: torch.Tensor, n_drafts: torch.Tensor, stop_t: torch.Tensor, budgets: list[int],
                    live: list[bool], stops: list[set], graphs: bool) -> list[StepResult]:
        """The rest of a step whose rows are all greedy: `greedy_verify` (checkpoint, verify, acceptance, rollback;
        with `graphs` one CUDA graph replay) and one transfer of its packed results."""
        B, n_tokens = len(states), drafts.shape[1] + 1
        starts = main.lengths()
        inputs = (x_ids, drafts, n_drafts, stop_t, to_device([budgets, live], self.device))
        if graphs:
            key = ("fused", first, B, n_tokens, stop_t.shape[1])
            if key not in self._fused_graphs:
                view = self.cache.select(slice(first, first + B)).set_fixed_shapes(True)
                self._fused_graphs[key] = GraphStep(lambda *a: greedy_verify(self.model, view, *a), view, n_tokens,
                                                    inputs)
            out = self._fused_graphs[key](*inputs)
            h, target = out.h.clone(), out.target.clone()    # (static buffers the next replay overwrites)
        else:
            if self.fixed_shapes:
                main.set_fixed_shapes(True)
            out = greedy_verify(self.model, main, *inputs)
            h, target = out.h, out.target
        x_logits = torch.stack([st.logits if st is not None else self._idle_logits for st in states])
        packed, x_finite = to_host([out.packed, torch.isfinite(x_logits).all(-1)])
        a_host, y_host, n_host, fin_host, keep_host = (list(c) for c in zip(*(row[:PACKED] for row in packed)))
        fin_host = [bool(f) and x for f, x in zip(fin_host, x_finite)]
        d_host = [row[PACKED:] for row in packed]
        return self._results(states, xs, live, budgets, stops, a_host, y_host, d_host, n_host, fin_host, drafts,
                             out.y, h, target, main, host_checkpoint(starts, n_tokens), keep_host, x_ids)

    def _results(self, states: list[_Row | None], xs: list[int], live: list[bool], budgets: list[int],
                 stops: list[set], a_host: list, y_host: list, d_host: list, n_host: list, fin_host: list,
                 drafts: torch.Tensor, y_dev: torch.Tensor, h: torch.Tensor, target: torch.Tensor, main: KVCache,
                 ckpt: CacheCheckpoint, keep_host: list[int], x_ids: torch.Tensor) -> list[StepResult]:
        """Each row's StepResult from the step's host results, its state carried to the next step; the host mirror
        of `main` then ends the rollback at the tokens the device kept (keep_host), which the host's own rule must
        give too. x_ids [B]: the step's x tokens (a fresh tensor, kept as a row's `prev` token)."""
        results, keep = [], []
        for i, st in enumerate(states):
            if st is None:
                results.append(StepResult([], target[i, :0], 0, 0, False))
                keep.append(0)
                continue
            x_logits = st.logits.unsqueeze(0)
            if not live[i]:
                results.append(StepResult([xs[i]], x_logits, 0, 0, True, fin_host[i]))
                keep.append(0)
                continue
            n, a, y = n_host[i], a_host[i], y_host[i]
            d = d_host[i][:n]
            finished = (a > 0 and d[a - 1] in stops[i]) or 1 + a >= budgets[i]
            keep.append(a if finished else a + 1)                  # a finished row's last token is not fed
            self.stats["drafted"] += n
            self.stats["accepted"] += a
            self.stats["steps"] += 1
            st.next_token, st.next_id, st.logits = y, y_dev[i:i + 1], target[i, a]
            st.prev = self._paired(st, x_ids[i:i + 1], self.n_draft - a) if n else None
            st.pending_h, st.pending_ids = h[i:i + 1, :a + 1], drafts[i, :a]
            results.append(StepResult([xs[i]] + d[:a], torch.cat((x_logits, target[i, :a])), n, a, finished,
                                      fin_host[i]))
        if keep != keep_host:   # (the device's rule and the host's must agree: the cache kept keep_host)
            raise RuntimeError(f"speculative step: the device kept {keep_host} tokens per row, the host "
                               f"expected {keep}")
        main.end_rollback(ckpt, keep)
        return results

    # ------------------------------------------------------------------ a single greedy row (greedy_row)
    def _row_path(self, states: list[_Row | None], cfgs: Sequence[SamplingConfig]) -> bool:
        """Whether this step runs as `greedy_draft_verify`: one greedy row whose state gives the last n_draft + 1
        main lanes, in the fused form already, or from its pending lanes (the MTP cache lacks their pairs) and as
        many of the MTP cache's last pairs before them as it lacks (`prev`, with the MTP cache rewindable)."""
        if not (self.fuse_greedy and self.fuse_row and len(states) == 1
                and fits(self.n_draft, self.model.config.window_size)):
            return False
        st = states[0]
        if st is None or cfgs[0].temperature != 0:
            return False
        if st.fused is not None:
            return True
        short = self.n_draft + 1 - st.pending_h.shape[1]
        return short <= 0 or (st.prev is not None and self._mtp_windowed and st.prev.count >= short)

    @staticmethod
    def _paired(st: _Row, x_id: torch.Tensor, j: int) -> _Pairs | None:
        """The MTP cache's last pairs (at least j where known) once a batched step's catch-up has paired the row's
        pending lanes with their next tokens (x_id [1]: the step's x): as `_Row.prev`, None for j <= 0."""
        if j <= 0:
            return None
        return (st.prev or _Pairs([], [])).then(st.pending_h, [st.pending_ids, x_id], j)

    def _row_step(self, row: int, st: _Row, budget: int, stops: set, stop_ids: Sequence[int],
                  graphs: bool) -> StepResult:
        """One step of the single greedy row `row` by `greedy_draft_verify` (one graph replay with `graphs`): its
        inputs staged with one copy, its results in one transfer; the host mirrors of both caches end at the kept
        count, which the host's own rule must give too."""
        x, k = st.next_token, self.n_draft
        live = x not in stops and budget > 1
        state, step, main, mtp = self._row_state(row, max(1, len(stop_ids)), graphs)
        if st.fused is not state:
            self._enter(st, state, mtp)
        starts = (main.lengths(), mtp.lengths())
        state.stage(budget, live, tuple(int(t) for t in stop_ids))
        out = step()
        (packed,) = to_host([out.packed])
        res, keep = self._row_result(row, st, x, budget, live, stops, packed[0], out.logits)
        main.end_rollback(host_checkpoint(starts[0], k + 1), [keep])
        mtp.end_rollback(host_checkpoint(starts[1], 2 * k), [keep])   # (catch-up and further drafts)
        return res

    def _row_result(self, row: int, st: _Row, x: int, budget: int, live: bool, stops: set, packed: list[int],
                    logits: torch.Tensor) -> tuple[StepResult, int]:
        """A single-row step's StepResult and kept count from its packed host results (x, budget and live: its
        inputs; logits [1, k+1, V]: its `RowOut.logits`); the host's rule must give the kept count the device
        used. The row's next token and the stats move on."""
        a, y, n, finite, keep_dev = packed[:PACKED]
        d = packed[PACKED:PACKED + n]
        if live:
            finished = (a > 0 and d[a - 1] in stops) or 1 + a >= budget
            keep = a if finished else a + 1
        else:
            finished, keep = True, 0
        if keep != keep_dev:
            raise RuntimeError(f"speculative step: the device kept {keep_dev} tokens of row {row}, the host "
                               f"expected {keep}")
        st.next_token = y
        if live:
            self.stats["drafted"] += n
            self.stats["accepted"] += a
            self.stats["steps"] += 1
        return StepResult([x] + d[:a], logits[0, :1 + a], n, a, finished, bool(finite)), keep

    # ------------------------------------------------------------------ a single greedy row, pipelined
    @torch.no_grad()
    def greedy_row_stream(self, row: int, max_new: int, stop_ids: Sequence[int] = (), graphs: bool | None = None,
                          verifier: Callable[[int], Callable] | None = None,
                          settled: list[StepResult] | None = None) -> Iterator[StepResult]:
        """Greedy speculative decoding of row `row` (after `prefill`): the StepResults of the `step_row` loop
        (budget max_new - tokens so far, until a step finishes the row), with the same tokens, counts and
        caches, but each single-row step (`greedy_draft_verify`) launched before the previous one's results are
        read, so the host's work of a step (launching the next, reading and bookkeeping this one) overlaps the
        device's. With `graphs` (default: on a GPU) the steps replay the row's CUDA graph.

        The step carries its own budget and live flag on the device (greedy_row._carry); the host mirrors of
        both caches' lengths stay an upper bound while a step is in flight (each launch counts its k + 1 tokens;
        the views read fixed shapes, so no read depends on them) and are exact after each result. A step is
        launched ahead only while the row goes on and both steps fit (max_seq_len); otherwise, and for a row that
        cannot take the single-row step, the step is `step_rows`' (with `verifier`). A row that finishes with a
        step in flight leaves that step dead: it changes neither cache nor state. Closing the stream early with
        a live step in flight still settles that step: the row moves on by its tokens, which are not yielded; with
        `settled` (a list) that step's StepResult is appended to it, for a caller that sends the row's tokens on
        (the serving engine)."""
        if max_new < 1:
            raise InvalidArgument(f"max_new={max_new}: must be at least 1")
        if row not in self.rows:
            raise InvalidArgument(f"row {row} has no prompt: call prefill(row, tokens) before stepping it")
        graphs = self.device.type == "cuda" if graphs is None else graphs
        stops, stop_tuple = set(int(t) for t in stop_ids), tuple(int(t) for t in stop_ids)
        left = max_new
        while True:
            st = self.rows[row]
            if st.next_token is None:   # the row's first step: its first token (one wait), as step_rows'
                chosen = sample(st.logits.unsqueeze(0), GREEDY, None)
                st.next_token, st.next_id = chosen.tolist()[0], chosen[0].view(1)
            room = self.cache.lengths()[row] + 2 * (self.n_draft + 1) <= self.cache.max_seq_len
            if room and self._row_path([st], [GREEDY]):
                steps = self._pipelined(row, st, left, stops, stop_tuple, graphs, settled)
            else:
                steps = iter(self.step_rows(slice(row, row + 1), [GREEDY], [None], [stop_ids], [left], verifier))
            try:
                for res in steps:
                    left -= len(res.tokens)
                    yield res
                    if res.finished:
                        return
            finally:
                if hasattr(steps, "close"):
                    steps.close()

    def _pipelined(self, row: int, st: _Row, budget: int, stops: set, stop_ids: tuple[int, ...],
                   graphs: bool, settled: list[StepResult] | None = None) -> Iterator[StepResult]:
        """`greedy_row_stream`'s single-row steps, each launched before the previous one's results are read, until
        the row finishes or two steps no longer fit in the cache. Closed with a live step in flight, it settles
        that step (its result appended to `settled` when given)."""
        k, limit = self.n_draft, self.cache.max_seq_len
        state, step, main, mtp = self._row_state(row, max(1, len(stop_ids)), graphs, fixed=True)
        if st.fused is not state:
            self._enter(st, state, mtp)
        x = st.next_token
        live = x not in stops and budget > 1
        state.stage(budget, live, stop_ids)
        starts = (main.lengths()[0], mtp.lengths()[0])
        cur, unread = self._launch(step, graphs), False
        try:
            while True:
                after = self._launch(step, graphs) if live and starts[0] + 2 * (k + 1) <= limit else None
                res, keep = self._row_result(row, st, x, budget, live, stops, cur[0].wait()[0][0], cur[1])
                ahead = k + 1 if after is not None and not res.finished else 0   # (a dead step keeps nothing)
                starts = self._settle(main, mtp, starts, keep, ahead)
                if res.finished or after is None:
                    yield res
                    return
                x, budget, cur = st.next_token, budget - len(res.tokens), after
                live = x not in stops and budget > 1     # (as the budget `after` got on the device: _carry)
                unread = True
                yield res
                unread = False
        finally:
            # closed with a live step in flight: settle it (wait, then exact host mirrors); not when an open stream
            # is finalized at interpreter exit (the tensors it would touch may be torn down; PyTorch aborts)
            if unread and not sys.is_finalizing():
                res, keep = self._row_result(row, st, x, budget, live, stops, cur[0].wait()[0][0], cur[1])
                self._settle(main, mtp, starts, keep, 0)
                if settled is not None:
                    settled.append(res)

    @staticmethod
    def _launch(step: Callable, graphs: bool) -> tuple[HostCopy, torch.Tensor]:
        """Run (launch) one single-row step: its packed results on their way to the host, and its logits (a copy
        with `graphs`: the next replay overwrites the static buffers; a GPU's HostCopy copies the packed results
        as it is made, a CPU's keeps the tensor, so a graph path emulated there needs a copy)."""
        out = step()
        packed = out.packed.clone() if graphs and not out.packed.is_cuda else out.packed
        return HostCopy([packed]), out.logits.clone() if graphs else out.logits

    @staticmethod
    def _settle(main: KVCache, mtp: KVCache, starts: tuple[int, int], keep: int, ahead: int) -> tuple[int, int]:
        """After a single-row step that started at `starts` (main, MTP lengths) and kept `keep` tokens: both
        caches' host mirrors at that length plus `ahead` (a launched step's k + 1 at most; 0: exact). Returns the
        lengths after the step."""
        for cache, start in zip((main, mtp), starts):
            moved = cache.lengths()[0] - start
            cache.end_rollback(host_checkpoint([start], moved), [keep + ahead])
        return starts[0] + keep, starts[1] + keep

    def _row_state(self, row: int, n_stops: int, graphs: bool, fixed: bool = False
                   ) -> tuple[RowState, Callable, KVCache, KVCache]:
        """The device state, the step (a GraphStep with `graphs`) and the cache views of a single-row step of
        `row`, kept per row, stop count and kind. The views read fixed shapes with `graphs`, `fixed` or
        `fixed_shapes`."""
        fixed = graphs or fixed or self.fixed_shapes
        key = (row, n_stops, graphs, fixed)
        if key not in self._row_steps:
            if graphs or (fixed and not self.fixed_shapes):   # (a graph's own views, as the other captured steps')
                main = self.cache.select(slice(row, row + 1)).set_fixed_shapes(True)
                mtp = self.mtp_cache.select(slice(row, row + 1)).set_fixed_shapes(True)
            else:
                main, mtp = self._views(range(row, row + 1))
            state = RowState(self.model, n_stops, self.device, self.n_draft)
            step = lambda: greedy_draft_verify(self.model, main, mtp, state)   # noqa: E731
            if graphs:   # (GraphStep advances both host mirrors by k + 1; _row_step then ends both rollbacks)
                step = GraphStep(step, CacheGroup(main, mtp), state.width, ())
            self._row_steps[key] = (state, step, main, mtp)
        return self._row_steps[key]

    def _enter(self, st: _Row, state: RowState, mtp: KVCache) -> None:
        """Load a row's state into `state` (the fused form: the last k + 1 main lanes and tokens, the MTP cache
        without their pairs). With m < k + 1 lanes pending, the MTP cache's last k + 1 - m pairs (`prev`) are
        stepped back over, to be made again by the step."""
        if st.fused is not None:
            self._unfuse(st)
        lanes, ids = st.pending_h, torch.cat((st.pending_ids, st.next_id))
        short = state.width - lanes.shape[1]
        if short > 0:
            prev_h, prev_ids = st.prev.last(short)
            mtp.rewind(short)   # (exact for the step's catch-up: it keeps only its last output, KVCache.rewind)
            lanes, ids = torch.cat((prev_h, lanes), 1), torch.cat((prev_ids, ids))
        state.load(lanes, ids[None], st.logits)
        st.fused, st.prev = state, None

    @staticmethod
    def _unfuse(st: _Row) -> None:
        """A fused row's state back into its fields (copies: the buffers go on being stepped): k + 1 lanes
        pending, the MTP cache without their pairs."""
        s = st.fused
        st.pending_h, st.pending_ids = s.lanes.clone(), s.ids[0, :-1].clone()
        st.next_id, st.logits = s.ids[0, -1:].clone(), s.x_logits[0].clone()
        st.fused, st.prev = None, None

    def _draft(self, mtp: KVCache, first: int, states: list[_Row | None], x_ids: torch.Tensor, k: int,
               limits: list[int], cfgs: Sequence[SamplingConfig], gens, stop_t: torch.Tensor, graphs: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row up to limits[b] drafts (fewer after a drafted stop token), on the device: the drafts [B, k]
        (0 after a row's last), their counts [B] and the MTP logits [B, k, vocab] they were drawn from. The MTP
        cache ends holding each drafting row's exact pairs up to (h_{P-1}, x_P). `mtp` is the view of rows
        first .. first + B - 1; with `graphs` its MTP forwards replay CUDA graphs: the further drafts' (one per
        batch) and, for a single row, the catch-up's (one per catch-up length; with more rows the per-row
        catch-ups run eagerly rather than keep a graph per row and length)."""
        B, V = len(states), self.model.config.vocab_size
        if k == 0:
            return (torch.zeros(B, 0, dtype=torch.long, device=self.device),
                    torch.zeros(B, dtype=torch.long, device=self.device), torch.zeros(B, 1, V, device=self.device))
        sampled = [i for i, cfg in enumerate(cfgs) if cfg.temperature > 0]
        if B == 1 and limits[0]:   # one drafting row: its catch-up's outputs are the batch's (no copies)
            ids = torch.cat((states[0].pending_ids, x_ids))[None]
            out, first_logits = self._mtp_step(("catch-up", first, ids.shape[1]), mtp, states[0].pending_h, ids,
                                               graphs)
            lanes = out[:, -1:]
        else:
            lane_shape = (self.model.config.hc_mult, self.model.config.dim)
            lanes = torch.zeros(B, 1, *lane_shape, dtype=self.model.dtype, device=self.device)
            first_logits = torch.zeros(B, V, device=self.device)
            for i, st in enumerate(states):                        # catch-up: lengths differ per row
                if limits[i]:
                    ids = torch.cat((st.pending_ids, x_ids[i:i + 1]))[None]
                    key = ("catch-up", first + i, ids.shape[1])
                    row = self._views(range(first + i, first + i + 1))[1] if self.fixed_shapes else mtp.select(i)
                    out, first_logits[i] = self._mtp_step(key, row, st.pending_h, ids, graphs and B == 1)
                    lanes[i] = out[0, -1:]
        limit_t = to_device(limits, self.device)
        logits, drafts, alive_at = [first_logits], [], []          # per draft j: [B, V], [B], [B]
        alive = limit_t > 0
        ckpt = mtp.checkpoint(k - 1) if k > 1 else None
        for j in range(k):
            if j:
                alive = alive & (limit_t > j)
            tok = logits[j].argmax(-1)
            for i in sampled:
                if limits[i] > j:
                    tok[i] = sample(logits[j][i:i + 1], cfgs[i], gens[i])[0]
            drafts.append(torch.where(alive, tok, 0))
            alive_at.append(alive)
            if j == k - 1:
                break
            lanes, step_logits = self._mtp_step(("draft", first, B), mtp, lanes, drafts[j][:, None], graphs)
            logits.append(step_logits.clone() if graphs and sampled else step_logits)   # (a replay overwrites it)
            alive = alive & ~(drafts[j][:, None] == stop_t).any(-1)   # drafting stops after a drafted stop
        if ckpt is not None:
            mtp.rollback(ckpt, 0)
        if k == 1:   # (views, no copies)
            return drafts[0][:, None], alive_at[0].long(), logits[0][:, None]
        return torch.stack(drafts, 1), torch.stack(alive_at, 1).sum(1), torch.stack(logits, 1)

    def _views(self, idx: range) -> tuple[KVCache, KVCache]:
        """The main and MTP cache views of rows idx. With `fixed_shapes` (the engine's graph path) each slice's
        views are made once and kept: a view is a Python object per layer, store and state, which costs the
        host more than the rest of a graphed step's bookkeeping. Otherwise fresh views, as a forward's own."""
        if not self.fixed_shapes:
            return self.cache.select(slice(idx.start, idx.stop)), self.mtp_cache.select(slice(idx.start, idx.stop))
        key = (idx.start, idx.stop)
        if key not in self._fixed_views:
            self._fixed_views[key] = (self.cache.select(slice(*key)).set_fixed_shapes(True),
                                      self.mtp_cache.select(slice(*key)).set_fixed_shapes(True))
        return self._fixed_views[key]

    def _stop_table(self, stop_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """`_stop_table` on this device, kept per distinct stops (read-only: every step of the same requests
        reuses it rather than send it up again); at most 64 kept."""
        key = tuple(tuple(int(t) for t in s) for s in stop_ids)
        table = self._stop_tables.get(key)
        if table is None:
            if len(self._stop_tables) >= 64:
                self._stop_tables.clear()
            table = self._stop_tables[key] = _stop_table(stop_ids, self.device)
        return table

    def graph_count(self) -> int:
        """CUDA graphs this decoder holds: MTP forwards, fused greedy steps and single-row steps (the verify
        graphs of batched sampled steps are the caller's, `step_rows`' verifier)."""
        return len(self._mtp_graphs) + len(self._fused_graphs) + sum(bool(key[2]) for key in self._row_steps)

    def drop_graphs(self) -> None:
        """Forget the captured MTP forwards, fused steps and single-row steps (after a failed step: they are captured
        afresh; a row whose state lived in a forgotten single-row step is copied out of it at its next step)."""
        self._mtp_graphs.clear()
        self._fused_graphs.clear()
        self._row_steps.clear()

    def _mtp_step(self, key: tuple, mtp: KVCache, lanes: torch.Tensor, ids: torch.Tensor,
                  graphs: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`_mtp`, with `graphs` replayed from the CUDA graph kept under `key` (its own view of the same rows:
        `key` names them and the shapes). The outputs are then static buffers the next replay overwrites."""
        if not graphs:
            return self._mtp(mtp, lanes, ids)
        if key not in self._mtp_graphs:
            view = self.mtp_cache.select(slice(key[1], key[1] + mtp.batch_size)).set_fixed_shapes(True)
            self._mtp_graphs[key] = GraphStep(lambda a, b: self._mtp(view, a, b), view, ids.shape[1], (lanes, ids))
        return self._mtp_graphs[key](lanes, ids)

    def _mtp(self, mtp: KVCache, lanes: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP block over lanes [B, n, R, C] paired with the next tokens ids [B, n], appended to its cache:
        its output lanes and the logits [B, vocab] at the last position."""
        return mtp_forward(self.model, mtp, lanes, ids)


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


def accept_batch(target: torch.Tensor, draft_logits: torch.Tensor, drafts: torch.Tensor, n_drafts: torch.Tensor,
                 cfgs: Sequence[SamplingConfig], gens: Sequence[torch.Generator | None],
                 limits: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`accept_drafts` for every row at once, without a host sync: (accepted counts [B], next tokens [B]) on the
    device, for the target logits [B, k+1, vocab], the draft logits [B, k, vocab] and drafts [B, k], of which row b
    made n_drafts[b] (at most limits[b], its host-side bound). Greedy rows run batched; a sampling row draws
    limits[b] uniforms and one token from its generator, as `accept_drafts` does for limits[b] drafts (so both
    give the same tokens whenever no drafted stop token cut the row's drafts short); a row with limits[b] < 0
    is not decided (it takes no random numbers; its results are the greedy rule's, to be ignored)."""
    k = target.shape[1] - 1
    a, y = greedy_accept(target, drafts, n_drafts)
    for b, cfg in enumerate(cfgs):
        if cfg.temperature > 0 and limits[b] >= 0:
            a[b], y[b] = _accept_sampled(target[b], draft_logits[b, :k], drafts[b], n_drafts[b], cfg, gens[b],
                                         limits[b])
    return a, y


def _accept_sampled(target: torch.Tensor, draft_logits: torch.Tensor, drafts: torch.Tensor, n: torch.Tensor,
                    cfg: SamplingConfig, gen: torch.Generator | None, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampling row of `accept_batch`: the rejection rule of `accept_drafts` as device ops (no early exit)."""
    p = _normalised(probabilities(target, cfg))                       # [k + 1, V]
    if limit == 0:
        return n * 0, torch.multinomial(p[0], 1, generator=gen)[0]
    q = _normalised(probabilities(draft_logits[:limit], cfg))         # [limit, V]
    d = drafts[:limit, None]
    u = torch.rand(limit, generator=gen, device=p.device)
    kept = (u * q.gather(1, d)[:, 0] < p[:limit].gather(1, d)[:, 0]) & (torch.arange(limit, device=p.device) < n)
    a = kept.long().cumprod(0).sum()
    residual = (p[:limit] - q).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:limit])   # p == q: nothing to correct
    dist = torch.cat((residual, p[limit:limit + 1]))                 # row limit: the bonus, p_limit
    bonus = torch.where(a == n, p.index_select(0, n.view(1)), dist.index_select(0, a.view(1)))
    return a, torch.multinomial(bonus[0], 1, generator=gen)[0]


class EagerVerify:
    """The verify forward run eagerly, with the interface of a captured one (GraphDecoder with checkpoint=True):
    a call takes the cache checkpoint (`ckpt`) and appends the tokens; `rollback(keep)` keeps keep[b] [B] (device)
    of them per row by device data; the caller then advances the host positions (KVCache.end_rollback)."""

    def __init__(self, model, cache: KVCache):
        self.model, self.cache, self.ckpt = model, cache, None

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.ckpt = self.cache.checkpoint(ids.shape[1])
        h = self.model.hidden(ids, cache=self.cache)
        return h, self.model.logits(h)

    def rollback(self, keep: torch.Tensor) -> None:
        self.cache.rollback_on_device(self.ckpt, keep)


def _stop_table(stop_ids: Sequence[Sequence[int]], device) -> torch.Tensor:
    """Each row's stop tokens as one [B, n] tensor (-1 pads; at least one column)."""
    width = max([len(s) for s in stop_ids] + [1])
    return to_device([list(s) + [-1] * (width - len(s)) for s in stop_ids], device)
