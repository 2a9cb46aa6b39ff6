"""V4 attention: one code path for window-only, CSA and HCA layers (docs/architecture.md#attention).

Shared single K=V head (MQA) with partial interleaved RoPE; each query attends, in one softmax with a
per-head sink, to the raw KV of the last `window_size` positions plus compressed entries: all visible
ones (HCA) or the indexer's top-k (CSA). The output is de-roped and projected by a grouped low-rank
projection (wo_a per head group, then wo_b).
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from .. import ops
from ..cache.state import Compressed, CompressorState
from ..cache.step_memo import constant, shared
from ..config import ModelConfig
from ..quant.packed import FP8_BLOCK
from .compressor import Compressor, quantize_entries
from .context import LocalPieces, SequenceContext
from .indexer import Indexer
from .norm import Linear, RMSNorm
from .rope import apply_rope_, rope_angles, rope_frequencies


class AttentionCache(Protocol):
    """What an attention layer needs from an inference cache (implemented by dsv4.cache.LayerCache)."""
    compressor_state: CompressorState | None
    indexer_state: CompressorState | None

    def window(self, pos0: torch.Tensor) -> torch.Tensor: ...      # raw KV of the W-1 positions before pos0
    def write_window(self, pos0: torch.Tensor, kv: torch.Tensor) -> None: ...
    def plan_write(self, pos0: torch.Tensor, slots: torch.Tensor) -> None: ...   # write_window's slots, made ahead
    window_size: int
    def window_ring(self, dtype: torch.dtype) -> torch.Tensor | None: ...       # the ring, when read in place
    def add_entries(self, c: Compressed) -> None: ...
    def entries(self) -> torch.Tensor: ...                          # all entries visible by the chunk's end
    def entry_records(self) -> torch.Tensor | None: ...             # the same as stored FP8 records, if they are
    def add_keys(self, c: Compressed) -> None: ...
    def keys(self) -> torch.Tensor: ...                             # indexer keys (floats or FP4 records)


def window_indices(pos0: torch.Tensor, n_queries: int, n_prior: int, window: int) -> torch.Tensor:
    """[B, S, W]: rows of [n_prior earlier rows | chunk rows] that query i (position pos0 + i) sees, i.e.
    positions p-W+1 .. p; -1 for positions before 0. Query i's own row is n_prior + i."""
    i = torch.arange(n_queries, device=pos0.device).unsqueeze(1)
    back = torch.arange(window, device=pos0.device)
    rows = (n_prior + i - back).expand(pos0.shape[0], -1, -1)
    ok = (pos0.view(-1, 1, 1) + i - back >= 0) & (rows >= 0)
    return torch.where(ok, rows, -1)


def ring_indices(pos0: torch.Tensor, window: int) -> torch.Tensor:
    """[B, 1, W]: the ring slots (position % W) of positions pos0-W+1 .. pos0, oldest first; -1 before 0. (pos0 of
    any shape [...]: [..., 1, W].)"""
    p = pos0.unsqueeze(-1) + torch.arange(1 - window, 1, device=pos0.device)
    return torch.where(p >= 0, p % window, -1).unsqueeze(-2)


def ring_chunk_indices(pos0: torch.Tensor, n_queries: int, window: int) -> torch.Tensor:
    """[B, S, W]: rows of [the ring before the chunk's write (W slots) | chunk rows] that query i (position
    pos0 + i) sees, positions p, p-1, .. p-W+1 in window_indices' order (so the attention reads the same rows in
    the same order): a position before pos0 at its ring slot (p % W; the ring still holds pos0-W .. pos0-1), one
    from pos0 on at chunk row W + (p - pos0); -1 before 0."""
    d = torch.arange(n_queries, device=pos0.device).unsqueeze(1) - torch.arange(window, device=pos0.device)
    p = pos0.view(-1, 1, 1) + d                                                      # [B, S, W]: i - back = d
    rows = torch.where(d < 0, p % window, window + d)                                # (before pos0: d < 0)
    return torch.where(p >= 0, rows, -1)


