"""Lightning-indexer scores fused with the head reduction: I[b,s,t] = sum_h w[b,s,h] relu(q[b,s,h] . k[b,t])
for the visible t, -inf elsewhere; the [B, S, Hi, T] per-head dot products never reach memory. Top-k then
runs on the scores (zero-score ties go to the older entry, as in the reference), queries in chunks."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant.records import record_layout
from ..reference.indexer import index_scores as reference_index_scores
from .launch import autograd_tracks, falls_back_to, multiprocessors, reference_grads, training_kernels_enabled


@triton.jit
def _e2m1(c):
    """e2m1 codes (int32 0..15: sign, 2-bit exponent, 1-bit mantissa) -> fp32 values."""
    e = (c >> 1) & 3
    m = (c & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * tl.exp2((e - 1).to(tl.float32)))
    return tl.where((c >> 3) & 1 == 1, -mag, mag)


@triton.jit
def _index_scores_kernel(q_ptr, w_ptr, k_ptr, nv_ptr, out_ptr, S, T, HI, t_per_prog,
                         sq_b, sq_s, sq_h, sw_b, sw_s, sk_b, sk_t, so_b, so_s,
                         DI: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, FP4: tl.constexpr,
                         VALUES_AT: tl.constexpr, SCALE_AT: tl.constexpr, SCALE_BLOCK: tl.constexpr):
    """Few queries (decode): one query's heads against t_per_prog keys in BLOCK_T steps (q and w read once per
    program, the key loads pipelined across steps). FP4 key records: packed e2m1 at byte VALUES_AT, one UE8M0
    scale per SCALE_BLOCK values at byte SCALE_AT (dsv4.quant.records' layout)."""
    pid_t = tl.program_id(0)
    b = (pid_t // S).to(tl.int64)      # int64 offsets: s * so_s (the [B, S, T] scores) passes 2^31 at 128K tokens
    s = (pid_t % S).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    hmask = heads < HI
    d = tl.arange(0, DI)
    q = tl.load(q_ptr + b * sq_b + s * sq_s + heads[:, None] * sq_h + d[None, :], mask=hmask[:, None], other=0.0)
    w = tl.load(w_ptr + b * sw_b + s * sw_s + heads, mask=hmask, other=0.0).to(tl.float32)
    n_vis = tl.load(nv_ptr + pid_t)
    t_lo = tl.program_id(1) * t_per_prog
    for t0 in range(t_lo, tl.minimum(T, t_lo + t_per_prog), BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        if FP4:  # keys as the cache stores them: packed e2m1 (low nibble = even channel), a UE8M0 scale per 32
            j = tl.arange(0, DI // 2)
            rec = k_ptr + b * sk_b + ts[:, None] * sk_t
            packed = tl.load(rec + VALUES_AT + j[None, :], mask=(ts < T)[:, None], other=0).to(tl.int32)
            vals = tl.reshape(tl.join(_e2m1(packed & 15), _e2m1(packed >> 4)), (BLOCK_T, DI))
            sc = tl.load(rec + SCALE_AT + d[None, :] // SCALE_BLOCK, mask=(ts < T)[:, None], other=127)
            sc = sc.to(tl.float32)
            k = (vals * tl.exp2(sc - 127.0)).to(q.dtype)
        else:
            k = tl.load(k_ptr + b * sk_b + ts[:, None] * sk_t + d[None, :], mask=(ts < T)[:, None], other=0.0)
        dots = tl.maximum(tl.dot(q, tl.trans(k)).to(tl.float32), 0.0)                  # [BLOCK_H, BLOCK_T]
        score = tl.sum(dots * w[:, None], 0)
        # exact zeros (every head's ReLU at 0) would tie: order them by age, older first, as the reference's
        # stable sort does, so the cheaper unstable top-k picks the same entries
        score = tl.where(score == 0.0, -(ts + 1).to(tl.float32) * 1e-30, score)
        score = tl.where(ts < n_vis, score, float("-inf"))
        tl.store(out_ptr + b * so_b + s * so_s + ts, score, mask=ts < T)


@triton.jit
def _query_block(S, QB: tl.constexpr):
    """This program's sequence and first query: program_id(0) = b * (query blocks per sequence) + block."""
    n_qb = tl.cdiv(S, QB)  # int64: the callers' offsets (query * row stride of [B, S, T] scores) pass 2^31 at 128K
    return (tl.program_id(0) // n_qb).to(tl.int64), ((tl.program_id(0) % n_qb) * QB).to(tl.int64)


@triton.jit
def _query_tile(q_ptr, w_ptr, b, s0, S, HI, sq_b, sq_s, sq_h, sw_b, sw_s,
                DI: tl.constexpr, HP: tl.constexpr, QB: tl.constexpr):
    """Queries s0 .. s0+QB-1 x all heads as one [QB*HP, DI] tile (row = query * HP + head), their fp32 head
    weights, and each row's query, head and validity."""
    r = tl.arange(0, QB * HP)
    qi, h = s0 + r // HP, r % HP
    b = b.to(tl.int64)  # (callers pass int32 or int64: the offsets below are int64 either way)
    qi = qi.to(tl.int64)
    rmask = (qi < S) & (h < HI)
    d = tl.arange(0, DI)
    q = tl.load(q_ptr + b * sq_b + qi[:, None] * sq_s + h[:, None] * sq_h + d[None, :], mask=rmask[:, None], other=0.0)
    w = tl.load(w_ptr + b * sw_b + qi * sw_s + h, mask=rmask, other=0.0).to(tl.float32)
    return q, w, qi, h, rmask


@triton.jit
def _index_scores_tiled_kernel(q_ptr, w_ptr, k_ptr, nv_ptr, out_ptr, S, T, HI, t_per_prog,
                               sq_b, sq_s, sq_h, sw_b, sw_s, sk_b, sk_t, so_b, so_s,
                               DI: tl.constexpr, HP: tl.constexpr, QB: tl.constexpr, BLOCK_T: tl.constexpr):
    """Many queries (prefill): a program holds QB queries x all heads as one [QB*HP, DI] tile and streams key
    tiles past it, so each key tile feeds QB*HP rows of one tensor-core product and q is read once."""
    b, s0 = _query_block(S, QB)
    d = tl.arange(0, DI)
    q, w, qi, h, rmask = _query_tile(q_ptr, w_ptr, b, s0, S, HI, sq_b, sq_s, sq_h, sw_b, sw_s, DI, HP, QB)
    qs = s0 + tl.arange(0, QB)
    n_vis = tl.load(nv_ptr + b * S + qs, mask=qs < S, other=0)
    most = tl.max(n_vis, 0)
    t_lo = tl.program_id(1) * t_per_prog
    for t0 in range(t_lo, tl.minimum(T, t_lo + t_per_prog), BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        if t0 < most:
            k = tl.load(k_ptr + b * sk_b + ts[:, None] * sk_t + d[None, :], mask=(ts < T)[:, None], other=0.0)
            dots = tl.maximum(tl.dot(q, tl.trans(k)).to(tl.float32), 0.0) * w[:, None]     # [QB*HP, BLOCK_T]
            score = tl.sum(tl.reshape(dots, (QB, HP, BLOCK_T)), 1)                          # [QB, BLOCK_T]
            score = tl.where(score == 0.0, -(ts[None, :] + 1).to(tl.float32) * 1e-30, score)
            score = tl.where(ts[None, :] < n_vis[:, None], score, float("-inf"))
        else:  # no query of the block sees these keys yet
            score = tl.full([QB, BLOCK_T], float("-inf"), tl.float32)
        tl.store(out_ptr + b * so_b + qs[:, None] * so_s + ts[None, :], score, mask=(qs < S)[:, None] & (ts < T)[None, :])


def index_scores_masked(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor,
                        n_visible: torch.Tensor, steps_per_program: int | None = None) -> torch.Tensor:
    """[B, S, T] fp32 scores, -inf for t >= n_visible[b, s]. keys: [B, T, DI] floats, or the cache's FP4 records
    (uint8 [B, T, DI/2 + DI/32]) read as stored. steps_per_program: 64-key steps per decode program (default:
    1 where the launch would not fill the GPU otherwise, up to 8 in batched decode)."""
    B, S, HI, DI = q.shape
    T = keys.shape[1]
    fp4 = keys.dtype == torch.uint8
    # where an FP4 key record's parts sit (dsv4.quant.records); unused for float keys
    at = dict(VALUES_AT=0, SCALE_AT=0, SCALE_BLOCK=32)
    if fp4:
        lay = record_layout("fp4", "index", DI, 0)
        if keys.shape[-1] != lay.nbytes:
            raise ValueError(f"FP4 key records for index head dim {DI} are {lay.nbytes} bytes, "
                             f"keys have {keys.shape[-1]}")
        at = dict(VALUES_AT=lay.values[0], SCALE_AT=lay.scales[0], SCALE_BLOCK=lay.scale_block)
    if not fp4 and keys.dtype != q.dtype:
        keys = keys.to(q.dtype)
    q = q.contiguous()
    if keys.stride(-1) != 1:  # rows may be strided (a cache's prefix view), channels must be contiguous
        keys = keys.contiguous()
    weights = weights.float().contiguous()
    nv = n_visible.contiguous()  # int32 or int64, read as they are
    out = torch.empty(B, S, T, dtype=torch.float32, device=q.device)
    HP = max(16, triton.next_power_of_2(HI))
    if S >= 64 and not fp4 and HP <= 128:  # prefill: query blocks against streamed key tiles
        qb, bt = max(1, 128 // HP), 64
        per = bt * 8
        _index_scores_tiled_kernel[(B * triton.cdiv(S, qb), triton.cdiv(T, per))](
            q, weights, keys, nv, out, S, T, HI, per, q.stride(0), q.stride(1), q.stride(2), weights.stride(0),
            weights.stride(1), keys.stride(0), keys.stride(1), out.stride(0), out.stride(1),
            DI=DI, HP=HP, QB=qb, BLOCK_T=bt, num_warps=8, num_stages=2)
        return out
    block_t = 64
    tiles = triton.cdiv(T, block_t)
    if steps_per_program is None:  # several steps per program once the launch has 4 programs per SM anyway
        sms = multiprocessors(q.device)
        steps_per_program = max(1, min(8, B * S * tiles // (4 * sms)))
    per = block_t * steps_per_program
    _index_scores_kernel[(B * S, triton.cdiv(T, per))](
        q, weights, keys, nv, out, S, T, HI, per, q.stride(0), q.stride(1), q.stride(2), weights.stride(0),
        weights.stride(1), keys.stride(0), keys.stride(1), out.stride(0), out.stride(1),
        DI=DI, BLOCK_H=max(16, triton.next_power_of_2(HI)), BLOCK_T=block_t, FP4=fp4, **at, num_warps=4)
    return out


def index_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Same contract as ops.reference.indexer.index_scores (exact-zero scores become vanishing negative
    values ordered by age, which changes no top-k choice; the caller masks visibility). Differentiable: the
    indexer's KL loss trains q, weights and keys through _IndexScores."""
    if autograd_tracks(q, weights, keys):
        return _IndexScores.apply(q, weights.float(), keys if keys.dtype == q.dtype else keys.to(q.dtype))
    return _all_scores(q, weights, keys)


def _all_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    B, S = q.shape[:2]
    full = torch.full((B, S), keys.shape[1], dtype=torch.int32, device=q.device)
    return index_scores_masked(q, weights, keys, full)


@triton.jit
def _any_nonzero(g):
    return tl.max(tl.max(tl.abs(g), 1), 0) > 0


@triton.jit
def _per_head(g, QB: tl.constexpr, HP: tl.constexpr, BLOCK_T: tl.constexpr):
    """[QB, BLOCK_T] per-query values -> [QB*HP, BLOCK_T], one row per (query, head) as the query tiles lay out."""
    return tl.reshape(tl.broadcast_to(g[:, None, :], (QB, HP, BLOCK_T)), (QB * HP, BLOCK_T))


@triton.jit
def _index_scores_dq_kernel(q_ptr, w_ptr, k_ptr, g_ptr, dq_ptr, dw_ptr, S, T, HI,
                            sq_b, sq_s, sq_h, sw_b, sw_s, sk_b, sk_t,
                            DI: tl.constexpr, HP: tl.constexpr, QB: tl.constexpr, BLOCK_T: tl.constexpr):
    """dq and dw of QB queries x all heads (one [QB*HP, DI] tile) against streamed key tiles, p = q . k recomputed:
    dw[s,h] = sum_t g[s,t] relu(p), dq[s,h] = sum_t g[s,t] w[s,h] [p > 0] k[t]. Key tiles whose g is all zero
    (entries no query of the block sees) are skipped."""
    b, s0 = _query_block(S, QB)
    d = tl.arange(0, DI)
    q, w, qi, h, rmask = _query_tile(q_ptr, w_ptr, b, s0, S, HI, sq_b, sq_s, sq_h, sw_b, sw_s, DI, HP, QB)
    qs = s0 + tl.arange(0, QB)
    g_rows = g_ptr + (b * S + qs).to(tl.int64) * T
    dq = tl.zeros([QB * HP, DI], tl.float32)
    dw = tl.zeros([QB * HP], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        g = tl.load(g_rows[:, None] + ts[None, :], mask=(qs < S)[:, None] & (ts < T)[None, :], other=0.0)
        if _any_nonzero(g):
            gh = _per_head(g, QB, HP, BLOCK_T)  # (a new name: a compiled `if` may not change g's shape)
            k = tl.load(k_ptr + b * sk_b + ts[:, None] * sk_t + d[None, :], mask=(ts < T)[:, None], other=0.0)
            p = tl.dot(q, tl.trans(k)).to(tl.float32)                                   # [QB*HP, BLOCK_T]
            dw += tl.sum(gh * tl.maximum(p, 0.0), 1)
            dq += tl.dot(tl.where(p > 0, gh * w[:, None], 0.0).to(k.dtype), k).to(tl.float32)
    out = (b * S + qi).to(tl.int64) * HI + h
    tl.store(dq_ptr + out[:, None] * DI + d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=rmask[:, None])
    tl.store(dw_ptr + out, dw, mask=rmask)


@triton.jit
def _index_scores_dk_kernel(q_ptr, w_ptr, k_ptr, g_ptr, dk_ptr, B, S, T, HI, s_per_split,
                            sq_b, sq_s, sq_h, sw_b, sw_s, sk_b, sk_t,
                            DI: tl.constexpr, HP: tl.constexpr, QB: tl.constexpr, BLOCK_T: tl.constexpr):
    """dk of BLOCK_T keys over one slice of the queries: sum_{s,h} g[s,t] w[s,h] [p > 0] q[s,h], the slice's
    partial sum to dk[slice, b, t] (fp32; the slices are added after). Query blocks with g all zero are skipped."""
    n_tb = tl.cdiv(T, BLOCK_T)
    b = tl.program_id(0) // n_tb
    ts = (tl.program_id(0) % n_tb) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, DI)
    k = tl.load(k_ptr + b * sk_b + ts[:, None] * sk_t + d[None, :], mask=(ts < T)[:, None], other=0.0)
    dk = tl.zeros([BLOCK_T, DI], tl.float32)
    s_lo = tl.program_id(1) * s_per_split
    for s0 in range(s_lo, tl.minimum(S, s_lo + s_per_split), QB):
        qs = s0 + tl.arange(0, QB)
        g = tl.load(g_ptr + (b * S + qs[:, None]).to(tl.int64) * T + ts[None, :],
                    mask=(qs < S)[:, None] & (ts < T)[None, :], other=0.0)
        if _any_nonzero(g):
            q, w, _, _, _ = _query_tile(q_ptr, w_ptr, b, s0, S, HI, sq_b, sq_s, sq_h, sw_b, sw_s, DI, HP, QB)
            p = tl.dot(q, tl.trans(k)).to(tl.float32)                                   # [QB*HP, BLOCK_T]
            ds = tl.where(p > 0, _per_head(g, QB, HP, BLOCK_T) * w[:, None], 0.0)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q).to(tl.float32)
    row = (tl.program_id(1) * B + b).to(tl.int64) * T + ts
    tl.store(dk_ptr + row[:, None] * DI + d[None, :], dk, mask=(ts < T)[:, None])


def _reference_backward(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, g: torch.Tensor,
                        splits: int | None = None) -> tuple[torch.Tensor, ...]:
    return reference_grads(reference_index_scores, (q, weights, keys), g)


@falls_back_to(_reference_backward)
def index_scores_backward(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, g: torch.Tensor,
                          splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq in q's dtype, dweights fp32, dkeys in keys' dtype) of sum(g * index_scores(q, weights, keys)).
    splits: query slices the key gradient is summed over (default: enough programs to fill the GPU)."""
    B, S, HI, DI = q.shape
    T = keys.shape[1]
    q = q.contiguous()
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    weights, g = weights.float().contiguous(), g.float().contiguous()
    HP = max(16, triton.next_power_of_2(HI))
    qb = max(1, 128 // HP)
    dq = torch.empty_like(q)
    dw = torch.empty(B, S, HI, dtype=torch.float32, device=q.device)
    strides = (q.stride(0), q.stride(1), q.stride(2), weights.stride(0), weights.stride(1), keys.stride(0),
               keys.stride(1))
    _index_scores_dq_kernel[(B * triton.cdiv(S, qb),)](q, weights, keys, g, dq, dw, S, T, HI, *strides,
                                                       DI=DI, HP=HP, QB=qb, BLOCK_T=32, num_warps=8)
    bt = 64
    n_tb = triton.cdiv(T, bt)
    if splits is None:
        sms = multiprocessors(q.device)
        splits = max(1, min(triton.cdiv(2 * sms, B * n_tb), triton.cdiv(S, 256)))
    per = triton.cdiv(triton.cdiv(S, splits), qb) * qb
    splits = triton.cdiv(S, per)
    part = torch.empty(splits, B, T, DI, dtype=torch.float32, device=q.device)
    _index_scores_dk_kernel[(B * n_tb, splits)](q, weights, keys, g, part, B, S, T, HI, per, *strides,
                                                DI=DI, HP=HP, QB=qb, BLOCK_T=bt, num_warps=8)
    return dq, dw, part.sum(0).to(keys.dtype)


class _IndexScores(torch.autograd.Function):
    """The fused scores under autograd. The per-head products [S, Hi, T] are recomputed tile by tile in the
    backward, never stored (the reference saves them per checkpointed chunk in fp32: 1 GB per CSA layer at 4K)."""

    @staticmethod
    def forward(ctx, q, weights, keys):
        ctx.save_for_backward(q, weights, keys)
        return _all_scores(q, weights, keys)

    @staticmethod
    def backward(ctx, g):
        return index_scores_backward(*ctx.saved_tensors, g)


def supports_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> bool:
    """Inference and the sparse stage's selection; the indexer's KL loss too (a backward of its own) unless the
    Triton training kernels are turned off."""
    return supports(q, weights, keys, None, 0) and (not autograd_tracks(q, weights, keys) or training_kernels_enabled())


def topk_indices(scores: torch.Tensor, k: int, sort: bool = False) -> torch.Tensor:
    """Indices of the k largest scores along the last dim (distinct scores: the kernel breaks zero ties).

    Unsorted by default: the attention sums over the selection in any order, and sorting the k results is a
    separate radix-sort kernel per CSA layer in the decode profile (~20 us). `sort` (batch-invariant mode) keeps
    them sorted by score, an order that cannot depend on which top-k algorithm the batch size picks. (A two-stage
    top-k over row blocks measures slower than one torch.topk on the H100.)"""
    return scores.topk(k, dim=-1, sorted=sort).indices


SCORE_BUFFER_ELEMENTS = 1 << 28  # queries run in chunks whose fp32 scores [B, chunk, T] stay within ~1 GB


@triton.jit
def _finish_lists_kernel(top_ptr, nv_ptr, pre_ptr, out_ptr, n, S, s0, K, P, offset, BLOCK: tl.constexpr):
    """One query's list: its prefix, then its top-k entries + offset where visible (j < n_visible), else -1.
    top: this chunk's [B, n, K]; n_visible, prefix and out: whole [B, S, ...] (the chunk starts at s0)."""
    t = tl.program_id(0)
    row = ((t // n) * S + s0 + t % n).to(tl.int64)
    j = tl.arange(0, BLOCK)
    for c in range(0, P, BLOCK):
        tl.store(out_ptr + row * (P + K) + c + j, tl.load(pre_ptr + row * P + c + j, mask=c + j < P), mask=c + j < P)
    n_vis = tl.load(nv_ptr + row)
    for c in range(0, K, BLOCK):
        top = tl.load(top_ptr + t.to(tl.int64) * K + c + j, mask=c + j < K, other=0)
        tl.store(out_ptr + row * (P + K) + P + c + j, tl.where(top < n_vis, top + offset, -1), mask=c + j < K)


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, n_visible: torch.Tensor,
                 k: int, prefix: torch.Tensor | None = None, offset: int = 0, sort: bool = False) -> torch.Tensor:
    """Same contract as ops.reference.indexer.indexer_topk. The visibility mask, the offset and the prefix
    are applied by one kernel (one launch per CSA layer and decode step instead of three). sort: each list's
    entries in descending score order (batch-invariant mode; see topk_indices)."""
    B, S = q.shape[:2]
    T = keys.shape[1]
    k = min(k, T)
    P = 0 if prefix is None else prefix.shape[-1]
    out = torch.empty(B, S, P + k, dtype=torch.long, device=q.device)
    pre = out if prefix is None else prefix.expand(B, S, P).contiguous()
    nv = n_visible.contiguous()
    step = max(1, SCORE_BUFFER_ELEMENTS // max(T * B, 1))
    for s0 in range(0, S, step):
        n = min(S, s0 + step) - s0
        sl = slice(s0, s0 + n)
        top = topk_indices(index_scores_masked(q[:, sl], weights[:, sl], keys, nv[:, sl]), k, sort).contiguous() if k \
            else out
        _finish_lists_kernel[(B * n,)](top, nv, pre, out, n, S, s0, k, P, offset, BLOCK=128, num_warps=4)
    return out


def supports(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, n_visible: torch.Tensor, k: int) -> bool:
    DI = q.shape[-1]
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and DI >= 16 and not DI & (DI - 1) \
        and q.shape[2] <= 128