def plan_window(cache: AttentionCache, positions: torch.Tensor, slots: torch.Tensor,
                spans: Sequence[tuple[int, int]], dtype: torch.dtype, memo: dict | None = None) -> list[torch.Tensor]:
    """The start positions [B] of cached forwards within one step (a speculative step's verify; the MTP block's
    catch-up and further drafts), forward i taking the S_i tokens at columns spans[i] = (offset_i, S_i) of the
    step's consecutive positions [B, n] (`slots`: those positions % W, as KVCache.checkpoint makes both). What
    every layer of each forward derives from its positions alike (the positions, ring write slots and, for rings
    of `dtype` read in place, the window index lists) is in its memo already, made once for all of them: the same
    values in a few ops (`memo`, a dict kept across steps, holds the index lists' offsets). `cache`: a layer's
    cache (every layer's ring has its window and format)."""
    W = cache.window_size
    idx = None
    if cache.window_ring(dtype) is not None:   # every forward's index list at once (ring_indices' and chunk's)
        rel, floor, alt = constant(memo, ("window_plan", tuple(spans), W, str(positions.device)),
                                   lambda: _window_plan(spans, W, positions.device))
        p = positions[:, :1, None] + rel                                                      # [B, rows, W]
        idx = torch.where(p >= floor, p % W, alt)
    starts, row = [], 0
    for off, S in spans:
        pos0 = positions[:, off]
        cols = slice(off, off + S)
        shared(pos0, ("pos", S), lambda: positions[:, cols])
        cache.plan_write(pos0, slots[:, cols])
        if idx is not None:
            rows = slice(row, row + S)
            shared(pos0, ("ring_idx", W) if S == 1 else ("ring_chunk_idx", S, W), lambda: idx[:, rows])
            row += S
        starts.append(pos0)
    return starts


def _window_plan(spans: Sequence[tuple[int, int]], window: int, device) -> tuple[torch.Tensor, ...]:
    """`plan_window`'s index offsets: (rel, floor, alt) [rows, W] long, the rows of every span's index list (one
    for a token: `ring_indices`' order; S for a chunk: `ring_chunk_indices`'), such that with p = the step's first
    position + rel each entry is p % W where p >= floor (a ring slot; floor 0, p the entry's position), else alt
    (-1 before position 0; a chunk row W + i - back, whose floor no position reaches)."""
    rels, floors, alts = [], [], []
    for off, S in spans:
        if S == 1:   # positions off-W+1 .. off, oldest first
            rel = torch.arange(off + 1 - window, off + 1, device=device)[None]
            chunk = torch.zeros_like(rel, dtype=torch.bool)
        else:        # query i sees positions off+i, off+i-1, .., off+i-W+1; those from off on are chunk rows
            rel = off + torch.arange(S, device=device)[:, None] - torch.arange(window, device=device)
            chunk = rel >= off
        floors.append(torch.where(chunk, torch.iinfo(torch.long).max, 0))
        alts.append(torch.where(chunk, window + rel - off, -1))
        rels.append(rel)
    return torch.cat(rels), torch.cat(floors), torch.cat(alts)


def visible_entries(n_visible: torch.Tensor, n_entries: int) -> torch.Tensor:
    """HCA: every entry j < n_visible[b, s] (-1 elsewhere): [B, S, n_entries]."""
    j = torch.arange(n_entries, device=n_visible.device)
    return torch.where(j < n_visible.unsqueeze(-1), j, -1)


def with_prefix(entries: torch.Tensor, prefix: torch.Tensor, offset: int) -> torch.Tensor:
    """An attention index list [prefix | entries + offset where entries >= 0, else -1] along the last dim (int64),
    the layout ops.indexer_topk returns with a prefix."""
    return torch.cat((prefix.long(), torch.where(entries >= 0, entries + offset, -1)), dim=-1)


class Attention(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.head_dim, self.rope_dim = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim
        self.window_size, self.eps, self.n_groups = cfg.window_size, cfg.norm_eps, cfg.o_groups
        self.o_lora_rank = cfg.o_lora_rank
        self.ratio = cfg.compress_ratios[layer_id]
        self.kind = "window" if self.ratio == 0 else ("csa" if self.ratio == cfg.csa_ratio else "hca")
        self.softmax_scale = cfg.head_dim ** -0.5
        self.quant_sim = False  # FP8 round trip of the KV nope dims (raw and compressed), as the reference
        # training stages (docs/architecture.md#indexer-training): CSA attends to the indexer's top-k (`sparse`)
        # or, during the warm-ups, to every visible entry; `indexer_loss` computes the indexer's KL loss into
        # `indexer_kl`
        self.sparse, self.indexer_loss = True, False
        self.indexer_kl: torch.Tensor | None = None
        self.recomputed = False  # set by Transformer.set_activation_checkpointing
        # placement hook (dsv4.distributed): sums the output projection over tensor-parallel head shards
        self.output_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        # placement hook (dsv4.distributed.context_parallel): this process holds pieces of the sequences
        self.sequence_context: SequenceContext | None = None

        self.attn_sink = nn.Parameter(torch.zeros(cfg.n_heads))
        self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, cfg.n_heads * cfg.head_dim, bias=False)
        self.wkv = Linear(cfg.dim, cfg.head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.wo_a = Linear(cfg.n_heads * cfg.head_dim // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim, bias=False)
        if self.ratio:
            self.compressor = Compressor(cfg.dim, cfg.head_dim, cfg.rope_head_dim, self.ratio,
                                         overlap=self.kind == "csa", rotate=False, eps=cfg.norm_eps)
        if self.kind == "csa":
            self.indexer = Indexer(cfg.dim, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim,
                                   cfg.rope_head_dim, self.ratio, cfg.index_topk, cfg.norm_eps)
        # compressed layers (and their raw window) use compress_rope_theta + YaRN, window-only plain RoPE
        if self.ratio:
            self._rope = (cfg.rope_head_dim, cfg.compress_rope_theta, cfg.rope_factor, cfg.original_seq_len,
                          cfg.beta_fast, cfg.beta_slow)
        else:
            self._rope = (cfg.rope_head_dim, cfg.rope_theta)
        self.register_buffer("freqs", rope_frequencies(*self._rope), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the RoPE frequencies (after building on the meta device)."""
        self.freqs = rope_frequencies(*self._rope).to(self.attn_sink.device)

    def _output_groups(self, o: torch.Tensor) -> torch.Tensor:
        """Each head group through its own rows of wo_a: [B, S, G, H*D/G] -> [B, S, G, o_lora]. An FP8 wo_a whose
        group rows fall on its 128-row scale tiles (V4's o_lora_rank = 1024) runs one grouped weight-only GEMM
        (one launch for all groups); one that does not (tiny test configs) is dequantised for the call."""
        w = self.wo_a.packed
        if w is None:
            return ops.grouped_linear(o, self.wo_a.weight.view(self.n_groups, self.o_lora_rank, -1))
        R = self.o_lora_rank
        if R % FP8_BLOCK:
            return ops.grouped_linear(o, w.dequantize(o.dtype).view(self.n_groups, R, -1))
        return ops.linear_fp8_grouped(o, w, self.n_groups)

    def forward(self, x: torch.Tensor, pos0: torch.Tensor | None = None,
                cache: AttentionCache | None = None) -> torch.Tensor:
        """x: [B, S, C] (attn_norm output); row b holds positions pos0[b].. (None: 0) -> [B, S, C]."""
        B, S, _ = x.shape
        H, D = self.n_heads, self.head_dim
        if self.sequence_context is not None:  # pieces of longer sequences: their global positions
            if cache is not None or pos0 is not None:
                raise ValueError("context parallelism runs whole-sequence forwards: no cache, no start positions")
            pos = self.sequence_context.positions(S, x.device).expand(B, S)                      # [B, S]
            cos, sin = rope_angles(pos, self.freqs)
        else:
            if pos0 is None:
                pos0 = torch.zeros(B, dtype=torch.long, device=x.device)
            pos = shared(pos0, ("pos", S), lambda: pos0.unsqueeze(1) + torch.arange(S, device=x.device))  # [B, S]
            cos, sin = shared(pos0, ("rope", S, self._rope), lambda: rope_angles(pos, self.freqs))  # [B, S, rd/2]

        qr = self.q_norm(self.wq_a(x))                                        # [B, S, q_lora]
        if torch.is_grad_enabled():  # training: norm, then rope
            q = apply_rope_(ops.rms_norm(self.wq_b(qr).view(B, S, H, D), None, self.eps), cos, sin)
        else:  # inference: the norm with its rope in one op
            q = ops.rms_norm(self.wq_b(qr).view(B, S, H, D), None, self.eps, rope=(cos, sin))   # [B, S, H, D]
        kv = self._kv(x, cos, sin)                                            # [B, S, D]

        if cache is None:
            o = self._sequence(x, qr, q, kv, pos, cos, sin)
        else:
            o = self._cached(x, qr, q, kv, pos0, pos, cos, sin, cache)
        o = apply_rope_(o, cos, sin, inverse=True)  # V = K carries RoPE: rotate the output back
        o = o.reshape(B, S, self.n_groups, H * D // self.n_groups)
        o = self._output_groups(o)                                            # [B, S, G, o_lora]
        out = self.wo_b(o.flatten(2))
        return out if self.output_reduce is None else self.output_reduce(out)

    def plan_cached(self, cache: AttentionCache, positions: torch.Tensor, slots: torch.Tensor,
                    spans: Sequence[tuple[int, int]], dtype: torch.dtype, memo: dict | None = None
                    ) -> list[torch.Tensor]:
        """`plan_window`, and each forward's RoPE angles for this layer's kind (for a block of one layer, or
        layers of one kind: the MTP block's catch-up and further drafts of a speculative step)."""
        starts = plan_window(cache, positions, slots, spans, dtype, memo)
        cos, sin = rope_angles(positions, self.freqs)                                        # [B, n, rd/2]
        for (off, S), pos0 in zip(spans, starts):
            cols = slice(off, off + S)
            shared(pos0, ("rope", S, self._rope), lambda: (cos[:, cols], sin[:, cols]))
        return starts

    @torch.no_grad()
    def fill_cache(self, x: torch.Tensor, pos0: torch.Tensor, cache: AttentionCache) -> None:
        """What a prefill of rows x [B, S, C] (attn_norm outputs at positions pos0..) writes into `cache`, without
        attending: the window rows, the compressed entries, the indexer keys and the compressors' states (a prefill
        whose attention ran elsewhere, e.g. split across ranks: dsv4.distributed.context_prefill)."""
        pos = pos0.unsqueeze(1) + torch.arange(x.shape[1], device=x.device)
        cos, sin = rope_angles(pos, self.freqs)
        cache.write_window(pos0, self._kv(x, cos, sin))
        if self.ratio:
            cache.add_entries(self.compressor(x, pos0, self.freqs, self.quant_sim, cache.compressor_state))
        if self.kind == "csa":
            cache.add_keys(self.indexer.compressor(x, pos0, self.freqs, self.indexer.fp4, cache.indexer_state))

    def _kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The shared K=V head of rows x [B, S, C] at angles cos, sin -> [B, S, D]."""
        if torch.is_grad_enabled():  # training: norm, then rope
            kv = apply_rope_(self.kv_norm(self.wkv(x)), cos, sin)
        else:  # inference: the norm with its rope in one op
            kv = ops.rms_norm(self.wkv(x), self.kv_norm.weight, self.kv_norm.eps, rope=(cos, sin))
        return quantize_entries(kv, self.rope_dim, rotate=False) if self.quant_sim else kv

    def _rows_before(self) -> int:
        """Input rows before a piece that its attention needs: the window's W-1, the compressor's unfinished
        group (m-1) and, overlapping, the group before it (2m-1 in all)."""
        need = self.window_size - 1
        if self.ratio:
            need = max(need, 2 * self.ratio - 1 if self.compressor.overlap else self.ratio - 1)
        return need

    def _sequence(self, x, qr, q, kv, pos, cos, sin) -> torch.Tensor:
        """Whole sequences from position 0: block-local window + masked dense compressed entries. Under context
        parallelism x holds pieces of them (dsv4.model.context): the entries come from every piece."""
        ctx = self.sequence_context
        if ctx is not None:
            ctx.begin_layer(self.layer_id, self.recomputed and self.training and torch.is_grad_enabled())
        pieces = None if ctx is None else LocalPieces.exchange(ctx, x, self._rows_before())
        entries = mask = scores = None
        if self.ratio:
            if pieces is None:
                zeros = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
                entries = self.compressor(x, zeros, self.freqs, self.quant_sim).entries    # [B, N, D]
            else:
                entries = pieces.entries(self.compressor, x, self.freqs, self.quant_sim)   # [B, N, D] all pieces'
            j = torch.arange(entries.shape[1], device=x.device)
            mask = j < ((pos + 1) // self.ratio).unsqueeze(-1)                          # [B, S, N] visible
            if self.kind == "csa" and (self.sparse or self.indexer_loss):
                # the indexer learns only from its KL loss: its inputs are detached
                inputs = (x.detach(), qr.detach()) if self.indexer_loss else (x, qr)
                local = () if pieces is None else (pieces.detached() if self.indexer_loss else pieces,)
                with torch.set_grad_enabled(self.indexer_loss and torch.is_grad_enabled()):
                    scores = self.indexer.sequence_scores(*inputs, cos, sin, self.freqs, *local)
                if self.sparse:
                    chosen = topk_mask(scores.detach(), mask, self.indexer.topk)
                    if self.indexer.replay is not None:
                        chosen = replayed_mask(chosen, *self.indexer.replay)
                    mask = mask & chosen
        # (a sequence shorter than one group has no entry: no attention mass to match, no KL)
        want = scores is not None and self.indexer_loss and entries.shape[1] > 0
        if pieces is None:
            o, mass = ops.sequence_attn(q, kv, entries, mask, self.attn_sink, self.softmax_scale, self.window_size,
                                        return_entry_probs=want, recomputed=self.recomputed)
        else:
            o, mass = self._pieces_attn(q, kv, entries, mask, want, pieces)
        self.indexer_kl = indexer_kl(scores, mass, mask, None if ctx is None else ctx.sum) if want else None
        return o

    def _pieces_attn(self, q, kv, entries, mask, want: bool, pieces: LocalPieces):
        """sequence_attn per piece, the K=V rows before it in front: the window of its first queries reaches
        into them. Those rows get queries too (zeros), whose outputs are dropped: the window's mask is relative, so
        the op runs as on a sequence starting P rows before the piece."""
        B, _, H, D = q.shape
        outs, masses = [], []
        for p, before in zip(pieces.pieces, pieces.before):
            P = before.shape[1]
            at = (p.start - P + torch.arange(P, device=q.device)).expand(B, P)
            kv_before = self._kv(before, *rope_angles(at, self.freqs))                  # [B, P, D]
            sl = slice(p.offset, p.offset + p.length)
            q_ext = torch.cat((q.new_zeros(B, P, H, D), q[:, sl]), 1)
            m_ext = None if mask is None else torch.cat((mask.new_zeros(B, P, mask.shape[-1]), mask[:, sl]), 1)
            o, mass = ops.sequence_attn(q_ext, torch.cat((kv_before, kv[:, sl]), 1), entries, m_ext, self.attn_sink,
                                        self.softmax_scale, self.window_size, return_entry_probs=want,
                                        recomputed=self.recomputed)
            outs.append(o[:, P:])
            masses.append(mass[:, P:] if want else None)
        return torch.cat(outs, 1), (torch.cat(masses, 1) if want else None)

    def _cached(self, x, qr, q, kv, pos0, pos, cos, sin, cache) -> torch.Tensor:
        """Continue cached sequences: index lists into [earlier window rows | chunk rows | entries], or for one
        token per row into [the window ring | entries]."""
        S, W = x.shape[1], self.window_size
        ring = cache.window_ring(q.dtype) if S == 1 else None
        if ring is not None:  # decode: the token into the ring, then the ring in place
            cache.write_window(pos0, kv)
            rows, window_key = ring, ("ring_idx", W)
            idx = shared(pos0, window_key, lambda: ring_indices(pos0, W))                        # [B, 1, W]
        elif cache.window_ring(q.dtype) is not None:  # a chunk: the whole ring (before the write) in front of it
            rows = torch.cat((cache.window_ring(q.dtype), kv), dim=1)
            window_key = ("ring_chunk_idx", S, W)
            idx = shared(pos0, window_key, lambda: ring_chunk_indices(pos0, S, W))                # [B, S, W]
            cache.write_window(pos0, kv)
        else:  # a chunk on FP8 rows: the ring's earlier rows gathered (decoded) in front of the chunk's rows
            rows = torch.cat((cache.window(pos0), kv), dim=1)
            n_prior = rows.shape[1] - S
            window_key = ("window_idx", S, n_prior, W)
            idx = shared(pos0, window_key, lambda: window_indices(pos0, S, n_prior, W))           # [B, S, W]
            cache.write_window(pos0, kv)
        if self.ratio:
            n_visible = shared(pos0, ("n_visible", S, self.ratio), lambda: (pos + 1) // self.ratio)  # j < n complete
            cache.add_entries(self.compressor(x, pos0, self.freqs, self.quant_sim, cache.compressor_state))
            records = cache.entry_records()  # FP8 records go to the attention as stored (no dequantised copy)
            entries = cache.entries() if records is None else records  # a second source of rows: no cat copy
            n_rows, n_entries = rows.shape[1], entries.shape[1]  # entry j is row n_rows + j
            if self.kind == "csa" and self.sparse:  # the window list, then the selected entries
                idx = self.indexer(x, qr, pos0, cos, sin, self.freqs, n_visible, cache, prefix=idx, offset=n_rows)
            else:  # every visible entry: the same list in every such layer of the step
                if self.kind == "csa":  # the indexer's cache advances even while attention is dense
                    self.indexer(x, qr, pos0, cos, sin, self.freqs, n_visible, cache)
                idx = shared(pos0, ("dense_idx", self.ratio, n_entries) + window_key,
                             lambda: with_prefix(visible_entries(n_visible, n_entries), idx, n_rows))
            return ops.sparse_attn(q, rows, self.attn_sink, idx, self.softmax_scale, entries, self.rope_dim)
        return ops.sparse_attn(q, rows, self.attn_sink, idx, self.softmax_scale)


def topk_mask(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """[B, S, N] bool: the k best visible entries per query. Exact-zero scores (every head's ReLU at 0) tie; they
    go to the older entry, as in ops.indexer_topk, by ranking them by a vanishing age penalty."""
    k = min(k, scores.shape[-1])
    age = torch.arange(scores.shape[-1], device=scores.device, dtype=scores.dtype)
    ranked = torch.where(scores == 0, -(age + 1) * 1e-30, scores).masked_fill(~visible, float("-inf"))
    return torch.zeros_like(visible).scatter(-1, ranked.topk(k, dim=-1).indices, True) & visible


def replayed_mask(chosen: torch.Tensor, ids: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Routing replay of the indexer: [B, S, N] bool selecting entries `ids` [B, S, k] (-1 pads) for the queries
    where `known` [B, S], and `chosen` (this forward's own top-k) elsewhere."""
    if ids.shape[:2] != chosen.shape[:2]:
        raise ValueError(f"indexer replay gives ids for {tuple(ids.shape[:2])} queries, the forward has "
                         f"{tuple(chosen.shape[:2])}")
    N = chosen.shape[-1]
    slots = torch.where((ids >= 0) & (ids < N), ids, N).long()
    given = torch.zeros(*chosen.shape[:2], N + 1, dtype=torch.bool, device=chosen.device)
    given = given.scatter(-1, slots, True)[..., :N]
    return torch.where(known.unsqueeze(-1), given, chosen)


def indexer_kl(scores: torch.Tensor, entry_mass: torch.Tensor, mask: torch.Tensor,
               total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """KL(target || softmax(indexer scores)) over the entries a query attends to
    (docs/architecture.md#indexer-training).

    target: the main attention's probability on those entries within its joint softmax, summed over heads
    (`entry_mass` [B, S, N]) and normalised (no gradient). Queries that attend to no entry are skipped.
    total: sums over the holders of the sequences' other queries (context parallelism): the mean is theirs too."""
    target = entry_mass.detach() * mask                                              # [B, S, N]
    mass = target.sum(-1, keepdim=True)
    live = (mass.squeeze(-1) > 0).float()  # a weighted mean, not kl[live]: no host sync (CUDA graphs)
    target = target / mass.clamp(min=1e-30)
    logq = torch.log_softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    kl = (target * (torch.log(target.clamp(min=1e-30)) - logq.masked_fill(~mask, 0.0))).sum(-1)
    kl_sum, n_live = (kl * live).sum(), live.sum()
    if total is not None:
        kl_sum, n_live = total(kl_sum), total(n_live)
    return kl_sum / n_live.clamp(min=1.0)
